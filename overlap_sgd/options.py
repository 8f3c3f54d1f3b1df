"""``OverlapOptions``: the keyword options of :func:`~overlap_sgd.overlap`, checked once.

:func:`~overlap_sgd.overlap` builds one of these from its arguments before it touches the model,
so a wrong type or value raises ``TypeError``/``ValueError`` naming the argument and carrying the
value, with nothing registered. The object is frozen; the clipping options are also kept in the
form the hooks take (:attr:`OverlapOptions.clip`, :attr:`OverlapOptions.norm_clip`).

Example:
    >>> from overlap_sgd.options import OverlapOptions
    >>> OverlapOptions(clip_grad_norm=1.0).norm_clip.max_norm
    1.0
    >>> OverlapOptions(slice_mb=0)
    Traceback (most recent call last):
        ...
    ValueError: slice_mb must be positive, got 0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .hooks import Executor
from .hooks.clip import GradClip
from .hooks.norm_clip import ClipGradNorm, check_max_norm

__all__ = ["OverlapOptions"]


@dataclass(frozen=True)
class OverlapOptions:
    """The options of :func:`~overlap_sgd.overlap` after the optimizers, validated.

    Each field is the :func:`~overlap_sgd.overlap` argument of the same name, with the same
    default; see there for what it means.

    Raises:
        TypeError: an option of the wrong type (the message names it and its type).
        ValueError: an option out of range (the message names it and its value).
    """

    comm_hook: Callable[..., torch.futures.Future] | None = None
    comm_state: Any = None
    executor: str | Executor = "auto"
    check_finite: bool | str = False
    clip_grad_value: float | None = None
    clip_grad_norm: float | ClipGradNorm | None = None
    clip_grad_norm_per_param: float | None = None
    check_consistency_every: int = 0
    slice_mb: float | str | None = "auto"
    grad_views: bool = True
    shard: bool = False
    #: Per-parameter clipping, as the bucket hooks take it.
    clip: GradClip = field(init=False, repr=False, compare=False)
    #: Global-norm clipping, or ``None`` without it.
    norm_clip: ClipGradNorm | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.comm_hook is not None and not callable(self.comm_hook):
            raise TypeError(f"comm_hook must be a DDP communication hook, got {self.comm_hook!r}")
        if not isinstance(self.executor, (str, Executor)):
            raise TypeError(f"executor must be a str or an Executor, got {type(self.executor).__name__}")
        _check_finite_option(self.check_finite)
        for name in ("grad_views", "shard"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        object.__setattr__(self, "clip", GradClip(self.clip_grad_value, self.clip_grad_norm_per_param))
        if self.clip_grad_norm is not None and not isinstance(self.clip_grad_norm, ClipGradNorm):
            check_max_norm(self.clip_grad_norm, "clip_grad_norm")
        object.__setattr__(self, "norm_clip", ClipGradNorm.of(self.clip_grad_norm))
        _check_consistency_every(self.check_consistency_every)
        _check_slice_mb(self.slice_mb)


def _check_finite_option(value: Any) -> None:
    if isinstance(value, str):
        if value not in ("backward", "step"):
            raise ValueError(f"check_finite must be a bool, 'backward' or 'step', got {value!r}")
    elif not isinstance(value, bool):
        raise TypeError(f"check_finite must be a bool, 'backward' or 'step', got {type(value).__name__}")


def _check_consistency_every(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"check_consistency_every must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"check_consistency_every must be >= 0, got {value}")


def _check_slice_mb(value: Any) -> None:
    if value is None or value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"slice_mb must be a number, 'auto' or None, got {value!r}")
    if not value > 0:
        raise ValueError(f"slice_mb must be positive, got {value}")
