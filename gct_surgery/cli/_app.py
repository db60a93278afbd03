"""The Typer app every command module registers on (kept apart from ``cli/__init__``,
which imports the command modules, so no import goes in a circle)."""
from __future__ import annotations

import typer

HELP_NAMES = ["-h", "--help"]

app = typer.Typer(
    name="gct-surgery",
    help="Put Gated Channel Transformation (GCT) gates into a trained CNN, fine-tune them "
         "in stages, and export the result.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="markdown",
    # Click hands these to every command's context, so `gct-surgery finetune -h` works too.
    context_settings={"help_option_names": HELP_NAMES},
)


def package_version() -> str:
    """The installed package's version (read from its metadata: no torch, instant)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gct-surgery")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed; pip install -e .)"


def _print_version(given: bool) -> None:
    if given:
        print(f"gct-surgery {package_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Put Gated Channel Transformation (GCT) gates into a trained CNN, fine-tune them
    in stages, and export the result."""


def tidy_help(command) -> None:
    """Help that reads well, for every command at once: a flag (``--strict``, ``-h``)
    shows no ``<bool>`` type, because it takes no value."""
    help_option = command.get_help_option(typer.Context(command, help_option_names=HELP_NAMES))
    for param in [*command.params, *([help_option] if help_option else [])]:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        tidy_help(sub)


def given_options(ctx, *, besides=()) -> list[str]:
    """The options the user gave (on the command line or by environment), as typed
    (``--lr``, ``CHECKPOINT``), except the parameters named in ``besides``."""
    given = []
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        if param.name in besides or getattr(source, "name", "") not in ("COMMANDLINE", "ENVIRONMENT"):
            continue
        long = [o for o in param.opts if o.startswith("--")]
        given.append(long[0] if long else param.human_readable_name)
    return given
