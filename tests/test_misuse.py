"""Misuse of the public API: the right error, a useful message, and nothing trained by accident.

Every row runs inside one 2-rank gloo job, each on a fresh DDP model. A row either expects an
error (its type and message fragments are checked, and no parameter may have changed), or expects
success (training then has to match a post-backward optimizer step bit for bit: both sides
name the same kernel, and with 2 ranks they update with the same averaged gradients).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

import overlap_sgd
from overlap_sgd import FunctionalSGD, NonFiniteGradientError, register_global, unregister

from .distributed import run_distributed
from .models import Net, PlainSGD, batch

# -- models and helpers (run inside the ranks) -------------------------------------------------


def net() -> Net:
    torch.manual_seed(0)
    return Net(width=8, depth=2)


def ddp(module: nn.Module | None = None, **kwargs: Any) -> DistributedDataParallel:
    return DistributedDataParallel(module if module is not None else net(), **kwargs)


class SparseNet(nn.Module):
    """Net behind an embedding with sparse gradients."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8, sparse=True)
        self.net = Net(width=8, depth=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = (x[:, 0].abs() * 7).long() % 20
        return self.net(self.emb(idx) + x)


class NoSuchOptimizer(PlainSGD):
    """A plain SGD, declared below as needing the global step."""


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, NaN included."""
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(), b.nan_to_num())


def matches_post_backward(model, opt, ref_model, ref_opt) -> dict[str, bool]:
    """The parity checks of a row that trains beside a post-backward reference: bit for bit."""
    pairs = list(zip(model.parameters(), ref_model.parameters()))
    return {
        "equal_to_post_backward": all(same(a, b) for a, b in pairs),
        "state_equal": all(same_state(opt.state[a], ref_opt.state[b]) for a, b in pairs),
    }


def same_state(a: dict, b: dict) -> bool:
    if set(a) != set(b):
        return False
    return all(same(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def loss_of(model: nn.Module, step: int, rank: int) -> torch.Tensor:
    x, y = batch(step, rank, n=8)
    return ((model(x) - y) ** 2).mean()


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int) -> None:
    for step in steps:
        loss_of(model, step, rank).backward()
        opt.step()
        opt.zero_grad()


def attempt(params: list[torch.Tensor], call: Callable[[], Any], **checks: Callable[[], bool]) -> dict:
    """Run ``call``; record its error and whether ``params`` kept their values."""
    before = [p.detach().clone() for p in params]
    error = None
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - recorded and checked by the test
        error = (type(exc), str(exc))
    return {
        "error": error,
        "unchanged": all(same(b, p.detach()) for b, p in zip(before, params)),
        "checks": {name: passes(check) for name, check in checks.items()},
    }


def passes(check: Callable[[], bool]) -> bool | str:
    """``check()``, or the error it raised (which counts as a failure)."""
    try:
        return bool(check())
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"


def retry_works(model: DistributedDataParallel) -> bool:
    """A failed overlap() must leave the model as it was: a correct call then succeeds."""
    overlap_sgd.overlap(model, torch.optim.SGD(model.parameters(), lr=0.1))
    return True


def rejected(make_opt: Callable[[DistributedDataParallel], Any], **kwargs: Any) -> Callable[[int], dict]:
    """A row: ``overlap(model, make_opt(model), **kwargs)`` on a fresh model must fail."""

    def run(rank: int) -> dict:
        model = ddp()
        params = list(model.parameters())
        return attempt(params, lambda: overlap_sgd.overlap(model, make_opt(model), **kwargs),
                       model_still_usable=lambda: retry_works(model))

    return run


def sgd(model: nn.Module, **kw: Any) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.1, **kw)


# -- the rows --------------------------------------------------------------------------------


def row_not_ddp(rank: int) -> dict:
    module = net()
    return attempt(list(module.parameters()), lambda: overlap_sgd.overlap(module, sgd(module)))


def row_foreign_param(rank: int) -> dict:
    model = ddp()
    foreign = nn.Parameter(torch.ones(3))
    params = [*model.parameters(), foreign]
    return attempt(params, lambda: overlap_sgd.overlap(model, torch.optim.SGD(params, lr=0.1)),
                   model_still_usable=lambda: retry_works(model))


def row_double_overlap(rank: int) -> dict:
    model = ddp()
    first = overlap_sgd.overlap(model, sgd(model))
    second = sgd(model, momentum=0.9)
    result = attempt(list(model.parameters()), lambda: overlap_sgd.overlap(model, second))

    def first_still_trains() -> bool:
        before = [p.detach().clone() for p in model.parameters()]
        train(model, first, range(1), rank)
        return all(not torch.equal(b, p) for b, p in zip(before, model.parameters())) and not second.state

    result["checks"]["first_still_trains"] = first_still_trains()
    return result


def row_existing_comm_hook(rank: int) -> dict:
    model = ddp()
    model.register_comm_hook(dist.group.WORLD, default_hooks.allreduce_hook)
    return attempt(list(model.parameters()), lambda: overlap_sgd.overlap(model, sgd(model)))


def row_lbfgs(rank: int) -> dict:
    return rejected(lambda m: torch.optim.LBFGS(m.parameters()))(rank)


def row_declared_global(rank: int) -> dict:
    register_global(NoSuchOptimizer, "it normalises by the gradient norm of the whole model")
    try:
        return rejected(lambda m: NoSuchOptimizer(m.parameters()))(rank)
    finally:
        unregister(NoSuchOptimizer)


def row_closure(rank: int) -> dict:
    model = ddp()
    opt = overlap_sgd.overlap(model, sgd(model))
    called = []

    def closure() -> float:
        called.append(True)
        return 0.0

    return attempt(list(model.parameters()), lambda: opt.step(closure), closure_not_called=lambda: not called)


def _all_but_head(model: DistributedDataParallel) -> list[nn.Parameter]:
    head = set(map(id, model.module.head.parameters()))
    return [p for p in model.parameters() if id(p) not in head]


def _add_group_row(make_group: Callable[[DistributedDataParallel], list[torch.Tensor]]) -> Callable[[int], dict]:
    def run(rank: int) -> dict:
        model = ddp(Net(width=8, depth=2, frozen=True))
        opt = overlap_sgd.overlap(model, torch.optim.SGD(_all_but_head(model), lr=0.1))
        group = make_group(model)
        groups = len(opt.param_groups)
        return attempt([*model.parameters(), *group], lambda: opt.add_param_group({"params": group}),
                       no_group_added=lambda: len(opt.param_groups) == groups)

    return run


row_add_group_foreign = _add_group_row(lambda m: [nn.Parameter(torch.ones(4))])
row_add_group_held = _add_group_row(lambda m: [m.module.inp.weight])
row_add_group_frozen = _add_group_row(lambda m: [m.module.frozen.weight])


def row_add_group_not_dict(rank: int) -> dict:
    model = ddp()
    opt = overlap_sgd.overlap(model, torch.optim.SGD(_all_but_head(model), lr=0.1))
    return attempt(list(model.parameters()), lambda: opt.add_param_group([model.module.head.bias]))


def row_add_group_valid(rank: int) -> dict:
    """A model parameter no optimizer holds yet can be added, and then trains as post-backward."""
    ref_model = ddp(net())
    model = ddp(net())
    ref_opt = torch.optim.SGD(_all_but_head(ref_model), lr=0.1, momentum=0.9, fused=True)
    opt = overlap_sgd.overlap(model, torch.optim.SGD(_all_but_head(model), lr=0.1, momentum=0.9, fused=True))
    head_before = [p.detach().clone() for p in model.module.head.parameters()]
    error = None
    try:
        for m, o in ((ref_model, ref_opt), (model, opt)):
            train(m, o, range(2), rank)
            o.add_param_group({"params": list(m.module.head.parameters()), "lr": 0.05})
            train(m, o, range(2, 4), rank)
    except Exception as exc:  # noqa: BLE001
        error = (type(exc), str(exc))
    return {
        "error": error,
        "checks": {
            **matches_post_backward(model, opt, ref_model, ref_opt),
            "head_trained": all(not torch.equal(a, b) for a, b in zip(model.module.head.parameters(), head_before)),
        },
    }


def row_sparse_adam(rank: int) -> dict:
    model = ddp(SparseNet())
    return attempt(list(model.parameters()),
                   lambda: overlap_sgd.overlap(model, torch.optim.Adam(model.parameters())),
                   model_still_usable=lambda: retry_works(model))


def row_sparse_sgd(rank: int) -> dict:
    """SGD takes sparse gradients: overlapped training matches post-backward."""
    ref_model, model = ddp(SparseNet()), ddp(SparseNet())
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9, foreach=False)
    error = None
    emb_before = model.module.emb.weight.detach().clone()
    try:
        opt = overlap_sgd.overlap(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=False))
        train(ref_model, ref_opt, range(3), rank)
        train(model, opt, range(3), rank)
    except Exception as exc:  # noqa: BLE001
        error = (type(exc), str(exc))
    return {
        "error": error,
        "checks": {
            "equal_to_post_backward": all(same(a, b) for a, b in zip(model.parameters(), ref_model.parameters())),
            "embedding_trained": not torch.equal(emb_before, model.module.emb.weight),
        },
    }


def row_held_by_two(rank: int) -> dict:
    model = ddp()
    return attempt(list(model.parameters()), lambda: overlap_sgd.overlap(
        model, [sgd(model), torch.optim.Adam([model.module.body[1].weight])]),
        model_still_usable=lambda: retry_works(model))


def row_held_by_none(rank: int) -> dict:
    model = ddp()
    m = model.module
    return attempt(list(model.parameters()), lambda: overlap_sgd.overlap(
        model, [torch.optim.SGD(m.inp.parameters(), lr=0.1), torch.optim.Adam(m.body.parameters())]),
        model_still_usable=lambda: retry_works(model))


def row_second_backward_without_step(rank: int) -> dict:
    model = ddp()
    opt = overlap_sgd.overlap(model, sgd(model, momentum=0.9))
    initial = [p.detach().clone() for p in model.parameters()]
    loss_of(model, 0, rank).backward()
    after_first = [p.detach().clone() for p in model.parameters()]
    result = attempt(list(model.parameters()), lambda: loss_of(model, 1, rank).backward())
    result["checks"]["first_backward_updated"] = all(
        not torch.equal(a, b) for a, b in zip(initial, after_first))
    return result


def _nan_hook(grad: torch.Tensor) -> torch.Tensor:
    return grad * float("nan")


NAN_STEP = 1  # step 0 is clean, so the optimizer has state to protect


def row_nan_default(rank: int) -> dict:
    """check_finite=False: the NaN update happens exactly as a post-backward step does it."""
    ref_model, model = ddp(net(), bucket_cap_mb=0.0001), ddp(net(), bucket_cap_mb=0.0001)
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=0.01, fused=True)
    opt = overlap_sgd.overlap(model, torch.optim.Adam(model.parameters(), lr=0.01, fused=True))
    error = None
    try:
        for m, o in ((ref_model, ref_opt), (model, opt)):
            train(m, o, range(NAN_STEP), rank)
            handle = m.module.head.bias.register_hook(_nan_hook) if rank == 0 else None
            train(m, o, range(NAN_STEP, NAN_STEP + 1), rank)
            if handle is not None:
                handle.remove()
    except Exception as exc:  # noqa: BLE001
        error = (type(exc), str(exc))
    return {
        "error": error,
        "checks": {
            **matches_post_backward(model, opt, ref_model, ref_opt),
            "nan_reached_head_bias": bool(torch.isnan(model.module.head.bias).all()),
            "other_params_finite": all(
                bool(torch.isfinite(p).all()) for n, p in model.module.named_parameters() if n != "head.bias"),
        },
    }


def row_nan_check_finite(rank: int) -> dict:
    """check_finite=True: backward() raises, and the NaN bucket's parameters and state are kept."""
    buckets: dict[int, list[torch.Tensor]] = {}

    def recording_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        buckets[bucket.index()] = bucket.parameters()
        return default_hooks.allreduce_hook(state, bucket)

    model = ddp(net(), bucket_cap_mb=0.0001)
    opt = overlap_sgd.overlap(model, torch.optim.Adam(model.parameters(), lr=0.01),
                              recording_hook, dist.group.WORLD, check_finite=True)
    train(model, opt, range(NAN_STEP), rank)
    buckets.clear()
    bias = model.module.head.bias
    if rank == 0:
        bias.register_hook(_nan_hook)
    state_before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    result = attempt([], lambda: loss_of(model, NAN_STEP, rank).backward())
    # The bucket holding head.bias is known once backward has run.
    nan_bucket = next((ps for ps in buckets.values() if any(p is bias for p in ps)), [])
    ids = set(map(id, nan_bucket))
    result["unchanged"] = bool(nan_bucket) and all(
        same(b, p.detach()) for b, p in zip(before, params) if id(p) in ids)
    result["checks"]["bucket_state_unchanged"] = bool(nan_bucket) and all(
        same_state(opt.state[p], state_before[id(p)]) for p in nan_bucket)
    result["checks"]["state_was_there"] = all(state_before[id(p)] for p in nan_bucket)
    return result


def row_nan_check_finite_sharded(rank: int) -> dict:
    """shard=True, check_finite=True: every rank raises from backward() (the verdict is reduced
    over the ranks), and the NaN bucket's parameters and each rank's state pieces are kept."""
    model = ddp(net(), bucket_cap_mb=0.0001)
    opt = overlap_sgd.overlap(model, torch.optim.Adam(model.parameters(), lr=0.01), check_finite=True, shard=True)
    train(model, opt, range(NAN_STEP + 1), rank)  # two clean steps: past DDP's bucket rebuild
    bias = model.module.head.bias
    if rank == 0:
        bias.register_hook(_nan_hook)
    state_before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    result = attempt([], lambda: loss_of(model, NAN_STEP + 1, rank).backward())
    plans = opt.hook_state._plans.values()
    nan_bucket = next((plan.params for plan in plans if any(p is bias for p in plan.params)), [])
    ids = set(map(id, nan_bucket))
    result["unchanged"] = bool(nan_bucket) and all(
        same(b, p.detach()) for b, p in zip(before, params) if id(p) in ids)
    result["checks"]["bucket_state_unchanged"] = bool(nan_bucket) and all(
        same_state(opt.state.get(p, {}), state_before[id(p)]) for p in nan_bucket)
    result["checks"]["others_moved"] = any(
        not same(b, p.detach()) for b, p in zip(before, params) if id(p) not in ids)
    return result


def row_shard_sparse(rank: int) -> dict:
    model = ddp(SparseNet())
    return attempt(list(model.parameters()),
                   lambda: overlap_sgd.overlap(model, sgd(model), shard=True),
                   model_still_usable=lambda: retry_works(model))


class GappyNet(nn.Module):
    """A parameter whose elements have gaps between them in memory (a strided slice)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = Net(width=8, depth=2)
        self.scale = nn.Parameter(torch.ones(4, 8)[:, ::2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.scale.sum()


def row_shard_gappy_param(rank: int) -> dict:
    model = ddp(GappyNet())
    return attempt(list(model.parameters()),
                   lambda: overlap_sgd.overlap(model, sgd(model), shard=True),
                   model_still_usable=lambda: retry_works(model))


def _overlap_kwargs_row(*args: Any, **kwargs: Any) -> Callable[[int], dict]:
    def run(rank: int) -> dict:
        model = ddp()
        params = list(model.parameters())
        return attempt(params, lambda: overlap_sgd.overlap(model, sgd(model), *args, **kwargs),
                       model_still_usable=lambda: retry_works(model))

    return run


def row_already_overlapped(rank: int) -> dict:
    first = ddp()
    wrapped = overlap_sgd.overlap(first, sgd(first))
    model = ddp()
    return attempt(list(model.parameters()), lambda: overlap_sgd.overlap(model, wrapped),
                   model_still_usable=lambda: retry_works(model))


def row_already_overlapped_in_list(rank: int) -> dict:
    first = ddp()
    wrapped = overlap_sgd.overlap(first, sgd(first))
    model = ddp()
    return attempt(list(model.parameters()), lambda: overlap_sgd.overlap(model, [sgd(model), wrapped]),
                   model_still_usable=lambda: retry_works(model))


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    run: Callable[[int], dict]
    error: type[BaseException] | None  # None: the call must succeed
    fragments: tuple[str, ...] = ()


ROWS = [
    Row("not-ddp", row_not_ddp, TypeError, ("DistributedDataParallel", "Net")),
    Row("foreign-param", row_foreign_param, ValueError, ("(3,)", "not a parameter of the DDP model")),
    Row("double-overlap", row_double_overlap, RuntimeError, ("already called",)),
    Row("existing-comm-hook", row_existing_comm_hook, RuntimeError, ("already has a communication hook",)),
    Row("lbfgs", row_lbfgs, TypeError, ("LBFGS cannot be overlapped",)),
    Row("declared-global", row_declared_global, TypeError,
        ("NoSuchOptimizer cannot be overlapped", "gradient norm of the whole model")),
    Row("closure", row_closure, TypeError, ("closure",)),
    Row("add-group-foreign", row_add_group_foreign, ValueError, ("(4,)", "not a trainable parameter")),
    Row("add-group-held", row_add_group_held, ValueError, ("'inp.weight'", "already held")),
    Row("add-group-frozen", row_add_group_frozen, ValueError, ("not a trainable parameter",)),
    Row("add-group-not-dict", row_add_group_not_dict, TypeError, ("dict",)),
    Row("add-group-valid", row_add_group_valid, None),
    Row("sparse-adam", row_sparse_adam, ValueError, ("'emb.weight'", "sparse", "Adam")),
    Row("optimizer-is-string", rejected(lambda m: "sgd"), TypeError, ("torch.optim.Optimizer", "str")),
    Row("optimizer-is-functional", rejected(lambda m: FunctionalSGD(m.parameters(), lr=0.1)), TypeError,
        ("torch.optim.Optimizer", "FunctionalSGD")),
    Row("optimizer-empty-list", rejected(lambda m: []), ValueError, ("empty",)),
    Row("optimizer-already-overlapped", row_already_overlapped, TypeError, ("already an OverlappedOptimizer",)),
    Row("optimizer-already-overlapped-in-list", row_already_overlapped_in_list, TypeError,
        ("optimizer 1 is already an OverlappedOptimizer",)),
    Row("comm-hook-not-callable", _overlap_kwargs_row(42), TypeError, ("comm_hook", "42")),
    Row("executor-wrong-type", _overlap_kwargs_row(executor=3), TypeError, ("executor", "int")),
    Row("executor-unknown-name", _overlap_kwargs_row(executor="warp"), ValueError, ("executor", "'warp'")),
    Row("executor-stream-on-cpu", _overlap_kwargs_row(executor="stream"), ValueError, ("CUDA",)),
    Row("check-finite-str", _overlap_kwargs_row(check_finite="yes"), ValueError, ("check_finite", "'yes'")),
    Row("check-finite-int", _overlap_kwargs_row(check_finite=1), TypeError, ("check_finite", "int")),
    Row("clip-value-type", _overlap_kwargs_row(clip_grad_value="1"), TypeError, ("clip_grad_value",)),
    Row("clip-norm-negative", _overlap_kwargs_row(clip_grad_norm=-1.0), ValueError, ("clip_grad_norm", "-1.0")),
    Row("consistency-type", _overlap_kwargs_row(check_consistency_every=1.5), TypeError,
        ("check_consistency_every", "float")),
    Row("consistency-negative", _overlap_kwargs_row(check_consistency_every=-2), ValueError,
        ("check_consistency_every", "-2")),
    Row("held-by-two", row_held_by_two, ValueError, ("'body.1.weight'", "optimizers 0 and 1")),
    Row("held-by-none", row_held_by_none, ValueError, ("'head.weight'", "none of the optimizers", "1 more")),
    Row("second-backward-without-step", row_second_backward_without_step, RuntimeError, ("no_sync", "step()")),
    Row("nan-default", row_nan_default, None),
    Row("nan-check-finite", row_nan_check_finite, NonFiniteGradientError, ("'head.bias'", "non-finite")),
    Row("sparse-sgd", row_sparse_sgd, None),
    Row("shard-not-bool", _overlap_kwargs_row(shard=1), TypeError, ("shard", "int")),
    Row("shard-with-comm-hook", _overlap_kwargs_row(default_hooks.fp16_compress_hook, shard=True), ValueError,
        ("shard=True", "fp16_compress_hook", "shard=False")),
    Row("shard-sparse", row_shard_sparse, ValueError, ("shard=True", "sparse", "'emb.weight'")),
    Row("shard-gappy-param", row_shard_gappy_param, ValueError, ("'scale'", "gaps", "(8, 2)")),
    Row("shard-nan-check-finite", row_nan_check_finite_sharded, NonFiniteGradientError,
        ("'head.bias'", "non-finite")),
]


def all_rows(rank: int, world_size: int) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for row in ROWS:
        try:
            results[row.name] = row.run(rank)
        except Exception as exc:  # noqa: BLE001 - a row's own setup failed
            results[row.name] = {"setup_error": f"{type(exc).__name__}: {exc}"}
        dist.barrier()
    return results


@pytest.fixture(scope="module")
def outcomes() -> list[dict[str, dict]]:
    return run_distributed(all_rows, 2, timeout=120)


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_misuse(row: Row, outcomes: list[dict[str, dict]]) -> None:
    for rank, results in enumerate(outcomes):
        r = results[row.name]
        where = f"rank {rank}, {row.name}"
        assert "setup_error" not in r, f"{where}: {r.get('setup_error')}"
        failed = {name: ok for name, ok in r["checks"].items() if ok is not True}
        if row.error is None:
            assert r["error"] is None, f"{where}: unexpected {r['error']}"
            assert not failed, f"{where}: failed checks {failed}"
            continue
        assert r["unchanged"], f"{where}: a parameter changed"
        assert r["error"] is not None, f"{where}: no error raised, expected {row.error.__name__}"
        etype, message = r["error"]
        for fragment in row.fragments:
            assert fragment in message, f"{where}: {fragment!r} not in {message!r}"
        assert not failed, f"{where}: failed checks {failed}"
        assert issubclass(etype, row.error), f"{where}: {etype.__name__} raised, expected {row.error.__name__}"
