"""``gct-surgery inspect``: the paper's analysis of a checkpoint's gates."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._output import info, json_text, print_json, print_table, short_number, trust_source_option


def inspect(
    checkpoint: Path = typer.Argument(..., help="A gct-surgery checkpoint (.safetensors).",
                                      show_default=False),
    data: Optional[Path] = typer.Option(
        None, "--data", help="A folder of images: also measure the gate values they produce."),
    max_images: int = typer.Option(32, "--max-images", min=1,
                                   help="How many images to read from --data."),
    img_size: Optional[int] = typer.Option(
        None, "--img-size", min=8,
        help="Read --data at this square size instead of the recorded one."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the plots to this PNG."),
    json_out: bool = typer.Option(False, "--json", help="Print the rows as JSON."),
    out_json: Optional[Path] = typer.Option(None, "--out-json",
                                            help="Also write the JSON rows to this file."),
    trust_source: bool = trust_source_option(),
) -> None:
    """Per-layer gate statistics (alpha, gamma, beta; competition vs cooperation) and,
    with --data, the gate values real images produce. See docs/inspect.md."""
    from ..analysis import inspect_checkpoint
    from ..analysis import plot as write_plot
    from ..io.atomic import atomic_write_text

    analysis = inspect_checkpoint(checkpoint, data=data, limit=max_images, img_size=img_size)
    doc = analysis.to_dict()
    if out_json is not None:
        atomic_write_text(out_json, json_text(doc) + "\n")
    if plot is not None:
        write_plot(analysis, plot)
    if json_out:
        print_json(doc)
        return
    if not analysis.rows:
        info("this checkpoint has no gates")
        return
    columns = {"depth": "depth", "module": "module", "C": "channels", "γ mean": "gamma_mean",
               "γ std": "gamma_std", "γ min": "gamma_min", "γ max": "gamma_max",
               "β mean": "beta_mean", "α mean": "alpha_mean", "comp. γ>0": "competition",
               "coop. γ<0": "cooperation"}
    if analysis.images:
        columns.update({"gate p05": "gate_p05", "gate median": "gate_p50", "gate p95": "gate_p95"})
    shares = ("competition", "cooperation")  # as percentages, other numbers short
    rows = [[f"{100 * r[key]:.0f}%" if key in shares else
             short_number(r[key]) if isinstance(r.get(key), float) else r.get(key, "-")
             for key in columns.values()] for r in analysis.rows]
    print_table(f"gates of {checkpoint}", list(columns), rows, wrap=["module"])
    v = analysis.verdict
    info(v["text"])
    info("would fold into their convs (export --fold): " + ", ".join(
        f"{n} at max |gamma| <= {tol}" for tol, n in v["foldable"].items()))
    info(v["reading"])
    for path in (out_json, plot):
        if path is not None:
            info(f"wrote {path}")

