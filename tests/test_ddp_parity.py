"""DDP parity: overlapped training equals DDP + post-backward ``torch.optim`` in every feature.

Each row trains a reference DDP model (post-backward ``optimizer.step()``) and an overlapped one
side by side on every rank; :mod:`tests.parity` checks that parameters, gradients and optimizer
state agree and that the parameters moved.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from tests.distributed import run_distributed
from tests.parity import Scenario, check_moved, parity_body, parity_many

SGD = partial(torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)
SGD_PLAIN = partial(torch.optim.SGD, lr=0.05)
SGD_FUSED = partial(torch.optim.SGD, lr=0.05, momentum=0.9, dampening=0.1, fused=True)
ADAM = partial(torch.optim.Adam, lr=0.01, amsgrad=True, weight_decay=0.01)
ADAM_SINGLE = partial(torch.optim.Adam, lr=0.01, foreach=False, maximize=True)
ADAMW = partial(torch.optim.AdamW, lr=0.01, betas=(0.8, 0.99), weight_decay=0.1)
ADAMW_FUSED = partial(torch.optim.AdamW, lr=0.01, fused=True)

CASES = [
    Scenario("sgd-many-buckets", SGD),
    Scenario("sgd-world3", SGD, world_size=3),
    Scenario("sgd-plain", SGD_PLAIN),
    Scenario("sgd-fused", SGD_FUSED),
    Scenario("adam-amsgrad-world3", ADAM, world_size=3),
    Scenario("adam-single-tensor-maximize", ADAM_SINGLE),
    Scenario("adamw", ADAMW),
    Scenario("adamw-fused", ADAMW_FUSED),
    Scenario("one-bucket", SGD, bucket_cap_mb=25),
    Scenario("bucket-rebuild", ADAMW, net={"reverse": True, "depth": 4}, bucket_cap_mb=0.004),
    Scenario("inline-executor", ADAMW, executor="inline"),
    Scenario("bucket-view", ADAM, ddp={"gradient_as_bucket_view": True}),
    Scenario("static-graph", SGD, ddp={"static_graph": True}),
    Scenario("tied", ADAMW, net={"tied": True}),
    Scenario("frozen", SGD, net={"frozen": True}),
    Scenario("unused-sgd", SGD, net={"branch": True}, ddp={"find_unused_parameters": True},
             branch_rule="mixed", steps=8),
    Scenario("unused-adam-bucket-view", ADAM, net={"branch": True}, branch_rule="mixed", steps=8,
             ddp={"find_unused_parameters": True, "gradient_as_bucket_view": True}),
    Scenario("no-sync-accumulation", SGD, accumulate=3),
    Scenario("no-sync-accumulation-world3", ADAMW, accumulate=2, world_size=3),
    Scenario("groups-scheduler", SGD, groups=True, scheduler=True),
    Scenario("groups-scheduler-adamw", ADAMW, groups=True, scheduler=True),
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
    for r in results:
        check_moved(r, frozen)
        assert r["syncs"] == scenario.steps
    if scenario.scheduler:
        assert results[0]["lrs"][0] < 0.02, "the scheduler did not drive the overlapped lr"
    if not scenario.ddp.get("gradient_as_bucket_view"):
        # Views after backward only where the overlap hands them out in place of DDP's copy.
        views = [r["grad_views"] for r in results]
        assert all(views) if scenario.grad_views else not any(views), views
    assert results[0]["plans_built"] >= results[0]["buckets"] > 0


def test_plans_follow_a_bucket_rebuild() -> None:
    # Layers used in reverse registration order: DDP regroups its buckets after iteration one,
    # and the overlapped update must rebuild its plans for the new layout and keep parity.
    (scenario,) = [c for c in CASES if c.name == "bucket-rebuild"]
    for r in run_distributed(parity_body, 2, scenario):
        assert r["plans_built"] > r["buckets"], "the bucket layout never changed"


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
