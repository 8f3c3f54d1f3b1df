"""Bucket plans: how one DDP bucket maps onto optimizer param groups, resolved once.

DDP hands the comm hook a :class:`torch.distributed.GradBucket` whose parameters may belong to
several optimizers and param groups. A :class:`BucketPlan` splits the bucket into
:class:`Segment` s, one per (optimizer, param group), each updated by one kernel call. Plans are
built the first time a bucket index is seen and rebuilt only when DDP changes the bucket's
parameters (it rebuilds buckets after the first iteration). Gradient views and optimizer state
lists are cached in the plan too, so the per-step cost does not grow with a Python loop over
parameters.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..functional import FunctionalOptimizer
from ..functional.base import dense, divide
from .clip import GradClip
from .used import UNKNOWN
from .norm_clip import GlobalClipper

__all__ = ["BucketPlan", "Owner", "Part", "Segment", "clip_inputs"]

#: ``owner(param) -> (optimizer_index, group_index)`` or ``None`` for a parameter no optimizer holds.
Owner = Callable[[Tensor], "tuple[int, int] | None"]


@dataclass
class Part:
    """A contiguous slice ``[start, stop)`` of a bucket buffer, aligned to parameter boundaries,
    with the segments of the parameters inside it."""

    start: int
    stop: int
    segments: list["Segment"]
    #: Bucket positions of every parameter inside the slice, owned by an optimizer or not.
    positions: list[int] = field(default_factory=list)


@dataclass
class Segment:
    """The parameters of one bucket that share an optimizer and a param group."""

    optimizer: FunctionalOptimizer
    optimizer_index: int
    group_index: int
    positions: list[int]
    params: list[Tensor]
    cache: dict[str, Any] = field(default_factory=lambda: {"fast": True})
    grads: list[Tensor] | None = None


class BucketPlan:
    """The resolved layout of one bucket.

    Args:
        index: the bucket's index.
        params: the bucket's parameters, in bucket order.
        buffer: the bucket buffer (``bucket.buffer()``).
        optimizers: the functional optimizers being overlapped.
        owner: maps a parameter to ``(optimizer_index, group_index)``.
        names: parameter names, for error messages.
    """

    def __init__(
        self,
        index: int,
        params: Sequence[Tensor],
        buffer: Tensor,
        optimizers: Sequence[FunctionalOptimizer],
        owner: Owner,
        names: dict[int, str],
    ):
        self.index = index
        self.params = list(params)
        #: Slots of these parameters in the unused-parameter tracker, when one is active.
        self.used_slots: list[int] = []
        #: With a static graph, the bucket's used flags over all ranks once learnt (``None``:
        #: all used); :data:`~overlap_sgd.hooks.used.UNKNOWN` before.
        self.static_used: Any = UNKNOWN
        self.names = [names.get(id(p), f"<parameter {i} of bucket {index}>") for i, p in enumerate(self.params)]
        self.device = buffer.device
        self.sparse = buffer.is_sparse
        self.numel = buffer.numel() if not self.sparse else 0
        self.element_size = buffer.element_size()
        self.dtype = buffer.dtype
        # Views are built from the first communicated result, with each parameter's own strides
        # as DDP lays them out (``bucket.gradients()`` views are row-major whatever the
        # parameter's layout). A sparse bucket's gradient is the communicated tensor itself.
        self._views: list[Tensor] = []
        self._views_key = None
        self.segments: list[Segment] = []
        self._parts: dict[int, list[Part]] = {}
        self._subsets: dict[tuple[Any, ...], Part] = {}
        self._unowned: dict[tuple[int, int], list[int]] = {}
        self._views_lock = threading.Lock()
        #: :func:`clip_inputs` of fully used buckets, per (views, positions).
        self._clip_inputs: dict[Any, tuple[list[Tensor], list[Tensor]]] = {}
        #: Whether every segment's optimizer can correct a clipped update (see
        #: :meth:`~overlap_sgd.hooks.norm_clip.GlobalClipper.folds`); worked out once.
        self.corrects_clip: bool | None = None
        self._scale: tuple[int, Tensor] | None = None
        self._unit: Tensor | None = None
        by_owner: dict[tuple[int, int], Segment] = {}
        for pos, p in enumerate(self.params):
            own = owner(p)
            if own is None:
                continue
            seg = by_owner.get(own)
            if seg is None:
                seg = by_owner[own] = Segment(optimizers[own[0]], own[0], own[1], [], [])
                self.segments.append(seg)
            seg.positions.append(pos)
            seg.params.append(p)
        #: Every optimizer here divides summed gradients inside its own kernel.
        self.folds_grad_scale = all(seg.optimizer.folds_grad_scale for seg in self.segments)
        #: Every optimizer's ``update`` takes ``found_inf`` (a subclass may override it without).
        self.takes_found_inf = all(_takes(type(seg.optimizer), "found_inf") for seg in self.segments)
        #: Every optimizer's update is element-wise and takes ``keys``: the bucket can be cut
        #: into element ranges for sharded training.
        self.elementwise = all(
            seg.optimizer.elementwise and _takes(type(seg.optimizer), "keys") for seg in self.segments
        )
        if self.sparse:
            for seg in self.segments:
                if not seg.optimizer.supports_sparse:
                    raise RuntimeError(
                        f"{seg.optimizer.torch_optimizer.__name__} does not support sparse "
                        f"gradients, but parameter {self.names[seg.positions[0]]!r} has one"
                    )

    def parts(self, slice_numel: int) -> list[Part]:
        """The bucket cut into slices of about ``slice_numel`` elements at parameter boundaries.

        Built once per slice size. Each part has segments of its own (own state caches), so a
        part's update touches only the parameters inside it.
        """
        cached = self._parts.get(slice_numel)
        if cached is not None:
            return cached
        bounds: list[tuple[int, int, list[int]]] = []
        offset = 0
        for pos, p in enumerate(self.params):
            n = p.numel()
            if not bounds or bounds[-1][1] - bounds[-1][0] >= slice_numel:
                bounds.append((offset, offset, []))
            start, _, positions = bounds[-1]
            positions.append(pos)
            bounds[-1] = (start, offset + n, positions)
            offset += n
        owned = {pos: seg for seg in self.segments for pos in seg.positions}
        parts = []
        for start, stop, positions in bounds:
            segs: dict[int, Segment] = {}
            for pos in positions:
                whole = owned.get(pos)
                if whole is None:
                    continue
                seg = segs.get(id(whole))
                if seg is None:
                    seg = segs[id(whole)] = Segment(
                        whole.optimizer, whole.optimizer_index, whole.group_index, [], []
                    )
                seg.positions.append(pos)
                seg.params.append(self.params[pos])
            parts.append(Part(start, stop, list(segs.values()), positions))
        self._parts[slice_numel] = parts
        return parts

    def subset(self, positions: Sequence[int]) -> Part:
        """A :class:`Part` of the parameters at ``positions`` wherever they sit in the bucket,
        with segments of their own (own state caches), for :meth:`run`. Built once per set."""
        key = ("subset", tuple(sorted(positions)))
        cached = self._subsets.get(key)
        if cached is not None:
            return cached
        chosen = set(positions)
        segments = []
        for whole in self.segments:
            mine = [pos for pos in whole.positions if pos in chosen]
            if mine:
                segments.append(Segment(
                    whole.optimizer, whole.optimizer_index, whole.group_index, mine,
                    [self.params[pos] for pos in mine],
                ))
        part = Part(0, self.numel, segments, sorted(chosen))
        self._subsets[key] = part
        return part

    def matches(self, params: Sequence[Tensor]) -> bool:
        """Whether ``params`` is still this plan's parameter list (same objects, same order)."""
        mine = self.params
        return len(params) == len(mine) and all(a is b for a, b in zip(params, mine))

    def grad_scale(self, world_size: int) -> Tensor:
        """``world_size`` as the 0-dim float32 tensor on the bucket's device that the fused
        kernels take as ``grad_scale`` (made once per plan)."""
        if self._scale is None or self._scale[0] != world_size:
            # A fill on the device, not a copy from the host (which would wait for the device).
            value = torch.full((), float(world_size), dtype=torch.float32, device=self.device)
            self._scale = (world_size, value)
        return self._scale[1]

    @property
    def optimizer_indices(self) -> set[int]:
        return {seg.optimizer_index for seg in self.segments}

    def views(self, result: Tensor) -> list[Tensor]:
        """Per-parameter gradient views into the communicated bucket ``result``."""
        key = _key(result)
        if key is None or key != self._views_key:
            with self._views_lock:  # slices of one bucket may be updated concurrently
                if key is None or key != self._views_key:
                    views = self._views_of(result)
                    for seg in self._all_segments():
                        seg.grads = None
                    self._clip_inputs = {}
                    self._views, self._views_key = views, key
        return self._views

    def _all_segments(self) -> list[Segment]:
        parts = [part for parts in self._parts.values() for part in parts] + list(self._subsets.values())
        return self.segments + [seg for part in parts for seg in part.segments]

    def _views_of(self, result: Tensor) -> list[Tensor]:
        if self.sparse:
            return [result]
        if result.numel() != sum(p.numel() for p in self.params):
            raise RuntimeError(
                f"the communication hook returned {result.numel()} elements for bucket "
                f"{self.index}, which holds {sum(p.numel() for p in self.params)}"
            )
        flat = result.reshape(-1)
        views, offset = [], 0
        for p in self.params:
            n = p.numel()
            if p.is_contiguous() or not dense(p):
                views.append(flat[offset : offset + n].view(p.shape))
            else:  # DDP lays such a gradient out with the parameter's own strides
                views.append(flat.as_strided(p.shape, p.stride(), flat.storage_offset() + offset))
            offset += n
        return views

    def run(
        self,
        result: Tensor,
        used: list[int] | None = None,
        clip: GradClip | None = None,
        part: Part | None = None,
        grad_scale: Tensor | None = None,
        found_inf: Tensor | None = None,
        clipper: GlobalClipper | None = None,
    ) -> None:
        """Update every segment (of ``part``, if given) with the gradients in ``result``.

        ``used`` (from :meth:`unused_flags`; ``None`` when every parameter was used) holds, per
        bucket parameter, whether any rank produced a gradient for it. A parameter nobody used
        keeps post-backward semantics:
        skipped when its ``.grad`` is ``None``, else stepped with that ``.grad``. ``clip``, if
        given, clips each parameter's gradient in place before the update.

        ``grad_scale`` marks ``result`` as a sum still to be averaged (divided by
        ``grad_scale``). Every gradient of the bucket (or part) is divided exactly once, so
        that DDP hands the averaged gradients to ``.grad`` as usual: by the fused kernels that
        fold the division into the update, otherwise before the update; also when the
        update fails.

        ``found_inf`` (a device flag from :meth:`non_finite`) skips every update where it is
        set (see :meth:`~overlap_sgd.functional.base.FunctionalOptimizer.update`).

        ``clipper`` (global-norm clipping) runs or keeps each segment's update
        (:meth:`~overlap_sgd.hooks.norm_clip.GlobalClipper.update`).
        """
        views = self.views(result)
        segments = self.segments if part is None else part.segments
        if grad_scale is not None and (clip is not None or used is not None):
            self.divide(result, grad_scale, part)
            grad_scale = None
        if used is not None:
            self._run_partial(segments, views, used, clip, found_inf, clipper)
            return
        skip = {} if found_inf is None else {"found_inf": found_inf}
        unowned = self.unowned(part) if grad_scale is not None else ()
        if unowned:
            divide([views[i] for i in unowned], grad_scale)
        done = 0
        try:
            for seg in segments:
                grads = seg.grads
                if grads is None:
                    grads = seg.grads = [views[i] for i in seg.positions]
                if clip is not None:
                    clip.apply(grads)
                seg.cache.pop("divided", None)
                if clipper is not None:
                    clipper.update(seg.optimizer, seg.group_index, seg.params, grads, seg.cache,
                                   found_inf=found_inf, grad_scale=grad_scale)
                else:
                    seg.optimizer.update(seg.group_index, seg.params, grads, seg.cache, grad_scale=grad_scale, **skip)
                done += 1
        except BaseException:
            if grad_scale is not None:
                # The failed segment's update may have divided before its kernel failed.
                failed, rest = segments[done:done + 1], segments[done + 1:]
                owed = [seg for seg in failed if not seg.cache.pop("divided", False)] + rest
                for seg in owed:
                    divide([views[i] for i in seg.positions], grad_scale)
            raise

    def hand_out(
        self,
        result: Tensor,
        used: list[int] | None,
        part: Part | None,
        into: list[tuple[Tensor, Tensor]],
    ) -> None:
        """Set each parameter's ``.grad`` (within ``part``, if given) to its view of ``result``.

        ``result`` must hold the averaged gradients. A parameter that ``used`` (as for
        :meth:`run`) marks as used by no rank keeps its ``.grad``, as DDP leaves such a gradient
        untouched. A result of another dtype (a hook that returns a compressed result) is
        handed out as converted copies, as DDP's own copy would convert it. Each
        ``(parameter, view)`` pair is appended to ``into`` before its ``.grad`` is set.
        """
        views = self.views(result)
        convert = result.dtype != self.dtype
        for pos in self.positions(part):
            if used is None or used[pos]:
                p, view = self.params[pos], views[pos]
                if convert:
                    view = view.to(p.dtype)
                into.append((p, view))
                p.grad = view

    def positions(self, part: Part | None = None) -> range | list[int]:
        """Positions of the parameters inside ``part`` (all of them without one)."""
        return range(len(self.params)) if part is None else part.positions

    def divide(self, result: Tensor, grad_scale: Tensor, part: Part | None = None) -> None:
        """Divide the communicated bucket (or ``part`` of it) in place by ``grad_scale``."""
        if part is None:
            result.div_(grad_scale)
        else:
            result.view(-1)[part.start : part.stop].div_(grad_scale)

    def unowned(self, part: Part | None = None) -> list[int]:
        """Positions (within ``part``, if given) of parameters that no optimizer updates."""
        key = (-1, -1) if part is None else (part.start, part.stop)
        cached = self._unowned.get(key)
        if cached is None:
            owned = {pos for seg in (self.segments if part is None else part.segments) for pos in seg.positions}
            lo, hi = (0, self.numel) if part is None else (part.start, part.stop)
            cached, offset = [], 0
            for pos, p in enumerate(self.params):
                if lo <= offset < hi and pos not in owned:
                    cached.append(pos)
                offset += p.numel()
            self._unowned[key] = cached
        return cached

    def _run_partial(
        self,
        segments: list[Segment],
        views: list[Tensor],
        used: list[int],
        clip: GradClip | None,
        found_inf: Tensor | None = None,
        clipper: GlobalClipper | None = None,
    ) -> None:
        for seg in segments:
            params, grads = [], []
            for pos, p in zip(seg.positions, seg.params):
                if used[pos]:
                    params.append(p)
                    grads.append(views[pos])
                elif p.grad is not None:
                    params.append(p)
                    grads.append(p.grad)
            if params:
                if clip is not None:
                    clip.apply(grads)
                if clipper is not None:
                    clipper.update(seg.optimizer, seg.group_index, params, grads, None, found_inf=found_inf)
                    continue
                skip = {} if found_inf is None else {"found_inf": found_inf}
                seg.optimizer.update(seg.group_index, params, grads, None, **skip)

    def owned_positions(self) -> list[int]:
        """Positions of the parameters that an optimizer updates, in bucket order."""
        return sorted(pos for seg in self.segments for pos in seg.positions)

    def check_finite(self, result: Tensor) -> list[str]:
        """Names of the parameters whose gradient in ``result`` holds inf or NaN (read on the
        host: on CUDA, a wait for the device)."""
        views = self.views(result)
        bad: list[str] = []
        for pos in self.owned_positions():
            g = views[pos]
            if g.is_sparse:
                g = g.coalesce().values()
            if not bool(torch.isfinite(g).all()):
                bad.append(self.names[pos])
        return bad

    def non_finite(self, result: Tensor) -> Tensor:
        """A 0-dim float32 flag on the bucket's device, 1 where the gradient in ``result`` of
        some updated parameter holds inf or NaN; computed on the device, never read here."""
        views = self.views(result)
        grads = [views[pos] for pos in self.owned_positions()]
        found = torch.zeros((), dtype=torch.float32, device=self.device)
        if grads:
            # AMP's check: one multi-tensor kernel (it multiplies by 1, leaving values as they are).
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, self._one())
        return found

    def non_finite_flags(self, result: Tensor) -> Tensor:
        """Per bucket parameter, a float32 flag on the device: 1 where its gradient in
        ``result`` holds inf or NaN (computed on the device, never read here)."""
        views = self.views(result)
        if not views:
            return torch.zeros(0, dtype=torch.float32, device=self.device)
        return torch.stack([~torch.isfinite(v).all() for v in views]).to(torch.float32)

    def _one(self) -> Tensor:
        if self._unit is None:
            self._unit = torch.ones((), dtype=torch.float32, device=self.device)
        return self._unit


def _takes(cls: type, argument: str) -> bool:
    """Whether ``cls.update`` accepts the keyword ``argument`` (a subclass may override it without)."""
    params = inspect.signature(cls.update).parameters
    return argument in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _key(t: Tensor) -> tuple[Any, ...] | None:
    if t.is_sparse:
        return None
    return (t.data_ptr(), t.numel(), t.dtype, t.device)


def clip_inputs(plan: BucketPlan, views: list[Tensor], used: list[int] | None, positions: Any) -> tuple[list[Tensor], list[Tensor]]:
    """The (parameter, gradient) pairs of ``plan``'s bucket at ``positions`` that count towards
    the global norm, as ``clip_grad_norm_`` would find them in ``.grad`` after backward: the
    communicated gradient, or, for a parameter no rank used, its ``.grad`` if it has one."""
    if used is None:  # the same lists every step while the bucket's views stay
        key = (plan._views_key, tuple(positions) if not isinstance(positions, range) else (positions.start, positions.stop))
        cached = plan._clip_inputs.get(key)
        if cached is None:
            cached = plan._clip_inputs[key] = (
                [plan.params[pos] for pos in positions], [views[pos] for pos in positions]
            )
        return cached
    params: list[Tensor] = []
    grads: list[Tensor] = []
    for pos in positions:
        p = plan.params[pos]
        if used is None or used[pos]:
            params.append(p)
            grads.append(views[pos])
        elif p.grad is not None:
            params.append(p)
            grads.append(p.grad)
    return params, grads
