"""``overlap(ddp_model, optimizer, shard=True)``: what sharding adds to the drop-in.

Setting up the sharded hook (:mod:`overlap_sgd.hooks.shard_hook`) on a DDP model, and the
optimizer's ``state_dict()`` / ``load_state_dict()`` in torch's own format while each rank
holds only its share of the state.

Example (one rank of a ``torchrun`` job)::

    opt = overlap_sgd.overlap(model, torch.optim.AdamW(model.parameters()), shard=True)
    ...
    sd = opt.state_dict()        # every rank calls it: it gathers the whole state

:mod:`overlap_sgd.dcp` saves and loads the state with each rank writing and reading only its
share (PyTorch's distributed checkpoint), on any number of ranks.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from .functional import FunctionalOptimizer
from .hooks.clip import GradClip
from .hooks.layout import check_dense
from .hooks.shard_hook import ShardHookState, shard_hook
from .registry import Registration, default_hook_factory

__all__ = ["full_state_dict", "load_full_state_dict", "register_sharded"]


def register_sharded(
    ddp_model: DistributedDataParallel,
    functionals: Sequence[FunctionalOptimizer],
    registrations: Sequence[Registration],
    *,
    comm_hook: Callable[..., Any] | None,
    names: dict[int, str],
    params: Sequence[Tensor],
    clip: GradClip,
    on_forward: Callable[[nn.Module, Any], None],
    **options: Any,
) -> ShardHookState:
    """Check that ``ddp_model`` can be trained sharded, and register the sharded hook on it.

    ``options`` are the other :class:`~overlap_sgd.hooks.state.HookState` arguments. Raises
    ``ValueError`` (before anything is registered) for what sharding cannot do.
    """
    if comm_hook is not None:
        raise ValueError(
            "shard=True communicates each bucket with a reduce-scatter and an all-gather of its "
            f"own; a comm hook ({getattr(comm_hook, '__qualname__', comm_hook)!r}) cannot wrap "
            "them: drop comm_hook, or use shard=False"
        )
    custom = [r.optimizer.__qualname__ for r in registrations if r.hook_factory is not default_hook_factory]
    if custom:
        raise ValueError(f"shard=True cannot use the hook factories registered for {custom}")
    if getattr(ddp_model, "mixed_precision", None) is not None:
        raise ValueError("shard=True does not support DDP's mixed_precision (reduced-precision buckets)")
    if not hasattr(ddp_model.reducer, "_set_optimizer_in_backward"):
        raise ValueError("shard=True needs torch's DDP optimizer-in-backward mode (torch >= 2.9)")
    for module in ddp_model.module.modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse:
            raise ValueError(
                f"shard=True cannot shard sparse gradients ({names.get(id(module.weight), 'an embedding')!r} "
                "has sparse=True)"
            )
    check_dense(params, names)
    group = ddp_model.process_group
    state = ShardHookState(
        functionals,
        gather_group=_twin_group(group),
        by_params=clip.norm is not None,
        process_group=group,
        params=params,
        names=names,
        clip=clip,
        **options,
    )
    ddp_model.register_comm_hook(state, shard_hook)
    # The buckets end up holding parameters: DDP must not copy them into .grad.
    ddp_model.reducer._set_optimizer_in_backward()
    ddp_model.register_forward_pre_hook(on_forward)
    return state


def _twin_group(group: dist.ProcessGroup) -> dist.ProcessGroup:
    """A new process group over ``group``'s ranks, backend and timeout (only they create it)."""
    options: dict[str, Any] = {}
    try:
        device = torch.device("cuda") if dist.get_backend(group) == "nccl" else torch.device("cpu")
        options["timeout"] = group._get_backend(device).options._timeout
    except (AttributeError, RuntimeError):
        pass
    return dist.new_group(
        ranks=dist.get_process_group_ranks(group),
        backend=dist.get_backend(group),
        use_local_synchronization=True,
        **options,
    )


def _params_of(optimizer: Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def full_state_dict(optimizer: Optimizer, state: ShardHookState) -> dict[str, Any]:
    """``optimizer.state_dict()`` as if it held every parameter's whole state.

    A collective: every rank of the model's process group must call it, and every rank gets
    the whole state (as much memory as an unsharded optimizer's state, for a moment).
    """
    whole = state.shards.gather(_params_of(optimizer))
    view = object.__new__(type(optimizer))
    view.__dict__.update(optimizer.__dict__)
    view.__dict__["state"] = defaultdict(dict, whole)
    return type(optimizer).state_dict(view)


def load_full_state_dict(optimizer: Optimizer, state: ShardHookState, state_dict: dict[str, Any]) -> None:
    """Load a whole state (from any rank count, or an unsharded optimizer); each rank keeps its
    share once the next backward lays out the buckets."""
    optimizer.load_state_dict(state_dict)
    state.shards.forget(_params_of(optimizer))
    state.invalidate()
