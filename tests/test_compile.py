"""torch.compile: overlap() on a compiled DDP model, whose graph dynamo splits at bucket
boundaries (DDPOptimizer), trains bit-identically to compiled post-backward training; the
compiled-autograd DDP reducer, which calls comm hooks per gradient, is refused.

The backend is ``aot_eager`` (AOT autograd without code generation), which exercises dynamo's
graph capture and DDP's graph splitting in a few seconds on CPU.
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import overlap_sgd
from tests.distributed import run_distributed
from tests.models import Net, batch, twin

STEPS = 6
# DDPOptimizer needs buckets at least as large as DDP's first bucket (1 MiB): a model of about
# 1.6 MB then spans two buckets and two compiled subgraphs.
BUCKET_CAP_MB = 1.0


def _counting_backend(graphs: list[int]):
    from torch._dynamo.backends.registry import lookup_backend

    aot_eager = lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return aot_eager(gm, example_inputs)

    return backend


def compile_body(rank: int, world_size: int, order: str) -> dict:
    torch.manual_seed(0)
    net = Net(width=256, depth=6)
    ref = DDP(twin(net), bucket_cap_mb=BUCKET_CAP_MB)
    ovl = DDP(net, bucket_cap_mb=BUCKET_CAP_MB)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    opt = torch.optim.AdamW(ovl.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    ref_graphs: list[int] = []
    ovl_graphs: list[int] = []
    compiled_ref = torch.compile(ref, backend=_counting_backend(ref_graphs))
    if order == "overlap_then_compile":
        opt = overlap_sgd.overlap(ovl, opt)
        compiled = torch.compile(ovl, backend=_counting_backend(ovl_graphs))
    else:  # overlap() is handed the compiled module itself
        compiled = torch.compile(ovl, backend=_counting_backend(ovl_graphs))
        opt = overlap_sgd.overlap(compiled, opt)
    initial = [p.detach().clone() for p in ovl.parameters()]

    views = grads_identical = 0
    for step in range(STEPS):
        accumulate = 2 if step % 3 == 2 else 1  # some steps accumulate under no_sync
        grads = []
        for model, optimizer in ((compiled_ref, ref_opt), (compiled, opt)):
            for micro in range(accumulate):
                x, y = batch(step * 2 + micro, rank)
                sync = micro == accumulate - 1
                with nullcontext() if sync else model.no_sync():
                    F.mse_loss(model(x), y).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            if model is compiled:
                views = max(views, sum(p.grad._is_view() for p in ovl.parameters()))
            optimizer.step()
            # Zeroed to None, zeroed in place, or kept and accumulated into by the next step:
            # kept gradients that are bucket views must get memory of their own before the next
            # backward reuses the buckets, which the overlap's forward pre-hook does, so it
            # must still run when the DDP model is compiled.
            if step % 3 != 1:
                optimizer.zero_grad(set_to_none=step % 3 == 0)
        grads_identical += all(torch.equal(a, b) for a, b in zip(*grads))

    state, ref_state = opt.state_dict()["state"], ref_opt.state_dict()["state"]
    return {
        "identical": all(torch.equal(a, b) for a, b in zip(ovl.parameters(), ref.parameters())),
        "max_diff": max((a - b).abs().max().item() for a, b in zip(ovl.parameters(), ref.parameters())),
        "state_identical": all(torch.equal(v, ref_state[k][key]) for k, st in state.items() for key, v in st.items()),
        "grads_identical_steps": grads_identical,
        "moved": all(not torch.equal(a, b) for a, b in zip(initial, ovl.parameters())),
        "finite": all(bool(torch.isfinite(p).all()) for p in ovl.parameters()),
        "views": views,
        "syncs": ovl._overlap_sgd_state.syncs,
        "buckets": len(ovl._overlap_sgd_state._plans),
        "ref_graphs": len(ref_graphs),
        "ovl_graphs": len(ovl_graphs),
    }


@pytest.mark.timeout(200)
@pytest.mark.parametrize("order", ["overlap_then_compile", "compile_then_overlap"])
def test_compiled_ddp_trains_bit_identically(order):
    for rank, r in enumerate(run_distributed(compile_body, 2, order, timeout=170)):
        where = f"rank {rank}, {order}"
        assert r["buckets"] >= 2, f"{where}: one bucket, nothing to overlap"
        # DDPOptimizer split the forward graph at the bucket boundary, on both sides alike.
        assert r["ref_graphs"] >= 2 and r["ovl_graphs"] == r["ref_graphs"], where
        assert r["syncs"] == STEPS, where
        assert r["views"] == len(list(Net(width=256, depth=6).parameters())), f"{where}: no grad views"
        assert r["grads_identical_steps"] == STEPS, where
        assert r["identical"], f"{where}: parameters differ by {r['max_diff']}"
        assert r["state_identical"] and r["moved"] and r["finite"], where


def python_reducer_body(rank: int, world_size: int) -> str:
    import torch._dynamo

    with torch._dynamo.config.patch(optimize_ddp="python_reducer"):
        model = DDP(Net(), bucket_cap_mb=BUCKET_CAP_MB)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="python_reducer") as info:
        overlap_sgd.overlap(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert not model._comm_hooks
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    return str(info.value)


@pytest.mark.timeout(60)
def test_compiled_autograd_reducer_is_refused():
    messages = run_distributed(python_reducer_body, 2, timeout=50)
    assert all("per gradient instead of per bucket" in m for m in messages), messages
