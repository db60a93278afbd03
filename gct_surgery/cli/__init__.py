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

from ._app import app  # noqa: E402  (commands register on it)

# Command modules register themselves on ``app`` when imported, in help order.
from . import inject, finetune, eval, export, inspect, demo  # noqa: E402,F401


@functools.lru_cache(maxsize=1)
def _command():
    """The click command behind the app, built once (about 17 ms a build)."""
    return typer.main.get_command(app)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code; a ``UserError`` is one line and code 2."""
    import logging

    from ..errors import UserError
    from ._output import WarningHandler, error

    library_log = logging.getLogger("gct_surgery")
    if not any(isinstance(h, WarningHandler) for h in library_log.handlers):
        handler = WarningHandler(level=logging.WARNING)
        library_log.addHandler(handler)
        library_log.propagate = False
    try:
        _command().main(args=argv, prog_name="gct-surgery", standalone_mode=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except UserError as e:
        error(str(e))
        return e.exit_code
    except OSError as e:  # every write goes through io/atomic.py; this is the safety net
        where = f" {e.filename}" if e.filename else ""
        error(f"could not access{where}: {e.strerror or e}; check the path, its permissions "
              "and the free space, then run the command again")
        return 2
    except KeyboardInterrupt:
        error("interrupted")
        return 130
    return 0


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())
