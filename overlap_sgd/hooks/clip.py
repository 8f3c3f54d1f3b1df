"""Gradient clipping that can be done correctly inside a bucket update.

Clipping by the *global* norm needs every gradient of the model: that is
:mod:`overlap_sgd.hooks.norm_clip` (``overlap(..., clip_grad_norm=...)``). What a bucket update
can do on its own, exactly, is clip each parameter's gradient separately:

- ``value``: clamp every gradient element to ``[-value, value]``
  (``torch.nn.utils.clip_grad_value_`` applied to each parameter);
- ``norm``: rescale each parameter's gradient whose L2 norm exceeds ``norm`` down to ``norm``
  (``torch.nn.utils.clip_grad_norm_([p], norm)`` applied to each parameter separately;
  ``overlap(..., clip_grad_norm_per_param=...)``).

Both act on the communicated (averaged) gradient, value first, and in place, so the gradients
left in ``param.grad`` after ``backward()`` are the clipped ones the update used. Sparse
gradients are not clipped.

Example:
    >>> import torch
    >>> from overlap_sgd.hooks.clip import GradClip
    >>> g = [torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4])]
    >>> GradClip(norm=1.0).apply(g)
    >>> [round(float(x.norm()), 4) for x in g]
    [1.0, 0.5]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["GradClip"]


@dataclass(frozen=True)
class GradClip:
    """Per-parameter clipping options; see the module docs."""

    value: float | None = None
    norm: float | None = None

    def __post_init__(self) -> None:
        for name, option in (("value", "clip_grad_value"), ("norm", "clip_grad_norm_per_param")):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{option} must be a number or None, got {type(v).__name__}")
            if not v > 0:
                raise ValueError(f"{option} must be positive, got {v}")

    @property
    def active(self) -> bool:
        return self.value is not None or self.norm is not None

    def apply(self, grads: list[Tensor]) -> None:
        """Clip ``grads`` in place. Sparse gradients are left as they are."""
        dense = [g for g in grads if not g.is_sparse]
        if not dense:
            return
        if self.value is not None:
            torch._foreach_clamp_min_(dense, -self.value)
            torch._foreach_clamp_max_(dense, self.value)
        if self.norm is not None:
            norms = torch.stack([n.to(torch.float32) for n in torch._foreach_norm(dense)])
            coef = (self.norm / (norms + 1e-6)).clamp_(max=1.0)
            torch._foreach_mul_(dense, [c.to(g.dtype) for c, g in zip(coef.unbind(), dense)])
