"""``overlap(model, optimizer)`` for FSDP2 (``torch.distributed.fsdp.fully_shard``): each FSDP
parameter group is updated, with one fused or multi-tensor kernel call per optimizer param
group, as soon as its reduce-scatter has produced its sharded gradients, while backward goes on
computing and reduce-scattering the groups before it.

Usage is the same as with DDP: build the model with ``fully_shard`` on its blocks and on the
root, the optimizer over ``model.parameters()`` (the sharded DTensor parameters), and keep the
loop as it was::

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = overlap_sgd.overlap(model, torch.optim.AdamW(model.parameters(), lr=3e-4))
    for x, y in data:
        loss_fn(model(x), y).backward()   # groups are updated here, as they land
        opt.step()                        # waits for the updates; runs step hooks
        opt.zero_grad()

Training equals the post-backward ``opt.step()`` bit for bit with the same kernel (pin
``foreach=``/``fused=``: on CPU torch's default for DTensors is the single-tensor loop, which
rounds differently from the multi-tensor kernel the overlap picks by default).

**The hook point.** FSDP2 reduce-scatters one parameter group's gradients in ``foreach_reduce``
(``torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py``) and then, in one loop over the
group's ``fsdp_params``, sets each sharded parameter's ``.grad`` (a DTensor viewing the
reduce-scatter output, or adds into the existing one) and at once calls that parameter's
``_post_accumulate_grad_hooks``, i.e. the hooks of ``Tensor.register_post_accumulate_grad_hook``
(torch 2.9.1: the loop under ``with stream(post_reduce_stream)`` at line 575, hooks at
lines 615-619, skipped under compiled autograd; torch 2.13: line 685, hooks at lines 755-758). The
sharded parameters are not part of the autograd graph (the unsharded ones are), so these are the
only calls those hooks get, once per parameter per reduce-scatter, and none in backward passes
under ``set_requires_gradient_sync(False)``, which accumulate the unsharded gradients and
reduce nothing. That makes the public ``register_post_accumulate_grad_hook`` on the sharded
parameters the most robust hook point: it is the one FSDP documents for optimizer-in-backward,
unchanged from 2.9 to 2.13, where the alternatives (wrapping ``FSDPParamGroup.post_backward``
or ``foreach_reduce``) are private functions whose signatures changed between those releases
(``foreach_reduce`` returns six values in 2.9.1 and seven in 2.13). A group is complete when
all its parameters have arrived; parameters that got no gradient (unused in forward) are not
reduced and never arrive, so a group missing some is closed by the next group's first arrival
(FSDP reduces one group at a time, on one thread) or by an autograd final callback queued
behind FSDP's own at the first arrival of a backward.

**CUDA ordering.** FSDP calls the hooks inside ``with stream(post_reduce_stream)``: the
reduce-scatter stream (the all-reduce stream with an all-reduce hook), after the gradients of
the group were written on it. The update is launched from there on the side stream of a
:class:`~overlap_sgd.hooks.executor.StreamExecutor`, which first waits on an event recorded on
the hook's stream (so it reads the reduced gradients), never on FSDP's streams; each gradient is
``record_stream``-ed on the side stream so that its memory is not reused before the update ran.
The next forward's all-gathers read the updated shards: FSDP's root pre-forward makes its
all-gather streams wait on the current stream (or on ``set_post_optim_event``'s event, which a
loop records after ``step()``), and the current stream waits on the side stream at the end of
backward (a final callback), in ``step()`` and in a forward pre-hook of the root registered
ahead of FSDP's, so a loop that records its own post-optimizer event stays ordered too.

**CPU.** Gloo's reduce-scatter blocks the autograd thread, and the hooks run right after it:
updates go to a worker thread (:class:`~overlap_sgd.hooks.executor.ThreadExecutor`, started at
once rather than held until backward ends) and run while backward goes on; ``step()`` waits for
them and re-raises their errors, and the root's forward pre-hook waits too.

**Clipping and ``check_finite``.** ``clip_grad_norm`` is exact and keeps the overlap, as for DDP
(:mod:`overlap_sgd.hooks.norm_clip`): on a step that speculates, each group is updated as it
lands with its unclipped gradients, after the norms of its local shards were taken on the
device (``torch._foreach_norm``, no host synchronisation) and what the optimizer's correction
needs was kept. ``step()`` reduces the norms over the ranks with one all-reduce (each
parameter's ``p``-th power summed, the maximum for the inf-norm), reads the total norm once,
and where it exceeds ``max_norm`` corrects every group's update on the local shards
(:meth:`~overlap_sgd.functional.FunctionalOptimizer.correct_clip`) and scales ``.grad`` as
``clip_grad_norm_`` does. The total is what ``clip_grad_norm_(model.parameters(), ...)``
computes on the DTensor gradients, which reduces each parameter's norm over the ranks
(DTensor's ``_NormPartial``: ``x**p``, sum, ``**(1/p)``) before combining them in parameter
order (torch 2.9 combines each rank's norms first and reduces the result: followed there):
bit for bit on CPU; on CUDA the multi-tensor norm kernel may round a parameter's
norm unlike the per-tensor one torch runs on DTensors, and NCCL may add the ranks in another
order, so there it agrees within rounding. On a step that defers (the ``"auto"`` policy's
first step and steps after frequent clipping, ``"defer"``, ``error_if_nonfinite=True``,
``check_finite``, and every step of optimizers without a correction) the groups wait for
``step()``, which clips the gradients and runs their updates, as the post-backward loop would.
``check_finite`` waits for ``step()``: one rank's shard may hold inf where another's does not,
and the ranks agree on the verdict with one all-reduce.

What is refused, with what to use instead: HSDP and any mesh of more than one dimension
(tensor parallel included), ``replicate()``, ``CPUOffloadPolicy``, ``shard=True`` (FSDP already
shards the state), a ``comm_hook``, ``slice_mb``, per-element and per-parameter clipping,
``check_consistency_every``, and optimizers whose update is not element-wise (Adafactor, Muon,
SparseAdam). Unregistered optimizers run their own ``step`` on the DTensors (the generic path).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn
from torch.optim import Optimizer

from .. import accelerated
from ..attached import STATE_ATTR
from ..optimizer import OverlappedOptimizer, assign_owners, unwrap_optimizers
from ..options import OverlapOptions
from ..registry import lookup, resolve
from .groups import check_fsdp, fsdp_groups, is_fsdp
from .state import FSDPOverlapState

__all__ = ["FSDPOverlapState", "fsdp_groups", "is_fsdp", "overlap_fsdp"]


def overlap_fsdp(
    model: nn.Module,
    optimizer: Optimizer | Sequence[Optimizer],
    options: OverlapOptions | None = None,
) -> Any:
    """:func:`overlap_sgd.overlap` for a ``fully_shard`` root module (which dispatches here);
    see the module docs.

    ``options``: :func:`~overlap_sgd.overlap`'s keyword options (``grad_views`` is ignored:
    FSDP's gradients are its own tensors). Raises ``ValueError``, before anything is touched,
    for those it cannot honour.
    """
    options = OverlapOptions() if options is None else options
    single = not isinstance(optimizer, (list, tuple))
    outer, optimizers = unwrap_optimizers(optimizer)
    _refuse_options(options)
    if getattr(model, STATE_ATTR, None) is not None:
        raise RuntimeError("overlap() was already called on this FSDP model")
    names = {id(p): n for n, p in model.named_parameters()}
    if not names:
        raise ValueError("the FSDP model has no parameters to overlap")
    check_fsdp(model, names)
    _check_ownership(model, optimizers, names, several=not single)
    registrations = [resolve(type(opt)) for opt in optimizers]
    for r in registrations:
        if not r.functional.elementwise and not _generic(r.optimizer):
            raise ValueError(
                f"{r.optimizer.__qualname__}'s update is not element-wise (it needs whole "
                "parameters), while each FSDP rank holds a shard of every parameter; step it "
                "after backward, or use DDP with overlap()"
            )
    functionals = [r.functional.bind(opt) for r, opt in zip(registrations, optimizers)]

    state = FSDPOverlapState(
        model, functionals, names, executor=options.executor, check_finite=bool(options.check_finite),
        norm_clip=options.norm_clip,
    )
    setattr(model, STATE_ATTR, state)
    wrapped = [OverlappedOptimizer(opt, state, i, model) for i, opt in enumerate(optimizers)]
    state.wrapped = wrapped
    returned = [
        accelerated.attach(o, w) if accelerated.is_accelerated(o) else w for o, w in zip(outer, wrapped)
    ]
    return returned[0] if single else returned


def _generic(optimizer: type[Optimizer]) -> bool:
    """Whether ``optimizer`` takes the generic path (nobody registered it): its own ``step``
    then runs on the DTensors, as after backward."""
    try:
        lookup(optimizer)
    except TypeError:
        return True
    return False


def _refuse_options(options: OverlapOptions) -> None:
    """``ValueError`` for each of :func:`~overlap_sgd.overlap`'s options FSDP2 cannot honour,
    saying what to use instead."""
    if options.comm_hook is not None or options.comm_state is not None:
        raise ValueError(
            "comm_hook is a DDP communication hook; FSDP2 reduce-scatters by itself: set "
            "FSDP's own reduction options (MixedPrecisionPolicy(reduce_dtype=...), "
            "set_all_reduce_hook) instead"
        )
    if options.shard:
        raise ValueError(
            "shard=True shards DDP's optimizer state; under FSDP2 the parameters and their "
            "optimizer state are sharded already: leave shard at False"
        )
    if options.slice_mb not in ("auto", None):
        raise ValueError(
            "slice_mb cuts DDP's buckets; FSDP2 updates one parameter group per reduce-scatter: "
            "choose the group size with where fully_shard is applied instead"
        )
    if options.clip_grad_value is not None or options.clip_grad_norm_per_param is not None:
        raise ValueError(
            "clip_grad_value and clip_grad_norm_per_param are not available with FSDP2; clip "
            "the global norm with clip_grad_norm=max_norm"
        )
    if options.check_consistency_every:
        raise ValueError(
            "check_consistency_every compares replicated parameters across ranks; FSDP2 "
            "ranks hold different shards: leave it at 0"
        )


def _check_ownership(
    model: nn.Module, optimizers: list[Optimizer], names: dict[int, str], several: bool
) -> None:
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    assign_owners(
        optimizers, names, trainable if several else None,
        "the FSDP model; build the optimizer after fully_shard, over model.parameters() (the sharded ones)",
    )
