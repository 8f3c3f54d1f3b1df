"""The CUDA path: stream ordering, parity on NCCL and gloo, and no host syncs in backward.

Runs wherever CUDA is available (``tools/gpu_check.sh`` runs it on a GPU machine) and is
skipped otherwise. Every case compares against DDP with a post-backward ``torch.optim`` step
(:mod:`tests.parity`), so an update that reads its bucket too early, or a forward that runs
before the updates finished, shows as a difference.

The race detectors and what they catch:

- ``race=True`` rows (:mod:`tests.races`): every collective the overlap issues (its own
  all-reduce, sliced or not, the used flags, the sharded reduce-scatter, all-gather and
  broadcast) lands late: its result is scrambled, then restored tens of milliseconds later
  on a private stream behind ``torch.cuda._sleep``, and its future carries the restore's
  event. World size 1 makes NCCL's collectives identities, so without this delay a missing
  stream wait would go unseen. Each is also run with one wait removed
  (:mod:`overlap_sgd.hooks.faults`) and must then fail.
- ``scramble``: the same for a user's comm hook (the bucket scrambled after its all-reduce).
- ``late``: the comm hook's future is completed by another thread a few milliseconds after
  the collective, and every update sleeps on the device before it writes (``SleepySGD``).
  A hook that joined the caller's stream to the update stream once, at the end of backward,
  before the late callbacks had enqueued the updates, let the next forward read parameters
  the updates had not written yet; DDP's own wait on a future completed on a stream the
  update did not order did not help either.
- Collectives never queue behind updates: with updates that sleep, the last all-reduce must
  finish long before the updates do (and does not with ``faults.SHARED_STREAM``), and the
  update, flag and copy streams are none of torch's pooled streams, which NCCL uses.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import pytest
import torch

import overlap_sgd
from overlap_sgd.functional import FunctionalSGD
from overlap_sgd.hooks import faults
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


class TensorLR:
    """An optimizer factory with a tensor ``lr``, made where it is called (a tensor that
    crossed into a spawned rank would live in memory shared between the ranks)."""

    def __init__(self, optimizer: type, lr: float, **kwargs):
        self.optimizer, self.lr, self.kwargs = optimizer, lr, kwargs

    def __call__(self, params):
        return self.optimizer(params, lr=torch.tensor(self.lr), **self.kwargs)


BF16 = Rounding(2e-2, 2e-2, "bfloat16 parameters: fused against multi-tensor kernels differ by "
                "bfloat16 ulps, which the next steps carry on")
#: What no other row runs on CUDA: bfloat16 parameters, capturable Adam, a tensor learning rate,
#: DDP's static graph (unused parameters known once), and the multi-tensor AdamW that torch
#: picks by default on CUDA, also with check_finite (which then runs the fused kernel).
EXTRA = [
    Scenario("bf16-params-adamw", ADAMW, dtype="bfloat16", rounding=BF16),
    Scenario("bf16-params-sgd", SGD, dtype="bfloat16", rounding=BF16),
    Scenario("adam-capturable", partial(torch.optim.Adam, lr=0.01, weight_decay=0.05, capturable=True)),
    Scenario("adamw-tensor-lr-fused", TensorLR(torch.optim.AdamW, 0.01, fused=True)),
    Scenario("sgd-tensor-lr-single", TensorLR(torch.optim.SGD, 0.05, momentum=0.9, foreach=False)),
    Scenario("static-graph", SGD, ddp={"static_graph": True}),
    Scenario("static-graph-never-used", ADAMW, net={"branch": True}, ddp={"static_graph": True}, steps=6),
    Scenario("adamw-foreach", partial(torch.optim.AdamW, lr=0.01, weight_decay=0.1, foreach=True)),
]


def test_parity_on_nccl() -> None:
    _check(run_distributed(_cuda_parity, 1, _matrix(), backend="nccl", gpu=0, timeout=600))


def test_what_no_other_row_covers_on_nccl() -> None:
    rows = [replace(s, world_size=1, device="cuda", rounding=s.rounding or CUDA_ROUNDING) for s in EXTRA]
    results = run_distributed(_cuda_parity, 1, rows, backend="nccl", gpu=0, timeout=300)
    for r in results[0]:
        assert "error" not in r, f"[{r['name']}]\n{r['error']}"
        check_moved(r, ("branch",) if r["name"] == "static-graph-never-used" else ())
        if r["name"].startswith("static-graph"):
            assert r["flag_launches"][-1] == r["flag_launches"][3], r["flag_launches"]


RACES = [
    Scenario("delayed-own-allreduce", ADAMW, race=True, slice_mb=None),
    Scenario("delayed-sliced", SGD, race=True, slice_mb=0.001, bucket_cap_mb=0.01),
    Scenario("delayed-unused", ADAMW, race=True, net={"branch": True}, branch_rule="mixed",
             ddp={"find_unused_parameters": True}, steps=8),
    Scenario("delayed-shard-elements", ADAMW, race=True, shard=True),
    Scenario("delayed-shard-params", RMSPROP, race=True, shard=True),
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


#: Rows that must fail with one wait removed (at world size 1 an all-gather moves nothing, so
#: its wait is shown missing on two ranks on CPU, ``tests/test_races.py``).
WITHOUT_WAITS = [
    (s, faults.COMM_WAIT) for s in RACES
    if s.name in ("delayed-own-allreduce", "delayed-sliced", "delayed-unused", "delayed-shard-elements",
                  "delayed-shard-params", "scramble")
]


@pytest.fixture(scope="module")
def faulty_results() -> list[list[dict]]:
    rows = [replace(s, name=f"{s.name}-without-{switch}", world_size=1, device="cuda",
                    rounding=CUDA_ROUNDING, faults=(switch,), steps=2)
            for s, switch in WITHOUT_WAITS]
    return run_distributed(_cuda_parity, 1, rows, backend="nccl", gpu=0, timeout=300)


@pytest.mark.parametrize("scenario,switch", WITHOUT_WAITS, ids=[f"{s.name}-without-{w}" for s, w in WITHOUT_WAITS])
def test_race_detectors_fail_without_the_wait(scenario: Scenario, switch: str, faulty_results) -> None:
    name = f"{scenario.name}-without-{switch}"
    (r,) = [r for r in faulty_results[0] if r["name"] == name]
    assert "error" in r, f"[{name}] trained as post-backward does with the wait removed: the detector is blind"
    assert f"[{name}]" in r["error"], r["error"]  # the parity check failed, not something else


GLOO_ON_ONE_GPU = [
    Scenario("gloo-delayed-own-allreduce", ADAMW, race=True, slice_mb=None),
    Scenario("gloo-delayed-unused", SGD, race=True, net={"branch": True}, branch_rule="mixed",
             ddp={"find_unused_parameters": True}, steps=8),
    Scenario("gloo-delayed-shard-elements", ADAMW, race=True, shard=True),
    Scenario("gloo-delayed-shard-params", RMSPROP, race=True, shard=True),
    Scenario("gloo-scramble", SGD, comm="scramble"),
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
    branch = config == "static-graph-unused"
    if branch:  # a branch never used: its flags are read on the host until known, then never
        ddp_kwargs = {"static_graph": True}
    model = DDP(Net(depth=6, branch=branch).to(device), device_ids=[device], bucket_cap_mb=0.002, **ddp_kwargs)
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
             "adamw-check-finite", "sgd-clip", "adamw-clip", "adamw-fused-clip", "static-graph-unused"]


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


def _check_finite_on_cuda(rank: int, world_size: int, optimizer: str = "sgd") -> dict:
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from tests.models import Net, batch

    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    model = DDP(Net().to(device), device_ids=[device], bucket_cap_mb=0.002)
    inner = {
        "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
        # torch's default on CUDA, multi-tensor: the overlap runs the fused kernel to skip on
        # the device; pinned to foreach, it reads the verdict on the host instead.
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
        "adamw-foreach": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, foreach=True),
    }[optimizer](model.parameters())
    opt = overlap_sgd.overlap(model, inner, check_finite=True)
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


def _check_finite_each(rank: int, world_size: int, optimizers: list[str]) -> dict:
    import traceback

    out = {}
    for optimizer in optimizers:
        try:
            out[optimizer] = _check_finite_on_cuda(rank, world_size, optimizer)
        except Exception:
            out[optimizer] = {"error": traceback.format_exc()}
    return out


FINITE = ["sgd", "adamw", "adamw-foreach"]


@pytest.fixture(scope="module")
def finite_results() -> dict:
    (r,) = run_distributed(_check_finite_each, 1, FINITE, backend="nccl", gpu=0, timeout=180)
    return r


@pytest.mark.parametrize("optimizer", FINITE)
def test_check_finite_reports_from_step_on_cuda(optimizer: str, finite_results: dict) -> None:
    r = finite_results[optimizer]
    assert "error" not in r, r.get("error")
    assert "'head.bias'" in r["message"], r
    assert r["untouched"] and r["recovered"], r


def _own_streams(rank: int, world_size: int) -> dict:
    """The streams the overlap runs on, against every stream torch's pool hands out."""
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from overlap_sgd.hooks.streams import is_private
    from tests.models import Net, batch

    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    plain = DDP(Net(branch=True).to(device), device_ids=[device], bucket_cap_mb=0.002,
                find_unused_parameters=True)
    sharded = DDP(Net().to(device), device_ids=[device], bucket_cap_mb=0.002)
    opts = [overlap_sgd.overlap(plain, torch.optim.AdamW(plain.parameters(), lr=0.01)),
            overlap_sgd.overlap(sharded, torch.optim.AdamW(sharded.parameters(), lr=0.01), shard=True)]
    for step in range(2):
        for model, opt in zip((plain, sharded), opts):
            x, y = (t.to(device) for t in batch(step, rank))
            F.mse_loss(model(x), y).backward()  # the branch unused: the flags are read
            opt.step()
            opt.zero_grad()
    torch.cuda.synchronize()
    plain_state, shard_state = plain._overlap_sgd_state, sharded._overlap_sgd_state
    ours = {
        "update": plain_state.executor(device).stream,
        "flags": plain_state.executor(device)._flag_stream,
        "shard-update": shard_state.executor(device).stream,
        "shard-copy": shard_state._copier.stream,
    }
    # Every priority's pool, several times round (32 streams each): values past the device's
    # range map to its ends.
    pool = {torch.cuda.Stream(device=device, priority=p).cuda_stream for p in range(-8, 1) for _ in range(80)}
    pool.add(torch.cuda.default_stream(device).cuda_stream)
    return {name: {"private": s is not None and is_private(s),
                   "pooled": s is not None and s.cuda_stream in pool} for name, s in ours.items()}


def test_updates_run_on_streams_of_their_own() -> None:
    (r,) = run_distributed(_own_streams, 1, backend="nccl", gpu=0, timeout=120)
    for name, where in r.items():
        assert where == {"private": True, "pooled": False}, (name, where)


def _collectives_run_ahead(rank: int, world_size: int, shared: bool) -> dict:
    """How long after the last bucket's all-reduce the updates finish, with updates that
    sleep (one per bucket); ``shared``: with faults.SHARED_STREAM on."""
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from overlap_sgd.hooks import update_hook
    from tests.models import Net, batch

    _register_sleepy()
    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    model = DDP(Net(depth=8).to(device), device_ids=[device], bucket_cap_mb=0.002)
    opt = overlap_sgd.overlap(model, SleepySGD(model.parameters(), lr=0.05, momentum=0.9), slice_mb=None)
    probe = torch.cuda.Stream(device=device)
    landed: list = []
    real = update_hook.all_reduce

    def probed(t, group, *args, **kwargs):
        future = real(t, group, *args, **kwargs)
        with torch.cuda.stream(probe):
            future.wait()  # the probe stream waits for the collective, the host does not
            event = torch.cuda.Event(enable_timing=True)
            event.record(probe)
        landed.append(event)
        return future

    update_hook.all_reduce = probed
    if shared:
        faults.ACTIVE.add(faults.SHARED_STREAM)
    try:
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(SLEEP_CYCLES)
        stop.record()
        torch.cuda.synchronize()
        sleep_ms = start.elapsed_time(stop)
        gaps = []
        for step in range(4):
            landed.clear()
            x, y = (t.to(device) for t in batch(step, rank))
            F.mse_loss(model(x), y).backward()
            end = torch.cuda.Event(enable_timing=True)
            end.record()  # DDP's wait ordered this stream after every update
            opt.step()
            opt.zero_grad()
            torch.cuda.synchronize()
            gaps.append(landed[-1].elapsed_time(end))
    finally:
        faults.ACTIVE.discard(faults.SHARED_STREAM)
        update_hook.all_reduce = real
    return {"gaps_ms": gaps, "sleep_ms": sleep_ms, "buckets": len(model._overlap_sgd_state._plans)}


def _run_ahead_both(rank: int, world_size: int) -> dict:
    return {shared: _collectives_run_ahead(rank, world_size, shared) for shared in (False, True)}


@pytest.fixture(scope="module")
def run_ahead_results() -> dict:
    (r,) = run_distributed(_run_ahead_both, 1, backend="nccl", gpu=0, timeout=180)
    return r


@pytest.mark.parametrize("shared", [False, True], ids=["own-stream", "without-it"])
def test_no_collective_waits_for_an_update(shared: bool, run_ahead_results: dict) -> None:
    # Updates sleep one `sleep_ms` each, one bucket after another on their stream. If a later
    # all-reduce were queued behind an earlier bucket's update, the last one would land only
    # after all updates but the last: at most about one sleep before they all finish. On a
    # stream of their own, it lands while most updates are still to run.
    r = run_ahead_results[shared]
    assert r["buckets"] >= 6, r
    ahead = min(r["gaps_ms"][1:])  # the first step builds the plans
    far_ahead = ahead > 0.5 * (r["buckets"] - 1) * r["sleep_ms"]
    assert far_ahead != shared, r


def _fsdp_on_cuda(rank: int, world_size: int, configs: list[str], device_type: str = "cuda") -> dict:
    """FSDP2 on one GPU: the overlapped run against the post-backward one, per configuration."""
    import copy
    import traceback

    import torch.nn.functional as F
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from tests.test_fsdp import Model

    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device(device_type)
    out = {}
    for config in configs:
        try:
            torch.manual_seed(0)
            initial = Model().to(device)
            runs = []
            for overlapped in (False, True):
                model = copy.deepcopy(initial)
                kw = {}
                if config == "mixed-precision":
                    kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                for block in model.blocks:
                    fully_shard(block, **kw)
                fully_shard(model, **kw)
                opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1, fused=True)
                if overlapped:
                    opt = overlap_sgd.overlap(model, opt, clip_grad_norm=0.05 if config == "clip" else None)
                before = [p.detach().to_local().clone() for p in model.parameters()]
                for step in range(5):
                    g = torch.Generator().manual_seed(step)
                    x, y = torch.randn(4, 6, generator=g).to(device), torch.randn(4, 5, generator=g).to(device)
                    F.mse_loss(model(x).float(), y).backward()
                    if config == "clip" and not overlapped:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
                    opt.step()
                    opt.zero_grad()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                after = [p.detach().to_local().clone() for p in model.parameters()]
                runs.append((before, after))
            (_, ref), (before, ovl) = runs
            out[config] = {
                "equal": all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(ovl, ref)),
                "moved": all(not torch.equal(a, b) for a, b in zip(before, ovl)),
                "finite": all(bool(torch.isfinite(a).all()) for a in ovl),
            }
        except Exception:
            out[config] = {"error": traceback.format_exc()}
    return out


FSDP_CONFIGS = ["plain", "mixed-precision", "clip"]


def test_fsdp2_on_nccl() -> None:
    # The same fused kernel on both sides, the same reduce-scatter: equal within the rounding
    # of the fused kernel's reads of a shard at another offset.
    (r,) = run_distributed(_fsdp_on_cuda, 1, FSDP_CONFIGS, backend="nccl", gpu=0, timeout=180)
    for config in FSDP_CONFIGS:
        assert r[config] == {"equal": True, "moved": True, "finite": True}, (config, r[config])
