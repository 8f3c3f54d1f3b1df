"""What every overlap hook shares, for all buckets of one DDP model: the optimizers and their
bucket plans, where updates run, unused-parameter tracking, the non-finite check, clipping,
step bookkeeping, error hand-off and the ``.grad`` hand-out.

The all-reduce hook (:mod:`overlap_sgd.hooks.update_hook`) and the sharded hook
(:mod:`overlap_sgd.hooks.shard_hook`) each add their communication to this.

Example (inside an initialised process group, ``fopt`` a functional optimizer)::

    state = HookState([fopt], process_group=ddp.process_group, params=list(ddp.parameters()))
    state.begin_backward(state.executor(device))   # at a backward's first bucket
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..functional import FunctionalOptimizer
from .bucket import BucketPlan, Part
from .clip import GradClip
from .errors import ErrorHandoff
from .executor import Executor, make_executor
from .finite import FiniteCheck, NonFiniteGradientError
from .norm_clip import ClipGradNorm, GlobalClipper
from .handout import GradHandout
from .plans import PlanBook
from .steps import StepLedger
from .used import UNKNOWN, UsedLaunch, UsedTracker

__all__ = ["HookState"]


class HookState:
    """The parts every overlap hook needs; see the module docs.

    Args:
        optimizers: functional optimizers over disjoint sets of the model's parameters.
        process_group: the DDP model's process group.
        params: the DDP model's trainable parameters (for unused-parameter tracking).
        names: ``id(param) -> name`` for every trainable parameter DDP synchronises.
        track_unused: track which parameters received gradients (``find_unused_parameters``).
        static_graph: the model is DDP's ``static_graph=True``: the set of used parameters is
            the same every iteration, so each bucket's used flags are communicated only until
            they are known.
        executor: where updates run: ``"auto"``, ``"thread"``, ``"inline"``, ``"stream"`` or an
            :class:`~overlap_sgd.hooks.executor.Executor`.
        check_finite: leave a bucket with inf/NaN gradients untouched and raise
            :class:`~overlap_sgd.hooks.finite.NonFiniteGradientError`: ``True`` (from
            ``backward()``, or on CUDA with ``require_step`` from ``step()``, which costs
            backward no wait for the device), ``"backward"`` or ``"step"``; see
            :mod:`overlap_sgd.hooks.finite`.
        clip: per-parameter gradient clipping applied before each update
            (:class:`~overlap_sgd.hooks.clip.GradClip`).
        require_step: refuse a synchronising backward that follows one whose update no
            ``step()`` acknowledged (:meth:`acknowledge_step`). :func:`overlap_sgd.overlap`
            turns it on, since its ``OverlappedOptimizer.step()`` acknowledges; a hook
            registered by hand has nothing to acknowledge with, so the default is off.
        norm_clip: clip the global gradient norm as ``clip_grad_norm_`` would
            (:class:`~overlap_sgd.hooks.norm_clip.ClipGradNorm`), settled by
            :meth:`settle_clip` in ``step()``.
        grad_views: hand the averaged gradients out as ``.grad`` views into the buckets
            (:mod:`overlap_sgd.hooks.handout`). Only correct together with the DDP reducer's
            optimizer-in-backward mode and :meth:`reclaim_grads` before each forward;
            :func:`overlap_sgd.overlap` sets up all three.
    """

    def __init__(
        self,
        optimizers: Sequence[FunctionalOptimizer],
        *,
        process_group: dist.ProcessGroup | None = None,
        params: Sequence[Tensor] = (),
        names: dict[int, str] | None = None,
        track_unused: bool = False,
        static_graph: bool = False,
        executor: str | Executor = "auto",
        check_finite: bool | str = False,
        clip: GradClip | None = None,
        require_step: bool = False,
        grad_views: bool = False,
        norm_clip: ClipGradNorm | None = None,
    ):
        self.optimizers = list(optimizers)
        self.process_group = process_group
        self.names = dict(names or {})
        self.check_finite = bool(check_finite)
        self.finite: FiniteCheck | None = None
        if check_finite:
            where = "auto" if check_finite is True else check_finite
            self.finite = FiniteCheck(where, deferrable=require_step)
        self.require_step = require_step
        self.clip = clip if clip is not None and clip.active else None
        #: Global-norm clipping (:mod:`overlap_sgd.hooks.norm_clip`), or ``None``.
        self.clipper: GlobalClipper | None = None
        if norm_clip is not None:
            self.clipper = GlobalClipper(
                norm_clip, params, self.optimizers, process_group, force_defer=bool(check_finite)
            )
        self.used = UsedTracker(params) if track_unused else None
        #: DDP's ``static_graph=True``: each bucket's used flags are reduced once, then reused.
        self.static_graph = static_graph
        self.book = PlanBook(self.optimizers, self.names, self.used)
        self.ledger = StepLedger(len(self.optimizers), require_step)
        self.errors = ErrorHandoff()
        self.handout = GradHandout(grad_views)
        self._executor_spec = executor
        self._executor: Executor | None = None
        self._lock = threading.Lock()
        self._world_size: int | None = None
        if params:  # validate now, not at the first bucket inside backward()
            self._executor = make_executor(executor, params[0].device)
        #: The OverlappedOptimizers built on this state, in order (set by ``overlap()``).
        self.wrapped: list[Any] = []

    # -- the parts' figures, under the names the hooks' users read ---------------------------

    @property
    def _plans(self) -> dict[int, BucketPlan]:
        return self.book.plans

    @property
    def plans_built(self) -> int:
        """Count of bucket plans built (DDP's bucket rebuild after iteration one adds some)."""
        return self.book.built

    @property
    def syncs(self) -> int:
        """Count of synchronising backward passes that ran bucket updates."""
        return self.ledger.syncs

    @property
    def awaiting_step(self) -> list[bool]:
        return self.ledger.awaiting

    @property
    def last_error(self) -> Exception | None:
        """The last exception a bucket update raised (also raised from ``backward()``)."""
        return self.errors.last

    @property
    def grad_views(self) -> bool:
        return self.handout.active

    @grad_views.setter
    def grad_views(self, value: bool) -> None:
        self.handout.active = value

    @property
    def world_size(self) -> int:
        if self._world_size is None:
            self._world_size = dist.get_world_size(self.process_group)
        return self._world_size

    # -- plans and executor ------------------------------------------------------------------

    def owner(self, param: Tensor) -> tuple[int, int] | None:
        return self.book.owner(param)

    def plan_for(self, bucket: dist.GradBucket) -> BucketPlan:
        return self.book.plan_for(bucket)

    def invalidate(self) -> None:
        """Forget every bucket plan (after param groups changed membership)."""
        self.book.invalidate()

    def check_new_params(self, params: Sequence[Tensor]) -> None:
        self.book.check_new_params(params)

    def executor(self, device: torch.device) -> Executor:
        if self._executor is None:
            with self._lock:
                if self._executor is None:
                    self._executor = make_executor(self._executor_spec, device)
        return self._executor

    def launch_used(self, plan: BucketPlan) -> UsedLaunch | None:
        """Start reducing ``plan``'s used flags (with unused-parameter tracking); with a static
        graph, once they are known (:meth:`learn_used`), hand them out without communication."""
        if self.used is None:
            return None
        if self.static_graph and plan.static_used is not UNKNOWN:
            return self.used.known(plan.used_slots, plan.static_used)
        return self.used.launch(plan.used_slots, plan.device, self.process_group)

    def resolve_used(self, plan: BucketPlan, launch: UsedLaunch | None, reduced: Tensor | None) -> list[int] | None:
        """``launch``'s flags over all ranks (see :meth:`UsedLaunch.resolve`); with a static
        graph they are kept on ``plan`` for the next iterations."""
        if launch is None:
            return None
        flags = launch.resolve(reduced)
        if self.static_graph and not launch.known:
            plan.static_used = flags
        return flags

    # -- one backward pass -------------------------------------------------------------------

    def start(self, bucket: dist.GradBucket) -> tuple[BucketPlan, Executor]:
        """A hook's first words for ``bucket``: its plan and executor (and, at a backward's
        first bucket, :meth:`begin_backward`)."""
        plan = self.plan_for(bucket)
        executor = self.executor(plan.device)
        if bucket.index() == 0:
            self.begin_backward(executor)
        return plan, executor

    def begin_backward(self, executor: Executor) -> None:
        """Called at a backward's first bucket, on the autograd thread."""
        self.ledger.begin()
        if self.finite is not None:
            self.finite.discard()
        if self.clipper is not None:
            self.clipper.begin()
        self.errors.take()  # left by a backward whose end DDP never reached (it raised first)
        self.errors.at_end_of_backward(self._end_of_backward)
        executor.hold()

    def _end_of_backward(self) -> None:
        self.handout.record_probe(self.book.plans)
        exc = self.errors.take()
        if exc is not None:
            if self.finite is not None:
                self.finite.discard()
            if self.clipper is not None:
                self.clipper.discard()
            self.ledger.forgive()  # the loop will not reach step() for this backward
            raise exc

    def record_error(self, exc: Exception) -> None:
        """Keep the first error of this backward pass (a bucket update failed)."""
        self.errors.record(exc)

    def acknowledge_step(self, optimizer_index: int) -> None:
        """``step()`` of overlapped optimizer ``optimizer_index`` was called for the last
        backward. Raises :class:`NonFiniteGradientError` where that backward left a bucket
        untouched whose verdict stayed on the device (``check_finite`` on CUDA)."""
        self.ledger.acknowledge(optimizer_index)
        if self.finite is not None:
            try:
                self.finite.raise_deferred()
            except NonFiniteGradientError:
                self.ledger.forgive()  # the loop may not reach the other optimizers' step()
                raise

    def settle_clip(self, max_norm: float | None = None) -> Tensor | None:
        """Finish the last backward's global-norm clipping, once (see
        :meth:`~overlap_sgd.hooks.norm_clip.GlobalClipper.settle`); a no-op without it.
        Returns the total gradient norm."""
        if self.clipper is None:
            return None
        if not self.clipper.pending:
            return self.clipper.total_norm
        try:
            return self.clipper.settle(max_norm)
        finally:
            # .grad now holds what clip_grad_norm_ leaves: not a change made by the loop.
            self.handout.record_probe(self.book.plans)

    # -- .grad -------------------------------------------------------------------------------

    def hand_out_grads(self, plan: BucketPlan, result: Tensor, used: list[int] | None, part: Part | None) -> None:
        """With ``grad_views``: make the bucket's averaged gradients the parameters' ``.grad``."""
        self.handout.hand_out(plan, result, used, part)

    def reclaim_grads(self, params: Sequence[Tensor] | None = None, zero: bool = False) -> None:
        """Give each parameter whose ``.grad`` is still a bucket view a tensor of its own
        (before each forward; see :meth:`~overlap_sgd.hooks.handout.GradHandout.reclaim`)."""
        self.handout.reclaim(params, zero)

    def note_zero_grad(self, params: Sequence[Tensor], set_to_none: bool) -> None:
        """The loop zeroed ``params``' gradients (to ``None`` or in place). Nothing to note here."""

    def grads_changed_since_backward(self) -> bool:
        """Whether gradients were modified in place after backward ended."""
        return self.handout.changed_since_backward()

    def close(self) -> None:
        if self.used is not None:
            self.used.remove()
        if self._executor is not None:
            self._executor.close()
