"""A rank that ends while gloo's worker thread still has to take the GIL: the abort at exit, on cue.

``python tests/exit_trigger.py [--plain-exit] [--raise]``, as one of two ranks (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` set, as torchrun sets them).

:func:`strand_gloo_worker` leaves gloo's worker thread waiting for the GIL with a finished
collective's Python callback, and the main thread holding the GIL: the state a training script
is in when its last collective has just completed and gloo's thread has not yet released it
(see :mod:`overlap_sgd.shutdown`). Ended by the interpreter (``--plain-exit``), such a process
aborts (almost every time: a race it nearly always wins) with ``terminate called without an
active exception``; ended by
:func:`overlap_sgd.exit_process` it exits with 0 (with 1 after ``--raise``, through
:func:`overlap_sgd.exit_process_on_error`).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

__all__ = ["strand_gloo_worker"]


def strand_gloo_worker() -> None:
    """All-reduce with a Python callback, and return holding the GIL while gloo's worker thread
    still has to take it to run and release that callback. Leaves the switch interval huge."""
    # A thread waiting for the GIL asks the holder to drop it after the switch interval; with
    # an interval this long it never does, so the worker waits until this thread blocks.
    sys.setswitchinterval(1e6)
    t = torch.ones(1000)
    fut = dist.all_reduce(t, async_op=True).get_future()
    fut.then(lambda f: None)  # run, then released, by gloo's worker thread: both take the GIL
    while not fut.done():  # spin rather than wait: waiting would hand over the GIL
        pass


def main() -> None:
    import overlap_sgd

    dist.init_process_group("gloo")
    overlap_sgd.exit_process_on_error()
    print(f"rank {dist.get_rank()}: stranding gloo's worker thread", flush=True)
    strand_gloo_worker()  # from here on, nothing may block (printing would hand over the GIL)
    if "--raise" in sys.argv:
        raise RuntimeError("failing on purpose")
    if "--plain-exit" in sys.argv:
        return  # the interpreter finalises with gloo's worker still waiting: abort
    overlap_sgd.exit_process()


if __name__ == "__main__":
    main()
