"""Time and peak memory of one gates-stage training step against one full step.

Two rows: ``gates`` and ``full``, each as ``finetune`` runs it. (A third row once measured
the cheap frozen base, ``train/frozen.py``, since deleted: docs/performance.md.)

Each measurement runs in a fresh subprocess, so peak memory is not polluted by the
other: on CPU it is the rise of the process's peak RSS (``ru_maxrss``) over the
training steps, measured after the model and optimizer exist; on CUDA it is
``torch.cuda.max_memory_allocated`` over the same steps. Times are medians, of wall
time and of process CPU time (on a shared machine, CPU time with ``--threads 1`` is
the steadier of the two).

    python benchmarks/bench_stages.py                   # resnet50, batch 8, 160 px, CPU
    python benchmarks/bench_stages.py --size 128 --threads 1 --repeats 3
    python benchmarks/bench_stages.py --size 224 --device cuda --steps 20
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def measure(model_name: str, row: str, batch: int, size: int, steps: int, device: str) -> dict:
    import resource
    import statistics
    import time

    import timm
    import torch

    from gct_surgery.train.stages import Stage, freeze_for_stage, make_optimizer, set_train_mode
    from gct_surgery.core.surgery import inject

    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=10).to(device)
    inject(model)
    stage = Stage(row, row)
    freeze_for_stage(model, stage)
    optimizer = make_optimizer(model, stage)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    set_train_mode(model, stage)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with torch.no_grad():
        model(x)
    times, cpu_times = [], []
    for i in range(steps + 1):  # the first step (optimizer state, allocator warm-up) is not timed
        t, c = time.perf_counter(), time.process_time()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - c)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"stage": row, "median_s": statistics.median(times),
            "median_cpu_s": statistics.median(cpu_times), "peak_bytes": peak,
            "trainable": trainable}


ROWS = ("gates", "full")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=1,
                    help="fresh processes per row, interleaved; medians over all of them")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(measure(args.model, args.child, args.batch, args.size, args.steps, args.device)))
        return
    import statistics

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    runs: dict[str, list[dict]] = {row: [] for row in ROWS}
    for _ in range(args.repeats):
        for row in ROWS:
            cmd = [sys.executable, __file__, "--child", row, "--model", args.model, "--batch", str(args.batch),
                   "--size", str(args.size), "--steps", str(args.steps), "--device", args.device,
                   "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            runs[row].append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = {row: {**rs[0], "median_s": statistics.median(r["median_s"] for r in rs),
                     "median_cpu_s": statistics.median(r["median_cpu_s"] for r in rs),
                     "peak_bytes": statistics.median(r["peak_bytes"] for r in rs)}
               for row, rs in runs.items()}
    g, f = (results[row] for row in ROWS)
    threads = f", {args.threads} threads" if args.threads else ""
    repeats = f" x {args.repeats} processes" if args.repeats > 1 else ""
    print(f"{args.model}, batch {args.batch}, {args.size} px, {args.device}{threads}, "
          f"median of {args.steps} steps{repeats}")
    for r in (g, f):
        print(f"  {r['stage']:11s} step: {r['median_s'] * 1000:8.1f} ms (cpu {r['median_cpu_s'] * 1000:7.1f} ms), peak +{r['peak_bytes'] / 2**20:7.1f} MiB, "
              f"{r['trainable']:,} trainable parameters")
    print(f"  {'gates/full:':17s} time {g['median_s'] / f['median_s']:.2f}x "
          f"(cpu {g['median_cpu_s'] / f['median_cpu_s']:.2f}x), "
          f"peak memory {g['peak_bytes'] / max(f['peak_bytes'], 1):.2f}x")


if __name__ == "__main__":
    main()
