"""How far the gates have moved from identity, in one number a person can read.

A gate starts at alpha = 1, gamma = beta = 0, where it is exactly the identity. Its
value is 1 + tanh(gamma * normalised_embedding + beta), and the normalised embedding is
about 1 in size, so max(|gamma|, |beta|) bounds how far a gate can scale a channel:
0.1 means by about 10%. Below ``ACTIVE`` the gates are "barely moved": the model is
practically the one before injection, whatever the training loss did.

Used after every training stage (the run reports it) and by ``inspect`` (its verdict).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from .fold import refusal
from .surgery import gated_modules, gates

ACTIVE = 0.1                           # max(|gamma|, |beta|) at or above it: the gates act
FOLD_TOLERANCES = (1e-6, 1e-3, 1e-2)   # max |gamma| a gate may have to fold into its conv


@dataclass(frozen=True)
class GateMovement:
    gates: int
    max_abs_gamma: float
    max_abs_beta: float
    max_abs_alpha_shift: float   # max |alpha - 1|
    active_gates: int            # gates with max(|gamma|, |beta|) >= ACTIVE

    @property
    def state(self) -> str:
        """'no gates', 'identity', 'barely moved' or 'active'."""
        if not self.gates:
            return "no gates"
        if self.max_abs_gamma == 0 and self.max_abs_beta == 0:
            return "identity"
        return "active" if max(self.max_abs_gamma, self.max_abs_beta) >= ACTIVE else "barely moved"

    def to_dict(self) -> dict:
        return {**asdict(self), "state": self.state}


def gate_movement(model: nn.Module) -> GateMovement:
    """The largest departures from identity over every gate of ``model``."""
    gamma = beta = alpha = 0.0
    active = 0
    found = gates(model)
    for gate in found.values():
        g = gate.gamma.detach().abs().max().item()
        b = gate.beta.detach().abs().max().item()
        gamma, beta = max(gamma, g), max(beta, b)
        alpha = max(alpha, (gate.alpha.detach() - 1).abs().max().item())
        active += max(g, b) >= ACTIVE
    return GateMovement(len(found), gamma, beta, alpha, active)


def foldable(model: nn.Module, tolerances: tuple[float, ...] = FOLD_TOLERANCES) -> dict[float, int]:
    """How many gates ``export --fold`` would fold at each tolerance on max |gamma|."""
    convs = list(gated_modules(model).values())
    return {tol: sum(refusal(conv, tol) is None for conv in convs) for tol in tolerances}
