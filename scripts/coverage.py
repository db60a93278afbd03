#!/usr/bin/env python3
"""Sweep every timm model that contains a convolution through gct-surgery.

Why
    A surgery tool is only as good as the share of real models it handles without a
    special case. This script measures that share over the whole timm registry.

What each model goes through (``pretrained=False``, CPU, one thread)
    1. build it (first on the meta device, to learn its size and whether it has a
       convolution at all without allocating anything);
    2. pick a small input: the model's own input size with the spatial size capped at
       ``--max-size``; a model that refuses that size (fixed-size ViT hybrids, say) is
       run at its default size instead;
    3. ``operations.inject_model``: gate every convolution, check the output is
       unchanged bit for bit, save a checkpoint;
    4. ``checkpoint.load`` the file (rebuild + replay + strict load) and compare outputs.

Outcomes
    ``pass``, ``fail`` (our problem: injection raised, output changed, round trip
    differs), ``model-error`` (the base model itself cannot be built or run on CPU
    without gates: not ours, reported apart), ``timeout``, ``crash`` (the worker
    died), ``too-large`` (above ``--max-params``, kept out of the 24 GiB budget) and
    ``no-conv`` (not counted: nothing to gate).

How it runs
    The parent process never imports torch. It sends the models in chunks to fresh
    worker processes (memory comes back after each chunk), appends one JSON line per
    model to ``--out`` and skips models already there, so a killed sweep resumes
    where it stopped. A model that hangs in C code or takes the worker down is
    recorded as ``timeout``/``crash`` and the chunk goes on in a new worker.

Examples
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/coverage.py --out /tmp/coverage.jsonl
    .venv/bin/python scripts/coverage.py --filter 'resnet*' --limit 20
    .venv/bin/python scripts/coverage.py --out /tmp/coverage.jsonl --report
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

OUR_FAILURES = ("fail",)
NOT_COUNTED = ("no-conv",)


# --- the parent: chunks, resume, watchdog -------------------------------------------

def list_timm_models(patterns: list[str]) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", "import timm, json; print(json.dumps(timm.list_models()))"],
        check=True, capture_output=True, text=True, env=_worker_env())
    names = json.loads(out.stdout)
    if patterns:
        names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]
    return names


def read_results(path: Path) -> dict[str, dict]:
    results = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if isinstance(row, dict) and "model" in row and "status" in row:
                results[row["model"]] = row
    return results


def append_result(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _worker_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def run_chunk(models: list[str], args: argparse.Namespace) -> None:
    """Run ``models`` in one worker; restart after the model that hung or crashed."""
    pending = list(models)
    while pending:
        progress = Path(args.out).with_suffix(".progress")
        progress.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--worker", "--out", str(args.out),
               "--progress", str(progress), "--timeout", str(args.timeout),
               "--max-size", str(args.max_size), "--max-params", str(args.max_params),
               "--models", ",".join(pending)]
        proc = subprocess.Popen(cmd, env=_worker_env())
        last_change, last_seen = time.monotonic(), ""
        while proc.poll() is None:
            time.sleep(1.0)
            seen = progress.read_text() if progress.exists() else ""
            if seen != last_seen:
                last_seen, last_change = seen, time.monotonic()
            # The worker's own alarm handles slow Python; this catches stuck C code.
            if time.monotonic() - last_change > args.timeout + 60:
                proc.kill()
                proc.wait()
                break
        done = read_results(Path(args.out))
        pending = [m for m in pending if m not in done]
        if not pending:
            return
        current = last_seen.strip() or pending[0]
        if current in pending:
            status = "timeout" if proc.returncode in (-9, None) else "crash"
            append_result(Path(args.out), {
                "model": current, "status": status,
                "reason": f"worker {'killed after hanging' if status == 'timeout' else f'died (exit {proc.returncode})'}"})
            pending.remove(current)


def sweep(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = list_timm_models(args.filter)
    done = read_results(out)
    todo = [n for n in names if n not in done]
    if args.limit:
        todo = todo[: args.limit]
    print(f"{len(names)} models, {len(names) - len(todo) if not args.limit else len(done)} "
          f"already swept, {len(todo)} to go", flush=True)
    t0 = time.monotonic()
    for i in range(0, len(todo), args.chunk):
        chunk = todo[i: i + args.chunk]
        run_chunk(chunk, args)
        n = i + len(chunk)
        rate = (time.monotonic() - t0) / n
        print(f"[{n}/{len(todo)}] {rate:.1f} s/model, ~{rate * (len(todo) - n) / 60:.0f} min left",
              flush=True)
    print_report(out, names)


def print_report(out: Path, names: list[str] | None = None) -> None:
    results = read_results(out)
    if names is not None:
        results = {k: v for k, v in results.items() if k in set(names)}
    rows = list(results.values())
    counts = Counter(r["status"] for r in rows)
    conv = [r for r in rows if r["status"] not in NOT_COUNTED]
    passed = counts["pass"]
    print(f"swept {len(rows)} models: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if conv:
        ours = passed + sum(counts[s] for s in OUR_FAILURES)
        print(f"pass rate over conv models: {passed}/{len(conv)} = {100 * passed / len(conv):.2f}%")
        if ours:
            print(f"pass rate where the base model runs (pass + fail): "
                  f"{passed}/{ours} = {100 * passed / ours:.2f}%")
    for r in sorted(rows, key=lambda r: (r["status"], r["model"])):
        if r["status"] not in ("pass", "no-conv"):
            print(f"  {r['status']:12s} {r['model']}: {r.get('reason', '')}")


# --- the worker: one model at a time --------------------------------------------------

class _Timeout(Exception):
    pass


def check_model(name: str, args: argparse.Namespace, workdir: Path) -> dict:
    """Build, inject, verify and round-trip one timm model; return its table row."""
    import torch
    import timm

    from gct_surgery.checkpoint import load
    from gct_surgery.operations import inject_model, max_difference, open_model, run_model
    from gct_surgery.targets import is_conv

    row: dict = {"model": name}
    try:
        with torch.device("meta"):
            meta_model = timm.create_model(name, pretrained=False)
        row["params"] = sum(p.numel() for p in meta_model.parameters())
        has_conv = any(is_conv(m) for m in meta_model.modules())
        del meta_model
        if not has_conv:
            return {**row, "status": "no-conv", "reason": "no convolution module"}
        if row["params"] > args.max_params:
            return {**row, "status": "too-large",
                    "reason": f"{row['params'] / 1e6:.0f}M parameters > --max-params"}
    except _Timeout:
        raise
    except Exception:
        pass  # some models cannot be built on meta; the real build decides

    try:
        model, meta = open_model(f"timm:{name}")
    except _Timeout:
        raise
    except Exception as e:
        return {**row, "status": "model-error", "reason": f"build: {_short(e)}"}
    row["params"] = sum(p.numel() for p in model.parameters())
    if not any(is_conv(m) for m in model.modules()):
        return {**row, "status": "no-conv", "reason": "no convolution module"}

    size, before, why = _pick_input(model, meta, args.max_size)
    if size is None:
        return {**row, "status": "model-error", "reason": f"forward without gates: {why}"}
    row["input_size"] = "x".join(map(str, size))
    try:
        path = workdir / f"{name}.safetensors"
        result = inject_model(model, meta, input_size=size, output=path)
    except _Timeout:
        raise
    except Exception as e:
        return {**row, "status": "fail", "reason": f"inject: {_short(e)}"}
    report = result.report
    row.update(gates=report.gates_total, params_added=report.params_added,
               identity_err=result.max_abs_diff)
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
    after = run_model(model, x)
    del model
    try:
        loaded = load(path)
        row["roundtrip_err"] = max_difference(after, run_model(loaded, x))
    except _Timeout:
        raise
    except Exception as e:
        return {**row, "status": "fail", "reason": f"save/load: {_short(e)}"}
    finally:
        path.unlink(missing_ok=True)
    if report.gates_total != len(report.selection.selected):
        return {**row, "status": "fail",
                "reason": f"{report.gates_total} gates for {len(report.selection.selected)} convs"}
    if row["identity_err"] != 0.0:
        return {**row, "status": "fail", "reason": f"identity: max |Δ| {row['identity_err']:.3g}"}
    if row["roundtrip_err"] != 0.0:
        return {**row, "status": "fail", "reason": f"round trip: max |Δ| {row['roundtrip_err']:.3g}"}
    return {**row, "status": "pass"}


def _pick_input(model, meta, max_size: int):
    """The smallest input the base model accepts: capped size first, then its default."""
    import torch

    from gct_surgery.operations import run_model

    default = list(meta.data.get("input_size") or [3, 224, 224])
    capped = [default[0], *[min(s, max_size) for s in default[1:]]]
    why = ""
    for size in ([capped, default] if capped != default else [default]):
        x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
        try:
            return size, run_model(model, x), ""
        except _Timeout:
            raise
        except Exception as e:
            why = f"{'x'.join(map(str, size))}: {_short(e)}"
    return None, None, why


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def worker(args: argparse.Namespace) -> None:
    import signal
    import tempfile
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")

    def on_alarm(signum, frame):
        raise _Timeout()

    signal.signal(signal.SIGALRM, on_alarm)
    out, progress = Path(args.out), Path(args.progress)
    with tempfile.TemporaryDirectory(prefix="gct-coverage-") as tmp:
        for name in args.models.split(","):
            progress.write_text(name)
            t0 = time.monotonic()
            signal.alarm(args.timeout)
            try:
                row = check_model(name, args, Path(tmp))
            except _Timeout:
                row = {"model": name, "status": "timeout", "reason": f"over {args.timeout} s"}
            except Exception as e:  # a bug in the sweep itself: record it, keep going
                row = {"model": name, "status": "fail", "reason": f"unexpected: {_short(e)}"}
            finally:
                signal.alarm(0)
            row["seconds"] = round(time.monotonic() - t0, 2)
            append_result(out, row)
            print(f"{row['status']:11s} {row['seconds']:6.1f}s {name} {row.get('reason', '')}",
                  flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="coverage.jsonl", help="JSON-lines results (appended; resumable)")
    p.add_argument("--filter", action="append", default=[], help="fnmatch pattern on model names; repeatable")
    p.add_argument("--limit", type=int, default=0, help="sweep at most this many new models")
    p.add_argument("--chunk", type=int, default=40, help="models per worker process")
    p.add_argument("--timeout", type=int, default=120, help="seconds per model")
    p.add_argument("--max-size", type=int, default=64, help="cap on the spatial input size")
    p.add_argument("--max-params", type=float, default=600e6,
                   help="skip (as too-large) models above this many parameters")
    p.add_argument("--report", action="store_true", help="only print the table summary of --out")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--models", help=argparse.SUPPRESS)
    p.add_argument("--progress", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
    elif args.report:
        print_report(Path(args.out), list_timm_models(args.filter) if args.filter else None)
    else:
        sweep(args)


if __name__ == "__main__":
    main()
