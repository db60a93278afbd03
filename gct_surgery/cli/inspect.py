"""``gct-surgery inspect``: the paper's analysis of a checkpoint's gates."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._app import app
from ._choices import trust_source_option
from ._output import info, json_text, print_json, print_table, short_number


@app.command()
def inspect(
    checkpoint: Path = typer.Argument(..., help="A gct-surgery checkpoint (.safetensors).", show_default=False),
    data: Optional[Path] = typer.Option(None, "--data", help="A folder of images: also measure the gate values they produce."),
    max_images: int = typer.Option(32, "--max-images", help="How many images to read from --data."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the plots to this PNG."),
    json_out: bool = typer.Option(False, "--json", help="Print the rows as JSON."),
    out_json: Optional[Path] = typer.Option(None, "--out-json", help="Also write the JSON rows to this file."),
    trust_source: bool = trust_source_option(),
) -> None:
    """Per-layer gate statistics (alpha, gamma, beta; competition vs cooperation) and,
    with --data, the gate values real images produce. See docs/inspect.md."""
    if max_images < 1:
        raise typer.BadParameter("must be at least 1", param_hint="--max-images")

    from ..analysis import inspect_checkpoint
    from ..analysis import plot as write_plot
    from ..io.atomic import atomic_write_text

    from ..io.trust import trusting

    with trusting(trust_source):
        analysis = inspect_checkpoint(checkpoint, data=data, limit=max_images)
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
    columns = ["depth", "module", "C", "γ mean", "γ std", "γ min", "γ max",
               "β mean", "α mean", "comp. γ>0", "coop. γ<0"]
    if analysis.images:
        columns += ["gate p05", "gate median", "gate p95"]
    rows = []
    for r in analysis.rows:
        g = r.stats["gamma"]
        row = [r.depth, r.module, r.channels, g["mean"], g["std"], g["min"], g["max"],
               r.stats["beta"]["mean"], r.stats["alpha"]["mean"],
               f"{100 * r.competition:.0f}%", f"{100 * r.cooperation:.0f}%"]
        if analysis.images:
            v = r.values or {}
            row += [v.get("p05", float("nan")), v.get("p50", float("nan")), v.get("p95", float("nan"))]
        rows.append(row)
    rows = [[short_number(v) if isinstance(v, float) else v for v in row] for row in rows]
    print_table(f"gates of {checkpoint}", columns, rows, wrap=["module"])
    v = analysis.verdict
    info(v["text"])
    info("would fold into their convs (export --fold): " + ", ".join(
        f"{n} at max |gamma| <= {tol}" for tol, n in v["foldable"].items()))
    info(v["reading"])
    for path in (out_json, plot):
        if path is not None:
            info(f"wrote {path}")
