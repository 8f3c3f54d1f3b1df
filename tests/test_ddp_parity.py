"""DDP parity: overlapped training equals DDP + post-backward ``torch.optim`` in every feature.

Each row trains a reference DDP model (post-backward ``optimizer.step()``) and an overlapped one
side by side on every rank; :mod:`tests.parity` checks that parameters, gradients and optimizer
state agree and that the parameters moved.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

import overlap_sgd

from tests.distributed import run_distributed
from tests.parity import Rounding, Scenario, check_moved, parity_body, parity_many

# The optimizers name their kernel (fused=True), so that both sides run the very same one. The
# overlapped update takes the same path as with torch's default (unset) choice, which it
# resolves to the fused kernel too; the post-backward step would resolve it to the multi-tensor
# one, which rounds differently (the "unpinned" rows below).
SGD = partial(torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, fused=True)
SGD_PLAIN = partial(torch.optim.SGD, lr=0.05)
SGD_FUSED = partial(torch.optim.SGD, lr=0.05, momentum=0.9, dampening=0.1, fused=True)
SGD_FOREACH = partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=0.01, foreach=True)
SGD_UNPINNED = partial(torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)
ADAM = partial(torch.optim.Adam, lr=0.01, amsgrad=True, weight_decay=0.01, fused=True)
ADAM_SINGLE = partial(torch.optim.Adam, lr=0.01, foreach=False, maximize=True)
ADAMW = partial(torch.optim.AdamW, lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, fused=True)
ADAMW_FOREACH = partial(torch.optim.AdamW, lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, foreach=True)
ADAMW_UNPINNED = partial(torch.optim.AdamW, lr=0.01, betas=(0.8, 0.99), weight_decay=0.1)

#: Where the two sides cannot agree bit for bit, and why.
KERNELS = Rounding(1e-5, 1e-6, "the optimizer leaves the kernel to torch: the overlapped update "
                   "runs the fused kernel, the post-backward step the multi-tensor one")
THIRDS = Rounding(1e-5, 1e-6, "3 ranks: DDP divides each rank's gradient by 3 before the sum, "
                  "the overlap divides the sum, and a/3 + b/3 + c/3 rounds unlike (a + b + c)/3")

CASES = [
    Scenario("sgd-many-buckets", SGD),
    Scenario("sgd-world3", SGD, world_size=3, rounding=THIRDS),
    Scenario("sgd-plain", SGD_PLAIN),
    Scenario("sgd-fused", SGD_FUSED),
    Scenario("sgd-foreach", SGD_FOREACH),
    Scenario("sgd-unpinned", SGD_UNPINNED, rounding=KERNELS),
    Scenario("adam-amsgrad-world3", ADAM, world_size=3, rounding=THIRDS),
    Scenario("adam-amsgrad", ADAM),
    Scenario("adam-single-tensor-maximize", ADAM_SINGLE),
    Scenario("adamw", ADAMW),
    Scenario("adamw-foreach", ADAMW_FOREACH),
    Scenario("adamw-unpinned", ADAMW_UNPINNED, rounding=KERNELS),
    Scenario("one-bucket", SGD, bucket_cap_mb=25),
    # Layers used in reverse registration order: DDP regroups its buckets after iteration one,
    # and the overlapped update must rebuild its plans for the new layout and keep parity.
    Scenario("bucket-rebuild", ADAMW, net={"reverse": True, "depth": 4}, bucket_cap_mb=0.004),
    Scenario("inline-executor", ADAMW, executor="inline"),
    Scenario("bucket-view", ADAM, ddp={"gradient_as_bucket_view": True}),
    Scenario("static-graph", SGD, ddp={"static_graph": True}),
    # A branch only rank 0 uses, every step: the other rank needs the used flags over the
    # ranks; with a static graph they are communicated until known, then reused.
    Scenario("static-graph-unused-on-one-rank", ADAM, net={"branch": True}, branch_rule="rank0",
             ddp={"static_graph": True}, bucket_cap_mb=0.004, steps=6),
    # A branch no rank ever uses: never stepped (its .grad stays None), also once known.
    Scenario("static-graph-never-used", SGD, net={"branch": True}, ddp={"static_graph": True},
             bucket_cap_mb=0.004, steps=6),
    Scenario("tied", ADAMW, net={"tied": True}),
    Scenario("frozen", SGD, net={"frozen": True}),
    Scenario("unused-sgd", SGD, net={"branch": True}, ddp={"find_unused_parameters": True},
             branch_rule="mixed", steps=8),
    Scenario("unused-adam-bucket-view", ADAM, net={"branch": True}, branch_rule="mixed", steps=8,
             ddp={"find_unused_parameters": True, "gradient_as_bucket_view": True}),
    Scenario("no-sync-accumulation", SGD, accumulate=3),
    Scenario("no-sync-accumulation-world3", ADAMW, accumulate=2, world_size=3, rounding=THIRDS),
    Scenario("groups-scheduler", SGD, groups=True, scheduler=True),
    Scenario("groups-scheduler-adamw", ADAMW, groups=True, scheduler=True),
    Scenario("groups-cosine-scheduler", ADAMW, groups=True, scheduler=True, schedule="cosine"),
    Scenario("partial-optimizer", SGD, partial_optimizer=True),
    Scenario("state-dict-swap", ADAM, swap_state_at=3),
    Scenario("fp16-compression", SGD, comm="fp16"),
    Scenario("bf16-compression", ADAM, comm="bf16"),
    Scenario("powersgd", SGD, comm="powersgd", bucket_cap_mb=0.01),
    # .grad handed out as bucket views (the default) against DDP's copies, whatever the loop
    # does with the gradients between steps; and with the views turned off.
    Scenario("grads-zeroed-in-place", SGD, zero="zeros"),
    Scenario("grads-zeroed-in-place-accumulation", ADAMW, zero="zeros", accumulate=2),
    Scenario("grads-never-zeroed", SGD, zero="keep"),
    Scenario("unused-grads-zeroed-in-place", ADAM, net={"branch": True}, branch_rule="mixed",
             ddp={"find_unused_parameters": True}, zero="zeros", steps=8),
    Scenario("grad-views-off", ADAMW, grad_views=False),
    Scenario("hook-returns-new-tensor-grads-kept", SGD, comm="fresh", zero="keep"),
    # A comm hook whose future another thread completes after the collective: every update,
    # DDP's end of backward and the next forward must wait for that thread.
    Scenario("late-future-thread", ADAMW, comm="late"),
    Scenario("late-future-inline", SGD, comm="late", executor="inline"),
    Scenario("late-future-unused", ADAM, comm="late", net={"branch": True}, branch_rule="mixed",
             ddp={"find_unused_parameters": True}, steps=8),
    Scenario("late-future-static-graph", SGD_FUSED, comm="late", ddp={"static_graph": True},
             grad_views=False),
]


@pytest.mark.parametrize("scenario", CASES, ids=[c.name for c in CASES])
def test_parity_with_post_backward(scenario: Scenario) -> None:
    results = run_distributed(parity_body, scenario.world_size, scenario)
    frozen: tuple[str, ...] = ()
    if scenario.net.get("frozen"):
        frozen += ("frozen",)
    if scenario.partial_optimizer:
        frozen += ("head",)
    if scenario.net.get("branch") and scenario.branch_rule == "none":
        frozen += ("branch",)  # no rank ever uses it
    for r in results:
        check_moved(r, frozen)
        assert r["syncs"] == scenario.steps
    if scenario.scheduler:
        assert results[0]["lrs"][0] < 0.02, "the scheduler did not drive the overlapped lr"
    if not scenario.ddp.get("gradient_as_bucket_view"):
        # Views after backward only where the overlap hands them out in place of DDP's copy.
        views = [r["grad_views"] for r in results]
        assert all(views) if scenario.grad_views else not any(views), views
    # A bucket's plan is built when its layout is first seen and reused every later step: the
    # first steps build them (DDP regroups its buckets once, after the first iteration, or the
    # second with static_graph), then only loading a state dict, which forgets them all,
    # builds them again.
    built, buckets = results[0]["plans_built"], results[0]["buckets"]
    settled = 2 if scenario.ddp.get("static_graph") else 1
    assert 0 < built[0] <= built[settled] and buckets > 0
    rebuilt = buckets if scenario.swap_state_at is not None else 0
    assert built[-1] == built[settled] + rebuilt, (built, buckets)
    if scenario.net.get("reverse"):
        assert built[1] > built[0], "the bucket layout never changed"
    launches = results[0]["flag_launches"]
    if scenario.ddp.get("static_graph"):
        # Used flags travel while the buckets settle (DDP regroups them after iteration two),
        # once more for the settled layout, and never again.
        assert launches[0] > 0 and launches[-1] == launches[settled + 1], launches
    elif scenario.ddp.get("find_unused_parameters"):
        assert launches[-1] == launches[0] * scenario.steps, launches


SLICED = [
    # ~10 KB buckets communicated in ~1 KB slices (a few parameters each), each slice updated
    # as it lands: the same training as whole buckets and as post-backward.
    Scenario("sliced-sgd", SGD, bucket_cap_mb=0.01, slice_mb=0.001),
    Scenario("sliced-adam-unused", ADAM, bucket_cap_mb=0.01, slice_mb=0.001, net={"branch": True},
             branch_rule="mixed", ddp={"find_unused_parameters": True}, steps=8),
    Scenario("sliced-groups-no-sync", ADAMW, bucket_cap_mb=0.01, slice_mb=0.001, groups=True,
             accumulate=2),
    # The default: buckets of at least two minimum slices are cut into equal slices.
    Scenario("sliced-auto", SGD, bucket_cap_mb=0.01, auto_min_slice_mb=0.001),
    Scenario("sliced-auto-rebuild", ADAMW, net={"reverse": True, "depth": 4}, bucket_cap_mb=0.004,
             auto_min_slice_mb=0.001),
    Scenario("sliced-grads-zeroed-in-place", SGD, bucket_cap_mb=0.01, slice_mb=0.001, zero="zeros"),
    Scenario("sliced-grads-never-zeroed", ADAM, bucket_cap_mb=0.01, slice_mb=0.001, zero="keep"),
]



def test_sliced_communication_keeps_parity() -> None:
    for per_rank in run_distributed(parity_many, 2, SLICED, timeout=120):
        for r in per_rank:
            check_moved(r)
            assert r["sliced"], f"[{r['name']}] no bucket was communicated in slices"


class _NoGradFor(torch.autograd.Function):
    """Adds ``w.sum()`` forward, and gives ``w`` no gradient backward (an undefined one)."""

    @staticmethod
    def forward(ctx, x, w):
        return x + w.sum()

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GivesNoGradient(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.w = torch.nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NoGradFor.apply(self.lin(x), self.w)


def _undefined_gradient(rank: int, world_size: int, shard: bool) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from tests.models import twin

    torch.manual_seed(0)
    net = _GivesNoGradient()
    ref, ovl = DDP(twin(net), find_unused_parameters=True), DDP(net, find_unused_parameters=True)
    make = partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=0.1, foreach=True)
    ref_opt, opt = make(ref.parameters()), overlap_sgd.overlap(ovl, make(ovl.parameters()), shard=shard)
    g = torch.Generator().manual_seed(rank)
    for _ in range(3):
        x = torch.randn(2, 4, generator=g)
        for model, o in ((ref, ref_opt), (ovl, opt)):
            model(x).sum().backward()
            o.step()
            o.zero_grad()
    return {
        "w_untouched": torch.equal(ovl.module.w, ref.module.w) and bool((ovl.module.w == 1).all()),
        "lin_equal": all(torch.equal(a, b) for a, b in zip(ovl.module.lin.parameters(), ref.module.lin.parameters())),
    }


@pytest.mark.parametrize("shard", [False, True], ids=["all-reduce", "sharded"])
def test_a_parameter_given_an_undefined_gradient_is_not_stepped(shard: bool) -> None:
    # DDP zero-fills such a parameter's bucket slot and counts it as unused (no rank used it), so
    # a post-backward step skips it: no momentum, no weight decay. So must the overlap.
    for r in run_distributed(_undefined_gradient, 2, shard, timeout=60):
        assert r == {"w_untouched": True, "lin_equal": True}, r
