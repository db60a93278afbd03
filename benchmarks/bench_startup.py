"""Start-up time of the CLI: `gct-surgery --help` and `gct-surgery inject --help`.

Torch and timm are imported lazily, so help must answer at once (target: 0.3 s).
Prints the median wall time over repeats, side by side with a bare `python -c pass`
on the same machine, and the ratio to the target. Also checks that neither torch nor
timm was imported by a help call.

    python benchmarks/bench_startup.py [--repeats 15]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_S = 0.3


def median_seconds(cmd: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    cli = str(Path(sys.executable).parent / "gct-surgery")
    probe = ("import sys; from gct_surgery.cli import run; run(['inject', '--help']); "
             "print(','.join(m for m in ('torch', 'timm') if m in sys.modules) or 'none')")
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.split()[-1]

    rows = [("python -c pass", [sys.executable, "-c", "pass"]),
            ("gct-surgery --help", [cli, "--help"]),
            ("gct-surgery inject --help", [cli, "inject", "--help"])]
    print(f"{'command':28} {'median s':>9} {'/ target':>9}")
    for label, cmd in rows:
        m = median_seconds(cmd, args.repeats)
        print(f"{label:28} {m:9.3f} {m / TARGET_S:9.2f}")
    print(f"heavy modules imported by `inject --help`: {imported}")


if __name__ == "__main__":
    main()
