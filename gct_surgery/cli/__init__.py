"""The ``gct-surgery`` command line: a thin layer over the library.

Each command lives in its own module and only parses, calls the library and prints.
Torch and timm are imported inside the command functions, so ``--help`` is instant.
A ``UserError`` from the library becomes one line on stderr and exit code 2, and so
does an ``OSError`` that reaches here (a file system that refused us: the path and the
reason are the whole story, a traceback would add nothing).
"""
from __future__ import annotations

import functools
import sys

import typer

from ._app import app, tidy_help  # noqa: E402  (commands register on it)

# Command modules register themselves on ``app`` when imported, in help order.
from . import inject, finetune, eval, export, inspect, verdict, demo, trust  # noqa: E402,F401


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
    import logging

    from ..errors import UserError
    from ._output import WarningHandler, error

    library_log = logging.getLogger("gct_surgery")
    if not any(isinstance(h, WarningHandler) for h in library_log.handlers):
        handler = WarningHandler(level=logging.WARNING)
        library_log.addHandler(handler)
        library_log.propagate = False
    args = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in args[: args.index("--")] if "--" in args else "--json" in args

    def fail(message: str, code: int) -> int:
        error(message)
        if as_json:
            _json_error(message, code)
        return code

    try:
        # Under --json, click's usage errors come back here to be printed as JSON too.
        # Without standalone mode click *returns* an Exit's code (130 after Ctrl-C...).
        code = _command().main(args=args, prog_name="gct-surgery", standalone_mode=not as_json)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except typer.Abort:
        return fail("aborted", 1)
    except typer.TyperException as e:  # a usage error (click's, as Typer ships it)
        return fail(e.format_message() if hasattr(e, "format_message") else str(e),
                    getattr(e, "exit_code", 2))
    except UserError as e:
        return fail(str(e), e.exit_code)
    except OSError as e:  # every write goes through io/atomic.py; this is the safety net
        where = f" {e.filename}" if e.filename else ""
        return fail(f"could not access{where}: {e.strerror or e}; check the path, its permissions "
                    "and the free space, then run the command again", 2)
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    return code if isinstance(code, int) else 0


def _json_error(message: str, code: int) -> None:
    """The error as the one JSON document on stdout."""
    import contextlib
    import json

    with contextlib.suppress(OSError):
        sys.stdout.write(json.dumps({"error": " ".join(str(message).split()), "exit_code": code}) + "\n")
        sys.stdout.flush()


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())
