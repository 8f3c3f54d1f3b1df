"""Global-norm gradient clipping (``overlap(..., clip_grad_norm=...)``) against DDP +
``torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)`` + post-backward ``torch.optim``.

Every row trains both sides for 20 steps (so that drift would show) and checks parameters,
``.grad`` after ``step()`` (clipped), optimizer state and the total norm at every step, that
the parameters moved, and that clipping fired on exactly the reference's steps. Three
``max_norm`` settings per optimizer: it never fires (bit-identical with the same kernel: torch
multiplies by a coefficient of exactly 1.0), it always fires, and it fires on some steps.
"""

from __future__ import annotations

import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import overlap_sgd
from overlap_sgd.functional import FunctionalSGD
from tests.distributed import DistributedFailure, run_distributed
from tests.models import Net, PlainSGD, batch
from tests.parity import Rounding, Scenario, check_moved, parity_body, parity_many

SGD = partial(torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, fused=True)
SGD_DAMPENED = partial(torch.optim.SGD, lr=0.05, momentum=0.9, dampening=0.3, maximize=True, foreach=True)
SGD_PLAIN = partial(torch.optim.SGD, lr=0.05, fused=True)
ADAM = partial(torch.optim.Adam, lr=0.01, weight_decay=0.05, fused=True)  # coupled weight decay
ADAM_SINGLE = partial(torch.optim.Adam, lr=0.01, foreach=False, maximize=True)
ADAMW = partial(torch.optim.AdamW, lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, fused=True)
ADAMW_FOREACH = partial(torch.optim.AdamW, lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, foreach=True)
ADAM_AMSGRAD = partial(torch.optim.Adam, lr=0.01, amsgrad=True, fused=True)
ADAGRAD = partial(torch.optim.Adagrad, lr=0.05, initial_accumulator_value=0.1)
RMSPROP = partial(torch.optim.RMSprop, lr=0.01, momentum=0.5)

#: The model's total gradient norm over the 20 steps ranges about 0.17 to 0.52.
NEVER, ALWAYS, SOMETIMES = 1e3, 0.05, 0.3
SOMETIMES_MAXIMIZE = 0.6
#: Where clipping fired, speculated updates were corrected: why that is not bit-exact.
CORRECTED = Rounding(1e-5, 1e-6, "the correction turns the unclipped update into the clipped one "
                     "with a few more roundings (the difference of two updates), where the "
                     "reference ran the clipped update directly")
#: Adam's update divides by sqrt(v): where a gradient element is near zero, the correction's few
#: extra roundings (about 1e-7 of a parameter) change the next steps' gradients a little, and
#: m / sqrt(v) turns a small change of a near-zero gradient into a visible change of its update.
ADAM_CORRECTED = Rounding(1e-4, 5e-5, CORRECTED.why + "; Adam's m / sqrt(v) amplifies such differences "
                          "where a gradient element is near zero (bounded here at 0.5% of lr)")
THIRDS = Rounding(1e-5, 1e-6, "3 ranks: DDP divides each rank's gradient by 3 before the sum, the "
                  "overlap divides the sum, and a/3 + b/3 + c/3 rounds unlike (a + b + c)/3")
STEPS = 20


def corrected(make) -> Rounding:
    return ADAM_CORRECTED if "Adam" in getattr(make, "func", make).__name__ else CORRECTED


def rows(name: str, make, world_size: int = 2, never: Rounding | None = None, sometimes: float = SOMETIMES,
         **kw) -> list[Scenario]:
    """The three max_norm settings for one optimizer."""
    return [
        Scenario(f"{name}-never", make, world_size=world_size, steps=STEPS, clip_global=NEVER, rounding=never, **kw),
        Scenario(f"{name}-always", make, world_size=world_size, steps=STEPS, clip_global=ALWAYS, rounding=corrected(make), **kw),
        Scenario(f"{name}-sometimes", make, world_size=world_size, steps=STEPS, clip_global=sometimes,
                 rounding=corrected(make), **kw),
    ]


def _check(results: list[list[dict]], table: list[Scenario]) -> list[dict]:
    for per_rank in results:
        for r, s in zip(per_rank, table):
            check_moved(r, ("frozen",) if s.net.get("frozen") else ())
            if s.clip_global == NEVER:
                assert r["clipped"] == 0, r["name"]
            elif s.clip_global == ALWAYS or s.name.endswith("-always"):
                assert r["clipped"] == s.steps, r["name"]
            else:
                assert 0 < r["clipped"] < s.steps, (r["name"], r["clipped"])
    return results[0]


SPECULATED = {
    "sgd-nesterov-decay": SGD,
    "sgd-dampened-maximize-foreach": SGD_DAMPENED,
    "sgd-plain": SGD_PLAIN,
    "adam-coupled-decay": ADAM,
    "adam-single-tensor-maximize": ADAM_SINGLE,
    "adamw": ADAMW,
}


@pytest.mark.parametrize("name", list(SPECULATED))
@pytest.mark.parametrize("shard", [False, True], ids=["unsharded", "sharded"])
def test_speculated_updates_equal_clip_then_step_two_ranks(name: str, shard: bool) -> None:
    make = SPECULATED[name]
    if shard and "fused" in make.keywords:
        # Sharded ranges of a fused CPU kernel round by where a range starts (test_shard.py).
        make = partial(make.func, **{**make.keywords, "fused": None, "foreach": True})
    # Maximizing climbs: the norms grow past the default "sometimes" value.
    table = rows(name, make, shard=shard, clip_policy="speculate", sometimes=SOMETIMES_MAXIMIZE if "maximize" in name else SOMETIMES)
    out = _check(run_distributed(parity_many, 2, table, timeout=240), table)
    assert all(r["deferred"] == 0 for r in out)


@pytest.mark.parametrize("shard", [False, True], ids=["unsharded", "sharded"])
def test_speculated_updates_equal_clip_then_step_three_ranks(shard: bool) -> None:
    table = (rows("sgd-world3", SGD if not shard else SGD_DAMPENED, world_size=3, never=THIRDS, shard=shard)
             + rows("adamw-world3", ADAMW if not shard else ADAMW_FOREACH, world_size=3, never=THIRDS, shard=shard))
    for s in table:
        s.rounding = THIRDS if s.rounding is None else s.rounding
    _check(run_distributed(parity_many, 3, table, timeout=240), table)


DEFERRED = {
    # No correction rule: every step runs deferred, the same kernel on the clipped gradients.
    "adam-amsgrad": ADAM_AMSGRAD,
    "adagrad": ADAGRAD,
    "rmsprop": RMSPROP,
    "user-optimizer": PlainSGD,
}


@pytest.mark.parametrize("name", list(DEFERRED))
def test_optimizers_without_a_correction_run_deferred_and_clip_exactly(name: str) -> None:
    # RMSprop's steps climb to larger gradients: norms about 0.6 to 2.6.
    table = rows(name, DEFERRED[name], sometimes=1.2 if name == "rmsprop" else SOMETIMES)
    for s in table:
        s.rounding = None  # the clipped gradients and the very same kernel: bit-identical
    out = _check(run_distributed(parity_many, 2, table, timeout=240), table)
    assert all(r["deferred"] == STEPS for r in out)


def muon_and_adamw(model, scenario):
    named = [(n, p) for n, p in model.module.named_parameters() if p.requires_grad]
    matrices = [p for n, p in named if p.dim() == 2 and not n.startswith(("inp", "head"))]
    rest = [p for n, p in named if not any(p is m for m in matrices)]
    return [torch.optim.Muon(matrices, lr=0.02, momentum=0.9), torch.optim.AdamW(rest, lr=0.01, fused=True)]


def sgd_and_adamw(model, scenario):
    named = [(n, p) for n, p in model.module.named_parameters() if p.requires_grad]
    body = [p for n, p in named if n.startswith("body")]
    rest = [p for n, p in named if not n.startswith("body")]
    return [SGD(body), ADAMW(rest)]


def test_several_optimizers_share_one_global_norm() -> None:
    table = [
        # Muon has no correction: its updates always run deferred; with "defer" AdamW's too,
        # and both sides run the same kernels on the same clipped gradients.
        Scenario("muon-adamw-sometimes-deferred", multi=muon_and_adamw, steps=STEPS, clip_global=SOMETIMES,
                 clip_policy="defer"),
        Scenario("sgd-adamw-always", multi=sgd_and_adamw, steps=STEPS, clip_global=ALWAYS,
                 rounding=ADAM_CORRECTED, clip_policy="speculate"),
        Scenario("sgd-adamw-never", multi=sgd_and_adamw, steps=STEPS, clip_global=NEVER),
    ]
    _check(run_distributed(parity_many, 2, table, timeout=240), table)


FEATURES = [
    Scenario("no-sync-accumulation", ADAMW, accumulate=3, steps=10),
    Scenario("groups-scheduler", SGD, groups=True, scheduler=True, steps=10),
    Scenario("bf16-autocast", ADAMW, autocast=True, steps=10),
    Scenario("unused-find-unused", ADAM, net={"branch": True}, branch_rule="mixed",
             ddp={"find_unused_parameters": True}, steps=10),
    Scenario("unused-zeroed-in-place", SGD, net={"branch": True}, branch_rule="mixed",
             ddp={"find_unused_parameters": True}, zero="zeros", steps=10),
    Scenario("tied", ADAMW, net={"tied": True}, steps=10),
    Scenario("frozen", SGD, net={"frozen": True}, steps=10),
    Scenario("grad-copies", ADAMW, grad_views=False, steps=10),
    Scenario("bucket-view", ADAM, ddp={"gradient_as_bucket_view": True}, steps=10),
    Scenario("static-graph", SGD, ddp={"static_graph": True}, steps=10),
    Scenario("sliced", ADAMW, bucket_cap_mb=0.01, slice_mb=0.001, steps=10),
    Scenario("inline-executor", SGD, executor="inline", steps=10),
    Scenario("partial-optimizer", ADAMW, partial_optimizer=True, steps=10),
    Scenario("with-per-parameter-and-value-clipping", SGD, clip_value=0.05, clip_norm=0.1, steps=10),
    Scenario("clip-method", ADAMW, clip_method=True, steps=10),
    Scenario("bf16-compression", SGD, comm="bf16", steps=10),
    Scenario("inf-norm", ADAMW, clip_norm_type=float("inf"), steps=10),
]


@pytest.mark.parametrize("policy", ["speculate", "defer", "auto"])
@pytest.mark.parametrize("shard", [False, True], ids=["unsharded", "sharded"])
def test_every_loop_feature_clips_like_the_reference(policy: str, shard: bool) -> None:
    table = []
    for s in FEATURES:
        if shard and (s.comm or s.slice_mb != "auto" or s.executor != "auto"):
            continue  # sharded training has its own communication and executor
        make = s.make
        if shard and make is not None and make.keywords.get("fused"):
            make = partial(make.func, **{**make.keywords, "fused": None, "foreach": True})
        # Accumulated micro-batches sum their gradients: a larger norm.
        max_norm = (0.25 if s.clip_norm_type == 2.0 else 0.15) * s.accumulate
        if s.clip_norm is not None:  # the per-parameter and value clipping shrink the norm first
            max_norm = 0.2
        table.append(Scenario(**{**s.__dict__, "name": f"{s.name}-{policy}", "make": make, "shard": shard,
                                 "clip_global": max_norm, "clip_policy": policy, "rounding": ADAM_CORRECTED}))
    results = run_distributed(parity_many, 2, table, timeout=280)
    for per_rank in results:
        for r, s in zip(per_rank, table):
            check_moved(r, ("frozen",) if s.net.get("frozen") else ("head",) if s.partial_optimizer else ())
            assert 0 < r["clipped"] < s.steps, (r["name"], r["clipped"])
            if policy == "defer":
                assert r["deferred"] == s.steps, r["name"]
            elif policy == "speculate":
                assert r["deferred"] == 0, r["name"]


def test_auto_defers_while_clipping_keeps_firing_and_speculates_when_it_does_not() -> None:
    table = [
        Scenario("auto-always", ADAMW, steps=STEPS, clip_global=ALWAYS, rounding=ADAM_CORRECTED),
        Scenario("auto-never", ADAMW, steps=STEPS, clip_global=NEVER),
    ]
    out = _check(run_distributed(parity_many, 2, table, timeout=240), table)
    # The first step waits for the norm; then every step does while clipping keeps firing,
    # and none once it stopped.
    assert out[0]["deferred"] == STEPS, out[0]["deferred"]
    assert out[1]["deferred"] == 1


# -- a correction that is wrong by a little must fail the parity -----------------------------


def _broken_body(rank: int, world_size: int, scenario: Scenario, breakage: str) -> dict:
    from overlap_sgd.functional import adam

    if breakage == "adam-second-moment-bias-correction":
        adam._bc2_sqrt = lambda beta2, t: 1.0
    elif breakage == "sgd-forgets-new-momentum-buffers":
        right_sgd = FunctionalSGD.correct_clip
        FunctionalSGD.correct_clip = lambda self, gi, p, g, c, before=None, keys=None: right_sgd(self, gi, p, g, c, None, keys)
    return parity_body(rank, world_size, scenario)


@pytest.mark.parametrize("breakage, make", [
    ("adam-second-moment-bias-correction", ADAMW),
    ("sgd-forgets-new-momentum-buffers", SGD_DAMPENED),
])
def test_a_slightly_wrong_correction_fails_the_parity(breakage: str, make) -> None:
    scenario = Scenario(f"broken-{breakage}", make, steps=STEPS, clip_global=ALWAYS,
                        rounding=corrected(make), clip_policy="speculate")
    with pytest.raises(DistributedFailure, match="broken-"):
        run_distributed(_broken_body, 2, scenario, breakage, timeout=120)


# -- a user's optimizer declares its correction ----------------------------------------------


class SignSGD(torch.optim.Optimizer):
    """p -= lr * g, as a class of its own (unregistered classes take the generic path)."""

    def __init__(self, params, lr=0.05):
        super().__init__(params, {"lr": lr})

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data.add_(p.grad, alpha=-group["lr"])


class FunctionalSignSGD(overlap_sgd.FunctionalOptimizer):
    torch_optimizer = SignSGD
    elementwise = True

    def _update(self, group, params, grads, cache, keys=None):
        torch._foreach_add_(params, grads, alpha=-group["lr"])

    def corrects_clip(self, group_index):
        return True

    def correct_clip(self, group_index, params, grads, coef, before=None, keys=None):
        # p = p0 - lr*g; clipped: p0 - lr*c*g, so p += lr*(1 - c)*g.
        torch._foreach_add_(params, grads, alpha=self.param_groups[group_index]["lr"] * (1.0 - coef))


def _registered_body(rank: int, world_size: int) -> list[dict]:
    overlap_sgd.register(SignSGD, FunctionalSignSGD)
    table = [Scenario("user-rule-always", SignSGD, steps=STEPS, clip_global=ALWAYS, rounding=CORRECTED,
                      clip_policy="speculate"),
             Scenario("user-rule-sharded", SignSGD, steps=STEPS, clip_global=SOMETIMES, rounding=CORRECTED,
                      clip_policy="speculate", shard=True)]
    return parity_many(rank, world_size, table)


def test_a_registered_correction_rule_lets_a_user_optimizer_speculate() -> None:
    for per_rank in run_distributed(_registered_body, 2, timeout=120):
        for r in per_rank:
            check_moved(r)
            assert r["deferred"] == 0 and r["clipped"] > 0, r


# -- the API around it ----------------------------------------------------------------------


def _api(rank: int, world_size: int) -> dict:
    out: dict = {}
    torch.manual_seed(0)
    plain = DDP(Net(), bucket_cap_mb=0.002)
    opt = overlap_sgd.overlap(plain, torch.optim.SGD(plain.parameters(), lr=0.1))
    try:
        opt.clip_grad_norm_(1.0)
    except ValueError as exc:
        out["unconfigured"] = str(exc)

    torch.manual_seed(0)
    model = DDP(Net(), bucket_cap_mb=0.002)
    opt = overlap_sgd.overlap(model, ADAMW(model.parameters()), clip_grad_norm=ALWAYS)
    x, y = batch(0, rank)
    F.mse_loss(model(x), y).backward()
    for bad in ({"norm_type": 1.0}, {"error_if_nonfinite": True}, {"max_norm": -1.0}):
        try:
            opt.clip_grad_norm_(**bad)
        except ValueError as exc:
            out.setdefault("refused", []).append(str(exc))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        norm = opt.clip_grad_norm_(ALWAYS)
        opt.step()
    out["norm"] = float(norm)
    out["grad_norm"] = float(opt.grad_norm)
    out["clipped"] = opt.clipped
    out["after"] = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
    out["warnings"] = [str(w.message) for w in caught]

    # error_if_nonfinite: nothing moves, step() raises torch's error.
    torch.manual_seed(0)
    model = DDP(Net(), bucket_cap_mb=0.002)
    opt = overlap_sgd.overlap(
        model, ADAMW(model.parameters()),
        clip_grad_norm=overlap_sgd.ClipGradNorm(1.0, error_if_nonfinite=True),
    )
    before = [p.detach().clone() for p in model.parameters()]
    (F.mse_loss(model(x), y) * float("inf")).backward()
    try:
        opt.step()
    except RuntimeError as exc:
        out["nonfinite"] = str(exc)
    out["untouched"] = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))

    # check_finite with clipping: a non-finite gradient skips the whole step (it runs deferred).
    torch.manual_seed(0)
    model = DDP(Net(), bucket_cap_mb=0.002)
    opt = overlap_sgd.overlap(model, ADAMW(model.parameters()), check_finite=True,
                              clip_grad_norm=overlap_sgd.ClipGradNorm(1.0, policy="speculate"))
    F.mse_loss(model(x), y).backward()  # a first step: DDP then cuts its buckets small
    opt.step()
    opt.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    # One parameter's gradient turns NaN: its bucket is bad, the others are fine, and still
    # no parameter may move (each bucket's update waited for the norm).
    handle = model.module.inp.bias.register_hook(lambda g: g * float("nan"))
    try:
        F.mse_loss(model(x), y).backward()
        opt.step()
    except overlap_sgd.NonFiniteGradientError as exc:
        out["check_finite"] = str(exc)
        opt.zero_grad()  # a loop skips the step and drops its gradients
    handle.remove()
    out["check_finite_untouched"] = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    F.mse_loss(model(x), y).backward()  # and training goes on
    opt.step()
    out["check_finite_moved"] = not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))

    # An optimizer without a correction is warned about once, then runs deferred.
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            model = DDP(Net(), bucket_cap_mb=0.002)
            overlap_sgd.overlap(model, ADAGRAD(model.parameters()), clip_grad_norm=1.0)
    out["deferred_warnings"] = [str(w.message) for w in caught if "no clipping correction" in str(w.message)]

    # Sparse gradients have no norm to take: refused before anything is set up.
    sparse = DDP(torch.nn.Sequential(torch.nn.Embedding(10, 4, sparse=True)))
    try:
        overlap_sgd.overlap(sparse, torch.optim.SGD(sparse.parameters(), lr=0.1), clip_grad_norm=1.0)
    except ValueError as exc:
        out["sparse"] = str(exc)
    out["sparse_untouched"] = getattr(sparse, "_overlap_sgd_state", None) is None
    return out


def test_clip_grad_norm_method_norm_and_errors() -> None:
    for out in run_distributed(_api, 2, timeout=120):
        assert "overlap(model, optimizer, clip_grad_norm=max_norm)" in out["unconfigured"]
        assert len(out["refused"]) == 3
        assert "norm_type 1.0" in out["refused"][0] and "max_norm must be positive" in out["refused"][2]
        assert out["norm"] == out["grad_norm"] > ALWAYS and out["clipped"]
        assert out["after"] == pytest.approx(ALWAYS, rel=1e-4)  # .grad holds the clipped gradients
        assert not [w for w in out["warnings"] if "modified in place" in w], out["warnings"]
        assert "non-finite" in out["nonfinite"] and out["untouched"]
        assert "non-finite gradient" in out["check_finite"] and "'inp.bias'" in out["check_finite"]
        assert out["check_finite_untouched"]
        assert out["check_finite_moved"]
        assert len(out["deferred_warnings"]) == 1 and "Adagrad has no clipping correction" in out["deferred_warnings"][0]
        assert "sparse=True" in out["sparse"] and "'0.weight'" in out["sparse"] and out["sparse_untouched"]


def test_clip_options_are_validated() -> None:
    with pytest.raises(ValueError, match="clip_grad_norm must be positive and finite, got -1"):
        overlap_sgd.ClipGradNorm(-1)
    with pytest.raises(TypeError, match="clip_grad_norm must be a number or None, got str"):
        overlap_sgd.ClipGradNorm("1")
    with pytest.raises(ValueError, match=r"policy must be one of .*'sometimes'"):
        overlap_sgd.ClipGradNorm(1.0, policy="sometimes")
    with pytest.raises(ValueError, match="norm_type must be positive, got 0"):
        overlap_sgd.ClipGradNorm(1.0, norm_type=0)
    assert overlap_sgd.ClipGradNorm(1.0, norm_type="inf").norm_type == float("inf")
