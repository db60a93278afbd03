"""The paper's gate analysis: what the learned gates do, layer by layer.

For each gate (in module order, which is depth order for a feed-forward CNN):
statistics of alpha, gamma and beta, and the share of channels with gamma > 0
(competition: a channel whose embedding is above average gets a larger gate) and
gamma < 0 (cooperation: it gets a smaller one, evening the channels out). With
images, the gate values the model actually produces, per layer.

Gate values are read off the gate's own input and output (y = x * gate, with one
gate value per sample and channel), so the analysis needs no copy of the gate formula.
See docs/inspect.md for how to read the table and the plot.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .core.forward import run_with_hooks
from .core.movement import ACTIVE, foldable, gate_movement
from .core.surgery import gates
from .errors import DataError

PARAMS = ("alpha", "gamma", "beta")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass
class GateRow:
    """One gated layer."""

    depth: int
    module: str
    channels: int
    stats: dict[str, dict[str, float]]  # param -> mean/std/min/max
    competition: float  # share of channels with gamma > 0
    cooperation: float  # share of channels with gamma < 0
    values: dict[str, float] | None = None  # gate values over images: mean/std/min/quantiles/max

    def to_dict(self) -> dict:
        d = {"depth": self.depth, "module": self.module, "channels": self.channels}
        for p in PARAMS:
            for k, v in self.stats[p].items():
                d[f"{p}_{k}"] = v
        d["competition"] = self.competition
        d["cooperation"] = self.cooperation
        if self.values is not None:
            d.update({f"gate_{k}": v for k, v in self.values.items()})
        return d


@dataclass
class GateAnalysis:
    rows: list[GateRow]
    images: int = 0
    samples: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # module -> gate values
    gammas: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # module -> gamma
    verdict: dict = field(default_factory=dict)  # see gate_verdict

    def to_dict(self) -> dict:
        return {"gates": len(self.rows), "images": self.images, "verdict": self.verdict,
                "rows": [r.to_dict() for r in self.rows]}


def gate_verdict(model: nn.Module, gammas: dict[str, torch.Tensor]) -> dict:
    """Have the gates done anything? Identity, barely moved or active (core.movement),
    how many would fold into their convs at common tolerances, and the paper's
    cooperation/competition reading, made only from channels with |gamma| >= ACTIVE:
    a gamma of 1e-4 has a sign but no effect, so counting it would read noise."""
    movement = gate_movement(model)
    folds = foldable(model)
    text = {"no gates": "this checkpoint has no gates",
            "identity": "gates at identity: gamma = beta = 0 everywhere, the model is the one "
                        "before injection (fine-tune with --stage gates)",
            "barely moved": f"gates barely moved: max |gamma| {movement.max_abs_gamma:.3g}, max "
                            f"|beta| {movement.max_abs_beta:.3g}, below {ACTIVE} (a gate then scales "
                            "a channel by at most about 10%); the model is practically the one before "
                            "injection",
            "active": f"gates active: {movement.active_gates} of {movement.gates} have |gamma| or "
                      f"|beta| >= {ACTIVE} (max |gamma| {movement.max_abs_gamma:.3g}, max |beta| "
                      f"{movement.max_abs_beta:.3g})"}[movement.state]
    return {**movement.to_dict(), "text": text, "threshold": ACTIVE,
            "foldable": {f"{tol:g}": n for tol, n in folds.items()},
            "reading": _reading(list(gammas.values()))}


def _reading(gammas: list[torch.Tensor]) -> str:
    """Competition (gamma >= ACTIVE) against cooperation (gamma <= -ACTIVE), shallow half
    of the gated layers against the deep half."""
    half = len(gammas) // 2
    parts = []
    for where, layer_gammas in (("shallow", gammas[:half]), ("deep", gammas[half:])):
        g = torch.cat(layer_gammas) if layer_gammas else torch.empty(0)
        compete, cooperate = int((g >= ACTIVE).sum()), int((g <= -ACTIVE).sum())
        if compete + cooperate:
            parts.append(f"{where} half: {compete} channels compete, {cooperate} cooperate")
    if not parts:
        return (f"no cooperation/competition reading: no channel has |gamma| >= {ACTIVE}, so the "
                "signs of gamma are noise")
    return f"channels with |gamma| >= {ACTIVE}: " + "; ".join(parts)


def _describe(t: torch.Tensor) -> dict[str, float]:
    t = t.detach().double().reshape(-1)
    return {"mean": t.mean().item(), "std": t.std(unbiased=False).item(),
            "min": t.min().item(), "max": t.max().item()}


def gate_rows(model: nn.Module) -> list[GateRow]:
    """Parameter statistics for every gate, in depth order."""
    rows = []
    for depth, (name, gate) in enumerate(gates(model).items()):
        gamma = gate.gamma.detach().reshape(-1)
        rows.append(GateRow(
            depth=depth, module=name, channels=gamma.numel(),
            stats={p: _describe(getattr(gate, p)) for p in PARAMS},
            competition=(gamma > 0).double().mean().item(),
            cooperation=(gamma < 0).double().mean().item(),
        ))
    return rows


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
            g = (x * y).sum(dims) / xx
            found[name] = torch.cat([found.get(name, torch.empty(0, dtype=torch.float64)), g[xx > 0]])
        return record

    run_with_hooks(model, batch, [g.register_forward_hook(hook(n)) for n, g in gates(model).items()])
    return found


def _summary(values: torch.Tensor) -> dict[str, float]:
    if not values.numel():
        return {}
    d = _describe(values)
    qs = torch.quantile(values.float(), torch.tensor(QUANTILES))
    d.update({f"p{int(q * 100):02d}": v.item() for q, v in zip(QUANTILES, qs)})
    return d


def load_images(folder: str | os.PathLike, data_config: dict, limit: int = 32) -> torch.Tensor:
    """Up to ``limit`` images from ``folder`` (searched recursively), transformed as the
    model expects (timm's eval transform for its recorded data config, with the same
    warning as ``finetune`` and ``eval`` for what was not recorded)."""
    from timm.data.dataset import ImageDataset

    from .train.loaders import create_transform, resolve_data_config

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"no such data folder: {folder}")
    cfg = resolve_data_config({"input_size": [3, 224, 224], **data_config})
    input_size = tuple(cfg["input_size"])
    transform = create_transform(cfg, training=False)
    try:
        dataset = ImageDataset(str(folder), input_img_mode="L" if input_size[0] == 1 else "RGB",
                               transform=transform)
    except Exception as e:  # timm's reader raises on empty/odd folders
        raise DataError(f"cannot read images from {folder}: {str(e).splitlines()[0][:200]}") from None
    if len(dataset) == 0:
        raise DataError(f"no images found in {folder}")
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
    rows = gate_rows(model)
    analysis = GateAnalysis(rows, gammas={n: g.gamma.detach().reshape(-1).clone()
                                          for n, g in gates(model).items()})
    analysis.verdict = gate_verdict(model, analysis.gammas)
    if images is not None:
        analysis.samples = gate_values(model, images)
        analysis.images = int(images.shape[0])
        for row in rows:
            row.values = _summary(analysis.samples.get(row.module, torch.empty(0)))
    return analysis


def inspect_checkpoint(checkpoint: str | os.PathLike, *, data: str | os.PathLike | None = None,
                       limit: int = 32) -> GateAnalysis:
    """Load a checkpoint and analyse its gates (over images from ``data`` if given)."""
    from .io.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    images = load_images(data, loaded.meta.data, limit) if data is not None else None
    return analyse(loaded.model, images)


def plot(analysis: GateAnalysis, path: str | os.PathLike) -> Path:
    """One PNG: gate statistics against depth (top), gate distributions per layer (bottom).

    Without images the bottom panel shows the distribution of gamma per layer.
    """
    from .io.figures import new_figure, save_png

    rows = analysis.rows
    depth = [r.depth for r in rows]
    fig, plt = new_figure(3, 1, (max(8, 0.25 * len(rows) + 4), 11))
    top, share, bottom = fig.axes
    for p, colour in zip(PARAMS, ("tab:green", "tab:blue", "tab:orange")):
        mean = [r.stats[p]["mean"] for r in rows]
        std = [r.stats[p]["std"] for r in rows]
        top.plot(depth, mean, marker=".", color=colour, label=f"{p} mean")
        top.fill_between(depth, [m - s for m, s in zip(mean, std)],
                         [m + s for m, s in zip(mean, std)], color=colour, alpha=0.15)
    top.axhline(0, color="grey", lw=0.5)
    top.set_ylabel("parameter (mean ± std)")
    top.set_title("GCT gate parameters against depth")
    top.legend(loc="best", fontsize="small")

    share.bar(depth, [r.competition for r in rows], color="tab:red", label="gamma > 0 (competition)")
    share.bar(depth, [-r.cooperation for r in rows], color="tab:blue", label="gamma < 0 (cooperation)")
    share.axhline(0, color="grey", lw=0.5)
    share.set_ylim(-1.05, 1.05)
    share.set_ylabel("share of channels")
    share.legend(loc="best", fontsize="small")

    if analysis.samples:
        data = [analysis.samples.get(r.module, torch.zeros(1)).float().numpy() for r in rows]
        label, title = "gate value", f"gate values over {analysis.images} images, per layer"
        bottom.axhline(1, color="grey", lw=0.5)
    else:
        data = [analysis.gammas.get(r.module, torch.zeros(1)).float().numpy() for r in rows]
        label, title = "gamma", "gamma per layer (pass --data for gate values)"
        bottom.axhline(0, color="grey", lw=0.5)
    bottom.boxplot(data, positions=depth, widths=0.6, showfliers=False)
    bottom.set_ylabel(label)
    bottom.set_title(title)
    for ax in (top, share, bottom):
        ax.set_xlabel("gate depth index")
    if len(rows) > 30:
        step = max(1, len(rows) // 20)
        bottom.set_xticks(depth[::step], [str(d) for d in depth[::step]])
    return save_png(fig, plt, path)

