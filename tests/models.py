"""Small deterministic models and data for the tests."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["Lion", "Net", "PlainSGD", "assert_identical", "batch", "twin"]


class Net(nn.Module):
    """An MLP with optional tied weights, a frozen layer and a sometimes-unused branch."""

    def __init__(self, width: int = 16, depth: int = 3, tied: bool = False, frozen: bool = False,
                 branch: bool = False, reverse: bool = False):
        super().__init__()
        self.reverse = reverse  # use the body in reverse registration order (DDP rebuilds buckets)
        self.inp = nn.Linear(8, width)
        self.body = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 4)
        self.tied = tied
        if tied:
            self.dec = nn.Linear(width, width)
            self.dec.weight = self.body[0].weight
        self.frozen = nn.Linear(width, width) if frozen else None
        if frozen:
            self.frozen.requires_grad_(False)
        self.branch = nn.Linear(width, width) if branch else None

    def forward(self, x: torch.Tensor, use_branch: bool = False) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for layer in (reversed(self.body) if self.reverse else self.body):
            h = torch.tanh(layer(h))
        if self.tied:
            h = torch.tanh(self.dec(h))
        if self.frozen is not None:
            h = h + self.frozen(h)
        if self.branch is not None and use_branch:
            h = h + torch.tanh(self.branch(h))
        return self.head(h)


def batch(step: int, rank: int, n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic data for (step, rank)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank)
    return torch.randn(n, 8, generator=g), torch.randn(n, 4, generator=g)


def twin(model: nn.Module) -> nn.Module:
    """An identical copy (tied weights stay tied)."""
    return copy.deepcopy(model)


class PlainSGD(torch.optim.Optimizer):
    """A minimal optimizer that no registry entry knows (tests subclass it to get fresh classes)."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.1})

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data.add_(p.grad, alpha=-group["lr"])


def assert_identical(a, b, where: str = "root") -> None:
    """Recursive bit-for-bit equality of nested dicts / lists / tensors (a saved checkpoint)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), f"{where} differs by {(a - b).abs().max().item()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


class Lion(torch.optim.Optimizer):
    """A user optimizer nobody registered (Chen et al., 2023): per-parameter, sign of momentum."""

    def __init__(self, params: Any, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                update = exp_avg.mul(beta1).add_(p.grad, alpha=1 - beta1).sign_()
                p.add_(update, alpha=-group["lr"])
                exp_avg.mul_(beta2).add_(p.grad, alpha=1 - beta2)
