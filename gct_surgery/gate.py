"""The GCT gate: functional forms and module.

The gate computes y = x * (1 + tanh(gamma * s_hat + beta)), where s is a
per-channel embedding (l2 or l1 norm over the spatial dims, scaled by alpha) and
s_hat = s / channel-norm(s). With gamma = beta = 0 the gate is exactly 1, so
injecting it into a trained network changes nothing, bit for bit.

Statistics are computed in float32 whatever the input dtype: a sum of squares over
a large feature map overflows fp16.

Two implementations share one contract:

* ``gct_reference`` -- the official chain of small tensor ops, differentiated by
  autograd. Readable, and the one used whenever the gate is traced or exported
  (torch.fx, jit.trace, torch.onnx, torch.export, torch.compile): plain ops only.
* ``gct`` -- the fast path. Forward reads the input once for the per-(n, c)
  statistic and writes the output once; everything else is (N, C)-sized. Backward
  is analytic (``_GCTFunction``): one pass for the per-(n, c) dot product
  sum(dy * x) and one pass writing dx, with only the input and a few (N, C)
  statistics saved. Under ``torch.no_grad``/inference mode it skips autograd
  altogether: per-channel gate, then one multiply.

The backward, for one sample n and channel c (S = spatial positions, C = channels):

    l2:  q = sum_S x^2,  r = sqrt(q + eps),  s = alpha * r
         d = sqrt(mean_C s^2 + eps)
    l1:  q = sum_S z (z = |x|, or x when after_relu),  s = alpha * q
         d = mean_C |s| + eps
    both: t = s * gamma / d + beta,  gate = 1 + tanh(t),  y = x * gate

    P      = sum_S dy * x                       (dL/dgate)
    dt     = P * (1 - tanh(t)^2)
    dbeta  = sum_N dt;   dgamma = sum_N dt * s / d
    ds     = dt * gamma / d + dd * dd/ds,  dd = -sum_C dt * gamma * s / d^2
             l2: dd/ds = s / (C d)      l1: dd/ds = sign(s) / C
    l2:  dalpha = sum_N ds * r,  dx = dy * gate + x * (ds * alpha / r)
    l1:  dalpha = sum_N ds * q,  dx = dy * gate + (ds * alpha) * sign(x)   (or * 1 after_relu)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable

MODES = ("l2", "l1")
IMPLS = ("fast", "reference")


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown GCT mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode


def _check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown GCT impl {impl!r}; choose one of {', '.join(IMPLS)}")
    return impl


def gct_reference(
    x: torch.Tensor,
    alpha: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    *,
    mode: str = "l2",
    eps: float = 1e-5,
    after_relu: bool = False,
    spatial_dims: int | None = None,
) -> torch.Tensor:
    """GCT as the official code writes it: a chain of small tensor ops.

    Kept as the readable definition and as the baseline that benchmarks and tests
    compare the fast path against.
    """
    _check_mode(mode)
    # spatial_dims is passed by the module so that torch.fx can trace without x.dim().
    n_spatial = x.dim() - 2 if spatial_dims is None else spatial_dims
    spatial = tuple(range(2, 2 + n_spatial))
    # Elementwise ops and reductions on float32 tensors stay float32 under autocast.
    xf = x.float()
    a, g, b = alpha.float(), gamma.float(), beta.float()
    if mode == "l2":
        embedding = (xf.pow(2).sum(spatial, keepdim=True) + eps).pow(0.5) * a
        norm = g / (embedding.pow(2).mean(dim=1, keepdim=True) + eps).pow(0.5)
    else:
        z = xf if after_relu else xf.abs()
        embedding = z.sum(spatial, keepdim=True) * a
        norm = g / (embedding.abs().mean(dim=1, keepdim=True) + eps)
    gate = 1.0 + torch.tanh(embedding * norm + b)
    return x * gate.to(x.dtype)


# --------------------------------------------------------------------------- fast path

def _fx_tracing() -> bool:
    get = getattr(torch.fx._symbolic_trace, "_get_is_fx_tracing", None)
    return bool(get()) if get is not None else False


def is_tracing(x) -> bool:
    """True when the gate is being traced, compiled or exported rather than run.

    Then only plain differentiable ops may be used: the custom autograd Function,
    ``out=`` buffers and data-dependent layout choices are eager-only.
    """
    return (
        type(x) is not torch.Tensor  # fx Proxy, FakeTensor, FunctionalTensor, ...
        or torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or _fx_tracing()
    )


def _stat_dtype(x: torch.Tensor, alpha: torch.Tensor) -> torch.dtype:
    # float32 for fp16/bf16/float32, float64 when anything is float64.
    return torch.promote_types(torch.promote_types(x.dtype, alpha.dtype), torch.float32)


def _per_channel(p: torch.Tensor, channels: int, dtype: torch.dtype) -> torch.Tensor:
    return p.reshape(1, channels).to(dtype)


def _spatial_statistic(x: torch.Tensor, mode: str, after_relu: bool, sd: torch.dtype,
                       ) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """The per-(n, c) statistic as an (N, C) tensor of dtype ``sd``, in one read of x.

    Returns ``(stat, scratch, is_norm)``. For l2, ``stat`` is either sqrt(sum x^2)
    (``is_norm``) or sum x^2; for l1 it is sum z. ``scratch`` is an uninitialised-
    looking buffer shaped and laid out like x that the caller may reuse for the
    output (it was written here as a temporary), or None.
    """
    n, c = x.shape[0], x.shape[1]
    spatial = tuple(range(2, x.dim()))
    contiguous = x.is_contiguous()
    if mode == "l2":
        if contiguous or x.dtype not in (torch.float32, torch.float64):
            # vector_norm over the contiguous flattened map is a single streaming read
            # (and accumulates in `sd` for low-precision inputs: no fp16 overflow).
            xv = x.reshape(n, c, -1) if contiguous else x
            dims = -1 if contiguous else spatial
            return torch.linalg.vector_norm(xv, dim=dims, dtype=sd).reshape(n, c), None, True
        # Other layouts (channels_last): the norm kernel is slow over strided dims, but a
        # square into the output buffer followed by a sum reduces well in any layout.
        scratch = torch.empty_like(x)
        torch.mul(x, x, out=scratch)
        return scratch.sum(spatial, dtype=sd), scratch, False
    if after_relu:
        return x.sum(spatial, dtype=sd), None, False
    # |x| into the output buffer, then a sum: about twice as fast as vector_norm(ord=1).
    scratch = torch.empty_like(x)
    torch.abs(x, out=scratch)
    return scratch.sum(spatial, dtype=sd), scratch, False


def _gate_forward(x, alpha, gamma, beta, mode, eps, after_relu):
    """Per-channel gate (N, C) and the statistics the backward needs.

    Returns ``(gate, scratch, saved)`` with ``saved = (stat, s, d, th)``, all (N, C)
    or (N, 1) in the statistics dtype.
    """
    sd = _stat_dtype(x, alpha)
    c = x.shape[1]
    a = _per_channel(alpha, c, sd)
    g = _per_channel(gamma, c, sd)
    b = _per_channel(beta, c, sd)
    stat, scratch, is_norm = _spatial_statistic(x, mode, after_relu, sd)
    if mode == "l2":
        if is_norm:
            stat = stat.square_()
        r = stat.add_(eps).sqrt_()  # sqrt(sum x^2 + eps)
        s = r * a
        d = s.square().mean(dim=1, keepdim=True).add_(eps).sqrt_()
    else:
        r = stat  # sum z
        s = r * a
        d = s.abs().mean(dim=1, keepdim=True).add_(eps)
    norm = g / d
    th = torch.addcmul(b, s, norm).tanh_()  # tanh(s * gamma / d + beta)
    gate = th + 1.0
    return gate, scratch, (r, s, d, th)


def _apply_gate(x: torch.Tensor, gate: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
    gate = gate.to(x.dtype).reshape(gate.shape + (1,) * (x.dim() - 2))
    if scratch is not None:
        return torch.mul(x, gate, out=scratch)
    return torch.mul(x, gate)


def _no_autocast(device_type: str):
    # Entering the context costs a few microseconds; only pay when autocast is on.
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return _NULL_CONTEXT


class _NullContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NULL_CONTEXT = _NullContext()


class _GCTFunction(torch.autograd.Function):
    """GCT with an analytic backward; saves only x and (N, C) statistics."""

    @staticmethod
    def forward(ctx, x, alpha, gamma, beta, mode, eps, after_relu):
        with _no_autocast(x.device.type):
            gate, scratch, (r, s, d, th) = _gate_forward(x, alpha, gamma, beta, mode, eps,
                                                         after_relu)
            y = _apply_gate(x, gate, scratch)
        ctx.save_for_backward(x, alpha, gamma, r, s, d, th, gate)
        ctx.mode, ctx.after_relu = mode, after_relu
        ctx.param_dtypes = (alpha.dtype, gamma.dtype, beta.dtype)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, alpha, gamma, r, s, d, th, gate = ctx.saved_tensors
        need_x, need_a, need_g, need_b = ctx.needs_input_grad[:4]
        with _no_autocast(x.device.type):
            n, c = x.shape[0], x.shape[1]
            sd = s.dtype
            spatial = tuple(range(2, x.dim()))
            ones = (1,) * (x.dim() - 2)
            # Pass 1: P = sum_S dy * x, using the dx buffer as scratch.
            buf = torch.empty_like(x)
            torch.mul(dy, x, out=buf)
            p = buf.sum(spatial, dtype=sd)
            dt = p.mul_(th.square().neg_().add_(1.0))  # dL/dt
            a = _per_channel(alpha, c, sd)
            g = _per_channel(gamma, c, sd)
            pshape = alpha.shape
            a_dtype, g_dtype, b_dtype = ctx.param_dtypes
            grad_a = grad_g = grad_b = dx = None
            if need_b:
                grad_b = dt.sum(0).reshape(pshape).to(b_dtype)
            if need_g:
                grad_g = (dt * s / d).sum(0).reshape(pshape).to(g_dtype)
            if need_x or need_a:
                dtg = dt * g
                ds = dtg / d
                dd = (dtg * s).sum(dim=1, keepdim=True).div_(d.square()).neg_()  # dL/dd
                if ctx.mode == "l2":
                    ds.addcmul_(dd / (d * c), s)
                else:
                    ds.addcmul_(dd / c, s.sign())
                if need_a:
                    grad_a = (ds * r).sum(0).reshape(pshape).to(a_dtype)
                if need_x:
                    g_x = gate.to(x.dtype).reshape(n, c, *ones)
                    if ctx.mode == "l2":
                        k = (ds * a / r).reshape(n, c, *ones)
                        torch.mul(dy, g_x, out=buf)
                        dx = buf.addcmul_(x, k)
                    else:
                        dq = (ds * a).reshape(n, c, *ones)
                        if ctx.after_relu:
                            torch.mul(dy, g_x, out=buf)
                            dx = buf.add_(dq)
                        else:
                            torch.sign(x, out=buf)
                            dx = buf.mul_(dq).addcmul_(dy, g_x)
        return dx, grad_a, grad_g, grad_b, None, None, None


def gct(
    x: torch.Tensor,
    alpha: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    *,
    mode: str = "l2",
    eps: float = 1e-5,
    after_relu: bool = False,
    spatial_dims: int | None = None,
) -> torch.Tensor:
    """GCT, fast: the same function as ``gct_reference``, computed in fewer passes.

    Statistics in float32 (float64 for float64 inputs), output in x's dtype and memory
    format. Traced, compiled or exported, it falls back to ``gct_reference``.
    """
    if is_tracing(x):
        return gct_reference(x, alpha, gamma, beta, mode=mode, eps=eps,
                             after_relu=after_relu, spatial_dims=spatial_dims)
    _check_mode(mode)
    if spatial_dims is not None and x.dim() != spatial_dims + 2:
        raise ValueError(f"GCT expects a {spatial_dims + 2}-D input (N, C, *spatial), "
                         f"got shape {tuple(x.shape)}")
    if x.dim() < 3:
        raise ValueError(f"GCT expects an (N, C, *spatial) input, got shape {tuple(x.shape)}")
    if torch.is_grad_enabled() and (x.requires_grad or alpha.requires_grad
                                    or gamma.requires_grad or beta.requires_grad):
        return _GCTFunction.apply(x, alpha, gamma, beta, mode, float(eps), bool(after_relu))
    # No autograd: per-channel gate, one multiply.
    with _no_autocast(x.device.type):
        gate, scratch, _ = _gate_forward(x, alpha, gamma, beta, mode, eps, after_relu)
        return _apply_gate(x, gate, scratch)


def gate_values(x: torch.Tensor, alpha, gamma, beta, *, mode: str = "l2", eps: float = 1e-5,
                after_relu: bool = False) -> torch.Tensor:
    """The per-sample, per-channel gate, shape (N, C), in the statistics dtype (no grad)."""
    with torch.no_grad(), _no_autocast(x.device.type):
        return _gate_forward(x, alpha, gamma, beta, _check_mode(mode), eps, after_relu)[0]


# --------------------------------------------------------------------------- module

class GCT(nn.Module):
    """Gated Channel Transformation (Yang et al., CVPR 2020) for N-d conv inputs.

    Three parameters per channel, shaped (1, C, 1, ..., 1) with one trailing 1 per
    spatial dim, as in the official code, so official checkpoints load as they are.

    ``impl`` picks the eager implementation: ``'fast'`` (default, ``gct``) or
    ``'reference'`` (``gct_reference``). It is a runtime choice, not part of the
    state dict; traced or exported graphs always get the reference ops.
    """

    def __init__(
        self,
        channels: int,
        *,
        mode: str = "l2",
        eps: float = 1e-5,
        after_relu: bool = False,
        spatial_dims: int = 2,
        device=None,
        dtype=None,
        impl: str = "fast",
    ) -> None:
        super().__init__()
        self.channels = int(channels)
        self.mode = _check_mode(mode)
        self.eps = float(eps)
        self.after_relu = bool(after_relu)
        self.spatial_dims = int(spatial_dims)
        self.impl = _check_impl(impl)
        shape = (1, self.channels) + (1,) * self.spatial_dims
        kw = dict(device=device, dtype=dtype)
        self.alpha = nn.Parameter(torch.ones(shape, **kw))
        self.gamma = nn.Parameter(torch.zeros(shape, **kw))
        self.beta = nn.Parameter(torch.zeros(shape, **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = gct if self.impl == "fast" else gct_reference
        return fn(
            x, self.alpha, self.gamma, self.beta,
            mode=self.mode, eps=self.eps, after_relu=self.after_relu,
            spatial_dims=self.spatial_dims,
        )

    def gate_values(self, x: torch.Tensor) -> torch.Tensor:
        """The gate for input ``x``, shape (N, C), without applying it (no grad)."""
        return gate_values(x, self.alpha, self.gamma, self.beta, mode=self.mode,
                           eps=self.eps, after_relu=self.after_relu)

    def extra_repr(self) -> str:
        extra = ", after_relu=True" if self.after_relu else ""
        if self.impl != "fast":
            extra += f", impl={self.impl!r}"
        return f"{self.channels}, mode={self.mode!r}, eps={self.eps}{extra}"


def set_gate_impl(model: nn.Module, impl: str) -> int:
    """Set ``impl`` ('fast' or 'reference') on every GCT in ``model``; returns how many."""
    _check_impl(impl)
    count = 0
    for m in model.modules():
        if isinstance(m, GCT):
            m.impl = impl
            count += 1
    return count


# --------------------------------------------------------------------------- gate folding

def gated_conv_operands(gate: GCT, conv: nn.Module, x: torch.Tensor,
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Operands ``(input, weight)`` with ``conv._conv_forward(input, weight, bias)``
    equal to ``conv`` applied to ``gate(x)``.

    Usually ``(gate(x), None)``: apply the gate to the activation, keep the weight
    (``None`` means "the conv's own weight"). At inference, for a batch of one, when
    the conv's weight is smaller than the activation, it returns ``(x, w * g)``
    instead: the gate is a per-input-channel scale, so it folds into the weight along
    the input-channel axis (per group for grouped convs; any padding mode commutes
    with a per-channel scale). That trades a pass over the activation for a pass
    over the smaller weight. Numerically equal up to rounding (not bit for bit, except
    at init where the gate is exactly 1).
    """
    weight = getattr(conv, "weight", None)
    if (
        gate.impl != "fast"
        or x.shape[0] != 1
        or weight is None
        or getattr(conv, "transposed", True)
        or is_tracing(x)
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                         or any(p.requires_grad for p in gate.parameters())))
        or weight.numel() >= x[0].numel()
    ):
        return gate(x), None
    groups = conv.groups
    out_ch, in_per_group = weight.shape[0], weight.shape[1]
    g = gate.gate_values(x).to(weight.dtype)  # (1, C)
    g = g.reshape(groups, 1, in_per_group, *(1,) * (weight.dim() - 2))
    w = weight.reshape(groups, out_ch // groups, *weight.shape[1:]) * g
    return x, w.reshape(weight.shape)


@dataclass(frozen=True)
class GateConfig:
    """How every injected gate is built; recorded in checkpoints so loading rebuilds it."""

    mode: str = "l2"
    eps: float = 1e-5
    after_relu: bool = False

    def __post_init__(self) -> None:
        _check_mode(self.mode)

    def build(self, channels: int, spatial_dims: int = 2, device=None, dtype=None) -> GCT:
        return GCT(channels, mode=self.mode, eps=self.eps, after_relu=self.after_relu,
                   spatial_dims=spatial_dims, device=device, dtype=dtype)
