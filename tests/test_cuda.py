"""The CUDA path: stream ordering, parity on NCCL and gloo, and no host syncs in backward.

Runs wherever CUDA is available (``tools/gpu_check.sh`` runs it on a GPU machine) and is
skipped otherwise. Every case compares against DDP with a post-backward ``torch.optim`` step
(:mod:`tests.parity`), so an update that reads its bucket too early, or a forward that runs
before the updates finished, shows as a difference.

The two race detectors and what they catch:

- ``scramble``: the comm hook scrambles the bucket after its all-reduce and restores it tens
  of milliseconds later on a private stream, returning a future with CUDA events. An update
  that does not wait for those events reads scrambled gradients. (With unused-parameter
  tracking, a hook that joined the bucket's and the flags' futures with ``collect_all``,
  which carries no events, read them.)
- ``late``: the comm hook's future is completed by another thread a few milliseconds after
  the collective, and every update sleeps on the device before it writes (``SleepySGD``).
  A hook that joined the caller's stream to the update stream once, at the end of backward,
  before the late callbacks had enqueued the updates, let the next forward read parameters
  the updates had not written yet; DDP's own wait on a future completed on a stream the
  update did not order did not help either.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import pytest
import torch

import overlap_sgd
from overlap_sgd.functional import FunctionalSGD
from tests.distributed import run_distributed
from tests.parity import Rounding, Scenario, check_moved

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

#: Cycles each ``SleepySGD`` update sleeps on the device before its kernel (~10 ms).
SLEEP_CYCLES = 20_000_000


class SleepySGD(torch.optim.SGD):
    """``torch.optim.SGD`` whose overlapped update first stalls its stream (see the module docs)."""


class FunctionalSleepySGD(FunctionalSGD):
    torch_optimizer = SleepySGD

    def _update(self, group, params, grads, cache, **options):
        torch.cuda._sleep(SLEEP_CYCLES)
        super()._update(group, params, grads, cache, **options)


#: Every CUDA row compares within rounding: the overlapped update may run torch's fused kernel
#: where the post-backward step runs the multi-tensor one (SGD, and Adam with fused=True), and
#: two gloo ranks add their gradients in another order than a reference's averaged all-reduce
#: may (these rows have never run on a GPU here, so they do not bet on bit-equality).
CUDA_ROUNDING = Rounding(1e-5, 1e-6, "fused against multi-tensor kernels on CUDA")


def _register_sleepy() -> None:
    if SleepySGD not in overlap_sgd.registered():
        overlap_sgd.register(SleepySGD, FunctionalSleepySGD)


def _cuda_parity(rank: int, world_size: int, scenarios: list[Scenario]) -> list[dict]:
    """Every scenario in one process (one CUDA start-up); a failing one is reported by name
    and the others still run."""
    import traceback

    from tests.parity import parity_body

    _register_sleepy()
    out = []
    for scenario in scenarios:
        try:
            out.append(parity_body(rank, world_size, scenario))
        except Exception:
            out.append({"name": scenario.name, "error": traceback.format_exc()})
    return out


SGD = partial(torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)
ADAM = partial(torch.optim.Adam, lr=0.01, amsgrad=True)
ADAMW = partial(torch.optim.AdamW, lr=0.01, weight_decay=0.1)
RMSPROP = partial(torch.optim.RMSprop, lr=0.01)  # the generic path: its own step, per bucket
SLEEPY = partial(SleepySGD, lr=0.05, momentum=0.9)
OPTIMIZERS = {"sgd": SGD, "adam-amsgrad": ADAM, "adamw": ADAMW, "rmsprop-generic": RMSPROP}


def _matrix() -> list[Scenario]:
    rows = []
    for name, make in OPTIMIZERS.items():
        for unused in (False, True):
            for bucket_view in (False, True):
                for views in ((True, False) if not bucket_view else (True,)):
                    extra = {"net": {"branch": True}, "branch_rule": "mixed", "steps": 8} if unused else {}
                    rows.append(Scenario(
                        f"{name}-unused{int(unused)}-bucketview{int(bucket_view)}-views{int(views)}",
                        make, world_size=1, device="cuda", grad_views=views, rounding=CUDA_ROUNDING,
                        ddp={"find_unused_parameters": unused, "gradient_as_bucket_view": bucket_view},
                        **extra,
                    ))
    return rows


def _check(results: list[list[dict]], names: set[str] | None = None) -> None:
    for per_rank in results:
        for r in per_rank:
            if names is not None and r["name"] not in names:
                continue
            assert "error" not in r, f"[{r['name']}]\n{r['error']}"
            check_moved(r)


def test_parity_on_nccl() -> None:
    _check(run_distributed(_cuda_parity, 1, _matrix(), backend="nccl", gpu=0, timeout=600))


RACES = [
    Scenario("scramble", SGD, comm="scramble"),
    Scenario("scramble-unused", SGD, comm="scramble", net={"branch": True}, branch_rule="mixed",
             ddp={"find_unused_parameters": True}, steps=8),
    Scenario("scramble-inline", ADAMW, comm="scramble", executor="inline",
             ddp={"find_unused_parameters": True}),
    Scenario("late-sleepy", SLEEPY, comm="late"),
    Scenario("late-sleepy-grad-copies", SLEEPY, comm="late", grad_views=False),
    Scenario("late-sleepy-unused", SLEEPY, comm="late", net={"branch": True}, branch_rule="mixed",
             ddp={"find_unused_parameters": True}, steps=8),
    Scenario("sleepy-own-allreduce", SLEEPY),
    Scenario("sleepy-sliced", SLEEPY, slice_mb=0.001, bucket_cap_mb=0.01),
    # Sharded (one rank: the reduce-scatter and all-gather cover the whole bucket) with updates
    # that sleep before they write: the all-gather and the copy into the parameters must wait.
    Scenario("shard-adamw", ADAMW, shard=True),
    Scenario("shard-sleepy", SLEEPY, shard=True),
    Scenario("shard-sleepy-unused", SLEEPY, shard=True, net={"branch": True}, branch_rule="mixed",
             ddp={"find_unused_parameters": True}, steps=8),
]


@pytest.fixture(scope="module")
def race_results() -> list[list[dict]]:
    rows = [replace(s, world_size=1, device="cuda", rounding=CUDA_ROUNDING) for s in RACES]
    return run_distributed(_cuda_parity, 1, rows, backend="nccl", gpu=0, timeout=300)


@pytest.mark.parametrize("scenario", RACES, ids=[s.name for s in RACES])
def test_race_detectors_on_nccl(scenario: Scenario, race_results: list[list[dict]]) -> None:
    _check(race_results, {scenario.name})


GLOO_ON_ONE_GPU = [
    Scenario("gloo-sgd", SGD),
    Scenario("gloo-adamw-unused", ADAMW, net={"branch": True}, branch_rule="mixed",
             ddp={"find_unused_parameters": True}, steps=8),
    Scenario("gloo-sleepy-late", SLEEPY, comm="late"),
    # DDP's delayed all-reduce in static_graph's first iteration runs the hooks and copies
    # the buckets into .grad right away: the copy must wait for each update, which divides
    # the summed gradients in place (after the sleep).
    Scenario("gloo-static-graph-first-iteration", SLEEPY, ddp={"static_graph": True}, grad_views=False),
    # Sharded over two ranks on one GPU: gloo's reduce-scatter of CUDA tensors has no future (a
    # waiter thread completes one), and the all-gathers run in bucket order on their own group.
    Scenario("gloo-shard-adamw", ADAMW, shard=True),
    Scenario("gloo-shard-sleepy", SLEEPY, shard=True),
]


def test_two_gloo_ranks_on_one_gpu() -> None:
    # NCCL refuses two ranks on one device; gloo reduces CUDA tensors through the host.
    rows = [replace(s, device="cuda", rounding=CUDA_ROUNDING) for s in GLOO_ON_ONE_GPU]
    _check(run_distributed(_cuda_parity, 2, rows, backend="gloo", gpu=0, timeout=600))


def _sync_free_backward(rank: int, world_size: int, configs: list[str]) -> dict:
    import traceback

    out = {}
    for config in configs:
        try:
            out[config] = _sync_free_config(rank, config)
        except Exception:
            out[config] = {"errors": [traceback.format_exc()], "moved": False, "finite": False}
    return out


def _sync_free_config(rank: int, config: str) -> dict:
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from tests.models import Net, batch

    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    ddp_kwargs = {"find_unused_parameters": config == "find-unused"}
    model = DDP(Net(depth=6).to(device), device_ids=[device], bucket_cap_mb=0.002, **ddp_kwargs)
    if config.startswith("adamw-fused"):
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    elif config.startswith("adamw"):
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # "-clip": global-norm clipping that fires on every step (speculated, corrected in step()).
    clip = overlap_sgd.ClipGradNorm(1e-3, policy="speculate") if config.endswith("-clip") else None
    opt = overlap_sgd.overlap(model, opt, check_finite=config.endswith("check-finite"), clip_grad_norm=clip)
    before = [p.detach().clone() for p in model.parameters()]
    errors = []
    step_syncs = []
    for step in range(6):
        x, y = (t.to(device) for t in batch(step, rank))
        loss = F.mse_loss(model(x), y)
        torch.cuda.synchronize()
        watched = step >= 3  # after the first steps built state and settled DDP's buckets
        if watched:
            torch.cuda.set_sync_debug_mode("error")
        try:
            loss.backward()
        except RuntimeError as exc:
            errors.append(f"step {step}: {exc}")
            break  # DDP's reducer is left mid-iteration: nothing more to learn
        finally:
            torch.cuda.set_sync_debug_mode(0)
        if watched and clip is not None:
            # step() reads the norm on the host once (and nothing else waits for the device).
            import warnings

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    opt.step()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            step_syncs.append(sum("synchroniz" in str(w.message) for w in caught))
            assert opt.clipped, "max_norm 1e-3 must clip"
        else:
            opt.step()
        opt.zero_grad()
    torch.cuda.synchronize()
    moved = all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return {"errors": errors, "moved": moved, "finite": finite, "step_syncs": step_syncs}


SYNC_FREE = ["sgd", "adamw", "find-unused", "sgd-check-finite", "adamw-fused-check-finite",
             "sgd-clip", "adamw-clip", "adamw-fused-clip"]


@pytest.fixture(scope="module")
def sync_free_results() -> dict:
    (results,) = run_distributed(_sync_free_backward, 1, SYNC_FREE, backend="nccl", gpu=0, timeout=180)
    return results


@pytest.mark.parametrize("config", SYNC_FREE)
def test_backward_never_waits_for_the_device(config: str, sync_free_results: dict) -> None:
    # find_unused_parameters=True with every parameter used: DDP itself reads its used-map only
    # for a parameter this rank did not use, and so does the overlap.
    r = sync_free_results[config]
    assert r["errors"] == [], r["errors"]
    assert r["moved"] and r["finite"]
    if config.endswith("-clip"):
        assert r["step_syncs"] and all(n <= 1 for n in r["step_syncs"]), r["step_syncs"]


CLIP_CORRECTED = Rounding(1e-4, 5e-5, "a clipped step is corrected after the speculative update "
                          "(a few more roundings), and fused against multi-tensor kernels on CUDA")
ADAMW_FUSED = partial(torch.optim.AdamW, lr=0.01, weight_decay=0.1, fused=True)  # steps on the device
ADAM_CAPTURABLE = partial(torch.optim.Adam, lr=0.01, weight_decay=0.05, capturable=True)
CLIPPED = [
    Scenario(f"clip-{name}-{when}", make, clip_global=max_norm, clip_policy="speculate", steps=12)
    for name, make in (("sgd", SGD), ("adamw", ADAMW), ("adamw-fused", ADAMW_FUSED),
                       ("adam-capturable", ADAM_CAPTURABLE))
    for when, max_norm in (("always", 0.05), ("sometimes", 0.3), ("never", 1e3))
] + [
    Scenario("clip-adamw-auto-sometimes", ADAMW, clip_global=0.3, steps=12),
    Scenario("clip-shard-adamw-sometimes", ADAMW, clip_global=0.3, clip_policy="speculate", shard=True, steps=12),
    Scenario("clip-shard-adamw-defer", ADAMW, clip_global=0.3, clip_policy="defer", shard=True, steps=12),
]


def test_global_clipping_on_nccl() -> None:
    rows = [replace(s, world_size=1, device="cuda", rounding=CLIP_CORRECTED) for s in CLIPPED]
    _check(run_distributed(_cuda_parity, 1, rows, backend="nccl", gpu=0, timeout=300))


def test_global_clipping_with_two_gloo_ranks_on_one_gpu() -> None:
    rows = [replace(s, device="cuda", rounding=CLIP_CORRECTED)
            for s in CLIPPED if s.name.endswith(("adamw-fused-sometimes", "sgd-always", "shard-adamw-sometimes"))]
    _check(run_distributed(_cuda_parity, 2, rows, backend="gloo", gpu=0, timeout=300))


def _check_finite_on_cuda(rank: int, world_size: int) -> dict:
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from tests.models import Net, batch

    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    model = DDP(Net().to(device), device_ids=[device], bucket_cap_mb=0.002)
    opt = overlap_sgd.overlap(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                              check_finite=True)
    for step in range(2):
        x, y = (t.to(device) for t in batch(step, rank))
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    before = model.module.head.bias.detach().clone()
    handle = model.module.head.bias.register_hook(lambda g: g + float("nan"))
    x, y = (t.to(device) for t in batch(2, rank))
    F.mse_loss(model(x), y).backward()  # on CUDA the verdict is read by step(), not here
    handle.remove()
    try:
        opt.step()
    except overlap_sgd.NonFiniteGradientError as exc:
        message = str(exc)
    else:
        message = ""
    untouched = torch.equal(before, model.module.head.bias.detach())
    opt.zero_grad()
    for step in range(3, 5):  # the next iterations train normally
        x, y = (t.to(device) for t in batch(step, rank))
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    moved = not torch.equal(before, model.module.head.bias.detach())
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return {"message": message, "untouched": untouched, "recovered": moved and finite}


def test_check_finite_reports_from_step_on_cuda() -> None:
    (r,) = run_distributed(_check_finite_on_cuda, 1, backend="nccl", gpu=0, timeout=180)
    assert "'head.bias'" in r["message"], r
    assert r["untouched"] and r["recovered"], r
