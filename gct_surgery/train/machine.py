"""How many intra-op threads and data-loader workers this machine and device want.

Why it matters: with the old defaults (2 loader workers, torch's own thread count) a
CPU run on a 2-core machine ran at half speed: two worker processes decoding plus two
intra-op threads computing fight over two cores, and the workers' start-up was paid
every epoch. Measured on that machine, one full-stage epoch of the demo model
(bundled data, batch 64, 32 px): 148.9 img/s with 2 workers against 295 img/s with
``--workers 0`` (and 299 img/s with one thread); docs/performance.md has the rest.

The rule:

- Cores are those this process may run on (``os.sched_getaffinity``: a container's or
  ``taskset``'s limit counts), shared by the processes torchrun started on this
  machine (``LOCAL_WORLD_SIZE``): each process gets ``cores // processes``.
- CPU: no loader workers. Decoding a small image costs a fraction of a training step,
  and a worker would take a core from the convolutions (the model, not the data, is
  what a CPU waits for); the threads get the whole share.
- CUDA: the GPU waits for the data, so workers decode while it computes: the share
  minus one core for the main process, at most 8; the main process keeps what is left.
- ``auto`` never raises the thread count a caller already set (``OMP_NUM_THREADS``,
  ``torch.set_num_threads``, torchrun's 1 per process): it only lowers it to the share.
- An explicit ``--threads`` / ``--workers`` always wins.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from ..errors import UserError

MAX_CUDA_WORKERS = 8


def check_given(threads: int | None, workers: int | None) -> None:
    """An explicit count that cannot work, as a user error (None is auto)."""
    if workers is not None and workers < 0:
        raise UserError(f"--workers {workers}: give 0 or more, or leave it out (auto)")
    if threads is not None and threads < 1:
        raise UserError(f"--threads {threads}: give 1 or more, or leave it out (auto)")


@dataclass(frozen=True)
class MachineChoice:
    """The settings a run uses, and where they came from (said at its start)."""

    device: str          # "cpu" or "cuda" (the device type)
    threads: int         # torch intra-op threads of this process
    workers: int         # data-loader worker processes of this process
    cores: int           # cores this process may run on
    processes: int       # processes on this machine sharing them (torchrun)
    threads_given: bool  # --threads was given
    workers_given: bool  # --workers was given

    def line(self) -> str:
        """One line for the start of a run, e.g.
        ``CPU: 2 threads, 0 loader workers (auto: 2 cores)``."""
        plural = "" if self.threads == 1 else "s"
        given = [f"--{name} given" for name, flag in (("threads", self.threads_given),
                                                      ("workers", self.workers_given)) if flag]
        shared = f" shared by {self.processes} processes" if self.processes > 1 else ""
        origin = "; ".join(given) + "; " if given else ""
        origin += f"{'auto: ' if len(given) < 2 else ''}{self.cores} cores{shared}"
        return (f"{self.device.upper()}: {self.threads} thread{plural}, {self.workers} loader "
                f"workers ({origin})")

    def to_dict(self) -> dict:
        return asdict(self)


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):  # macOS and Windows have no affinity mask
        return max(os.cpu_count() or 1, 1)


def local_processes() -> int:
    """Training processes on this machine: torchrun's ``LOCAL_WORLD_SIZE``, else 1."""
    try:
        return max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def choose(device_type: str, *, threads: int | None = None, workers: int | None = None,
           cores: int | None = None, processes: int | None = None,
           current_threads: int | None = None) -> MachineChoice:
    """The threads and workers for a run on ``device_type`` ("cpu", "cuda"...); ``None``
    for threads or workers means auto. ``cores``, ``processes`` and ``current_threads``
    default to this process's (given here, the rule is testable anywhere)."""
    check_given(threads, workers)
    cores = usable_cores() if cores is None else max(cores, 1)
    processes = local_processes() if processes is None else max(processes, 1)
    if current_threads is None:
        import torch

        current_threads = torch.get_num_threads()
    share = max(cores // processes, 1)
    auto_workers, auto_threads = workers is None, threads is None
    if auto_workers:
        workers = 0 if device_type != "cuda" else min(max(share - 1, 1), MAX_CUDA_WORKERS)
    if auto_threads:  # each worker is left a core of the share; never more than was set
        threads = max(min(current_threads, share - workers), 1)
    return MachineChoice(device_type, threads, workers, cores, processes,
                         threads_given=not auto_threads, workers_given=not auto_workers)


def apply(choice: MachineChoice) -> None:
    """Set this process's intra-op threads to the choice (torch keeps it process-wide)."""
    import torch

    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
