"""Printing for the CLI (rich for people, JSON for scripts, plain lines off a TTY) and
the options more than one command takes.

Every message is printed as text, never as rich markup: a file named ``photo [copy].png``
or a checkpoint key ``[/boom]`` prints as itself, and cannot crash the printer.
Colour and style come from ``Text`` objects, never from brackets in a string.

Imports only rich and typer, never torch or timm, so ``--help`` stays instant.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from enum import Enum
from typing import Any, Iterable, Sequence

import typer
from rich.console import Console
from rich.text import Text

console = Console()
err_console = Console(stderr=True)


def is_human() -> bool:
    """True when stdout is a terminal: tables and colours; else plain lines."""
    return console.is_terminal


def json_text(data: Any) -> str:
    """Standard JSON (RFC 8259): a missing or non-finite number is null, never NaN."""
    from ..train.verdict import strict_json  # numpy only, no torch

    return strict_json(data)


def print_json(data: Any) -> None:
    sys.stdout.write(json_text(data) + "\n")
    sys.stdout.flush()


WRAP_WIDTH = 12  # the narrowest a wrapping column (module names) gets


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], *,
                wrap: Sequence[str] = ()) -> None:
    """A rich table on a terminal; tab-separated lines with a header otherwise.

    A cell never wraps (``0.00`` over ``106`` reads as two numbers) except in the
    columns named in ``wrap`` (long text such as module names); headers may wrap. A
    table wider than the terminal drops its borders before anything is cut."""
    rows = [[_fmt(v) for v in row] for row in rows]
    if is_human():
        from rich import box
        from rich.table import Table

        # A cell is as wide as its longest value or header word (headers wrap at spaces);
        # a ``wrap`` column (module names) gives way first, down to WRAP_WIDTH.
        widths = [max([len(row[i]) for row in rows if i < len(row)] + [len(w) for w in c.split()])
                  for i, c in enumerate(columns)]
        widths = [min(n, WRAP_WIDTH) if c in wrap else n for c, n in zip(columns, widths)]
        compact = sum(n + 3 for n in widths) + 1 > console.width
        table = Table(title=Text(title), box=None if compact else box.HEAVY_HEAD,
                      padding=(0, 1, 0, 0) if compact else (0, 1), pad_edge=not compact)
        for c, n in zip(columns, widths):
            header = c if len(c) <= n else "\n".join(c.split())  # one word per line
            table.add_column(Text(header), overflow="fold", min_width=n, no_wrap=c not in wrap)
        for row in rows:
            table.add_row(*(Text(v) for v in row))
        console.print(table)
    else:
        print(f"# {title}", *("\t".join(row) for row in [columns, *rows]), sep="\n")


def short_number(v: float) -> str:
    """At most 7 characters, 2 to 3 significant digits (a table cell that fits):
    ``0.999``, ``-0.0086``, ``-1.6e-5``, ``1.2e4``."""
    if v != v:
        return "-"
    a = abs(v)
    if a == 0:
        return "0"
    if 0.01 <= a < 1000:
        return f"{v:.3g}"
    if 0.001 <= a < 0.01:
        return f"{v:.2g}"
    mantissa, exponent = f"{v:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def print_kv(title: str, pairs: Sequence[tuple[str, Any]]) -> None:
    """A two-column summary."""
    print_table(title, ["", "value"], [(k, v) for k, v in pairs])


def info(message: str, style: str | None = None) -> None:
    """One line (or more) of output, as text; ``style`` (e.g. ``"bold"``) on a terminal."""
    if is_human():
        console.print(Text(str(message), style=style or ""), soft_wrap=True)
    else:
        print(message)


def labelled(label: str, colour: str, message: str) -> Text:
    """``label: message`` with the label coloured and the message as plain text."""
    return Text.assemble((f"{label}:", colour), " ", str(message))


def warn(message: str, label: str = "warning", colour: str = "yellow") -> None:
    with contextlib.suppress(OSError):  # stderr gone (a closed terminal): nothing to tell
        err_console.print(labelled(label, colour, message), soft_wrap=True)


def error(message: str) -> None:
    """One line on stderr: the whole of a user error."""
    warn(" ".join(str(message).split()), "error", "red")


def plural(n: int, word: str) -> str:
    """``1 epoch``, ``3 epochs``."""
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "-"
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


class WarningHandler(logging.Handler):
    """Library warnings (``logging``) printed like the CLI's own: one ``warning:`` line."""

    def emit(self, record: logging.LogRecord) -> None:
        warn(record.getMessage())


def given_options(ctx, *, besides=()) -> list[str]:
    """The options the user gave (on the command line or by environment), as typed
    (``--lr``, ``CHECKPOINT``), except the parameters named in ``besides``."""
    typed = ("COMMANDLINE", "ENVIRONMENT")  # names: Typer ships its own copy of click
    return [next((o for o in p.opts if o.startswith("--")), None) or p.human_readable_name
            for p in ctx.command.params
            if p.name not in besides
            and getattr(ctx.get_parameter_source(p.name), "name", "") in typed]


# --- options several commands share -----------------------------------------------------
# Choices are Enums, so ``--help`` lists them (``<fast|reference>``) and Typer refuses a
# typo before any work.

def _choices(name: str, *values: str) -> type[Enum]:
    return Enum(name, {v: v for v in values}, type=str)


StageKind = _choices("StageKind", "gates", "full")  # only the gates train (and a new head), or all
Amp = _choices("Amp", "off", "bf16", "fp16")  # bf16 on CPU or CUDA, fp16 on CUDA with a GradScaler
GateImpl = _choices("GateImpl", "fast", "reference")  # fused, or the official formulation
MetricsFormat = _choices("MetricsFormat", "csv", "jsonl")
Split = _choices("Split", "val", "validation", "train", "test")  # validation is read as val
OutputKind = _choices("OutputKind", "probabilities", "logits")  # a saliency model's maps
Control = _choices("Control", "static", "identity")  # gamma held at 0, or gates removed

def _consent(ctx: typer.Context, trust_source: bool) -> bool:
    """The command's consent (``io.trust.trusting``), held until the command ends."""
    from ..io.trust import trusting  # no torch: --help stays instant

    ctx.with_resource(trusting(trust_source))
    return trust_source


def trust_source_option():
    """``--trust-source``, the same in every command that opens files; its consent holds
    for the whole command (``_consent``)."""
    return typer.Option(False, "--trust-source", callback=_consent, help=(
        "Run the Python code the files opened here name (a model factory, a task, a pickled "
        "module) for this call only. Code you named yourself before, or added with "
        "`gct-surgery trust`, runs without it; a file is data otherwise."))
