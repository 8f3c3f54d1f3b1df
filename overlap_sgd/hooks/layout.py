"""Which part of a DDP bucket each rank updates in sharded training.

Two ways to split a bucket of ``N`` elements over ``W`` ranks:

- :class:`ElementLayout`, for element-wise optimizers (SGD, Adam, AdamW, Adagrad, ...): rank
  ``r`` owns the contiguous element range ``[r*c, (r+1)*c)`` of the bucket, ``c = N // W``, and
  the last rank also the ``N % W`` elements after ``W*c``. The range cuts through parameters:
  each parameter it touches contributes a :class:`Piece`. A reduce-scatter of the bucket hands
  every rank exactly its range, summed.
- :class:`ParamLayout`, for optimizers that need whole tensors (Adafactor, Muon, any optimizer
  on the generic path) and for per-parameter norm clipping: each parameter is owned by one
  rank, balanced by size; the bucket is all-reduced and each rank updates its parameters.

A DDP bucket holds each dense parameter's gradient in the parameter's own memory order (its
strides), so element ``i`` of a parameter's memory is element ``offset + i`` of its bucket
slot: pieces are ranges of that memory, taken with :func:`flat`.

Example:
    >>> sizes = [6, 4, 5]                       # three parameters, 15 elements
    >>> [ranges(15, 2, r) for r in range(2)]    # two ranks: 7 and 8 elements
    [(0, 7), (7, 15)]
    >>> [(p.pos, p.lo, p.hi, p.at) for p in pieces_of(sizes, 7, 15)]
    [(1, 1, 4, 0), (2, 0, 5, 3)]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..functional import FunctionalOptimizer
from ..functional.base import dense
from .bucket import BucketPlan

__all__ = ["ElementLayout", "ParamLayout", "Piece", "ShardSegment", "check_dense", "flat", "pieces_of", "ranges"]


def flat(t: Tensor) -> Tensor:
    """``t``'s elements as a 1-D view in memory order (``t`` dense: contiguous or permuted)."""
    if t.is_contiguous():
        return t.detach().view(-1)
    return t.detach().as_strided((t.numel(),), (1,), t.storage_offset())


def ranges(numel: int, world: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s element range of a bucket of ``numel`` elements (see the module docs)."""
    chunk = numel // world
    stop = numel if rank == world - 1 else (rank + 1) * chunk
    return rank * chunk, stop


@dataclass(frozen=True)
class Piece:
    """Elements ``[lo, hi)`` (memory order) of the parameter at bucket position ``pos``, which
    sit at offset ``at`` of the owning rank's range."""

    pos: int
    lo: int
    hi: int
    at: int

    @property
    def numel(self) -> int:
        return self.hi - self.lo


def pieces_of(sizes: Sequence[int], start: int, stop: int) -> list[Piece]:
    """The pieces of parameters of ``sizes`` (in bucket order) inside bucket range [start, stop)."""
    out, offset = [], 0
    for pos, n in enumerate(sizes):
        lo, hi = max(start, offset) - offset, min(stop, offset + n) - offset
        if lo < hi:
            out.append(Piece(pos, lo, hi, offset + lo - start))
        offset += n
    return out


@dataclass
class ShardSegment:
    """The pieces this rank updates for one (optimizer, param group): one kernel call."""

    optimizer: FunctionalOptimizer
    optimizer_index: int
    group_index: int
    pieces: list[Piece]
    #: The parameters the pieces belong to (their state lives under these).
    keys: list[Tensor]
    #: The pieces as flat views of the parameters.
    params: list[Tensor]
    cache: dict[str, Any] = field(default_factory=lambda: {"fast": True})


class ElementLayout:
    """This rank's element range of one bucket, and its pieces per (optimizer, param group).

    Args:
        plan: the bucket's plan.
        world: the number of ranks.
        rank: this rank.
    """

    def __init__(self, plan: BucketPlan, world: int, rank: int):
        self.plan = plan
        self.world, self.rank = world, rank
        self.numel = plan.numel
        #: Elements every rank's range has (the last rank has ``tail`` more).
        self.chunk = plan.numel // world
        self.tail = plan.numel - world * self.chunk
        self.start, self.stop = ranges(plan.numel, world, rank)
        sizes = [p.numel() for p in plan.params]
        #: Every piece of this rank's range, owned by an optimizer or not (for the all-gather).
        self.pieces = pieces_of(sizes, self.start, self.stop)
        by_pos = {pc.pos: pc for pc in self.pieces}
        self.segments: list[ShardSegment] = []
        for seg in plan.segments:
            mine = [by_pos[pos] for pos in seg.positions if pos in by_pos]
            if mine:
                keys = [plan.params[pc.pos] for pc in mine]
                views = [flat(k)[pc.lo : pc.hi] for k, pc in zip(keys, mine)]
                # A group that leaves the kernel to torch gets the fused one on the device only:
                # torch's CPU fused kernels round an element differently in their vectorised
                # body and their scalar tail, so the result would depend on where a range
                # starts, which changes when DDP regroups its buckets or the world size changes
                # (a resumed run would then not match one that never stopped).
                cache = {"fast": plan.device.type != "cpu"}
                self.segments.append(
                    ShardSegment(seg.optimizer, seg.optimizer_index, seg.group_index, mine, keys, views, cache)
                )
        #: Positions of the parameters wholly inside this rank's range.
        self.whole = [pc.pos for pc in self.pieces if pc.lo == 0 and pc.hi == sizes[pc.pos]]
        #: Positions of the parameters an optimizer updates.
        self.owned = set(plan.owned_positions())

    def key(self) -> tuple[Any, ...]:
        """What decides the layout: the bucket's parameters and the ranks."""
        return (tuple(id(p) for p in self.plan.params), self.world, self.rank)

    def grads(self, shard: Tensor) -> dict[int, Tensor]:
        """Bucket position -> that parameter's piece of the gradient shard ``shard``."""
        return {pc.pos: shard[pc.at : pc.at + pc.numel] for pc in self.pieces}

    def pack(self, out: Tensor, shard: Tensor) -> None:
        """Fill ``out`` (this rank's range of the bucket, ``stop - start`` elements) for the
        all-gather: the updated values of the parameters an optimizer updates, and the averaged
        gradient (from ``shard``) of those none does, which keep their values but whose
        ``.grad`` every rank then gets whole, as DDP would give it."""
        if not self.pieces:
            return
        targets, sources = [], []
        for pc in self.pieces:
            targets.append(out[pc.at : pc.at + pc.numel])
            if pc.pos in self.owned:
                sources.append(flat(self.plan.params[pc.pos])[pc.lo : pc.hi])
            else:
                sources.append(shard[pc.at : pc.at + pc.numel])
        torch._foreach_copy_(targets, sources)


def check_dense(params: Sequence[Tensor], names: dict[int, str]) -> None:
    """Raise ``ValueError`` for a parameter whose elements are not packed in memory: sharded
    training addresses parameters by element ranges of their memory."""
    for p in params:
        if not dense(p):
            raise ValueError(
                f"parameter {names.get(id(p), tuple(p.shape))!r} has gaps between its elements "
                f"(strides {p.stride()} for shape {tuple(p.shape)}); sharded training needs dense "
                "parameters: make it contiguous, or use shard=False"
            )


class ParamLayout:
    """Which rank owns each parameter of one bucket, balanced by size.

    Parameters are assigned largest first, each to the rank with the least so far, counting
    what earlier buckets already gave each rank (``loads``, updated in place) so that a model
    of many small buckets is balanced too. Every rank builds the same layouts in the same
    order, so they agree without communicating.

    Args:
        plan: the bucket's plan.
        world: the number of ranks.
        rank: this rank.
        loads: elements assigned to each rank by earlier buckets (updated).
    """

    def __init__(self, plan: BucketPlan, world: int, rank: int, loads: list[int]):
        self.plan = plan
        self.world, self.rank = world, rank
        owned = sorted(plan.owned_positions(), key=lambda pos: (-plan.params[pos].numel(), pos))
        #: Bucket position -> owning rank, for the parameters an optimizer updates.
        self.owner: dict[int, int] = {}
        mine_numel = [0] * world
        for pos in owned:
            r = min(range(world), key=lambda i: (loads[i], i))
            n = plan.params[pos].numel()
            self.owner[pos] = r
            loads[r] += n
            mine_numel[r] += n
        #: Positions each rank owns, in bucket order.
        self.positions = [sorted(p for p, r in self.owner.items() if r == i) for i in range(world)]
        #: Elements of the largest rank's share: the all-gather's slot per rank.
        self.slot = max(mine_numel) if mine_numel else 0

    def mine(self) -> list[int]:
        """Positions this rank updates."""
        return self.positions[self.rank]
