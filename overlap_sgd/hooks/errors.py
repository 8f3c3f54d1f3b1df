"""Errors of bucket updates, raised from ``backward()`` once DDP has finished the pass.

An update runs on a worker thread or in a communication callback, where raising would leave
the collective hanging or DDP's reducer half-finalised. So an update's exception is kept, the
bucket's future still completes, and the first exception of the pass is raised, with its own
type, from a callback the autograd engine runs at the end of ``backward()``, after DDP's own.

Example:
    >>> errors = ErrorHandoff()
    >>> errors.record(ValueError("bad bucket"))
    >>> errors.take()
    ValueError('bad bucket')
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

__all__ = ["ErrorHandoff"]


class ErrorHandoff:
    """The first update error of the running backward pass, and the last one ever seen."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.pending: Exception | None = None
        #: The last exception a bucket update raised (also raised from ``backward()``).
        self.last: Exception | None = None

    def record(self, exc: Exception) -> None:
        """Keep ``exc`` if it is the first error of this backward pass."""
        with self._lock:
            if self.pending is None:
                self.pending = exc
            self.last = exc

    def take(self) -> Exception | None:
        """The pending error, now forgotten."""
        with self._lock:
            exc, self.pending = self.pending, None
        return exc

    @staticmethod
    def at_end_of_backward(check: Callable[[], None]) -> None:
        """Run ``check`` at the end of the running ``backward()``, after DDP's own callback.

        Call it from the comm hook at a backward's first bucket, on the autograd thread. DDP
        queues its end-of-backward callback when the last bucket is ready, after this one: so
        this queues a callback that queues ``check`` behind DDP's. Raising before DDP's
        callback would leave its reducer half-finalised; DDP's callback waits for every
        bucket's future, each of which completes after its bucket's update.
        """
        engine = torch.autograd.Variable._execution_engine
        engine.queue_callback(lambda: engine.queue_callback(check))
