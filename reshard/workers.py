"""Splitting a conversion across processes: under torchrun (one or several nodes) or ``--workers K`` locally.

The unit of work is a rank file: worker ``w`` of ``W`` writes ranks ``w, w + W, ...``. Workers write disjoint
files into the shared staging folder, a barrier waits for all, and worker 0 alone writes the manifest last.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from reshard.manifests.errors import ReshardError


@dataclass(frozen=True)
class WorkerGroup:
    """This process's place among the conversion workers, and how to wait for the others."""

    index: int
    size: int
    barrier: Callable[[], None]

    @property
    def is_leader(self) -> bool:
        return self.index == 0

    def ranks(self, count: int) -> list[int]:
        """The rank files this worker writes."""
        return [rank for rank in range(count) if rank % self.size == self.index]


def solo() -> WorkerGroup:
    """A single process doing all the work."""
    return WorkerGroup(0, 1, lambda: None)


def from_torchrun(timeout_minutes: float = 60) -> WorkerGroup | None:
    """The torchrun group this process belongs to (``WORLD_SIZE`` > 1), with a gloo barrier; else None.

    The barrier has a timeout so that a worker that died does not leave the others waiting forever.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(minutes=timeout_minutes))
    group = dist.new_group(backend="gloo", timeout=timedelta(minutes=timeout_minutes))
    return WorkerGroup(dist.get_rank(), dist.get_world_size(), lambda: dist.barrier(group=group))


def run_workers(commands: list[list[str]]) -> None:
    """Run one subprocess per worker command and wait for all; raise naming the first that failed."""
    processes = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for command in commands]
    failures = []
    for index, process in enumerate(processes):
        _, stderr = process.communicate()
        if process.returncode != 0:
            lines = [line for line in stderr.splitlines() if line.strip()]
            failures.append(f"worker {index} exited with {process.returncode}: {lines[-1] if lines else ''}")
    if failures:
        raise ReshardError("; ".join(failures))


def worker_command(argv: list[str]) -> list[str]:
    """The process command line running ``reshard`` with ``argv`` (``ConversionRequest.worker_argv``)."""
    return [sys.executable, "-m", "reshard", *argv]
