"""The ``gct-surgery`` command line: a thin layer over the library.

Each command lives in its own module and only parses, calls the library and prints;
this module puts them on one Typer app. Torch and timm are imported inside the command
functions, so ``--help`` is instant. A ``UserError`` from the library becomes one line
on stderr and exit code 2, and so does an ``OSError`` that reaches here (a file system
that refused us: the path and the reason are the whole story, a traceback would add
nothing).
"""
from __future__ import annotations

import functools
import sys

import typer

from . import demo, eval, export, finetune, inject, inspect, trust, verdict

HELP_NAMES = ["-h", "--help"]

app = typer.Typer(
    name="gct-surgery",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="markdown",
    # Click hands these to every command's context, so `gct-surgery finetune -h` works too.
    context_settings={"help_option_names": HELP_NAMES},
)
# In help order; a command's name is its function's (``eval_`` is named for Python).
for _name, _command_function in [
        ("inject", inject.inject), ("finetune", finetune.finetune), ("eval", eval.eval_),
        ("export", export.export), ("inspect", inspect.inspect), ("verdict", verdict.verdict),
        ("demo", demo.demo), ("trust", trust.trust)]:
    app.command(_name)(_command_function)


def _print_version(given: bool) -> None:
    """The installed package's version (read from its metadata: no torch, instant)."""
    from importlib.metadata import PackageNotFoundError, version

    if given:
        try:
            print(f"gct-surgery {version('gct-surgery')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            print("gct-surgery unknown (not installed; pip install -e .)")
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


@functools.lru_cache(maxsize=1)
def _command():
    """The click command behind the app, built once (about 17 ms a build)."""
    command = typer.main.get_command(app)
    tidy_help(command)
    return command


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code; a ``UserError`` is one line and code 2.
    With ``--json`` every error is also ``{"error": ..., "exit_code": ...}`` on stdout,
    so a script reading stdout always gets JSON."""
    import contextlib
    import json
    import logging

    from ..errors import UserError
    from ._output import WarningHandler, error

    library_log = logging.getLogger("gct_surgery")
    if not any(isinstance(h, WarningHandler) for h in library_log.handlers):
        library_log.addHandler(WarningHandler(level=logging.WARNING))
        library_log.propagate = False
    args = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in args[: args.index("--") if "--" in args else len(args)]

    def fail(message: str, code: int) -> int:
        error(message)
        if as_json:  # the error as the one JSON document on stdout, on one line
            with contextlib.suppress(OSError):
                sys.stdout.write(json.dumps({"error": " ".join(str(message).split()),
                                             "exit_code": code}) + "\n")
                sys.stdout.flush()
        return code

    try:
        from ..train.faults import install_fault

        install_fault()  # the tests' GCT_SURGERY_FAULT hook, read once per command
        # Under --json, click's usage errors come back here to be printed as JSON too.
        # Without standalone mode click *returns* an Exit's code (130 after Ctrl-C...).
        code = _command().main(args=args, prog_name="gct-surgery", standalone_mode=not as_json)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except typer.Abort:
        return fail("aborted", 1)
    except typer.TyperException as e:  # a usage error (click's, as Typer ships it)
        return fail(e.format_message(), e.exit_code)
    except UserError as e:
        return fail(str(e), e.exit_code)
    except OSError as e:  # every write goes through io/atomic.py; this is the safety net
        where = f" {e.filename}" if e.filename else ""
        return fail(f"could not access{where}: {e.strerror or e}; check the path, its permissions "
                    "and the free space, then run the command again", 2)
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    return code if isinstance(code, int) else 0


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())
