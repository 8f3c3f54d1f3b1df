"""Which parameters received a gradient, on any rank, in the iteration being synchronised.

With ``find_unused_parameters=True`` (or ``static_graph=True``) a DDP bucket can hold parameters
that took no part in the forward pass. DDP zero-fills their slots, and a post-backward optimizer
then skips them when no rank used them: their ``.grad`` stays ``None``. A bucket update must do
the same, because stepping with a zero gradient still applies momentum and weight decay.

DDP only learns global usage after every bucket has launched, too late for an update inside the
bucket's hook. So the tracker records local use itself (a gradient hook per parameter) and
reduces a small per-bucket flag vector alongside the bucket. The flags accumulate across
``no_sync()`` micro-steps, as DDP's own used-map does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.futures import Future

__all__ = ["UsedTracker"]


class UsedTracker:
    """Per-parameter used flags for the parameters of one DDP model."""

    def __init__(self, params: Sequence[Tensor]):
        self._slot = {id(p): i for i, p in enumerate(params)}
        self._flags = bytearray(len(params))
        self._handles = [p.register_hook(self._marker(i)) for i, p in enumerate(params)]

    def _marker(self, i: int):
        flags = self._flags

        def mark(grad: Tensor) -> None:
            flags[i] = 1

        return mark

    def slots(self, params: Sequence[Tensor]) -> list[int]:
        """Tracker slots of ``params``, for :meth:`launch`."""
        return [self._slot[id(p)] for p in params]

    def launch(self, slots: Sequence[int], device: torch.device, group: dist.ProcessGroup | None) -> Future:
        """Reduce (max over ranks) the flags of ``slots`` and clear them locally."""
        flags = self._flags
        local = torch.tensor([flags[i] for i in slots], dtype=torch.int32, device=device)
        for i in slots:
            flags[i] = 0
        return dist.all_reduce(local, op=dist.ReduceOp.MAX, group=group, async_op=True).get_future()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
