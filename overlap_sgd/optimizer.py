"""``OverlappedOptimizer``: the optimizer a training loop keeps using after :func:`overlap`.

It is a real :class:`torch.optim.Optimizer` that shares the wrapped optimizer's ``param_groups``,
``state`` and ``defaults``; nothing is copied. LR schedulers therefore drive the hyperparameters
the bucket updates read, ``state_dict()`` is the wrapped optimizer's exact format, and
``zero_grad()`` clears the same gradients. Its :meth:`~OverlappedOptimizer.step` updates nothing:
the parameters were already updated inside ``backward()``, bucket by bucket. It runs the step
hooks and tells the overlap hook that the step for this backward was taken.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from . import accelerated
from .consistency import check_consistency
from .hooks import OverlapHookState
from .hooks.norm_clip import ClipGradNorm, check_max_norm
from .sharding import full_state_dict, load_full_state_dict

__all__ = ["OverlappedOptimizer", "assign_owners", "unwrap_optimizers"]

_SHARED_HOOK_DICTS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


class OverlappedOptimizer(Optimizer):
    """A ``torch.optim`` optimizer whose update runs inside DDP's backward; see :func:`overlap`.

    Built by :func:`overlap_sgd.overlap`, not directly. The wrapped optimizer's own ``step`` is
    routed here too, so a loop that still calls the original object never updates twice.

    Example (``ddp_model`` a DDP model, ``opt`` its optimizer)::

        opt = overlap_sgd.overlap(ddp_model, opt)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
        loss.backward()   # parameters are updated here, bucket by bucket
        opt.step()        # updates nothing; runs step hooks
        sched.step()
    """

    # GradScaler hands scaled-gradient bookkeeping to optimizers that claim this; step() then
    # sees it and refuses, instead of the scaler silently unscaling after the update.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        optimizer: Optimizer,
        hook_state: OverlapHookState,
        index: int,
        model: Any = None,
        check_consistency_every: int = 0,
    ):
        # Optimizer.__init__ is deliberately not called: it would build new param groups,
        # whereas this object must share the wrapped optimizer's.
        self._optimizer = optimizer
        self._hook_state = hook_state
        self._index = index
        self._model = model
        self._consistency_every = check_consistency_every
        self._steps = 0
        self._warned_late_grads = False
        for name in _SHARED_HOOK_DICTS:
            setattr(self, name, getattr(optimizer, name))
        self._patch_step_function()
        self._route_inner_step()

    def _route_inner_step(self) -> None:
        inner = self._optimizer
        previous = inner.__dict__.get("step")

        def step(*args: Any, **kwargs: Any) -> Any:
            return self.step(*args, **kwargs)

        if previous is not None and getattr(previous, "_wrapped_by_lr_sched", False):
            step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        inner.step = step  # type: ignore[method-assign]

    # -- shared data -------------------------------------------------------------------------

    @property
    def optimizer(self) -> Optimizer:
        """The wrapped ``torch.optim`` optimizer."""
        return self._optimizer

    @property
    def hook_state(self) -> OverlapHookState:
        """The state of the comm hook registered on the DDP model."""
        return self._hook_state

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self._optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self._optimizer.param_groups = value
        self._hook_state.invalidate()

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self._optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self._optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self._optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self._optimizer.defaults = value

    # -- the optimizer API -------------------------------------------------------------------

    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        """Acknowledge the step: the update already ran during ``backward()``.

        A closure cannot be supported: it would re-run forward and backward after the
        parameters had already moved.
        """
        if closure is not None:
            raise TypeError(
                "OverlappedOptimizer.step() does not take a closure: the update already ran "
                "inside backward(), so a closure that re-evaluates the loss cannot be honoured"
            )
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            raise RuntimeError(
                "torch.amp.GradScaler cannot drive an OverlappedOptimizer: each bucket was "
                "updated inside backward() before the scaler could unscale it or check it for "
                "inf/NaN. Train with bf16 autocast instead (torch.autocast(device, "
                "dtype=torch.bfloat16)), which needs no loss scaling."
            )
        if self._index == 0 and not self._warned_late_grads and self._hook_state.grads_changed_since_backward():
            self._warned_late_grads = True
            warnings.warn(
                "gradients were modified in place after backward() (for example by "
                "torch.nn.utils.clip_grad_norm_ or accelerator.clip_grad_norm_), but overlapped "
                "parameters were already updated "
                "inside backward() with the unmodified gradients. Clip through the overlap "
                "instead: overlap(..., clip_grad_norm=max_norm) clips the global norm exactly, "
                "and optimizer.clip_grad_norm_(max_norm) takes the place of the "
                "torch.nn.utils.clip_grad_norm_ call.",
                stacklevel=2,
            )
        self._settle_clip()
        self._hook_state.acknowledge_step(self._index)
        self._optimizer._opt_called = True  # type: ignore[attr-defined]
        self._steps += 1
        every = self._consistency_every
        if every and self._index == 0 and self._steps % every == 0:
            check_consistency(self._model, group=self._hook_state.process_group)
        return None

    # -- global-norm clipping ----------------------------------------------------------------

    def _settle_clip(self, max_norm: float | None = None) -> Any:
        settle = getattr(self._hook_state, "settle_clip", None)
        return None if settle is None else settle(max_norm)

    def clip_grad_norm_(
        self, max_norm: float | None = None, norm_type: float | str | None = None,
        error_if_nonfinite: bool | None = None, foreach: bool | None = None,
    ) -> Tensor:
        """Clip the global gradient norm of the last backward, in place of
        ``torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)`` after ``backward()``.

        Needs ``overlap(..., clip_grad_norm=...)``: the updates inside backward keep what the
        clipping needs. ``max_norm`` overrides the configured value for this step (``None``
        keeps it); ``norm_type`` and ``error_if_nonfinite``, if given, must be the configured
        ones (the norms were taken inside backward); ``foreach`` is accepted and ignored.
        Returns the total norm of the unclipped gradients (a 0-dim tensor), as torch does.
        Every overlapped optimizer of the model shares the one clipping: calling it on any
        of them settles all; ``step()`` afterwards does not clip again.

        Example (``opt`` from ``overlap(model, opt, clip_grad_norm=1.0)``)::

            loss.backward()
            norm = opt.clip_grad_norm_(1.0)   # was torch.nn.utils.clip_grad_norm_(...)
            opt.step()
        """
        clipper = getattr(self._hook_state, "clipper", None)
        if clipper is None:
            raise ValueError(
                "clip_grad_norm_() needs global-norm clipping set up when the model is "
                "overlapped: overlap(model, optimizer, clip_grad_norm=max_norm); the updates "
                "inside backward() then keep what an exact clip needs"
            )
        if max_norm is not None:
            max_norm = check_max_norm(max_norm, "max_norm")
        if norm_type is not None:
            asked = ClipGradNorm(1.0, norm_type).norm_type
            if asked != clipper.norm_type:
                raise ValueError(
                    f"norm_type {norm_type!r} differs from the {clipper.norm_type} configured in "
                    "overlap(clip_grad_norm=ClipGradNorm(..., norm_type=...)): the norms were "
                    "taken inside backward()"
                )
        if error_if_nonfinite is not None and error_if_nonfinite != clipper.options.error_if_nonfinite:
            raise ValueError(
                f"error_if_nonfinite={error_if_nonfinite!r} differs from the configured "
                f"{clipper.options.error_if_nonfinite!r}: set it in ClipGradNorm(...)"
            )
        total = self._settle_clip(max_norm)
        if total is None:
            raise RuntimeError("clip_grad_norm_() was called before any synchronising backward()")
        return total

    @property
    def grad_norm(self) -> Tensor | None:
        """The total gradient norm of the last settled step (a 0-dim tensor, as
        ``clip_grad_norm_`` returns it), with ``overlap(..., clip_grad_norm=...)``; else ``None``."""
        clipper = getattr(self._hook_state, "clipper", None)
        return None if clipper is None else clipper.total_norm

    @property
    def clipped(self) -> bool:
        """Whether the last settled step's gradients were scaled down by global-norm clipping."""
        clipper = getattr(self._hook_state, "clipper", None)
        return bool(clipper is not None and clipper.clipped)

    def zero_grad(self, set_to_none: bool = True) -> None:
        def params() -> list[Any]:
            return [p for group in self.param_groups for p in group["params"]]

        if not set_to_none and getattr(self._hook_state, "grad_views", False):
            # Gradients that are still bucket views get zeros of their own rather than
            # zeroing the bucket, so no alias survives into the next backward.
            self._hook_state.reclaim_grads(params(), zero=True)
        self._optimizer.zero_grad(set_to_none=set_to_none)
        if set_to_none and self._sharded:
            self._hook_state.note_zero_grad(params(), set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict, in its exact format.

        With ``shard=True`` it holds every parameter's whole state, gathered from all ranks:
        a collective that every rank of the model must call.
        """
        self._settle_clip()  # a clipped step is corrected before its state is read
        if self._sharded:
            return full_state_dict(self._optimizer, self._hook_state)
        return self._optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of the wrapped optimizer's class (from either side of the overlap,
        sharded or not, saved by any number of ranks)."""
        if self._sharded:
            load_full_state_dict(self._optimizer, self._hook_state, state_dict)
            return
        self._optimizer.load_state_dict(state_dict)
        self._hook_state.invalidate()

    @property
    def _sharded(self) -> bool:
        return hasattr(self._hook_state, "shards")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of the DDP model's parameters that no overlapped optimizer holds yet."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group.get("params")
        params = [params] if hasattr(params, "shape") else list(params or [])
        self._hook_state.check_new_params(params)
        self._optimizer.add_param_group(param_group)
        self._hook_state.invalidate()

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError(
            "an OverlappedOptimizer is bound to a live DDP model and cannot be pickled; "
            "save its state_dict() instead"
        )

    def __repr__(self) -> str:
        return f"OverlappedOptimizer({self._optimizer!r})"


def unwrap_optimizers(optimizer: Any) -> tuple[list[Any], list[Optimizer]]:
    """The optimizers given to :func:`~overlap_sgd.overlap` as a list, and the torch optimizers
    inside them (an Accelerate ``AcceleratedOptimizer`` holds one).

    Raises:
        ValueError: an empty list.
        TypeError: one is not a ``torch.optim.Optimizer``, or is overlapped already.
    """
    outer = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    if not outer:
        raise ValueError("overlap() got an empty list of optimizers")
    optimizers = [accelerated.unwrap(o) if accelerated.is_accelerated(o) else o for o in outer]
    for i, opt in enumerate(optimizers):
        if isinstance(opt, OverlappedOptimizer):
            raise TypeError(f"optimizer {i} is already an OverlappedOptimizer")
        if not isinstance(opt, Optimizer):
            raise TypeError(f"optimizer {i} must be a torch.optim.Optimizer, got {type(opt).__name__}")
    return outer, optimizers


def assign_owners(
    optimizers: list[Optimizer],
    names: dict[int, str],
    trainable: dict[int, str] | None,
    foreign: str,
) -> dict[int, int]:
    """Which optimizer holds each parameter (``id`` -> index), checked.

    ``names``: every parameter of the model by ``id``; ``trainable``: those that must each be
    held by one of several optimizers (``None`` for a single optimizer, which may hold a part);
    ``foreign``: what follows "is not a parameter of" in the error for a parameter not in
    ``names``.

    Raises:
        ValueError: a parameter foreign to the model, one held by two optimizers, or (with
            ``trainable``) a trainable one held by none.
    """
    owner: dict[int, int] = {}
    for i, opt in enumerate(optimizers):
        for gi, group in enumerate(opt.param_groups):
            for p in group["params"]:
                name = names.get(id(p))
                if name is None:
                    raise ValueError(
                        f"optimizer {i} (param group {gi}) holds a parameter of shape "
                        f"{tuple(p.shape)} that is not a parameter of {foreign}"
                    )
                if id(p) in owner and owner[id(p)] != i:
                    raise ValueError(
                        f"parameter {name!r} is held by optimizers {owner[id(p)]} and {i}; "
                        "each parameter must belong to exactly one optimizer"
                    )
                owner[id(p)] = i
    if trainable is not None:
        missing = [n for pid, n in trainable.items() if pid not in owner]
        if missing:
            raise ValueError(
                f"trainable parameter {missing[0]!r} is held by none of the optimizers"
                + (f" ({len(missing) - 1} more)" if len(missing) > 1 else "")
                + "; give it to one, or set requires_grad=False"
            )
    return owner
