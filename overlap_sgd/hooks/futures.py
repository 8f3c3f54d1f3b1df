"""Futures for work that runs after a bucket's communication lands, correct on CPU and CUDA.

Three facts about ``torch.futures.Future`` decide how the hook hands work on:

- A future's callbacks run on the thread that completes it: gloo's worker threads, the
  autograd thread for NCCL (whose futures complete when the collective is enqueued), or
  whatever thread a custom comm hook completes its future on, possibly much later.
- ``Future.value()`` never synchronises CUDA streams. ``Future.wait()`` on a future created
  with ``devices`` makes the *current* stream wait for the CUDA events recorded when the future
  completed (it does not block the host once the future has completed). A future without
  devices carries no events at all, and ``torch.futures.collect_all`` creates one.
- Completing a future created with ``devices`` records its events on the completing thread's
  *current* stream at that moment. Work enqueued on another stream is covered only if that
  stream was joined first.

DDP waits for every bucket's future at the end of backward (``Reducer::finalize_backward``),
on the stream that was current when ``backward()`` was called, and the next forward runs on
that stream. So the future a hook returns must complete only after the bucket's update was
enqueued, and on CUDA its events must follow the update. :class:`Completion` is that future;
:func:`landed` makes the stream an update runs on wait for the communication it reads; and
:func:`when_all` joins futures on the host without :func:`torch.futures.collect_all`.

Example:
    >>> import torch
    >>> from torch.futures import Future
    >>> from overlap_sgd.hooks.futures import Completion, landed, when_all
    >>> comm, done = Future(), Completion(torch.device("cpu"))
    >>> def update():
    ...     result, _ = landed(comm, None)
    ...     done.set_result(result + 1)
    >>> when_all([comm], update)
    >>> comm.set_result(torch.zeros(2))
    >>> done.future.wait()
    tensor([1., 1.])
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.futures import Future

__all__ = ["BucketFailed", "Completion", "gather", "labelled", "landed", "tensor_of", "when_all"]


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


def labelled(name: str) -> Any:
    """``torch.profiler.record_function(name)`` while a profiler runs, else a no-op context
    (entering and leaving a record_function costs tens of microseconds, per bucket and step)."""
    if torch.autograd.profiler._is_profiler_enabled:
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


def landed(comm: Future, used: Future | None) -> tuple[Tensor, Tensor | None]:
    """The communicated bucket (and used flags) of completed futures, for the current stream.

    Call it on the stream the update will run on: ``wait()`` returns at once for a completed
    future and, where the future carries CUDA events (NCCL, a hook's future created with
    ``devices``), makes the current stream wait for them, so that the update cannot read the
    bucket before the collective wrote it. (Gloo's futures carry none: see the executors.) It
    re-raises a failed communication's error.
    """
    result = tensor_of(comm.wait())
    flags = None if used is None else tensor_of(used.wait())
    return result, flags


def when_all(futures: Sequence[Future], fn: Callable[[], None]) -> None:
    """Call ``fn()`` once, when every one of ``futures`` has completed (with a value or an
    error), on the thread that completed the last of them; at once if all have.

    ``fn`` must not raise: a callback's exception is only logged by torch.
    """
    if not futures:
        fn()
        return
    if len(futures) == 1:
        futures[0].add_done_callback(lambda _: fn())
        return
    remaining = len(futures)
    lock = threading.Lock()

    def one_done(_: Future) -> None:
        nonlocal remaining
        with lock:
            remaining -= 1
            last = remaining == 0
        if last:
            fn()

    for f in futures:
        f.add_done_callback(one_done)


class Completion:
    """The future handed back to DDP for one bucket: completed once, with a value or an error.

    On CUDA it is created with the bucket's device, so :meth:`set_result` records an event on
    the caller's current stream; call it on the stream the update ran on, after the update was
    enqueued, and DDP's wait at the end of backward then orders the caller's stream (and so
    the next forward) after the update. The future DDP waits on is completed directly: a
    ``Future.then`` child on a CUDA future would run its callback on a pooled stream (possibly
    an NCCL stream) made to wait for the update, holding back later collectives.

    An error is raised from the future DDP waits on, so that it surfaces from ``backward()``.
    On CPU it keeps its own type (a ``then`` child, harmless without streams, raises it;
    ``Future.set_exception`` would hand DDP's C++ side the exception object as if it were the
    bucket). On CUDA no such child is used, and DDP raises a ``RuntimeError`` that carries the
    error's type and message; the hook's state keeps the error itself.

    Attributes:
        future: what the comm hook returns to DDP.
    """

    def __init__(self, device: torch.device):
        self._cuda = device.type == "cuda"
        self._inner: Future = Future(devices=[device] if self._cuda else None)
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self.future: Future = self._inner if self._cuda else self._inner.then(self._unwrap)

    def _unwrap(self, inner: Future) -> Any:
        if self._error is not None:
            raise self._error
        return inner.value()

    def set_result(self, value: Tensor) -> None:
        """Complete with ``value``; on CUDA, on the stream that produced it."""
        with self._lock:
            self._inner.set_result(value)

    def set_error(self, exc: BaseException) -> None:
        """Complete with ``exc``, raised to whoever waits on :attr:`future` (unless it has
        completed already: the error came after the value was handed out)."""
        with self._lock:
            if self._inner.done():
                return
            self._error = exc
            if self._cuda:
                failed = BucketFailed(exc)
                try:
                    self._inner.set_exception(failed)
                except Exception:  # noqa: BLE001 - never leave DDP waiting on it
                    if not self._inner.done():
                        self._inner.set_result(str(failed))
            else:
                self._inner.set_result(None)

    @property
    def error(self) -> BaseException | None:
        """The error the future was completed with, if any."""
        return self._error


class BucketFailed(RuntimeError):
    """What a CUDA bucket's future fails with: a message naming the original error (which
    :attr:`Completion.error` holds; it is not kept here, so that the future can hold this)."""

    def __init__(self, cause: BaseException):
        super().__init__(
            f"the overlapped update of a bucket failed with {type(cause).__name__}: {cause}"
        )


def gather(futures: Sequence[Future], value: Tensor, done: Completion | None = None) -> Future:
    """A future that completes with ``value`` once every one of ``futures`` has completed,
    ordered (on CUDA) after each of them, or fails with the first of their errors.

    Unlike :func:`torch.futures.collect_all`, the result carries CUDA events: it is completed
    on a stream that first waited for every one of ``futures``. ``done``: complete this
    :class:`Completion` (made earlier) instead of a new one.
    """
    if done is None:
        done = Completion(value.device)

    def finish() -> None:
        try:
            for f in futures:
                f.wait()
            done.set_result(value)
        except Exception as exc:
            done.set_error(exc)

    when_all(futures, finish)
    return done.future
