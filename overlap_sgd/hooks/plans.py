"""The bucket plans of one overlapped DDP model: built per bucket, rebuilt when DDP regroups.

Example:
    >>> import torch
    >>> from overlap_sgd import FunctionalSGD
    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> book = PlanBook([FunctionalSGD([w], lr=0.1)], {id(w): "w"})
    >>> book.owner(w)
    (0, 0)
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch.distributed as dist
from torch import Tensor

from ..functional import FunctionalOptimizer
from .bucket import BucketPlan
from .used import UsedTracker

__all__ = ["PlanBook"]


class PlanBook:
    """Which optimizer and param group holds each parameter, and one :class:`BucketPlan` per
    DDP bucket index, rebuilt when DDP changes a bucket's parameters.

    Args:
        optimizers: the functional optimizers, over disjoint parameter sets.
        names: ``id(param) -> name`` of every parameter DDP synchronises.
        used: the unused-parameter tracker, if any (plans record their slots in it).
    """

    def __init__(
        self,
        optimizers: Sequence[FunctionalOptimizer],
        names: dict[int, str],
        used: UsedTracker | None = None,
    ):
        self.optimizers = list(optimizers)
        self.names = names
        self.used = used
        #: Bucket index -> plan.
        self.plans: dict[int, BucketPlan] = {}
        #: Count of plans built (DDP's bucket rebuild after iteration one adds some).
        self.built = 0
        self._lock = threading.Lock()

    def owner(self, param: Tensor) -> tuple[int, int] | None:
        """``(optimizer index, param group index)`` holding ``param``, or ``None``."""
        for i, opt in enumerate(self.optimizers):
            gi = opt.group_index(param)
            if gi is not None:
                return i, gi
        return None

    def plan_for(self, bucket: dist.GradBucket) -> BucketPlan:
        """The plan of ``bucket``, built now if its index is new or its parameters changed."""
        index = bucket.index()
        params = bucket.parameters()
        plan = self.plans.get(index)
        if plan is None or not plan.matches(params):
            with self._lock:
                plan = BucketPlan(index, params, bucket.buffer(), self.optimizers, self.owner, self.names)
                if self.used is not None:
                    plan.used_slots = self.used.slots(params)
                self.plans[index] = plan
                self.built += 1
        return plan

    def invalidate(self) -> None:
        """Forget every plan (after param groups changed membership or state was replaced)."""
        with self._lock:
            self.plans.clear()

    def check_new_params(self, params: Sequence[Tensor]) -> None:
        """Raise unless every one of ``params`` is a trainable model parameter no optimizer holds."""
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"param group entries must be Tensors, got {type(p).__name__}")
            name = self.names.get(id(p))
            if name is None:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} is not a trainable parameter of the "
                    "DDP model, so no bucket would ever update it"
                )
            own = self.owner(p)
            if own is not None:
                raise ValueError(f"parameter {name!r} is already held by overlapped optimizer {own[0]}")
