"""Where a bucket's update runs once its communication has landed, and what that orders.

A callback attached to a communication future runs on the thread that completes it: for gloo
the worker thread which also runs the next bucket's collective; for NCCL the autograd thread,
when the collective is enqueued; for a custom comm hook, whichever thread completes its
future, possibly much later. Three executors:

- :class:`ThreadExecutor` (CPU default): one daemon thread per overlapped model runs the
  updates in arrival order. The communication threads only enqueue, so later buckets keep
  communicating while earlier ones are updated. The thread runs at the lowest priority, so
  that on a busy CPU an update takes mostly processor time that communication and backward
  leave idle. The update of the bucket that lands last, which backward waits for, runs at once
  at normal priority instead, possibly while the worker still finishes an earlier bucket: two
  updates at once always touch disjoint parameters, as with :class:`InlineExecutor`, whose
  callbacks gloo may run concurrently. CPU parameters only.
- :class:`StreamExecutor` (CUDA default): the update is enqueued on a side CUDA stream from
  the completion callback (on the autograd thread for NCCL), so that it runs on the device
  while later buckets' gradients are computed and communicated.
- :class:`InlineExecutor`: runs the update in the completion callback itself, on the stream
  current there. Simplest; useful for debugging and for comparing against the other two.

The ordering contract, the same for every executor and every comm hook:

(a) **When an update may read its bucket.** Only once the host has seen the communication
    future (and, with unused-parameter tracking, the used-flags future) complete, and, on
    CUDA, on a stream that first waited for the events those futures carry
    (:func:`~overlap_sgd.hooks.futures.landed`: ``Future.wait()``, which orders the stream
    without blocking the host), for the work the comm hook enqueued on the autograd stream
    before returning, and for the stream current on the thread that completed the future
    (gloo's futures carry no CUDA events: gloo copies a CUDA result back on a stream of its own
    and makes the completing thread's current stream wait for that copy). A comm hook whose future carries no CUDA events must therefore produce
    its result on the stream that was current when it was called, as DDP requires anyway.
(b) **What the returned future and the end of backward cover.** The future handed back to
    DDP completes only after the update has run (CPU) or has been enqueued (CUDA); on CUDA it
    is completed on the update's stream, so its events follow the update. DDP waits on every
    bucket's future at the end of ``backward()``, on the stream that called ``backward()``:
    from then on that stream (the next forward, ``.grad`` readers, ``optimizer.step()`` hooks)
    is ordered after every update, however late the comm hook's future completed
    (``static_graph``'s first iteration, a comm hook that completes on another thread, gloo on
    CUDA tensors). The host may leave ``backward()`` before the device has run the updates,
    as with any CUDA work.

The future completes with the communicated bucket, or with the update's or the
communication's exception, which then surfaces from the user's ``backward()`` call instead of
leaving the collective hanging.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import threading
import weakref
from collections.abc import Callable

import torch
from torch import Tensor
from torch.futures import Future

from . import faults
from .futures import Completion, landed, tensor_of, when_all
from .streams import private_stream

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

    def place(self, device: torch.device) -> None:
        """Called by :func:`make_executor` with the parameters' device before any update:
        raise ``ValueError`` if this executor cannot run updates there."""


def _launched(device: torch.device) -> "torch.cuda.Event | None":
    """On CUDA, an event after the work the comm hook enqueued on the current (autograd)
    stream before returning: what a future without CUDA events leaves unordered."""
    if device.type != "cuda":
        return None
    return torch.cuda.current_stream(device).record_event()


def _run(
    comm: Future,
    used: Future | None,
    update: Update,
    done: Completion,
    device: torch.device,
    stream: "torch.cuda.Stream | None" = None,
    launched: "torch.cuda.Event | None" = None,
    flag_stream: "torch.cuda.Stream | None" = None,
) -> None:
    """Run ``update`` on ``stream`` (default: the current stream of ``device``), then complete
    ``done`` on that stream, so that on CUDA ``done``'s events follow the update. Never raises.

    ``flag_stream``: where the used flags (``used``) are read on the host, on CUDA: a stream
    that waits only for their collective. Read on ``stream`` they would wait for every update
    queued there before this one."""
    try:
        # The stream current where the communication completed: for a future without CUDA
        # events (gloo on CUDA tensors, which copies its result back and then makes the
        # completing thread's stream wait for the copy) this is what orders the result.
        joined = torch.cuda.current_stream(device).record_event() if stream is not None else None
        host_flags = None
        if used is not None and flag_stream is not None:
            with torch.cuda.stream(flag_stream):
                if joined is not None:
                    flag_stream.wait_event(joined)
                # wait(): this stream waits for the flags' collective; cpu() then waits for
                # this stream alone, a few bytes behind that collective.
                host_flags = tensor_of(used.wait()).cpu()
            used = None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            if launched is not None:
                torch.cuda.current_stream(device).wait_event(launched)
            if joined is not None:
                torch.cuda.current_stream(device).wait_event(joined)
            result, flags = landed(comm, used)
            if host_flags is not None:
                flags = host_flags
            if stream is not None:
                # The update reads the result on this stream: its memory must not be reused
                # before the update has run, whichever stream allocated it.
                for t in (result._indices(), result._values()) if result.is_sparse else (result,):
                    t.record_stream(stream)
            with torch.no_grad():
                update(result, flags)
            done.set_result(result)
    except Exception as exc:
        done.set_error(exc)


def _futures(comm: Future, used: Future | None) -> list[Future]:
    return [comm] if used is None else [comm, used]


class InlineExecutor(Executor):
    """Update inside the completion callback, on whichever thread completed the communication,
    on the stream current there (for a future with CUDA events, a stream torch takes from its
    pool for the callback), after waiting for the communication (see the module docs).

    Args:
        device: the parameters' device; ``None`` takes it from :meth:`place`.
    """

    def __init__(self, device: torch.device | str | None = None):
        self._device = None if device is None else torch.device(device)

    def place(self, device: torch.device) -> None:
        if self._device is None:
            self._device = device
        elif self._device != device:
            raise ValueError(f"this InlineExecutor was made for {self._device}, not {device}")

    def after(self, comm: Future, used: Future | None, update: Update) -> Future:
        if self._device is None:
            raise RuntimeError("InlineExecutor.place(device) must be called before after()")
        done = Completion(self._device)
        launched = _launched(self._device)
        when_all(_futures(comm, used), lambda: _run(comm, used, update, done, self._device, None, launched))
        return done.future


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

    CPU parameters only: on CUDA the host thread would only enqueue the update, which the
    :class:`StreamExecutor` does without a hand-off (:func:`make_executor` refuses it there).
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

    def place(self, device: torch.device) -> None:
        if device.type != "cpu":
            raise ValueError(
                f"executor='thread' runs updates on a CPU worker thread and cannot order them "
                f"with CUDA streams; parameters are on {device}: use executor='stream' (the "
                "default there) or 'inline'"
            )

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
        done = Completion(torch.device("cpu"))

        def task() -> None:
            _run(comm, used, update, done, torch.device("cpu"))

        with self._lock:
            self._in_flight += 1
        when_all(_futures(comm, used), lambda: self._submit(task))
        return done.future

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
    """Update on a CUDA side stream, enqueued from the completion callback.

    The side stream waits for the communication (and the comm hook's own work on the
    autograd stream) before the update, and the future handed back to DDP is completed on
    it afterwards, so DDP's wait at the end of backward joins the caller's stream to every
    update (see the module docs). Updates of different buckets run in the order their
    communication lands, one after another on the one side stream.

    The side stream is the executor's own (:func:`~overlap_sgd.hooks.streams.private_stream`),
    never one of the pooled streams that NCCL communicates on, so no collective is ever queued
    behind an update.
    """

    def __init__(self, device: torch.device | str):
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"executor='stream' needs CUDA parameters, got device {device}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self._device = device
        # Not torch.cuda.Stream(): that pool also hands out NCCL's streams (see .streams).
        self._stream = private_stream(self._device)
        self._flag_stream: "torch.cuda.Stream | None" = None

    def place(self, device: torch.device) -> None:
        if device != self._device:
            raise ValueError(f"this StreamExecutor was made for {self._device}, not {device}")

    @property
    def stream(self) -> "torch.cuda.Stream":
        """The side stream the updates run on."""
        return self._stream

    def after(self, comm: Future, used: Future | None, update: Update) -> Future:
        done = Completion(self._device)
        launched = _launched(self._device)
        flag_stream = None
        if used is not None:
            if self._flag_stream is None:
                self._flag_stream = private_stream(self._device)
            flag_stream = self._flag_stream
        stream = self._stream
        if faults.SHARED_STREAM in faults.ACTIVE:
            stream = torch.cuda.current_stream(self._device)
        when_all(
            _futures(comm, used),
            lambda: _run(comm, used, update, done, self._device, stream, launched, flag_stream),
        )
        return done.future


def make_executor(kind: str | Executor, device: torch.device) -> Executor:
    """The executor named ``kind`` (``"auto"``, ``"thread"``, ``"inline"``, ``"stream"``), or
    the :class:`Executor` instance ``kind``, placed on ``device`` (the parameters' device).

    Raises:
        ValueError: an unknown name, or an executor that cannot run updates on ``device``
            (``"thread"`` on CUDA, ``"stream"`` off CUDA).

    Example:
        >>> import torch
        >>> type(make_executor("auto", torch.device("cpu"))).__name__
        'ThreadExecutor'
    """
    device = torch.device(device)
    if isinstance(kind, Executor):
        executor = kind
    elif kind == "auto":
        executor = StreamExecutor(device) if device.type == "cuda" else ThreadExecutor()
    elif kind == "thread":
        executor = ThreadExecutor()
    elif kind == "inline":
        executor = InlineExecutor()
    elif kind == "stream":
        executor = StreamExecutor(device)
    else:
        raise ValueError(
            f"executor must be 'auto', 'thread', 'inline', 'stream' or an Executor, got {kind!r}"
        )
    executor.place(device)
    return executor
