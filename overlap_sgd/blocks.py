"""A range of a dense tensor's elements, in memory order, as rectangular blocks of its shape.

Sharded training keeps a parameter's optimizer state as element ranges of the parameter's
memory (:func:`overlap_sgd.hooks.layout.flat`), while a distributed checkpoint stores a tensor
as rectangular chunks of its shape. A range of a row-major tensor's elements is a few such
blocks, at most ``2 * ndim - 1``: the tail of a first partial row (recursively), whole rows,
the head of a last partial row (recursively). Each block is one contiguous slice of the range,
so the blocks of a piece are views of it, copied nowhere. A tensor laid out in another dense
order (``channels_last``, a transposed matrix) is row-major in its dims sorted by stride, and
its blocks are found there and permuted back.

Example:
    >>> [(b.start, b.offsets, b.sizes) for b in blocks((3, 4), 2, 11)]
    [(2, (0, 2), (1, 2)), (4, (1, 0), (1, 4)), (8, (2, 0), (1, 3))]
    >>> import torch
    >>> t = torch.arange(12.0).reshape(3, 4)
    >>> cut = RangeBlocks(t, 2, 11)
    >>> [v.tolist() for v in cut.views(t.view(-1)[2:11])]
    [[[2.0, 3.0]], [[4.0, 5.0, 6.0, 7.0]], [[8.0, 9.0, 10.0]]]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

__all__ = ["Block", "RangeBlocks", "blocks", "memory_order"]


@dataclass(frozen=True)
class Block:
    """Elements ``offsets .. offsets + sizes`` of a tensor; ``start`` is the flat index of its
    first element."""

    start: int
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


def blocks(shape: Sequence[int], lo: int, hi: int) -> list[Block]:
    """The elements ``[lo, hi)`` of a row-major tensor of ``shape``, as blocks in flat order."""
    shape = tuple(shape)
    numel = math.prod(shape)
    if not 0 <= lo <= hi <= numel:
        raise ValueError(f"element range [{lo}, {hi}) is not inside a tensor of shape {shape}")
    out: list[Block] = []
    _cut(shape, lo, hi, 0, (), out)
    return out


def _cut(shape: tuple[int, ...], lo: int, hi: int, base: int, prefix: tuple[int, ...], out: list[Block]) -> None:
    """Append the blocks of ``[lo, hi)`` of a tensor of ``shape`` sitting at ``prefix`` (fixed
    leading indices) and flat index ``base`` of the whole tensor."""
    if lo >= hi:
        return
    ones = (1,) * len(prefix)
    if not shape:
        out.append(Block(base, prefix, ones))
        return
    row = math.prod(shape[1:])
    rest = shape[1:]
    if lo % row:  # the tail of a partial first row
        r = lo // row
        stop = min(hi, (r + 1) * row)
        _cut(rest, lo - r * row, stop - r * row, base + r * row, prefix + (r,), out)
        lo = stop
    full = (hi - lo) // row
    if full:
        r = lo // row
        out.append(Block(base + lo, prefix + (r,) + (0,) * len(rest), ones + (full,) + rest))
        lo += full * row
    if lo < hi:  # the head of a partial last row
        r = lo // row
        _cut(rest, 0, hi - r * row, base + r * row, prefix + (r,), out)


def memory_order(t: Tensor) -> tuple[int, ...]:
    """The dims of the dense tensor ``t`` from the outermost in memory to the innermost:
    ``t.permute(memory_order(t))`` is contiguous."""
    order = tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), d)))
    if not t.permute(order).is_contiguous():
        raise ValueError(f"a tensor of shape {tuple(t.shape)} and strides {t.stride()} has gaps between its elements")
    return order


class RangeBlocks:
    """The elements ``[lo, hi)`` of the memory of a dense tensor like ``like``, as blocks of
    ``like``'s own shape (see the module docs).

    Args:
        like: a tensor of the shape and layout (strides) whose memory is cut.
        lo, hi: the element range, in memory order.
    """

    def __init__(self, like: Tensor, lo: int, hi: int):
        self.shape = tuple(like.shape)
        self.lo, self.hi = lo, hi
        self.order = memory_order(like)
        #: Where each of ``like``'s dims sits in memory order.
        self.inverse = tuple(sorted(range(len(self.order)), key=lambda d: self.order[d]))
        in_memory = blocks([self.shape[d] for d in self.order], lo, hi)
        #: The blocks in memory order (offsets and sizes in memory-ordered dims).
        self.in_memory = in_memory
        #: The same blocks in ``like``'s dims.
        self.blocks = [
            Block(b.start, self._to_own(b.offsets), self._to_own(b.sizes)) for b in in_memory
        ]

    def _to_own(self, dims: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(dims[self.inverse[d]] for d in range(len(self.order)))

    def views(self, piece: Tensor) -> list[Tensor]:
        """Each block as a view of ``piece`` (the range's ``hi - lo`` elements, 1-D), shaped in
        ``like``'s dims. A view is not contiguous where ``like``'s layout is not row-major."""
        if piece.dim() != 1 or piece.numel() != self.hi - self.lo:
            raise ValueError(
                f"a piece of {self.hi - self.lo} elements was expected, got shape {tuple(piece.shape)}"
            )
        out = []
        for b in self.in_memory:
            at = b.start - self.lo
            out.append(piece[at : at + b.numel].view(b.sizes).permute(self.inverse))
        return out
