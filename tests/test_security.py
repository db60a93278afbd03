"""Hostile and malformed checkpoints: refused with one clear line, payloads never run.

Every payload here would create a marker file if it ran; each test asserts the marker
is absent. Header tests write safetensors files by hand, byte by byte.
"""
from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import struct
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import gct_surgery
from conftest import cli_path
from gct_surgery.io.checkpoint import read_metadata
from gct_surgery.io.metadata import FORMAT_VERSION, METADATA_KEY
from gct_surgery.errors import CheckpointError, UserError
from gct_surgery.io.state_dicts import read_header, read_weights_file

TINY = """\
import torch.nn as nn
def build(width=4, num_classes=3):
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
"""


class Payload:
    """Unpickling this calls ``fn(*args)``."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def payloads(marker: Path) -> dict[str, object]:
    code = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": Payload(os.system, (f"touch {marker}",)),
        "eval": Payload(builtins.eval, (code,)),
        "exec": Payload(builtins.exec, (code,)),
        "subprocess": Payload(subprocess.call, (["touch", str(marker)],)),
        "nested": {"state_dict": {"conv.weight": torch.zeros(1), "x": Payload(os.system, (f"touch {marker}",))}},
    }


def hostile_files(folder: Path) -> list[Path]:
    """Each payload as a plain pickle (.pt/.pth/.bin) and inside a torch zip checkpoint."""
    marker = folder / "MARKER"
    files = []
    for i, (name, obj) in enumerate(payloads(marker).items()):
        ext = (".pt", ".pth", ".bin")[i % 3]
        plain = folder / f"{name}-plain{ext}"
        plain.write_bytes(pickle.dumps(obj, protocol=2))
        zipped = folder / f"{name}-zip.pt"
        torch.save({"model": obj, "epoch": 3}, zipped)
        files += [plain, zipped]
    return files


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    files = hostile_files(folder)
    assert not (folder / "MARKER").exists()  # building them ran nothing
    return folder, files


def test_payloads_never_run_through_the_library(hostile):
    folder, files = hostile
    for path in files:
        with pytest.raises(CheckpointError) as err:
            read_weights_file(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
        with pytest.raises(CheckpointError, match="not a safetensors file"):
            gct_surgery.load(path)
    assert not (folder / "MARKER").exists()


def test_refusal_names_the_opt_in(hostile):
    folder, files = hostile
    zipped = next(p for p in files if p.name == "os.system-zip.pt")
    with pytest.raises(CheckpointError, match="refused. Pass --allow-pickle only if you trust it"):
        read_weights_file(zipped)
    assert not (folder / "MARKER").exists()


@pytest.mark.parametrize("with_arch", [True, False], ids=["arch", "no-arch"])
def test_payloads_never_run_through_the_cli(hostile, tmp_path, with_arch):
    folder, files = hostile
    # a plain pickle, a zip checkpoint, a payload nested in a state dict
    picked = [folder / n for n in ("os.system-plain.pt", "eval-zip.pt", "nested-zip.pt")]
    if not with_arch:
        picked = picked[:2]  # these stop before reading the file: one of each kind is enough
    for path in picked:
        argv = [cli_path(), "inject", str(path), "-o", str(tmp_path / "out.safetensors")]
        if with_arch:
            argv[3:3] = ["--arch", "timm:resnet18"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "Traceback" not in proc.stderr and str(path) in proc.stderr
        assert not (tmp_path / "out.safetensors").exists()
    assert not (folder / "MARKER").exists() and not (tmp_path / "MARKER").exists()


def test_allow_pickle_lifts_the_refusal_for_a_trusted_module(tmp_path):
    import timm

    model = timm.create_model("test_resnet", pretrained=False, num_classes=4).eval()
    torch.save(model, tmp_path / "model.pt")  # a whole pickled module
    out = tmp_path / "out.safetensors"
    from gct_surgery.cli import run

    assert run(["inject", str(tmp_path / "model.pt"), "-o", str(out), "--input-size", "3,32,32"]) == 2
    assert not out.exists()
    assert run(["inject", str(tmp_path / "model.pt"), "--allow-pickle", "-o", str(out),
                "--input-size", "3,32,32"]) == 0
    assert read_metadata(out).source["spec"] == f"pickle:{tmp_path / 'model.pt'}"
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():  # the user unpickled it themselves: remembered, it reopens
        assert torch.equal(gct_surgery.load(out)(x), model(x))
    from gct_surgery.io import trust

    trust.store_path().unlink()  # elsewhere, the file alone names a pickle: refused
    trust._chosen.clear()
    with pytest.raises(UserError, match="trust-source"):
        gct_surgery.load(out, allow_pickle=True)  # --allow-pickle is for paths you type
    with torch.no_grad():
        assert torch.equal(gct_surgery.load(out, trust_source=True)(x), model(x))


# --- hostile metadata: a safetensors file that names code ------------------------

def write_checkpoint(path: Path, doc: dict, tensors: dict | None = None) -> Path:
    tensors = tensors if tensors is not None else {"w": torch.zeros(2)}
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(doc)})
    return path


def base_doc(**changes) -> dict:
    doc = {"format": "gct-surgery", "format_version": FORMAT_VERSION, "kind": "full",
           "source": {"spec": "timm:test_resnet", "kwargs": {}}, "gate": {}, "gated": []}
    doc.update(changes)
    return doc


@pytest.mark.parametrize("source", [
    {"spec": "os:system", "kwargs": {"command": "touch MARKER"}},
    {"spec": "shutil:rmtree", "kwargs": {"path": "victim"}},
    {"spec": "subprocess:run", "kwargs": {"args": ["touch", "MARKER"]}},
    {"spec": "builtins:exec", "kwargs": {}},
    {"spec": "gct_surgery.io.atomic:atomic_write_text", "kwargs": {"dest": "MARKER", "text": "x"}},
    {"spec": "{stdlib}/subprocess.py:run", "kwargs": {"args": ["touch", "MARKER"]}},
    {"spec": "timm:test_resnet", "kwargs": {"checkpoint_path": "evil.pth"}},
    {"spec": "timm:test_resnet", "kwargs": {"pretrained_cfg_overlay": {"file": "evil.pth"}}},
], ids=["os.system", "rmtree", "subprocess.run", "exec", "own-package", "stdlib-file",
        "checkpoint_path", "overlay"])
def test_metadata_that_names_code_is_refused(tmp_path, monkeypatch, source):
    import sysconfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "victim").mkdir()
    source = {**source, "spec": source["spec"].format(stdlib=sysconfig.get_paths()["stdlib"])}
    path = write_checkpoint(tmp_path / "evil.safetensors", base_doc(source=source))
    refused = "refused. If you trust it|cannot find|is not allowed|not a plain value"
    with pytest.raises(UserError, match=refused):
        gct_surgery.load(path)
    from gct_surgery.cli import run

    assert run(["inject", str(path), "-o", str(tmp_path / "out.safetensors")]) == 2
    assert not (tmp_path / "MARKER").exists() and (tmp_path / "victim").is_dir()


def test_history_cannot_smuggle_a_source(tmp_path):
    """The ``open`` event a gates-only file rebuilds its base from is held to the same
    rules: plain names and values at read, consent before its code runs."""
    doc = base_doc(history=[{"action": "open", "source": "timm:hf-hub:evil/x"}])
    with pytest.raises(CheckpointError, match="not a plain model name"):
        read_metadata(write_checkpoint(tmp_path / "h.safetensors", doc))
    from gct_surgery.io.adapter import resolve_base
    from gct_surgery.io.trust import UntrustedCodeError

    doc = base_doc(history=[{"action": "open", "source": "os:system"}])
    meta = read_metadata(write_checkpoint(tmp_path / "h2.safetensors", doc))
    with pytest.raises(UntrustedCodeError, match="os.py:system"):
        resolve_base(meta)


def test_own_factory_still_loads(tmp_path):
    (tmp_path / "tiny.py").write_text(TINY)
    from gct_surgery.operations import inject_model, open_model

    model, meta = open_model(f"{tmp_path}/tiny.py:build")
    inject_model(model, meta, output=tmp_path / "t.safetensors", input_size=[3, 8, 8])
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(gct_surgery.load(tmp_path / "t.safetensors")(x), model.eval()(x))


def test_huge_model_kwargs_are_refused_before_allocation(tmp_path):
    (tmp_path / "tiny.py").write_text(TINY)
    doc = base_doc(source={"spec": f"{tmp_path}/tiny.py:build", "kwargs": {"width": 60000}})
    with pytest.raises(UserError, match="would have .* parameters"):  # trusted, still too big
        gct_surgery.load(write_checkpoint(tmp_path / "big.safetensors", doc), trust_source=True)
    doc = base_doc(source={"spec": "timm:test_resnet", "kwargs": {"num_classes": 10**9}})
    with pytest.raises(CheckpointError, match="not a plain value"):
        gct_surgery.load(write_checkpoint(tmp_path / "big2.safetensors", doc))
    doc = base_doc(source={"spec": "timm:test_resnet", "kwargs": {"num_classes": 100000}})
    with pytest.raises(CheckpointError, match="num_classes=100000 but no stored tensor"):
        gct_surgery.load(write_checkpoint(tmp_path / "big3.safetensors", doc))


# --- safetensors headers, byte by byte ---------------------------------------------

def raw_file(path: Path, header: bytes | dict, data: bytes = b"", size: int | None = None) -> Path:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(body) if size is None else size
    path.write_bytes(struct.pack("<Q", n) + body + data)
    return path


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


HEADER_CASES = {  # the reasons are safetensors' own (safe_open): the file and the reason, one line
    "huge header size": (b"{}", b"", 2**63, "header too large"),
    "header beyond file": (b"{}", b"", 10_000, "invalid header length"),
    "too short": (None, None, None, "header too small"),
    "not JSON": (b"{nope", b"", None, "invalid JSON in header"),
    "not UTF-8": (b"\xff\xfe\xfd{}", b"", None, "invalid UTF-8 in header"),
    "deep nesting": (b"[" * 100000 + b"]" * 100000, b"", None, "invalid type: sequence"),
    "entry without a dtype": (b'{"a":{}}', b"", None, "missing field `dtype`"),
    "JSON array": (b"[1, 2]", b"", None, "invalid type: sequence"),
    "bad dtype": ({"w": entry(dtype="F33")}, b"\0" * 8, None, "unknown variant `F33`"),
    "negative shape": ({"w": entry(shape=(-2,))}, b"\0" * 8, None, "invalid value: integer `-2`"),
    "huge shape": ({"w": entry(shape=(2**40, 2**40))}, b"\0" * 8, None, "overflow computing buffer size"),
    "float shape": ({"w": entry(shape=(2.0,))}, b"\0" * 8, None, "invalid type: floating point"),
    "offsets outside the file": ({"w": entry(offsets=(0, 2**50))}, b"\0" * 8, None, "invalid shape, data type, or offset"),
    "negative offsets": ({"w": entry(offsets=(-8, 0))}, b"\0" * 8, None, "invalid value: integer `-8`"),
    "wrong byte length": ({"w": entry(shape=(3,))}, b"\0" * 8, None, "invalid shape, data type, or offset"),
    "overlapping": ({"a": entry(), "b": entry()}, b"\0" * 8, None, "invalid offset for tensor `[ab]`"),
    "gap": ({"a": entry(offsets=(8, 16))}, b"\0" * 16, None, "invalid offset for tensor `a`"),
    "trailing bytes": ({"a": entry()}, b"\0" * 12, None, "file not fully covered"),
    "metadata not str->str": ({"__metadata__": {"a": 1}}, b"", None, "expected a string"),
    "metadata a list": ({"__metadata__": ["a"]}, b"", None, "expected a map"),
    "sub-byte values cut mid-byte": ({"w": entry(dtype="F4", shape=(3,), offsets=(0, 2))}, b"\0" * 2, None,
                                     "byte boundary"),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_malformed_headers_are_refused(tmp_path, case):
    header, data, size, message = HEADER_CASES[case]
    path = tmp_path / "bad.safetensors"
    if header is None:
        path.write_bytes(b"abc")
    else:
        raw_file(path, header, data, size)
    with pytest.raises(CheckpointError, match=f"{path} is not a safetensors file .*{message}") as err:
        read_header(path)
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError):
        gct_surgery.load(path)


@pytest.mark.parametrize("dtype, nbytes", [("F8_E8M0", 2), ("C64", 16), ("F4", 1), ("BOOL", 2)])
def test_every_dtype_safetensors_knows_is_read(tmp_path, dtype, nbytes):
    """safetensors itself decides which dtypes are valid: none is refused by a table of ours."""
    path = raw_file(tmp_path / "w.safetensors", {"w": entry(dtype=dtype, offsets=(0, nbytes))}, b"\0" * nbytes)
    assert read_header(path)[0] == {"w": [2]}


METADATA_CASES = {
    "newer format": (base_doc(format_version=FORMAT_VERSION + 1), "made by a newer gct-surgery"),
    "no version": ({k: v for k, v in base_doc().items() if k != "format_version"}, "no valid format_version"),
    "string version": (base_doc(format_version="1"), "no valid format_version"),
    "not ours": (base_doc(format="other"), "not gct-surgery's"),
    "missing source": ({k: v for k, v in base_doc().items() if k != "source"}, "lacks 'source'"),
    "missing gated": ({k: v for k, v in base_doc().items() if k != "gated"}, "lacks 'gated'"),
    "gated not a list": (base_doc(gated="conv1"), "gated 'conv1' should be a list of distinct module"),
    "gated not names": (base_doc(gated=[1]), r"gated \[1\] should be a list of distinct module names"),
    "gated twice": (base_doc(gated=["conv1", "conv1"]), "should be a list of distinct module names"),
    "unknown kind": (base_doc(kind="lora"), "kind 'lora' should be 'full' or 'gates-only'"),
    "bad gate mode": (base_doc(gate={"mode": "l3"}), "gate.mode 'l3' should be one of l2, l1"),
    "bad eps": (base_doc(gate={"eps": -1}), r"gate.eps -1 should be a number in \(0, 1\]"),
    "unknown gate field": (base_doc(gate={"alpha": 1}), "gate: unknown key 'alpha'"),
    "source without spec": (base_doc(source={"kwargs": {}}), "source.spec"),
    "file as source": (base_doc(source={"spec": "weights.pth"}), "names no architecture"),
    "kwargs not a dict": (base_doc(source={"spec": "timm:test_resnet", "kwargs": [1]}), "should be an object"),
    "aliases not str->str": (base_doc(aliases={"a": 1}), "aliases .* should be a map of tensor names"),
    "huge input size": (base_doc(data={"input_size": [3, 10**6, 10**6]}), "input_size"),
    "gate tensors missing": (base_doc(gated=["conv1"]), "no 'conv1.gate.gamma' tensor"),
    "history not objects": (base_doc(history=[1]), r"history \[1\] should be a list of objects"),
}


@pytest.mark.parametrize("case", list(METADATA_CASES))
def test_bad_metadata_is_refused(tmp_path, case):
    doc, message = METADATA_CASES[case]
    path = write_checkpoint(tmp_path / "m.safetensors", doc)
    with pytest.raises(CheckpointError, match=message):
        gct_surgery.load(path)


def test_metadata_that_is_not_json(tmp_path):
    save_file({"w": torch.zeros(1)}, str(tmp_path / "m.safetensors"), metadata={METADATA_KEY: "{nope"})
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_metadata(tmp_path / "m.safetensors")


def test_newer_format_through_the_cli(tmp_path):
    path = write_checkpoint(tmp_path / "new.safetensors", base_doc(format_version=FORMAT_VERSION + 1))
    proc = subprocess.run([cli_path(), "inject", str(path), "-o", str(tmp_path / "o.safetensors")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {path} was made by a newer gct-surgery (format {FORMAT_VERSION + 1}, this one reads "
        f"up to {FORMAT_VERSION}); upgrade gct-surgery"]


def test_torch_load_is_weights_only_everywhere():
    """Every torch.load in the package passes weights_only, and only the pickle-module
    loader (behind allow_pickle) may pass False."""
    root = Path(gct_surgery.__file__).parent
    calls = []
    for path in root.rglob("*.py"):
        for line in path.read_text().splitlines():
            if "torch.load(" in line and not line.strip().startswith(("#", '"', "'")) and "``" not in line:
                calls.append((path.name, line.strip()))
    assert calls
    for name, line in calls:
        assert "weights_only=" in line, (name, line)
        assert "weights_only=False" not in line or name == "sources.py", (name, line)


def test_a_torch_file_where_safetensors_is_expected_names_it(tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="torch.save zip file"):
        gct_surgery.load(tmp_path / "w.pt")
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)
    (tmp_path / "w.safetensors").write_bytes(buf.getvalue())  # wrong extension: read by content
    assert torch.equal(read_weights_file(tmp_path / "w.safetensors").tensors["w"], torch.ones(2))


def test_a_header_size_that_starts_like_a_pickle_is_still_safetensors(tmp_path):
    """The first byte of a safetensors file is the header size's low byte: 0x80 is legal."""
    header = {"w": entry()}
    body = json.dumps(header).encode()
    body += b" " * ((128 - len(body)) % 256)
    path = raw_file(tmp_path / "w.pt", body, struct.pack("<2f", 1.0, 2.0))
    assert path.read_bytes()[:1] == b"\x80"
    assert read_weights_file(path).tensors["w"].tolist() == [1.0, 2.0]
