"""Hugging Face Accelerate: overlap what ``Accelerator.prepare`` returns.

``prepare`` hands back a DDP-wrapped model and an ``AcceleratedOptimizer``, a thin wrapper
whose ``step`` and ``zero_grad`` run the inner torch optimizer's only on the micro-step that
synchronises gradients (``accelerator.accumulate``). :func:`overlap_sgd.overlap` overlaps the
inner optimizer and puts the resulting :class:`~overlap_sgd.OverlappedOptimizer` inside the same
wrapper, which it returns: the loop keeps Accelerate's gating, ``accelerator.save_state`` /
``load_state`` read and write the inner optimizer's exact state dict, and the update runs
inside the synchronising ``accelerator.backward(loss)``. Nothing here imports ``accelerate``:
an optimizer is recognised only when the ``accelerate`` package is already loaded.

Example (one rank of an ``accelerate launch`` or ``torchrun`` job)::

    accelerator = Accelerator(gradient_accumulation_steps=4)
    model, opt, sched = accelerator.prepare(net, opt, sched)
    opt = overlap_sgd.overlap(model, opt)         # still the AcceleratedOptimizer
    for x, y in data:
        with accelerator.accumulate(model):
            accelerator.backward(loss_fn(model(x), y))   # buckets are updated here
            opt.step()
            sched.step()
            opt.zero_grad()
"""

from __future__ import annotations

import sys
from typing import Any

from torch.optim import Optimizer

__all__ = ["attach", "is_accelerated", "route_clip_grad_norm", "unwrap"]


def is_accelerated(optimizer: Any) -> bool:
    """Whether ``optimizer`` is an ``accelerate`` ``AcceleratedOptimizer``.

    Example:
        >>> import torch
        >>> is_accelerated(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
        False
    """
    module = sys.modules.get("accelerate.optimizer")
    cls = getattr(module, "AcceleratedOptimizer", None)
    return cls is not None and isinstance(optimizer, cls)


def unwrap(optimizer: Any) -> Optimizer:
    """The torch optimizer inside the ``AcceleratedOptimizer`` ``optimizer``.

    Raises:
        TypeError: Accelerate drives this optimizer with a gradient scaler
            (``mixed_precision="fp16"``), which would unscale and check gradients only after
            the overlapped update had used them; or the wrapper holds no torch optimizer.
    """
    scaler = getattr(optimizer, "scaler", None)
    if scaler is not None:
        raise TypeError(
            "this AcceleratedOptimizer is driven by a gradient scaler "
            f"({type(scaler).__name__}, from Accelerator(mixed_precision='fp16')), which cannot "
            "unscale or check the gradients before an update that runs inside backward(). Use "
            "Accelerator(mixed_precision='bf16'), which needs no loss scaling."
        )
    inner = getattr(optimizer, "optimizer", None)
    if not isinstance(inner, Optimizer):
        raise TypeError(
            "the AcceleratedOptimizer does not wrap a torch.optim.Optimizer, got "
            f"{type(inner).__name__}"
        )
    return inner


def attach(accelerated: Any, overlapped: Optimizer) -> Any:
    """Put ``overlapped`` inside the ``AcceleratedOptimizer`` ``accelerated`` and return it.

    Its ``step`` (on a synchronising micro-step) then closes the overlapped step, and its
    ``zero_grad``, ``state_dict`` and ``load_state_dict`` act on the overlapped optimizer, which
    shares the torch optimizer's param groups and state. ``accelerator.clip_grad_norm_`` is
    routed to the overlapped optimizer's own clipping (:func:`route_clip_grad_norm`).
    """
    accelerated.optimizer = overlapped
    route_clip_grad_norm()
    return accelerated


def route_clip_grad_norm() -> None:
    """Make ``Accelerator.clip_grad_norm_`` clip through an overlapped optimizer's global-norm
    clipping (``overlap(..., clip_grad_norm=...)``) where the accelerator holds one whose
    parameters it is asked to clip; elsewhere it runs as before. Installed once."""
    module = sys.modules.get("accelerate.accelerator")
    cls = getattr(module, "Accelerator", None)
    if cls is None or getattr(cls.clip_grad_norm_, "_overlap_sgd_routed", False):
        return
    original = cls.clip_grad_norm_

    def clip_grad_norm_(self: Any, parameters: Any, max_norm: float, norm_type: float = 2) -> Any:
        parameters = list(parameters) if not hasattr(parameters, "shape") else [parameters]
        given = {id(p) for p in parameters}
        for wrapper in getattr(self, "_optimizers", ()):
            overlapped = getattr(wrapper, "optimizer", None)
            clipper = getattr(getattr(overlapped, "hook_state", None), "clipper", None)
            if clipper is None:
                continue
            mine = {id(p) for p in clipper.params}
            if mine & given:
                if not mine <= given:
                    raise ValueError(
                        "accelerator.clip_grad_norm_ got only some of an overlapped model's "
                        "parameters; its clipping takes the global norm over all of them: pass "
                        "model.parameters()"
                    )
                return overlapped.clip_grad_norm_(max_norm, norm_type)
        return original(self, parameters, max_norm, norm_type)

    clip_grad_norm_._overlap_sgd_routed = True  # type: ignore[attr-defined]
    clip_grad_norm_.__doc__ = original.__doc__
    cls.clip_grad_norm_ = clip_grad_norm_
