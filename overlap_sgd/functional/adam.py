"""Functional Adam and AdamW: torch's Adam update with gradients passed in explicitly."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Union


import torch
from torch import Tensor
from torch.optim.adam import adam

from .base import (
    FunctionalOptimizer, KernelChoice, add_scaled, divide_first, fused_supported, new_step, scalar_dtype,
    skip_on_host,
)

__all__ = ["FunctionalAdam", "FunctionalAdamW"]


class FunctionalAdam(FunctionalOptimizer):
    """Adam with every option of :class:`torch.optim.Adam`.

    That is ``betas``, ``eps``, ``weight_decay``, ``amsgrad``, ``maximize``,
    ``decoupled_weight_decay``, ``capturable``, ``foreach`` and ``fused``. State is kept under
    torch's keys (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) with torch's
    placement of ``step``, so state dicts interchange with ``torch.optim.Adam``.

    Example:
        >>> import torch
        >>> from overlap_sgd import FunctionalAdam
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> opt = FunctionalAdam([w], lr=0.1, amsgrad=True)
        >>> opt.step_param(w, torch.tensor([1.0, -1.0]))
        >>> w.detach()
        tensor([-0.1000,  0.1000])
    """

    torch_optimizer = torch.optim.Adam
    folds_grad_scale = True
    takes_found_inf = True
    elementwise = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        decoupled_weight_decay: bool = False,
    ):
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
            decoupled_weight_decay=decoupled_weight_decay,
        )

    def _has_state(self, group: dict[str, Any], keys: list[Tensor], cache: dict[str, Any]) -> bool:
        """Whether every parameter already has its Adam state (no new state to create)."""
        if self._cached_state(cache, self._signature(group)) is not None:
            return True
        state = self.state
        return all(len(state.get(k, ())) > 0 for k in keys)

    @staticmethod
    def _signature(group: dict[str, Any]) -> tuple[bool, bool, bool]:
        return (bool(group["amsgrad"]), bool(group.get("fused")), bool(group.get("capturable")))

    def _state_lists(
        self, group: dict[str, Any], params: list[Tensor], cache: dict[str, Any], keys: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], bool]:
        amsgrad = bool(group["amsgrad"])
        signature = self._signature(group)
        lists = self._cached_state(cache, signature)
        if lists is not None:
            return lists
        state = self.state
        steps, exp_avgs, exp_avg_sqs, max_sqs = [], [], [], []
        for p, k in zip(params, keys):
            st = state[k]
            if len(st) == 0:
                st["step"] = new_step(p, group)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if amsgrad:
                    st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif (group.get("fused") or group.get("capturable")) and st["step"].device != p.device:
                # State made for another kernel (a CPU counter) moves as torch's load does.
                st["step"] = st["step"].to(p.device, scalar_dtype(bool(group.get("fused"))))
            if amsgrad and "max_exp_avg_sq" not in st:
                # amsgrad was switched on after the state was created: start its max at zero.
                st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            steps.append(st["step"])
            exp_avgs.append(st["exp_avg"])
            exp_avg_sqs.append(st["exp_avg_sq"])
            if amsgrad:
                max_sqs.append(st["max_exp_avg_sq"])
        has_complex = any(torch.is_complex(p) for p in params)
        lists = (steps, exp_avgs, exp_avg_sqs, max_sqs, has_complex)
        self._store_state(cache, signature, lists)
        return lists

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
        keys = params if keys is None else keys
        if found_inf is not None and _skips_on_device(group, params, grads, cache):
            # The verdict stays on the device (check_finite on CUDA): only the fused kernel
            # can skip there, with its step counters on the device as torch's fused=True
            # keeps them. A group that names its kernel keeps it, and reads the verdict below.
            group = {**group, "fused": True}
        if found_inf is not None and not self._has_state(group, keys, cache):
            # A skipped first step must not create state: decide on the host before that.
            if skip_on_host(found_inf):
                return
            found_inf = None
        steps, exp_avgs, exp_avg_sqs, max_sqs, has_complex = self._state_lists(group, params, cache, keys)
        fused_ok = cache.get("fused_ok")
        if fused_ok is None:
            # Only on CPU does the fused kernel share torch's default state layout (a CPU
            # float32 step counter); elsewhere it would need the step on the device.
            fused_ok = cache["fused_ok"] = (
                cache.get("fast", False) and not has_complex and fused_supported(params, grads, ("cpu",))
                and all(s.device.type == "cpu" and s.dtype == torch.float32 for s in steps)
            )
        kernel = KernelChoice.for_group(group, sparse=False, fused_ok=fused_ok)
        if grad_scale is not None and kernel != KernelChoice.FUSED:
            divide_first(grads, grad_scale, cache)
            grad_scale = None
        if found_inf is not None and kernel != KernelChoice.FUSED:
            if skip_on_host(found_inf):
                return
            found_inf = None
        beta1, beta2 = group["betas"]
        adam(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            max_sqs,
            steps,
            foreach=kernel == KernelChoice.FOREACH,
            capturable=group["capturable"],
            differentiable=False,
            fused=kernel == KernelChoice.FUSED,
            grad_scale=grad_scale,
            found_inf=found_inf,
            has_complex=has_complex,
            decoupled_weight_decay=group["decoupled_weight_decay"],
            amsgrad=group["amsgrad"],
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
        )

    # -- global-norm clipping ----------------------------------------------------------------
    #
    # torch's Adam step t on gradient g (s = -1 under ``maximize``, p0 the parameter before,
    # after AdamW's decoupled decay, which both updates share and so cancels):
    #   G = s*g + wd*p0 (coupled weight decay) or s*g;  m = b1*m0 + (1-b1)*G;
    #   v = b2*v0 + (1-b2)*G**2;  p = p0 - (lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps),
    #   bc1 = 1 - b1**t, bc2 = 1 - b2**t.
    # Clipping replaces g by c*g, so G by G' = G + D with D = s*(c-1)*g: m changes by
    # (1-b1)*D, v by (1-b2)*(G'**2 - G**2) (= (1-b2)*(c**2-1)*g**2 without coupled decay), and
    # p by (lr/bc1) * (u - u'), u and u' the old and new m / denominator. Coupled decay needs
    # p0, which the step gives back: p0 = p + (lr/bc1)*u. At t = 1 (m0 = v0 = 0) m and v are
    # recomputed from G' directly, which keeps strong clipping from cancelling digits.
    # ``amsgrad``'s running max cannot be undone: those groups run deferred.

    #: About ten multi-tensor passes against the fused update's one: measured at 2 to 3 fused
    #: AdamW steps in training on two CPU ranks (benchmarks, README), up to 6 in isolation.
    clip_correction_cost = 3.0

    def corrects_clip(self, group_index: int) -> bool:
        group = self.param_groups[group_index]
        if group["amsgrad"]:
            return False
        key = (id(group["params"]), len(group["params"]))
        known = self.__dict__.setdefault("_complex_groups", {})
        if key not in known:
            known[key] = any(torch.is_complex(p) for p in group["params"])
        return not known[key]

    def correct_clip(
        self,
        group_index: int,
        params: list[Tensor],
        grads: list[Tensor],
        coef: float,
        before: object = None,
        keys: list[Tensor] | None = None,
    ) -> None:
        group = self.param_groups[group_index]
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        coupled = wd != 0 and not group["decoupled_weight_decay"]
        sign = -1.0 if group["maximize"] else 1.0
        state = self.state
        sts = [state[key] for key in (keys or params)]
        steps = [st["step"] for st in sts]
        hyper = (beta1, beta2, eps, wd if coupled else 0.0, sign, coef)
        if all(t.device.type == "cpu" for t in steps):
            # Step counts on the host (torch's default placement): one pass per step count,
            # with torch's own scalar bias corrections.
            by_step: dict[float, list[int]] = {}
            for i, t in enumerate(steps):
                by_step.setdefault(float(t), []).append(i)
            for t, idx in by_step.items():
                _correct(
                    [params[i] for i in idx], [grads[i] for i in idx],
                    [sts[i]["exp_avg"] for i in idx], [sts[i]["exp_avg_sq"] for i in idx],
                    lr / (1.0 - beta1**t), _bc2_sqrt(beta2, t), t == 1, hyper,
                )
        else:
            # Step counts on the device (capturable, or fused on CUDA): bias corrections as
            # device tensors, read nowhere, as torch's capturable kernels compute them.
            step_size, bc2_sqrt = _bias_corrections(steps, beta1, beta2, lr)
            _correct(params, grads, [st["exp_avg"] for st in sts], [st["exp_avg_sq"] for st in sts],
                     step_size, bc2_sqrt, None, hyper)


#: A bias-corrected scale: a number, or per parameter a 0-dim tensor on the device.
Scale = Union[float, Tensor, list[Tensor]]


def _bc2_sqrt(beta2: float, t: float) -> float:
    """``sqrt(1 - beta2**t)``, Adam's second-moment bias correction, as torch computes it."""
    return (1.0 - beta2**t) ** 0.5


def _bias_corrections(steps: list[Tensor], beta1: float, beta2: float, lr: float | Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Per parameter, ``lr / (1 - beta1**t)`` and ``sqrt(1 - beta2**t)`` as 0-dim tensors on
    the step counts' device, computed there."""
    bc1 = torch._foreach_pow(beta1, steps)
    torch._foreach_neg_(bc1)
    torch._foreach_add_(bc1, 1.0)
    step_size = torch._foreach_reciprocal(bc1)
    torch._foreach_mul_(step_size, lr)
    bc2 = torch._foreach_pow(beta2, steps)
    torch._foreach_neg_(bc2)
    torch._foreach_add_(bc2, 1.0)
    return list(step_size), list(torch._foreach_sqrt(bc2))


def _correct(
    p: list[Tensor], g: list[Tensor], m: list[Tensor], v: list[Tensor],
    step_size: Scale, bc2_sqrt: Scale, first: bool | None, hyper: tuple[float, ...],
) -> None:
    """Correct one pass's parameters and moments (see the comment above ``corrects_clip``).
    ``first``: the step count is 1 (m and v are then scaled by c and c**2, exactly what the
    clipped step gives from zero moments); ``None``: not known on the host (the general
    formula, which holds at step 1 too).

    The update is written ``S * m / (sqrt(v) + e)`` with ``S = step_size * sqrt(bc2)`` and
    ``e = eps * sqrt(bc2)``: the speculative update is taken back, the moments corrected, the
    clipped update applied, all in place with one scratch list (about ten passes over the
    group's tensors)."""
    beta1, beta2, eps, wd, sign, coef = hyper
    k = sign * (coef - 1.0)  # D = k * g
    scale, e = _times(step_size, bc2_sqrt), _times(eps, bc2_sqrt)
    d = _denominator(torch._foreach_sqrt(v), e, scale)
    _step(p, m, d, scale, +1.0)  # p is back where the update found it (after AdamW's decay)
    if wd:  # coupled decay: G = s*g + wd*p0
        grad = torch._foreach_mul(g, sign)
        torch._foreach_add_(grad, p, alpha=wd)
    if first and wd:  # G' = G + D; m = (1-b1)*G', v = (1-b2)*G'**2
        torch._foreach_add_(grad, g, alpha=k)
        torch._foreach_copy_(m, grad)
        torch._foreach_mul_(m, 1.0 - beta1)
        torch._foreach_mul_(grad, grad)
        torch._foreach_copy_(v, grad)
        torch._foreach_mul_(v, 1.0 - beta2)
    elif first:
        torch._foreach_mul_(m, coef)
        torch._foreach_mul_(v, coef * coef)
    else:
        add_scaled(m, g, (1.0 - beta1) * k)
        if wd:  # G'**2 - G**2 = D * (2G + D)
            torch._foreach_mul_(grad, 2.0)
            torch._foreach_add_(grad, g, alpha=k)
            torch._foreach_addcmul_(v, g, grad, value=(1.0 - beta2) * k)
        else:
            torch._foreach_addcmul_(v, g, g, value=(1.0 - beta2) * (coef * coef - 1.0))
        torch._foreach_clamp_min_(v, 0.0)
    torch._foreach_copy_(d, v)
    torch._foreach_sqrt_(d)
    _step(p, m, _denominator(d, e, scale), scale, -1.0)


def _times(a: Scale, b: Scale) -> Scale:
    """``a * b`` for numbers, 0-dim tensors or lists of them."""
    if isinstance(a, (list, tuple)):
        return list(torch._foreach_mul(list(a), b))
    if isinstance(b, (list, tuple)):
        return list(torch._foreach_mul(list(b), a))
    return a * b


def _denominator(root: list[Tensor], e: Scale, scale: Scale) -> list[Tensor]:
    """``root + e`` in place, divided by ``scale`` where that is a tensor (see :func:`_step`)."""
    torch._foreach_add_(root, e)
    if not isinstance(scale, (int, float)):
        torch._foreach_div_(root, scale)
    return root


def _step(p: list[Tensor], m: list[Tensor], d: list[Tensor], scale: Scale, sign: float) -> None:
    """``p += sign * scale * m / d`` (``d`` already divided by ``scale`` where it is a tensor)."""
    value = sign * scale if isinstance(scale, (int, float)) else sign
    torch._foreach_addcdiv_(p, m, d, value=value)


class FunctionalAdamW(FunctionalAdam):
    """AdamW: Adam with decoupled weight decay, state-compatible with :class:`torch.optim.AdamW`.

    Example:
        >>> import torch
        >>> from overlap_sgd import FunctionalAdamW
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = FunctionalAdamW([w], lr=0.1, weight_decay=0.5)
        >>> opt.step_param(w, torch.zeros(2))  # zero gradient: only the decay acts
        >>> w.detach()
        tensor([0.9500, 0.9500])
    """

    torch_optimizer = torch.optim.AdamW

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
    ):
        FunctionalOptimizer.__init__(
            self,
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
        )


def _skips_on_device(group: dict[str, Any], params: list[Tensor], grads: list[Tensor], cache: dict[str, Any]) -> bool:
    """Whether an update given a device verdict (``found_inf``) runs the fused CUDA kernel,
    which skips on the device, instead of the multi-tensor one, which would read the verdict
    on the host: CUDA parameters the fused kernel takes, a group that leaves the kernel to torch
    (``foreach=None, fused=None``, not capturable) and the overlap's kernel choice
    (``cache["fast"]``)."""
    known = cache.get("skips_on_device")
    if known is None:
        known = cache["skips_on_device"] = bool(
            cache.get("fast", False) and params and params[0].device.type == "cuda"
            and group.get("foreach") is None and group.get("fused") is None and not group.get("capturable")
            and not any(torch.is_complex(p) for p in params)
            and fused_supported(params, grads, ("cuda",))
        )
    return known
