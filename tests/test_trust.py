"""A file is data: code a checkpoint, gates-only file or run folder names runs only
with this user's consent (``gct_surgery/io/trust.py``).

Each attack would delete a victim folder and write a marker file if its code ran; every
test asserts the folder is still there and no marker was written. The attacks are the
three of issue 20: a copy of the standard library's ``shutil.py`` outside the running
interpreter (a second Python on the machine), any script on the disk, and a recorded
``source.root`` that holds a package whose import runs code.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import gct_surgery
from conftest import cli_path
from gct_surgery.cli import run
from gct_surgery.errors import UserError
from gct_surgery.io import trust
from gct_surgery.io.metadata import FORMAT_VERSION, METADATA_KEY
from gct_surgery.operations import inject_model, open_model

TINY = """\
import torch.nn as nn
def build(width=4, num_classes=3):
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
"""


class Attack:
    """A victim folder, a marker path, and the hostile specs that name code to run."""

    def __init__(self, root: Path):
        self.victim = root / "victim"
        self.victim.mkdir()
        (self.victim / "precious.txt").write_text("keep me")
        self.marker = root / "MARKER"
        # 1. A second Python's standard library: a real shutil.py outside this interpreter.
        lib = root / "otherpython" / "lib" / "python3.9"
        lib.mkdir(parents=True)
        shutil.copy(shutil.__file__, lib / "shutil.py")
        # 2. Any script on the disk, called with arguments the file chooses.
        scripts = root / "scripts"
        scripts.mkdir()
        (scripts / "cleanup.py").write_text(
            "import shutil\n"
            f"open({str(self.marker)!r}, 'w').close()\n"
            "def main(path, **kw):\n    shutil.rmtree(path)\n")
        # 3. A recorded root that holds a package: importing it runs code.
        pkg = root / "evilroot" / "evilpkg"
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text(
            f"import shutil\nopen({str(self.marker)!r}, 'w').close()\n"
            f"shutil.rmtree({str(self.victim)!r}, ignore_errors=True)\n"
            "def build(**kw):\n    raise SystemExit\n")
        self.sources = {
            "system-stdlib": {"spec": f"{lib / 'shutil.py'}:rmtree",
                              "kwargs": {"path": str(self.victim)}},
            "script": {"spec": f"{scripts / 'cleanup.py'}:main",
                       "kwargs": {"path": str(self.victim)}},
            "package-root": {"spec": "evilpkg:build", "kwargs": {},
                             "root": str(root / "evilroot")},
        }

    def assert_nothing_ran(self) -> None:
        assert (self.victim / "precious.txt").read_text() == "keep me"
        assert not self.marker.exists()
        assert not any(m.startswith("evilpkg") for m in sys.modules)


@pytest.fixture
def attack(tmp_path) -> Attack:
    return Attack(tmp_path)


ATTACKS = ["system-stdlib", "script", "package-root"]


def doc(source: dict, **changes) -> dict:
    d = {"format": "gct-surgery", "format_version": FORMAT_VERSION, "kind": "full",
         "source": source, "gate": {}, "gated": []}
    d.update(changes)
    return d


def hostile_checkpoint(path: Path, source: dict, **changes) -> Path:
    document = json.dumps(doc(source, **changes))
    save_file({"w": torch.zeros(2)}, str(path), metadata={METADATA_KEY: document})
    return path


def with_metadata(src: Path, dest: Path, change) -> Path:
    """A copy of a real checkpoint whose metadata document ``change`` edits."""
    with safe_open(str(src), "pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
    change(meta)
    save_file(load_file(str(src)), str(dest), metadata={METADATA_KEY: json.dumps(meta)})
    return dest


@pytest.mark.parametrize("which", ATTACKS)
def test_every_reader_refuses_code_a_checkpoint_names(attack, which, tmp_path, data, capsys):
    path = hostile_checkpoint(tmp_path / "evil.safetensors", attack.sources[which])
    path_before = list(sys.path)
    with pytest.raises(trust.UntrustedCodeError, match="--trust-source"):
        gct_surgery.load(path)
    readers = [["inspect", str(path)], ["export", str(path), "-o", str(tmp_path / "x.safetensors")],
               ["eval", str(path), "--data", str(data)],
               ["finetune", str(path), "--data", str(data), "--out", str(tmp_path / "run")],
               ["inject", str(path), "-o", str(tmp_path / "again.safetensors")]]
    for argv in readers:
        assert run(argv) == 2, argv
        err = capsys.readouterr().err
        assert "refused" in err and "gct-surgery trust" in err and "Traceback" not in err, argv
    attack.assert_nothing_ran()
    assert sys.path == path_before
    assert not (tmp_path / "x.safetensors").exists()
    assert not (tmp_path / "run" / "run.json").exists()


@pytest.mark.parametrize("which", ATTACKS)
def test_the_refusal_is_one_line_from_a_real_process(attack, which, tmp_path):
    path = hostile_checkpoint(tmp_path / "evil.safetensors", attack.sources[which])
    done = subprocess.run([cli_path(), "inspect", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "--trust-source" in lines[0], lines
    attack.assert_nothing_ran()


@pytest.mark.parametrize("which", ATTACKS)
def test_a_gates_only_file_cannot_name_its_base_code(attack, which, tmp_path, ckpt):
    """The base a gates-only file records (its ``open`` event) is the file's choice."""
    gates = tmp_path / "gates.safetensors"
    assert run(["export", str(ckpt), "-o", str(gates), "--gates-only",
                "--base", str(ckpt)]) == 0

    def name_base(meta):
        source = attack.sources[which]
        meta["history"].insert(0, {"action": "open", "source": source["spec"], "weights": None})
        meta["source"] = {"spec": source["spec"], "kwargs": source["kwargs"],
                          **({"root": source["root"]} if "root" in source else {})}

    hostile = with_metadata(gates, tmp_path / "hostile-gates.safetensors", name_base)
    with pytest.raises(trust.UntrustedCodeError):
        gct_surgery.load(gates=hostile)
    with pytest.raises(trust.UntrustedCodeError):  # weights as the base: the arch is the file's
        gct_surgery.load(gates=hostile, base=str(ckpt))
    attack.assert_nothing_ran()


def test_allow_pickle_never_reaches_a_path_a_file_names(tmp_path, ckpt):
    marker = tmp_path / "PICKLED"
    evil = tmp_path / "evil.pt"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    evil.write_bytes(pickle.dumps(Payload()))
    gates = tmp_path / "gates.safetensors"
    assert run(["export", str(ckpt), "-o", str(gates), "--gates-only", "--base", str(ckpt)]) == 0
    for spec in (f"pickle:{evil}",):
        def name_pickle(meta):
            meta["history"].insert(0, {"action": "open", "source": spec})
            meta["source"] = {"spec": spec, "kwargs": {}}
        hostile = with_metadata(gates, tmp_path / "p.safetensors", name_pickle)
        with pytest.raises(trust.UntrustedCodeError):
            gct_surgery.load(gates=hostile, allow_pickle=True)
        assert run(["export", str(hostile), "-o", str(tmp_path / "y.safetensors"),
                    "--allow-pickle"]) == 2

    def weights_pickle(meta):  # a recorded *weights* path is read as data: never unpickled
        meta["history"].insert(0, {"action": "open", "source": "timm:test_resnet",
                                   "weights": str(evil), "kwargs": {"num_classes": 3}})
    hostile = with_metadata(gates, tmp_path / "w.safetensors", weights_pickle)
    with pytest.raises(UserError):
        gct_surgery.load(gates=hostile, allow_pickle=True)
    assert not marker.exists()


def test_a_recorded_task_is_code_a_file_names(attack, tmp_path, ckpt, data):
    for which in ("script", "system-stdlib"):
        spec = attack.sources[which]["spec"]

        def record_task(meta):
            meta.setdefault("history", []).append({"action": "recipe", "config": {"task": spec}})
        hostile = with_metadata(ckpt, tmp_path / f"task-{which}.safetensors", record_task)
        assert run(["eval", str(hostile), "--data", str(data)]) == 2
    attack.assert_nothing_ran()


def test_a_run_folder_cannot_name_a_task_for_resume(attack, tmp_path, ckpt, data, capsys):
    """``--resume`` reads the task from the state file: a folder someone sent is a file too."""
    out = tmp_path / "run"
    assert run(["finetune", str(ckpt), "--data", str(data), "--out", str(out), "--stage", "gates",
                "--epochs", "1", "--img-size", "32", "--batch-size", "8"]) == 0
    state = torch.load(out / "state.pt", weights_only=True)
    state["run"]["config"]["task"] = attack.sources["script"]["spec"]
    torch.save(state, out / "state.pt")
    capsys.readouterr()
    assert run(["finetune", "--resume", str(out), "--epochs", "2"]) == 2
    assert "names a task to run" in capsys.readouterr().err
    attack.assert_nothing_ran()


def test_a_recorded_hub_source_never_reaches_the_network(tmp_path):
    for spec in ("timm:hf-hub:evil/model", "timm:local-dir:/tmp/x", "torchvision:../x"):
        path = hostile_checkpoint(tmp_path / "hub.safetensors", {"spec": spec, "kwargs": {}})
        with pytest.raises(UserError, match="not a plain model name"):
            gct_surgery.load(path)
    path = hostile_checkpoint(tmp_path / "kw.safetensors",
                              {"spec": "timm:test_resnet", "kwargs": {"pretrained_cfg": "x"}})
    with pytest.raises(UserError, match="not allowed"):
        gct_surgery.load(path)


# --- consent ----------------------------------------------------------------------------

@pytest.fixture
def own(tmp_path) -> tuple[Path, Path]:
    """The user's own factory file and a checkpoint that names it, made elsewhere: the
    store is emptied afterwards, as on another machine."""
    (tmp_path / "tiny.py").write_text(TINY)
    path = tmp_path / "own.safetensors"
    model, meta = open_model(f"{tmp_path}/tiny.py:build")
    inject_model(model, meta, output=path, input_size=[3, 8, 8])
    forget_everything()
    return tmp_path / "tiny.py", path


def forget_everything() -> None:
    """A new machine: nothing remembered in the store or in this process."""
    trust.store_path().unlink(missing_ok=True)
    trust._chosen.clear()


def test_per_call_consent_flag_and_option(own, tmp_path, capsys):
    factory, path = own
    with pytest.raises(trust.UntrustedCodeError, match=f"{factory}:build"):
        gct_surgery.load(path)
    assert len(gct_surgery.gates(gct_surgery.load(path, trust_source=True))) == 2
    assert run(["inspect", str(path), "--trust-source"]) == 0
    assert run(["inspect", str(path), "--trust-source", "--json"]) == 0
    assert not trust.store_path().exists()  # per call: nothing remembered
    assert run(["inspect", str(path)]) == 2  # the consent ended with its command
    with pytest.raises(trust.UntrustedCodeError):
        gct_surgery.load(path)


def test_naming_the_factory_yourself_remembers_it(tmp_path, monkeypatch):
    (tmp_path / "tiny.py").write_text(TINY)
    weights = tmp_path / "w.pth"
    torch.save(open_model(f"{tmp_path}/tiny.py:build")[0].state_dict(), weights)
    forget_everything()
    out = tmp_path / "w.gct.safetensors"
    assert run(["inject", str(weights), "--arch", f"{tmp_path}/tiny.py:build",
                "--input-size", "3,8,8", "-o", str(out)]) == 0
    trust._chosen.clear()  # a new process: only the store remembers
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert len(gct_surgery.gates(gct_surgery.load(out))) == 2
    entries = trust.read_store(trust.store_path())
    assert [e["path"] for e in entries] == [str((tmp_path / "tiny.py").resolve())]
    assert stat.S_IMODE(trust.store_path().stat().st_mode) == 0o600


def test_trust_command_then_a_changed_file_asks_again(own, tmp_path):
    factory, path = own
    done = subprocess.run([cli_path(), "trust", f"{factory}:build"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(gct_surgery.gates(gct_surgery.load(path))) == 2
    marker = tmp_path / "SIDE_EFFECT"
    factory.write_text(TINY + f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(trust.UntrustedCodeError, match="changed since you trusted it"):
        gct_surgery.load(path)
    assert not marker.exists()


def test_another_store_by_environment_and_a_symlinked_store_refused(own, tmp_path, monkeypatch):
    factory, path = own
    cluster = tmp_path / "cluster-store.json"
    monkeypatch.setenv(trust.STORE_ENV, str(cluster))
    assert run(["trust", f"{factory}:build"]) == 0
    assert cluster.is_file() and len(gct_surgery.gates(gct_surgery.load(path))) == 2
    link = tmp_path / "link.json"
    link.symlink_to(cluster)
    monkeypatch.setenv(trust.STORE_ENV, str(link))
    trust._chosen.clear()
    with pytest.raises(UserError, match="symbolic link"):
        gct_surgery.load(path)


def test_concurrent_writers_keep_every_entry(tmp_path):
    """A Slurm array: several jobs remember code at the same moment."""
    forget_everything()
    files = []
    for i in range(4):
        f = tmp_path / f"m{i}.py"
        f.write_text(TINY + f"# {i}\n")
        files.append(f)
    procs = [subprocess.Popen([cli_path(), "trust", f"{f}:build"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for f in files]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    entries = trust.read_store(trust.store_path())
    assert sorted(e["path"] for e in entries) == sorted(str(f.resolve()) for f in files)


def test_a_package_source_is_hashed_without_importing_it(tmp_path):
    pkg = tmp_path / "proj" / "mypkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("X = 1\n")
    (pkg / "net.py").write_text(TINY)
    before = set(sys.modules)
    ref = trust.locate("mypkg.net:build", str(tmp_path / "proj"))
    assert ref.path == (pkg / "net.py").resolve() and ref.attr == "build"
    assert not set(sys.modules) - before and str(tmp_path / "proj") not in sys.path
    (pkg / "__init__.py").write_text("X = 2\n")  # an __init__ that runs first is hashed too
    assert trust.locate("mypkg.net:build", str(tmp_path / "proj")).sha256 != ref.sha256
