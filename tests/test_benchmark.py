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

from benchmarks.link import SimulatedLink
from benchmarks.modes import MODES, ModeContext, build_mode
from benchmarks.overlap_bench import parse_args
from benchmarks.report import format_table
from benchmarks.runner import BenchOptions, configs
from benchmarks.stats import compare, hidden_fraction, ratio, step_max, summarize
from benchmarks.workloads import Workload, build_model, make_batch
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
        assert not held.done(), "the link let a landed bucket through without holding it"
        out = held.wait()
        elapsed = time.perf_counter() - t0
        assert out.item() == 3.0
        assert elapsed >= 0.095  # a lower bound only: a loaded machine may hold it longer
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
        a.add_done_callback(lambda _: finished.setdefault("a", time.perf_counter() - t0))
        b.add_done_callback(lambda _: finished.setdefault("b", time.perf_counter() - t0))
        b.wait()
        a.wait()
        # One link: the second bucket starts its 0.1 s only once the first has finished.
        assert finished["a"] >= 0.095
        assert finished["b"] >= 0.195 and finished["b"] - finished["a"] >= 0.095
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
    spec = Workload("mlp", width=16, depth=3, batch=4)
    base = build_model(spec, seed=1)
    link = SimulatedLink(link_gbps) if link_gbps else None
    ctx = ModeContext(
        base=base, device=torch.device("cpu"), optimizer=optimizer, bucket_cap_mb=0.001,
        link=link, fast_kernel={"fused": True},
    )
    x, y = make_batch(spec, rank, torch.device("cpu"))
    out: dict = {"init": _flat(base)}
    for name in MODES:
        mode = build_mode(name, ctx)
        if not mode.active:
            out[name] = mode.skipped
            continue
        for _ in range(3):
            rec = mode.step(x, y)
            assert rec.total > 0 and rec.backward > 0
        if name.startswith("post"):
            assert all(r.opt_step is not None for r in mode.records)
        if name == "overlap":
            assert all(r.update_busy is not None and r.update_busy > 0 for r in mode.records)
        out[name] = _flat(mode.model.module)
        mode.close()
    if link is not None:
        assert link.bytes_carried > 0
        link.close()
    return out


def _modes_body(rank: int, world: int) -> list[dict]:
    return [
        _train_modes(rank, world, "sgd", None),
        _train_modes(rank, world, "adamw", None),
        _train_modes(rank, world, "sgd", 20.0),
    ]


def test_modes_train_alike():
    results = run_distributed(_modes_body, 2, timeout=120)
    for rank_results in results:
        for i, r in enumerate(rank_results):
            t = {k: torch.tensor(v) for k, v in r.items() if isinstance(v, list)}
            assert torch.equal(t["floor"], t["init"]), "floor has no optimizer"
            assert not torch.allclose(t["post"], t["init"]), "post did not train"
            for name in ("post-fused", "overlap") + (("upstream",) if i < 2 else ()):
                torch.testing.assert_close(t[name], t["post"], rtol=1e-5, atol=1e-6, msg=name)
        assert "simulated link" in rank_results[2]["upstream"]
    assert results[0][0]["overlap"] == results[1][0]["overlap"]


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
                                          "hidden_fraction", "hidden_fraction_vs_fused"}
        bw = run["bandwidth"]
        assert bw["triad_gbs"] > 0 and bw["post_fused_step_gbs"] > 0
        assert bw["moved_bytes"] == 5 * 4 * run["params"]  # SGD momentum: p, g, buf read; p, buf written
        assert run["memory"]["per_rank"][0]["peak_rss"] > 0
    assert loopback["modes"]["upstream"]["status"] == "ok"
    assert linked["modes"]["upstream"]["status"] == "skipped"
    assert linked["comparison"]["overlap/upstream"] is None
    assert "overlap/post" in format_table(result)

    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"bucket0/comm", "bucket0/update", "bucket1/comm", "bucket1/update"} <= names
