"""The GCT gate: functional form and module.

The gate computes y = x * (1 + tanh(gamma * s_hat + beta)), where s is a
per-channel embedding (l2 or l1 norm over the spatial dims, scaled by alpha) and
s_hat = s / channel-norm(s). With gamma = beta = 0 the gate is exactly 1, so
injecting it into a trained network changes nothing, bit for bit.

Statistics are computed in float32 whatever the input dtype: a sum of squares over
a large feature map overflows fp16.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

MODES = ("l2", "l1")


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown GCT mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode


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


class GCT(nn.Module):
    """Gated Channel Transformation (Yang et al., CVPR 2020) for N-d conv inputs.

    Three parameters per channel, shaped (1, C, 1, ..., 1) with one trailing 1 per
    spatial dim, as in the official code, so official checkpoints load as they are.
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
    ) -> None:
        super().__init__()
        self.channels = int(channels)
        self.mode = _check_mode(mode)
        self.eps = float(eps)
        self.after_relu = bool(after_relu)
        self.spatial_dims = int(spatial_dims)
        shape = (1, self.channels) + (1,) * self.spatial_dims
        kw = dict(device=device, dtype=dtype)
        self.alpha = nn.Parameter(torch.ones(shape, **kw))
        self.gamma = nn.Parameter(torch.zeros(shape, **kw))
        self.beta = nn.Parameter(torch.zeros(shape, **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gct_reference(
            x, self.alpha, self.gamma, self.beta,
            mode=self.mode, eps=self.eps, after_relu=self.after_relu,
            spatial_dims=self.spatial_dims,
        )

    def extra_repr(self) -> str:
        extra = ", after_relu=True" if self.after_relu else ""
        return f"{self.channels}, mode={self.mode!r}, eps={self.eps}{extra}"



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
