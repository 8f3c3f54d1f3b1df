"""Functional SGD: :class:`torch.optim.SGD`'s update with gradients passed in explicitly."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.sgd import sgd

from .base import FunctionalOptimizer, KernelChoice, add_scaled, divide_first, fused_supported, skip_on_host

__all__ = ["FunctionalSGD"]

# Where torch's fused SGD runs; torch.optim.SGD keeps the same state layout either way.
_FUSED_DEVICES = ("cpu", "cuda", "mps", "xpu")


class FunctionalSGD(FunctionalOptimizer):
    """SGD with momentum, dampening, Nesterov, weight decay and ``maximize``.

    The arguments and defaults follow PyTorch's ``_FunctionalSGD``; state is kept as
    :class:`torch.optim.SGD` keeps it (``momentum_buffer``), so state dicts interchange.
    Sparse gradients are accepted (single-tensor path), as in ``torch.optim.SGD``.

    Example:
        >>> import torch
        >>> from overlap_sgd import FunctionalSGD
        >>> a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
        >>> opt = FunctionalSGD([a, b], lr=0.1)
        >>> opt.step([torch.ones(2), None])  # b has no gradient: left untouched
        >>> a.detach(), b.detach()
        (tensor([0.9000, 0.9000]), tensor([1., 1., 1.]))
    """

    torch_optimizer = torch.optim.SGD
    supports_sparse = True
    folds_grad_scale = True
    takes_found_inf = True
    elementwise = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-2,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
        foreach: bool = False,
        fused: bool = False,
    ):
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
        )

    def _update(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        cache: dict[str, Any],
        grad_scale: Tensor | None = None,
        found_inf: Tensor | None = None,
        keys: list[Tensor] | None = None,
    ) -> None:
        momentum = group["momentum"]
        keys = params if keys is None else keys
        sparse = cache.get("sparse")
        if sparse is None:
            sparse = cache["sparse"] = any(g.is_sparse for g in grads)
            cache["fused_ok"] = cache.get("fast", False) and fused_supported(params, grads, _FUSED_DEVICES)
        kernel = KernelChoice.for_group(group, sparse, cache["fused_ok"])
        if grad_scale is not None and kernel != KernelChoice.FUSED:
            divide_first(grads, grad_scale, cache)
            grad_scale = None
        if (
            kernel == KernelChoice.FOREACH and group["nesterov"] and momentum != 0
            and group["weight_decay"] == 0 and not group["maximize"]
        ):
            # torch's multi-tensor Nesterov step adds the momentum into the gradients it is
            # given; the caller's gradients (DDP's, which become .grad) must stay as they are.
            grads = torch._foreach_mul(grads, 1.0)
        bufs: list[Tensor | None] = []
        fresh = False
        if momentum != 0:
            signature = (True,)
            bufs = self._cached_state(cache, signature)
            if bufs is None:
                state = self.state
                bufs = [state[k].get("momentum_buffer") if k in state else None for k in keys]
                fresh = True
                if found_inf is not None and None in bufs:
                    # A skipped first step must not create momentum buffers (the fused kernel
                    # would leave new ones unwritten): decide on the host before touching state.
                    if skip_on_host(found_inf):
                        return
                    found_inf = None
                if kernel == KernelChoice.FUSED and None in bufs and any(b is not None for b in bufs):
                    # The fused kernel creates buffers for all parameters or for none: step
                    # the two kinds separately (a parameter unused so far has none yet).
                    for keep_new in (False, True):
                        idx = [i for i, b in enumerate(bufs) if (b is None) == keep_new]
                        self._update(
                            group, [params[i] for i in idx], [grads[i] for i in idx], {}, grad_scale,
                            keys=[keys[i] for i in idx],
                        )
                    return
        if found_inf is not None and kernel != KernelChoice.FUSED:
            if skip_on_host(found_inf):
                return
            found_inf = None
        sgd(
            params,
            grads,
            bufs,
            has_sparse_grad=sparse,
            foreach=kernel == KernelChoice.FOREACH,
            fused=kernel == KernelChoice.FUSED,
            grad_scale=grad_scale,
            found_inf=found_inf,
            weight_decay=group["weight_decay"],
            momentum=momentum,
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
        )
        if fresh:
            state = self.state
            for k, buf in zip(keys, bufs):
                state[k]["momentum_buffer"] = buf
            self._store_state(cache, (True,), bufs)

    # -- global-norm clipping ----------------------------------------------------------------
    #
    # torch's SGD step on gradient g, with s = -1 under ``maximize`` and p0 the parameter before:
    #   d = s*g + wd*p0;  buf = d (new buffer) or momentum*buf + (1 - dampening)*d;
    #   p = p0 - lr*(d + momentum*buf if nesterov else buf)   (p = p0 - lr*d without momentum).
    # Clipping replaces g by c*g: d changes by D = s*(c - 1)*g (the weight decay term reads
    # p0 in both updates and cancels), so buf changes by kb*D and p by -lr*kp*D, with
    # kb = 1 for a buffer this step created, else 1 - dampening, and kp = 1 + momentum*kb
    # (nesterov) or kb. Without momentum, p changes by -lr*D.

    #: Two passes (momentum buffer and parameter, each reading the gradient) against the
    #: update's one.
    clip_correction_cost = 1.5

    def corrects_clip(self, group_index: int) -> bool:
        return True

    def before_speculation(
        self, group_index: int, params: list[Tensor], cache: dict[str, Any] | None, keys: list[Tensor] | None
    ) -> Any:
        """Which parameters have no momentum buffer yet (this update creates theirs)."""
        if self.param_groups[group_index]["momentum"] == 0:
            return None
        if cache is not None and self._cached_state(cache, (True,)) is not None:
            return None  # every buffer exists
        state = self.state
        fresh = [state[k].get("momentum_buffer") is None if k in state else True for k in (keys or params)]
        return fresh if any(fresh) else None

    def correct_clip(
        self,
        group_index: int,
        params: list[Tensor],
        grads: list[Tensor],
        coef: float,
        before: Any = None,
        keys: list[Tensor] | None = None,
    ) -> None:
        group = self.param_groups[group_index]
        lr, momentum = group["lr"], group["momentum"]
        k = (1.0 - coef) if group["maximize"] else (coef - 1.0)  # D = k * g
        if momentum == 0:
            add_scaled(params, grads, -lr * k)
            return
        state = self.state
        bufs = [state[key]["momentum_buffer"] for key in (keys or params)]
        fresh = before if before is not None else [False] * len(params)
        for new in (False, True):
            idx = [i for i, f in enumerate(fresh) if f == new]
            if not idx:
                continue
            kb = 1.0 if new else 1.0 - group["dampening"]
            kp = 1.0 + momentum * kb if group["nesterov"] else kb
            g = [grads[i] for i in idx]
            add_scaled([bufs[i] for i in idx], g, kb * k)
            add_scaled([params[i] for i in idx], g, -lr * (kp * k))
