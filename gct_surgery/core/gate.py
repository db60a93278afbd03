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

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..errors import ConfigError

MODES = ("l2", "l1")
IMPLS = ("fast", "reference")
# Surgery puts a gate under its conv as the child ``gate``: ``<conv>.gate.{alpha,gamma,beta}``.
GATE_ATTR = "gate"


def is_gate_parameter(name: str) -> bool:
    """True for a state-dict key or parameter name that belongs to a gate. The one rule:
    ``core.surgery`` re-exports it and every other module asks it."""
    return f".{GATE_ATTR}." in f".{name}"


def _check(value: str, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise ConfigError(f"unknown GCT {what} {value!r}; choose one of {', '.join(choices)}")
    return value


def gct_reference(x: torch.Tensor, alpha: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, *,
                  mode: str = "l2", eps: float = 1e-5, after_relu: bool = False,
                  spatial_dims: int | None = None) -> torch.Tensor:
    """GCT as the official code writes it: a chain of small tensor ops.

    Kept as the readable definition and as the baseline that benchmarks and tests
    compare the fast path against.
    """
    _check(mode, MODES, "mode")
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
        or torch.fx._symbolic_trace.is_fx_symbolic_tracing()
    )


def _as_stat(p: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A per-channel parameter as a (1, C, 1, ..., 1) tensor of ``dtype``, x's rank."""
    if p.dim() != x.dim():
        p = p.reshape((1, x.shape[1]) + (1,) * (x.dim() - 2))
    return p if p.dtype == dtype else p.to(dtype)


def _spatial_statistic(x: torch.Tensor, mode: str, after_relu: bool, sd: torch.dtype,
                       ) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """The per-(n, c) statistic, shaped (N, C, 1, ..., 1) in dtype ``sd``, in one read of x.

    Returns ``(stat, scratch, is_norm)``. For l2, ``stat`` is either sqrt(sum x^2)
    (``is_norm``) or sum x^2; for l1 it is sum z. ``scratch`` is a buffer shaped and
    laid out like x, written here as a temporary, that the caller reuses for the
    output (so the temporary costs no extra allocation), or None.
    """
    spatial = tuple(range(2, x.dim()))
    if mode == "l2":
        if x.is_contiguous():
            # One streaming read; vector_norm accumulates in `sd` (no fp16 overflow).
            # Flattening the map first is ~30% faster than reducing over (H, W).
            flat = x.view((x.shape[0], x.shape[1], -1) + (1,) * (len(spatial) - 1))
            return torch.linalg.vector_norm(flat, dim=2, keepdim=True, dtype=sd), None, True
        if x.dtype not in (torch.float32, torch.float64):
            return torch.linalg.vector_norm(x, dim=spatial, keepdim=True, dtype=sd), None, True
        # Other layouts (channels_last): the norm kernel is slow over strided dims, but a
        # square into the output buffer followed by a sum reduces well in any layout.
        scratch = torch.empty_like(x)
        torch.mul(x, x, out=scratch)
        return scratch.sum(spatial, keepdim=True, dtype=sd), scratch, False
    if after_relu:
        return x.sum(spatial, keepdim=True, dtype=sd), None, False
    # |x| into the output buffer, then a sum: faster than vector_norm(ord=1) on CPU.
    scratch = torch.empty_like(x)
    torch.abs(x, out=scratch)
    return scratch.sum(spatial, keepdim=True, dtype=sd), scratch, False


def _gate_forward(x, alpha, gamma, beta, mode, eps, after_relu):
    """Per-sample, per-channel gate (N, C, 1, ..., 1) and what the backward needs.

    Returns ``(gate, scratch, saved)`` with ``saved = (r, s, d, th)``: r the spatial
    statistic (sqrt(sum x^2 + eps) for l2, sum z for l1), s = alpha * r, d the channel
    normaliser (N, 1, ...), th = tanh(t); all in the statistics dtype.
    """
    # the statistics dtype: float32 for fp16/bf16/float32, float64 when anything is float64
    sd = torch.promote_types(torch.promote_types(x.dtype, alpha.dtype), torch.float32)
    stat, scratch, is_norm = _spatial_statistic(x, mode, after_relu, sd)
    a = _as_stat(alpha, x, sd)
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
    norm = _as_stat(gamma, x, sd) / d
    th = torch.addcmul(_as_stat(beta, x, sd), s, norm).tanh_()  # tanh(s * gamma / d + beta)
    gate = th + 1.0
    return gate, scratch, (r, s, d, th)


def _apply_gate(x: torch.Tensor, gate: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
    # ``out=None`` allocates: the same call with or without a scratch buffer to reuse
    return torch.mul(x, gate.to(x.dtype), out=scratch)


def _no_autocast(device_type: str):
    # Entering the context costs a few microseconds; only pay when autocast is on.
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _grad_like(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    # g is (1, C, 1, ..., 1) in the statistics dtype; give it p's shape and dtype.
    return g.reshape(p.shape).to(p.dtype)


class _GCTFunction(torch.autograd.Function):
    """GCT with an analytic backward; saves only x and (N, C) statistics."""

    @staticmethod
    def forward(ctx, x, alpha, gamma, beta, mode, eps, after_relu):
        with _no_autocast(x.device.type):
            gate, scratch, (r, s, d, th) = _gate_forward(x, alpha, gamma, beta, mode, eps,
                                                         after_relu)
            y = _apply_gate(x, gate, scratch)
        ctx.save_for_backward(x, alpha, gamma, beta, r, s, d, th)
        ctx.mode, ctx.after_relu = mode, after_relu
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, alpha, gamma, beta, r, s, d, th = ctx.saved_tensors
        need_x, need_a, need_g, need_b = ctx.needs_input_grad[:4]
        grad_a = grad_g = grad_b = dx = None
        with _no_autocast(x.device.type):
            sd = s.dtype
            spatial = tuple(range(2, x.dim()))
            # Pass 1: P = sum_S dy * x (= dL/dgate), using the dx buffer as scratch.
            buf = torch.empty_like(x)
            torch.mul(dy, x, out=buf)
            dt = buf.sum(spatial, keepdim=True, dtype=sd)
            dt.mul_(th.square().neg_().add_(1.0))  # dL/dt = P * (1 - tanh^2)
            if need_b:
                grad_b = _grad_like(dt.sum(0, keepdim=True), beta)
            if need_g:
                grad_g = _grad_like((dt * s / d).sum(0, keepdim=True), gamma)
            if need_x or need_a:
                dtg = dt * _as_stat(gamma, x, sd)
                ds = dtg / d
                # dL/dd = -sum_C dt * gamma * s / d^2, then back through d(s):
                dd = (dtg * s).sum(dim=1, keepdim=True).div_(d.square()).neg_()
                channels = x.shape[1]
                if ctx.mode == "l2":
                    ds.addcmul_(dd / (d * channels), s)
                else:
                    ds.addcmul_(dd / channels, s.sign())
                if need_a:
                    grad_a = _grad_like((ds * r).sum(0, keepdim=True), alpha)
                if need_x:
                    # Pass 2: dx = dy * gate + x * (dL/dx through the statistic).
                    g_x = (th + 1.0).to(x.dtype)  # the gate, as the forward applied it
                    dr = ds.mul_(_as_stat(alpha, x, sd))  # dL/dr (l2) or dL/dq (l1)
                    if ctx.mode == "l2":
                        dr = dr.div_(r)  # dr/dx = x / r
                    # Full-size ops in x's dtype: mixed-dtype elementwise is slow on CPU.
                    dr = dr.to(x.dtype)
                    if ctx.mode == "l2":
                        torch.mul(dy, g_x, out=buf)
                        dx = buf.addcmul_(x, dr)
                    elif ctx.after_relu:  # dq/dx = 1: one pass, dr broadcast
                        dx = torch.addcmul(dr, dy, g_x, out=buf)
                    else:  # dq/dx = sign(x)
                        torch.sign(x, out=buf)
                        dx = buf.mul_(dr).addcmul_(dy, g_x)
        return dx, grad_a, grad_g, grad_b, None, None, None


def gct(x: torch.Tensor, alpha: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, *,
        mode: str = "l2", eps: float = 1e-5, after_relu: bool = False,
        spatial_dims: int | None = None) -> torch.Tensor:
    """GCT, fast: the same function as ``gct_reference``, computed in fewer passes.

    Statistics in float32 (float64 for float64 inputs), output in x's dtype and memory
    format. Traced, compiled or exported, it falls back to ``gct_reference``.
    """
    if is_tracing(x) or x.numel() == 0:  # an empty batch: a detector's head without boxes
        return gct_reference(x, alpha, gamma, beta, mode=mode, eps=eps,
                             after_relu=after_relu, spatial_dims=spatial_dims)
    _check(mode, MODES, "mode")
    if x.dim() < 3 or (spatial_dims is not None and x.dim() != spatial_dims + 2):
        rank = spatial_dims + 2 if spatial_dims else "at least 3"
        raise ValueError(f"GCT expects an (N, C, *spatial) input, {rank}-D; "
                         f"got shape {tuple(x.shape)}")
    if torch.is_grad_enabled() and (x.requires_grad or alpha.requires_grad
                                    or gamma.requires_grad or beta.requires_grad):
        return _GCTFunction.apply(x, alpha, gamma, beta, mode, float(eps), bool(after_relu))
    # No autograd: per-channel gate, one multiply.
    with _no_autocast(x.device.type):
        gate, scratch, _ = _gate_forward(x, alpha, gamma, beta, mode, eps, after_relu)
        return _apply_gate(x, gate, scratch)


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
        self.mode = _check(mode, MODES, "mode")
        self.eps = float(eps)
        self.after_relu = bool(after_relu)
        self.spatial_dims = int(spatial_dims)
        self.impl = _check(impl, IMPLS, "impl")
        shape = (1, self.channels) + (1,) * self.spatial_dims
        self.alpha = nn.Parameter(torch.ones(shape, device=device, dtype=dtype))
        self.gamma = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))
        self.beta = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = gct if self.impl == "fast" else gct_reference
        return fn(
            x, self.alpha, self.gamma, self.beta,
            mode=self.mode, eps=self.eps, after_relu=self.after_relu,
            spatial_dims=self.spatial_dims,
        )

    @torch.no_grad()
    def gate_values(self, x: torch.Tensor) -> torch.Tensor:
        """The gate for input ``x``, shape (N, C), in the statistics dtype, not applied."""
        with _no_autocast(x.device.type):
            gate = _gate_forward(x, self.alpha, self.gamma, self.beta, self.mode, self.eps,
                                 self.after_relu)[0]
        return gate.reshape(gate.shape[:2])

    def extra_repr(self) -> str:
        return (f"{self.channels}, mode={self.mode!r}, eps={self.eps}"
                + (", after_relu=True" if self.after_relu else "")
                + (f", impl={self.impl!r}" if self.impl != "fast" else ""))


def gate_modules(model: nn.Module) -> list[GCT]:
    """Every GCT in ``model``, found by type (not by the name it is stored under)."""
    return [m for m in model.modules() if isinstance(m, GCT)]


def set_gate_impl(model: nn.Module, impl: str) -> int:
    """Set ``impl`` ('fast' or 'reference') on every GCT in ``model``; returns how many."""
    _check(impl, IMPLS, "impl")
    found = gate_modules(model)
    for m in found:
        m.impl = impl
    return len(found)


@dataclass(frozen=True)
class GateConfig:
    """How every injected gate is built; recorded in checkpoints so loading rebuilds it."""

    mode: str = "l2"
    eps: float = 1e-5
    after_relu: bool = False

    def __post_init__(self) -> None:
        _check(self.mode, MODES, "mode")
