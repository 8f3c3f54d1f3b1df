"""Starting the ranks: under ``torchrun`` (environment variables) or by spawning them locally.

Spawned ranks join a process group through a store this process serves on 127.0.0.1. If a rank
fails, the others are stopped rather than left waiting in a collective. A spawned rank ends
through :func:`overlap_sgd.exit_process`, as ``python -m benchmarks.overlap_bench`` does under
torchrun, so that gloo's worker threads cannot abort it at exit (see
:mod:`overlap_sgd.shutdown`).
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from overlap_sgd import exit_process

__all__ = ["launched_by_torchrun", "run_torchrun", "spawn"]


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _backend(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def _set_device(device: str, local_rank: int) -> None:
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank % max(1, torch.cuda.device_count()))


def run_torchrun(fn: Callable[[int, int, Any], Any], device: str, arg: Any, timeout_s: float) -> Any:
    """Run ``fn(rank, world, arg)`` in this process, a rank of a ``torchrun`` job."""
    _set_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(_backend(device), timeout=datetime.timedelta(seconds=timeout_s))
    try:
        return fn(dist.get_rank(), dist.get_world_size(), arg)
    finally:
        dist.destroy_process_group()


def _child(fn: Callable[[int, int, Any], Any], rank: int, world: int, port: int, device: str,
           arg: Any, timeout_s: float) -> None:
    try:
        _set_device(device, rank)
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timeout)
        dist.init_process_group(_backend(device), store=store, rank=rank, world_size=world, timeout=timeout)
        try:
            fn(rank, world, arg)
        finally:
            dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        exit_process(1)
    exit_process(0)


def _status(exitcode: int | None) -> int:
    """A shell-style exit status: 128 + signal for a rank killed by a signal."""
    if exitcode is None:
        return 1
    return 128 - exitcode if exitcode < 0 else exitcode


def spawn(fn: Callable[[int, int, Any], Any], nproc: int, device: str, arg: Any,
          timeout_s: float = 600.0) -> int:
    """Run ``fn(rank, nproc, arg)`` on ``nproc`` freshly spawned ranks; return the exit status.

    ``fn`` must be importable by name (a module-level function). Returns 0 when every rank
    succeeded, else the first failing rank's exit code (or 1); the remaining ranks are killed.
    """
    ctx = mp.get_context("spawn")
    # The ranks join through a store served here, bound before they start: no other socket can
    # take its port in between.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    port = store.port
    procs = [
        ctx.Process(target=_child, args=(fn, rank, nproc, port, device, arg, timeout_s),
                    name=f"overlap-bench-rank{rank}")
        for rank in range(nproc)
    ]
    for p in procs:
        p.start()
    status = 0
    try:
        while any(p.is_alive() for p in procs):
            failed = [p for p in procs if p.exitcode not in (None, 0)]
            if failed:
                status = _status(failed[0].exitcode)
                break
            time.sleep(0.1)
        else:
            bad = [p.exitcode for p in procs if p.exitcode != 0]
            status = _status(bad[0]) if bad else 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=10)
    return status
