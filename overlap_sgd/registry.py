"""The registry: optimizer class -> functional optimizer class -> hook factory.

:func:`overlap_sgd.overlap` resolves the wrapped optimizer's class here. Lookup walks the
class's MRO, so a subclass of a registered optimizer resolves to its parent's entry unless it has
one of its own. Registering a class twice is an error: replace an entry explicitly with
:func:`unregister` first.

A class nobody registered resolves (through :func:`resolve`) to the generic path,
:mod:`overlap_sgd.functional.generic`, which is correct for any optimizer whose update is per
parameter. An optimizer that is not, say one that needs the global step, is declared with
:func:`register_global`; overlapping it then fails with the declared reason.

Example:
    >>> import torch
    >>> from overlap_sgd import FunctionalSGD, lookup
    >>> class MySGD(torch.optim.SGD):
    ...     pass
    >>> lookup(MySGD).functional is FunctionalSGD
    True
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch.optim import Optimizer

from . import functional as fn
from .functional import FunctionalOptimizer, restricted
from .hooks import make_overlap_hook

__all__ = [
    "Registration",
    "default_hook_factory",
    "lookup",
    "register",
    "register_global",
    "registered",
    "resolve",
    "unregister",
]

F = TypeVar("F", bound=type[FunctionalOptimizer])

#: ``hook_factory(functional_optimizers, comm_hook, comm_state, **options) -> (hook, hook_state)``
HookFactory = Callable[..., tuple[Callable[..., Any], Any]]


def default_hook_factory(*args: Any, **kwargs: Any) -> tuple[Callable[..., Any], Any]:
    """The bucket-update hook of :mod:`overlap_sgd.hooks` (see :func:`~overlap_sgd.hooks.make_overlap_hook`)."""
    return make_overlap_hook(*args, **kwargs)


@dataclass(frozen=True)
class Registration:
    """One registry entry. ``functional`` is ``None`` for a class that cannot be overlapped,
    with ``reason`` saying why."""

    optimizer: type[Optimizer]
    functional: type[FunctionalOptimizer] | None
    hook_factory: HookFactory = default_hook_factory
    reason: str | None = None


_REGISTRY: dict[type[Optimizer], Registration] = {}
_LOCK = threading.Lock()


def register(
    optimizer: type[Optimizer],
    functional: type[FunctionalOptimizer] | None = None,
    *,
    hook_factory: HookFactory = default_hook_factory,
) -> Any:
    """Register ``functional`` as the functional counterpart of the optimizer class ``optimizer``.

    Use it as a call, ``register(MyOpt, FunctionalMyOpt)``, or as a class decorator on the
    functional class, ``@register(MyOpt)``. Raises ``ValueError`` if ``optimizer`` already has an
    entry of its own (a parent's entry does not count).

    Example:
        >>> import torch
        >>> from overlap_sgd import FunctionalSGD, register, unregister, lookup
        >>> class Tuned(torch.optim.SGD):
        ...     pass
        >>> @register(Tuned)
        ... class FunctionalTuned(FunctionalSGD):
        ...     torch_optimizer = Tuned
        >>> lookup(Tuned).functional.__name__
        'FunctionalTuned'
        >>> _ = unregister(Tuned)
    """
    if not (isinstance(optimizer, type) and issubclass(optimizer, Optimizer)):
        raise TypeError(f"register() needs a torch.optim.Optimizer subclass, got {optimizer!r}")
    if not callable(hook_factory):
        raise TypeError(f"hook_factory must be callable, got {hook_factory!r}")

    def add(cls: F) -> F:
        if not (isinstance(cls, type) and issubclass(cls, FunctionalOptimizer)):
            raise TypeError(
                f"register() needs a FunctionalOptimizer subclass for {optimizer.__name__}, got {cls!r}"
            )
        with _LOCK:
            if optimizer in _REGISTRY:
                raise ValueError(
                    f"{optimizer.__qualname__} is already registered "
                    f"(to {getattr(_REGISTRY[optimizer].functional, '__qualname__', 'cannot be overlapped')}); "
                    "unregister it first"
                )
            _REGISTRY[optimizer] = Registration(optimizer, cls, hook_factory)
        return cls

    if functional is None:
        return add
    add(functional)
    return functional


def register_global(optimizer: type[Optimizer], reason: str) -> None:
    """Declare that ``optimizer`` needs the global step, so it is never overlapped.

    :func:`overlap_sgd.overlap` then raises ``TypeError`` quoting ``reason``, rather than
    taking the generic path.

    Example:
        >>> import torch
        >>> from overlap_sgd import register_global, resolve, unregister
        >>> class GlobalNorm(torch.optim.SGD):
        ...     pass
        >>> register_global(GlobalNorm, "it rescales by the norm of all gradients")
        >>> try:
        ...     resolve(GlobalNorm)
        ... except TypeError as e:
        ...     print(str(e).split(": ", 1)[1])
        it rescales by the norm of all gradients
        >>> _ = unregister(GlobalNorm)
    """
    if not (isinstance(optimizer, type) and issubclass(optimizer, Optimizer)):
        raise TypeError(f"register_global() needs a torch.optim.Optimizer subclass, got {optimizer!r}")
    if not isinstance(reason, str) or not reason:
        raise TypeError(f"register_global() needs a non-empty reason string, got {reason!r}")
    with _LOCK:
        if optimizer in _REGISTRY:
            raise ValueError(f"{optimizer.__qualname__} is already registered; unregister it first")
        _REGISTRY[optimizer] = Registration(optimizer, None, default_hook_factory, reason)


def unregister(optimizer: type[Optimizer]) -> Registration:
    """Remove ``optimizer``'s own entry and return it; ``KeyError`` if it has none."""
    with _LOCK:
        try:
            return _REGISTRY.pop(optimizer)
        except KeyError:
            raise KeyError(f"{getattr(optimizer, '__qualname__', optimizer)!r} is not registered") from None


def _find(optimizer: type[Optimizer]) -> Registration | None:
    with _LOCK:
        for cls in optimizer.__mro__:
            entry = _REGISTRY.get(cls)
            if entry is not None:
                return entry
    return None


def _refuse(optimizer: type[Optimizer], entry: Registration) -> TypeError:
    return TypeError(f"{optimizer.__qualname__} cannot be overlapped: {entry.reason}")


def lookup(optimizer: type[Optimizer]) -> Registration:
    """The registered entry for ``optimizer``, found by walking its MRO.

    Raises ``TypeError`` naming the registered classes when nothing matches, or quoting the
    reason of a :func:`register_global` declaration.
    """
    if not isinstance(optimizer, type):
        optimizer = type(optimizer)
    entry = _find(optimizer)
    if entry is not None:
        if entry.functional is None:
            raise _refuse(optimizer, entry)
        return entry
    with _LOCK:
        known = ", ".join(sorted(c.__qualname__ for c, e in _REGISTRY.items() if e.functional))
    raise TypeError(
        f"{optimizer.__qualname__} has no functional counterpart to overlap with; "
        f"registered optimizers: {known}. Register one with overlap_sgd.register()."
    )


def resolve(optimizer: type[Optimizer]) -> Registration:
    """Like :func:`lookup`, but an unregistered class resolves to the generic path.

    Example:
        >>> import torch
        >>> from overlap_sgd import resolve
        >>> class Lion(torch.optim.Optimizer):
        ...     pass
        >>> resolve(Lion).functional.__name__
        'FunctionalLion'
    """
    if not isinstance(optimizer, type):
        optimizer = type(optimizer)
    if not issubclass(optimizer, Optimizer):
        raise TypeError(f"{optimizer.__qualname__} is not a torch.optim.Optimizer")
    entry = _find(optimizer)
    if entry is None:
        return Registration(optimizer, restricted(optimizer))
    if entry.functional is None:
        raise _refuse(optimizer, entry)
    return entry


def registered() -> dict[type[Optimizer], Registration]:
    """A snapshot of the registry."""
    with _LOCK:
        return dict(_REGISTRY)


register(torch.optim.SGD, fn.FunctionalSGD)
register(torch.optim.Adam, fn.FunctionalAdam)
register(torch.optim.AdamW, fn.FunctionalAdamW)
for _functional in (
    fn.FunctionalAdagrad, fn.FunctionalAdadelta, fn.FunctionalAdamax, fn.FunctionalRMSprop,
    fn.FunctionalRprop, fn.FunctionalNAdam, fn.FunctionalRAdam, fn.FunctionalASGD,
    fn.FunctionalAdafactor, fn.FunctionalMuon, fn.FunctionalSparseAdam,
):
    register(_functional.torch_optimizer, _functional)
register_global(
    torch.optim.LBFGS,
    "LBFGS re-evaluates the loss through a closure and runs a line search over all parameters "
    "at once, so its step cannot be split into per-bucket updates inside backward()",
)
