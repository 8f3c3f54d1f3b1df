"""Where each parameter's optimizer state lives in sharded training, and moving it.

A parameter's state has a *home*:

- none (the default): whole, the same on every rank, as a plain optimizer keeps it (before the
  first backward, after ``load_state_dict``);
- :class:`ElementHome`: element ranges of the parameter's memory, each rank holding its range's
  piece (1-D tensors) of every element-wise state tensor, plus the parameter's scalar state
  (``step``); a rank whose range misses the parameter holds no entry at all;
- :class:`OwnerHome`: whole, on one rank only.

:meth:`StateShards.claim` moves parameters to new homes when the hook builds a bucket's layout:
from a whole state by slicing locally, from an old sharded home (DDP regrouped its buckets) by
gathering it first. :meth:`StateShards.gather` reassembles whole states, for ``state_dict()``.
Both are collectives over the model's process group: every rank calls them alike, which the
hook guarantees by building layouts in bucket order on every rank.

Example:
    >>> home = ElementHome(offset=4, numel=6, bucket=12, world=2)   # elements 4..9 of 12
    >>> home.piece(0), home.piece(1), home.lead
    ((0, 2), (2, 6), 0)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.distributed as dist
from torch import Tensor

from ..functional import FunctionalOptimizer
from .layout import flat, ranges

__all__ = ["ElementHome", "OwnerHome", "StateShards"]


@dataclass(frozen=True)
class ElementHome:
    """The parameter occupies elements ``[offset, offset + numel)`` of a bucket of ``bucket``
    elements, split over ``world`` ranks as :func:`~overlap_sgd.hooks.layout.ranges` says."""

    offset: int
    numel: int
    bucket: int
    world: int

    def piece(self, rank: int) -> tuple[int, int] | None:
        """Rank ``rank``'s element range of the parameter, or ``None``."""
        start, stop = ranges(self.bucket, self.world, rank)
        lo, hi = max(start, self.offset) - self.offset, min(stop, self.offset + self.numel) - self.offset
        return (lo, hi) if lo < hi else None

    @property
    def lead(self) -> int:
        """The rank holding the parameter's first element (it holds its scalar state too)."""
        return next(r for r in range(self.world) if self.piece(r) is not None and self.piece(r)[0] == 0)


@dataclass(frozen=True)
class OwnerHome:
    """The parameter's state is whole, on rank ``rank``."""

    rank: int

    @property
    def lead(self) -> int:
        return self.rank


Home = Union[ElementHome, OwnerHome]


class StateShards:
    """The homes of the parameters' optimizer states, over one process group.

    Args:
        optimizers: the functional optimizers holding the states.
        group: the process group (the DDP model's).
    """

    def __init__(self, optimizers: Sequence[FunctionalOptimizer], group: dist.ProcessGroup | None):
        self.optimizers = list(optimizers)
        self.group = group
        self.rank = dist.get_rank(group)
        self._homes: dict[int, tuple[Tensor, Home]] = {}
        #: Count of parameters whose state was gathered to move to a new home.
        self.moved = 0

    def home(self, param: Tensor) -> Home | None:
        entry = self._homes.get(id(param))
        return None if entry is None else entry[1]

    def forget(self, params: Sequence[Tensor]) -> None:
        """The states of ``params`` are whole on every rank again (``load_state_dict``)."""
        for p in params:
            self._homes.pop(id(p), None)

    def adopt(self, assignments: Sequence[tuple[Tensor, Home]]) -> None:
        """Record that each parameter's state already sits in its ``home`` on every rank (a
        sharded checkpoint load put this rank's share there); nothing moves."""
        for p, home in assignments:
            self._homes[id(p)] = (p, home)

    def _state_of(self, param: Tensor) -> dict[Any, dict[str, Any]]:
        for opt in self.optimizers:
            if opt.group_index(param) is not None:
                return opt.state
        raise KeyError(f"no optimizer holds the parameter of shape {tuple(param.shape)}")

    # -- moving states -----------------------------------------------------------------------

    def claim(self, assignments: Sequence[tuple[Tensor, Home]]) -> None:
        """Move each parameter's state to its new home (a collective where any had an old
        sharded home; every rank passes the same parameters and homes)."""
        moving = [p for p, home in assignments if self.home(p) is not None and self.home(p) != home]
        if moving:
            self.moved += len(moving)
            whole = self.gather(moving)
            for p in moving:
                state = self._state_of(p)
                state.pop(p, None)
                if p in whole:
                    state[p] = whole[p]
                del self._homes[id(p)]
        for p, home in assignments:
            if self.home(p) == home:
                continue
            self._slice(p, home)
            self._homes[id(p)] = (p, home)

    def _slice(self, param: Tensor, home: Home) -> None:
        """Cut a whole state down to this rank's share of ``home``."""
        state = self._state_of(param)
        entry = state.get(param)
        if not entry:
            state.pop(param, None)
            return
        if isinstance(home, OwnerHome):
            if home.rank != self.rank:
                del state[param]
            return
        piece = home.piece(self.rank)
        if piece is None:
            del state[param]
            return
        lo, hi = piece
        for key, value in list(entry.items()):
            if isinstance(value, Tensor) and value.dim() > 0:
                if value.shape != param.shape:
                    raise ValueError(
                        f"state {key!r} of shape {tuple(value.shape)} does not match its parameter's "
                        f"{tuple(param.shape)}: the optimizer's update is not element-wise"
                    )
                entry[key] = flat(value)[lo:hi].clone()

    def gather(self, params: Sequence[Tensor]) -> dict[Tensor, dict[str, Any]]:
        """The whole state of each of ``params`` (a collective; every rank gets all of it).

        Parameters without state on any rank are left out.
        """
        out: dict[Tensor, dict[str, Any]] = {}
        sharded = []
        for p in params:
            if self.home(p) is None:
                entry = self._state_of(p).get(p)
                if entry:
                    out[p] = dict(entry)
            else:
                sharded.append(p)
        if not sharded:
            return out
        metas: list[Any] = [None] * dist.get_world_size(self.group)
        mine_meta = [_describe(self._state_of(p).get(p), self.home(p)) for p in sharded]
        dist.all_gather_object(metas, mine_meta, group=self.group)
        for i, p in enumerate(sharded):
            home = self.home(p)
            keys: dict[str, tuple[Any, ...]] = {}
            for rank_meta in metas:
                for key, desc in rank_meta[i].items():
                    keys.setdefault(key, desc)
            if not keys:
                continue
            mine = self._state_of(p).get(p) or {}
            entry: dict[str, Any] = {}
            for key, desc in keys.items():
                entry[key] = self._assemble(p, home, key, desc, mine.get(key), metas, i)
            out[p] = entry
        return out

    def _assemble(self, p: Tensor, home: Home, key: str, desc: tuple[Any, ...], value: Any,
                  metas: list[Any], i: int) -> Any:
        kind = desc[0]
        if kind == "object":
            return metas[home.lead][i][key][1]
        _, dtype_name, device_name, shape = desc
        dtype, device = getattr(torch, dtype_name), torch.device(device_name)
        wire = _wire_device(self.group, p.device)
        if kind == "piece":  # element-wise state: every rank adds its piece into zeros
            whole = torch.zeros(p.numel(), dtype=dtype, device=wire)
            piece = home.piece(self.rank)
            if value is not None and piece is not None:
                whole[piece[0] : piece[1]].copy_(value.reshape(-1))
            dist.all_reduce(whole, group=self.group)
            result = torch.empty_like(p, dtype=dtype, device=device, memory_format=torch.preserve_format)
            flat(result).copy_(whole)
            return result
        # "tensor": a whole tensor (a scalar such as ``step``, or an owner's state): the lead sends it
        buf = value.to(wire) if value is not None and self.rank == home.lead else torch.empty(shape, dtype=dtype, device=wire)
        src = home.lead if self.group is None else dist.get_global_rank(self.group, home.lead)
        dist.broadcast(buf, src=src, group=self.group)
        return buf.to(device)


def _describe(entry: dict[str, Any] | None, home: Home | None) -> dict[str, tuple[Any, ...]]:
    """What a rank holds of one parameter's state, for the others to allocate alike: with an
    element home, tensors with dimensions are pieces and 0-dim ones whole scalars."""
    out: dict[str, tuple[Any, ...]] = {}
    for key, value in (entry or {}).items():
        if isinstance(value, Tensor):
            kind = "piece" if isinstance(home, ElementHome) and value.dim() > 0 else "tensor"
            out[key] = (kind, str(value.dtype).removeprefix("torch."), str(value.device), tuple(value.shape))
        else:
            out[key] = ("object", value)
    return out


def _wire_device(group: dist.ProcessGroup | None, device: torch.device) -> torch.device:
    """Where a tensor must be for the group's collectives (NCCL: a CUDA device)."""
    if device.type != "cuda" and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return device
