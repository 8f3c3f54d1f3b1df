"""FSDP2 (``fully_shard``) with ``overlap()``: parity with the post-backward ``torch.optim`` step,
distributed checkpoints across world sizes, and what is refused.

Every parity scenario trains two copies of one model, sharded the same way, on the same data:
the reference steps after backward, the other is overlapped (each FSDP group updated as its
reduce-scatter lands). Both sides pin the kernel (``foreach=True`` or ``fused=True``: torch's
default for DTensors on CPU is the single-tensor loop), so the updates are the same kernel on
the same sharded gradients and the shards must agree bit for bit; the parameters must also have
moved and stayed finite.

FSDP2 runs on CPU with gloo on torch 2.9.1 and 2.13 alike (gloo has reduce_scatter and
all_gather into tensors, and a CPU device mesh needs nothing more), so none of this is skipped.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

import overlap_sgd
from overlap_sgd.functional import FunctionalAdam, FunctionalSGD
from overlap_sgd.hooks.norm_clip import AUTO_WINDOW, ClipGradNorm
from tests.distributed import run_distributed
from tests.models import Lion

TIMEOUT = 120


class Block(nn.Module):
    def __init__(self, width: int, unused: bool = False):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.extra = nn.Linear(width, width) if unused else None  # never called

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(h))


class Model(nn.Module):
    """Odd sizes, so that three ranks shard unevenly (a rank may hold an empty shard)."""

    def __init__(self, width: int = 13, depth: int = 3, frozen: bool = False, unused: bool = False):
        super().__init__()
        self.inp = nn.Linear(6, width)
        self.blocks = nn.ModuleList(Block(width, unused and i == 1) for i in range(depth))
        self.head = nn.Linear(width, 5)
        if frozen:
            self.blocks[0].fc.bias.requires_grad_(False)
            self.inp.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for b in self.blocks:
            h = b(h)
        return self.head(h)


@dataclass
class Scenario:
    name: str
    opt: str = "sgd"
    kw: dict[str, Any] = field(default_factory=dict)
    world: int = 2
    steps: int = 5
    accumulate: int = 1
    reshard_after_forward: bool = True
    mixed: bool = False
    frozen: bool = False
    unused: bool = False
    clip: float | None = None
    #: The clipping policy and norm (with ``clip``).
    policy: str = "auto"
    norm_type: float = 2.0
    #: (rtol, atol, why) where clipped steps were corrected; ``None``: bit for bit.
    rounding: tuple[float, float, str] | None = None
    groups: bool = False
    two_optimizers: bool = False
    scheduler: bool = False
    executor: str = "auto"
    zero: str = "none"


OPTIMIZERS = {
    "sgd": lambda params, **kw: torch.optim.SGD(params, **{"lr": 0.1, "momentum": 0.9, "foreach": True, **kw}),
    "adam": lambda params, **kw: torch.optim.Adam(params, **{"lr": 0.01, "foreach": True, **kw}),
    "adamw": lambda params, **kw: torch.optim.AdamW(params, **{"lr": 0.01, "weight_decay": 0.1, "foreach": True, **kw}),
    "adagrad": lambda params, **kw: torch.optim.Adagrad(params, **{"lr": 0.1, "foreach": True, **kw}),
    "rmsprop": lambda params, **kw: torch.optim.RMSprop(params, **{"lr": 0.01, "momentum": 0.5, "foreach": True, **kw}),
    "lion": lambda params, **kw: Lion(params, **{"lr": 0.01, **kw}),
}

SCENARIOS = [
    Scenario("sgd-momentum"),
    Scenario("sgd-nesterov-3ranks", kw=dict(nesterov=True, weight_decay=0.01), world=3),
    Scenario("adam-foreach"),
    Scenario("adam-fused", opt="adam", kw=dict(foreach=None, fused=True)),
    Scenario("adamw-3ranks", opt="adamw", world=3),
    Scenario("adagrad", opt="adagrad"),
    Scenario("rmsprop", opt="rmsprop"),
    Scenario("generic-path", opt="lion"),
    Scenario("accumulation", opt="adamw", accumulate=3),
    Scenario("accumulation-3ranks", opt="sgd", accumulate=2, world=3),
    Scenario("no-reshard-after-forward", opt="adamw", reshard_after_forward=False),
    Scenario("mixed-precision", opt="adamw", mixed=True),
    Scenario("frozen", opt="adam", frozen=True),
    Scenario("unused-parameters", opt="adam", unused=True),
    Scenario("clip", opt="adamw", clip=0.05),
    Scenario("clip-sgd-3ranks", opt="sgd", clip=0.05, world=3),
    Scenario("param-groups-scheduler", opt="adamw", groups=True, scheduler=True),
    Scenario("two-optimizers", opt="sgd", two_optimizers=True),
    Scenario("inline-executor", opt="adam", executor="inline"),
    Scenario("zero-grad-keep-zeros", opt="sgd", zero="zeros", unused=True),
]


def _build(s: Scenario, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = Model(frozen=s.frozen, unused=s.unused)
    kw: dict[str, Any] = dict(reshard_after_forward=s.reshard_after_forward)
    if s.mixed:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for b in model.blocks:
        fully_shard(b, **kw)
    fully_shard(model, **kw)
    model.sharded = dict(model.named_parameters())  # without resharding, forward swaps in unsharded ones
    return model


def _optimizers(s: Scenario, model: nn.Module) -> list[torch.optim.Optimizer]:
    make = functools.partial(OPTIMIZERS[s.opt], **s.kw)
    params = [p for p in model.parameters() if p.requires_grad]
    if s.two_optimizers:
        head = [p for n, p in model.named_parameters() if n.startswith("head")]
        rest = [p for n, p in model.named_parameters() if not n.startswith("head") and p.requires_grad]
        return [make(rest), make(head, lr=0.05)]
    if s.groups:
        decay = [p for p in params if p.dim() > 1]
        no_decay = [p for p in params if p.dim() <= 1]
        return [make([{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "lr": 0.02}])]
    return [make(params)]


def _train(
    s: Scenario, model: nn.Module, opts: list[Any], rank: int, reference: bool = False,
    log: dict[str, list[Any]] | None = None,
) -> list[float]:
    """Train ``s.steps`` steps; the ``reference`` clips after backward as a post-backward loop does.

    ``log`` collects per step: the total norm and whether clipping fired (with ``s.clip``),
    the norm of this rank's ``.grad`` shards after ``step()``, and for the overlapped side
    whether the update ran inside backward."""
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in opts] if s.scheduler else []
    log = {} if log is None else log
    losses = []
    for step in range(s.steps):
        for micro in range(s.accumulate):
            last = micro == s.accumulate - 1
            model.set_requires_gradient_sync(last)
            g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
            x = torch.randn(4, 6, generator=g)
            y = torch.randn(4, 5, generator=g)
            loss = F.mse_loss(model(x).float(), y) * 10  # bf16 outputs under mixed precision
            before = _shards(model) if last and not reference else None
            loss.backward()
            losses.append(loss.item())
            if before is not None:
                inside = _updated_in_backward(model, before)
                assert inside or s.clip is not None, "not updated inside backward"
                log.setdefault("inside", []).append(inside)
        if reference and s.clip is not None:
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip, norm_type=s.norm_type)
            total = total.full_tensor() if hasattr(total, "full_tensor") else total
            log.setdefault("norms", []).append(total.item())
            log.setdefault("fired", []).append(torch.clamp(s.clip / (total + 1e-6), max=1.0).item() < 1.0)
        for o in opts:
            o.step()
        if not reference and s.clip is not None:
            log.setdefault("norms", []).append(opts[0].grad_norm.item())
            log.setdefault("fired", []).append(opts[0].clipped)
        grads = [p.grad.to_local() for p in model.parameters() if p.grad is not None]
        log.setdefault("grads", []).append(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads])).item() if grads else 0.0)
        for sc in scheds:
            sc.step()
        for o in opts:
            o.zero_grad(set_to_none=s.zero == "none")
    return losses


def _updated_in_backward(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    """Whether the overlap updated every group inside backward; ``False`` if it updated none
    before ``step()`` (a deferred step); anything in between fails."""
    launched = model._overlap_sgd_state.wait_updates()
    after = _shards(model)
    changed = {n: not torch.equal(after[n], before[n]) for n in after if after[n].numel()}
    if not any(changed.values()):
        return False
    assert launched == len(model._overlap_sgd_state._sizes), (launched, model._overlap_sgd_state._sizes)
    trainable = {n for n, p in model.sharded.items() if p.requires_grad and "extra" not in n}
    stale = [n for n in trainable if n in changed and not changed[n]]
    assert not stale, f"not updated inside backward: {stale}"
    return True


def _shards(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.to_local().detach().clone() for n, p in model.sharded.items()}


def _state(opts: list[Any]) -> list[dict[str, Any]]:
    out = []
    for o in opts:
        sd = o.state_dict()
        out.append({
            k: {n: (v.to_local() if hasattr(v, "to_local") else v).clone() if torch.is_tensor(v) else v
                for n, v in st.items()}
            for k, st in sd["state"].items()
        })
    return out


def parity_body(rank: int, world: int, s: Scenario) -> dict[str, Any]:
    torch.manual_seed(0)
    ref = _build(s)
    ref_opts = _optimizers(s, ref)
    model = _build(s)
    initial = _shards(model)
    given = _optimizers(s, model)
    clip = None if s.clip is None else ClipGradNorm(s.clip, norm_type=s.norm_type, policy=s.policy)
    opts = overlap_sgd.overlap(model, given[0] if len(given) == 1 else given, clip_grad_norm=clip,
                               executor=s.executor)
    opts = opts if isinstance(opts, list) else [opts]
    ref_log: dict[str, list[Any]] = {}
    log: dict[str, list[Any]] = {}
    ref_losses = _train(s, ref, ref_opts, rank, reference=True, log=ref_log)
    losses = _train(s, model, opts, rank, log=log)
    got, want = _shards(model), _shards(ref)
    clipper = model._overlap_sgd_state.clipper
    corrected = 0 if clipper is None else clipper.corrected_steps
    # Bit for bit unless a clipped step was corrected; then within the scenario's rounding.
    rtol, atol, _ = s.rounding if corrected and s.rounding else (0.0, 0.0, "")

    def same(a: Any, b: Any) -> bool:
        if not torch.is_tensor(a):
            return a == b
        return torch.equal(a, b) if rtol == atol == 0.0 else torch.allclose(a, b, rtol=rtol, atol=atol)

    mismatched = [n for n in want if not same(got[n], want[n])]
    state_equal = all(
        all(same(a[k][n], b[k][n]) for k in a for n in a[k]) and a.keys() == b.keys()
        for a, b in zip(_state(opts), _state(ref_opts))
    )
    # The losses follow the parameters: equal, or as close as the rounding lets them be.
    losses_equal = losses == ref_losses if rtol == atol == 0.0 else all(
        math.isclose(x, y, rel_tol=10 * rtol, abs_tol=10 * atol) for x, y in zip(losses, ref_losses))
    moved = {n: not torch.equal(got[n], initial[n]) for n in got if got[n].numel()}
    moved_any = {n: bool(v) for n, v in _gather_moved(moved, model).items()}
    return dict(
        name=s.name, log=log, ref_log=ref_log, corrected=corrected, rtol=rtol,
        deferred=0 if clipper is None else clipper.deferred_steps,
        mismatched=mismatched, state_equal=state_equal, losses_equal=losses_equal,
        moved=moved_any, finite=all(bool(torch.isfinite(t).all()) for t in got.values()),
        dtypes={type(v).__name__ for sd in (o.state_dict() for o in opts) for st in sd["state"].values()
                for v in st.values()},
    )


def _gather_moved(moved: dict[str, bool], model: nn.Module) -> dict[str, bool]:
    """Whether each parameter moved on any rank (a rank's shard may be empty)."""
    names = [n for n, _ in model.named_parameters()]
    flags = torch.tensor([float(moved.get(n, False)) for n in names])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return dict(zip(names, flags.bool().tolist()))


@pytest.mark.parametrize("s", SCENARIOS, ids=lambda s: s.name)
def test_parity(s: Scenario) -> None:
    for r in run_distributed(parity_body, s.world, s, timeout=TIMEOUT):
        assert r["mismatched"] == [], f"{s.name}: shards differ from the post-backward step: {r['mismatched']}"
        assert r["state_equal"], f"{s.name}: optimizer state differs"
        assert r["losses_equal"], f"{s.name}: losses differ"
        assert r["finite"]
        for name, moved in r["moved"].items():
            frozen = s.frozen and (name.startswith("inp") or name == "blocks.0.fc.bias")
            unused = s.unused and "extra" in name
            assert moved == (not frozen and not unused), f"{s.name}: {name} moved={moved}"
        assert "DTensor" in r["dtypes"], f"{s.name}: state is not kept as DTensors: {r['dtypes']}"



# -- global-norm clipping ----------------------------------------------------------------------
#
# The reference: FSDP2, torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm) on the
# DTensor gradients after backward, then torch.optim. Three max_norm settings: never firing
# (speculated updates are never corrected: bit for bit, norms included), always firing, and
# firing on some steps (the model's total norm over these steps ranges about 2.7 to 7.6).

NEVER, ALWAYS = 1e3, 0.5
SOMETIMES = {2: 6.0, 3: 4.5}
SOMETIMES_INF = {2: 3.0, 3: 2.25}
CLIP_STEPS = 10
#: Where a clipped step was corrected, why the result is not bit-exact.
CORRECTED_SGD = (1e-5, 1e-6, "the correction turns the unclipped update into the clipped one with "
                 "a few more roundings (the difference of two updates), where the reference ran the "
                 "clipped update directly: 1e-5 relative")
CORRECTED_ADAM = (1e-4, 5e-5, CORRECTED_SGD[2] + "; Adam's m / sqrt(v) amplifies such differences where "
                  "a gradient element is near zero: 5e-5 absolute at lr 0.01 (0.5% of a step)")
CLIPPED_OPTIMIZERS = {
    "sgd-nesterov-decay": ("sgd", dict(nesterov=True, weight_decay=0.01, lr=0.02), CORRECTED_SGD),
    "adam": ("adam", {}, CORRECTED_ADAM),
    "adamw": ("adamw", {}, CORRECTED_ADAM),
}


def _clip_table(world: int, policy: str) -> list[Scenario]:
    table = [
        Scenario(f"{name}-{when}-{policy}", opt=opt, kw=kw, world=world, steps=CLIP_STEPS, clip=max_norm,
                 policy=policy, rounding=rounding)
        for name, (opt, kw, rounding) in CLIPPED_OPTIMIZERS.items()
        for when, max_norm in (("never", NEVER), ("always", ALWAYS), ("sometimes", SOMETIMES[world]))
    ]
    # The inf-norm: the largest element over every rank's shards (about 0.9 to 3.6 here).
    table.append(Scenario(f"adamw-inf-norm-{policy}", opt="adamw", world=world, steps=CLIP_STEPS,
                          clip=SOMETIMES_INF[world],
                          norm_type=math.inf, policy=policy, rounding=CORRECTED_ADAM))
    return table


def clip_body(rank: int, world: int, table: list[Scenario]) -> list[dict[str, Any]]:
    return [parity_body(rank, world, s) for s in table]


def _speculates(policy: str, fired: list[bool], cost: float) -> bool:
    """Whether a step after steps that clipped as in ``fired`` speculates (the policy's rule)."""
    if policy != "auto":
        return policy == "speculate"
    recent = fired[-AUTO_WINDOW:]
    return bool(recent) and sum(recent) * cost < len(recent)


@pytest.mark.parametrize("policy", ["auto", "speculate", "defer"])
@pytest.mark.parametrize("world", [2, 3])
def test_clipping_equals_clip_grad_norm_then_step(world: int, policy: str) -> None:
    table = _clip_table(world, policy)
    for per_rank in run_distributed(clip_body, world, table, timeout=4 * TIMEOUT):
        for s, r in zip(table, per_rank):
            _check_clip(s, r)


def _check_clip(s: Scenario, r: dict[str, Any]) -> None:
    log, ref = r["log"], r["ref_log"]
    assert r["finite"] and all(r["moved"].values()), f"{s.name}: {r['moved']}"
    # Clipping fired on exactly the reference's steps.
    assert log["fired"] == ref["fired"], (s.name, log["fired"], ref["fired"])
    fired = sum(ref["fired"])
    assert fired == (0 if s.clip == NEVER else s.steps if s.clip == ALWAYS else fired), s.name
    assert s.clip in (NEVER, ALWAYS) or 0 < fired < s.steps, (s.name, ref["fired"])
    # Updates ran inside backward on exactly the steps the policy speculated.
    # (Only optimizers with a correction rule speculate.)
    rule = {"sgd": FunctionalSGD, "adam": FunctionalAdam, "adamw": FunctionalAdam}.get(s.opt)
    want = [rule is not None and _speculates(s.policy, ref["fired"][:k], rule.clip_correction_cost)
            for k in range(s.steps)]
    assert log["inside"] == want, (s.name, log["inside"], want)
    assert r["deferred"] == s.steps - sum(want), s.name
    assert r["corrected"] == sum(f and w for f, w in zip(ref["fired"], want)), s.name
    # Parameters, state, losses: bit for bit where nothing was corrected.
    assert r["rtol"] == (0.0 if r["corrected"] == 0 else s.rounding[0]), s.name
    assert r["mismatched"] == [], f"{s.name}: {r['mismatched']}"
    assert r["state_equal"] and r["losses_equal"], s.name
    # The total norm, and .grad clipped after step() as clip_grad_norm_ leaves it.
    for key in ("norms", "grads"):
        if r["corrected"] == 0:
            assert log[key] == ref[key], (s.name, key, log[key], ref[key])
        else:
            assert log[key] == pytest.approx(ref[key], rel=10 * s.rounding[0]), (s.name, key)


@pytest.mark.parametrize("opt", ["adagrad", "rmsprop", "lion"])
def test_optimizers_without_a_correction_clip_deferred(opt: str) -> None:
    # No correction rule (Lion takes the generic path): every step waits for the norm, then
    # the same kernel runs on the same clipped gradients, bit for bit.
    s = Scenario(f"{opt}-always-speculate", opt=opt, steps=4, clip=ALWAYS, policy="speculate")
    for r in run_distributed(parity_body, 2, s, timeout=TIMEOUT):
        _check_clip(s, r)
        assert r["deferred"] == s.steps and r["corrected"] == 0


def _broken_clip_body(rank: int, world: int, s: Scenario, breakage: str) -> dict[str, Any]:
    from types import SimpleNamespace

    from overlap_sgd.hooks import norm_clip

    if breakage == "adam-correction-dropped":
        FunctionalAdam.correct_clip = lambda self, *args, **kw: None
    elif breakage == "local-norm-only":  # this rank's shards only, never reduced over the ranks
        norm_clip.dist = SimpleNamespace(all_reduce=lambda *args, **kw: None, ReduceOp=dist.ReduceOp)
    elif breakage == "sgd-forgets-new-momentum-buffers":
        right = FunctionalSGD.correct_clip
        FunctionalSGD.correct_clip = lambda self, gi, p, g, c, before=None, keys=None: right(self, gi, p, g, c, None)
    return parity_body(rank, world, s)


@pytest.mark.parametrize("breakage, opt, kw, clip", [
    ("adam-correction-dropped", "adamw", {}, SOMETIMES[2]),
    ("local-norm-only", "sgd", {}, ALWAYS),
    # A buffer created by the step takes the whole gradient, a running one (1 - dampening) of it.
    ("sgd-forgets-new-momentum-buffers", "sgd", dict(dampening=0.3), ALWAYS),
])
def test_a_wrong_correction_or_norm_fails_the_parity(breakage: str, opt: str, kw: dict, clip: float) -> None:
    s = Scenario(f"broken-{breakage}", opt=opt, kw=kw, steps=CLIP_STEPS, clip=clip, policy="speculate",
                 rounding=CORRECTED_ADAM if opt == "adamw" else CORRECTED_SGD)
    for r in run_distributed(_broken_clip_body, 2, s, breakage, timeout=TIMEOUT):
        with pytest.raises(AssertionError):
            _check_clip(s, r)


def clip_api_body(rank: int, world: int) -> dict[str, Any]:
    import warnings

    out: dict[str, Any] = {}
    x, y = _data(0, rank)
    # clip_grad_norm_() in place of torch's, grad_norm, clipped, .grad left clipped.
    model = _build(Scenario("api"))
    opt = overlap_sgd.overlap(model, OPTIMIZERS["adamw"](model.parameters()),
                              clip_grad_norm=ClipGradNorm(ALWAYS, policy="speculate"))
    F.mse_loss(model(x), y).backward()
    norm = opt.clip_grad_norm_(ALWAYS)
    opt.step()
    out.update(norm=norm.item(), grad_norm=opt.grad_norm.item(), clipped=opt.clipped,
               after=torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).full_tensor().item())

    # error_if_nonfinite: torch's error from step(), no parameter moved (the step deferred).
    model = _build(Scenario("api"))
    opt = overlap_sgd.overlap(model, OPTIMIZERS["adamw"](model.parameters()),
                              clip_grad_norm=ClipGradNorm(1.0, error_if_nonfinite=True, policy="speculate"))
    before = _shards(model)
    (F.mse_loss(model(x), y) * float("inf")).backward()
    try:
        opt.step()
    except RuntimeError as exc:
        out["nonfinite"] = str(exc)
    out["nonfinite_untouched"] = all(torch.equal(a, b) for a, b in zip(before.values(), _shards(model).values()))

    # check_finite: inf in one rank's shard; with clipping no parameter moves on any rank.
    model = _build(Scenario("api"))
    opt = overlap_sgd.overlap(model, OPTIMIZERS["sgd"](model.parameters()), check_finite=True,
                              clip_grad_norm=ClipGradNorm(1.0, policy="speculate"))
    F.mse_loss(model(x), y).backward()
    if rank == 0:
        model.sharded["blocks.1.fc.weight"].grad.to_local().view(-1)[0] = float("inf")
    before = _shards(model)
    try:
        opt.step()
    except overlap_sgd.hooks.NonFiniteGradientError as exc:
        out["check_finite"] = exc.names
    out["check_finite_untouched"] = all(torch.equal(a, b) for a, b in zip(before.values(), _shards(model).values()))
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()  # and training goes on
    opt.step()
    out["check_finite_moved"] = not all(torch.equal(a, b) for a, b in zip(before.values(), _shards(model).values()))

    # An optimizer without a correction is warned about once.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            model = _build(Scenario("api"))
            overlap_sgd.overlap(model, OPTIMIZERS["adagrad"](model.parameters()), clip_grad_norm=1.0)
    out["warnings"] = [str(w.message) for w in caught if "no clipping correction" in str(w.message)]
    return out


def test_clip_grad_norm_method_and_non_finite_gradients() -> None:
    for r in run_distributed(clip_api_body, 2, timeout=TIMEOUT):
        assert r["norm"] == r["grad_norm"] > ALWAYS and r["clipped"]
        assert r["after"] == pytest.approx(ALWAYS, rel=1e-4)  # .grad holds the clipped gradients
        assert "non-finite" in r["nonfinite"] and r["nonfinite_untouched"]
        assert r["check_finite"] and "blocks.1.fc.weight" in r["check_finite"], r["check_finite"]
        assert r["check_finite_untouched"] and r["check_finite_moved"]
        assert len(r["warnings"]) == 1 and "Adagrad has no clipping correction" in r["warnings"][0]



class SlowLion(Lion):
    """Takes its time, so that an update still runs when backward returns; fails on demand."""

    fail = False

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        import time

        time.sleep(0.05)
        if SlowLion.fail:
            raise ArithmeticError("update failed")
        super().step()


def waits_body(rank: int, world: int) -> dict[str, Any]:
    model = _build(Scenario("slow"))
    opt = overlap_sgd.overlap(model, SlowLion(model.parameters(), lr=0.01))
    x = torch.randn(4, 6)
    before = _shards(model)
    model(x).sum().backward()
    opt.step()  # must wait for every group's update
    after = _shards(model)
    stale = [n for n in after if after[n].numel() and torch.equal(after[n], before[n])]
    opt.zero_grad()
    SlowLion.fail = True
    model(x).sum().backward()
    try:
        opt.step()
        raised = None
    except ArithmeticError as exc:
        raised = str(exc)
    SlowLion.fail = False
    opt.zero_grad()
    model(x).sum().backward()  # the failed step does not block the next one
    opt.step()
    return dict(stale=stale, raised=raised)


def test_step_waits_for_updates_and_raises_their_errors() -> None:
    for r in run_distributed(waits_body, 2, timeout=TIMEOUT):
        assert r["stale"] == [], f"step() returned before these were updated: {r['stale']}"
        assert r["raised"] == "update failed"


# -- distributed checkpoints ---------------------------------------------------------------------

DCP_STEPS = 3


def _data(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7919 * step + rank)
    return torch.randn(4, 6, generator=g), torch.randn(4, 5, generator=g)


def _full(model: nn.Module, opt: Any) -> dict[str, Any]:
    """Every rank's view of the whole model and optimizer state (plain tensors)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    msd = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in get_model_state_dict(model).items()}
    osd = get_optimizer_state_dict(model, opt)
    state = {
        fqn: {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone() for k, v in st.items()}
        for fqn, st in osd["state"].items()
    }
    return _plain(dict(model=msd, state=state, lr=[g["lr"] for g in osd["param_groups"]]))


def _plain(obj: Any) -> Any:
    """``obj`` with tensors as (dtype, shape, values): tensors do not cross the result queue."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if torch.is_tensor(obj):
        return (str(obj.dtype), tuple(obj.shape), obj.detach().flatten().tolist())
    return obj


def dcp_save_body(rank: int, world: int, path: str) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model = _build(Scenario("dcp"))
    opt = overlap_sgd.overlap(model, OPTIMIZERS["adamw"](model.parameters()))
    for step in range(DCP_STEPS):
        x, y = _data(step, rank)
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=path)
    return _full(model, opt.optimizer)


def dcp_load_body(rank: int, world: int, path: str, inner: bool) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
    )

    out = {}
    for overlapped in (True, False):
        model = _build(Scenario("dcp"), seed=1)  # other weights: the checkpoint must replace them
        opt = OPTIMIZERS["adamw"](model.parameters())
        if overlapped:
            opt = overlap_sgd.overlap(model, opt)
        target = opt.optimizer if overlapped and inner else opt
        sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, target)}
        dcp.load(sd, checkpoint_id=path)
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, target, sd["optim"])
        loaded = _full(model, target)
        x, y = _data(100, rank)
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        out["overlap" if overlapped else "reference"] = dict(loaded=loaded, after=_full(model, target))
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("world,inner", [(3, False), (1, True)], ids=["3-ranks", "1-rank-inner"])
def test_dcp_saved_on_two_ranks_resumes_on(tmp_path: Any, world: int, inner: bool) -> None:
    path = str(tmp_path / "ckpt")
    saved = run_distributed(dcp_save_body, 2, path, timeout=TIMEOUT)[0]
    assert saved["state"], "nothing saved"
    for r in run_distributed(dcp_load_body, world, path, inner, timeout=TIMEOUT):
        for side in ("overlap", "reference"):
            assert _same(r[side]["loaded"], saved), f"{side}: the loaded state differs from the saved one"
        after, ref = r["overlap"]["after"], r["reference"]["after"]
        assert _same(after, ref), "the step after resuming differs from the post-backward step"
        assert not _same(after["model"], saved["model"]), "the step after resuming did nothing"


def ckpt_save_body(rank: int, world: int, run_dir: str) -> dict[str, Any]:
    from overlap_sgd.checkpoint import checkpoint_path, checkpoint_state, save_checkpoint

    model = _build(Scenario("ckpt"))
    opt = overlap_sgd.overlap(model, OPTIMIZERS["adamw"](model.parameters()))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for step in range(DCP_STEPS):
        x, y = _data(step, rank)
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    save_checkpoint(checkpoint_path(run_dir, DCP_STEPS), checkpoint_state(model, opt, sched, step=DCP_STEPS))
    return _full(model, opt.optimizer)


def ckpt_load_body(rank: int, world: int, run_dir: str) -> dict[str, Any]:
    from overlap_sgd.checkpoint import latest_checkpoint, load_checkpoint

    out: dict[str, Any] = {}
    for overlapped in (True, False):
        model = _build(Scenario("ckpt"), seed=1)  # other weights: the checkpoint must replace them
        opt = OPTIMIZERS["adamw"](model.parameters())
        if overlapped:
            opt = overlap_sgd.overlap(model, opt)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        path = latest_checkpoint(run_dir)
        step = load_checkpoint(path, model, opt, sched)["step"]
        target = opt.optimizer if overlapped else opt
        loaded = _full(model, target)
        x, y = _data(100, rank)
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        out["overlap" if overlapped else "reference"] = dict(
            loaded=loaded, after=_full(model, target), step=step, lr=sched.get_last_lr(), path=path.name)
    return out


@pytest.mark.parametrize("world", [3, 1], ids=["3-ranks", "1-rank"])
def test_checkpoint_module_saved_on_two_ranks_resumes_on(tmp_path: Any, world: int) -> None:
    run_dir = str(tmp_path / "run")
    saved = run_distributed(ckpt_save_body, 2, run_dir, timeout=TIMEOUT)[0]
    for r in run_distributed(ckpt_load_body, world, run_dir, timeout=TIMEOUT):
        for side in ("overlap", "reference"):
            got = r[side]
            assert got["path"] == f"ckpt-{DCP_STEPS:08d}.dcp" and got["step"] == DCP_STEPS, got["path"]
            assert _same(got["loaded"], saved), f"{side}: the loaded state differs from the saved one"
            assert got["lr"] == [0.01 * 0.5 ** (DCP_STEPS // 2)], got["lr"]  # the scheduler resumed too
        after, ref = r["overlap"]["after"], r["reference"]["after"]
        assert _same(after, ref), "the step after resuming differs from the post-backward step"
        assert not _same(after["model"], saved["model"]), "the step after resuming did nothing"


def ckpt_mismatch_body(rank: int, world: int, run_dir: str) -> str:
    from overlap_sgd.checkpoint import latest_checkpoint, load_checkpoint

    torch.manual_seed(0)
    plain = Model()  # not sharded: the checkpoint holds FSDP shards
    opt = OPTIMIZERS["adamw"](plain.parameters())
    before = [p.detach().clone() for p in plain.parameters()]
    try:
        load_checkpoint(latest_checkpoint(run_dir), plain, opt)
    except ValueError as exc:
        assert all(torch.equal(a, b) for a, b in zip(before, plain.parameters())), "touched before refusing"
        return str(exc)
    return ""


def test_checkpoint_module_refuses_an_unsharded_model_for_fsdp_shards(tmp_path: Any) -> None:
    run_dir = str(tmp_path / "run")
    run_distributed(ckpt_save_body, 2, run_dir, timeout=TIMEOUT)
    (message,) = run_distributed(ckpt_mismatch_body, 1, run_dir, timeout=TIMEOUT)
    assert "written from an FSDP2 model" in message, message


# -- what is refused ---------------------------------------------------------------------------


def _refusal(make: Any) -> str:
    """The message of the ValueError that ``make()`` raises, with no hook left behind."""
    model, call = make()
    try:
        call()
    except ValueError as exc:
        hooks = [n for n, p in model.named_parameters() if getattr(p, "_post_accumulate_grad_hooks", None)]
        assert not hooks, f"hooks left on {hooks} by a refused overlap()"
        assert getattr(model, "_overlap_sgd_state", None) is None
        return str(exc)
    return "no error"


def refusals_body(rank: int, world: int) -> dict[str, str]:
    from torch.distributed.device_mesh import init_device_mesh

    def plain(**kw: Any) -> Any:
        model = _build(Scenario("refused"))
        return model, lambda: overlap_sgd.overlap(model, OPTIMIZERS["adamw"](model.parameters()), **kw)

    def hsdp() -> Any:
        torch.manual_seed(0)
        model = Model()
        mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
        fully_shard(model, mesh=mesh)
        return model, lambda: overlap_sgd.overlap(model, torch.optim.AdamW(model.parameters()))

    def offload() -> Any:
        torch.manual_seed(0)
        model = Model()
        fully_shard(model, offload_policy=CPUOffloadPolicy(pin_memory=False))
        return model, lambda: overlap_sgd.overlap(model, torch.optim.AdamW(model.parameters()))

    def optimizer_before_sharding() -> Any:
        torch.manual_seed(0)
        model = Model()
        opt = torch.optim.AdamW(model.parameters())
        fully_shard(model)
        return model, lambda: overlap_sgd.overlap(model, opt)

    def whole_tensor_optimizer() -> Any:
        model = _build(Scenario("refused"))
        return model, lambda: overlap_sgd.overlap(model, torch.optim.Adafactor(model.parameters()))

    cases = {
        "hsdp": hsdp,
        "offload": offload,
        "optimizer-before-sharding": optimizer_before_sharding,
        "adafactor": whole_tensor_optimizer,
        "shard": lambda: plain(shard=True),
        "comm_hook": lambda: plain(comm_hook=lambda state, bucket: None),
        "slice_mb": lambda: plain(slice_mb=4),
        "clip_grad_value": lambda: plain(clip_grad_value=1.0),
        "clip_grad_norm_per_param": lambda: plain(clip_grad_norm_per_param=1.0),
        "check_consistency_every": lambda: plain(check_consistency_every=10),
    }
    out = {name: _refusal(make) for name, make in cases.items()}

    model = _build(Scenario("twice"))  # a second synchronising backward without step()
    opt = overlap_sgd.overlap(model, OPTIMIZERS["sgd"](model.parameters()))
    model(torch.randn(2, 6)).sum().backward()
    try:
        model(torch.randn(2, 6)).sum().backward()
        out["backward-twice"] = "no error"
    except RuntimeError as exc:
        out["backward-twice"] = str(exc)
    del opt
    return out


REFUSED = {
    "hsdp": "1-D mesh",
    "offload": "CPUOffloadPolicy",
    "optimizer-before-sharding": "after fully_shard",
    "adafactor": "not element-wise",
    "shard": "sharded already",
    "comm_hook": "reduce-scatters by itself",
    "slice_mb": "fully_shard",
    "clip_grad_value": "clip_grad_norm=max_norm",
    "clip_grad_norm_per_param": "clip_grad_norm=max_norm",
    "check_consistency_every": "different shards",
    "backward-twice": "set_requires_gradient_sync(False)",
}


def test_refused_before_anything_is_touched() -> None:
    for r in run_distributed(refusals_body, 2, timeout=TIMEOUT):
        for name, needle in REFUSED.items():
            assert needle in r[name], f"{name}: {r[name]!r}"


def finite_body(rank: int, world: int) -> dict[str, Any]:
    model = _build(Scenario("finite"))
    opt = overlap_sgd.overlap(model, OPTIMIZERS["sgd"](model.parameters()), check_finite=True)
    model(torch.randn(4, 6)).sum().backward()
    if rank == 0:  # inf in one rank's shard only: every rank must leave the group alone
        model.sharded["head.weight"].grad.to_local().view(-1)[0] = float("inf")
    before = _shards(model)
    try:
        opt.step()
        names = None
    except overlap_sgd.hooks.NonFiniteGradientError as exc:
        names = exc.names
    after = _shards(model)
    moved = {n: not torch.equal(after[n], before[n]) for n in after if after[n].numel()}
    opt.zero_grad()
    model(torch.randn(4, 6)).sum().backward()  # the next step runs as usual
    opt.step()
    return dict(names=names, moved=moved)


def test_check_finite_agrees_across_ranks() -> None:
    for r in run_distributed(finite_body, 2, timeout=TIMEOUT):
        root_group = ["inp.weight", "inp.bias", "head.weight", "head.bias"]  # the root's fully_shard
        assert r["names"] == root_group, r["names"]
        for name, moved in r["moved"].items():
            assert moved == (name not in root_group), f"{name} moved={moved}"
