"""Hugging Face Accelerate: overlap() on what Accelerator.prepare returns trains as the same
Accelerate loop without the overlap, with accumulate(), save_state/load_state and bf16; fp16's
gradient scaler is refused and accelerator.clip_grad_norm_ warns.

Each rank of the gloo harness sets the variables a launcher would (RANK, WORLD_SIZE, ...) and
builds an Accelerator(cpu=True), which then adopts the process group the harness initialised.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import overlap_sgd
from tests.distributed import run_distributed
from tests.models import Net, batch

pytest.importorskip("accelerate")

STEPS = 8  # optimizer steps
ACCUMULATE = 2  # micro-batches per step


def _launcher_env(rank: int, world_size: int) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1",
    )


def _prepared(mixed_precision: str = "no"):
    """A fresh Accelerator and the prepared (model, optimizer, scheduler), same init each time."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    AcceleratorState._reset_state()  # another mixed precision needs a fresh state
    accelerator = Accelerator(
        cpu=True, mixed_precision=mixed_precision, gradient_accumulation_steps=ACCUMULATE,
        kwargs_handlers=[DistributedDataParallelKwargs(bucket_cap_mb=0.002)],
    )
    model, opt, sched = accelerator.prepare(*_model_and_optimizer())
    return accelerator, model, opt, sched


def _model_and_optimizer() -> tuple:
    """The test model (seeded), its AdamW (decay on matrices only) and a StepLR."""
    torch.manual_seed(0)
    net = Net(width=32, depth=3)
    decay = [p for p in net.parameters() if p.dim() >= 2]
    rest = [p for p in net.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-2, fused=True)
    return net, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)


def _train(accelerator, model, opt, sched, rank: int, steps: range, clip: float | None = None) -> None:
    for step in steps:
        for micro in range(ACCUMULATE):
            x, y = batch(step * ACCUMULATE + micro, rank)
            with accelerator.accumulate(model):
                accelerator.backward(F.mse_loss(model(x).float(), y))
                if clip is not None and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), clip)
                opt.step()
                sched.step()
                opt.zero_grad()


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def accelerate_body(rank: int, world_size: int, run_dir: str) -> dict:
    _launcher_env(rank, world_size)
    from accelerate.optimizer import AcceleratedOptimizer

    out: dict = {}
    for precision in ("no", "bf16"):
        # The reference: the same Accelerate loop without the overlap.
        accelerator, model, opt, sched = _prepared(precision)
        initial = _params(model)
        _train(accelerator, model, opt, sched, rank, range(STEPS))
        expected = _params(model)
        expected_state = opt.state_dict()

        accelerator, model, opt, sched = _prepared(precision)
        returned = overlap_sgd.overlap(model, opt)
        assert returned is opt and isinstance(opt, AcceleratedOptimizer)
        assert isinstance(opt.optimizer, overlap_sgd.OverlappedOptimizer)
        assert _equal(_params(model), initial)
        half = STEPS // 2
        _train(accelerator, model, opt, sched, rank, range(half))
        syncs = model._overlap_sgd_state.syncs
        checkpoint = os.path.join(run_dir, f"state-{precision}")
        accelerator.save_state(checkpoint)
        _train(accelerator, model, opt, sched, rank, range(half, STEPS))
        got = _params(model)
        out[precision] = {
            "identical": _equal(got, expected),
            "max_diff": max((a - b).abs().max().item() for a, b in zip(got, expected)),
            "moved": all(not torch.equal(a, b) for a, b in zip(got, initial)),
            "finite": all(bool(torch.isfinite(p).all()) for p in got),
            # accumulate(): one update per ACCUMULATE micro-batches, none inside no_sync.
            "syncs_at_half": syncs,
            "lr": opt.param_groups[0]["lr"] == expected_state["param_groups"][0]["lr"],
            "state_identical": all(
                torch.equal(v, expected_state["state"][k][key])
                for k, st in opt.state_dict()["state"].items() for key, v in st.items()
            ),
        }

        # load_state rewinds the overlapped run to the checkpoint; the second half replays exactly.
        accelerator.load_state(checkpoint)
        _train(accelerator, model, opt, sched, rank, range(half, STEPS))
        out[precision]["resumed_identical"] = _equal(_params(model), got)

        # The checkpoint also resumes the plain Accelerate loop: the state dicts interchange.
        accelerator, model, opt, sched = _prepared(precision)
        accelerator.load_state(checkpoint)
        _train(accelerator, model, opt, sched, rank, range(half, STEPS))
        out[precision]["plain_resumed_identical"] = _equal(_params(model), got)
    return out


@pytest.mark.timeout(240)
def test_accelerate_loop_trains_as_without_overlap(tmp_path):
    results = run_distributed(accelerate_body, 2, str(tmp_path), timeout=200)
    for rank, out in enumerate(results):
        for precision, r in out.items():
            where = f"rank {rank}, mixed_precision={precision}"
            # Same fused AdamW kernel on the same averaged gradients: bit-identical.
            assert r["identical"], f"{where}: parameters differ by {r['max_diff']}"
            assert r["moved"] and r["finite"], where
            assert r["syncs_at_half"] == STEPS // 2, f"{where}: {r['syncs_at_half']} synchronising backwards"
            assert r["lr"] and r["state_identical"], where
            assert r["resumed_identical"], f"{where}: load_state did not rewind the overlapped run"
            assert r["plain_resumed_identical"], f"{where}: the checkpoint did not resume without the overlap"


def clip_and_scaler_body(rank: int, world_size: int) -> dict:
    _launcher_env(rank, world_size)
    from accelerate.optimizer import AcceleratedOptimizer

    accelerator, model, opt, sched = _prepared()
    inner = opt.optimizer
    initial = _params(model)

    # fp16's gradient scaler would act after the update: refused before anything is touched.
    scaled = AcceleratedOptimizer(inner, scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(TypeError, match="gradient scaler"):
        overlap_sgd.overlap(model, scaled)
    assert not hasattr(model, "_overlap_sgd_state") or model._overlap_sgd_state is None

    opt = overlap_sgd.overlap(model, opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(accelerator, model, opt, sched, rank, range(2), clip=1e-3)
    messages = [str(w.message) for w in caught if "modified in place after backward" in str(w.message)]
    return {
        "messages": messages,
        "moved": not _equal(_params(model), initial),
    }


@pytest.mark.timeout(120)
def test_fp16_scaler_refused_and_clip_grad_norm_warns():
    for rank, out in enumerate(run_distributed(clip_and_scaler_body, 2, timeout=100)):
        assert len(out["messages"]) == 1, (rank, out["messages"])
        assert "accelerator.clip_grad_norm_" in out["messages"][0]
        assert out["moved"], rank


@pytest.mark.timeout(200)
def test_accelerate_example_trains_as_its_post_backward_mode(tmp_path):
    from safetensors.torch import load_file

    from tests.test_example import torchrun

    script = Path(__file__).resolve().parents[1] / "examples" / "train_accelerate.py"
    saved = {}
    for mode in ("overlap", "post"):
        out = torchrun("--mode", mode, "--steps", "4", "--save-dir", mode, cwd=tmp_path, timeout=90, script=script)
        assert f"training: mode {mode} | 2 ranks on cpu" in out and "step    4 | loss" in out, out[-3000:]
        model = load_file(tmp_path / mode / "model.safetensors")
        optimizer = torch.load(tmp_path / mode / "optimizer.bin", weights_only=True)
        saved[mode] = (model, optimizer)
    (model, optimizer), (ref_model, ref_optimizer) = saved["overlap"], saved["post"]
    assert model.keys() == ref_model.keys()
    for name, value in model.items():
        # Steps that clip the global norm are corrected after the overlapped update, which rounds
        # a few more times than clipping first; Adam's m / sqrt(v) amplifies that where a
        # gradient element is near zero.
        torch.testing.assert_close(value, ref_model[name], rtol=1e-4, atol=5e-5, msg=name)
    states, ref_states = optimizer["state"], ref_optimizer["state"]
    assert states.keys() == ref_states.keys() and len(states) == len(model)
    for index, state in states.items():
        assert float(state["step"]) == 4 and bool(state["exp_avg"].abs().max() > 0)  # trained
        for key, value in state.items():
            torch.testing.assert_close(value, ref_states[index][key], rtol=1e-4, atol=5e-5)


def routed_clip_body(rank: int, world_size: int) -> dict:
    _launcher_env(rank, world_size)
    accelerator, model, opt, sched = _prepared()
    # The reference: a second model of the same weights, post-backward, in the same accelerator.
    ref, ref_opt, ref_sched = accelerator.prepare(*_model_and_optimizer())

    opt = overlap_sgd.overlap(model, opt, clip_grad_norm=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(accelerator, ref, ref_opt, ref_sched, rank, range(4), clip=0.05)
        _train(accelerator, model, opt, sched, rank, range(4), clip=0.05)
    late = [str(w.message) for w in caught if "modified in place after backward" in str(w.message)]
    inner = opt.optimizer
    diffs = [float((a - b).abs().max()) for a, b in zip(_params(model), _params(ref))]
    return {"late": late, "diff": max(diffs), "clipped": inner.clipped, "norm": float(inner.grad_norm)}


@pytest.mark.timeout(120)
def test_accelerator_clip_grad_norm_is_routed_to_the_overlapped_clipping():
    for rank, out in enumerate(run_distributed(routed_clip_body, 2, timeout=100)):
        assert not out["late"], out["late"]  # routed: nothing modified the gradients too late
        assert out["clipped"] and out["norm"] > 0.05, out
        # Steps that clip are corrected: within rounding of accelerator.clip_grad_norm_ + step().
        assert out["diff"] < 5e-5, out
