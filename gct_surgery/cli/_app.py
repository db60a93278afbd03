"""The Typer app every command module registers on (kept apart from ``cli/__init__``,
which imports the command modules, so no import goes in a circle)."""
from __future__ import annotations

import typer

app = typer.Typer(
    name="gct-surgery",
    help="Put Gated Channel Transformation (GCT) gates into a trained CNN, fine-tune them "
         "in stages, and export the result.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="markdown",
)


@app.callback()
def _root() -> None:
    """Put Gated Channel Transformation (GCT) gates into a trained CNN, fine-tune them
    in stages, and export the result."""
