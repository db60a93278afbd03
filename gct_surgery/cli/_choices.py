"""The choices of options that more than one command takes, as Enums: ``--help`` then
lists them (``<fast|reference>``) and a typo is refused by Typer before any work."""
from __future__ import annotations

from enum import Enum

import typer

TRUST_HELP = ("Run the Python code the files opened here name (a model factory, a task, a "
              "pickled module) for this call only. Code you named yourself before, or added "
              "with `gct-surgery trust`, runs without it; a file is data otherwise.")


def trust_source_option():
    """``--trust-source``, the same in every command that opens files."""
    return typer.Option(False, "--trust-source", help=TRUST_HELP)


class StageKind(str, Enum):
    gates = "gates"  # only the gates train (and a new head)
    full = "full"    # everything trains


class Amp(str, Enum):
    off = "off"
    bf16 = "bf16"    # CPU or CUDA
    fp16 = "fp16"    # CUDA, with a GradScaler


class GateImpl(str, Enum):
    fast = "fast"            # fused forward and backward
    reference = "reference"  # the official formulation, for comparison


class MetricsFormat(str, Enum):
    csv = "csv"
    jsonl = "jsonl"


class Split(str, Enum):
    """The split folders ``train/scan.py`` knows (``validation`` is read as ``val``)."""

    val = "val"
    validation = "validation"
    train = "train"
    test = "test"
