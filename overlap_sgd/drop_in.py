"""``overlap(ddp_model, optimizer)``: the one-line change that moves the step into backward."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from . import accelerated
from .attached import STATE_ATTR, is_fsdp, overlapped_optimizers, trainable_parameters, uncompiled
from .hooks import Executor, OverlapHookState, make_executor, overlap_hook
from .hooks.norm_clip import ClipGradNorm
from .optimizer import OverlappedOptimizer, assign_owners, unwrap_optimizers
from .options import OverlapOptions
from .registry import Registration, default_hook_factory, resolve
from .sharding import register_sharded

__all__ = ["overlap", "overlapped_optimizers", "trainable_parameters"]


def overlap(
    ddp_model: DistributedDataParallel,
    optimizer: Optimizer | Sequence[Optimizer],
    comm_hook: Callable[..., torch.futures.Future] | None = None,
    comm_state: Any = None,
    *,
    executor: str | Executor = "auto",
    check_finite: bool | str = False,
    clip_grad_value: float | None = None,
    clip_grad_norm: float | ClipGradNorm | None = None,
    clip_grad_norm_per_param: float | None = None,
    check_consistency_every: int = 0,
    slice_mb: float | str | None = "auto",
    grad_views: bool = True,
    shard: bool = False,
) -> Any:
    """Update each DDP bucket's parameters as soon as its gradients are communicated.

    Registers a communication hook on ``ddp_model`` that runs ``comm_hook`` (default: averaged
    all-reduce) and then steps the bucket's parameters with the optimizer's algorithm, while
    later buckets are still communicating. Returns an :class:`OverlappedOptimizer` (a list of
    them, in order, for a list of optimizers) to use in place of the original: the loop
    ``loss.backward(); opt.step(); opt.zero_grad()`` stays as it was, and trains as
    post-backward ``optimizer.step()`` would.

    Args:
        ddp_model: a :class:`~torch.nn.parallel.DistributedDataParallel` model without a comm
            hook, or ``torch.compile`` of one; or a ``fully_shard`` (FSDP2) root module, see
            :mod:`overlap_sgd.fsdp`.
        optimizer: a ``torch.optim`` optimizer over the model's parameters, or a list of them
            over disjoint parameter sets that together hold every trainable parameter. An
            Accelerate ``AcceleratedOptimizer`` (from ``Accelerator.prepare``) is overlapped
            inside: it is returned itself, holding the overlapped optimizer
            (:mod:`overlap_sgd.accelerated`).
        comm_hook: any DDP communication hook, e.g. ``fp16_compress_hook`` or
            ``powerSGD_hook``; ``None`` means an averaged all-reduce.
        comm_state: ``comm_hook``'s state (``PowerSGDState`` for PowerSGD); ``None`` with a
            torch default hook means the model's process group.
        executor: where updates run: ``"auto"`` (a worker thread on CPU, a side stream on
            CUDA), ``"thread"``, ``"inline"`` (in the completion callback), ``"stream"``.
        check_finite: leave every bucket whose gradients hold inf/NaN untouched (parameters
            and state) and raise :class:`~overlap_sgd.hooks.NonFiniteGradientError` naming
            them: from ``backward()`` on CPU; on CUDA from ``step()``, so that backward never
            waits for the device (the verdict stays on the device and torch's fused kernels
            skip the update there). ``"backward"`` or ``"step"`` chooses the place. Off by
            default, as post-backward steps do not check either.
        clip_grad_value: clamp each gradient element to ``[-v, v]`` before the update.
        clip_grad_norm: clip the *global* gradient norm exactly as
            ``torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)`` after backward
            would: a number (``max_norm``) or a
            :class:`~overlap_sgd.hooks.norm_clip.ClipGradNorm` (``norm_type``,
            ``error_if_nonfinite``, ``policy``). Buckets are still updated inside backward
            and corrected in ``step()`` on the steps that clip (see
            :mod:`overlap_sgd.hooks.norm_clip`); ``step()`` leaves the clipped gradients in
            ``.grad`` and the total norm in ``optimizer.grad_norm``.
        clip_grad_norm_per_param: rescale each *parameter's* gradient to L2 norm at most this
            value before its update (what ``clip_grad_norm`` meant before 0.2). See
            :mod:`overlap_sgd.hooks.clip`.
        slice_mb: with the default all-reduce, communicate each bucket in slices of about
            this many MiB and update each slice as soon as it lands, so a large bucket's
            update need not wait for the whole bucket to land. Each slice is one more
            all-reduce. ``"auto"`` (default): CPU buckets of 24 MiB or more in equal slices of
            at least 12 MiB (DDP's default 25 MiB buckets in two), whole buckets on CUDA;
            ``None``: whole buckets.
        check_consistency_every: every this many steps, ``step()`` verifies that parameters
            and optimizer state are identical on all ranks
            (:func:`~overlap_sgd.check_consistency`); 0 disables it.
        grad_views: after backward, each parameter's ``.grad`` holds the averaged gradient as
            a view into DDP's communication bucket (as with DDP's own
            ``gradient_as_bucket_view=True``), sparing DDP's copy of every bucket into
            ``.grad``. Values, ``zero_grad()`` and no_sync accumulation behave as before; the
            difference is identity: before the model's next forward, a ``.grad`` still
            pointing into a bucket is given a copy of its own, so a reference to an old
            ``.grad`` kept past the next backward sees the bucket's new contents. ``False``
            keeps DDP's copy. No effect with ``gradient_as_bucket_view=True`` (the gradients
            are bucket views already) or DDP mixed precision.
        shard: keep on each rank the optimizer state of only its share of every bucket
            (ZeRO-1), updated as each bucket lands: see :mod:`overlap_sgd.hooks.shard_hook`.
            ``state_dict()`` then gathers the whole state (every rank must call it);
            ``.grad`` after backward is the averaged gradient where this rank holds a
            parameter's whole gradient and ``None`` elsewhere. No ``comm_hook``, no sparse
            gradients, no ``slice_mb`` (buckets are reduce-scattered whole).

    Raises:
        TypeError: ``ddp_model`` is not DDP, an argument has the wrong type, or an optimizer
            cannot be overlapped (``LBFGS``, a class declared with ``register_global``, or an
            ``AcceleratedOptimizer`` driven by fp16's gradient scaler).
        ValueError: parameters foreign to the model, held twice, or held by no optimizer
            (with several optimizers); sparse gradients for an optimizer without support; a
            DDP model built for compiled autograd (``optimize_ddp="python_reducer"``).
        RuntimeError: the model already has a comm hook or was already overlapped.

    Example (one rank of a ``torchrun`` job)::

        model = DistributedDataParallel(net)
        opt = overlap_sgd.overlap(model, torch.optim.SGD(model.parameters(), lr=0.1))
        for x, y in data:
            loss_fn(model(x), y).backward()   # buckets are updated here
            opt.step()
            opt.zero_grad()
    """
    if is_fsdp(uncompiled(ddp_model)):  # a fully_shard model: see overlap_sgd.fsdp
        from .fsdp import overlap_fsdp  # imported only by FSDP2 jobs (see attached.is_fsdp)

        return overlap_fsdp(uncompiled(ddp_model), optimizer, OverlapOptions(
            comm_hook=comm_hook, comm_state=comm_state, executor=executor, check_finite=check_finite,
            clip_grad_value=clip_grad_value, clip_grad_norm=clip_grad_norm,
            clip_grad_norm_per_param=clip_grad_norm_per_param,
            check_consistency_every=check_consistency_every, slice_mb=slice_mb,
            grad_views=grad_views, shard=shard,
        ))
    ddp_model = _checked_model(ddp_model)
    single = not isinstance(optimizer, (list, tuple))
    outer, optimizers = unwrap_optimizers(optimizer)
    options = OverlapOptions(
        comm_hook=comm_hook, comm_state=comm_state, executor=executor, check_finite=check_finite,
        clip_grad_value=clip_grad_value, clip_grad_norm=clip_grad_norm,
        clip_grad_norm_per_param=clip_grad_norm_per_param,
        check_consistency_every=check_consistency_every, slice_mb=slice_mb,
        grad_views=grad_views, shard=shard,
    )
    _check_fresh(ddp_model)

    # 1. The parameters DDP synchronises, and the functional optimizer that steps each.
    trainable = trainable_parameters(ddp_model)
    if not trainable:
        raise ValueError("the DDP model has no trainable parameters to overlap")
    executor = make_executor(options.executor, next(iter(trainable.values())).device)
    names = {id(p): n for n, p in trainable.items()}
    registrations, functionals = _bind(ddp_model, optimizers, names, options, several=not single)

    # 2. The hook that updates each bucket as it lands, registered on the model.
    state = _register(ddp_model, options, executor, trainable, names, registrations, functionals)

    # 3. The optimizers the loop keeps using.
    return _wrap(ddp_model, outer, optimizers, state, options.check_consistency_every, single)


def _bind(
    ddp_model: DistributedDataParallel,
    optimizers: list[Optimizer],
    names: dict[int, str],
    options: OverlapOptions,
    several: bool,
) -> tuple[list[Registration], list[Any]]:
    """Each optimizer's registry entry and functional counterpart, once the split is checked."""
    _check_ownership(ddp_model, optimizers, names, several=several)
    registrations = [resolve(type(opt)) for opt in optimizers]
    factories = {r.hook_factory for r in registrations}
    if len(factories) > 1:
        raise TypeError(
            "the optimizers are registered with different hook factories and cannot share one "
            f"DDP model: {[r.optimizer.__qualname__ for r in registrations]}"
        )
    functionals = [r.functional.bind(opt) for r, opt in zip(registrations, optimizers)]
    _check_sparse(ddp_model, functionals, names)
    if options.norm_clip is not None:
        _check_global_clip(ddp_model, registrations, names)
    return registrations, functionals


def _checked_model(ddp_model: Any) -> DistributedDataParallel:
    """``ddp_model`` (the module inside ``torch.compile``), or an error if overlap cannot drive it."""
    ddp_model = uncompiled(ddp_model)
    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(
            "overlap() needs a torch.nn.parallel.DistributedDataParallel model, got "
            f"{type(ddp_model).__name__} (Accelerator.prepare wraps a model in DDP only when "
            "several processes run)"
        )
    if getattr(ddp_model, "_use_python_reducer", False):
        raise ValueError(
            "overlap() cannot drive a DDP model built under "
            "torch._dynamo.config.optimize_ddp='python_reducer' (compiled autograd), which calls "
            "communication hooks per gradient instead of per bucket; build it with the default "
            "optimize_ddp=True, which compiles with graph breaks at bucket boundaries"
        )
    return ddp_model


def _check_fresh(ddp_model: DistributedDataParallel) -> None:
    """Raise ``RuntimeError`` if ``ddp_model`` was overlapped already or has a comm hook."""
    if getattr(ddp_model, STATE_ATTR, None) is not None:
        raise RuntimeError("overlap() was already called on this DDP model")
    if getattr(ddp_model, "_comm_hooks", None):
        names = [getattr(h, "__qualname__", repr(h)) for h, _ in ddp_model._comm_hooks]
        raise RuntimeError(
            f"this DDP model already has a communication hook ({', '.join(names)}); pass it "
            "to overlap(comm_hook=..., comm_state=...) on a fresh model instead"
        )


def _register(
    ddp_model: DistributedDataParallel,
    options: OverlapOptions,
    executor: Executor,
    trainable: dict[str, Tensor],
    names: dict[int, str],
    registrations: list[Registration],
    functionals: list[Any],
) -> Any:
    """Register the bucket hook on ``ddp_model``; return its state."""
    common = dict(
        process_group=ddp_model.process_group,
        params=list(trainable.values()),
        names=names,
        track_unused=bool(ddp_model.find_unused_parameters or getattr(ddp_model, "static_graph", False)),
        static_graph=bool(getattr(ddp_model, "static_graph", False)),
        executor=executor,
        check_finite=options.check_finite,
        clip=options.clip,
        require_step=True,
    )
    if options.norm_clip is not None:
        common["norm_clip"] = options.norm_clip
    if options.shard:
        common.pop("process_group")
        return register_sharded(
            ddp_model, functionals, registrations, comm_hook=options.comm_hook,
            grad_views=options.grad_views, on_forward=_reclaim_grads_later(), **common,
        )

    hook, state = registrations[0].hook_factory(
        functionals, options.comm_hook, options.comm_state, slice_mb=options.slice_mb, **common
    )
    ddp_model.register_comm_hook(state, hook)
    own_hook = hook is overlap_hook and isinstance(state, OverlapHookState)
    if options.grad_views and own_hook and _can_hand_out_views(ddp_model):
        # The hook sets .grad itself: DDP's optimizer-in-backward mode skips its copy of the
        # buckets into .grad, and a forward pre-hook un-aliases what the hook handed out. (A
        # registered factory's own hook keeps DDP's copy.)
        state.grad_views = True
        ddp_model.reducer._set_optimizer_in_backward()
        ddp_model.register_forward_pre_hook(_reclaim_grads(state))
    return state


def _wrap(
    ddp_model: DistributedDataParallel,
    outer: list[Any],
    optimizers: list[Optimizer],
    state: Any,
    check_consistency_every: int,
    single: bool,
) -> Any:
    """Wrap each optimizer (``outer``: as the caller passed them) around ``state``."""
    setattr(ddp_model, STATE_ATTR, state)
    wrapped = [
        OverlappedOptimizer(opt, state, i, ddp_model, check_consistency_every)
        for i, opt in enumerate(optimizers)
    ]
    state.wrapped = wrapped
    returned = [
        accelerated.attach(o, w) if accelerated.is_accelerated(o) else w
        for o, w in zip(outer, wrapped)
    ]
    return returned[0] if single else returned


def _can_hand_out_views(ddp_model: DistributedDataParallel) -> bool:
    """Whether DDP copies buckets into ``.grad`` and that copy can be replaced by views."""
    return (
        not ddp_model.gradient_as_bucket_view
        and getattr(ddp_model, "mixed_precision", None) is None
        and hasattr(ddp_model.reducer, "_set_optimizer_in_backward")
    )


def _reclaim_grads(state: Any) -> Callable[..., None]:
    def reclaim(_module: nn.Module, _args: Any) -> None:
        state.reclaim_grads()

    return reclaim


def _reclaim_grads_later() -> Callable[..., None]:
    """A forward pre-hook that reclaims the gradients of the state set on the model by then."""

    def reclaim(module: nn.Module, _args: Any) -> None:
        getattr(module, STATE_ATTR).reclaim_grads()

    return reclaim


def _check_ownership(
    ddp_model: DistributedDataParallel,
    optimizers: list[Optimizer],
    trainable: dict[int, str],
    several: bool,
) -> None:
    all_names = {id(p): n for n, p in ddp_model.module.named_parameters(remove_duplicate=False)}
    assign_owners(optimizers, all_names, trainable if several else None, "the DDP model")
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in trainable:
                    raise ValueError(
                        f"parameter {all_names[id(p)]!r} is ignored by DDP (_ddp_params_and_buffers_to_ignore), "
                        "so its gradient never reaches a bucket and it cannot be overlapped"
                    )


def _check_sparse(ddp_model: DistributedDataParallel, functionals: list[Any], names: dict[int, str]) -> None:
    for module in ddp_model.module.modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse:
            p = module.weight
            for f in functionals:
                if f.group_index(p) is not None and not f.supports_sparse:
                    raise ValueError(
                        f"parameter {names.get(id(p), 'weight')!r} gets sparse gradients "
                        f"(sparse=True), which {f.torch_optimizer.__name__} cannot take"
                    )


def _check_global_clip(
    ddp_model: DistributedDataParallel, registrations: list[Any], names: dict[int, str]
) -> None:
    """Raise ``ValueError`` for what global-norm clipping cannot do, before anything is set up."""
    custom = [r.optimizer.__qualname__ for r in registrations if r.hook_factory is not default_hook_factory]
    if custom:
        raise ValueError(
            f"clip_grad_norm needs overlap-sgd's own bucket hook, but {custom} registered hook "
            "factories of their own; clip inside that hook instead"
        )
    for module in ddp_model.module.modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse:
            raise ValueError(
                f"clip_grad_norm cannot take the norm of sparse gradients (parameter "
                f"{names.get(id(module.weight), 'weight')!r} has sparse=True), as "
                "torch.nn.utils.clip_grad_norm_ cannot either"
            )
