"""Which parameters received a gradient, on any rank, in the iteration being synchronised.

With ``find_unused_parameters=True`` (or ``static_graph=True``) a DDP bucket can hold parameters
that took no part in the forward pass. DDP zero-fills their slots, and a post-backward optimizer
then skips them when no rank used them: their ``.grad`` stays ``None``. A bucket update must do
the same, because stepping with a zero gradient still applies momentum and weight decay.

DDP only learns global usage after every bucket has launched, too late for an update inside the
bucket's hook. So the tracker records local use itself (a gradient hook per parameter) and
reduces a small per-bucket flag vector alongside the bucket. The flags accumulate across
``no_sync()`` micro-steps, as DDP's own used-map does.

A parameter this rank used was used by some rank: only for parameters this rank did not use
does the update need the reduced flags, and only then does it read them (on CUDA, a wait for
that small all-reduce, on a stream that waits for nothing else: see the executors). DDP's own
reducer reads its used-map lazily in the same way.

With ``static_graph=True`` the set of used parameters is the same in every iteration (DDP's
own promise): once a bucket's flags have been reduced, :meth:`UsedTracker.known` hands the
answer out again without any communication.

Example (inside an initialised process group, ``model`` a DDP model's module)::

    tracker = UsedTracker(list(model.parameters()))
    launch = tracker.launch(tracker.slots(bucket.parameters()), device, group)
    launch.local          # this rank's flags, known on the host at once
    launch.future         # the flags, max-reduced over the ranks
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.futures import Future

__all__ = ["UNKNOWN", "UsedLaunch", "UsedTracker"]

#: A bucket plan's static-graph flags before they have been learnt (``BucketPlan.static_used``).
UNKNOWN: object = type("Unknown", (), {"__repr__": lambda self: "UNKNOWN"})()


@dataclass(frozen=True)
class UsedLaunch:
    """One bucket's used flags: this rank's (host) and the reduction over ranks (in flight)."""

    #: Per bucket parameter, 1 if this rank produced a gradient for it.
    local: list[int]
    #: Completes with the flags max-reduced over the ranks (an int32 tensor on the bucket's
    #: device); ``None`` where :attr:`local` already holds them (:meth:`UsedTracker.known`).
    future: Future | None
    #: :attr:`local` holds the flags reduced over the ranks, known without communication.
    known: bool = False

    @property
    def all_local(self) -> bool:
        """Every parameter was used on this rank, so by some rank: no need for :attr:`future`."""
        return all(self.local)

    @property
    def needed(self) -> Future | None:
        """The future an update must wait for before :meth:`resolve`: ``None`` where the host
        knows the answer already (every parameter used here, or the flags known)."""
        return None if self.known or self.all_local else self.future

    def resolve(self, reduced: Tensor | None) -> list[int] | None:
        """The flags over all ranks (``reduced``: :attr:`needed`'s value, on any device), or
        ``None`` when every parameter was used by some rank."""
        if self.known or self.all_local:
            return None if self.all_local else list(self.local)
        assert reduced is not None, "the reduced used flags are needed here"
        flags = reduced.tolist()
        return None if all(flags) else flags


class UsedTracker:
    """Per-parameter used flags for the parameters of one DDP model."""

    def __init__(self, params: Sequence[Tensor]):
        self._slot = {id(p): i for i, p in enumerate(params)}
        self._flags = bytearray(len(params))
        self._handles = [p.register_hook(self._marker(i)) for i, p in enumerate(params)]

    def _marker(self, i: int):
        flags = self._flags

        def mark(grad: Tensor | None) -> None:
            # An undefined gradient (a custom Function returning None for it) is no use: DDP
            # zero-fills the slot and does not count the parameter as used, nor does this.
            if grad is not None:
                flags[i] = 1

        return mark

    def slots(self, params: Sequence[Tensor]) -> list[int]:
        """Tracker slots of ``params``, for :meth:`launch`."""
        return [self._slot[id(p)] for p in params]

    def known(self, slots: Sequence[int], flags: list[int] | None) -> UsedLaunch:
        """The flags of ``slots`` where they are known already (``flags``, or all used for
        ``None``), without communication; the local flags are cleared as :meth:`launch` does."""
        local = self._flags
        for i in slots:
            local[i] = 0
        return UsedLaunch([1] * len(slots) if flags is None else list(flags), None, known=True)

    def launch(
        self, slots: Sequence[int], device: torch.device, group: dist.ProcessGroup | None
    ) -> UsedLaunch:
        """Start reducing (max over ranks) the flags of ``slots``, and clear them locally.

        On CUDA the flags reach the device through pinned memory, without blocking the host
        (the caching host allocator keeps the pinned block until the copy has run).
        """
        flags = self._flags
        local = [flags[i] for i in slots]
        for i in slots:
            flags[i] = 0
        values = torch.tensor(local, dtype=torch.int32)
        if device.type == "cuda":
            values = values.pin_memory().to(device, non_blocking=True)
        elif device.type != "cpu":
            values = values.to(device)
        future = dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group, async_op=True).get_future()
        return UsedLaunch(local, future)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
