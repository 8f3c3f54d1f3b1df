"""One multi-tensor update of FSDP2's sharded parameters, run on their local shards.

FSDP2's sharded parameters and gradients are :class:`~torch.distributed.tensor.DTensor`\\ s
placed ``Shard(dim)`` on a 1-D mesh. An element-wise optimizer (SGD, Adam, AdamW, Adagrad, ...)
updates each element from the same element of its gradient and state alone, so running its
kernel on the local shards (``to_local()``: views of the shards' storage, updated in place)
computes exactly what ``optimizer.step()`` computes on the DTensors, without DTensor's dispatch
per operation and parameter.

The optimizer state stays in torch's format for DTensor parameters, so that
``state_dict()``, :func:`torch.distributed.checkpoint.state_dict.get_optimizer_state_dict` and
DCP resharding work as for a post-backward step: tensors shaped like the parameter
(``exp_avg``, ``momentum_buffer``, ...) are DTensors with the parameter's placement, scalars
(``step``) plain tensors. The kernel is handed the state's local tensors (views, updated in
place); a tensor the update creates or replaces is wrapped back into a DTensor of the
parameter's layout, sharing its storage.

Optimizers of the generic path (classes nobody registered, whose update is not known to be
element-wise) run their own ``step`` on the DTensors themselves instead, exactly as a
post-backward step would.

Example (inside an initialised process group, ``p`` a sharded parameter with a gradient)::

    update = LocalUpdate(FunctionalAdamW.bind(opt))
    update(opt.param_groups.index(group), [p], [p.grad])   # one fused/foreach kernel call
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from ..functional import FunctionalOptimizer, StepRestricted

__all__ = ["LocalUpdate", "local_of"]


def local_of(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view of its storage), or ``t`` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


class LocalUpdate:
    """Updates DTensor parameters of one param group of ``functional``'s optimizer with one
    kernel call on their local shards (see the module docs).

    Args:
        functional: a functional optimizer bound to the training loop's optimizer.
    """

    def __init__(self, functional: FunctionalOptimizer):
        self.functional = functional
        #: Run the optimizer's own step on the DTensors (the generic path) rather than the
        #: functional kernel on local shards.
        self.on_dtensors = not functional.elementwise and isinstance(functional, StepRestricted)

    def __call__(self, group_index: int, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        """Update ``params`` (DTensors of group ``group_index``) with ``grads`` (their DTensor
        gradients): parameters and state in place."""
        if not params:
            return
        with torch.no_grad():
            self._update(group_index, params, grads)

    # -- global-norm clipping (:class:`~overlap_sgd.hooks.norm_clip.GlobalClipper` calls these
    # as it calls a functional optimizer's, with the DTensor parameters and gradients) ---------

    def update(
        self, group_index: int, params: Sequence[Tensor], grads: Sequence[Tensor], cache: Any = None,
    ) -> None:
        """The update, as :meth:`FunctionalOptimizer.update` is called (``cache`` unused)."""
        self(group_index, params, grads)

    def corrects_clip(self, group_index: int) -> bool:
        """Whether the optimizer has a clipping correction for the group (never on the
        generic path, whose step runs on the DTensors)."""
        return not self.on_dtensors and self.functional.corrects_clip(group_index)

    def before_speculation(
        self, group_index: int, params: Sequence[Tensor], cache: Any = None, keys: Any = None,
    ) -> Any:
        """What the correction needs of the state before the speculative update (the state
        is keyed by the DTensor parameters: asked of the optimizer itself)."""
        return self.functional.before_speculation(group_index, list(params), None, None)

    def correct_clip(
        self, group_index: int, params: Sequence[Tensor], grads: Sequence[Tensor], coef: float,
        before: Any = None, keys: Any = None,
    ) -> None:
        """Turn the speculative update of ``params`` into the one with ``coef * grads``, on
        the local shards of the parameters and state, in place."""
        with torch.no_grad():
            self._on_shards(params, grads, lambda f, ps, gs: f.correct_clip(group_index, ps, gs, coef, before))

    def _update(self, group_index: int, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        if self.on_dtensors:
            self.functional.update(group_index, list(params), list(grads))
            return
        self._on_shards(params, grads, lambda f, ps, gs: f.update(group_index, ps, gs))

    def _on_shards(
        self, params: Sequence[Tensor], grads: Sequence[Tensor],
        run: Callable[[FunctionalOptimizer, list[Tensor], list[Tensor]], None],
    ) -> None:
        """``run(functional, local params, local grads)`` with the functional seeing the
        state of the local shards; state tensors it creates or replaces are kept as DTensors."""
        f = self.functional
        state = f.state
        locals_ = [local_of(p) for p in params]
        local_grads = [local_of(g) for g in grads]
        # The state the kernel sees, keyed by the local shards, holding local tensors.
        view: defaultdict[Tensor, dict[str, Any]] = defaultdict(dict)
        given: list[dict[str, Any]] = []
        for p, lp in zip(params, locals_):
            entry = state.get(p)
            if entry:
                shown = {k: local_of(v) if isinstance(v, Tensor) else v for k, v in entry.items()}
                view[lp] = dict(shown)
                given.append(shown)
            else:
                given.append({})
        run(_shadow(f, view), locals_, local_grads)
        for p, lp, before in zip(params, locals_, given):
            after = view.get(lp)
            if not after:
                continue
            entry = state[p]
            for key, value in after.items():
                if key in before and before[key] is value:
                    continue  # updated in place: the DTensor already holds it
                entry[key] = _as_state_of(value, p, lp)


def _shadow(f: FunctionalOptimizer, view: dict[Tensor, dict[str, Any]]) -> FunctionalOptimizer:
    """A copy of ``f`` whose holder shares everything with ``f``'s but keeps ``view`` as its
    state (param groups, hyperparameters and defaults are the real ones)."""
    holder = f.optimizer
    shadow_holder = object.__new__(type(holder))
    shadow_holder.__dict__.update(holder.__dict__)
    shadow_holder.__dict__["state"] = view
    shadow = copy.copy(f)
    shadow._holder = shadow_holder
    return shadow


def _as_state_of(value: Any, param: Tensor, local: Tensor) -> Any:
    """``value`` as torch.optim keeps it for the DTensor ``param``: a tensor laid out like the
    local shard ``local`` becomes a DTensor of ``param``'s layout (sharing its storage)."""
    if (
        isinstance(value, Tensor)
        and not isinstance(value, DTensor)
        and isinstance(param, DTensor)
        and value.dim() > 0
        and value.shape == local.shape
    ):
        return DTensor.from_local(
            value, param.device_mesh, param.placements, run_check=False,
            shape=param.shape, stride=param.stride(),
        )
    return value
