"""The collectives of sharded training, each as a future, issued in the same order on every rank.

Every rank must issue the collectives of one process group in the same order. The sharded hook
issues two kinds: reduce-scatters (and small all-reduces) from the comm hook, in bucket order
on the autograd thread; and all-gathers of updated parameters, once each bucket's update has
run, which happens in whatever order the buckets land, on whatever thread the executor uses.
So the all-gathers go to a process group of their own, and a :class:`Sequencer` issues them in
bucket order: one that is ready early waits (without blocking anything) for its predecessors.

Gloo's reduce-scatter copies its whole input on the calling thread (the autograd thread, for
the hook) and then all-reduces the copy: on CPU tensors :func:`reduce_scatter` all-reduces the
input in place instead, the same sums without the copy, and takes this rank's range from it
once it lands. Elsewhere gloo's reduce-scatter has no future (``Work.get_future`` is not
implemented for it): a :class:`Waiter` thread waits for such collectives in the order they were
issued and completes a future for each.

Example (inside an initialised process group)::

    out = reduce_scatter(shard, bucket, group)          # a Future completed with ``shard``
    seq = Sequencer()
    seq.reset()
    seq.submit(1, launch_b1)   # waits for bucket 0
    seq.submit(0, launch_b0)   # launches 0, then 1
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.futures import Future

from .futures import gather

__all__ = ["Sequencer", "Waiter", "all_gather", "all_reduce", "broadcast", "reduce_scatter"]

# torch 2.13 names them *_single; earlier releases only know *_tensor.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class Waiter:
    """A daemon thread that waits for collectives without futures, in issue order, and
    completes a future for each once its collective is done."""

    def __init__(self, name: str = "overlap-sgd-collectives"):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        _LIVE.add(self)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            work, future, value = item
            try:
                work.wait()
            except Exception as exc:
                future.set_exception(exc)
            else:
                future.set_result(value)

    def future(self, work: dist.Work, value: Tensor) -> Future:
        """A future completed with ``value`` once ``work`` is done (or with its error)."""
        fut: Future = Future()
        self._queue.put((work, fut, value))
        return fut

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._queue.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)


#: Waiters with a running thread, stopped at interpreter exit (a daemon thread torn down while
#: inside torch's C++ code would abort the process).
_LIVE: "weakref.WeakSet[Waiter]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for waiter in list(_LIVE):
        waiter.close()


def _future(work: dist.Work, value: Tensor, waiter: Waiter | None) -> Future:
    """A future completed with ``value`` once ``work`` is done (a backend's own future holds
    a list of tensors, which differs between collectives and backends)."""
    try:
        fut = work.get_future()
    except RuntimeError:  # gloo: "Work::getFuture not implemented" for some collectives
        if waiter is None:
            raise
        return waiter.future(work, value)
    return gather([fut], value)


def reduce_scatter(out: Tensor, inp: Tensor, group: dist.ProcessGroup | None, waiter: Waiter | None) -> Future:
    """Start summing ``inp`` over the ranks, this rank keeping its ``out.numel()`` elements.

    ``out`` may be this rank's slice of ``inp`` (in place). What ``inp`` holds afterwards is
    undefined: gloo on CPU all-reduces it in place (see the module docs)."""
    if inp.device.type == "cpu" and dist.get_backend(group) == dist.Backend.GLOO:
        return _reduce_scatter_in_place(out, inp, group)
    work = _reduce_scatter(out, inp, group=group, async_op=True)
    return _future(work, out, waiter)


def _reduce_scatter_in_place(out: Tensor, inp: Tensor, group: dist.ProcessGroup | None) -> Future:
    """Gloo on CPU: all-reduce ``inp`` in place, then copy this rank's range into ``out``."""
    n = out.numel()
    start = dist.get_rank(group) * n
    mine = inp[start : start + n]

    def take(f: Future) -> Tensor:
        f.value()  # raises the collective's error
        if mine.data_ptr() != out.data_ptr():
            out.copy_(mine)
        return out

    return dist.all_reduce(inp, group=group, async_op=True).get_future().then(take)


def all_gather(out: Tensor, inp: Tensor, group: dist.ProcessGroup | None, waiter: Waiter | None) -> Future:
    """Start gathering every rank's ``inp`` into ``out``; ``inp`` may be this rank's slot of ``out``."""
    work = _all_gather(out, inp, group=group, async_op=True)
    return _future(work, out, waiter)


def all_reduce(t: Tensor, group: dist.ProcessGroup | None, op: dist.ReduceOp = dist.ReduceOp.SUM) -> Future:
    """Start reducing ``t`` in place over the ranks."""
    return dist.all_reduce(t, op=op, group=group, async_op=True).get_future()


def broadcast(t: Tensor, src: int, group: dist.ProcessGroup | None) -> Future:
    """Start broadcasting ``t`` from group rank ``src`` in place."""
    global_src = src if group is None else dist.get_global_rank(group, src)
    return dist.broadcast(t, src=global_src, group=group, async_op=True).get_future()


class Sequencer:
    """Runs launches in index order 0, 1, 2, ... whatever order they are submitted in.

    :meth:`submit` runs a launch at once if every smaller index has been launched, and then
    any waiting successors; otherwise it keeps it for the submitter of its predecessor to run.
    On CUDA a launch that runs later, on another thread, waits for the event recorded when it
    was submitted, so that the collective still follows the work its submitter enqueued.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = 0
        self._waiting: dict[int, Callable[[], None]] = {}

    def reset(self) -> None:
        """A new backward pass: its buckets start again at 0."""
        with self._lock:
            self._next = 0
            self._waiting.clear()

    def submit(self, index: int, launch: Callable[[], None], device: torch.device | None = None) -> None:
        if device is not None and device.type == "cuda":
            launch = _after_event(launch, torch.cuda.current_stream(device).record_event(), device)
        with self._lock:
            self._waiting[index] = launch
            if index != self._next:
                return
            # Launch in order under the lock: two threads must not issue collectives at once. A
            # launch handles its own errors; one that raises still lets its successors go.
            while self._next in self._waiting:
                launch, self._next = self._waiting.pop(self._next), self._next + 1
                try:
                    launch()
                except Exception:  # noqa: BLE001 - the launch has failed its own future
                    pass


def _after_event(launch: Callable[[], None], event: torch.cuda.Event, device: torch.device) -> Callable[[], None]:
    def run() -> None:
        torch.cuda.current_stream(device).wait_event(event)
        launch()

    return run
