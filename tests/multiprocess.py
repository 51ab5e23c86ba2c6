"""Run a test body in several gloo processes, deterministically.

Every multi-process test goes through :func:`run_processes`:

- the processes meet through a file store in the test's ``tmp_path`` (``file://``), never through a
  TCP port picked beforehand, which another process can take between choosing and binding it;
- a process leaves only after every process has finished its body (``dist.barrier()`` before
  ``destroy_process_group``): a rank that tears gloo down while another still has its pairs open
  aborts the other with "terminate called without an active exception";
- a timeout bounds every collective, so that a rank that fails makes the others fail within
  seconds instead of hanging the test run (``mp.spawn`` then reports the first error).
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 120


def _entry(rank: int, world: int, store_path: str, body: Callable, args: tuple) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store_path}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    try:
        body(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Done, and every result is in its file: leave without running the interpreter's exit
    # destructors. Tensor-parallel groups (DTensor device meshes) sometimes aborted there
    # ("terminate called without an active exception", SIGABRT; one CI run in several, torch
    # 2.13 + gloo) after the test's work had passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_processes(body: Callable, world: int, tmp_path: Path, *args) -> None:
    """Call ``body(rank, world, *args)`` in ``world`` spawned processes, a gloo group around it.

    ``body`` must be a module-level function (it is pickled by name); results go through files in
    ``tmp_path``. Raises the first process's error.
    """
    store = Path(tmp_path) / "gloo_store"
    if store.exists():  # a FileStore file must be fresh for every group
        store.unlink()
    mp.spawn(_entry, args=(world, str(store), body, args), nprocs=world, join=True)
