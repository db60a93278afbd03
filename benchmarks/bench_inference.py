"""Inference overhead of GCT gates: a gated network over the plain one.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_inference.py             # resnet50, b8 and b1
    .venv/bin/python benchmarks/bench_inference.py --quick                      # fewer repeats
    .venv/bin/python benchmarks/bench_inference.py --compile                    # + torch.compile, resnet18

timm model, ``pretrained=False``, eval, ``torch.inference_mode``, 224x224 input. A
gate goes in front of every convolution (``gct_surgery.inject``: 53 on resnet50),
with random non-initial gate parameters. Variants, run interleaved (one of each per
repeat, so a change in machine load hits all of them alike):

* ``plain``      -- the model without gates;
* ``gct-fast``   -- gated, default fast gate (no-grad path: per-channel gate, one multiply);
* ``gct-ref``    -- gated, ``set_gate_impl(model, 'reference')``;
* ``mul-only``   -- not a gate: a constant per-channel multiply in front of every conv,
  the floor for any gate that scales the activation (one write pass, no statistics);
* ``gct-fold``   -- (batch 1 only) gated, with ``fold_at_inference.gated_conv_operands``: where the
  conv's weight is smaller than the activation, the gate scales the weight instead
  of the activation. surgery.py does not call it (yet); this benchmark installs the
  hook on the gated conv classes for the duration of the run.

The overhead is printed as the median over repeats of the per-repeat ratio
variant / plain (and the medians of the times). Target: gct-fast <= 1.03 at batch 8.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm  # noqa: E402
import torch  # noqa: E402

from gct_surgery.core import surgery  # noqa: E402
from fold_at_inference import gated_conv_operands  # noqa: E402
from gct_surgery.core.gate import set_gate_impl  # noqa: E402
from gct_surgery.core.surgery import gates, inject  # noqa: E402


def build(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    plain = timm.create_model(arch, pretrained=False).eval()
    gated = copy.deepcopy(plain)
    report = inject(gated)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for gt in gates(gated).values():
            gt.alpha.copy_(torch.rand(gt.alpha.shape, generator=g) + 0.5)
            gt.gamma.copy_(torch.randn(gt.gamma.shape, generator=g) * 0.5)
            gt.beta.copy_(torch.randn(gt.beta.shape, generator=g) * 0.2)
    return plain, gated, report.gates_total


@contextlib.contextmanager
def gated_forward(forward):
    """Temporarily replace every gated conv's forward (a variant to measure)."""
    original = surgery.GatedConvMixin.forward
    surgery.GatedConvMixin.forward = forward
    try:
        yield
    finally:
        surgery.GatedConvMixin.forward = original


def _fold_forward(self, x, *args, **kwargs):
    """What GatedConvMixin.forward would become in surgery.py (see docs/performance.md)."""
    x, weight = gated_conv_operands(self.gate, self, x)
    if weight is None:
        return super(surgery.GatedConvMixin, self).forward(x, *args, **kwargs)
    return self._conv_forward(x, weight, self.bias)


def _multiply_only_forward(self, x, *args, **kwargs):
    """Lower bound for any gate that scales the activation: a constant per-channel
    multiply (x * alpha) and nothing else -- no statistics, no tiny ops."""
    return super(surgery.GatedConvMixin, self).forward(x * self.gate.alpha, *args, **kwargs)


def fold_hook():
    return gated_forward(_fold_forward)


def multiply_only_hook():
    return gated_forward(_multiply_only_forward)


@contextlib.contextmanager
def impl(model, name):
    set_gate_impl(model, name)
    try:
        yield
    finally:
        set_gate_impl(model, "fast")


def variants(plain, gated, batch):
    out = {
        "plain": (plain, contextlib.nullcontext),
        "gct-fast": (gated, contextlib.nullcontext),
        "gct-ref": (gated, lambda: impl(gated, "reference")),
        "mul-only": (gated, multiply_only_hook),
    }
    if batch == 1:
        out["gct-fold"] = (gated, fold_hook)
    return out


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def run(arch, batch, repeats, inner, channels_last=False):
    plain, gated, n_gates = build(arch)
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    if channels_last:
        plain = plain.to(memory_format=torch.channels_last)
        gated = gated.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    cases = variants(plain, gated, batch)
    times = {k: [] for k in cases}
    outs = {}
    with torch.inference_mode():
        for name, (model, ctx) in cases.items():  # warm-up, and outputs to compare
            with ctx():
                outs[name] = model(x)
                model(x)
        for _ in range(repeats):
            for name, (model, ctx) in cases.items():
                with ctx():
                    t0 = _clock()
                    for _ in range(inner):
                        model(x)
                    times[name].append((_clock() - t0) / inner)
    ratios = {k: statistics.median(t / p for t, p in zip(v, times["plain"]))
              for k, v in times.items()}
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    diffs = {k: (outs[k] - outs["gct-ref"]).abs().max().item() for k in outs
             if k not in ("plain", "mul-only")}
    return n_gates, med, ratios, diffs


def compile_check(arch, batch, repeats):
    """torch.compile a gated and a plain model once; time them against eager."""
    plain, gated, n_gates = build(arch)
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    res = {}
    with torch.inference_mode():
        want = gated(x)
    compiled = {}
    for name, model in (("plain", plain), ("gct", gated)):
        t0 = time.perf_counter()
        try:
            cm = torch.compile(model)
            with torch.inference_mode():
                out = cm(x)
        except Exception as e:  # report, don't crash the benchmark
            print(f"torch.compile({arch} {name}) failed: {type(e).__name__}: {e}")
            return None
        res[f"compile_s_{name}"] = time.perf_counter() - t0
        if name == "gct":
            res["max_abs_diff_vs_eager"] = (out - want).abs().max().item()
        compiled[name] = cm
    cases = {"plain eager": plain, "gct eager": gated,
             "plain compiled": compiled["plain"], "gct compiled": compiled["gct"]}
    times = {k: [] for k in cases}
    with torch.inference_mode():
        for m in cases.values():
            m(x)
        for _ in range(repeats):
            for k, m in cases.items():
                t0 = _clock()
                m(x)
                times[k].append(_clock() - t0)
    res["ms"] = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    res["ratio_vs_plain_eager"] = {
        k: statistics.median(t / p for t, p in zip(v, times["plain eager"]))
        for k, v in times.items()}
    res["gates"] = n_gates
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 1])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="5 repeats")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--clock", choices=list(CLOCKS), default="wall",
                    help="wall: perf_counter; cpu: process CPU time, immune to being "
                         "descheduled on a busy machine; implies --threads 1 unless given")
    ap.add_argument("--compile", action="store_true",
                    help="also torch.compile a gated and a plain --compile-arch, once")
    ap.add_argument("--compile-only", action="store_true", help="only the torch.compile check")
    ap.add_argument("--compile-arch", default="resnet18")
    ap.add_argument("--compile-batch", type=int, default=8)
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats = 5
    global _clock
    _clock = CLOCKS[args.clock]
    if args.clock == "cpu" and not args.threads:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cpus, {args.clock} clock; {args.arch}, 224x224, "
          f"{'channels_last' if args.channels_last else 'NCHW'}, inference_mode, "
          f"median of {args.repeats} interleaved repeats")
    if not args.compile_only:
        for batch in args.batches:
            inner = max(1, 8 // batch)
            n_gates, med, ratios, diffs = run(args.arch, batch, args.repeats, inner,
                                              args.channels_last)
            print(f"\nbatch {batch} ({n_gates} gates; {inner} forward(s) per timing)")
            print(f"{'variant':>10} {'ms':>8} {'x plain':>8}  max|out - gct-ref|")
            for k in med:
                d = f"{diffs[k]:.2e}" if k in diffs else ""
                print(f"{k:>10} {med[k]:8.1f} {ratios[k]:8.3f}  {d}", flush=True)
            if batch == 8:
                r = ratios["gct-fast"]
                print(f"target gct-fast <= 1.03 x plain at batch 8: {r:.3f} -> "
                      f"{'met' if r <= 1.03 else 'MISSED'}")
    if args.compile or args.compile_only:
        print(f"\ntorch.compile: {args.compile_arch}, batch {args.compile_batch}")
        res = compile_check(args.compile_arch, args.compile_batch, args.repeats)
        if res is not None:
            print(f"compile time (first call): plain {res['compile_s_plain']:.0f} s, "
                  f"gated {res['compile_s_gct']:.0f} s ({res['gates']} gates); "
                  f"max |compiled - eager| {res['max_abs_diff_vs_eager']:.2e}")
            for k, v in res["ms"].items():
                print(f"{k:>15} {v:8.1f} ms {res['ratio_vs_plain_eager'][k]:7.3f} x plain eager")
    return 0


if __name__ == "__main__":
    sys.exit(main())
