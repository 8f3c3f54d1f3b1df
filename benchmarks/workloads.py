"""The benchmark's workloads (an MLP, a transformer stack) and optimizers.

Example:
    >>> spec = Workload("mlp", width=1024, depth=8, batch=32)
    >>> sum(p.numel() for p in build_model(spec).parameters())
    8396800
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "OPTIMIZERS",
    "Workload",
    "build_model",
    "describe_optimizer",
    "loss_fn",
    "make_batch",
    "make_optimizer",
    "optimizer_spec",
]

#: name -> (torch.optim class, hyperparameters).
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.01}),
    "adam": (torch.optim.Adam, {"lr": 1e-3}),
}


@dataclass(frozen=True)
class Workload:
    """A model and its input shape.

    ``kind`` is ``"mlp"`` (``depth`` x ``Linear(width, width)`` with ReLU between) or
    ``"transformer"`` (``depth`` x ``TransformerEncoderLayer(width, heads)`` over sequences of
    ``seq_len`` tokens).
    """

    kind: str = "mlp"
    width: int = 1024
    depth: int = 8
    batch: int = 32
    heads: int = 4
    seq_len: int = 16

    def label(self) -> str:
        if self.kind == "mlp":
            return f"mlp {self.depth}x{self.width}"
        return f"transformer {self.depth}x{self.width} h{self.heads} seq{self.seq_len}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class MLP(nn.Module):
    """``depth`` square linear layers with ReLU between them."""

    def __init__(self, width: int, depth: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers):
                x = torch.relu(x)
        return x


def build_model(spec: Workload, seed: int = 0) -> nn.Module:
    """The workload's model, initialised from ``seed`` (the same on every rank)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec.kind == "mlp":
            return MLP(spec.width, spec.depth)
        if spec.kind == "transformer":
            layer = lambda: nn.TransformerEncoderLayer(  # noqa: E731
                spec.width, spec.heads, dim_feedforward=4 * spec.width, dropout=0.0,
                batch_first=True,
            )
            return nn.Sequential(*(layer() for _ in range(spec.depth)))
    raise ValueError(f"unknown workload {spec.kind!r}; choose 'mlp' or 'transformer'")


def make_batch(spec: Workload, rank: int, device: torch.device, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A fixed input and regression target for ``rank``."""
    g = torch.Generator().manual_seed(seed * 7919 + rank)
    shape = (spec.batch, spec.width) if spec.kind == "mlp" else (spec.batch, spec.seq_len, spec.width)
    x = torch.randn(shape, generator=g)
    y = torch.randn(shape, generator=g)
    return x.to(device), y.to(device)


def loss_fn(out: Tensor, target: Tensor) -> Tensor:
    return nn.functional.mse_loss(out, target)


def make_optimizer(name: str, params: Any, **kernel: Any) -> torch.optim.Optimizer:
    """The named optimizer over ``params``; ``kernel`` is e.g. ``fused=True`` or ``foreach=True``."""
    cls, hyper = optimizer_spec(name)
    return cls(params, **hyper, **kernel)


def optimizer_spec(name: str) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(OPTIMIZERS)}") from None


def describe_optimizer(name: str) -> str:
    cls, hyper = optimizer_spec(name)
    return f"{cls.__name__}(" + ", ".join(f"{k}={v}" for k, v in hyper.items()) + ")"
