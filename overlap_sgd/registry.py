"""The registry: optimizer class -> functional optimizer class -> hook factory.

:func:`overlap_sgd.overlap` looks the wrapped optimizer's class up here. Lookup walks the
class's MRO, so a subclass of a registered optimizer resolves to its parent's entry unless it has
one of its own. Registering a class twice is an error: replace an entry explicitly with
:func:`unregister` first.

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

from .functional import FunctionalAdam, FunctionalAdamW, FunctionalOptimizer, FunctionalSGD

__all__ = ["Registration", "register", "unregister", "lookup", "registered", "default_hook_factory"]

F = TypeVar("F", bound=type[FunctionalOptimizer])

#: ``hook_factory(functional_optimizers, comm_hook, comm_state, **options) -> (hook, hook_state)``
HookFactory = Callable[..., tuple[Callable[..., Any], Any]]


def default_hook_factory(*args: Any, **kwargs: Any) -> tuple[Callable[..., Any], Any]:
    """The bucket-update hook of :mod:`overlap_sgd.hooks` (see :func:`~overlap_sgd.hooks.make_overlap_hook`)."""
    from .hooks import make_overlap_hook

    return make_overlap_hook(*args, **kwargs)


@dataclass(frozen=True)
class Registration:
    """One registry entry."""

    optimizer: type[Optimizer]
    functional: type[FunctionalOptimizer]
    hook_factory: HookFactory = default_hook_factory


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
                    f"(to {_REGISTRY[optimizer].functional.__qualname__}); unregister it first"
                )
            _REGISTRY[optimizer] = Registration(optimizer, cls, hook_factory)
        return cls

    if functional is None:
        return add
    add(functional)
    return functional


def unregister(optimizer: type[Optimizer]) -> Registration:
    """Remove ``optimizer``'s own entry and return it; ``KeyError`` if it has none."""
    with _LOCK:
        try:
            return _REGISTRY.pop(optimizer)
        except KeyError:
            raise KeyError(f"{getattr(optimizer, '__qualname__', optimizer)!r} is not registered") from None


def lookup(optimizer: type[Optimizer]) -> Registration:
    """The entry for ``optimizer``, found by walking its MRO.

    Raises ``TypeError`` naming the registered classes when nothing matches.
    """
    if not isinstance(optimizer, type):
        optimizer = type(optimizer)
    with _LOCK:
        for cls in optimizer.__mro__:
            entry = _REGISTRY.get(cls)
            if entry is not None:
                return entry
        known = ", ".join(sorted(c.__qualname__ for c in _REGISTRY))
    raise TypeError(
        f"{optimizer.__qualname__} has no functional counterpart to overlap with; "
        f"registered optimizers: {known}. Register one with overlap_sgd.register()."
    )


def registered() -> dict[type[Optimizer], Registration]:
    """A snapshot of the registry."""
    with _LOCK:
        return dict(_REGISTRY)


register(torch.optim.SGD, FunctionalSGD)
register(torch.optim.Adam, FunctionalAdam)
register(torch.optim.AdamW, FunctionalAdamW)
