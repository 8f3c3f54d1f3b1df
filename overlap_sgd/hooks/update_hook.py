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
from .bucket import BucketPlan
from .clip import GradClip
from .executor import Executor, make_executor
from .used import UsedTracker

__all__ = [
    "NonFiniteGradientError",
    "OverlapHookState",
    "make_overlap_hook",
    "overlap_hook",
]

CommHook = Callable[[Any, dist.GradBucket], torch.futures.Future]

_PROCESS_GROUP_HOOKS = (
    default_hooks.allreduce_hook,
    default_hooks.fp16_compress_hook,
    default_hooks.bf16_compress_hook,
)


class NonFiniteGradientError(FloatingPointError):
    """A bucket's communicated gradient holds inf or NaN (raised with ``check_finite=True``)."""

    def __init__(self, names: Sequence[str], bucket: int):
        self.names = list(names)
        self.bucket = bucket
        shown = ", ".join(repr(n) for n in self.names[:8])
        more = f" and {len(self.names) - 8} more" if len(self.names) > 8 else ""
        super().__init__(
            f"non-finite gradient in bucket {bucket} for {shown}{more}; "
            "the bucket's parameters and optimizer state were left untouched"
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
        check_finite: raise :class:`NonFiniteGradientError` for a bucket with inf/NaN gradients,
            leaving that bucket untouched.
        clip: per-parameter gradient clipping applied before each update
            (:class:`~overlap_sgd.hooks.clip.GradClip`).
        require_step: refuse a synchronising backward that follows one whose update no
            ``step()`` acknowledged (:meth:`acknowledge_step`). :func:`overlap_sgd.overlap`
            turns it on, since its ``OverlappedOptimizer.step()`` acknowledges; a hook
            registered by hand has nothing to acknowledge with, so the default is off.
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
        check_finite: bool = False,
        clip: Optional[GradClip] = None,
        require_step: bool = False,
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
        self.check_finite = check_finite
        self.require_step = require_step
        self.clip = clip if clip is not None and clip.active else None
        self.used = UsedTracker(params) if track_unused else None
        self._executor_spec = executor
        self._executor: Optional[Executor] = None
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
        self._inflight: list[torch.futures.Future] = []
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
                    index, params, bucket.gradients(), bucket.buffer(),
                    self.optimizers, self.owner, self.names,
                )
                if self.used is not None:
                    plan.used_slots = self.used.slots(params)
                self._plans[index] = plan
                self.plans_built += 1
        return plan

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

    def record_error(self, exc: Exception) -> None:
        """Keep the first error of this backward pass (a bucket update failed)."""
        with self._lock:
            if self.pending_error is None:
                self.pending_error = exc
            self.last_error = exc

    def raise_errors_after_backward(self) -> None:
        """Queue the check that raises a bucket update's error at the end of ``backward()``.

        Called from the comm hook at a backward's first bucket, on the autograd thread. The
        callback first waits for every bucket future of this backward (they complete after
        their update), so no update is still running when it looks for errors.
        """
        self._inflight = []
        torch.autograd.Variable._execution_engine.queue_callback(self._after_backward)

    def track(self, future: torch.futures.Future) -> torch.futures.Future:
        self._inflight.append(future)
        return future

    def _after_backward(self) -> None:
        futures, self._inflight = self._inflight, []
        for f in futures:
            f.wait()
        # Raise from a callback queued now, which runs after DDP's own end-of-backward
        # callback: raising before it would leave DDP's reducer half-finalised.
        torch.autograd.Variable._execution_engine.queue_callback(self._raise_pending)

    def _raise_pending(self) -> None:
        exc, self.pending_error = self.pending_error, None
        if exc is not None:
            # The loop will not reach step() for this backward: do not demand one.
            self.awaiting_step = [False] * len(self.optimizers)
            raise exc

    def acknowledge_step(self, optimizer_index: int) -> None:
        self.awaiting_step[optimizer_index] = False

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
    comm = state.comm_hook(state.comm_state, bucket)
    used = None
    if state.used is not None:
        used = state.used.launch(plan.used_slots, plan.device, state.process_group)
    check, clip = state.check_finite, state.clip
    label = f"bucket{plan.index}/update"

    def update(result: Tensor, flags: Optional[Tensor]) -> None:
        with torch.profiler.record_function(label):
            _update(result, flags)

    def _update(result: Tensor, flags: Optional[Tensor]) -> None:
        try:
            if check:
                bad = plan.check_finite(result)
                if bad:
                    raise NonFiniteGradientError(bad, plan.index)
            plan.run(result, flags, clip)
        except Exception as exc:
            # Kept, not raised here: the bucket's future still completes, so DDP finishes the
            # backward pass cleanly, and the error is raised with its own type at its end.
            state.record_error(exc)

    future = state.track(executor.after(comm, used, update))
    if bucket.is_last():
        executor.release()
    return future


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
