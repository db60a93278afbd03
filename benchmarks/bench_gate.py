"""GCT gate micro-benchmark: reference vs fast, at ResNet shapes.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_gate.py            # batch 32, l2
    .venv/bin/python benchmarks/bench_gate.py --quick                     # batch 4, 3 repeats
    .venv/bin/python benchmarks/bench_gate.py --mode all --batch 16

For each shape it prints, side by side, the medians over interleaved repeats of

* fwd: forward under ``torch.no_grad`` (the inference path),
* fwd+bwd: forward with autograd plus ``torch.autograd.grad`` w.r.t. x, alpha,
  gamma and beta,

for ``gct_reference`` and ``gct``, with the ratio reference / fast; the bytes saved
for backward (distinct storages seen by ``saved_tensors_hooks``) and the peak of
live temporaries during one fwd+bwd (outputs and gradients included: at least 2,
y and dx), both as multiples of the input's size; and ``pass``, the time of one elementwise write pass ``x * g`` into a
fresh tensor, the unit the fast path is made of (fwd ~ 1 pass, fwd+bwd ~ 2 passes
plus three reads on this kind of machine).

Targets (from the "Fast GCT" issue): fwd+bwd >= 3x faster than the reference;
saved activations <= 1 input-sized tensor per gate.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from gct_surgery.core.gate import gct, gct_reference

SHAPES = [(64, 112), (256, 56), (512, 28), (1024, 14), (2048, 7)]
MODES = {"l2": ("l2", False), "l1": ("l1", False), "l1-relu": ("l1", True)}


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def _timed(fn) -> float:
    t0 = _clock()
    fn()
    return _clock() - t0


def saved_bytes(fn) -> dict[int, int]:
    """nbytes of each distinct storage autograd saves for backward during ``fn()``."""
    storages: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return storages


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storages created and alive at once inside the block.

    Every aten op's outputs are recorded by storage (views count once); a storage is
    dropped when a weak reference to it expires, checked after every op. Storages of
    the tensors in ``exclude`` (the inputs) are not counted. Works on any device and
    any allocator; it sees op outputs, not scratch space inside a single kernel.
    """

    def __init__(self, exclude=()):
        super().__init__()
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st.data_ptr()
                if st.nbytes() and key not in self.exclude and key not in self.live:
                    self.live[key] = (StorageWeakRef(st), st.nbytes())
                    self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def peak_bytes(fn, exclude) -> int:
    with PeakMemory(exclude) as pm:
        out = fn()
        del out
    return pm.peak


def bench_shape(batch, channels, size, mode, after_relu, repeats, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g).to(dtype)
    if after_relu:
        x = x.relu_()
    x.requires_grad_()
    shape = (1, channels, 1, 1)
    alpha = (torch.rand(shape, generator=g) + 0.5).requires_grad_()
    gamma = (torch.randn(shape, generator=g) * 0.5).requires_grad_()
    beta = (torch.randn(shape, generator=g) * 0.1).requires_grad_()
    dy = torch.randn(x.shape, generator=g).to(dtype)
    params = (alpha, gamma, beta)
    kw = dict(mode=mode, after_relu=after_relu)
    xd = x.detach()
    pd = [p.detach() for p in params]
    gate = torch.rand(shape, generator=g).to(dtype)

    def fwd(fn):
        def run():
            with torch.no_grad():
                return fn(xd, *pd, **kw)
        return run

    def fwd_bwd(fn):
        def run():
            y = fn(x, *params, **kw)
            return torch.autograd.grad(y, (x, *params), dy)
        return run

    cases = {
        "pass": lambda: torch.mul(xd, gate),
        "fwd_ref": fwd(gct_reference), "fwd_fast": fwd(gct),
        "fb_ref": fwd_bwd(gct_reference), "fb_fast": fwd_bwd(gct),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    inner = {}
    for k, fn in cases.items():  # warm-up; small shapes repeat a call for >= ~20 ms a sample
        fn()
        inner[k] = max(1, min(50, int(0.02 / max(_timed(fn), 1e-6))))
    for _ in range(repeats):  # interleaved, so drifts in machine load hit all alike
        for k, fn in cases.items():
            n = inner[k]
            times[k].append(_timed(lambda: [fn() for _ in range(n)]) / n)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}

    in_bytes = x.nbytes
    stats_limit = batch * channels * 8  # anything up to (N, C) float64 is a statistic
    mem = {}
    for name, fn in (("ref", gct_reference), ("fast", gct)):
        saved = saved_bytes(lambda: fn(x, *params, **kw))
        mem[f"saved_{name}"] = sum(saved.values()) / in_bytes
        mem[f"full_{name}"] = sum(b for b in saved.values() if b > stats_limit) / in_bytes
        mem[f"stats_{name}"] = sum(b for b in saved.values() if b <= stats_limit)
        peak = peak_bytes(fwd_bwd(fn), exclude=(x, dy, *params))
        mem[f"peak_{name}"] = peak / in_bytes
    return med, mem


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="batch 4, 3 repeats: a fast check")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--mode", choices=[*MODES, "all"], default="l2")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--clock", choices=list(CLOCKS), default="wall",
                    help="wall: perf_counter; cpu: process CPU time (user+sys, page faults "
                         "included), immune to being descheduled on a busy machine; implies "
                         "--threads 1 unless given")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="input dtype (parameters stay float32, as under autocast)")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.repeats = 4, 3
    global _clock
    _clock = CLOCKS[args.clock]
    if args.clock == "cpu" and not args.threads:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cpus, {args.clock} clock, batch {args.batch}, {args.dtype} input, NCHW, "
          f"median of {args.repeats} interleaved repeats after 1 warm-up")
    modes = list(MODES) if args.mode == "all" else [args.mode]
    worst_ratio, worst_saved = float("inf"), 0.0
    for mode_name in modes:
        mode, after_relu = MODES[mode_name]
        print(f"\nmode {mode_name}")
        head = (f"{'C x HxW':>12} {'pass':>7} | {'fwd ref':>8} {'fast':>7} {'x':>5} | "
                f"{'fwd+bwd ref':>11} {'fast':>7} {'x':>5} | {'saved ref':>9} {'fast':>5} | "
                f"{'peak ref':>8} {'fast':>5}")
        print(head)
        print("-" * len(head))
        for channels, size in SHAPES:
            med, mem = bench_shape(args.batch, channels, size, mode, after_relu,
                                                args.repeats, getattr(torch, args.dtype))
            r_fwd = med["fwd_ref"] / med["fwd_fast"]
            r_fb = med["fb_ref"] / med["fb_fast"]
            worst_ratio = min(worst_ratio, r_fb)
            worst_saved = max(worst_saved, mem["full_fast"])
            print(f"{f'{channels}x{size}x{size}':>12} {med['pass']:7.1f} | "
                  f"{med['fwd_ref']:8.1f} {med['fwd_fast']:7.1f} {r_fwd:5.2f} | "
                  f"{med['fb_ref']:11.1f} {med['fb_fast']:7.1f} {r_fb:5.2f} | "
                  f"{mem['saved_ref']:8.3f}x {mem['saved_fast']:4.3f}x | "
                  f"{mem['peak_ref']:7.2f}x {mem['peak_fast']:4.2f}x"
                  f"   (saved: {mem['full_ref']:.0f}x / {mem['full_fast']:.0f}x input-sized "
                  f"+ {mem['stats_ref'] / 1024:.0f} / {mem['stats_fast'] / 1024:.0f} KiB "
                  "per-channel)",
                  flush=True)
    print("\ntimes in ms; x = reference / fast; saved/peak as multiples of the input size")
    ok_speed = worst_ratio >= 3.0
    ok_mem = worst_saved <= 1.01
    print(f"target fwd+bwd >= 3x faster: worst {worst_ratio:.2f}x -> "
          f"{'met' if ok_speed else 'MISSED'}")
    print(f"target saved <= 1 input-sized tensor per gate (beyond (N, C) statistics): "
          f"worst {worst_saved:.2f}x -> "
          f"{'met' if ok_mem else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
