"""Switches that each remove one ordering, to show that the race tests catch its loss.

The race detectors (``tests/races.py``) delay the producer of every collective's result and
scramble the result until it lands, so that an update, copy or read that does not wait for
it reads garbage. A detector is only trusted once it has been seen failing: each switch here
removes one wait, and the tests run the detectors with it on and expect them to fail.

Nothing sets them in training; an empty :data:`ACTIVE` costs one set lookup per bucket.

Example:
    >>> import torch
    >>> from torch.futures import Future
    >>> pending = Future()
    >>> skip(COMM_WAIT, pending, torch.zeros(1)) is pending
    True
"""

from __future__ import annotations

from torch import Tensor
from torch.futures import Future

__all__ = ["ACTIVE", "COMM_WAIT", "GATHER_WAIT", "SHARED_STREAM", "skip"]

#: An update does not wait for its bucket's communication (reduce-scatter, all-reduce, comm hook).
COMM_WAIT = "comm-wait"
#: Sharded: the gathered parameters are copied into place without waiting for the all-gather.
GATHER_WAIT = "gather-wait"

#: CUDA: updates run on the stream that launches the collectives, so that each later
#: collective is queued behind the updates before it (what a pooled update stream that is
#: also NCCL's would do).
SHARED_STREAM = "shared-stream"

#: The switches that are on.
ACTIVE: set[str] = set()


def skip(name: str, future: Future, value: Tensor) -> Future:
    """``future``, or, with switch ``name`` on, a future already completed with ``value`` and
    carrying no CUDA events: whatever waits on it goes ahead at once, on any stream."""
    if name not in ACTIVE:
        return future
    done: Future = Future()
    done.set_result(value)
    return done
