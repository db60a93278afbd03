"""``gct-surgery verdict OUT``: the verdict over the seeds of a comparison that have finished,
wherever they ran (``finetune --baseline --seed-index K`` jobs), and the seeds missing."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._output import info, plural, print_json, print_table, short_number, trust_source_option, warn


def verdict(
    out: Path = typer.Argument(..., show_default=False, metavar="OUT",
                               help="A comparison folder: OUT of finetune --baseline (seed-*/)."),
    resolution: Optional[float] = typer.Option(
        None, show_default="as run",
        help="The smallest difference that matters (the equivalence bound). Default: what the "
             "comparison was asked, else the metric's."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
    trust_source: bool = trust_source_option(),
) -> None:
    """Did the gates help? The verdict over the finished seeds of OUT, and the seeds missing.
    Reads only: seeds still running are listed as missing."""
    from ..train.compare import comparison_verdict

    # --trust-source: a task's reduce is code the seeds' plans name
    result = comparison_verdict(out, resolution=resolution)
    if json_out:
        print_json(result.to_dict())
    else:
        print_comparison(result)


def print_comparison(comparison) -> None:
    """Per seed and arm, the final and best primary metric; what each stage trained, in
    words; then the verdict, its conclusion and numbers, and the seeds missing."""
    key = comparison.metric
    rows = [[runs.seed, arm, (r.last or {}).get(key), (r.best or {}).get(key),
             short_number((r.stages or [{}])[-1].get("max_abs_gamma", float("nan"))), r.seconds]
            for runs in comparison.runs for arm, r in runs.arms.items()]
    held = "gamma held at 0" if comparison.control == "static" else "gates removed"
    print_table(f"GCT against its control ({held}; {key}, final epoch)",
                ["seed", "run", f"final {key}", f"best {key}", "final max |gamma|", "seconds"],
                rows)
    first = comparison.runs[0]
    info(f"what trained, per stage (seed {first.seed}; every seed alike):")
    for arm, r in first.arms.items():
        for i, s in enumerate(r.stages):
            gamma = s.get("max_abs_gamma")
            info(f"  {arm if i == 0 else '':8} {s['name']}: {s.get('trained', s['kind'])}; "
                 f"{plural(s.get('steps', 0), 'step')}, {s['trainable_params']:,} parameters"
                 + ("" if gamma is None else f", max |gamma| {short_number(gamma)} at its end"))
    info("did the gates help?", style="bold")
    for v in (comparison.verdict, comparison.plain_verdict):
        if v is not None:
            info(v.text)
            info(_numbers(v), style="bold")
    if comparison.stopped:
        info(f"--seeds auto stopped: {comparison.stopped}")
    if comparison.missing:
        warn(f"missing seeds (not finished): {', '.join(map(str, comparison.missing))}; "
             f"the verdict is over the {plural(len(comparison.runs), 'seed')} that finished")
    info(f"runs in {comparison.out}/seed-*/"
         + ("; comparison.json and metrics.png beside them" if comparison.files else ""))


def _numbers(v) -> str:
    """The conclusion and the numbers behind it, on one line."""
    ci = (f"{100 * (1 - v.alpha_look):.4g}% interval {v.ci95[0]:+.3g} to {v.ci95[1]:+.3g}"
          if v.ci95 else "no interval")  # 95% at one look; wider at an early look
    parts = [f"conclusion: {v.conclusion}", f"difference {v.difference:+.3g} {v.metric}", ci,
             f"MDE {short_number(v.mde)}" if v.mde is not None else "MDE unknown (one seed)",
             f"resolution ±{v.resolution:g}" if v.resolution is not None else "no resolution",
             plural(v.seeds, "seed")]
    if v.seeds_for_resolution and v.seeds_for_resolution > v.seeds:
        parts.append(f"about {v.seeds_for_resolution} seeds would bring the MDE to the resolution")
    if v.more_images_needed:
        parts.append("more validation images are needed, not more seeds")
    return "; ".join(parts)
