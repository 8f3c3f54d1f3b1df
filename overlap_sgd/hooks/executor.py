"""Where a bucket's update runs once its communication has landed.

A callback attached with ``Future.then`` runs on the thread that completes the future. For gloo
that is the worker thread which also runs the next bucket's collective, so updating there would
serialise the update with communication. Three executors:

- :class:`ThreadExecutor` (CPU default): one daemon thread per overlapped model runs the updates in
  arrival order. The communication threads only enqueue, so later buckets keep communicating
  while earlier ones are updated. The thread runs at the lowest priority, so that on a busy
  CPU an update takes mostly processor time that communication and backward leave idle,
  instead of slowing the communication it is meant to hide behind. The update of the bucket
  that lands last, which backward waits for, runs at once at normal priority instead, possibly
  while the worker still finishes an earlier bucket: two updates at once always touch disjoint
  parameters, as with :class:`InlineExecutor`, whose callbacks gloo may run concurrently.
- :class:`StreamExecutor` (CUDA default): the update is enqueued on a side stream that waits for the
  bucket's communication; the default stream is joined to the side stream at the end of
  backward, before the next forward can read the parameters.
- :class:`InlineExecutor`: runs the update in the completion callback itself. Simplest; useful for
  debugging and for comparing against the other two.

Every executor returns the future DDP waits on. It completes after the update, with the
communicated bucket as its value, or with the update's exception, which then surfaces from the
user's ``backward()`` call instead of leaving the collective hanging.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.futures import Future

__all__ = [
    "Executor",
    "InlineExecutor",
    "StreamExecutor",
    "ThreadExecutor",
    "lower_priority",
    "make_executor",
    "tensor_of",
]

#: ``update(result, used)``: apply the bucket update; ``used`` is ``None`` or per-parameter flags.
Update = Callable[[Tensor, "Tensor | None"], None]


def tensor_of(value: Any) -> Tensor:
    """The bucket tensor inside a comm-hook future's value (a Tensor or a one-element list)."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], Tensor):
        return value[0]
    raise TypeError(
        "a DDP communication hook must return a Future of a Tensor (or of a one-element list of "
        f"Tensors), got a Future of {type(value).__name__}"
    )


class Executor:
    """Runs ``update`` once ``comm`` (and ``used``, if given) completes; see the module docs."""

    def after(self, comm: Future, used: Future | None, update: Update) -> Future:
        raise NotImplementedError

    def hold(self) -> None:
        """Backward's gradient computation has started: updates may be held back until
        :meth:`release`, so that they do not take CPU time from the computation that the
        remaining buckets' communication is waiting for. A no-op unless overridden."""

    def release(self) -> None:
        """Backward has produced every bucket: held updates may run now."""

    def close(self) -> None:
        """Release the executor's resources (threads); pending updates still finish."""


def _apply(comm: Future, used: Future | None, update: Update) -> Tensor:
    result = tensor_of(comm.value())
    flags = tensor_of(used.value()) if used is not None else None
    with torch.no_grad():
        update(result, flags)
    return result


def _unwrap(done: Future) -> Tensor:
    value = done.value()
    if isinstance(value, Exception):
        raise value
    return value


def _when_done(comm: Future, used: Future | None) -> Future:
    return comm if used is None else torch.futures.collect_all([comm, used])


class InlineExecutor(Executor):
    """Update inside the completion callback, on whichever thread completed the communication."""

    def after(self, comm: Future, used: Future | None, update: Update) -> Future:
        return _when_done(comm, used).then(lambda _: _apply(comm, used, update))


class ThreadExecutor(Executor):
    """Update on a dedicated daemon thread, in the order buckets finish communicating.

    The worker runs at the lowest priority (``background=True``, see :func:`lower_priority`):
    on a saturated CPU an update then takes mostly processor time that backward and the other
    buckets' communication leave idle, rather than slowing the communication it hides behind.

    The update of the bucket whose communication lands last, once backward has produced every
    bucket, is the critical path: nothing is left to hide it behind and backward waits for it.
    It runs at once, at normal priority, on the thread that completed the communication (no
    later collective needs that thread), while the worker may still finish an earlier bucket.

    With ``defer=True`` (the default) updates whose communication lands while backward is
    still computing gradients wait until the last bucket has been handed to communication
    (:meth:`hold` / :meth:`release`): on a CPU that computation is the critical path, since the
    later buckets cannot communicate before it produces them.
    """

    def __init__(
        self, name: str = "overlap-sgd-update", defer: bool = True, background: bool = True
    ):
        self._name = name
        self._defer = defer
        self._background = background
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        #: Updates whose communication has not landed yet.
        self._in_flight = 0
        #: Backward is still producing buckets (between :meth:`hold` and :meth:`release`).
        self._producing = False
        self._held: list[Callable[[], None]] | None = None
        # A new thread starts with OpenMP's default team size, not the one the training
        # process chose (torchrun sets 1 per rank): carry the creator's setting over.
        self._num_threads = torch.get_num_threads()

    def _ensure_started(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                    self._thread.start()
                    _LIVE.add(self)

    def _loop(self) -> None:
        torch.set_num_threads(self._num_threads)
        if self._background:
            lower_priority()
        while True:
            task = self._queue.get()
            if task is None:
                return
            task()

    def after(self, comm: Future, used: Future | None, update: Update) -> Future:
        self._ensure_started()
        # `task` completes `done` with the result or the exception it raised; `then`
        # re-raises the latter, which marks the returned future as failed in C++, so DDP's
        # wait in backward() raises it (Future.set_exception would hand DDP the exception
        # object as if it were the bucket tensor).
        done: Future = Future()

        def task() -> None:
            try:
                done.set_result(_apply(comm, used, update))
            except Exception as exc:
                done.set_result(exc)

        with self._lock:
            self._in_flight += 1
        _when_done(comm, used).add_done_callback(lambda _: self._submit(task))
        return done.then(_unwrap)

    def _submit(self, task: Callable[[], None]) -> None:
        with self._lock:
            self._in_flight -= 1
            if self._held is not None:
                self._held.append(task)
                return
            last = not self._producing and self._in_flight == 0
        if last:
            task()  # the critical path: run it here, now, at normal priority
        else:
            self._queue.put(task)

    def hold(self) -> None:
        self.release()  # anything left from a backward that never finished goes first
        with self._lock:
            self._producing = True
            if self._defer:
                self._held = []

    def release(self) -> None:
        with self._lock:
            self._producing = False
            held, self._held = self._held, None
        for task in held or ():
            self._queue.put(task)

    def close(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is not None and thread.is_alive():
                self._queue.put(None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)  # outside the lock: communication callbacks still submit


#: Executors with a running worker thread, stopped at interpreter exit (see ``_stop_all``).
_LIVE: "weakref.WeakSet[ThreadExecutor]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    # A daemon thread that is still returning from its last update while the interpreter
    # finalises is torn down inside torch's C++ frames, which aborts the process; stop the
    # workers first (a background-priority one may not have been scheduled since).
    for executor in list(_LIVE):
        executor.close()


def lower_priority() -> bool:
    """Put the calling thread in the background: the lowest scheduling priority (nice 19).

    On a saturated CPU it then takes little time from the normal-priority communication and
    computation threads, yet is never starved for long (unlike ``SCHED_IDLE``, which can stall
    a thread that holds the GIL for hundreds of milliseconds on a busy machine). Returns
    whether it worked (Linux applies nice per thread; elsewhere it may be refused, and the
    thread keeps its priority).
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        return True
    except (AttributeError, OSError):
        return False


class StreamExecutor(Executor):
    """Update on a CUDA side stream; the current stream joins it at the end of backward."""

    def __init__(self, device: torch.device):
        self._device = device
        self._stream = torch.cuda.Stream(device=device)
        self._join_queued = False
        self._lock = threading.Lock()

    def _join(self) -> None:
        torch.cuda.current_stream(self._device).wait_stream(self._stream)
        self._join_queued = False

    def _queue_join(self) -> None:
        # Called from the comm hook, on the autograd thread: the callback runs once backward ends.
        with self._lock:
            if not self._join_queued:
                self._join_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._join)

    def after(self, comm: Future, used: Future | None, update: Update) -> Future:
        self._queue_join()
        stream = self._stream

        def on_done(_: Future) -> Tensor:
            # Inside the callback the current stream already waits for the communication.
            stream.wait_stream(torch.cuda.current_stream(self._device))
            with torch.cuda.stream(stream):
                return _apply(comm, used, update)

        return _when_done(comm, used).then(on_done)


def make_executor(kind: str | Executor, device: torch.device) -> Executor:
    """Build the executor named ``kind`` (``"auto"``, ``"thread"``, ``"inline"``, ``"stream"``)."""
    if isinstance(kind, Executor):
        return kind
    if kind == "auto":
        kind = "stream" if device.type == "cuda" else "thread"
    if kind == "thread":
        return ThreadExecutor()
    if kind == "inline":
        return InlineExecutor()
    if kind == "stream":
        if device.type != "cuda":
            raise ValueError(f"executor='stream' needs CUDA parameters, got device {device}")
        return StreamExecutor(device)
    raise ValueError(
        f"executor must be 'auto', 'thread', 'inline', 'stream' or an Executor, got {kind!r}"
    )
