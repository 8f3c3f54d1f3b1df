"""``.grad`` after backward: bucket views handed out by the hook, and late in-place changes.

With ``grad_views`` the hook points every parameter's ``.grad`` at its averaged gradient inside
the communicated bucket after the bucket's update, instead of DDP copying the bucket into
``.grad`` (DDP's optimizer-in-backward mode skips that copy). Before the next forward, any
``.grad`` still aliasing a bucket gets a tensor of its own (:meth:`GradHandout.reclaim`): the
next backward reuses the buckets, and DDP refuses a ``.grad`` that aliases one.

Independently, one updated parameter's gradient is watched (:meth:`GradHandout.record_probe`),
so that ``step()`` can tell when gradients were modified in place after backward
(``clip_grad_norm_``), too late for the updates that already ran.

Example:
    >>> handout = GradHandout(active=False)
    >>> handout.changed_since_backward()
    False
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .bucket import BucketPlan, Part

__all__ = ["GradHandout"]


class GradHandout:
    """The ``.grad`` tensors handed out as bucket views, and the probe of late changes.

    Args:
        active: hand out bucket views (``grad_views``).
    """

    def __init__(self, active: bool = False):
        self.active = active
        # (bucket, slice start) -> the (parameter, bucket view) pairs handed out as ``.grad``.
        self._handed: dict[tuple[int, int], list[tuple[Tensor, Tensor]]] = {}
        self._probe: Tensor | None = None
        self._probe_version: tuple[int, int] | None = None

    def hand_out(self, plan: BucketPlan, result: Tensor, used: list[int] | None, part: Part | None) -> None:
        """Make the bucket's averaged gradients in ``result`` the parameters' ``.grad``
        (parameters no rank used keep theirs, as DDP leaves them). A no-op unless active."""
        if not self.active or plan.sparse:
            return
        pairs: list[tuple[Tensor, Tensor]] = []
        self._handed[(plan.index, -1 if part is None else part.start)] = pairs
        plan.hand_out(result, used, part, pairs)

    def keep(self, key: tuple[int, int], pairs: list[tuple[Tensor, Tensor]]) -> None:
        """Record ``(parameter, view)`` pairs handed out as ``.grad`` by someone else (the
        sharded hook), to be reclaimed like :meth:`hand_out`'s."""
        self._handed[key] = pairs

    def reclaim(self, params: Sequence[Tensor] | None = None, zero: bool = False) -> None:
        """Give each parameter whose ``.grad`` is still a bucket view a tensor of its own.

        Args:
            params: only these parameters (default: all).
            zero: give them zeros instead of a copy (for ``zero_grad(set_to_none=False)``).
        """
        if not self._handed:
            return
        only = None if params is None else {id(p) for p in params}
        probe_unchanged = self._probe_version is not None and not self.changed_since_backward()
        kept: dict[tuple[int, int], list[tuple[Tensor, Tensor]]] = {}
        for key, pairs in self._handed.items():
            rest = []
            for p, view in pairs:
                if only is not None and id(p) not in only:
                    rest.append((p, view))
                elif p.grad is view:
                    p.grad = torch.zeros_like(view) if zero else view.clone()
            if rest:
                kept[key] = rest
        self._handed = kept
        if probe_unchanged:
            self._remember(self._probe)  # a tensor of its own is not an in-place change

    def record_probe(self, plans: dict[int, BucketPlan]) -> None:
        """At the end of backward: remember one updated parameter's gradient as it is now."""
        if self._probe is None:
            handed = [p for pairs in self._handed.values() for p, _ in pairs[:1]]
            plan = plans.get(0)
            segments = plan.segments if plan is not None else []
            self._probe = handed[0] if handed else (segments[0].params[0] if segments else None)
        self._remember(self._probe)

    def _remember(self, probe: Tensor | None) -> None:
        grad = probe.grad if probe is not None else None
        self._probe_version = None if grad is None else (id(grad), grad._version)

    def changed_since_backward(self) -> bool:
        """Whether gradients were modified in place after backward ended (``clip_grad_norm_``,
        ``GradScaler.unscale_``, ...): too late to affect the updates, which already ran.

        Watches one parameter's gradient: whole-model gradient transforms touch every one.
        """
        if self._probe is None or self._probe_version is None:
            return False
        grad = self._probe.grad
        return grad is not None and (id(grad), grad._version) != self._probe_version
