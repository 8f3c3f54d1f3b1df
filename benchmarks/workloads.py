"""The benchmark's workloads (an MLP, a transformer stack, a GPT-style decoder) and optimizers.

Example:
    >>> spec = Workload("mlp", width=1024, depth=8, batch=32)
    >>> sum(p.numel() for p in build_model(spec).parameters())
    8396800
    >>> gpt2_small = Workload("gpt", width=768, depth=12, batch=8, heads=12, seq_len=1024, vocab=50304)
    >>> sum(p.numel() for p in build_model(gpt2_small).parameters())  # embeddings tied to the head
    124475904
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "GPT",
    "KINDS",
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

#: The workload kinds :func:`build_model` knows.
KINDS: tuple[str, ...] = ("mlp", "transformer", "gpt")


@dataclass(frozen=True)
class Workload:
    """A model and its input shape.

    ``kind`` is ``"mlp"`` (``depth`` x ``Linear(width, width)`` with ReLU between, regression
    target), ``"transformer"`` (``depth`` x ``TransformerEncoderLayer(width, heads)`` over
    sequences of ``seq_len`` vectors, regression target) or ``"gpt"`` (:class:`GPT`: a causal
    decoder over ``seq_len`` tokens of a ``vocab``-word vocabulary, next-token cross-entropy).
    """

    kind: str = "mlp"
    width: int = 1024
    depth: int = 8
    batch: int = 32
    heads: int = 4
    seq_len: int = 16
    vocab: int = 50304

    def label(self) -> str:
        if self.kind == "mlp":
            return f"mlp {self.depth}x{self.width}"
        if self.kind == "gpt":
            return f"gpt {self.depth}x{self.width} h{self.heads} seq{self.seq_len} vocab{self.vocab}"
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


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each position sees itself and the positions before it."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = (
            z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
            for z in self.qkv(x).split(c, dim=2)
        )
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """A pre-norm decoder block: attention, then a 4x-wide GELU MLP, each with a residual."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A GPT-2-style causal language model: token and position embeddings, ``depth`` decoder
    blocks, a final LayerNorm and a language-model head tied to the token embedding.

    ``GPT(50304, 1024, 768, 12, 12)`` is GPT-2 small's shape. Takes token ids ``(batch, seq)``
    and returns logits ``(batch, seq, vocab)``.
    """

    def __init__(self, vocab: int, seq_len: int, width: int, depth: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width must be divisible by heads, got width={width}, heads={heads}")
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tok.weight
        for m in self.modules():  # GPT-2's initialisation
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


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
        if spec.kind == "gpt":
            return GPT(spec.vocab, spec.seq_len, spec.width, spec.depth, spec.heads)
    raise ValueError(f"unknown workload {spec.kind!r}; choose from {', '.join(KINDS)}")


def make_batch(spec: Workload, rank: int, device: torch.device, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A fixed input and target for ``rank``: vectors and a regression target, or for ``gpt``
    random token ids and the same sequence shifted by one as the next-token target."""
    g = torch.Generator().manual_seed(seed * 7919 + rank)
    if spec.kind == "gpt":
        tokens = torch.randint(0, spec.vocab, (spec.batch, spec.seq_len + 1), generator=g)
        return tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    shape = (spec.batch, spec.width) if spec.kind == "mlp" else (spec.batch, spec.seq_len, spec.width)
    x = torch.randn(shape, generator=g)
    y = torch.randn(shape, generator=g)
    return x.to(device), y.to(device)


def loss_fn(out: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy over the last dimension for integer (token) targets, else mean squared error."""
    if not target.is_floating_point():
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))
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
