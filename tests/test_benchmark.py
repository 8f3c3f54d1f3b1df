"""Tests of the benchmark tool: mode set-up, statistics, the simulated link, reports."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from benchmarks.link import LinkedCollectives, LinkedFSDPCollectives, SimulatedLink
from benchmarks.modes import FSDP_MODES, MODES, SHARDED, Mode, ModeContext, StepRecord, build_mode, state_bytes
from benchmarks.overlap_bench import parse_args
from benchmarks.report import format_table, fsdp_lines, mode_memory, sharding_lines
from benchmarks.runner import BenchOptions, configs
from benchmarks.stats import compare, hidden_fraction, ratio, step_max, summarize
from benchmarks.targets import FSDP_TARGET_CONFIG, TARGET_CONFIG, fsdp, sharding
from benchmarks.workloads import GPT, Workload, build_model, loss_fn, make_batch
from tests.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[1]


# -- statistics ------------------------------------------------------------------------------


def test_summarize_quantiles():
    s = summarize([float(i) for i in range(1, 12)])  # 1..11
    assert s["n"] == 11 and s["median"] == 6.0
    assert s["p10"] == pytest.approx(2.0) and s["p90"] == pytest.approx(10.0)
    assert s["q1"] == pytest.approx(3.5) and s["q3"] == pytest.approx(8.5)
    assert s["iqr"] == pytest.approx(5.0)
    assert summarize([]) == {"n": 0}


def test_step_max_takes_the_slowest_rank_per_step():
    assert step_max([[1.0, 5.0, 2.0], [3.0, 1.0, 2.5, 9.0]]) == [3.0, 5.0, 2.5]
    assert step_max([]) == []


def test_ratios_and_hidden_fraction():
    medians = {"floor": 0.050, "post": 0.100, "post-fused": 0.080, "upstream": 0.090, "overlap": 0.060}
    c = compare(medians)
    assert c["overlap/post"] == pytest.approx(0.6)
    assert c["overlap/post-fused"] == pytest.approx(0.75)
    assert c["overlap/upstream"] == pytest.approx(2 / 3)
    assert c["hidden_fraction"] == pytest.approx(0.8)
    assert c["hidden_fraction_vs_fused"] == pytest.approx(2 / 3)
    # Fully hidden, slower than post, and undefined cases.
    assert hidden_fraction(0.1, 0.05, 0.05) == pytest.approx(1.0)
    assert hidden_fraction(0.1, 0.12, 0.05) == pytest.approx(-0.4)
    assert hidden_fraction(0.05, 0.05, 0.05) is None
    assert hidden_fraction(None, 0.05, 0.04) is None
    assert ratio(1.0, None) is None and ratio(1.0, 0.0) is None
    skipped = compare({**medians, "upstream": None})
    assert skipped["overlap/upstream"] is None and skipped["overlap/post"] == pytest.approx(0.6)
    sharded = compare({**medians, "overlap-shard": 0.057, "zero-post": 0.075})
    assert sharded["overlap-shard/overlap"] == pytest.approx(0.95)
    assert sharded["overlap-shard/zero-post"] == pytest.approx(0.76)
    assert sharded["overlap-shard/zero-upstream"] is None


def _state(tensors: int, scalars: int = 8) -> dict[str, int]:
    return {"tensors": tensors, "scalars": scalars}


def test_sharding_targets_and_state_ratios():
    state = {"overlap": [_state(1000), _state(1000)], "post-fused": [_state(1000), _state(1000)],
             "overlap-shard": [_state(500), _state(504, 4)], "zero-post": [_state(600), _state(400)]}
    medians = {"overlap": 0.100, "overlap-shard": 0.098, "zero-post": 0.120}
    cfg = TARGET_CONFIG
    s = sharding(cfg["optimizer"], cfg["bucket_cap_mb"], cfg["link_gbps"], cfg["world_size"], medians, state)
    assert s["targets_apply"]
    assert s["state_per_rank"]["overlap-shard"] == {"tensors": 504, "scalars": 8, "total": 508}
    assert s["state_ratio"]["overlap-shard/overlap"] == pytest.approx(508 / 1008)
    assert s["state_ratio"]["zero-post/post-fused"] == pytest.approx(608 / 1008)
    assert s["state_ratio"]["zero-upstream/post-fused"] is None
    verdicts = {(t["what"], t["ratio"]): (t["value"], t["met"]) for t in s["targets"]}
    assert verdicts[("step", "overlap-shard/overlap")] == (pytest.approx(0.98), True)
    assert verdicts[("step", "overlap-shard/zero-post")] == (pytest.approx(0.98 / 1.2), True)
    assert verdicts[("state", "overlap-shard/overlap")][1] is True
    slower = sharding("adamw", 4.0, 2.0, 2, {**medians, "overlap-shard": 0.115}, state)
    met = [t["met"] for t in slower["targets"]]
    assert met == [False, False, True]
    # Another configuration: the same ratios, no verdicts.
    elsewhere = sharding("sgd", 4.0, 2.0, 2, medians, state)
    assert not elsewhere["targets_apply"] and [t["met"] for t in elsewhere["targets"]] == [None] * 3
    assert elsewhere["targets"][0]["value"] == pytest.approx(0.98)
    missing = sharding("adamw", 4.0, 2.0, 2, {"overlap": 0.1}, {})
    assert [t["met"] for t in missing["targets"]] == [None] * 3


def test_state_bytes_counts_tensors_and_scalars_apart():
    p, q = torch.zeros(4), torch.zeros(2, 3)
    states = [{p: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4), "exp_avg_sq": torch.zeros(4)}},
              {q: {"momentum_buffer": torch.zeros(2, 3, dtype=torch.float64), "lr": 0.1}}]
    assert state_bytes(states) == {"tensors": 4 * 4 * 2 + 6 * 8, "scalars": 4}
    assert state_bytes([]) == {"tensors": 0, "scalars": 0}
    assert Mode("floor").state_bytes() == {"tensors": 0, "scalars": 0}


# -- the simulated link ----------------------------------------------------------------------


def _done(value: float = 1.0) -> torch.futures.Future:
    f: torch.futures.Future = torch.futures.Future()
    f.set_result(torch.tensor([value]))
    return f


def test_link_holds_bytes_over_bandwidth():
    link = SimulatedLink(gbps=0.08)
    try:
        assert link.seconds(1_000_000) == pytest.approx(0.1)
        t0 = time.perf_counter()
        held = link.hold(_done(3.0), 1_000_000)
        out = held.wait()
        elapsed = time.perf_counter() - t0
        assert out.item() == 3.0
        # A landed bucket is still held for its time on the link. A lower bound only: a loaded
        # machine may hold it longer.
        assert elapsed >= 0.095, "the link let a landed bucket through without holding it"
        assert link.bytes_carried == 1_000_000
    finally:
        link.close()


def test_link_serializes_buckets():
    link = SimulatedLink(gbps=0.08)
    try:
        finished: dict[str, float] = {}
        t0 = time.perf_counter()
        a = link.hold(_done(), 1_000_000)
        b = link.hold(_done(), 1_000_000)
        # Futures of the stamping callbacks: wait() on ``a`` or ``b`` itself may return before
        # their callbacks have run.
        stamped_a = a.then(lambda _: finished.setdefault("a", time.perf_counter() - t0))
        stamped_b = b.then(lambda _: finished.setdefault("b", time.perf_counter() - t0))
        stamped_b.wait()
        stamped_a.wait()
        # One link: the second bucket starts its 0.1 s only once the first has finished, so it
        # lands after 0.2 s (0.1 s if the link carried both at once). The gap between the stamps
        # is not checked: a late-running callback of ``a`` shortens it by chance.
        assert finished["a"] >= 0.095
        assert finished["b"] >= 0.195
    finally:
        link.close()


def test_link_starts_when_the_inner_communication_lands():
    link = SimulatedLink(gbps=0.08)
    try:
        inner: torch.futures.Future = torch.futures.Future()
        t0 = time.perf_counter()
        held = link.hold(inner, 500_000)  # 0.05 s on the link
        timer = threading.Timer(0.1, lambda: inner.set_result(torch.zeros(1)))
        timer.start()
        held.wait()
        assert time.perf_counter() - t0 >= 0.145
        failing: torch.futures.Future = torch.futures.Future()
        failing.set_exception(RuntimeError("collective failed"))
        with pytest.raises(RuntimeError, match="collective failed"):
            link.hold(failing, 10).wait()
    finally:
        link.close()
    with pytest.raises(ValueError):
        SimulatedLink(gbps=0)


# -- the modes, on a tiny model ----------------------------------------------------------------


def _flat(module: torch.nn.Module) -> list[float]:
    """All parameters as a plain list (tensors cannot leave a rank through the result queue)."""
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).tolist()


def _train_modes(rank: int, world: int, optimizer: str, link_gbps: float | None) -> dict:
    torch.manual_seed(0)
    spec = Workload("mlp", width=16, depth=4, batch=4)  # four equal layers: ZeRO splits them evenly
    base = build_model(spec, seed=1)
    link = SimulatedLink(link_gbps) if link_gbps else None
    ctx = ModeContext(
        base=base, device=torch.device("cpu"), optimizer=optimizer, bucket_cap_mb=0.001,
        link=link, fast_kernel={"fused": True},
    )
    x, y = make_batch(spec, rank, torch.device("cpu"))
    out: dict = {"init": _flat(base), "state": {}, "link_bytes": {}}
    for name in MODES:
        mode = build_mode(name, ctx)
        if not mode.active:
            out[name] = mode.skipped
            continue
        for _ in range(3):
            carried = link.bytes_carried if link is not None else 0
            rec = mode.step(x, y)
            assert rec.total > 0 and rec.backward > 0
            if link is not None:
                out["link_bytes"][name] = link.bytes_carried - carried  # the last step's
                assert rec.link_busy == pytest.approx(link.seconds(out["link_bytes"][name]))
            else:
                assert rec.link_busy is None
        if name.startswith("post") or name == "zero-post":
            assert all(r.opt_step is not None for r in mode.records)
        if name.startswith("overlap"):
            assert all(r.update_busy is not None and r.update_busy > 0 for r in mode.records), (name, mode.records)
        out[name] = _flat(mode.model.module)
        out["state"][name] = mode.state_bytes()
        mode.close()
    if link is not None:
        assert link.bytes_carried > 0
        link.close()
    return out


def _modes_body(rank: int, world: int) -> list[dict]:
    from overlap_sgd.hooks import collectives, shard_hook

    out = [
        _train_modes(rank, world, "sgd", None),
        _train_modes(rank, world, "adamw", None),
        _train_modes(rank, world, "adamw", 20.0),
    ]
    # The link is held only while a sharded step runs: the hook module is left as it was.
    for name in LinkedCollectives.NAMES:
        assert getattr(shard_hook, name) is getattr(collectives, name), name
    return out


def _gpt_modes_body(rank: int, world: int) -> dict:
    spec = Workload("gpt", width=16, depth=2, batch=2, heads=2, seq_len=8, vocab=32)
    base = build_model(spec, seed=1)
    ctx = ModeContext(base=base, device=torch.device("cpu"), optimizer="adamw", bucket_cap_mb=0.002,
                      fast_kernel={"fused": True}, overlap_kernel={"fused": True},
                      autocast=torch.bfloat16)
    x, y = make_batch(spec, rank, torch.device("cpu"))
    out: dict = {"init": _flat(base)}
    for name in MODES:
        mode = build_mode(name, ctx)
        if not mode.active:
            continue
        for _ in range(3):
            mode.step(x, y)
        out[name] = _flat(mode.model.module)
        mode.close()
    return out


@pytest.fixture(scope="module")
def mode_runs() -> list[list[dict]]:
    """Every mode trained for three steps on two ranks: SGD and AdamW on loopback, AdamW behind a
    simulated link (per rank, per configuration)."""
    return run_distributed(_modes_body, 2, timeout=150)


def test_modes_train_alike(mode_runs):
    results = mode_runs
    for rank_results in results:
        for i, r in enumerate(rank_results):
            t = {k: torch.tensor(v) for k, v in r.items() if isinstance(v, list)}
            assert torch.equal(t["floor"], t["init"]), "floor has no optimizer"
            assert not torch.allclose(t["post"], t["init"]), "post did not train"
            assert torch.isfinite(t["post"]).all()
            for name in ("post-fused", "overlap", "zero-post", "overlap-shard") + (("upstream",) if i < 2 else ()):
                torch.testing.assert_close(t[name], t["post"], rtol=1e-5, atol=1e-6, msg=name)
            # Clipping fires on the first step (--clip sometimes): the clip modes train alike,
            # the overlapped one corrected within rounding, and unlike the unclipped modes.
            torch.testing.assert_close(t["overlap+clip"], t["post-fused+clip"], rtol=1e-4, atol=5e-5)
            assert not torch.allclose(t["overlap+clip"], t["post"]) and not torch.allclose(t["overlap+clip"], t["init"])
            assert "NCCL" in r["zero-upstream"] and "gloo" in r["zero-upstream"]
        assert "simulated link" in rank_results[2]["upstream"]
    for i in range(3):
        for name in ("overlap", "zero-post", "overlap-shard"):
            assert results[0][i][name] == results[1][i][name], (i, name)


def test_sharded_modes_hold_half_the_state_on_each_of_two_ranks(mode_runs):
    results = mode_runs
    for i in range(3):
        states = [rank_results[i]["state"] for rank_results in results]
        for sharded, whole in (("overlap-shard", "overlap"), ("zero-post", "post-fused")):
            unsharded = states[0][whole]["tensors"]
            assert unsharded > 0 and states[1][whole]["tensors"] == unsharded
            per_rank = [s[sharded]["tensors"] for s in states]
            # Held once across the ranks, and about half on each.
            assert sum(per_rank) == unsharded, (i, sharded, per_rank, unsharded)
            assert all(0.45 * unsharded <= b <= 0.55 * unsharded for b in per_rank), (i, sharded, per_rank)
        for s in states:
            assert s["floor"] == {"tensors": 0, "scalars": 0}
            assert s["post"]["tensors"] == s["post-fused"]["tensors"] == s["upstream" if i < 2 else "post"]["tensors"]
            if i > 0:  # AdamW: a 0-dim step per parameter a rank holds state of
                assert s["overlap"]["scalars"] > 0 and s["overlap-shard"]["scalars"] > 0


def test_the_link_carries_the_same_bytes_for_sharded_and_unsharded_steps(mode_runs):
    """Reduce-scatter and all-gather are charged half a bucket each: a sharded step puts an
    all-reduce's bytes on the link; ZeRO's parameter broadcast adds half the parameters'."""
    results = mode_runs
    params = 4 * len(results[0][2]["init"])
    for rank_results in results:
        carried = rank_results[2]["link_bytes"]
        floor = carried["floor"]
        assert floor >= params  # every gradient crosses once (DDP may pad its buckets)
        for name in ("post", "post-fused", "overlap", "overlap-shard", "post-fused+clip", "overlap+clip"):
            assert carried[name] == floor, (name, carried)
        assert carried["zero-post"] == floor + params // 2
        assert "upstream" not in carried and "zero-upstream" not in carried


def test_gpt_modes_train_alike_under_bf16_autocast():
    results = run_distributed(_gpt_modes_body, 2, timeout=120)
    for r in results:
        t = {k: torch.tensor(v) for k, v in r.items()}
        assert torch.equal(t["floor"], t["init"])
        assert not torch.allclose(t["post"], t["init"]) and torch.isfinite(t["post"]).all()
        for name in ("post-fused", "upstream", "overlap", "zero-post", "overlap-shard"):
            torch.testing.assert_close(t[name], t["post"], rtol=1e-5, atol=1e-6, msg=name)
        assert "zero-upstream" not in t
    assert results[0]["overlap"] == results[1]["overlap"]
    assert results[0]["overlap-shard"] == results[1]["overlap-shard"]


def _fsdp_modes_body(rank: int, world: int, link_gbps: float | None, optimizer: str) -> dict:
    spec = Workload("mlp", width=16, depth=4, batch=4)
    base = build_model(spec, seed=1)
    link = SimulatedLink(link_gbps) if link_gbps else None
    ctx = ModeContext(base=base, device=torch.device("cpu"), optimizer=optimizer, bucket_cap_mb=0.001,
                      link=link, fast_kernel={"fused": True}, overlap_kernel={"fused": True})
    x, y = make_batch(spec, rank, torch.device("cpu"))
    out: dict = {"init": _flat(base), "state": {}, "link_bytes": {}, "records": {}, "kernels": {}}
    for name in ("post-fused",) + FSDP_MODES:
        mode = build_mode(name, ctx)
        for _ in range(3):
            carried = link.bytes_carried if link is not None else 0
            rec = mode.step(x, y)
            if link is not None:
                out["link_bytes"][name] = link.bytes_carried - carried
        out["records"][name] = [(r.total, r.backward, r.opt_step, r.update_busy) for r in mode.records]
        out["kernels"][name] = mode.kernel
        model = mode.model.module if name == "post-fused" else mode.model
        out[name] = torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().reshape(-1)
                               for p in model.parameters()]).tolist()
        out["state"][name] = mode.state_bytes()
        mode.close()
    # The link's context is closed after every step: torch.distributed is left as it was.
    for fn in LinkedFSDPCollectives.NAMES:
        if hasattr(torch.distributed, fn):
            assert getattr(torch.distributed, fn) is getattr(torch.distributed.distributed_c10d, fn), fn
    if link is not None:
        link.close()
    return out


@pytest.mark.parametrize("link_gbps", [None, 20.0], ids=["loopback", "link"])
def test_fsdp_modes_train_alike_and_shard_the_state(link_gbps):
    results = run_distributed(_fsdp_modes_body, 2, link_gbps, "adamw", timeout=120)
    for r in results:
        t = {name: torch.tensor(r[name]) for name in ("init", "post-fused") + FSDP_MODES}
        assert torch.equal(t["fsdp-floor"], t["init"]), "fsdp-floor has no optimizer"
        assert not torch.allclose(t["fsdp-post-fused"], t["init"]), "fsdp-post-fused did not train"
        # The per-parameter optimizers really step, in backward: the parameters move, as post-fused's.
        assert not torch.allclose(t["fsdp-per-param-in-backward"], t["init"])
        for name in ("fsdp-per-param-in-backward", "fsdp-overlap"):
            torch.testing.assert_close(t[name], t["fsdp-post-fused"], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(t["fsdp-post-fused"], t["post-fused"], rtol=1e-5, atol=1e-6)
        for name, recs in r["records"].items():
            assert len(recs) == 3 and all(total > 0 and backward > 0 for total, backward, _, _ in recs), name
        assert all(opt is not None for _, _, opt, _ in r["records"]["fsdp-post-fused"])
        assert all(busy is not None and busy > 0 for _, _, _, busy in r["records"]["fsdp-overlap"])
        state = r["state"]
        assert state["fsdp-floor"] == {"tensors": 0, "scalars": 0}
        assert state["fsdp-overlap"] == state["fsdp-post-fused"] == state["fsdp-per-param-in-backward"]
        # FSDP shards the state: each rank holds half of DDP's (AdamW's moments, the 4 layers' rows).
        assert 2 * state["fsdp-overlap"]["tensors"] == state["post-fused"]["tensors"] > 0
        if link_gbps:
            params = 4 * len(r["init"])
            # Per step: one reduce-scatter and two all-gathers (forward, and backward after the
            # reshard), each charged half the parameters' bytes.
            for name in FSDP_MODES:
                assert r["link_bytes"][name] == 3 * params // 2, (name, r["link_bytes"])
        else:
            assert r["link_bytes"] == {}
    assert results[0]["fsdp-overlap"] == results[1]["fsdp-overlap"]


def test_fsdp_modes_fall_back_to_foreach_where_dtensor_has_no_fused_kernel():
    """SGD's fused kernel has no DTensor sharding rule: the FSDP2 modes take foreach for it."""
    results = run_distributed(_fsdp_modes_body, 2, None, "sgd", timeout=120)
    for r in results:
        assert "fused" in r["kernels"]["post-fused"]
        for name in ("fsdp-post-fused", "fsdp-per-param-in-backward", "fsdp-overlap"):
            assert "foreach" in r["kernels"][name], r["kernels"]
        t = {name: torch.tensor(r[name]) for name in ("init", "fsdp-post-fused", "fsdp-overlap")}
        assert not torch.allclose(t["fsdp-post-fused"], t["init"])
        torch.testing.assert_close(t["fsdp-overlap"], t["fsdp-post-fused"], rtol=1e-5, atol=1e-6)


def test_fsdp_targets():
    st = {"fsdp-overlap": [_state(500), _state(504, 4)], "fsdp-post-fused": [_state(500), _state(504, 4)],
          "fsdp-per-param-in-backward": [_state(500), _state(504, 4)], "overlap": [_state(1000)] * 2}
    medians = {"fsdp-overlap": 0.090, "fsdp-post-fused": 0.100, "fsdp-per-param-in-backward": 0.110,
               "fsdp-floor": 0.085}
    cfg = FSDP_TARGET_CONFIG
    f = fsdp(cfg["optimizer"], cfg["link_gbps"], cfg["world_size"], medians, st)
    assert f["targets_apply"] and set(f["state_per_rank"]) == {"fsdp-overlap", "fsdp-post-fused",
                                                               "fsdp-per-param-in-backward"}
    assert [(t["ratio"], t["met"]) for t in f["targets"]] == [
        ("fsdp-overlap/fsdp-post-fused", True), ("fsdp-overlap/fsdp-per-param-in-backward", True),
        ("fsdp-overlap/fsdp-post-fused", True)]
    assert f["step_ratio"]["fsdp-overlap/fsdp-floor"] == pytest.approx(0.090 / 0.085)
    assert f["step_ratio"]["fsdp-post-fused/post-fused"] is None
    bigger = {**st, "fsdp-overlap": [_state(500), _state(508, 4)]}
    assert fsdp("adamw", 2.0, 2, medians, bigger)["targets"][2]["met"] is False
    elsewhere = fsdp("adamw", None, 2, medians, st)
    assert not elsewhere["targets_apply"] and [t["met"] for t in elsewhere["targets"]] == [None] * 3
    run = {"modes": {name: {"status": "ok", "step": {"median": v, "p10": v}} for name, v in medians.items()},
           "fsdp": f}
    lines = "\n".join(fsdp_lines(run))
    assert "fsdp-overlap/fsdp-per-param-in-backward 0.818 <= 0.85 met" in lines
    assert "state fsdp-overlap/fsdp-post-fused 1.000 == 1.00 met" in lines and "limit" not in lines
    f_missed = fsdp("adamw", 2.0, 2, {**medians, "fsdp-overlap": 0.099}, st)
    missed = "\n".join(fsdp_lines({**run, "fsdp": f_missed}))
    assert "0.990 <= 0.95 NOT met" in missed and "limit: fsdp-floor 85.0 ms" in missed
    assert "fsdp-post-fused - floor 15.0 ms" in missed


# -- the GPT workload --------------------------------------------------------------------------


def test_gpt_is_a_causal_decoder_with_a_tied_head():
    spec = Workload("gpt", width=32, depth=2, batch=2, heads=4, seq_len=12, vocab=50)
    model = build_model(spec, seed=0)
    assert isinstance(model, GPT) and model.head.weight is model.tok.weight
    d, v, t, n = spec.width, spec.vocab, spec.seq_len, spec.depth
    per_block = 12 * d * d + 13 * d  # qkv, proj, fc, fc-proj weights and biases, two LayerNorms
    assert sum(p.numel() for p in model.parameters()) == v * d + t * d + n * per_block + 2 * d
    x, y = make_batch(spec, rank=0, device=torch.device("cpu"))
    assert x.shape == y.shape == (2, 12) and not x.is_floating_point()
    assert torch.equal(x[:, 1:], y[:, :-1]), "the target is the next token"
    logits = model(x)
    assert logits.shape == (2, 12, 50)
    changed = x.clone()
    changed[:, 7] = (changed[:, 7] + 1) % spec.vocab
    again = model(changed)
    torch.testing.assert_close(again[:, :7], logits[:, :7], rtol=0, atol=0)  # the past is blind to it
    assert not torch.allclose(again[:, 7:], logits[:, 7:])
    loss = loss_fn(logits, y)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), y.reshape(-1))
    assert torch.equal(loss, ref) and loss.item() == pytest.approx(torch.log(torch.tensor(50.0)).item(), rel=0.05)
    with pytest.raises(ValueError, match="width=30, heads=4"):
        build_model(Workload("gpt", width=30, heads=4, vocab=10, seq_len=4), seed=0)


class _FakeEvent:
    """Stands in for torch.cuda.Event: a time stamp in ms."""

    def __init__(self, ms: float):
        self.ms = ms
        self.waited = False

    def elapsed_time(self, end: "_FakeEvent") -> float:
        return end.ms - self.ms

    def synchronize(self) -> None:
        self.waited = True


def test_settle_turns_cuda_events_into_step_times():
    mode = Mode("post-fused")
    first = StepRecord(total=1.0, backward=1.0, opt_step=1.0)
    second = StepRecord(total=1.0, backward=1.0)
    events = [[_FakeEvent(t) for t in (0.0, 5.0, 7.0, 9.5)], [_FakeEvent(t) for t in (10.0, 14.0, 14.0, 16.0)]]
    mode._pending = [(first, events[0]), (second, events[1])]
    mode.settle()
    assert events[1][-1].waited and mode._pending == []
    assert (first.total, first.backward, first.opt_step) == pytest.approx((9.5e-3, 5e-3, 2e-3))
    assert (second.total, second.backward, second.opt_step) == (pytest.approx(6e-3), pytest.approx(4e-3), None)


# -- command line and reports ----------------------------------------------------------------


def test_parse_args_and_configs():
    job, _ = parse_args(["--optim", "sgd,adamw", "--sweep-link", "1,2", "--sweep-bucket", "4,25",
                         "--link-gbps", "2", "--bucket-cap-mb", "25", "--out", "x"])
    opts = job.options
    assert job.out_dir == "x" and opts.optimizers == ["sgd", "adamw"]
    points = [(c.bucket_cap_mb, c.link_gbps) for c in configs(opts) if c.optimizer == "sgd"]
    assert points == [(25.0, 2.0), (25.0, 1.0), (4.0, 2.0)]
    defaults = parse_args([])[0].options
    assert (defaults.rounds, defaults.steps_per_round, defaults.warmup) == (5, 5, 3)
    assert defaults.width == 1024 and defaults.depth == 8 and defaults.batch == 32
    with pytest.raises(SystemExit):
        parse_args(["--modes", "post,bogus"])
    assert BenchOptions().modes == list(MODES)
    assert parse_args(["--modes", ",".join(FSDP_MODES)])[0].options.modes == list(FSDP_MODES)
    job, _ = parse_args(["--model", "gpt,mlp", "--tf-width", "768", "--vocab", "50304",
                         "--autocast", "bf16", "--trace-dir", "t", "--overlap-kernel", "fused"])
    o = job.options
    assert (o.models, o.tf_width, o.vocab, o.autocast, o.trace_dir) == (["gpt", "mlp"], 768, 50304, "bf16", "t")
    assert [c.workload.kind for c in configs(o)] == ["gpt", "mlp"]
    assert defaults.autocast == "none" and defaults.trace_dir is None
    for bad in (["--autocast", "fp8"], ["--model", "gpt3"], ["--vocab", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_command_line_writes_report_and_trace(tmp_path):
    out = tmp_path / "out"
    trace = tmp_path / "trace.json"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "overlap_bench.py"), "--nproc", "2",
        "--width", "32", "--depth", "3", "--batch", "4", "--bucket-cap-mb", "0.002",
        "--rounds", "2", "--steps-per-round", "2", "--warmup", "1", "--sweep-link", "50",
        "--out", str(out), "--trace", str(trace), "--trace-steps", "2", "--no-plot",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "round 2/2" in proc.stdout and "overlap/post" in proc.stdout

    result = json.loads((out / "overlap_bench.json").read_text())
    assert result["environment"]["world_size"] == 2
    loopback, linked = result["runs"]
    assert loopback["link_gbps"] is None and linked["link_gbps"] == 50.0
    for run in (loopback, linked):
        assert list(run["modes"]) == list(MODES)
        for m in run["modes"].values():
            if m["status"] == "skipped":
                continue
            assert m["step"]["n"] == 4 and len(m["step_times"]) == 4
            assert m["step"]["p10"] <= m["step"]["median"] <= m["step"]["p90"]
            assert set(m["memory"]) >= {"setup_growth"}
        assert set(run["comparison"]) == {"overlap/post", "overlap/post-fused", "overlap/upstream",
                                          "overlap+clip/post-fused+clip", "overlap+clip/overlap",
                                          "overlap-shard/overlap", "overlap-shard/zero-post",
                                          "overlap-shard/zero-upstream",
                                          "hidden_fraction", "hidden_fraction_vs_fused"}
        assert run["comparison"]["overlap-shard/overlap"] > 0
        assert run["modes"]["zero-upstream"]["status"] == "skipped"
        sh = run["sharding"]
        assert not sh["targets_apply"] and len(sh["targets"]) == 3
        per_rank = {name: run["modes"][name]["memory"]["optimizer_state"] for name in ("overlap", "overlap-shard")}
        assert sum(r["tensors"] for r in per_rank["overlap-shard"]) == per_rank["overlap"][0]["tensors"] > 0
        assert sh["state_ratio"]["overlap-shard/overlap"] <= 0.55
        if run["link_gbps"]:
            busy = {name: run["modes"][name]["link_busy"]["median"] for name in ("floor", "overlap-shard")}
            assert busy["overlap-shard"] == pytest.approx(busy["floor"])
        bw = run["bandwidth"]
        assert bw["triad_gbs"] > 0 and bw["post_fused_step_gbs"] > 0
        assert bw["moved_bytes"] == 5 * 4 * run["params"]  # SGD momentum: p, g, buf read; p, buf written
        assert run["memory"]["per_rank"][0]["peak_rss"] > 0
    assert loopback["modes"]["upstream"]["status"] == "ok"
    assert linked["modes"]["upstream"]["status"] == "skipped"
    assert linked["comparison"]["overlap/upstream"] is None
    table = format_table(result)
    assert "overlap/post" in table and "overlap-shard/overlap" in table and "state per rank" in table
    assert "clipping fires sometimes (overlap+clip policy auto)" in table
    assert loopback["clip"] == {"setting": "sometimes", "policy": "auto"}
    assert "targets (set for 2 Gbit/s link, 4 MB buckets, 2 ranks, adamw" in table
    assert "simulated link busy per step" in table

    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"bucket0/comm", "bucket0/update", "bucket1/comm", "bucket1/update"} <= names


def _run_for_report(shard_ms: float) -> dict:
    def ok(ms: float, tail: float | None = None, state: int = 0) -> dict:
        m = {"status": "ok", "kernel": "k", "step": {"median": ms / 1e3, "p10": ms / 1e3, "p90": ms / 1e3, "iqr": 0.0},
             "link_busy": {"median": 0.134},
             "memory": {"setup_growth": [{"rss": 100 << 20}, {"rss": 90 << 20}],
                        "rss_transient": [5 << 20, 7 << 20],
                        "optimizer_state": [_state(state, 32), _state(state, 32)]}}
        if tail is not None:
            m["tail"] = {"median": tail / 1e3}
        return m

    modes = {"floor": ok(157.0), "overlap": ok(160.0, 1.2, 64 << 20), "zero-post": ok(240.0, None, 32 << 20),
             "overlap-shard": ok(shard_ms, 0.6, 32 << 20)}
    medians = {name: m["step"]["median"] for name, m in modes.items()}
    state = {name: m["memory"]["optimizer_state"] for name, m in modes.items()}
    return {"label": "l", "params": 8_400_000, "optimizer_desc": "AdamW", "link_gbps": 2.0, "modes": modes,
            "comparison": compare(medians), "sharding": sharding("adamw", 4.0, 2.0, 2, medians, state)}


def test_report_prints_targets_and_the_limit_when_one_is_missed():
    met = "\n".join(sharding_lines(_run_for_report(158.0)))
    assert "targets: step overlap-shard/overlap 0.988 <= 1.00 met" in met
    assert "state overlap-shard/overlap 0.500 <= 0.55 met" in met and "limit" not in met
    missed = "\n".join(sharding_lines(_run_for_report(165.0)))
    assert "step overlap-shard/overlap 1.031 <= 1.00 NOT met" in missed
    assert "limit: floor 157.0 ms, p10 157.0" in missed and "overlap-shard - floor 8.0 ms, p10 8.0" in missed
    assert "overlap - floor 3.0 ms" in missed and "134.0 ms/step" in missed
    result = {"environment": {}, "runs": [_run_for_report(165.0)]}
    table = format_table(result)
    assert "NOT met" in table and "simulated link busy per step (ms, median): floor 134.0" in table
    mem = mode_memory(result["runs"][0]["modes"]["overlap-shard"])
    # On CPU the peak is the mode's own resident memory at its peak: set-up growth plus step.
    assert mem == {"state": (32 << 20) + 32, "setup": 100 << 20, "step": 7 << 20, "peak": 107 << 20, "cuda": False}


def _trim_probe() -> None:
    """In a fresh process: heap memory freed behind a live block stays resident until the
    probe hands it back, so set-up growth and block bases count live memory only."""
    import torch as t

    from benchmarks.memory import MemoryProbe, rss_bytes

    if rss_bytes() is None:
        print("no /proc")
        return
    blocks = [t.ones(16 * 1024) for _ in range(1024)]  # 64 KiB each: heap, not mmap
    pin = t.ones(16 * 1024)  # above them all: the heap's top cannot shrink past it
    held = rss_bytes()
    del blocks
    freed = rss_bytes()
    reading = MemoryProbe(t.device("cpu")).now()["rss"]
    print(f"held={held} freed={freed} reading={reading} pin={pin.numel()}")


def test_memory_probe_counts_live_memory_only():
    from benchmarks.memory import trim_heap

    if not trim_heap():
        pytest.skip("the C library has no malloc_trim")
    code = "from tests.test_benchmark import _trim_probe; _trim_probe()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1], check=True).stdout
    if out.startswith("no /proc"):
        pytest.skip("no /proc/self/status")
    fields = dict(kv.split("=") for kv in out.split())
    held, freed, reading = int(fields["held"]), int(fields["freed"]), int(fields["reading"])
    mib = 1 << 20
    assert freed - reading > 32 * mib, out  # the 64 MiB freed leave the reading
    assert held - reading > 32 * mib, out


def test_clip_schedules_and_targets():
    from benchmarks.modes import clip_schedule
    from benchmarks.targets import clipping

    assert [clip_schedule("sometimes", 2.0)(i) < 1 for i in range(8)] == [True, False, False, False] * 2
    assert clip_schedule("always", 2.0)(5) == pytest.approx(2e-3) and clip_schedule("never", 2.0)(0) > 1e20
    with pytest.raises(ValueError, match="clip setting must be one of"):
        clip_schedule("often", 1.0)
    medians = {"overlap": 0.100, "overlap+clip": 0.103, "post-fused+clip": 0.120}
    never = clipping("adamw", 2.0, 2, "never", "auto", medians)["targets"]
    assert [(t["ratio"], t["met"]) for t in never] == [("overlap+clip/overlap", False),
                                                        ("overlap+clip/post-fused+clip", True)]
    assert clipping("adamw", None, 2, "never", "auto", medians)["targets"] == []  # set for the link
    always = clipping("adamw", None, 2, "always", "auto", {**medians, "overlap+clip": 0.125})["targets"]
    assert [(t["ratio"], t["met"]) for t in always] == [("overlap+clip/post-fused+clip", False)]
    assert clipping("sgd", 2.0, 2, "never", "auto", medians)["targets"] == []
