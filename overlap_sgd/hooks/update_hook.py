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

from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from ..functional import FunctionalOptimizer
from . import faults
from .bucket import BucketPlan, Part, clip_inputs
from .collectives import all_reduce
from .executor import Executor
from .finite import NonFiniteGradientError
from .futures import gather, labelled
from .state import HookState
from .used import UsedLaunch

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


class OverlapHookState(HookState):
    """Everything the all-reduce overlap hook needs, shared by all buckets of one DDP model.

    Takes :class:`~overlap_sgd.hooks.state.HookState`'s arguments, and:

    Args:
        comm_hook: the inner DDP communication hook; ``None`` means an averaged all-reduce.
        comm_state: the inner hook's state. ``None`` with a torch default hook (all-reduce,
            fp16/bf16 compression) means ``process_group``.
        slice_mb: with the default all-reduce, communicate each bucket in slices of about this
            many MiB (cut at parameter boundaries) and update each slice as soon as it lands,
            so that only the last slice's update is left after communication. ``"auto"``:
            a CPU bucket of at least twice :data:`AUTO_MIN_SLICE_MB` is cut into equal slices
            of at least that size (DDP's default 25 MiB buckets in two); whole buckets
            elsewhere. ``None`` (or with a custom ``comm_hook``, or ``check_finite``)
            communicates whole buckets.
    """

    def __init__(
        self,
        optimizers: Sequence[FunctionalOptimizer],
        comm_hook: Optional[CommHook] = None,
        comm_state: Any = None,
        *,
        slice_mb: "float | str | None" = None,
        **options: Any,
    ):
        if comm_hook is None:
            comm_hook = default_hooks.allreduce_hook
        if not callable(comm_hook):
            raise TypeError(f"comm_hook must be a DDP communication hook, got {comm_hook!r}")
        super().__init__(optimizers, **options)
        if comm_state is None and comm_hook in _PROCESS_GROUP_HOOKS:
            comm_state = self.process_group
        self.comm_hook = comm_hook
        self.comm_state = comm_state
        self.slice_mb = slice_mb
        self._owns_comm = comm_hook is default_hooks.allreduce_hook

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
        return plan.grad_scale(self.world_size)


def overlap_hook(state: OverlapHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: run ``state.comm_hook`` on ``bucket``, then update the bucket's parameters."""
    plan, executor = state.start(bucket)
    slice_numel = state.slice_numel(plan)
    if slice_numel:
        future = _sliced(state, bucket, plan, executor, slice_numel)
    elif state.sums(plan):
        # Sum now, average in the update: the fused kernels divide while they read the
        # gradients anyway, saving the separate pass over the bucket an averaging hook makes
        # on the autograd thread before its all-reduce can start.
        comm = _launch_labelled(
            f"bucket{plan.index}/comm", lambda: all_reduce(bucket.buffer(), state.process_group)
        )
        comm = faults.skip(faults.COMM_WAIT, comm, bucket.buffer())
        used = state.launch_used(plan)
        future = executor.after(
            comm, _future(used), _updater(state, plan, used, grad_scale=state.grad_scale(plan))
        )
    else:
        comm = faults.skip(faults.COMM_WAIT, state.comm_hook(state.comm_state, bucket), bucket.buffer())
        used = state.launch_used(plan)
        future = executor.after(comm, _future(used), _updater(state, plan, used))
    if bucket.is_last():
        executor.release()
    return future


def _launch_labelled(name: str, launch: Callable[[], torch.futures.Future]) -> torch.futures.Future:
    """``launch()``, shown in a running profiler as range ``name`` from launch to completion."""
    if not torch.autograd.profiler._is_profiler_enabled:
        return launch()
    with torch.profiler.record_function(name) as rf:
        return rf._call_end_callbacks_on_future(launch())


def _future(used: Optional[UsedLaunch]) -> Optional[torch.futures.Future]:
    """What the update must wait for besides the communication: the used flags, where this
    rank's update needs them (see :attr:`UsedLaunch.needed`)."""
    return None if used is None else used.needed


def _updater(
    state: HookState,
    plan: BucketPlan,
    used_launch: Optional[UsedLaunch] = None,
    part: Optional[Part] = None,
    grad_scale: Optional[Tensor] = None,
):
    """The update a bucket (or one slice of it) runs once its communication has landed.

    ``used_launch``: the bucket's used flags (unused-parameter tracking); ``grad_scale``: the
    communication summed the gradients, and the update averages them.
    """
    finite, clip, clipper = state.finite, state.clip, state.clipper
    label = f"bucket{plan.index}/update" if part is None else f"bucket{plan.index}/update@{part.start}"

    def update(result: Tensor, flags: Optional[Tensor]) -> None:
        scale = grad_scale
        used = state.resolve_used(plan, used_launch, flags)
        with labelled(label):
            try:
                found = None
                summed = 1
                if scale is not None and clipper is not None and clip is None and used is None and clipper.folds(
                    plan, state.world_size
                ):
                    summed = state.world_size  # the kernels average the sums as they update
                elif scale is not None and (finite is not None or clipper is not None):
                    plan.divide(result, scale, part)
                    scale = None
                if finite is not None:
                    found = finite.verdict(plan, result)
                if clipper is None:
                    plan.run(result, used, clip, part, scale, found)
                else:
                    params, grads = clip_inputs(plan, plan.views(result), used, plan.positions(part))
                    if clip is not None:
                        clip.apply(grads)
                    clipper.observe_whole(params, grads, summed)
                    plan.run(result, used, None, part, scale, found, clipper)
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
    used = state.launch_used(plan)
    futures = []
    for part in plan.parts(slice_numel):
        piece = buffer[part.start : part.stop]
        comm = _launch_labelled(
            f"bucket{plan.index}/comm@{part.start}", lambda piece=piece: all_reduce(piece, group)
        )
        comm = faults.skip(faults.COMM_WAIT, comm, piece)
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
