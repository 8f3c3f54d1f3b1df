"""The generic path: any per-parameter optimizer, stepped on one bucket at a time.

An optimizer class that nobody registered still overlaps, correctly if less fast than a
registered one. The update of a bucket runs the optimizer's own ``step`` algorithm with its param
groups restricted to that bucket's parameters and with each ``param.grad`` pointing at the
communicated gradient for the duration of the call.

The condition this relies on: **the update is per parameter**. What the optimizer computes for a
parameter may depend only on that parameter, its gradient, its ``state[param]`` and its param
group's hyperparameters. Every ``torch.optim`` optimizer except ``LBFGS`` satisfies it, as do most
user optimizers (Lion, Sophia-style diagonal methods, ...). Optimizers that need the whole
model at once (a global line search, a global gradient norm, a step counter kept on the
optimizer object rather than in ``state[param]``) do not: declare them with
:func:`overlap_sgd.registry.register_global` so that :func:`overlap_sgd.overlap` refuses them with
your reason instead of training them wrongly.

How the restriction works: the step runs on a *view* of the optimizer, an instance of the same
class that shares ``state`` and ``defaults`` but whose ``param_groups`` hold one group, a copy of
the real group with ``params`` narrowed to the bucket. Writes the step makes to that group are
written through to the real one. The step's hooks (``register_step_pre_hook``) are not run per
bucket; they run when the training loop calls ``step()``. Each call builds its own view and
touches only its own parameters' ``.grad``, so concurrent bucket updates do not interfere.

Example:
    >>> import torch
    >>> from overlap_sgd.functional.generic import StepRestricted
    >>> a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    >>> rms = torch.optim.RMSprop([a, b], lr=0.1)
    >>> f = StepRestricted.bind(rms)
    >>> f.step_param(a, torch.ones(2))       # b is left alone
    >>> bool((a < 1).all()), bool((b == 1).all())
    (True, True)
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .base import FunctionalOptimizer

__all__ = ["StepRestricted", "restricted"]


class _GroupView(dict):
    """A param group narrowed to some parameters; other writes go through to the real group."""

    def __init__(self, group: dict[str, Any], params: list[Tensor]):
        super().__init__(group)
        dict.__setitem__(self, "params", params)
        self._group = group

    def __setitem__(self, key: str, value: Any) -> None:
        dict.__setitem__(self, key, value)
        if key != "params":
            self._group[key] = value


def _raw_step(cls: type[Optimizer]) -> Callable[..., Any]:
    """The class's ``step`` without torch's hook/profiling wrappers."""
    return inspect.unwrap(cls.step)


class StepRestricted(FunctionalOptimizer):
    """A functional optimizer that runs the holder's own ``step`` on a subset of parameters.

    Works for any ``torch.optim.Optimizer`` whose update is per parameter (see the module docs).
    ``bind`` accepts any optimizer; subclasses made by :func:`restricted` fix the class.
    """

    torch_optimizer = Optimizer
    # Sparse support is the wrapped optimizer's business: its own step raises if it has none.
    supports_sparse = True

    def __init__(self, params: Any, **hyperparameters: Any):
        if self.torch_optimizer is Optimizer:
            raise TypeError(
                "StepRestricted cannot build an optimizer itself; use StepRestricted.bind(optimizer) "
                "or a class made by restricted(OptimizerClass)"
            )
        super().__init__(params, **hyperparameters)

    def _init_holder(self, holder: Optimizer) -> None:
        super()._init_holder(holder)
        self._step = _raw_step(type(holder))

    def _view(self, group: dict[str, Any], params: list[Tensor]) -> Optimizer:
        holder = self._holder
        view = object.__new__(type(holder))
        view.__dict__.update(holder.__dict__)
        view.__dict__["param_groups"] = [_GroupView(group, params)]
        view.__dict__.pop("step", None)  # an instance-level step (an overlap router) must not run
        return view

    def _update(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        cache: dict[str, Any],
        keys: list[Tensor] | None = None,
    ) -> None:
        saved = [p.grad for p in params]
        try:
            for p, g in zip(params, grads):
                p.grad = g
            view = self._view(group, params)
            if keys is None:
                self._step(view)
                return
            # Pieces of parameters: the step sees each piece's state under the piece, and
            # whatever it leaves there goes back under the parameter it belongs to.
            state = self._holder.state
            pieces = defaultdict(dict, {p: state[k] for p, k in zip(params, keys) if k in state})
            view.__dict__["state"] = pieces
            self._step(view)
            for p, k in zip(params, keys):
                if p in pieces:
                    state[k] = pieces[p]
        finally:
            for p, s in zip(params, saved):
                p.grad = s


def restricted(optimizer: type[Optimizer], elementwise: bool = False) -> type[StepRestricted]:
    """A :class:`StepRestricted` subclass fixed to ``optimizer`` (constructible like it).

    Example:
        >>> import torch
        >>> from overlap_sgd.functional.generic import restricted
        >>> FunctionalRprop = restricted(torch.optim.Rprop)
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> FunctionalRprop([w], lr=0.1).step_param(w, torch.tensor([1.0, -1.0]))
        >>> w.detach()
        tensor([-0.1000,  0.1000])
    """
    name = f"Functional{optimizer.__name__}"
    return type(
        name,
        (StepRestricted,),
        {
            "torch_optimizer": optimizer,
            "elementwise": elementwise,
            "__doc__": f"{optimizer.__name__}'s own update, run one bucket at a time "
            "(see :mod:`overlap_sgd.functional.generic`).",
            "__module__": __name__,
        },
    )
