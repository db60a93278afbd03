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
    4. ``gct_surgery.load`` the file (rebuild + replay + strict load) and compare outputs.

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
NOT_RUN = ("too-large",)  # skipped before building: over the memory cap


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
        last_change, last_seen, hung = time.monotonic(), "", False
        while proc.poll() is None:
            time.sleep(1.0)
            seen = progress.read_text() if progress.exists() else ""
            if seen != last_seen:
                last_seen, last_change = seen, time.monotonic()
            # The worker's own alarm handles slow Python; this catches stuck C code.
            if time.monotonic() - last_change > args.timeout + 60:
                hung = True
                proc.kill()
                proc.wait()
                break
        done = read_results(Path(args.out))
        pending = [m for m in pending if m not in done]
        if not pending:
            return
        current = last_seen.strip() or pending[0]
        if current in pending:
            # A crash includes the kernel's OOM killer (exit -9 that we did not send).
            reason = ("worker killed after hanging" if hung
                      else f"worker died (exit {proc.returncode}; -9 is the OOM killer)")
            append_result(Path(args.out), {"model": current, "reason": reason,
                                           "status": "timeout" if hung else "crash"})
            pending.remove(current)


def sweep(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = list_timm_models(args.filter)
    done = read_results(out)
    if args.retry_timeouts:  # e.g. again with a longer --timeout, on a quieter machine
        done = {k: v for k, v in done.items() if v["status"] not in ("timeout", "crash")}
    todo = [n for n in names if n not in done]
    n_done = len(names) - len(todo)
    if args.shuffle is not None:  # a partial sweep is then a uniform random sample
        import random

        random.Random(args.shuffle).shuffle(todo)
    if args.limit:
        todo = todo[: args.limit]
    print(f"{len(names)} models, {n_done} already swept, {len(todo)} to sweep now", flush=True)
    t0 = time.monotonic()
    for i in range(0, len(todo), args.chunk):
        chunk = todo[i: i + args.chunk]
        run_chunk(chunk, args)
        n = i + len(chunk)
        rate = (time.monotonic() - t0) / n
        print(f"[{n}/{len(todo)}] {rate:.1f} s/model, ~{rate * (len(todo) - n) / 60:.0f} min left",
              flush=True)
    print_report(out, names)


def summarize(rows: list[dict]) -> dict:
    """The figures: the strict pass rate over every conv model swept, and the rate
    over the models whose base runs (our failures only)."""
    counts = Counter(r["status"] for r in rows)
    conv = sum(v for k, v in counts.items() if k not in NOT_COUNTED)
    not_run = sum(counts[s] for s in NOT_RUN)
    ours = counts["pass"] + sum(counts[s] for s in OUR_FAILURES)
    tested = conv - not_run
    return {"counts": dict(sorted(counts.items())), "swept": len(rows), "conv": conv,
            "not_run": not_run, "tested": tested, "passed": counts["pass"], "ours": ours,
            "pass_rate": 100 * counts["pass"] / tested if tested else 0.0,
            "pass_rate_all": 100 * counts["pass"] / conv if conv else 0.0,
            "pass_rate_ours": 100 * counts["pass"] / ours if ours else 0.0}


def print_report(out: Path, names: list[str] | None = None) -> None:
    rows = _rows(out, names)
    s = summarize(rows)
    print(f"swept {s['swept']} models: " + ", ".join(f"{k} {v}" for k, v in s["counts"].items()))
    print(f"pass rate over conv models run: {s['passed']}/{s['tested']} = {s['pass_rate']:.2f}% "
          f"({s['not_run']} over the memory cap not run; counting them as failures: "
          f"{s['pass_rate_all']:.2f}%)")
    print(f"pass rate where the base model runs (pass + fail): "
          f"{s['passed']}/{s['ours']} = {s['pass_rate_ours']:.2f}%")
    for r in sorted(rows, key=lambda r: (r["status"], r["model"])):
        if r["status"] not in ("pass", "no-conv"):
            print(f"  {r['status']:12s} {r['model']}: {r.get('reason', '')}")


def _rows(out: Path, names: list[str] | None) -> list[dict]:
    results = read_results(out)
    if names is not None:
        wanted = set(names)
        results = {k: v for k, v in results.items() if k in wanted}
    return sorted(results.values(), key=lambda r: r["model"])


def write_markdown(path: Path, out: Path, total: int, command: str, notes: str = "") -> None:
    """``docs/coverage.md``: the figure, the command, every failure and the full table."""
    from gct_surgery.io.atomic import atomic_write_text

    rows = _rows(out, None)
    s = summarize(rows)
    lines = [
        "# Coverage: the whole of timm through gct-surgery",
        "",
        "Generated by `scripts/coverage.py` (do not edit by hand). Every timm model is "
        "built with `pretrained=False` on the CPU, gated in front of every convolution, "
        "checked for an unchanged output (bit for bit), saved and loaded back (outputs "
        "compared bit for bit). See the script's docstring for the outcomes.",
        "",
        "## The figure",
        "",
        f"- timm models registered: **{total}**; swept: **{s['swept']}**"
        + ("" if s["swept"] >= total else f" (a partial sweep: {total - s['swept']} not yet run)"),
        f"- models with a convolution (swept): **{s['conv']}**; without one (not counted): "
        f"{s['counts'].get('no-conv', 0)}",
        f"- not run: {s['not_run']} conv models over the memory cap (`too-large`: their "
        "weights and their reloaded copy would crowd a shared 24 GiB machine; raise "
        "`--max-params` to run them)",
        f"- **pass rate over the conv models run: {s['passed']}/{s['tested']} = "
        f"{s['pass_rate']:.2f}%** (timeouts, crashes and model errors count as not passing)",
        f"- counting the `too-large` ones as failures too: {s['passed']}/{s['conv']} = "
        f"{s['pass_rate_all']:.2f}%",
        f"- pass rate where the base model itself builds and runs, within the limits "
        f"(pass / (pass + fail)): {s['passed']}/{s['ours']} = {s['pass_rate_ours']:.2f}%",
        "- outcomes: " + ", ".join(f"{k} {v}" for k, v in s["counts"].items()),
        "",
        "## The command",
        "",
        "```",
        command,
        "```",
        "",
        "Resumable: run it again with the same `--out` and it sweeps only the models not "
        "yet there. `--shuffle SEED` sweeps in a seeded random order, so a partial sweep is "
        "a uniform sample; `--filter 'resnet*'` and `--limit N` narrow it.",
        "",
        *([notes.rstrip(), ""] if notes else []),
        "## Every model that did not pass, with its cause",
        "",
        "| model | outcome | cause |",
        "|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["status"], r["model"])):
        if r["status"] not in ("pass", "no-conv"):
            lines.append(f"| {r['model']} | {r['status']} | {r.get('reason', '').replace('|', '/')} |")
    lines += ["", "## The table", "", "| model | outcome | input | gates | params added | "
              "identity max abs err | round-trip max abs err | functional convs | s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            r["model"], r["status"], r.get("input_size", ""), r.get("gates", ""),
            r.get("params_added", ""), r.get("identity_err", ""), r.get("roundtrip_err", ""),
            len(r.get("functional_convs", [])) if "functional_convs" in r else "",
            r.get("seconds", "")))
    atomic_write_text(path, "\n".join(lines) + "\n")


# --- the worker: one model at a time --------------------------------------------------

class _Timeout(BaseException):
    """Not an Exception: library code that catches ``Exception`` must not swallow it."""


def check_model(name: str, args: argparse.Namespace, workdir: Path) -> dict:
    """Build, inject, verify and round-trip one timm model; return its table row."""
    import torch
    import timm

    from gct_surgery import load
    from gct_surgery.core.model import max_difference, run_model
    from gct_surgery.operations import inject_model
    from gct_surgery.core.targets import is_conv

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

    kwargs, size = _plan_on_meta(name, args.max_size)
    try:
        model, meta = _open(name, kwargs)
    except _Timeout:
        raise
    except Exception as e:
        return {**row, "status": "model-error", "reason": f"build: {_short(e)}"}
    row["params"] = sum(p.numel() for p in model.parameters())
    if not any(is_conv(m) for m in model.modules()):
        return {**row, "status": "no-conv", "reason": "no convolution module"}

    if size is None:  # the meta device could not tell: probe for real
        size, _, why = _pick_input(model, meta, args.max_size)
        if size is None:
            return {**row, "status": "model-error", "reason": f"forward without gates: {why}"}
    row["input_size"] = "x".join(map(str, size))
    if kwargs:
        row["build_kwargs"] = kwargs
    try:
        path = workdir / f"{name}.safetensors"
        result = inject_model(model, meta, input_size=size, output=path)
    except _Timeout:
        raise
    except Exception as e:
        return {**row, "status": "fail", "reason": f"inject: {_short(e)}"}
    report = result.report
    row.update(gates=report.gates_total, params_added=report.params_added,
               identity_err=result.max_abs_diff,
               functional_convs=getattr(result, "functional_convs", []))
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


def _open(name: str, kwargs: dict):
    from gct_surgery.io.metadata import CheckpointMeta
    from gct_surgery.operations import data_config
    from gct_surgery.io.sources import ModelSource, build_model

    source = ModelSource(f"timm:{name}", kwargs)
    model = build_model(source)
    return model, CheckpointMeta(source=source.to_dict(), gate={}, gated=[], data=data_config(model))


def _plan_on_meta(name: str, max_size: int) -> tuple[dict, list[int] | None]:
    """Find the cheapest build and input on the meta device (no memory, no compute):
    a transformer built for a small ``img_size`` first, then the default build at a
    capped size, then at its default size. ``({}, None)`` when meta cannot tell."""
    import torch
    import timm

    try:
        with torch.device("meta"):
            cfg = timm.create_model(name, pretrained=False).pretrained_cfg
    except _Timeout:
        raise
    except Exception:
        return {}, None
    default = list(cfg.get("input_size") or (3, 224, 224))
    capped = [default[0], *[min(s, max_size) for s in default[1:]]]
    plans = [({}, default)]
    if capped != default:
        plans = [({"img_size": tuple(capped[1:])}, capped), ({}, capped), ({}, default)]
    for kwargs, size in plans:
        try:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False, **kwargs).eval()
                with torch.no_grad():
                    model(torch.empty(2, *size))
            return kwargs, size
        except _Timeout:
            raise
        except Exception:
            continue
    return {}, None


def _pick_input(model, meta, max_size: int):
    """The smallest input the base model accepts: capped size first, then its default."""
    import torch

    from gct_surgery.core.model import run_model

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
    p.add_argument("--shuffle", type=int, default=None, metavar="SEED",
                   help="sweep in a seeded random order, so a partial sweep is a fair sample")
    p.add_argument("--chunk", type=int, default=40, help="models per worker process")
    p.add_argument("--timeout", type=int, default=120, help="seconds per model")
    p.add_argument("--max-size", type=int, default=64, help="cap on the spatial input size")
    p.add_argument("--max-params", type=float, default=600e6,
                   help="skip (as too-large) models above this many parameters")
    p.add_argument("--retry-timeouts", action="store_true",
                   help="sweep again the models that timed out or crashed")
    p.add_argument("--report", action="store_true", help="only print the table summary of --out")
    p.add_argument("--markdown", type=Path, metavar="PATH",
                   help="with --report: write the coverage document (docs/coverage.md)")
    p.add_argument("--notes", type=Path, metavar="FILE",
                   help="with --markdown: a Markdown file of notes to include")
    p.add_argument("--command", default=None,
                   help="with --markdown: the sweep command to quote in the document")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--models", help=argparse.SUPPRESS)
    p.add_argument("--progress", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
    elif args.report:
        print_report(Path(args.out), list_timm_models(args.filter) if args.filter else None)
        if args.markdown:
            command = args.command or f"HF_HUB_OFFLINE=1 .venv/bin/python scripts/coverage.py --out {args.out}"
            notes = args.notes.read_text() if args.notes else ""
            write_markdown(args.markdown, Path(args.out), len(list_timm_models([])), command, notes)
    else:
        sweep(args)


if __name__ == "__main__":
    main()
