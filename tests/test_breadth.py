"""Breadth: every torch.optim optimizer, a user optimizer, several optimizers per model, bf16
autocast, clipping, and the optimizers that cannot be overlapped.

Table-driven: optimizers-with-options crossed with scenarios, all through one parity body
(:mod:`tests.parity`) that compares against DDP + post-backward ``torch.optim``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel as DDP

import overlap_sgd
from tests.distributed import run_distributed
from tests.models import Lion, Net, batch
from tests.parity import Rounding, Scenario, check_moved, parity_many


O = torch.optim
OPTIMIZERS: dict[str, list[Any]] = {
    "Adagrad": [partial(O.Adagrad, lr=0.05, lr_decay=0.01, weight_decay=0.01,
                        initial_accumulator_value=0.1),
                partial(O.Adagrad, lr=0.05, maximize=True, foreach=True)],
    "Adadelta": [partial(O.Adadelta, lr=1.0, rho=0.8, weight_decay=0.01),
                 partial(O.Adadelta, maximize=True, capturable=False)],
    "Adamax": [partial(O.Adamax, lr=0.01, betas=(0.8, 0.99), weight_decay=0.01),
               partial(O.Adamax, lr=0.01, maximize=True)],
    "RMSprop": [partial(O.RMSprop, lr=0.01, centered=True, momentum=0.9, weight_decay=0.01),
                partial(O.RMSprop, lr=0.01, alpha=0.9, maximize=True)],
    "Rprop": [partial(O.Rprop, lr=0.01, etas=(0.4, 1.3), step_sizes=(1e-5, 1.0)),
              partial(O.Rprop, lr=0.01, maximize=True)],
    "NAdam": [partial(O.NAdam, lr=0.01, decoupled_weight_decay=True, weight_decay=0.05,
                      momentum_decay=0.003),
              partial(O.NAdam, lr=0.01, maximize=True)],
    "RAdam": [partial(O.RAdam, lr=0.01, decoupled_weight_decay=True, weight_decay=0.05),
              partial(O.RAdam, lr=0.01, maximize=True)],
    "ASGD": [partial(O.ASGD, lr=0.05, lambd=1e-3, alpha=0.7, t0=2, weight_decay=0.01),
             partial(O.ASGD, lr=0.05, maximize=True)],
    "Adafactor": [partial(O.Adafactor, lr=0.01, weight_decay=0.01),
                  partial(O.Adafactor, lr=0.01, maximize=True, beta2_decay=-0.6)],
    "Lion (unregistered)": [partial(Lion, lr=1e-3, weight_decay=0.1)],
}


def muon_and_adamw(model: DDP, scenario: Scenario) -> list[torch.optim.Optimizer]:
    """The Muon recipe: Muon for 2-D weight matrices, AdamW for everything else."""
    matrices = [p for n, p in model.module.named_parameters() if p.ndim == 2 and n.startswith("body")]
    rest = [p for n, p in model.module.named_parameters() if not (p.ndim == 2 and n.startswith("body"))]
    # Muon's Newton-Schulz iterations run in bf16 and magnify last-bit differences, so AdamW
    # names its kernel: both sides then run the very same one (no fused-vs-default rounding).
    return [O.Muon(matrices, lr=0.02, momentum=0.9, nesterov=True, weight_decay=0.01),
            O.AdamW(rest, lr=0.01, foreach=True)]


def sgd_and_rmsprop_groups(model: DDP, scenario: Scenario) -> list[torch.optim.Optimizer]:
    weights = [p for p in model.module.parameters() if p.ndim == 2]
    biases = [p for p in model.module.parameters() if p.ndim == 1]
    return [O.SGD([{"params": weights[:2], "lr": 0.02}, {"params": weights[2:]}], lr=0.05, momentum=0.9),
            O.RMSprop(biases, lr=0.01)]


def _run(world_size: int, scenarios: list[Scenario]) -> None:
    for per_rank in run_distributed(parity_many, world_size, scenarios, timeout=240):
        for r in per_rank:
            check_moved(r)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_matches_post_backward(name: str) -> None:
    # Many buckets, every option set, and a state-dict swap with the plain torch optimizer
    # half way, which proves the two state formats interchange both ways.
    _run(2, [Scenario(f"{name}#{i}", make, swap_state_at=3, steps=5)
             for i, make in enumerate(OPTIMIZERS[name])])


SCENARIO_OPTIMIZERS = ["RMSprop", "NAdam", "Adafactor", "Lion (unregistered)"]

# With 2 ranks every row here is bit-identical to post-backward: both sides run the same
# kernel on the same averaged gradients (halving is exact). With 3 ranks DDP divides each
# rank's gradient by 3 before the sum and the overlap divides the sum, which rounds otherwise
# in the last bit; each optimizer carries that difference on by its own amount (measured: the
# atol each needs at rtol 1e-5).
THIRDS = "3 ranks: a/3 + b/3 + c/3 (DDP) and (a + b + c)/3 (the overlap) round differently"
WORLD3 = {
    "RMSprop": Rounding(1e-4, 1e-4, THIRDS + "; centered RMSprop divides by sqrt(square_avg - "
                        "grad_avg**2), a difference of nearly equal running averages, which "
                        "magnifies them to 1.5e-5 in the momentum buffer"),
    "NAdam": Rounding(1e-5, 1e-6, THIRDS + ", carried on unmagnified (6e-10)"),
    "Adafactor": Rounding(1e-5, 1e-6, THIRDS + ", carried on unmagnified (1.2e-9)"),
    "Lion (unregistered)": Rounding(1e-5, 1e-6, THIRDS + ", carried on unmagnified (4e-10): "
                                    "sign() would make it a whole step only for a momentum "
                                    "within rounding of zero, which no element comes near"),
}


@pytest.mark.parametrize("kind", ["world3", "no-sync", "groups-scheduler"])
def test_optimizers_across_scenarios(kind: str) -> None:
    options = {
        "world3": dict(world_size=3),
        "no-sync": dict(accumulate=2),
        "groups-scheduler": dict(groups=True, scheduler=True),
    }[kind]
    scenarios = [Scenario(f"{n}/{kind}", OPTIMIZERS[n][0], steps=4,
                          rounding=WORLD3[n] if kind == "world3" else None, **options)
                 for n in SCENARIO_OPTIMIZERS]
    _run(options.get("world_size", 2), scenarios)


def test_several_optimizers_on_one_model() -> None:
    _run(2, [
        Scenario("muon+adamw", multi=muon_and_adamw, scheduler=True),
        Scenario("sgd-groups+rmsprop", multi=sgd_and_rmsprop_groups, accumulate=2),
    ])


# The kernel is named (fused=True) so that both sides run the same one: left to torch, the
# overlapped update would run the fused kernel and the post-backward step the multi-tensor
# one, which round differently (tests/test_ddp_parity.py covers that case).
SGD_FUSED = partial(O.SGD, lr=0.05, momentum=0.9, fused=True)
ADAMW_FUSED = partial(O.AdamW, lr=0.01, fused=True)


def test_bf16_autocast_matches_post_backward() -> None:
    _run(2, [Scenario("bf16-autocast-adamw", ADAMW_FUSED, autocast=True),
             Scenario("bf16-autocast-sgd", SGD_FUSED, autocast=True)])


def test_per_parameter_clipping_matches_manual_clipping() -> None:
    # The reference clips each p.grad after backward, one parameter at a time, as documented.
    _run(2, [
        Scenario("clip-value", SGD_FUSED, clip_value=0.01),
        Scenario("clip-norm", ADAMW_FUSED, clip_norm=0.05),
        Scenario("clip-both-unused", SGD_FUSED, clip_value=0.02,
                 clip_norm=0.05, net={"branch": True}, branch_rule="mixed",
                 ddp={"find_unused_parameters": True}),
    ])


def _clipping_bites(rank: int, world_size: int) -> list[float]:
    # Clipping must actually change the update, else the test above proves nothing.
    norms = []
    for clip in (None, 0.05):
        torch.manual_seed(0)
        model = DDP(Net(), bucket_cap_mb=0.002)
        opt = overlap_sgd.overlap(model, O.SGD(model.parameters(), lr=0.1), clip_grad_norm=clip)
        x, y = batch(0, rank)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        norms.append(max(float(p.grad.norm()) for p in model.parameters()))
    return norms


def test_clipping_changes_gradients() -> None:
    for unclipped, clipped in run_distributed(_clipping_bites, 2):
        assert unclipped > 0.05 + 1e-3
        assert clipped <= 0.05 + 1e-5


def test_clip_options_are_validated() -> None:
    from overlap_sgd.hooks.clip import GradClip

    with pytest.raises(ValueError, match="clip_grad_norm_per_param must be positive, got -1"):
        GradClip(norm=-1)
    with pytest.raises(TypeError, match="clip_grad_value must be a number"):
        GradClip(value="big")


def test_lbfgs_is_refused_with_the_reason() -> None:
    with pytest.raises(TypeError, match="LBFGS cannot be overlapped: .*closure.*line search"):
        overlap_sgd.resolve(O.LBFGS)


def test_user_can_opt_an_optimizer_out() -> None:
    class NeedsGlobalNorm(Lion):
        pass

    overlap_sgd.register_global(NeedsGlobalNorm, "it scales updates by the global gradient norm")
    try:
        with pytest.raises(TypeError, match="global gradient norm"):
            overlap_sgd.resolve(NeedsGlobalNorm)
        assert overlap_sgd.resolve(Lion).functional.__name__ == "FunctionalLion"
    finally:
        overlap_sgd.unregister(NeedsGlobalNorm)


def test_every_listed_torch_optimizer_is_registered() -> None:
    for cls in (O.Adagrad, O.Adadelta, O.Adamax, O.RMSprop, O.Rprop, O.NAdam, O.RAdam, O.ASGD,
                O.Adafactor, O.Muon, O.SGD, O.Adam, O.AdamW):
        entry = overlap_sgd.lookup(cls)
        assert entry.functional.torch_optimizer is cls


class _SparseNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 8, sparse=True)
        self.lin = torch.nn.Linear(8, 4)

    def forward(self, idx: Tensor) -> Tensor:
        return self.lin(self.emb(idx).mean(1))


def _sparse_adam_body(rank: int, world_size: int) -> list[bool]:
    torch.manual_seed(0)
    net = _SparseNet()
    ref, ovl = DDP(_SparseNet()), DDP(net)
    ref.module.load_state_dict(net.state_dict())

    def opts(m: DDP) -> list[torch.optim.Optimizer]:
        return [O.SparseAdam([m.module.emb.weight], lr=0.05), O.Adam([*m.module.lin.parameters()], lr=0.05)]

    ref_opts = opts(ref)
    ovl_opts = overlap_sgd.overlap(ovl, opts(ovl))
    init = net.emb.weight.detach().clone()
    for step in range(4):
        g = torch.Generator().manual_seed(step * 10 + rank)
        idx, y = torch.randint(0, 50, (6, 3), generator=g), torch.randn(6, 4, generator=g)
        for m, os_ in ((ref, ref_opts), (ovl, ovl_opts)):
            torch.nn.functional.mse_loss(m(idx), y).backward()
            for o in os_:
                o.step()
                o.zero_grad()
    for a, b in zip(ref.parameters(), ovl.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    return [not torch.equal(init, net.emb.weight)]


def test_sparse_adam_on_sparse_gradient_buckets() -> None:
    for moved in run_distributed(_sparse_adam_body, 2):
        assert moved == [True]


def _grad_scaler_refused(rank: int, world_size: int) -> str:
    torch.manual_seed(0)
    model = DDP(Net(), bucket_cap_mb=0.002)
    opt = overlap_sgd.overlap(model, O.SGD(model.parameters(), lr=0.1))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = batch(0, rank)
    scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
    with pytest.raises(RuntimeError) as info:
        scaler.step(opt)
    return str(info.value)


def test_grad_scaler_is_refused_pointing_to_bf16() -> None:
    # Loss scaling cannot be honoured (each bucket is updated before the scaler can unscale
    # it), so the first scaler.step() fails loudly instead of training on scaled gradients.
    for message in run_distributed(_grad_scaler_refused, 2):
        assert "GradScaler" in message and "bf16" in message


def _late_clipping(rank: int, world_size: int, clip_after: bool) -> list[str]:
    torch.manual_seed(0)
    model = DDP(Net(), bucket_cap_mb=0.002)
    opt = overlap_sgd.overlap(model, O.SGD(model.parameters(), lr=0.1, momentum=0.9))
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            x, y = batch(step, rank)
            torch.nn.functional.mse_loss(model(x), y).backward()
            if clip_after:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("clip_after", [True, False])
def test_clipping_after_backward_is_detected(clip_after: bool) -> None:
    # clip_grad_norm_ after backward acts too late (the parameters already moved): warn once.
    for messages in run_distributed(_late_clipping, 2, clip_after):
        late = [m for m in messages if "clip_grad_norm_" in m]
        assert len(late) == (1 if clip_after else 0), messages
