"""A small harness for distributed tests: spawn ranks, run a body, surface failures, never hang.

``run_distributed(body, world_size, *args)`` starts ``world_size`` processes, each of which joins a
gloo process group through a store this process serves on a loopback port (bound before the ranks
start, so no other socket can take the port in between), calls ``body(rank, world_size, *args)``
and always destroys the group. The call returns the ranks' return values, in rank order. A rank
that raises makes the call raise with that rank's traceback; a rank that does not finish within
``timeout`` seconds is killed and the call fails, so a hung collective fails the test instead of
hanging the suite.

Ranks are forked from a forkserver that has already imported torch, so a rank starts in a
fraction of a second. ``body`` must be a module-level function (it is pickled by reference).
The forkserver ends each rank with ``os._exit``, without finalising the interpreter, so a rank
cannot hit gloo's abort at exit (see :mod:`overlap_sgd.shutdown`); a rank that exits with a
non-zero status after reporting its result fails the call all the same.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from torch.distributed import TCPStore

__all__ = ["run_distributed", "loopback_store", "DistributedFailure"]

_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", "overlap_sgd"])


class DistributedFailure(AssertionError):
    """A rank raised, died or timed out."""


def loopback_store() -> TCPStore:
    """A rendezvous store served by this process on a port of 127.0.0.1 the system picks: it is
    bound already when the ranks are told its port (``.port``), and lives as long as the object."""
    return TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def _child(body, rank, world_size, port, pg_timeout, args, results, backend="gloo", gpu=None) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if gpu is not None:
            torch.cuda.set_device(gpu)
        timeout = datetime.timedelta(seconds=pg_timeout)
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        try:
            out = body(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, out))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        results.close()
        results.join_thread()  # the report must leave before the hard exit below
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def run_distributed(
    body: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 90.0,
    pg_timeout: float = 60.0,
    may_die: tuple[int, ...] = (),
    backend: str = "gloo",
    gpu: int | None = None,
) -> list[Any]:
    """Run ``body(rank, world_size, *args)`` on ``world_size`` ranks; see the module docs.

    Ranks in ``may_die`` are allowed to end without reporting (their result is ``None``).
    ``backend`` is the process-group backend (``"nccl"`` needs a GPU per rank); with ``gpu``
    every rank makes that CUDA device its current one (for gloo: several ranks may share it).
    """
    store = loopback_store()  # served until this call returns
    port = store.port
    results = _CTX.Queue()
    procs = [
        _CTX.Process(
            target=_child,
            args=(body, rank, world_size, port, pg_timeout, args, results, backend, gpu),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outcomes: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcomes) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, ok, out = results.get(timeout=min(remaining, 0.5))
            except Exception:  # queue.Empty: check for ranks that died without reporting
                dead = [
                    i for i, p in enumerate(procs)
                    if p.exitcode not in (None, 0) and i not in outcomes and i not in may_die
                ]
                for i in may_die:
                    if procs[i].exitcode is not None and i not in outcomes:
                        outcomes[i] = (True, None)
                if dead:
                    # Give the queue a moment: a failing rank reports before it exits.
                    time.sleep(0.2)
                    while not results.empty():
                        r, ok, out = results.get()
                        outcomes[r] = (ok, out)
                    for i in dead:
                        outcomes.setdefault(i, (False, f"rank {i} died with exit code {procs[i].exitcode}"))
                    break
                continue
            outcomes[rank] = (ok, out)
            if not ok:
                break
    finally:
        reported = len(outcomes) == world_size and all(ok for ok, _ in outcomes.values())
        for p in procs:
            # Ranks that reported still have to exit; give them time to (hard cap: the deadline).
            p.join(timeout=max(10.0 if reported else 0.0, min(5.0, deadline - time.monotonic())))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    failures = [f"--- rank {r} ---\n{out}" for r, (ok, out) in sorted(outcomes.items()) if not ok]
    if failures:
        raise DistributedFailure("a rank failed:\n" + "\n".join(failures))
    missing = [r for r in range(world_size) if r not in outcomes]
    if missing:
        raise DistributedFailure(f"ranks {missing} did not finish within {timeout:.0f} s (hung?)")
    # A rank that reported its result and then aborted or hung on the way out is a failure too.
    unclean = [
        f"rank {i} reported its result, then exited with exit code {p.exitcode}"
        + (" (killed: it did not exit)" if p.exitcode == -9 else "")
        for i, p in enumerate(procs) if p.exitcode != 0 and i not in may_die
    ]
    if unclean:
        raise DistributedFailure("; ".join(unclean))
    return [outcomes[r][1] for r in range(world_size)]
