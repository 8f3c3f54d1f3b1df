"""Drift detection: are the parameters and optimizer state identical on every rank?

DDP keeps replicas identical only as long as every rank applies the same update to the same
values. A bit flip, a rank-local bug or a non-deterministic kernel breaks that silently.
:func:`check_consistency` checksums every parameter and every optimizer state tensor, gathers the
checksums from all ranks and raises on the first tensor that differs, naming it.

The checksum of a tensor is the 64-bit sum of its raw bits (its elements reinterpreted as
integers of the same width) together with the float64 sum of its values, so any change of a
single element is caught, not only changes large enough to move a float sum.

Example (on every rank, e.g. every 100 steps)::

    overlap_sgd.check_consistency(ddp_model)          # raises ConsistencyError on drift
    opt = overlap_sgd.overlap(ddp_model, opt, check_consistency_every=100)  # or automatically
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from .attached import overlapped_optimizers

__all__ = ["ConsistencyError", "check_consistency", "checksums"]

_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class ConsistencyError(RuntimeError):
    """Ranks disagree on a parameter or optimizer state tensor."""

    def __init__(self, name: str, ranks: list[int], detail: str = ""):
        self.name = name
        self.ranks = ranks
        super().__init__(
            f"ranks disagree on {name} (differs from rank 0 on ranks {ranks}){detail}"
        )


def _checksum(t: Tensor) -> tuple[int, float]:
    t = t.detach()
    if t.is_sparse:
        t = t.coalesce().values()
    if t.is_complex():
        t = torch.view_as_real(t)
    flat = t.contiguous().reshape(-1)
    bits = flat.view(_INT_OF_WIDTH[flat.element_size()]).sum(dtype=torch.int64)
    total = flat.to(torch.float64).sum() if flat.is_floating_point() else flat.sum(dtype=torch.float64)
    return int(bits), float(total)


def _named_tensors(model: nn.Module, optimizers: Sequence[Optimizer]) -> Iterable[tuple[str, Tensor]]:
    names = {}
    for name, p in model.named_parameters():
        names[id(p)] = name
        yield f"parameter {name!r}", p
    for i, opt in enumerate(optimizers):
        for gi, group in enumerate(opt.param_groups):
            for pi, p in enumerate(group["params"]):
                pname = names.get(id(p), f"group {gi} param {pi}")
                for key in sorted(opt.state.get(p, {})):
                    value = opt.state[p][key]
                    if isinstance(value, Tensor):
                        yield f"optimizer {i} state[{pname!r}][{key!r}]", value


def checksums(model: nn.Module, optimizers: Sequence[Optimizer] = ()) -> list[tuple[str, int, float]]:
    """``(name, bit-sum, value-sum)`` for every parameter and optimizer state tensor."""
    return [(name, *_checksum(t)) for name, t in _named_tensors(model, optimizers)]


def check_consistency(
    model: nn.Module,
    optimizers: Optimizer | Sequence[Optimizer] | None = None,
    group: dist.ProcessGroup | None = None,
) -> None:
    """Raise :class:`ConsistencyError` unless every rank holds identical tensors.

    A collective: call it on every rank at the same point. ``model`` may be the DDP model or
    its module. ``optimizers`` defaults to the optimizers overlapped on ``model`` by
    :func:`overlap_sgd.overlap` (none if it was not overlapped).
    """
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if optimizers is None:
        optimizers = overlapped_optimizers(model)
    elif isinstance(optimizers, Optimizer):
        optimizers = [optimizers]
    local = checksums(module, list(optimizers))
    gathered: list[list[tuple[str, int, float]] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, local, group=group)
    reference = gathered[0]
    assert reference is not None
    for rank, theirs in enumerate(gathered[1:], start=1):
        assert theirs is not None
        if len(theirs) != len(reference):
            mine = {n for n, *_ in reference}
            extra = [n for n, *_ in theirs if n not in mine] or [n for n in mine if n not in {m for m, *_ in theirs}]
            raise ConsistencyError(
                extra[0] if extra else "the set of tensors", [rank],
                f": rank 0 has {len(reference)} tensors, rank {rank} has {len(theirs)}",
            )
    for i, (name, bits, total) in enumerate(reference):
        bad = [r for r, theirs in enumerate(gathered[1:], start=1) if theirs[i][1] != bits]
        if bad:
            sums = ", ".join(f"rank {r}: {gathered[r][i][2]:.9g}" for r in [0, *bad])
            raise ConsistencyError(name, bad, f"; value sums {sums}")
