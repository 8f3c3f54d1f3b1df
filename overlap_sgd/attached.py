"""What :func:`~overlap_sgd.overlap` leaves on a DDP model, and the lookups that read it.

``overlap`` keeps the model's hook state under one attribute of the DDP model; the modules that
need it later (drift checks, distributed checkpoints) read it through this module, which imports
nothing else of the package, so none of them has to import :mod:`overlap_sgd.drop_in`.

Example:
    >>> import torch
    >>> from overlap_sgd.attached import overlapped_optimizers, uncompiled
    >>> net = torch.nn.Linear(2, 2)
    >>> uncompiled(net) is net
    True
    >>> overlapped_optimizers(net)   # nothing overlapped on it
    []
"""

from __future__ import annotations

import sys

from typing import Any

from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

__all__ = ["STATE_ATTR", "hook_state", "is_fsdp", "overlapped_optimizers", "trainable_parameters", "uncompiled"]

#: The attribute of an overlapped DDP model that holds its hook state.
STATE_ATTR = "_overlap_sgd_state"


def uncompiled(model: Any) -> Any:
    """The module inside ``torch.compile(model)`` (the model itself if not compiled)."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(model, nn.Module) and isinstance(inner, nn.Module) else model


def trainable_parameters(ddp_model: DistributedDataParallel) -> dict[str, Tensor]:
    """The parameters DDP synchronises: ``requires_grad``, not ignored, tied ones once."""
    ignored = getattr(ddp_model, "parameters_to_ignore", set())
    return {
        name: p
        for name, p in ddp_model.module.named_parameters()
        if p.requires_grad and name not in ignored
    }


def hook_state(model: Any) -> Any:
    """The hook state :func:`~overlap_sgd.overlap` registered on ``model`` (``None`` if none)."""
    return getattr(uncompiled(model), STATE_ATTR, None)


def overlapped_optimizers(ddp_model: nn.Module) -> list[Optimizer]:
    """The torch optimizers :func:`~overlap_sgd.overlap` wrapped on ``ddp_model`` (empty if none)."""
    return [w.optimizer for w in getattr(hook_state(ddp_model), "wrapped", [])]


def is_fsdp(model: Any) -> bool:
    """Whether ``model`` is an FSDP2 module (``fully_shard``), without importing FSDP: a model
    can only be one once ``torch.distributed.fsdp`` was imported (importing it changes how a
    process ends, which a DDP-only job must not pay for)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)
