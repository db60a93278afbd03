"""The paper's gate analysis: what the learned gates do, layer by layer.

For each gate (in module order, which is depth order for a feed-forward CNN): statistics
of alpha, gamma and beta, and the share of channels with gamma > 0 (competition) and
gamma < 0 (cooperation). With images, the gate values the model actually produces, read
off each gate's own input and output (y = x * gate), so no copy of the gate formula is
needed. docs/inspect.md says how to read the table and the plot.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .core.fold import ACTIVE, foldable, gate_movement
from .core.model import run_with_hooks
from .core.surgery import gates
from .errors import DataError

PARAMS = ("alpha", "gamma", "beta")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass
class GateAnalysis:
    """``rows``: one JSON row per gate; ``boxes``: per module, the gate values over the
    images (``images`` > 0) or else gamma, for the plot's distributions."""

    rows: list[dict]
    verdict: dict
    images: int = 0
    boxes: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {"gates": len(self.rows), "images": self.images, "verdict": self.verdict,
                "rows": self.rows}


def _stats(t: torch.Tensor, prefix: str, quantiles: bool = False) -> dict[str, float]:
    """mean/std/min/max (and the QUANTILES) of ``t``, keyed ``{prefix}_mean`` and so on."""
    t = t.detach().double().reshape(-1)
    if not t.numel():
        return {}
    d = {"mean": t.mean(), "std": t.std(unbiased=False), "min": t.min(), "max": t.max()}
    if quantiles:
        d.update(zip((f"p{round(q * 100):02d}" for q in QUANTILES),
                     torch.quantile(t, torch.tensor(QUANTILES, dtype=t.dtype))))
    return {f"{prefix}_{k}": v.item() for k, v in d.items()}


def gate_verdict(model: nn.Module) -> dict:
    """Have the gates done anything? Identity, barely moved or active (core.fold),
    how many would fold at common tolerances, and the cooperation/competition reading."""
    m = gate_movement(model)
    largest = f"max |gamma| {m.max_abs_gamma:.3g}, max |beta| {m.max_abs_beta:.3g}"
    text = {"no gates": "this checkpoint has no gates",
            "identity": "gates at identity: gamma = beta = 0 everywhere, the model is the one "
                        "before injection (fine-tune with --stage gates)",
            "barely moved": f"gates barely moved: {largest}, below {ACTIVE} (a gate then scales a "
                            "channel by at most about 10%); the model is practically the one "
                            "before injection",
            "active": f"gates active: {m.active_gates} of {m.gates} have |gamma| or |beta| >= "
                      f"{ACTIVE} ({largest})"}[m.state]
    return {**m.to_dict(), "text": text, "threshold": ACTIVE,
            "foldable": {f"{tol:g}": n for tol, n in foldable(model).items()},
            "reading": _reading([g.gamma.detach().reshape(-1) for g in gates(model).values()])}


def _reading(gammas: list[torch.Tensor]) -> str:
    """Competition (gamma >= ACTIVE) against cooperation (gamma <= -ACTIVE), shallow half
    of the gated layers against the deep half. A gamma of 1e-4 has a sign but no effect:
    counting it would read noise."""
    half, parts = len(gammas) // 2, []
    for where, layer_gammas in (("shallow", gammas[:half]), ("deep", gammas[half:])):
        g = torch.cat(layer_gammas) if layer_gammas else torch.empty(0)
        compete, cooperate = int((g >= ACTIVE).sum()), int((g <= -ACTIVE).sum())
        if compete + cooperate:
            parts.append(f"{where} half: {compete} channels compete, {cooperate} cooperate")
    if not parts:
        return (f"no cooperation/competition reading: no channel has |gamma| >= {ACTIVE}, so the "
                "signs of gamma are noise")
    return f"channels with |gamma| >= {ACTIVE}: " + "; ".join(parts)


@torch.no_grad()
def gate_values(model: nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """The gate value of every (sample, channel) at every gate, for one batch.

    Since y = x * g with g constant over space, g = <x, y> / <x, x> per sample and
    channel; a channel whose input is all zero has no defined gate and is dropped.
    """
    found: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, inputs, output):
            x, y = inputs[0].double(), output.double()
            dims = tuple(range(2, x.dim()))
            xx = (x * x).sum(dims)
            g = ((x * y).sum(dims) / xx)[xx > 0]  # a gate called twice: both calls count
            found[name] = torch.cat([found.get(name, g.new_empty(0)), g])
        return record

    run_with_hooks(model, batch,
                   [g.register_forward_hook(hook(n)) for n, g in gates(model).items()])
    return found


def load_images(folder: str | os.PathLike, data_config: dict, limit: int = 32,
                img_size: int | None = None) -> torch.Tensor:
    """Up to ``limit`` images from ``folder`` (searched recursively), transformed as the
    model expects (timm's eval transform for its recorded data config, with the same
    warning as ``finetune`` and ``eval`` for what was not recorded)."""
    from timm.data.dataset import ImageDataset

    from .train.data import create_transform, resolve_data_config

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"no such data folder: {folder}")
    cfg = resolve_data_config({"input_size": [3, 224, 224], **data_config}, img_size=img_size)
    mode = "L" if cfg["input_size"][0] == 1 else "RGB"
    try:
        dataset = ImageDataset(str(folder), input_img_mode=mode,
                               transform=create_transform(cfg, training=False))
    except Exception as e:  # timm's reader raises on empty/odd folders
        raise DataError(f"cannot read images from {folder}: "
                        f"{str(e).splitlines()[0][:200]}") from None
    images = []
    for i in range(min(limit, len(dataset))):
        try:
            images.append(dataset[i][0])
        except Exception as e:  # PIL raises many types on a bad file
            raise DataError(f"cannot read image {dataset.filename(i)} in {folder}: "
                            f"{type(e).__name__}") from None
    return torch.stack(images)


def analyse(model: nn.Module, images: torch.Tensor | None = None) -> GateAnalysis:
    """Gate statistics, and gate values over ``images`` when given."""
    found = gates(model)
    values = gate_values(model, images) if images is not None else {}
    rows = []
    for depth, (name, gate) in enumerate(found.items()):
        gamma = gate.gamma.detach().reshape(-1)
        row = {"depth": depth, "module": name, "channels": gamma.numel(),
               **{k: v for p in PARAMS for k, v in _stats(getattr(gate, p), p).items()},
               "competition": (gamma > 0).double().mean().item(),
               "cooperation": (gamma < 0).double().mean().item()}
        if images is not None:
            row.update(_stats(values.get(name, torch.empty(0)), "gate", quantiles=True))
        rows.append(row)
    boxes = values if images is not None else {n: g.gamma.detach().reshape(-1).clone()
                                                for n, g in found.items()}
    return GateAnalysis(rows, gate_verdict(model), 0 if images is None else len(images), boxes)


def inspect_checkpoint(checkpoint: str | os.PathLike, *, data: str | os.PathLike | None = None,
                       limit: int = 32, img_size: int | None = None) -> GateAnalysis:
    """Load a checkpoint and analyse its gates (over images from ``data`` if given, at
    ``img_size`` instead of the recorded size if given)."""
    from .io.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    images = load_images(data, loaded.meta.data, limit, img_size) if data is not None else None
    return analyse(loaded.model, images)


def plot(analysis: GateAnalysis, path: str | os.PathLike) -> None:
    """One PNG: parameters against depth, the competition/cooperation shares, and per
    layer the distribution of gate values over the images (without images: of gamma)."""
    from matplotlib.figure import Figure  # no pyplot: no display, no global figure

    from .io.atomic import atomic_path

    rows = analysis.rows
    depth = [r["depth"] for r in rows]
    fig = Figure(figsize=(max(8, 0.25 * len(rows) + 4), 11), layout="tight")
    top, share, bottom = fig.subplots(3, 1)
    for p, colour in zip(PARAMS, ("tab:green", "tab:blue", "tab:orange")):
        mean, std = (torch.tensor([r[f"{p}_{k}"] for r in rows]) for k in ("mean", "std"))
        top.plot(depth, mean, marker=".", color=colour, label=f"{p} mean")
        top.fill_between(depth, mean - std, mean + std, color=colour, alpha=0.15)
    top.set(ylabel="parameter (mean ± std)", title="GCT gate parameters against depth")
    share.bar(depth, [r["competition"] for r in rows], color="tab:red",
              label="gamma > 0 (competition)")
    share.bar(depth, [-r["cooperation"] for r in rows], color="tab:blue",
              label="gamma < 0 (cooperation)")
    share.set(ylim=(-1.05, 1.05), ylabel="share of channels")
    for ax in (top, share):
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend(loc="best", fontsize="small")
    bottom.axhline(1 if analysis.images else 0, color="grey", lw=0.5)
    bottom.boxplot([analysis.boxes.get(r["module"], torch.zeros(1)).float().numpy() for r in rows],
                   positions=depth, widths=0.6, showfliers=False, manage_ticks=False)
    bottom.set(ylabel="gate value" if analysis.images else "gamma",
               title=f"gate values over {analysis.images} images, per layer" if analysis.images
               else "gamma per layer (pass --data for gate values)")
    fig.supxlabel("gate depth index")  # matplotlib's own ticks: readable at any depth
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
