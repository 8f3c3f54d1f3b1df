"""Sharded overlap (``overlap(..., shard=True)``): parity with DDP + post-backward ``torch.optim``
in every loop feature, the same parameters as the unsharded overlap, state that is really
split, and a whole ``state_dict()`` that moves between sharded, unsharded and plain optimizers
and between world sizes."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import overlap_sgd
from tests.distributed import run_distributed
from tests.models import Net, batch, twin
from tests.parity import Scenario, check_moved, parity_many

SGD = partial(torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)
SGD_FUSED = partial(torch.optim.SGD, lr=0.05, momentum=0.9, dampening=0.1, fused=True)
ADAM = partial(torch.optim.Adam, lr=0.01, amsgrad=True, weight_decay=0.01)
ADAM_SINGLE = partial(torch.optim.Adam, lr=0.01, foreach=False, maximize=True)
ADAMW = partial(torch.optim.AdamW, lr=0.01, betas=(0.8, 0.99), weight_decay=0.1)
ADAMW_FUSED = partial(torch.optim.AdamW, lr=0.01, fused=True)
RMSPROP = partial(torch.optim.RMSprop, lr=0.01, momentum=0.5)
ADAGRAD = partial(torch.optim.Adagrad, lr=0.05, initial_accumulator_value=0.1)
NADAM = partial(torch.optim.NAdam, lr=0.01)
ADAFACTOR = partial(torch.optim.Adafactor, lr=0.01)


def muon_and_adamw(model, scenario):
    """Muon for the 2-D weight matrices (sharded by whole parameters), AdamW for the rest."""
    named = [(n, p) for n, p in model.module.named_parameters() if p.requires_grad]
    matrices = [p for n, p in named if p.dim() == 2 and not n.startswith(("inp", "head"))]
    rest = [p for n, p in named if not any(p is m for m in matrices)]
    return [torch.optim.Muon(matrices, lr=0.02, momentum=0.9), torch.optim.AdamW(rest, lr=0.01)]


def S(name: str, make=None, **kw) -> Scenario:
    return Scenario(f"shard-{name}", make, shard=True, **kw)


TWO_RANKS = [
    S("sgd", SGD),
    S("sgd-fused", SGD_FUSED),
    S("adamw", ADAMW),
    S("adamw-fused", ADAMW_FUSED),
    S("adam-single-tensor-maximize", ADAM_SINGLE),
    S("rmsprop-generic", RMSPROP),
    S("adagrad-initial-state", ADAGRAD),
    S("nadam", NADAM),
    S("one-bucket", SGD, bucket_cap_mb=25),
    S("bucket-rebuild", ADAMW, net={"reverse": True, "depth": 4}, bucket_cap_mb=0.004),
    S("inline-executor", ADAMW, executor="inline"),
    S("bucket-view", ADAM, ddp={"gradient_as_bucket_view": True}),
    S("static-graph", SGD, ddp={"static_graph": True}),
    S("tied", ADAMW, net={"tied": True}),
    S("frozen", SGD, net={"frozen": True}),
    S("unused-sgd", SGD, net={"branch": True}, ddp={"find_unused_parameters": True},
      branch_rule="mixed", steps=8),
    S("unused-adam-bucket-view", ADAM, net={"branch": True}, branch_rule="mixed", steps=8,
      ddp={"find_unused_parameters": True, "gradient_as_bucket_view": True}),
    S("no-sync-accumulation", SGD, accumulate=3),
    S("groups-scheduler", SGD, groups=True, scheduler=True),
    S("groups-scheduler-adamw", ADAMW, groups=True, scheduler=True),
    S("partial-optimizer", SGD, partial_optimizer=True),
    S("state-dict-swap", ADAM, swap_state_at=3),
    S("grads-zeroed-in-place", SGD, zero="zeros"),
    S("grad-copies", ADAMW, grad_views=False),
    S("autocast-bf16", ADAMW, autocast=True),
    S("clip-value", SGD, clip_value=0.05),
    # Per-parameter norms need whole gradients: every bucket is sharded by whole parameters.
    S("clip-norm-by-parameters", ADAMW, clip_norm=0.1),
    # Whole-tensor optimizers are sharded by whole parameters.
    S("adafactor-by-parameters", ADAFACTOR),
    S("muon-and-adamw", multi=muon_and_adamw, atol=1e-5, rtol=1e-4),
]

THREE_RANKS = [
    # A reduce-scatter over three ranks may add in another order than the reference's
    # all-reduce: equal within rounding.
    S("sgd-world3", SGD, world_size=3),
    S("adam-amsgrad-world3", ADAM, world_size=3),
    S("no-sync-accumulation-world3", ADAMW, accumulate=2, world_size=3),
    S("unused-world3", ADAMW, net={"branch": True}, branch_rule="mixed", steps=8,
      ddp={"find_unused_parameters": True}, world_size=3),
]


def _check(per_rank_results: list[list[dict]], table: list[Scenario]) -> None:
    by_name = {s.name: s for s in table}
    for per_rank in per_rank_results:
        for r in per_rank:
            scenario = by_name[r["name"]]
            frozen: tuple[str, ...] = ()
            if scenario.net.get("frozen"):
                frozen += ("frozen",)
            if scenario.partial_optimizer:
                frozen += ("head",)
            check_moved(r, frozen)
            assert r["syncs"] == scenario.steps
            # Every rank holds only part of the state (it would hold all of it unsharded).
            assert 0 < r["state_held"] < r["state_whole"], (r["name"], r["state_held"], r["state_whole"])
    # ... and every element of it lives on exactly one rank.
    for i, name in enumerate(r["name"] for r in per_rank_results[0]):
        held = sum(per_rank[i]["state_held"] for per_rank in per_rank_results)
        assert held == per_rank_results[0][i]["state_whole"], (name, held)


def test_sharded_parity_two_ranks() -> None:
    results = run_distributed(parity_many, 2, TWO_RANKS, timeout=240)
    _check(results, TWO_RANKS)
    for per_rank in results:
        moved = {r["name"]: r["state_moved"] for r in per_rank}
        # DDP regrouped its buckets after the first iteration: the states moved to their new homes.
        assert moved["shard-bucket-rebuild"] > 0


def test_sharded_parity_three_ranks() -> None:
    _check(run_distributed(parity_many, 3, THREE_RANKS, timeout=240), THREE_RANKS)
