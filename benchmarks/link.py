"""A simulated network link, applied to DDP communication as a comm-hook wrapper.

This is a *simulation*: the real all-reduce still runs (over loopback on one machine); its result
is then held back on one serialized "link" thread per rank for ``bytes * 8 / bandwidth``
seconds before the bucket's future completes. The link carries one bucket at a time, in the
order their all-reduces finish, so buckets queue behind each other as on a saturated network.
The link thread sleeps while holding a bucket, so the simulation spends no CPU time.

The wrapper is an ordinary DDP comm hook, so every communicating benchmark mode uses it the same
way::

    link = SimulatedLink(gbps=2.0)
    state = LinkHookState(link, process_group=ddp.process_group)
    ddp.register_comm_hook(state, link_hook)                                   # post-backward
    overlap_sgd.overlap(ddp, opt, comm_hook=link_hook, comm_state=state)       # overlapped
"""

# No "from __future__ import annotations": DDP checks a comm hook's annotations at runtime.

import queue
import threading
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.futures import Future

__all__ = ["SimulatedLink", "LinkHookState", "link_hook"]

CommHook = Callable[[Any, dist.GradBucket], Future]


class SimulatedLink:
    """One serialized link of ``gbps`` Gbit/s, driven by a daemon thread.

    :meth:`hold` returns a future that completes with ``fut``'s value once ``fut`` has
    completed *and* the link has spent ``nbytes * 8 / (gbps * 1e9)`` seconds carrying it after
    every earlier bucket. Timing uses deadlines, so sleep overshoot does not accumulate.

    Example:
        >>> import torch
        >>> link = SimulatedLink(gbps=8.0)
        >>> done = torch.futures.Future(); done.set_result(torch.ones(1))
        >>> link.hold(done, nbytes=1000).wait()   # held for 1 microsecond
        tensor([1.])
        >>> link.close()
    """

    def __init__(self, gbps: float, name: str = "simulated-link"):
        if not gbps > 0:
            raise ValueError(f"link bandwidth must be positive, got {gbps} Gbit/s")
        self.gbps = float(gbps)
        self.bytes_carried = 0
        self.busy_s = 0.0
        self._queue: "queue.SimpleQueue[Optional[tuple[Future, Future, int, float]]]" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def seconds(self, nbytes: int) -> float:
        """How long the link takes to carry ``nbytes``."""
        return nbytes * 8.0 / (self.gbps * 1e9)

    def hold(self, fut: Future, nbytes: int) -> Future:
        """A future completing with ``fut``'s result after the link has carried ``nbytes``."""
        out: Future = Future()
        fut.add_done_callback(lambda f: self._queue.put((f, out, nbytes, time.perf_counter())))
        return out

    def _loop(self) -> None:
        free_at = 0.0
        while True:
            item = self._queue.get()
            if item is None:
                return
            fut, out, nbytes, arrived = item
            duration = self.seconds(nbytes)
            free_at = max(free_at, arrived) + duration
            delay = free_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            self.bytes_carried += nbytes
            self.busy_s += duration
            try:
                value = fut.value()
            except Exception as exc:  # the inner communication failed: pass it on
                out.set_exception(exc)
            else:
                out.set_result(value)

    def close(self) -> None:
        """Stop the link thread once the buckets already queued have been carried."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=30)


class LinkHookState:
    """State of :func:`link_hook`: the link and the inner hook whose result it holds.

    Args:
        link: the simulated link.
        inner: the real communication hook; ``None`` means an averaged all-reduce.
        inner_state: ``inner``'s state; for the default all-reduce, the process group.
        process_group: the process group of the default all-reduce.
    """

    def __init__(
        self,
        link: SimulatedLink,
        inner: Optional[CommHook] = None,
        inner_state: Any = None,
        *,
        process_group: Optional[dist.ProcessGroup] = None,
    ):
        self.link = link
        self.inner = inner if inner is not None else default_hooks.allreduce_hook
        self.inner_state = inner_state if inner is not None else process_group


def link_hook(state: LinkHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: communicate ``bucket`` with ``state.inner``, then hold it on the link."""
    buffer = bucket.buffer()
    fut = state.inner(state.inner_state, bucket)
    return state.link.hold(fut, buffer.numel() * buffer.element_size())
