"""Instrumentation of the overlap hook: per-bucket timings and profiler labels.

:class:`InstrumentedExecutor` wraps one of overlap-sgd's executors (it is itself an
:class:`~overlap_sgd.hooks.Executor`, so it is passed as ``overlap(..., executor=...)``) and,
for every bucket, records when its communication completed and when its update started and
ended. With labels on, each update runs inside a ``torch.profiler.record_function`` range named
``bucket<i>/update``. :func:`labelled_hook` wraps a communication hook so that each bucket's
communication shows as ``bucket<i>/comm``, from launch until its future completes, and tells the
executor the bucket index that goes with each communication future.
"""

# No "from __future__ import annotations": DDP checks a comm hook's annotations at runtime.

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch.futures import Future
from torch.profiler import record_function

from overlap_sgd.hooks import Executor

__all__ = ["BucketTiming", "InstrumentedExecutor", "LabelHookState", "labelled_hook"]


@dataclass
class BucketTiming:
    """``time.perf_counter()`` stamps of one bucket in one backward pass."""

    comm_done: float = 0.0
    update_start: float = 0.0
    update_end: float = 0.0
    #: Set once the update has run (or its communication failed).
    finished: threading.Event = field(default_factory=threading.Event)


class InstrumentedExecutor(Executor):
    """Delegates to ``inner``; records a :class:`BucketTiming` per bucket in :attr:`timings`.

    Args:
        inner: the executor that really runs the updates (e.g. ``ThreadExecutor()``).
        label: run each update inside ``record_function("bucket<i>/update")``.
    """

    def __init__(self, inner: Executor, label: bool = False):
        self.inner = inner
        self.label = label
        #: Timings of the buckets since the last :meth:`take`, in launch order.
        self.timings: list[BucketTiming] = []
        #: id(communication future) -> bucket index, filled by :func:`labelled_hook`.
        self.bucket_of: dict[int, int] = {}

    def take(self) -> list[BucketTiming]:
        """The timings recorded since the last call (call it once backward has returned).

        Waits for updates still finishing: the sharded hook completes a bucket's future after
        its all-gather, which may land before the update that launched it has returned."""
        out, self.timings = self.timings, []
        for timing in out:
            timing.finished.wait(timeout=30)
        return out

    def after(self, comm: Future, used: Optional[Future], update: Callable[..., None]) -> Future:
        timing = BucketTiming()
        self.timings.append(timing)
        index = self.bucket_of.pop(id(comm), None)
        name = f"bucket{index}/update" if index is not None else "overlap/update"

        def stamp(_: Future) -> None:
            timing.comm_done = time.perf_counter()

        comm.add_done_callback(stamp)

        def timed(result: torch.Tensor, flags: Optional[torch.Tensor]) -> None:
            timing.update_start = time.perf_counter()
            try:
                if self.label:
                    with record_function(name):
                        update(result, flags)
                else:
                    update(result, flags)
            finally:
                timing.update_end = time.perf_counter()

        fut = self.inner.after(comm, used, timed)
        fut.add_done_callback(lambda _: timing.finished.set())
        return fut

    def hold(self) -> None:
        self.inner.hold()

    def release(self) -> None:
        self.inner.release()

    def close(self) -> None:
        self.inner.close()


class LabelHookState:
    """State of :func:`labelled_hook`: the inner hook and the executor to tell bucket indices."""

    def __init__(self, inner: Callable[[Any, dist.GradBucket], Future], inner_state: Any,
                 executor: Optional[InstrumentedExecutor] = None):
        self.inner = inner
        self.inner_state = inner_state
        self.executor = executor


def labelled_hook(state: LabelHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: run ``state.inner`` inside a ``bucket<i>/comm`` range that ends on completion."""
    index = bucket.index()
    rf = record_function(f"bucket{index}/comm")
    rf.__enter__()
    try:
        fut = state.inner(state.inner_state, bucket)
        fut = rf._call_end_callbacks_on_future(fut)
    finally:
        rf.__exit__(None, None, None)
    if state.executor is not None:
        state.executor.bucket_of[id(fut)] = index
    return fut
