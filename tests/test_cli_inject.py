"""`gct-surgery inject` as a user runs it: a real subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import timm
import torch

import gct_surgery


def _run(cli, *args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([cli, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)


def test_inject_resnet18_gates_20_convs_with_zero_difference(cli, tmp_path):
    out = tmp_path / "r18.safetensors"
    proc = _run(cli, "inject", "timm:resnet18", "-o", out, "--json", "--input-size", "3,64,64")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["gates_added"] == 20 and report["max_abs_diff"] == 0.0
    assert report["params_added"] == 11_529

    model = gct_surgery.load(out)
    original = timm.create_model("resnet18", pretrained=False).eval()
    sd = {k: v for k, v in model.state_dict().items() if ".gate." not in k}
    original.load_state_dict(sd)  # strict: the base keys are exactly the original's
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), original(x))
    missing = model.load_state_dict(original.state_dict(), strict=False).missing_keys
    assert len(missing) == 60 and all(".gate." in k for k in missing)


def test_inject_from_a_state_dict_file_with_arch(cli, tmp_path):
    torch.manual_seed(0)
    original = timm.create_model("resnet18", pretrained=False).eval()
    torch.save({"state_dict": original.state_dict()}, tmp_path / "model.pt")
    proc = _run(cli, "inject", tmp_path / "model.pt", "--arch", "timm:resnet18",
                "-o", tmp_path / "g.safetensors", "--input-size", "3,64,64")
    assert proc.returncode == 0, proc.stderr
    assert "20" in proc.stdout and "written" in proc.stdout
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(gct_surgery.load(tmp_path / "g.safetensors")(x), original(x))


def test_dry_run_writes_nothing(cli, tmp_path):
    proc = _run(cli, "inject", "timm:resnet18", "--dry-run", "-o", tmp_path / "x.safetensors",
                "--exclude", "downsample", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert list(tmp_path.iterdir()) == []
    lines = proc.stdout.splitlines()
    assert any(l.startswith("layer2.0.downsample.0\tConv2d\t64\t1x1\t1\t0\tskip: excluded") for l in lines)
    assert "17 gates" in proc.stdout


def test_no_match_exits_2_with_one_line_naming_the_pattern(cli, tmp_path):
    proc = _run(cli, "inject", "timm:resnet18", "--include", "^head_nope", "-o", tmp_path / "x.safetensors")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "^head_nope" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_user_errors_are_one_line_exit_2(tmp_path, capsys):
    """Through the CLI's entry point in this process (the tests above run the command)."""
    from gct_surgery.cli import run

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    cases = [
        (["inject", tmp_path / "missing.pt", "-o", tmp_path / "o.safetensors"], "no such file"),
        (["inject", "timm:not_a_model", "-o", tmp_path / "o.safetensors"], "unknown timm model"),
        (["inject", "timm:resnet18", "--include", "(", "-o", tmp_path / "o.safetensors"], "bad --include pattern"),
        (["inject", tmp_path / "junk.pt", "--arch", "timm:resnet18", "-o", tmp_path / "o.safetensors"], "junk.pt"),
    ]
    for args, needle in cases:
        code, err = run([str(a) for a in args]), capsys.readouterr().err
        assert code == 2, (args, err)
        assert len(err.strip().splitlines()) == 1, err
        assert needle in err and "Traceback" not in err


def test_help_does_not_import_torch_or_timm():
    code = ("import sys; from gct_surgery.cli import run; code = run(['inject', '--help']); "
            "assert code == 0; bad = [m for m in ('torch', 'timm') if m in sys.modules]; "
            "assert not bad, bad; print('lazy')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "lazy" in proc.stdout and "--dry-run" in proc.stdout
