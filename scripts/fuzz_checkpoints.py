#!/usr/bin/env python
"""Fuzz gct-surgery's checkpoint reading: every corrupt or hostile file must end in a
``UserError`` (exit 2, one line), never a traceback, a hang or a huge allocation.

A seeded mutator starts from one small valid gct-surgery checkpoint (a 300-parameter
model from a ``file.py:factory``, so a rebuild costs milliseconds) and a plain state
dict, and makes files by category: truncations, bit flips, random bytes, edits of the
safetensors header, edits of the gct-surgery metadata, wrong extensions, torch files
that hold no state dict, and pickles whose payload would leave a marker file. Each file
goes through ``gct_surgery.load`` (and ``read_weights_file`` for torch files) and
through the CLI in-process (``gct_surgery.cli.run(["inject", FILE, "-o", OUT])``).

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/fuzz_checkpoints.py --cases 50000 --seed 1

tests/test_fuzz.py imports this file and runs a few thousand cases of it.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import os
import random
import signal
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_MODEL = """\
import torch.nn as nn
def build(width=4, num_classes=3):
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(width, num_classes))
"""
MARKER = "PWNED"
CASE_SECONDS = 20  # a case that runs longer is a hang
CATEGORIES = ("truncated", "bit_flip", "random_bytes", "header_edit", "metadata_edit",
              "wrong_extension", "not_a_state_dict", "pickle_payload")
_WEIGHTS = (14, 22, 8, 16, 26, 5, 5, 4)


@dataclass
class Seeds:
    """The valid files every case is mutated from."""

    folder: Path
    factory: str
    gct: bytes  # a gct-surgery checkpoint
    header: dict  # its parsed safetensors header
    data: bytes  # its data section
    plain_pt: bytes  # torch.save of the plain state dict
    plain_st: bytes  # the plain state dict as safetensors
    not_state_dicts: list[bytes]
    payloads: list[bytes]


def make_seeds(folder: Path) -> Seeds:
    """Write the tiny model, inject it, and keep the bytes of each valid file."""
    import torch
    from safetensors.torch import save as st_save

    from gct_surgery.operations import inject_model, open_model

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny.py").write_text(TINY_MODEL)
    factory = f"{folder}/tiny.py:build"
    torch.manual_seed(0)
    model, meta = open_model(factory)
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    inject_model(model, meta, output=folder / "seed.safetensors", input_size=[3, 8, 8])
    gct = (folder / "seed.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", gct[:8])
    header = json.loads(gct[8:8 + n])
    doc = json.loads(header["__metadata__"]["gct_surgery"])
    doc["data"]["input_size"] = [3, 8, 8]  # identity checks of loaded cases stay cheap
    header["__metadata__"]["gct_surgery"] = json.dumps(doc)
    data = gct[8 + n:]
    gct = _pack(header, data)

    def saved(obj) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    t = torch.zeros(2)
    not_state_dicts = [saved(o) for o in (
        [t, t], 7, None, "weights", {}, {"a": "b", "c": "d"}, t, {"state_dict": {"model": [1, 2]}},
        {"model": {"module": {"net": {}}}}, {1: t, 2: t}, (t,), {"epoch": 3, "optimizer": {"lr": 0.1}},
        {"state_dict": {"state_dict": {"state_dict": {"state_dict": {"w": 1}}}}},
    )]
    return Seeds(folder, factory, gct, header, data, saved(plain), st_save(plain),
                 not_state_dicts, _payloads(folder / MARKER))


class _Reduce:
    """A pickle whose loading calls ``fn(*args)``: what a hostile checkpoint does."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker: Path) -> list[bytes]:
    import builtins
    import pickle
    import subprocess

    import torch

    cmd = f"touch {marker}"
    code = f"open({str(marker)!r}, 'w').close()"
    objects = [_Reduce(os.system, (cmd,)), _Reduce(builtins.eval, (code,)),
               _Reduce(builtins.exec, (code,)), _Reduce(subprocess.call, (["touch", str(marker)],))]
    out = []
    for obj in objects:
        out.append(pickle.dumps(obj, protocol=2))
        out.append(pickle.dumps({"state_dict": {"w": obj}}, protocol=4))
        buf = io.BytesIO()
        torch.save({"model": obj, "epoch": 1}, buf)  # a zip checkpoint with a payload inside
        out.append(buf.getvalue())
    return out


# --- the mutator -----------------------------------------------------------------

def _pack(header: dict, data: bytes) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


_VALUES = [None, True, False, -1, 0, 1, 2**20, 2**31, 2**63, 10**30, 1e308, -1e-9, float("nan"),
           "", "x" * 5000, "l3", [], [1, -2], [None], {}, {"a": 1}, "timm:resnet18"]
_SPECS = ["timm:not_a_model_xyz", "timm:", "torchvision:nope", "os:system", "subprocess:run",
          "builtins:eval", "/etc/passwd", "missing_file.py:build", "pickle:/nonexistent.pt",
          "{tiny}:nothere", "{tiny}:_private", "timm:test_resnet", "gct_surgery.io.atomic:atomic_write_text",
          "/usr/lib/python3/dist-packages/x.py:build", "a" * 5000, "json:loads", "{tiny}:build"]
_KWARGS = [{"width": 2**20}, {"width": -3}, {"width": 60000}, {"width": "wide"}, {"num_classes": 10**6},
           {"num_classes": 5}, {"checkpoint_path": "/tmp/x.pth"}, {"command": f"touch {MARKER}"},
           {"width": [1, 2]}, {"width": {"a": 1}}, {"__class__": 1}, {"in_chans": 7}, {"width": 8}]


def _random_path(doc, rng: random.Random):
    """A random (container, key) inside a JSON document, for an in-place edit."""
    node, parent, key = doc, None, None
    for _ in range(rng.randint(1, 4)):
        if isinstance(node, dict) and node:
            parent, key = node, rng.choice(list(node))
        elif isinstance(node, list) and node:
            parent, key = node, rng.randrange(len(node))
        else:
            break
        node = parent[key]
    return parent, key


def mutate_metadata(doc: dict, rng: random.Random, seeds: Seeds) -> dict:
    tiny = seeds.factory.rpartition(":")[0]
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(12)
        if op == 0:
            parent, key = _random_path(doc, rng)
            if parent is not None:
                del parent[key]
        elif op == 1:
            parent, key = _random_path(doc, rng)
            if parent is not None:
                parent[key] = rng.choice(_VALUES)
        elif op == 2:
            doc["kind"] = rng.choice(["full", "gates-only", "partial", "", 3, None])
        elif op == 3:
            doc.setdefault("source", {})
            if isinstance(doc["source"], dict):
                doc["source"]["spec"] = rng.choice(_SPECS).format(tiny=tiny)
        elif op == 4:
            if isinstance(doc.get("source"), dict):
                doc["source"]["kwargs"] = dict(rng.choice(_KWARGS))
        elif op == 5:
            if isinstance(doc.get("gate"), dict):
                doc["gate"][rng.choice(["mode", "eps", "after_relu", "extra"])] = rng.choice(
                    ["l1", "l2", "l3", 0, -1e-5, 1e9, "1e-5", None, True])
        elif op == 6 and isinstance(doc.get("gated"), list):
            doc["gated"] = rng.choice([doc["gated"] + ["nothere"], doc["gated"][:1], doc["gated"] * 2,
                                       [1, 2], ["0", "1"], ["6"], [""] , []])
        elif op == 7:
            doc["format_version"] = rng.choice([0, 2, 99, "1", 1.0, True, -1, 2**70])
        elif op == 8:
            doc["format"] = rng.choice(["other", "", None, "GCT-SURGERY"])
        elif op == 9:
            doc["aliases"] = rng.choice([{"x": "y"}, {"0.weight": "3.weight"}, {"3.weight": "0.weight"}, [], {"a": 1}])
        elif op == 10:
            doc["data"] = rng.choice([{"input_size": [3, 10**6, 10**6]}, {"input_size": []},
                                      {"input_size": [-1, 2]}, {"input_size": "abc"}, {"mean": ["a"]}, []])
        else:
            doc["history"] = rng.choice([[{"action": "open", "source": "os:system"}], [1, 2], "h",
                                         [{"action": "open", "weights": 5}], []])
    return doc


def mutate_header(header: dict, data: bytes, rng: random.Random) -> bytes:
    header = json.loads(json.dumps(header))
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    op = rng.randrange(12)
    if op == 0:
        entry["dtype"] = rng.choice(["F33", "", None, 5, "f32", "BF16", "I8"])
    elif op == 1:
        entry["shape"] = rng.choice([[-1], [2**62, 2**62], [10**12], "4", [1.5], [True], [1] * 40, None, [0]])
    elif op == 2:
        entry["data_offsets"] = rng.choice([[0, 10**15], [-8, 0], [5, 1], [0], [0, 0, 0], "0,8", None,
                                            [len(data), len(data) + 8], [1.0, 9.0]])
    elif op == 3:  # overlap: another tensor's offsets
        entry["data_offsets"] = list(header[rng.choice(names)]["data_offsets"])
    elif op == 4:
        header[rng.choice(["x", "0.gate.zeta"])] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    elif op == 5:
        header["__metadata__"] = rng.choice([[], "m", {"gct_surgery": 5}, {"a": None}, 0])
    elif op == 6:
        header[name] = rng.choice([[], "t", 1, None, {"dtype": "F32"}])
    elif op == 7:
        del header[name]
    elif op == 8:  # a valid header over too little or too much data
        data = data[:rng.randrange(len(data))] if rng.random() < 0.5 else data + b"\0" * rng.randint(1, 64)
    elif op == 9:  # the size field lies
        raw = _pack(header, data)
        n = rng.choice([0, 1, 7, 2**64 - 1, 2**40, len(raw), 100 * 1024 * 1024 + 1])
        return struct.pack("<Q", n) + raw[8:]
    elif op == 10:  # not JSON, or JSON that is not an object, or deeply nested
        body = rng.choice([b"{" * 50000, b"[1,2,3]", b"\xff\xfe{}", b'{"a":1,"a":2}', b"nul", b'"str"',
                           b'{"x": 1' + b"1" * 6000 + b"}"])
        body += b" " * (-len(body) % 8)
        return struct.pack("<Q", len(body)) + body + data
    else:
        entry["shape"] = [d + rng.choice([-1, 1]) for d in entry["shape"]] or [1]
    return _pack(header, data)


def make_case(rng: random.Random, seeds: Seeds) -> tuple[str, str, bytes]:
    """One ``(category, file name, bytes)``."""
    category = rng.choices(CATEGORIES, _WEIGHTS)[0]
    gct = seeds.gct
    if category == "truncated":
        src, ext = rng.choice([(gct, ".safetensors"), (seeds.plain_pt, ".pt"), (seeds.plain_st, ".safetensors")])
        cut = rng.choice([0, 1, 7, 8, 9, rng.randrange(len(src)), len(src) - 1])
        return category, "t" + ext, src[:cut]
    if category == "bit_flip":
        src, ext = rng.choice([(gct, ".safetensors")] * 3 + [(seeds.plain_pt, ".pt")])
        data = bytearray(src)
        (n,) = struct.unpack("<Q", gct[:8])
        for _ in range(rng.randint(1, 8)):
            limit = 8 + n if ext == ".safetensors" and rng.random() < 0.8 else len(data)
            i = rng.randrange(limit)
            data[i] ^= 1 << rng.randrange(8)
        return category, "b" + ext, bytes(data)
    if category == "random_bytes":
        size = rng.choice([0, 1, 8, 9, rng.randint(10, 4096)])
        data = rng.randbytes(size)
        if size > 16 and rng.random() < 0.5:  # a plausible size field, then noise
            data = struct.pack("<Q", rng.randint(2, size - 8)) + b"{" + data[9:]
        return category, "r" + rng.choice([".safetensors", ".pt", ".pth", ".bin", ""]), data
    if category == "header_edit":
        return category, "h.safetensors", mutate_header(seeds.header, seeds.data, rng)
    if category == "metadata_edit":
        header = json.loads(json.dumps(seeds.header))
        doc = json.loads(header["__metadata__"]["gct_surgery"])
        if rng.random() < 0.1:
            header["__metadata__"] = rng.choice([{}, {"gct_surgery": "{not json"}, {"gct_surgery": "[]"}])
        else:
            header["__metadata__"]["gct_surgery"] = json.dumps(mutate_metadata(doc, rng, seeds))
        return category, "m.safetensors", _pack(header, seeds.data)
    if category == "wrong_extension":
        src, ext = rng.choice([(gct, ".pt"), (gct, ".bin"), (gct, ".txt"), (seeds.plain_st, ".pth"),
                               (seeds.plain_pt, ".safetensors"), (seeds.plain_pt, ".ckpt"), (gct, "")])
        return category, "w" + ext, src
    if category == "not_a_state_dict":
        return category, "n" + rng.choice([".pt", ".pth", ".bin"]), rng.choice(seeds.not_state_dicts)
    return category, "p" + rng.choice([".pt", ".pth", ".bin", ".ckpt"]), rng.choice(seeds.payloads)


# --- running a case ---------------------------------------------------------------

@dataclass
class Report:
    cases: int = 0
    by_category: collections.Counter = field(default_factory=collections.Counter)
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)
    slowest: float = 0.0

    def summary(self) -> str:
        cats = ", ".join(f"{c} {n}" for c, n in sorted(self.by_category.items()))
        outs = ", ".join(f"{c} {n}" for c, n in sorted(self.outcomes.items()))
        return (f"{self.cases} fuzz cases ({cats}); outcomes: {outs}; slowest {self.slowest:.2f} s; "
                f"{len(self.failures)} failures")


class _Hang(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: int):
    def fire(signum, frame):
        raise _Hang(f"ran past {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def check_file(path: Path, seeds: Seeds, out: Path) -> tuple[str, list[str]]:
    """Run one file through the library and the CLI: ``(outcome, problems)``."""
    import gct_surgery
    from gct_surgery.cli import run
    from gct_surgery.errors import UserError
    from gct_surgery.io.state_dicts import read_weights_file

    problems, loaded = [], False
    calls = [("gct_surgery.load", lambda: gct_surgery.load(path))]
    if path.suffix != ".safetensors":
        calls.append(("read_weights_file", lambda: read_weights_file(path)))
    for name, call in calls:
        try:
            call()
            loaded = loaded or name == "gct_surgery.load"
        except UserError as e:
            if "\n" in str(e).strip():
                problems.append(f"{name}: a multi-line message: {str(e)[:200]!r}")
        except _Hang:
            raise
        except BaseException as e:  # anything else is a bug: a traceback for the user
            problems.append(f"{name}: {type(e).__name__}: {str(e)[:300]}")
    argvs = [["inject", str(path), "-o", str(out)]]
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        argvs.append(["inject", str(path), "--arch", seeds.factory, "-o", str(out), "--input-size", "3,8,8"])
    for argv in argvs:
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                code = run(argv)
        except _Hang:
            raise
        except BaseException as e:
            problems.append(f"cli {' '.join(argv[2:])}: {type(e).__name__}: {str(e)[:300]}")
            continue
        if code not in (0, 2) or (code == 0 and not loaded and "--arch" not in argv):
            problems.append(f"cli {' '.join(argv[2:])}: exit {code}")
    return ("loaded" if loaded else "refused"), problems


def fuzz(cases: int, seed: int, folder: Path, progress: bool = False) -> Report:
    """Make and check ``cases`` files; a payload marker or any non-UserError is a failure."""
    rng = random.Random(seed)
    seeds = make_seeds(folder / "seeds")
    work = folder / "cases"
    work.mkdir(exist_ok=True)
    marker = seeds.folder / MARKER
    report = Report()
    start = time.perf_counter()
    for i in range(cases):
        category, name, data = make_case(rng, seeds)
        path = work / f"case{name}"
        path.write_bytes(data)
        t0 = time.perf_counter()
        try:
            with _time_limit(CASE_SECONDS):
                outcome, problems = check_file(path, seeds, work / "out.safetensors")
        except _Hang as e:
            outcome, problems = "hang", [str(e)]
        report.slowest = max(report.slowest, time.perf_counter() - t0)
        if marker.exists() or Path(MARKER).exists():
            problems.append("a payload ran: the marker file exists")
            marker.unlink(missing_ok=True)
            Path(MARKER).unlink(missing_ok=True)
        report.cases += 1
        report.by_category[category] += 1
        report.outcomes[outcome] += 1
        for p in problems:
            report.failures.append(f"case {i} ({category}, seed {seed}): {p}")
            (folder / f"failure{len(report.failures)}{Path(name).suffix or '.bin'}").write_bytes(data)
        if progress and (i + 1) % 1000 == 0:
            print(f"{i + 1} cases, {len(report.failures)} failures, "
                  f"{(i + 1) / (time.perf_counter() - start):.0f} cases/s", file=sys.stderr)
    return report


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=50000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="folder to keep the failing files in")
    args = parser.parse_args(argv)
    folder = args.keep or Path(tempfile.mkdtemp(prefix="gct-fuzz-"))
    report = fuzz(args.cases, args.seed, folder, progress=True)
    for f in report.failures[:50]:
        print(f)
    print(report.summary())
    if report.failures:
        print(f"failing files are in {folder}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
