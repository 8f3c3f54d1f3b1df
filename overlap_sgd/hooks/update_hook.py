"""The overlap comm hook: communicate a bucket with any DDP hook, then update its parameters.

:func:`make_overlap_hook` returns ``(hook, state)`` for ``ddp_model.register_comm_hook(state,
hook)``. The hook runs an inner communication hook (by default an averaged all-reduce; any DDP
comm hook composes: fp16/bf16 compression, PowerSGD, a user's own), then, as soon as that
bucket's future completes, updates exactly that bucket's parameters with one kernel call per
(optimizer, param group), while later buckets are still communicating.

Example (inside an initialised process group)::

    hook, state = make_overlap_hook([FunctionalSGD.bind(opt)], process_group=ddp.process_group)
    ddp.register_comm_hook(state, hook)

Most users call :func:`overlap_sgd.overlap` instead, which validates its input and wraps the
optimizer so that the training loop stays unchanged.
"""

# No "from __future__ import annotations": DDP checks the hook's annotations at runtime.

import threading
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from ..functional import FunctionalOptimizer
from .bucket import BucketPlan, Part
from .clip import GradClip
from .executor import Executor, make_executor
from .finite import FiniteCheck, NonFiniteGradientError
from .futures import gather
from .used import UsedLaunch, UsedTracker

__all__ = [
    "NonFiniteGradientError",
    "OverlapHookState",
    "make_overlap_hook",
    "overlap_hook",
]

CommHook = Callable[[Any, dist.GradBucket], torch.futures.Future]

#: ``slice_mb="auto"`` cuts a CPU bucket into equal slices of at least this many MiB.
AUTO_MIN_SLICE_MB = 12.0

_PROCESS_GROUP_HOOKS = (
    default_hooks.allreduce_hook,
    default_hooks.fp16_compress_hook,
    default_hooks.bf16_compress_hook,
)


class OverlapHookState:
    """Everything the overlap hook needs, shared by all buckets of one DDP model.

    Args:
        optimizers: functional optimizers over disjoint sets of the model's parameters.
        comm_hook: the inner DDP communication hook; ``None`` means an averaged all-reduce.
        comm_state: the inner hook's state. ``None`` with a torch default hook (all-reduce,
            fp16/bf16 compression) means ``process_group``.
        process_group: the DDP model's process group.
        params: the DDP model's trainable parameters (for unused-parameter tracking).
        names: ``id(param) -> name`` for every trainable parameter DDP synchronises.
        track_unused: track which parameters received gradients (``find_unused_parameters``).
        executor: where updates run: ``"auto"``, ``"thread"``, ``"inline"``, ``"stream"`` or an
            :class:`~overlap_sgd.hooks.executor.Executor`.
        check_finite: leave a bucket with inf/NaN gradients untouched and raise
            :class:`NonFiniteGradientError`: ``True`` (from ``backward()``, or on CUDA with
            ``require_step`` from ``step()``, which costs backward no wait for the device),
            ``"backward"`` or ``"step"``; see :mod:`overlap_sgd.hooks.finite`.
        clip: per-parameter gradient clipping applied before each update
            (:class:`~overlap_sgd.hooks.clip.GradClip`).
        slice_mb: with the default all-reduce, communicate each bucket in slices of about this
            many MiB (cut at parameter boundaries) and update each slice as soon as it lands,
            so that only the last slice's update is left after communication. ``"auto"``:
            a CPU bucket of at least twice :data:`AUTO_MIN_SLICE_MB` is cut into equal slices
            of at least that size (DDP's default 25 MiB buckets in two); whole buckets
            elsewhere. ``None`` (or with a custom ``comm_hook``, or ``check_finite``)
            communicates whole buckets.
        require_step: refuse a synchronising backward that follows one whose update no
            ``step()`` acknowledged (:meth:`acknowledge_step`). :func:`overlap_sgd.overlap`
            turns it on, since its ``OverlappedOptimizer.step()`` acknowledges; a hook
            registered by hand has nothing to acknowledge with, so the default is off.
        grad_views: after each bucket's update, point every parameter's ``.grad`` at its
            averaged gradient inside the communicated bucket instead of leaving DDP to copy
            the bucket into ``.grad``. Only correct together with the DDP reducer's
            optimizer-in-backward mode (which skips that copy) and :meth:`reclaim_grads`
            before each forward; :func:`overlap_sgd.overlap` sets up all three.
    """

    def __init__(
        self,
        optimizers: Sequence[FunctionalOptimizer],
        comm_hook: Optional[CommHook] = None,
        comm_state: Any = None,
        *,
        process_group: Optional[dist.ProcessGroup] = None,
        params: Sequence[Tensor] = (),
        names: Optional[dict[int, str]] = None,
        track_unused: bool = False,
        executor: "str | Executor" = "auto",
        check_finite: "bool | str" = False,
        clip: Optional[GradClip] = None,
        require_step: bool = False,
        slice_mb: "float | str | None" = None,
        grad_views: bool = False,
    ):
        if comm_hook is None:
            comm_hook = default_hooks.allreduce_hook
        if not callable(comm_hook):
            raise TypeError(f"comm_hook must be a DDP communication hook, got {comm_hook!r}")
        if comm_state is None and comm_hook in _PROCESS_GROUP_HOOKS:
            comm_state = process_group
        self.optimizers = list(optimizers)
        self.comm_hook = comm_hook
        self.comm_state = comm_state
        self.process_group = process_group
        self.names = dict(names or {})
        self.check_finite = bool(check_finite)
        self.finite: Optional[FiniteCheck] = None
        if check_finite:
            where = "auto" if check_finite is True else check_finite
            self.finite = FiniteCheck(where, deferrable=require_step)
        self.require_step = require_step
        self.slice_mb = slice_mb
        self.grad_views = grad_views
        # (bucket, slice start) -> the (parameter, bucket view) pairs handed out as ``.grad``.
        self._handed: dict[tuple[int, int], list[tuple[Tensor, Tensor]]] = {}
        self._owns_comm = comm_hook is default_hooks.allreduce_hook
        self._world_size: Optional[int] = None
        self.clip = clip if clip is not None and clip.active else None
        self.used = UsedTracker(params) if track_unused else None
        self._executor_spec = executor
        self._executor: Optional[Executor] = None
        if params:  # validate now, not at the first bucket inside backward()
            self._executor = make_executor(executor, params[0].device)
        self._plans: dict[int, BucketPlan] = {}
        self._lock = threading.Lock()
        #: Per optimizer: an update happened that its ``step()`` has not acknowledged yet.
        self.awaiting_step = [False] * len(self.optimizers)
        #: Count of synchronising backward passes that ran bucket updates.
        self.syncs = 0
        #: Count of bucket plans built (DDP's bucket rebuild after iteration one adds some).
        self.plans_built = 0
        #: The last exception a bucket update raised (also raised from ``backward()``).
        self.last_error: Optional[Exception] = None
        self.pending_error: Optional[Exception] = None
        self._probe: Optional[Tensor] = None
        self._probe_version: Optional[tuple[int, int]] = None
        #: The OverlappedOptimizers built on this state, in order (set by ``overlap()``).
        self.wrapped: list[Any] = []

    # -- layout ------------------------------------------------------------------------------

    def owner(self, param: Tensor) -> "tuple[int, int] | None":
        for i, opt in enumerate(self.optimizers):
            gi = opt.group_index(param)
            if gi is not None:
                return i, gi
        return None

    def plan_for(self, bucket: dist.GradBucket) -> BucketPlan:
        index = bucket.index()
        params = bucket.parameters()
        plan = self._plans.get(index)
        if plan is None or not plan.matches(params):
            with self._lock:
                plan = BucketPlan(
                    index, params, bucket.buffer(),
                    self.optimizers, self.owner, self.names,
                )
                if self.used is not None:
                    plan.used_slots = self.used.slots(params)
                self._plans[index] = plan
                self.plans_built += 1
        return plan

    def slice_numel(self, plan: BucketPlan) -> int:
        """Elements per communication slice for ``plan``'s bucket, or 0 for one all-reduce.

        Slicing needs the communication to be this hook's own averaged all-reduce (a user's
        hook works on whole buckets), a dense bucket, and ``check_finite`` off (its unit is
        the whole bucket). A bucket no larger than one slice is not cut.
        """
        mb = self.slice_mb
        if not mb or not self._owns_comm or plan.sparse or self.check_finite:
            return 0
        if mb == "auto":
            if plan.device.type != "cpu":
                return 0
            # Each extra all-reduce costs a little; two slices already halve the update left
            # after the last one lands, so slices stay large.
            pieces = plan.numel * plan.element_size // int(AUTO_MIN_SLICE_MB * 2**20)
            return -(-plan.numel // pieces) if pieces >= 2 else 0
        numel = max(1, int(mb * 2**20) // plan.element_size)
        return numel if plan.numel > numel else 0

    def sums(self, plan: BucketPlan) -> bool:
        """Whether ``plan``'s bucket is summed by this hook's own all-reduce and averaged in
        the update: the default communication, a dense bucket that is not float16 (whose
        narrow range a sum could overflow), and optimizers that fold the division into their
        kernel. Others average before the all-reduce, as DDP does."""
        return (
            self._owns_comm and not plan.sparse and plan.folds_grad_scale
            and plan.dtype != torch.float16
        )

    def grad_scale(self, plan: BucketPlan) -> Tensor:
        """The world size as the tensor the update divides summed gradients by."""
        if self._world_size is None:
            self._world_size = dist.get_world_size(self.process_group)
        return plan.grad_scale(self._world_size)

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
                raise ValueError(
                    f"parameter {name!r} is already held by overlapped optimizer {own[0]}"
                )

    def invalidate(self) -> None:
        """Forget every bucket plan (after param groups changed membership)."""
        with self._lock:
            self._plans.clear()

    def executor(self, device: torch.device) -> Executor:
        if self._executor is None:
            with self._lock:
                if self._executor is None:
                    self._executor = make_executor(self._executor_spec, device)
        return self._executor

    # -- step bookkeeping --------------------------------------------------------------------

    def begin_sync(self) -> None:
        """Called at a backward's first bucket: refuse to update twice without a ``step()``."""
        late = [i for i, waiting in enumerate(self.awaiting_step) if waiting]
        if late and self.require_step:
            raise RuntimeError(
                "a second synchronising backward() ran before optimizer.step() was called for "
                f"overlapped optimizer(s) {late}: the previous backward already updated the "
                "parameters. Call step() once per synchronising backward, and use "
                "ddp_model.no_sync() for gradient-accumulation micro-steps."
            )
        self.awaiting_step = [True] * len(self.optimizers)
        self.syncs += 1
        if self.finite is not None:
            self.finite.discard()

    def record_error(self, exc: Exception) -> None:
        """Keep the first error of this backward pass (a bucket update failed)."""
        with self._lock:
            if self.pending_error is None:
                self.pending_error = exc
            self.last_error = exc

    def raise_errors_after_backward(self) -> None:
        """Queue the check that raises a bucket update's error at the end of ``backward()``.

        Called from the comm hook at a backward's first bucket, on the autograd thread.
        """
        torch.autograd.Variable._execution_engine.queue_callback(self._after_backward)

    def _after_backward(self) -> None:
        # Raise from a callback queued now, which runs after DDP's own end-of-backward
        # callback: raising before it would leave DDP's reducer half-finalised. DDP's callback
        # waits for every bucket's future, and each completes only after its bucket's update,
        # so no update is still running then. (Waiting here instead would hold up DDP, which
        # copies each bucket's gradients out as soon as that bucket is done.)
        torch.autograd.Variable._execution_engine.queue_callback(self._raise_pending)

    def _raise_pending(self) -> None:
        self._record_probe()
        exc, self.pending_error = self.pending_error, None
        if exc is not None:
            if self.finite is not None:
                self.finite.discard()
            # The loop will not reach step() for this backward: do not demand one.
            self.awaiting_step = [False] * len(self.optimizers)
            raise exc

    def acknowledge_step(self, optimizer_index: int) -> None:
        """``step()`` of overlapped optimizer ``optimizer_index`` was called for the last
        backward. Raises :class:`NonFiniteGradientError` where that backward left a bucket
        untouched whose verdict stayed on the device (``check_finite`` on CUDA)."""
        self.awaiting_step[optimizer_index] = False
        if self.finite is not None:
            try:
                self.finite.raise_deferred()
            except NonFiniteGradientError:
                # The loop may not reach the other optimizers' step() for this backward.
                self.awaiting_step = [False] * len(self.optimizers)
                raise

    def _record_probe(self) -> None:
        """Remember the version of one updated parameter's gradient as backward left it."""
        probe = self._probe
        if probe is None:
            plan = self._plans.get(0)
            segments = plan.segments if plan is not None else []
            probe = self._probe = segments[0].params[0] if segments else None
        grad = probe.grad if probe is not None else None
        self._probe_version = None if grad is None else (id(grad), grad._version)

    def hand_out_grads(
        self, plan: BucketPlan, result: Tensor, used: Optional[list[int]], part: Optional[Part]
    ) -> None:
        """With ``grad_views``: make the bucket's averaged gradients in ``result`` the
        parameters' ``.grad`` (parameters no rank used keep theirs, as DDP leaves them)."""
        if not self.grad_views or plan.sparse:
            return
        pairs: list[tuple[Tensor, Tensor]] = []
        self._handed[(plan.index, -1 if part is None else part.start)] = pairs
        plan.hand_out(result, used, part, pairs)

    def reclaim_grads(self, params: Optional[Sequence[Tensor]] = None, zero: bool = False) -> None:
        """Give each parameter whose ``.grad`` is still a bucket view a tensor of its own.

        Runs before each forward of the model (a forward pre-hook that :func:`overlap` adds):
        the next backward reuses the buckets, and DDP refuses a ``.grad`` that aliases one.
        With ``zero_grad()`` setting gradients to ``None`` there is nothing to do.

        Args:
            params: only these parameters (default: all).
            zero: give them zeros instead of a copy (for ``zero_grad(set_to_none=False)``).
        """
        if not self._handed:
            return
        only = None if params is None else {id(p) for p in params}
        probe_unchanged = self._probe_version is not None and not self.grads_changed_since_backward()
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
            self._record_probe()  # a tensor of its own is not an in-place change of the gradients

    def grads_changed_since_backward(self) -> bool:
        """Whether gradients were modified in place after backward ended (``clip_grad_norm_``,
        ``GradScaler.unscale_``, ...): too late to affect the update, which already ran.

        Watches one parameter's gradient: whole-model gradient transforms touch every one.
        """
        if self._probe is None or self._probe_version is None:
            return False
        grad = self._probe.grad
        return grad is not None and (id(grad), grad._version) != self._probe_version

    def close(self) -> None:
        if self.used is not None:
            self.used.remove()
        if self._executor is not None:
            self._executor.close()


def overlap_hook(state: OverlapHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: run ``state.comm_hook`` on ``bucket``, then update the bucket's parameters."""
    plan = state.plan_for(bucket)
    executor = state.executor(plan.device)
    if bucket.index() == 0:
        state.begin_sync()
        state.raise_errors_after_backward()
        executor.hold()
    slice_numel = state.slice_numel(plan)
    if slice_numel:
        future = _sliced(state, bucket, plan, executor, slice_numel)
    elif state.sums(plan):
        # Sum now, average in the update: the fused kernels divide while they read the
        # gradients anyway, saving the separate pass over the bucket an averaging hook makes
        # on the autograd thread before its all-reduce can start.
        comm = _labelled(
            f"bucket{plan.index}/comm",
            lambda: dist.all_reduce(bucket.buffer(), group=state.process_group, async_op=True).get_future(),
        )
        used = _launch_used(state, plan)
        future = executor.after(
            comm, _future(used), _updater(state, plan, used, grad_scale=state.grad_scale(plan))
        )
    else:
        comm = state.comm_hook(state.comm_state, bucket)
        used = _launch_used(state, plan)
        future = executor.after(comm, _future(used), _updater(state, plan, used))
    if bucket.is_last():
        executor.release()
    return future


def _labelled(name: str, launch: Callable[[], torch.futures.Future]) -> torch.futures.Future:
    """``launch()``, shown in a running profiler as range ``name`` from launch to completion."""
    if not torch.autograd.profiler._is_profiler_enabled:
        return launch()
    with torch.profiler.record_function(name) as rf:
        return rf._call_end_callbacks_on_future(launch())


def _launch_used(state: OverlapHookState, plan: BucketPlan) -> Optional[UsedLaunch]:
    if state.used is None:
        return None
    return state.used.launch(plan.used_slots, plan.device, state.process_group)


def _future(used: Optional[UsedLaunch]) -> Optional[torch.futures.Future]:
    return None if used is None else used.future


def _updater(
    state: OverlapHookState,
    plan: BucketPlan,
    used_launch: Optional[UsedLaunch] = None,
    part: Optional[Part] = None,
    grad_scale: Optional[Tensor] = None,
):
    """The update a bucket (or one slice of it) runs once its communication has landed.

    ``used_launch``: the bucket's used flags (unused-parameter tracking); ``grad_scale``: the
    communication summed the gradients, and the update averages them.
    """
    local = None if used_launch is None else used_launch.local
    finite, clip = state.finite, state.clip
    label = f"bucket{plan.index}/update" if part is None else f"bucket{plan.index}/update@{part.start}"

    def update(result: Tensor, flags: Optional[Tensor]) -> None:
        scale = grad_scale
        used = plan.unused_flags(local, flags)
        with torch.profiler.record_function(label):
            try:
                found = None
                if finite is not None:
                    if scale is not None:
                        plan.divide(result, scale, part)
                        scale = None
                    found = finite.verdict(plan, result)
                plan.run(result, used, clip, part, scale, found)
            except Exception as exc:
                # Kept, not raised here: the bucket's future still completes, so DDP finishes
                # the backward pass cleanly, and the error is raised with its own type at its end.
                state.record_error(exc)
            try:
                # Also after a failed update: the gradients are averaged either way, and
                # ``.grad`` holds them after backward as it would without the overlap.
                state.hand_out_grads(plan, result, used, part)
            except Exception as exc:
                state.record_error(exc)

    return update


def _sliced(
    state: OverlapHookState,
    bucket: dist.GradBucket,
    plan: BucketPlan,
    executor: Executor,
    slice_numel: int,
) -> torch.futures.Future[torch.Tensor]:
    """Average the bucket with one all-reduce per slice, updating each slice as it lands.

    A large bucket's single all-reduce lands all at once, leaving its whole update exposed
    after the last communication. In slices, each slice's update runs while the later slices
    are still being reduced; only the last slice's update is left at the end.
    """
    group = state.process_group
    buffer = bucket.buffer()
    scale = None
    if state.sums(plan):
        scale = state.grad_scale(plan)
    else:
        buffer.div_(dist.get_world_size(group))
    used = _launch_used(state, plan)
    futures = []
    for part in plan.parts(slice_numel):
        piece = buffer[part.start : part.stop]
        comm = _labelled(
            f"bucket{plan.index}/comm@{part.start}",
            lambda piece=piece: dist.all_reduce(piece, group=group, async_op=True).get_future(),
        )
        update = _updater(state, plan, used, part, grad_scale=scale)
        futures.append(executor.after(comm, _future(used), _full_bucket(buffer, update)))
    # Completes once every slice was updated, with the bucket (on CUDA ordered after every
    # slice's update), or fails with the first slice's error.
    return gather(futures, buffer)


def _full_bucket(buffer: Tensor, update):
    """Hand ``update`` the whole bucket buffer, whose views the plan caches, not the slice."""

    def run(_piece: Tensor, flags: Optional[Tensor]) -> None:
        update(buffer, flags)

    return run


def make_overlap_hook(
    optimizers: Sequence[FunctionalOptimizer],
    comm_hook: Optional[CommHook] = None,
    comm_state: Any = None,
    **options: Any,
) -> "tuple[Callable[[OverlapHookState, dist.GradBucket], torch.futures.Future[torch.Tensor]], OverlapHookState]":
    """Build ``(hook, state)`` for ``DistributedDataParallel.register_comm_hook(state, hook)``.

    ``options`` are :class:`OverlapHookState`'s keyword arguments.

    Example:
        >>> from overlap_sgd.hooks import make_overlap_hook, overlap_hook
        >>> hook, state = make_overlap_hook([])
        >>> hook is overlap_hook
        True
    """
    return overlap_hook, OverlapHookState(optimizers, comm_hook, comm_state, **options)
