"""The GCT gate: both implementations against an independent reference, the fast
path's analytic backward, precision, identity at init, and tracing/export."""
from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

from gct_surgery import inject
from gct_surgery.core.gate import (
    GCT,
    GateConfig,
    gct,
    gct_reference,
    set_gate_impl,
)
from gct_surgery.core.surgery import gates

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1] / "benchmarks"))
from fold_at_inference import gated_conv_operands  # noqa: E402  (a benchmark's own helper)

MODES = [("l2", False), ("l1", False), ("l1", True)]
MODE_IDS = ["l2", "l1", "l1-after_relu"]
SHAPES = {3: (3, 5, 11), 4: (3, 5, 6, 7), 5: (2, 5, 3, 4, 5)}


# --------------------------------------------------------------------------- helpers

def independent_gct(x, alpha, gamma, beta, mode, eps=1e-5, after_relu=False):
    """GCT written from the method's definition (GCT-NOTES.md), in float64.

    l2: s = alpha * sqrt(sum_spatial x^2 + eps); norm = gamma / sqrt(mean_C s^2 + eps)
    l1: s = alpha * sum_spatial z (z = |x|, or x after a ReLU); norm = gamma / (mean_C |s| + eps)
    gate = 1 + tanh(s * norm + beta); y = x * gate
    """
    x, alpha, gamma, beta = (t.double() for t in (x, alpha, gamma, beta))
    dims = list(range(2, x.ndim))
    if mode == "l2":
        s = alpha * torch.sqrt(torch.sum(x * x, dim=dims, keepdim=True) + eps)
        norm = gamma / torch.sqrt(torch.mean(s * s, dim=1, keepdim=True) + eps)
    else:
        z = x if after_relu else torch.abs(x)
        s = alpha * torch.sum(z, dim=dims, keepdim=True)
        norm = gamma / (torch.mean(torch.abs(s), dim=1, keepdim=True) + eps)
    return x * (1 + torch.tanh(s * norm + beta))


def random_params(channels, rank, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (1, channels) + (1,) * (rank - 2)
    # |alpha| in [0.5, 1.5], some negative: training can flip the embedding's sign
    alpha = (torch.rand(shape, generator=g, dtype=torch.float64) + 0.5)
    alpha = alpha * torch.where(torch.arange(channels).reshape(shape) % 3 == 1, -1.0, 1.0)
    gamma = torch.randn(shape, generator=g, dtype=torch.float64)
    beta = torch.randn(shape, generator=g, dtype=torch.float64) * 0.5
    return [t.to(dtype) for t in (alpha, gamma, beta)]


def random_input(shape, after_relu, dtype=torch.float32, seed=1):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (x.relu() if after_relu else x).to(dtype)


def randomized_gct(channels, rank, mode, after_relu, impl="fast", seed=0):
    m = GCT(channels, mode=mode, after_relu=after_relu, spatial_dims=rank - 2, impl=impl)
    with torch.no_grad():
        for p, v in zip((m.alpha, m.gamma, m.beta), random_params(channels, rank, seed=seed)):
            p.copy_(v)
    return m


def scaled_error(actual, expected):
    """max |actual - expected| over the scale of expected (its max abs, at least 1)."""
    actual, expected = actual.double(), expected.double()
    scale = max(expected.abs().max().item(), 1.0)
    return (actual - expected).abs().max().item() / scale


def bits(t):
    """The raw bits of a float tensor, for bit-for-bit comparisons (-0.0 != 0.0)."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])


def forward_and_grads(fn, x, params, upstream):
    x = x.detach().clone().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in params]
    y = fn(x, *params)
    grads = torch.autograd.grad((y * upstream).sum(), [x, *params])
    return y.detach(), grads


# --------------------------------------------------------------------------- correctness

@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("rank", [3, 4, 5])
@pytest.mark.parametrize("mode,after_relu", MODES, ids=MODE_IDS)
def test_module_matches_independent_reference(impl, rank, mode, after_relu):
    shape = SHAPES[rank]
    x = random_input(shape, after_relu)
    m = randomized_gct(shape[1], rank, mode, after_relu, impl=impl)
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(7))

    x_ = x.clone().requires_grad_()
    y = m(x_)
    assert y.dtype == torch.float32 and y.shape == x.shape
    got = torch.autograd.grad((y * upstream).sum(), [x_, m.alpha, m.gamma, m.beta])

    params = [m.alpha.detach(), m.gamma.detach(), m.beta.detach()]
    want_y, want = forward_and_grads(
        lambda *a: independent_gct(*a, mode=mode, after_relu=after_relu),
        x.double(), [p.double() for p in params], upstream.double())

    assert scaled_error(y, want_y) < 1e-6
    for name, g, w in zip(("x", "alpha", "gamma", "beta"), got, want):
        assert g.shape == w.shape and g.dtype == torch.float32, name
        assert w.abs().max() > 0, name  # the test would be vacuous otherwise
        assert scaled_error(g, w) < 1e-6, name


@pytest.mark.parametrize("rank", [3, 4, 5])
@pytest.mark.parametrize("mode,after_relu", MODES, ids=MODE_IDS)
def test_fast_matches_reference_on_larger_input(rank, mode, after_relu):
    shape = {3: (4, 16, 300), 4: (4, 16, 24, 20), 5: (2, 16, 6, 8, 7)}[rank]
    x = random_input(shape, after_relu, seed=3) * 3
    params = random_params(shape[1], rank, seed=4)
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    kw = dict(mode=mode, after_relu=after_relu)
    y_fast, g_fast = forward_and_grads(lambda *a: gct(*a, **kw), x, params, upstream)
    y_ref, g_ref = forward_and_grads(lambda *a: gct_reference(*a, **kw), x, params, upstream)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5 * y_ref.abs().max().item())
    for g, w in zip(g_fast, g_ref):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item())


@pytest.mark.parametrize("rank", [3, 4, 5])
@pytest.mark.parametrize("mode,after_relu", MODES, ids=MODE_IDS)
def test_gradcheck_fast_function(rank, mode, after_relu):
    shape = {3: (2, 3, 5), 4: (2, 3, 3, 4), 5: (2, 3, 2, 3, 2)}[rank]
    x = random_input(shape, after_relu, dtype=torch.float64, seed=11)
    params = random_params(shape[1], rank, dtype=torch.float64, seed=12)
    inputs = [t.clone().requires_grad_() for t in (x, *params)]
    assert torch.autograd.gradcheck(
        lambda *a: gct(*a, mode=mode, after_relu=after_relu), inputs, eps=1e-6, atol=1e-7)
    # and the custom Function really is what ran (not an autograd-traced fallback)
    y = gct(*inputs, mode=mode, after_relu=after_relu)
    assert type(y.grad_fn).__name__ == "_GCTFunctionBackward"


def test_l1_gradient_of_zero_entries_is_the_subgradient_zero():
    # abs'(0) is taken as sign(0) = 0, like autograd's abs
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    x[:, :, ::2, ::2] = 0.0
    params = random_params(4, 4, dtype=torch.float64)
    upstream = torch.randn_like(x)
    _, g_fast = forward_and_grads(lambda *a: gct(*a, mode="l1"), x, params, upstream)
    _, g_ind = forward_and_grads(lambda *a: independent_gct(*a, mode="l1"), x, params, upstream)
    for g, w in zip(g_fast, g_ind):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode,after_relu", MODES, ids=MODE_IDS)
def test_no_grad_path_equals_autograd_path(mode, after_relu):
    x = random_input((3, 6, 9, 8), after_relu)
    m = randomized_gct(6, 4, mode, after_relu)
    with torch.no_grad():
        y_nograd = m(x)
    with torch.inference_mode():
        y_inf = m(x)
    y_grad = m(x.clone().requires_grad_())
    assert y_grad.grad_fn is not None and y_nograd.grad_fn is None
    assert torch.equal(bits(y_nograd), bits(y_grad.detach()))
    assert torch.equal(bits(y_inf), bits(y_nograd))


@pytest.mark.parametrize("mode,after_relu", MODES, ids=MODE_IDS)
def test_channels_last_input(mode, after_relu):
    x = random_input((3, 8, 7, 9), after_relu)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert not x_cl.is_contiguous()
    params = random_params(8, 4)
    upstream = torch.randn(x.shape)
    kw = dict(mode=mode, after_relu=after_relu)
    y, grads = forward_and_grads(lambda *a: gct(*a, **kw), x, params, upstream)
    y_cl, grads_cl = forward_and_grads(lambda *a: gct(*a, **kw), x_cl, params,
                                       upstream.contiguous(memory_format=torch.channels_last))
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    assert grads_cl[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl, y, rtol=1e-6, atol=1e-6)
    for g, w in zip(grads_cl, grads):  # same math, another summation order
        assert scaled_error(g, w) < 1e-5
    with torch.no_grad():
        y_cl_nograd = gct(x_cl, *params, **kw)
    assert y_cl_nograd.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl_nograd, y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("mode,after_relu", MODES, ids=MODE_IDS)
def test_fast_saves_only_the_input_and_per_channel_statistics(mode, after_relu, channels_last):
    x = random_input((4, 8, 16, 16), after_relu)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    params = [p.requires_grad_() for p in random_params(8, 4)]
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = gct(x, *params, mode=mode, after_relu=after_relu)
    big = {k: v for k, v in saved.items() if v > 4 * 8 * 8}  # more than (N, C) float64
    assert big == {x.untyped_storage().data_ptr(): x.untyped_storage().nbytes()}
    y.sum().backward()  # and the backward runs from what was saved
    assert x.grad is not None and all(p.grad is not None for p in params)


def test_wrong_rank_and_bad_options_raise():
    m = GCT(4)  # 2-D spatial
    with pytest.raises(ValueError, match="4-D"):
        m(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="mode"):
        GCT(4, mode="l3")
    with pytest.raises(ValueError, match="impl"):
        GCT(4, impl="cuda")


# --------------------------------------------------------------------------- init and range

@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mode,after_relu", MODES, ids=MODE_IDS)
def test_identity_at_init_bit_for_bit(impl, dtype, mode, after_relu):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 6, 9, 9, generator=g) * torch.logspace(-6, 3, 9)).to(dtype)
    x[0, 0, 0, :3] = torch.tensor([-0.0, 0.0, 1e-30]).to(dtype)
    if after_relu:
        x = x.relu()
    m = GCT(6, mode=mode, after_relu=after_relu, impl=impl).to(dtype)
    with torch.no_grad():
        y_nograd = m(x)
    y_grad = m(x.clone().requires_grad_())
    y_cl = m(x.contiguous(memory_format=torch.channels_last))
    for y in (y_nograd, y_grad.detach(), y_cl.detach()):
        assert y.dtype == dtype
        assert torch.equal(bits(y), bits(x))


def test_identity_at_init_through_an_injected_network():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(),
                          nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        before = model(x)
    assert inject(model).gates_added == 3
    with torch.no_grad():
        after = model(x)
    assert torch.equal(bits(after), bits(before))
    assert torch.equal(bits(model(x.requires_grad_()).detach()), bits(before))


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("mode,after_relu", MODES, ids=MODE_IDS)
def test_gate_values_lie_in_0_2(impl, mode, after_relu):
    x = random_input((4, 32, 8, 8), after_relu, seed=9) * 5
    m = randomized_gct(32, 4, mode, after_relu, impl=impl)
    with torch.no_grad():
        ratio = m(x) / x
    gate = ratio[x != 0]
    # (In float32, |t| > ~9 rounds tanh to +-1 and the gate to exactly 0 or 2.)
    assert gate.min() > 0 and gate.max() < 2
    assert gate.max() - gate.min() > 1.0  # the gates are not all ~1
    fast = m.gate_values(x)
    assert fast.shape == (4, 32) and fast.min() > 0 and fast.max() < 2


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("mode,after_relu", MODES, ids=MODE_IDS)
def test_gradients_at_init(impl, mode, after_relu):
    m = GCT(8, mode=mode, after_relu=after_relu, impl=impl)
    x = random_input((4, 8, 6, 6), after_relu, seed=4).requires_grad_()
    upstream = torch.randn(4, 8, 6, 6, generator=torch.Generator().manual_seed(6))
    (m(x) * upstream).sum().backward()
    assert torch.count_nonzero(m.alpha.grad) == 0
    assert torch.all(m.beta.grad != 0)
    assert torch.all(m.gamma.grad != 0)
    assert torch.equal(x.grad, upstream)  # the gate is exactly 1 and its statistics get 0


# --------------------------------------------------------------------------- precision

def test_fp16_input_with_overflowing_sum_of_squares():
    # 64*64 values of ~300: sum of squares ~3.7e8 >> fp16 max 65504
    g = torch.Generator().manual_seed(0)
    x64 = (torch.rand(2, 4, 64, 64, generator=g, dtype=torch.float64) * 100 + 250)
    x64[:, 1] *= -0.5
    x = x64.half()
    assert torch.isinf(x.pow(2).sum((2, 3))).all()  # the naive way overflows
    params = random_params(4, 4)
    want = independent_gct(x.double(), *params, mode="l2")
    for impl in (gct, gct_reference):
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                y = impl(x.clone().requires_grad_(grad), *params, mode="l2")
            assert y.dtype == torch.float16 and torch.isfinite(y).all()
            torch.testing.assert_close(y.double(), want, rtol=2e-3, atol=0)
    # the backward of the fast path is finite too
    xg = x.clone().requires_grad_()
    gct(xg, *params, mode="l2").sum().backward()
    assert xg.grad.dtype == torch.float16 and torch.isfinite(xg.grad).all()


@pytest.mark.parametrize("mode,after_relu", MODES, ids=MODE_IDS)
def test_bf16_autocast_keeps_float32_statistics(mode, after_relu):
    x = random_input((2, 16, 20, 20), after_relu, seed=5) * 30
    m = randomized_gct(16, 4, mode, after_relu)
    with torch.no_grad():
        plain = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = m(x)
            # a bf16 activation, as a conv under autocast produces
            auto_bf16 = m(x.bfloat16())
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain, rtol=1e-6, atol=1e-6)
    assert auto_bf16.dtype == torch.bfloat16
    want = independent_gct(x.bfloat16().double(), m.alpha, m.gamma, m.beta, mode=mode,
                           after_relu=after_relu)
    torch.testing.assert_close(auto_bf16.double(), want, rtol=1e-2, atol=1e-2)
    # gradients under autocast, too
    xg = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(xg)
    y.sum().backward()
    xr = x.clone().requires_grad_()
    m_ref = randomized_gct(16, 4, mode, after_relu)
    m_ref(xr).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.gamma.grad, m_ref.gamma.grad, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- impl switch

def test_set_gate_impl_switches_every_gate():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    inject(model)
    assert all(g.impl == "fast" for g in gates(model).values())
    assert set_gate_impl(model, "reference") == 2
    assert all(g.impl == "reference" for g in gates(model).values())
    assert "impl='reference'" in repr(model)
    for g in gates(model).values():
        with torch.no_grad():
            g.gamma.normal_()
    x = torch.randn(2, 3, 9, 9, requires_grad=True)

    def gate_node(out):  # the autograd node that produced the last conv's input
        return type(out.grad_fn.next_functions[0][0]).__name__

    y = model(x)
    assert gate_node(y) == "MulBackward0"
    assert set_gate_impl(model, "fast") == 2
    y_fast = model(x)
    assert gate_node(y_fast) == "_GCTFunctionBackward"
    torch.testing.assert_close(y_fast, y, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        set_gate_impl(model, "slow")
    # impl is not part of the config recorded in checkpoints, nor of the state dict
    assert "impl" not in GateConfig.__dataclass_fields__
    assert all("impl" not in k for k in model.state_dict())


# --------------------------------------------------------------------------- weight folding

@pytest.mark.parametrize("groups", [1, 2])
def test_gate_folds_into_conv_weight_at_batch_one(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 3, padding=1, groups=groups).eval()
    gate = randomized_gct(8, 4, "l2", False)
    x = torch.randn(1, 8, 16, 16)
    with torch.no_grad():
        want = conv(gate(x))
        inp, w = gated_conv_operands(gate, conv, x)
        assert inp is x and w is not None  # folded: weight 432 < activation 2048
        got = conv._conv_forward(inp, w, conv.bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # batch > 1, or a weight larger than the activation: the gate scales the activation
    with torch.no_grad():
        inp2, w2 = gated_conv_operands(gate, conv, torch.cat([x, x]))
        assert w2 is None
        torch.testing.assert_close(inp2, gate(torch.cat([x, x])))
        inp3, w3 = gated_conv_operands(gate, conv, x[:, :, :2, :2])
        assert w3 is None
    # and never when gradients are needed
    inp4, w4 = gated_conv_operands(gate, conv, x)
    assert w4 is None and inp4.grad_fn is not None


# --------------------------------------------------------------------------- tracing / export

def _gated_sequential():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    inject(model)
    for g in gates(model).values():
        with torch.no_grad():
            g.alpha.uniform_(0.5, 1.5)
            g.gamma.normal_()
            g.beta.normal_()
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    x = torch.randn(2, 3, 10, 10)
    x2 = torch.randn(2, 3, 10, 10) * 3
    with torch.no_grad():
        want = model(x2)
        # the gates matter: without them the output differs
        assert (plain(x2) - want).abs().max() > 1e-2
    return model, x, x2, want


def test_fx_symbolic_trace():
    model, x, x2, want = _gated_sequential()
    gm = torch.fx.symbolic_trace(model)
    targets = [str(n.target) for n in gm.graph.nodes]
    assert any("tanh" in t for t in targets)  # the gate is visible as plain ops
    assert "0.gate.gamma" in targets
    torch.testing.assert_close(gm(x2), want, rtol=1e-5, atol=1e-6)


def test_jit_trace():
    model, x, x2, want = _gated_sequential()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (x,))
    assert "PythonOp" not in str(traced.inlined_graph)
    assert "tanh" in str(traced.inlined_graph)
    torch.testing.assert_close(traced(x2), want, rtol=1e-5, atol=1e-6)


def test_torch_export():
    model, x, x2, want = _gated_sequential()
    ep = torch.export.export(model, (x,))
    code = ep.graph_module.code
    assert "tanh" in code
    torch.testing.assert_close(ep.module()(x2), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_export_runs_in_onnxruntime(dynamo):
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    model, x, x2, want = _gated_sequential()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            program = torch.onnx.export(model, (x,), dynamo=True, input_names=["x"],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},))
            data = program.model_proto.SerializeToString()
        else:
            f = io.BytesIO()
            torch.onnx.export(model, (x,), f, dynamo=False, input_names=["x"],
                              dynamic_axes={"x": {0: "batch"}})
            data = f.getvalue()
    session = ort.InferenceSession(data)
    (out,) = session.run(None, {"x": x2.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), want, rtol=1e-5, atol=1e-5)
    (out1,) = session.run(None, {"x": x2[:1].numpy()})
    torch.testing.assert_close(torch.from_numpy(out1), want[:1], rtol=1e-5, atol=1e-5)
