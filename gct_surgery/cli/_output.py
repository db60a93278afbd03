"""Printing for the CLI: rich for people, JSON for scripts, plain lines off a TTY.

Imports only rich, never torch or timm, so ``--help`` stays instant.
"""
from __future__ import annotations

import json
import logging
import sys
from typing import Any, Iterable, Sequence

from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def is_human() -> bool:
    """True when stdout is a terminal: tables and colours; else plain lines."""
    return console.is_terminal


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A rich table on a terminal; tab-separated lines with a header otherwise."""
    rows = [[_fmt(v) for v in row] for row in rows]
    if is_human():
        from rich.table import Table

        table = Table(title=title)
        for c in columns:
            table.add_column(c, overflow="fold")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    else:
        print(f"# {title}")
        print("\t".join(columns))
        for row in rows:
            print("\t".join(row))


def print_kv(title: str, pairs: Sequence[tuple[str, Any]]) -> None:
    """A two-column summary."""
    print_table(title, ["", "value"], [(k, v) for k, v in pairs])


def info(message: str) -> None:
    if is_human():
        console.print(message, soft_wrap=True)
    else:
        print(_plain(message))


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)


def error(message: str) -> None:
    """One line on stderr: the whole of a user error."""
    first = " ".join(str(message).split())
    err_console.print(f"[red]error:[/red] {first}", highlight=False, soft_wrap=True)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "-"
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def _plain(message: str) -> str:
    from rich.text import Text

    return Text.from_markup(message).plain


class WarningHandler(logging.Handler):
    """Library warnings (``logging``) printed like the CLI's own: one ``warning:`` line."""

    def emit(self, record: logging.LogRecord) -> None:
        warn(record.getMessage())
