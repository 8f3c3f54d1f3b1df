"""The functional optimizer protocol: an optimizer whose step takes gradients explicitly.

A functional optimizer never reads ``param.grad``. Gradients are passed in, one parameter at a
time (:meth:`FunctionalOptimizer.step_param`), for all parameters (:meth:`~FunctionalOptimizer.step`)
or for an arbitrary subset, such as one DDP bucket (:meth:`~FunctionalOptimizer.step_bucket`),
which is updated with one multi-tensor or fused kernel call per parameter group.

Hyperparameters and per-parameter state live in a real :class:`torch.optim.Optimizer` (the
*holder*): either one built from the constructor's arguments, or an existing optimizer bound with
:meth:`FunctionalOptimizer.bind`. Hyperparameters are read from its ``param_groups`` at every step,
so schedulers work, and state is kept under torch's own keys, so state dicts interchange with the
plain torch optimizer.

Example:
    >>> import torch
    >>> from overlap_sgd import FunctionalSGD
    >>> w = torch.nn.Parameter(torch.ones(3))
    >>> opt = FunctionalSGD([w], lr=0.5, momentum=0.9)
    >>> opt.step_param(w, torch.ones(3))
    >>> w.detach()
    tensor([0.5000, 0.5000, 0.5000])
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["FunctionalOptimizer", "KernelChoice", "add_scaled", "dense", "divide", "divide_first", "fused_supported", "skip_on_host"]


class KernelChoice:
    """Which torch kernel family a group's update uses: ``"fused"``, ``"foreach"`` or ``"single"``.

    An explicit choice in the group wins: ``fused=True`` selects the fused kernel,
    ``foreach=True`` the multi-tensor one and ``foreach=False`` the single-tensor loop. Left
    unset (``None``, torch's default), the DDP bucket update uses the fused kernel where the
    optimizer allows it without changing its state layout (``fused_ok``), and otherwise the
    multi-tensor kernel: one kernel call per bucket and group, never one per parameter.
    """

    FUSED = "fused"
    FOREACH = "foreach"
    SINGLE = "single"

    @staticmethod
    def for_group(group: dict[str, Any], sparse: bool, fused_ok: bool = False) -> str:
        if sparse:
            return KernelChoice.SINGLE
        if group.get("fused"):
            return KernelChoice.FUSED
        foreach = group.get("foreach")
        if foreach is False:
            return KernelChoice.SINGLE
        # The multi-tensor kernels take a tensor lr only when capturable.
        tensor_lr = isinstance(group.get("lr"), Tensor) and not group.get("capturable", False)
        if foreach is None and group.get("fused") is None and fused_ok and not tensor_lr:
            return KernelChoice.FUSED
        if tensor_lr:
            return KernelChoice.SINGLE
        return KernelChoice.FOREACH


def divide(grads: Sequence[Tensor], grad_scale: Tensor) -> None:
    """Divide every tensor of ``grads`` in place by the 0-dim tensor ``grad_scale``."""
    if not grads:
        return
    if any(g.is_sparse for g in grads):
        for g in grads:
            g.div_(grad_scale)
    else:
        torch._foreach_div_(list(grads), grad_scale)


def divide_first(grads: Sequence[Tensor], grad_scale: Tensor, cache: dict[str, Any]) -> None:
    """Divide ``grads`` by ``grad_scale`` before a kernel that cannot fold the division in.

    Notes it in the update's ``cache`` (``cache["divided"]``), so that a caller recovering from
    an update that fails after this point does not divide the same gradients again.
    """
    cache["divided"] = True
    divide(grads, grad_scale)


def dense(t: Tensor) -> bool:
    """Whether ``t`` is non-overlapping and dense: its strides, ordered, pack its elements
    without gaps (contiguous, channels_last, a transposed matrix; not ``x[:, ::2]``)."""
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def skip_on_host(found_inf: Tensor | None) -> bool:
    """Whether ``found_inf`` is set, read on the host: for updates that cannot skip on the device."""
    return found_inf is not None and bool(found_inf)


def fused_supported(params: list[Tensor], grads: list[Tensor], devices: tuple[str, ...]) -> bool:
    """Whether torch's fused kernels can update ``params`` with ``grads``: floating point, on
    ``devices``, each parameter dense and laid out exactly like its gradient. The fused
    kernels walk a parameter, its gradient and its state by the same memory offsets; given
    anything else they compute garbage (CPU) or refuse (CUDA)."""
    return all(
        p.device.type in devices and torch.is_floating_point(p) and dense(p) and p.stride() == g.stride()
        for p, g in zip(params, grads)
    )


class FunctionalOptimizer:
    """Base class of the functional optimizers.

    Subclasses set :attr:`torch_optimizer` (the ``torch.optim`` class whose algorithm they run and
    whose state layout they keep) and implement :meth:`_update`, which updates a list of
    parameters of one param group with one kernel call.

    ``FunctionalX(params, **hyperparameters)`` builds its own holder optimizer from the same
    arguments as the torch class (and so validates them with torch's own messages);
    ``FunctionalX.bind(optimizer)`` shares an existing optimizer's groups and state instead.
    """

    #: The torch.optim class whose update rule and state layout this optimizer reproduces.
    torch_optimizer: ClassVar[type[Optimizer]]
    #: Whether the update accepts sparse gradients.
    supports_sparse: ClassVar[bool] = False

    _holder: Optimizer

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], **hyperparameters: Any):
        if isinstance(params, Tensor):
            raise TypeError(
                f"params must be an iterable of Tensors or dicts, got a single {torch.typename(params)}"
            )
        self._init_holder(self.torch_optimizer(params, **hyperparameters))

    @classmethod
    def bind(cls, optimizer: Optimizer) -> "FunctionalOptimizer":
        """Return a functional optimizer that shares ``optimizer``'s param groups and state.

        Example:
            >>> import torch
            >>> from overlap_sgd import FunctionalAdam
            >>> w = torch.nn.Parameter(torch.zeros(2))
            >>> adam = torch.optim.Adam([w], lr=0.1)
            >>> f = FunctionalAdam.bind(adam)
            >>> f.step_param(w, torch.ones(2))
            >>> int(adam.state[w]["step"])
            1
        """
        if not isinstance(optimizer, cls.torch_optimizer):
            raise TypeError(
                f"{cls.__name__} binds a {cls.torch_optimizer.__name__}, "
                f"got {type(optimizer).__name__}"
            )
        self = cls.__new__(cls)
        self._init_holder(optimizer)
        return self

    def _init_holder(self, holder: Optimizer) -> None:
        for group in holder.param_groups:
            if group.get("differentiable", False):
                raise ValueError(
                    f"{type(self).__name__} cannot run with differentiable=True: the update "
                    "happens inside backward, outside any autograd graph"
                )
        self._holder = holder
        self._lock = threading.Lock()
        self._index_key: tuple[int, int, int] | None = None
        self._group_index: dict[int, int] = {}
        self._order: list[Tensor] = []

    # -- the holder's data -------------------------------------------------------------------

    @property
    def optimizer(self) -> Optimizer:
        """The torch optimizer holding the hyperparameters and state."""
        return self._holder

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self._holder.param_groups

    @property
    def state(self) -> dict[Tensor, dict[str, Any]]:
        return self._holder.state

    @property
    def defaults(self) -> dict[str, Any]:
        return self._holder.defaults

    def state_dict(self) -> dict[str, Any]:
        """The holder's state dict, in the exact format of :attr:`torch_optimizer`."""
        return self._holder.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict taken from this class or from the plain torch optimizer."""
        self._holder.load_state_dict(state_dict)

    # -- parameter lookup --------------------------------------------------------------------

    def _refresh_index(self) -> dict[int, int]:
        groups = self._holder.param_groups
        key = (id(groups), len(groups), sum(len(g["params"]) for g in groups))
        if key != self._index_key:
            with self._lock:
                index: dict[int, int] = {}
                order: list[Tensor] = []
                for gi, group in enumerate(groups):
                    for p in group["params"]:
                        index[id(p)] = gi
                        order.append(p)
                self._group_index, self._order, self._index_key = index, order, key
        return self._group_index

    def group_index(self, param: Tensor) -> int | None:
        """Index of the param group holding ``param``, or ``None`` if this optimizer lacks it."""
        return self._refresh_index().get(id(param))

    def params(self) -> list[Tensor]:
        """All parameters, in param-group order (the order :meth:`step` expects gradients in)."""
        self._refresh_index()
        return list(self._order)

    # -- stepping ----------------------------------------------------------------------------

    def step_param(self, param: Tensor, grad: Tensor | None) -> None:
        """Update one parameter with ``grad``; ``grad=None`` leaves it and its state untouched."""
        self.step_bucket([param], [grad])

    def step(self, gradients: Sequence[Tensor | None]) -> None:
        """Update every parameter; ``gradients`` follows :meth:`params` order, ``None`` skips."""
        params = self.params()
        if len(gradients) != len(params):
            raise ValueError(
                f"step() got {len(gradients)} gradients for {len(params)} parameters; "
                "pass one gradient (or None) per parameter, in param-group order"
            )
        self.step_bucket(params, gradients)

    def step_bucket(self, params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
        """Update many parameters at once: one kernel call per param group they belong to.

        Pairs whose gradient is ``None`` are skipped. Every parameter must belong to this
        optimizer and appear once. All checks run before any parameter is touched.
        """
        if len(params) != len(grads):
            raise ValueError(
                f"step_bucket() got {len(params)} parameters but {len(grads)} gradients"
            )
        index = self._refresh_index()
        by_group: dict[int, tuple[list[Tensor], list[Tensor]]] = {}
        seen: set[int] = set()
        for p, g in zip(params, grads):
            gi = index.get(id(p))
            if gi is None:
                raise ValueError(
                    f"parameter of shape {tuple(p.shape)} is not in this {type(self).__name__}"
                )
            if id(p) in seen:
                raise ValueError(f"parameter of shape {tuple(p.shape)} was passed twice")
            seen.add(id(p))
            if g is None:
                continue
            self.check_grad(p, g)
            ps, gs = by_group.setdefault(gi, ([], []))
            ps.append(p)
            gs.append(g)
        for gi, (ps, gs) in by_group.items():
            self.update(gi, ps, gs)

    def check_grad(self, param: Tensor, grad: Tensor) -> None:
        """Raise if ``grad`` cannot update ``param`` (shape, sparsity)."""
        if not isinstance(grad, Tensor):
            raise TypeError(f"gradient must be a Tensor or None, got {type(grad).__name__}")
        if grad.shape != param.shape:
            raise ValueError(
                f"gradient of shape {tuple(grad.shape)} does not match parameter of shape "
                f"{tuple(param.shape)}"
            )
        if grad.is_sparse and not self.supports_sparse:
            raise RuntimeError(
                f"{self.torch_optimizer.__name__} does not support sparse gradients "
                f"(parameter of shape {tuple(param.shape)})"
            )

    def update(
        self,
        group_index: int,
        params: list[Tensor],
        grads: list[Tensor],
        cache: dict[str, Any] | None = None,
        grad_scale: Tensor | None = None,
        found_inf: Tensor | None = None,
        keys: list[Tensor] | None = None,
    ) -> None:
        """Update ``params`` of group ``group_index`` with ``grads`` in one kernel call.

        ``cache`` is a dict owned by the caller and reused across calls with the same
        parameter list (the DDP hook keeps one per bucket); the update keeps the resolved
        state lists in it. ``cache["fast"] = True`` lets an update whose group leaves the
        kernel to torch (``foreach=None, fused=None``) pick the fused kernel where it keeps
        the state layout; results then match torch's default kernel within float rounding
        rather than bit for bit. No validation happens here: this is the hot path.

        ``grad_scale`` (a 0-dim float32 tensor on the gradients' device) says that ``grads``
        are ``grad_scale`` times the gradients to apply, as after a summing all-reduce. They
        are divided by it in place, so that afterwards they hold the applied gradients:
        inside the fused kernel, which reads them anyway, where the update runs one
        (:attr:`folds_grad_scale`), else by one multi-tensor division first.

        Example:
            >>> import torch
            >>> from overlap_sgd import FunctionalSGD
            >>> w = torch.nn.Parameter(torch.ones(2))
            >>> opt = FunctionalSGD([w], lr=1.0)
            >>> g = torch.full((2,), 4.0)   # the sum of two ranks' gradients of 2.0
            >>> opt.update(0, [w], [g], grad_scale=torch.tensor(2.0))
            >>> w.detach(), g
            (tensor([-1., -1.]), tensor([2., 2.]))

        ``found_inf`` (a 0-dim float32 tensor on the gradients' device, as torch's fused
        kernels take it) makes the update a no-op, parameters and state untouched, where it
        is nonzero. A fused kernel decides that on the device; any other update reads it on
        the host first (on CUDA, a wait for the device).

        ``keys`` (sharded training) are the parameters whose ``state`` entries hold the state of
        ``params``, which are then pieces of them (flat views of element ranges): state is
        looked up and created under the key, shaped like the piece. Only for optimizers with
        an element-wise update (:attr:`elementwise`).
        """
        group = self._holder.param_groups[group_index]
        cache = cache if cache is not None else {}
        with torch.no_grad():
            if found_inf is not None and not self.takes_found_inf:
                if skip_on_host(found_inf):
                    return
                found_inf = None
            if grad_scale is not None and not self.folds_grad_scale:
                divide_first(grads, grad_scale, cache)
                grad_scale = None
            extra: dict[str, Tensor] = {}
            if grad_scale is not None:
                extra["grad_scale"] = grad_scale
            if found_inf is not None:
                extra["found_inf"] = found_inf
            if keys is not None:
                extra["keys"] = keys
            self._update(group, params, grads, cache, **extra)

    #: What :meth:`correct_clip` costs, in updates of the same parameters (memory passes
    #: counted): global-norm clipping's ``"auto"`` policy speculates only while clipping fires
    #: on fewer than ``1 / cost`` of the recent steps (see :mod:`overlap_sgd.hooks.norm_clip`).
    clip_correction_cost: ClassVar[float] = 1.0
    #: Whether :meth:`_update` accepts ``grad_scale`` (and divides by it itself).
    folds_grad_scale: ClassVar[bool] = False
    #: Whether :meth:`_update` accepts ``found_inf`` (and skips the update where it is set).
    takes_found_inf: ClassVar[bool] = False
    #: Whether the update is element-wise: each element of a parameter is updated from the same
    #: element of its gradient and state alone, so a parameter can be cut into pieces updated on
    #: different ranks (sharded training), with ``keys`` accepted by :meth:`_update`. ``False``
    #: for updates that need a whole tensor (factored or orthogonalised updates, unknown
    #: optimizers): those are sharded by whole parameters.
    elementwise: ClassVar[bool] = False

    def _update(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        cache: dict[str, Any],
        grad_scale: Tensor | None = None,
    ) -> None:
        raise NotImplementedError

    # -- global-norm clipping: correcting a speculative update ---------------------------------

    def corrects_clip(self, group_index: int) -> bool:
        """Whether an update of group ``group_index`` made with the unclipped gradient can be
        corrected afterwards by :meth:`correct_clip` (global-norm clipping then speculates;
        otherwise that group's updates wait until the norm is known). ``False`` here: an
        optimizer declares its rule by overriding both methods (see
        :mod:`overlap_sgd.hooks.norm_clip`)."""
        return False

    def before_speculation(
        self, group_index: int, params: list[Tensor], cache: dict[str, Any] | None, keys: list[Tensor] | None
    ) -> Any:
        """Called just before a speculative update of ``params``: whatever :meth:`correct_clip`
        will need to know of the state as it was (handed back as ``before``). ``None`` here."""
        return None

    def correct_clip(
        self,
        group_index: int,
        params: list[Tensor],
        grads: list[Tensor],
        coef: float,
        before: Any = None,
        keys: list[Tensor] | None = None,
    ) -> None:
        """Turn the update that group ``group_index``'s ``params`` just received from
        ``grads`` into the update they would have received from ``coef * grads``: parameters
        and state as if the gradients had been clipped first. ``grads`` are still unclipped.
        ``keys`` as for :meth:`update`."""
        raise NotImplementedError(f"{type(self).__name__} has no clipping correction")

    def _cached_state(self, cache: dict[str, Any], signature: tuple[Any, ...]) -> Any:
        """The state lists kept in ``cache`` if still valid for ``signature``, else ``None``.

        Cached lists stay valid while the holder keeps the same ``state`` dict (a
        ``load_state_dict`` replaces it) and the group options that shape the state agree.
        """
        if cache.get("state_of") is self._holder.state and cache.get("signature") == signature:
            return cache["lists"]
        return None

    def _store_state(self, cache: dict[str, Any], signature: tuple[Any, ...], lists: Any) -> None:
        cache["state_of"] = self._holder.state
        cache["signature"] = signature
        cache["lists"] = lists

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._holder!r})"


def scalar_dtype(fused: bool = False) -> torch.dtype:
    """The dtype torch.optim stores ``step`` counters in."""
    if fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def add_scaled(targets: list[Tensor], xs: list[Tensor], alpha: float | Tensor | list[Tensor]) -> None:
    """``targets[i] += alpha * xs[i]`` for every ``i``, one multi-tensor call (``alpha`` a
    number, a 0-dim tensor such as a tensor learning rate, or a list of 0-dim tensors, one per
    ``i``; tensors are never read on the host)."""
    if not targets:
        return
    if isinstance(alpha, (Tensor, list, tuple)):
        torch._foreach_add_(targets, torch._foreach_mul(xs, alpha))
    else:
        torch._foreach_add_(targets, xs, alpha=alpha)


def new_step(param: Tensor, group: dict[str, Any]) -> Tensor:
    """A zero ``step`` counter placed as torch.optim places it for this group's options."""
    if group.get("capturable") or group.get("fused"):
        return torch.zeros((), dtype=scalar_dtype(bool(group.get("fused"))), device=param.device)
    return torch.tensor(0.0, dtype=scalar_dtype())
