"""FSDP2's parameter groups, as the overlap needs them: which sharded parameters one
reduce-scatter produces the gradients of, and what it cannot overlap.

Each ``fully_shard`` call makes one parameter group (its module's parameters not managed by a
``fully_shard`` below it); one backward reduce-scatters each group's gradients at once and then,
in the group's parameter order, sets each sharded parameter's ``.grad`` and calls its
post-accumulate-grad hooks. The groups are read from FSDP's state (``_fsdp_param_groups`` on
torch 2.11 and later, ``_fsdp_param_group`` before), in the order of their ``fsdp_params``; if
a torch release renames those, they are worked out from the module tree instead, which gives
the same sets in module parameter order.

Example (inside an initialised process group)::

    model = fully_shard(nn.Sequential(fully_shard(nn.Linear(4, 4)), nn.Linear(4, 2)))
    [len(g) for g in fsdp_groups(model)]   # [2, 2]: the inner Linear's, the root's
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule
from torch.distributed.tensor import DTensor, Shard

__all__ = ["check_fsdp", "fsdp_groups", "is_fsdp"]


def is_fsdp(model: Any) -> bool:
    """Whether ``model`` is a module made by ``fully_shard`` (an :class:`FSDPModule`)."""
    return isinstance(model, FSDPModule)


def _param_groups(module: FSDPModule) -> list[Any]:
    """FSDP's ``FSDPParamGroup``\\ s of ``module`` (``None`` if this torch names them otherwise)."""
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)  # torch >= 2.11: one per mesh
    if groups is None:
        if not hasattr(state, "_fsdp_param_group"):
            return None  # type: ignore[return-value]
        groups = [state._fsdp_param_group]
    return [g for g in groups if g is not None]


def _fsdp_modules(model: nn.Module) -> Iterator[FSDPModule]:
    seen: set[int] = set()
    for m in model.modules():
        if isinstance(m, FSDPModule) and id(m._get_fsdp_state()) not in seen:
            seen.add(id(m._get_fsdp_state()))  # fully_shard([a, b]) shares one state
            yield m


def fsdp_groups(model: nn.Module) -> list[list[Tensor]]:
    """The sharded parameters of each FSDP parameter group of ``model``, each group in the
    order FSDP sets their gradients."""
    groups: list[list[Tensor]] = []
    for m in _fsdp_modules(model):
        found = _param_groups(m)
        if found is None:
            return _groups_by_module(model)
        groups.extend([fp.sharded_param for fp in g.fsdp_params] for g in found)
    return [g for g in groups if g]


def _groups_by_module(model: nn.Module) -> list[list[Tensor]]:
    """The groups from the module tree: each ``fully_shard`` module's own parameters."""
    owner: dict[int, int] = {}
    params: dict[int, Tensor] = {}
    modules = list(_fsdp_modules(model))
    for i, m in enumerate(modules):  # outer modules first: inner ones overwrite
        for p in m.parameters():
            owner[id(p)] = i
            params[id(p)] = p
    groups: list[list[Tensor]] = [[] for _ in modules]
    for pid, i in owner.items():
        groups[i].append(params[pid])
    return [g for g in groups if g]


def _offloaded(model: nn.Module) -> bool:
    for m in _fsdp_modules(model):
        for g in _param_groups(m) or ():
            if isinstance(getattr(g, "offload_policy", None), CPUOffloadPolicy):
                return True
    return False


def check_fsdp(model: nn.Module, names: dict[int, str]) -> None:
    """Raise ``ValueError`` for an FSDP2 layout the overlap cannot drive, saying what to use."""
    if _offloaded(model):
        raise ValueError(
            "overlap() cannot drive FSDP2 with CPUOffloadPolicy (the sharded gradients are "
            "copied to the host, where the update would race the copy); step the optimizer "
            "after backward instead, or drop the offload policy"
        )
    for p in model.parameters():
        if not isinstance(p, DTensor):
            raise ValueError(
                f"parameter {names.get(id(p), tuple(p.shape))!r} is not sharded by fully_shard; "
                "call fully_shard on the root module too (its remaining parameters join the root's group)"
            )
        mesh = p.device_mesh
        if mesh.ndim != 1 or not all(isinstance(pl, Shard) for pl in p.placements):
            raise ValueError(
                f"parameter {names.get(id(p), '?')!r} is placed {tuple(p.placements)} on a "
                f"{mesh.ndim}-D mesh: overlap() drives FSDP2 on a 1-D mesh only (no HSDP, no "
                "tensor or other parallel dimensions, no replicate()); step the optimizer after "
                "backward for those, or use DDP with overlap(..., shard=True)"
            )
