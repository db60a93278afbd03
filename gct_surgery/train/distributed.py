"""Where a run executes: which rank it is, which device it computes on (and autocast),
how many threads and loader workers it takes, and what crosses between processes.
torchrun sets the environment, ``init`` joins the group (gloo on CPU, nccl on CUDA); in a
single process every collective is a no-op.

Only rank 0 writes files and prints (``is_main_process``); metrics are summed across
ranks with ``all_reduce_sum`` before they are divided, so every rank reports the same
numbers.

Threads and workers (``choose``). With the old defaults (2 loader workers, torch's own
thread count) a CPU run on a 2-core machine ran at half speed: two worker processes
decoding plus two intra-op threads computing fight over two cores (measured on the demo
model: 148.9 img/s with 2 workers against 295 img/s with ``--workers 0``;
docs/performance.md has the rest). The rule:

- Cores are those this process may run on (``os.sched_getaffinity``: a container's or
  ``taskset``'s limit counts), shared by the processes torchrun started on this
  machine (``LOCAL_WORLD_SIZE``): each process gets ``cores // processes``.
- CPU: no loader workers. The model, not the data, is what a CPU waits for; the threads
  get the whole share.
- CUDA: the GPU waits for the data, so workers decode while it computes: the share
  minus one core for the main process, at most 8; the main process keeps what is left.
- ``auto`` never raises the thread count a caller already set (``OMP_NUM_THREADS``,
  ``torch.set_num_threads``, torchrun's 1 per process): it only lowers it to the share.
- An explicit ``--threads`` / ``--workers`` always wins.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import UserError

MAX_CUDA_WORKERS = 8


# --- ranks and devices --------------------------------------------------------------

@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_main_process() -> bool:
    """Rank 0, or the one process: the one that checks folders, writes files and prints.
    The one place that reads torchrun's ``RANK`` (readable before ``init``)."""
    return int(os.environ.get("RANK", "0")) == 0


def init(device: torch.device) -> Dist:
    """Join the process group torchrun describes; a single process gets ``Dist()``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=dist.get_rank(), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                world_size=dist.get_world_size())


def device_for(requested: str) -> torch.device:
    """'auto' is CUDA when available (one device per local rank under torchrun)."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def autocast(device: torch.device, amp: str):
    """bf16 on CPU; fp16 or bf16 on CUDA; a no-op when off."""
    if amp == "off":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device; use --amp bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def to_device(x: Any, device: torch.device) -> Any:
    """A tensor, or tensors nested in lists, tuples and dicts, moved to ``device``."""
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: t.to(device, non_blocking=True) if isinstance(t, torch.Tensor)
                    else t, x)


def batch_size_of(task: Any, target: Any) -> int:
    """Samples in a batch: the task's ``batch_size(target)`` when it has one, else len."""
    fn = getattr(task, "batch_size", None)
    return int(fn(target)) if callable(fn) else len(target)


# --- threads and loader workers -----------------------------------------------------

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
        origin = "".join(f"{g}; " for g in given)
        origin += f"{'auto: ' if len(given) < 2 else ''}{self.cores} cores{shared}"
        return (f"{self.device.upper()}: {self.threads} thread{plural}, {self.workers} loader "
                f"workers ({origin})")

    def to_dict(self) -> dict:
        return asdict(self)


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):  # macOS and Windows have no affinity mask
        return max(len(os.sched_getaffinity(0)), 1)
    return os.cpu_count() or 1


def choose(device_type: str, *, threads: int | None = None, workers: int | None = None,
           cores: int | None = None, processes: int | None = None,
           current_threads: int | None = None) -> MachineChoice:
    """The threads and workers for a run on ``device_type`` ("cpu", "cuda"...); ``None``
    for threads or workers means auto. ``cores``, ``processes`` and ``current_threads``
    default to this process's (given here, the rule is testable anywhere). The caller
    applies it: ``torch.set_num_threads(choice.threads)``."""
    check_given(threads, workers)
    cores = max(usable_cores() if cores is None else cores, 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's processes on this machine
    processes = max(local if processes is None else processes, 1)
    share = max(cores // processes, 1)
    current_threads = torch.get_num_threads() if current_threads is None else current_threads
    auto_workers, auto_threads = workers is None, threads is None
    if auto_workers:
        workers = 0 if device_type != "cuda" else min(max(share - 1, 1), MAX_CUDA_WORKERS)
    if auto_threads:  # each worker is left a core of the share; never more than was set
        threads = max(min(current_threads, share - workers), 1)
    return MachineChoice(device_type, threads, workers, cores, processes,
                         threads_given=not auto_threads, workers_given=not auto_workers)


# --- what crosses between processes -------------------------------------------------

def _joined() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """A copy of a float64 tensor summed over ranks (on the GPU for nccl), on its device."""
    out = values.detach().clone()
    if _joined():
        reduced = out.cuda() if dist.get_backend() == "nccl" else out
        dist.all_reduce(reduced)
        out = reduced.to(values.device)
    return out


def broadcast_flag(flag: bool) -> bool:
    """True on every rank if any rank says True (e.g. Ctrl-C seen by one of them)."""
    return bool(all_reduce_sum(torch.tensor([float(flag)], dtype=torch.float64)) > 0)


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if not _joined():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if _joined():
        dist.barrier()


def cleanup() -> None:
    if _joined():
        dist.destroy_process_group()
