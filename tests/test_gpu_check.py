"""Tests of tools/gpu_check.sh without a GPU: its dry run, its arguments, and its whole pipeline
at tiny sizes on CPU (``--device cpu``), including a failing and a hanging test part."""

from __future__ import annotations

import json
import re
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_report import TARGETS, _targets
from benchmarks.modes import ALL_MODES
from benchmarks.overlap_bench import parse_args
from benchmarks.stats import compare

#: The modes tools/gpu_check.sh runs (one GPU: the sharded modes need two ranks or more).
GPU_CHECK_MODES = ["floor", "post", "post-fused", "upstream", "overlap"]
#: The GPT part also runs the global-norm clipping modes.
CLIP_MODES = ["post-fused+clip", "overlap+clip"]
#: The MLP part also runs FSDP2, post-backward and overlapped (world size 1 works).
FSDP_CHECK_MODES = ["fsdp-post-fused", "fsdp-overlap"]

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    full.update(env or {})
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=full, cwd=ROOT)


def _commands(stdout: str) -> dict[str, list[str]]:
    out = {}
    for line in stdout.splitlines():
        if line.startswith("[") and "/6] " in line:
            name, command = line.split("] ", 1)[1].split(":", 1)
            out[name.strip()] = shlex.split(command)
    return out


def test_dry_run_prints_each_part_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    proc = _run("--dry-run", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cmds = _commands(proc.stdout)
    assert list(cmds) == ["env", "tests", "sanitizer", "bench-gpt", "bench-mlp", "report"]
    assert not out.exists(), "a dry run creates nothing"
    assert cmds["env"][1:] == ["-m", "benchmarks.gpu_report", "probe", "--device", "cuda"]
    assert cmds["tests"][1:4] == ["-m", "pytest", "tests/test_cuda.py"]
    assert "tests/test_dcp.py::test_cuda_state_saves_and_loads_on_nccl" in cmds["tests"]
    assert not any("addopts" in a or "soak" in a for a in cmds["tests"])
    # The sanitizer part runs the stream-ordering tests of the same file under CSAN.
    sanitizer = cmds["sanitizer"]
    assert sanitizer[:2] == ["env", "TORCH_CUDA_SANITIZER=1"] and sanitizer[3:6] == ["-m", "pytest", "tests/test_cuda.py"]
    selected = sanitizer[sanitizer.index("-k") + 1]
    assert "race_detectors_on_nccl" in selected and "streams_of_their_own" in selected
    # Every part's limit together, with the 3 s of grace each gets, stays under 7 minutes.
    limits = re.search(r"\((\d+) s in all\)", proc.stdout)
    assert limits and int(limits.group(1)) + 3 * len(cmds) < 420, proc.stdout
    assert ("not found" in proc.stdout) == (not (ROOT / "tests" / "test_cuda.py").exists())
    assert cmds["report"][1:] == ["-m", "benchmarks.gpu_report", "summary", str(out)]
    assert "PYTHONPATH=" + str(ROOT) in proc.stdout

    # The benchmark commands are valid command lines of the benchmark, with the check's settings.
    gpt, mlp = (cmds[k] for k in ("bench-gpt", "bench-mlp"))
    assert gpt[1:3] == mlp[1:3] == ["-m", "benchmarks.overlap_bench"]
    g, _ = parse_args(gpt[3:])
    m, a = parse_args(mlp[3:])
    assert a.device == "cuda" and a.nproc == 1
    for job, modes in ((g, GPU_CHECK_MODES + CLIP_MODES), (m, GPU_CHECK_MODES + FSDP_CHECK_MODES)):
        o = job.options
        assert (o.device, o.autocast, o.overlap_kernel) == ("cuda", "bf16", "fused")
        assert o.optimizers == ["sgd", "adamw"] and o.modes == modes == [n for n in ALL_MODES if n in o.modes]
        assert o.trace_dir == str(out / "traces") and o.trace_steps >= 1
    assert g.options.clip == "sometimes"
    o = g.options
    assert (o.models, o.tf_width, o.tf_depth, o.tf_heads, o.seq_len, o.vocab) == (
        ["gpt"], 768, 12, 12, 1024, 50304)
    assert g.out_dir == str(out / "bench-gpt")
    assert (m.options.models, m.options.width, m.options.depth) == (["mlp"], 4096, 32)


def test_dry_run_default_outdir_and_bad_arguments():
    proc = _run("--dry-run")
    assert proc.returncode == 0
    assert _commands(proc.stdout)["report"][-1] == str(ROOT / "gpu-check-out")
    for args in (["--bogus"], ["--device", "tpu", "--dry-run"], ["--dry-run", "a", "b"]):
        proc = _run(*args)
        assert proc.returncode == 2, args
        assert "gpu_check:" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU this would run the whole check")
def test_without_a_gpu_the_check_stops_after_the_probe(tmp_path):
    out = tmp_path / "out"
    proc = _run(str(out), env={"PYTHON": sys.executable})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "CUDA available: False" in proc.stdout and "stopping: no usable CUDA device" in proc.stdout
    assert _parts(out) == {"env": "failed"}
    assert not (out / "bench-gpt").exists() and "CUDA available: False" in (out / "gpu_check.log").read_text()


def _pipeline(tmp_path: Path, test_body: str, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    tests = tmp_path / "test_fake_cuda.py"
    tests.write_text(test_body)
    out = tmp_path / "out"
    proc = _run("--device", "cpu", str(out), timeout=240,
                env={"PYTHON": sys.executable, "GPU_CHECK_TESTS": str(tests), **env})
    return proc, out


def _parts(out: Path) -> dict[str, str]:
    return {line.split("\t")[0]: line.split("\t")[1] for line in (out / "parts.tsv").read_text().splitlines()}


def test_cpu_pipeline_reports_failed_tests_and_still_benchmarks(tmp_path):
    proc, out = _pipeline(tmp_path, "def test_ok():\n    assert 1 + 1 == 2\n\n"
                                    "def test_broken():\n    assert 1 + 1 == 3\n")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _parts(out) == {"env": "ok", "tests": "failed", "sanitizer": "skipped", "bench-gpt": "ok",
                           "bench-mlp": "ok", "report": "ok"}
    log = (out / "gpu_check.log").read_text()
    assert "test_ok PASSED" in log and "test_broken FAILED" in log
    assert "FAILED: tests failed" in proc.stdout

    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["tests"]["passed"] == 1 and summary["tests"]["failures"] == 1
    assert [f.split("::")[-1] for f in summary["tests"]["failed"]] == ["test_broken"]
    runs = summary["runs"]
    assert [(r["kind"], r["optimizer"]) for r in runs] == [
        ("gpt", "sgd"), ("gpt", "adamw"), ("mlp", "sgd"), ("mlp", "adamw")]
    for r in runs:
        assert set(r["median_s"]) == set(GPU_CHECK_MODES + (CLIP_MODES if r["kind"] == "gpt" else FSDP_CHECK_MODES))
        assert all(v is not None and v > 0 for v in r["median_s"].values()), r["skipped"]
        assert r["comparison"]["overlap/post-fused"] == pytest.approx(
            r["median_s"]["overlap"] / r["median_s"]["post-fused"])
        assert r["overlap_kernel_option"] == "fused" and r["kernels"]["overlap"] == "bucket fused"
        assert Path(r["trace"]).exists() and "no GPU kernel events" in r["trace_note"]
    assert [(t["workload"], t["optimizer"], t["metric"]) for t in summary["targets"]] == [
        (w, o, k) for w, o, k, _, _ in TARGETS]
    # Each target reads the (gpt, adamw) row's ratios, recomputed here from its medians. The hidden
    # fraction is None when post-fused does not measure slower than the floor, which tiny CPU
    # workloads allow; the ratio always exists.
    expected = compare(runs[1]["median_s"])
    for t in summary["targets"]:
        want = expected[t["metric"]]
        if want is None:
            assert t["value"] is None and t["met"] is None, t
        else:
            assert t["value"] == pytest.approx(want), t
            assert t["met"] == (want <= t["bound"] if t["op"] == "<=" else want >= t["bound"]), t
    assert summary["targets"][0]["value"] is not None
    assert summary["environment"]["autocast"] == "bf16"
    assert "target (gpt, adamw): overlap/post-fused" in proc.stdout
    assert "FSDP2 mlp 4x64 adamw: fsdp-post-fused" in proc.stdout and "fsdp-overlap/fsdp-post-fused" in proc.stdout
    assert "built with fused=True" in proc.stdout


def test_a_hung_part_is_stopped_at_its_limit_and_the_rest_runs(tmp_path):
    proc, out = _pipeline(tmp_path, "import time\n\ndef test_hangs():\n    time.sleep(120)\n",
                          GPU_CHECK_TIMEOUT_TESTS="5")
    assert proc.returncode == 1
    parts = _parts(out)
    assert parts["tests"] == "timeout"
    assert parts["bench-gpt"] == parts["bench-mlp"] == parts["report"] == "ok"
    assert (out / "gpu_check.json").exists()


def test_targets_are_judged_against_their_bounds():
    def row(kind: str, optimizer: str, ratio: float, hidden: float) -> dict:
        return {"kind": kind, "optimizer": optimizer,
                "comparison": {"overlap/post-fused": ratio, "hidden_fraction_vs_fused": hidden}}

    met = _targets([row("mlp", "adamw", 2.0, -1.0), row("gpt", "adamw", 0.97, 0.7)])
    assert [(t["value"], t["met"]) for t in met] == [(0.97, True), (0.7, True)]
    missed = _targets([row("gpt", "adamw", 0.98, 0.69)])
    assert [t["met"] for t in missed] == [False, False]
    assert [t["met"] for t in _targets([row("gpt", "sgd", 0.5, 0.9)])] == [None, None]


def _cuda_like_result(trace_path: Path) -> dict:
    """A benchmark result shaped like a CUDA run's (CUDA memory, a skipped mode, a kernel trace)."""
    from benchmarks.stats import compare, summarize
    from benchmarks.stream_overlap import analyze, load_trace

    medians = {"floor": 0.097, "post": 0.130, "post-fused": 0.120, "overlap": 0.1037}
    modes: dict = {}
    for name in GPU_CHECK_MODES:
        if name not in medians:
            modes[name] = {"status": "skipped", "reason": "_register_fused_optim failed: no"}
            continue
        times = [medians[name] * f for f in (0.99, 1.0, 1.01)]
        modes[name] = {"status": "ok", "kernel": "fused", "step": summarize(times), "step_times": times,
                       "memory": {"setup_growth": [{"rss": 0, "cuda": 512 * 2**20}], "rss_transient": [0],
                                  "cuda_transient": [256 * 2**20], "cuda_peak": [4 * 2**30]}}
    run = {"label": "gpt 12x768 h12 seq1024 vocab50304 | adamw | bucket 25 MB | loopback",
           "workload": {"kind": "gpt", "width": 768, "depth": 12, "batch": 8, "heads": 12,
                        "seq_len": 1024, "vocab": 50304},
           "params": 124475904, "optimizer": "adamw", "optimizer_desc": "AdamW(lr=0.001)",
           "post_fused_kernel": "fused", "modes": modes, "comparison": compare(medians), "bandwidth": {},
           "memory": {"per_rank": [{"peak_rss": 2**30, "rss": 2**30, "cuda_max_allocated": 2**32}]},
           "trace": {"path": str(trace_path), "steps": 3, "streams": analyze(load_trace(trace_path))}}
    env = {"world_size": 1, "backend": "nccl", "device": "cuda:0", "torch": "2.11.0+cu130",
           "cuda_device": "NVIDIA H200", "cuda_runtime": "13.0", "timing": "CUDA events",
           "autocast": "bf16", "threads_per_rank": 1}
    return {"environment": env, "options": {"overlap_kernel": "fused"}, "runs": [run]}


def test_summary_of_a_cuda_shaped_run(tmp_path):
    from benchmarks.gpu_report import collect, format_summary
    from benchmarks.report import format_table
    from tests.test_stream_overlap import _three_steps

    trace_path = tmp_path / "traces" / "gpt.json"
    trace_path.parent.mkdir()
    trace_path.write_text(json.dumps(_three_steps()))
    result = _cuda_like_result(trace_path)
    (tmp_path / "bench-gpt").mkdir()
    (tmp_path / "bench-gpt" / "overlap_bench.json").write_text(json.dumps(result))
    (tmp_path / "parts.tsv").write_text("env\tok\t0\t3.2\t25\ntests\tpassed\t0\t80.5\t140\n")

    table = format_table(result)
    assert "NVIDIA H200, CUDA 13.0; steps timed with CUDA events" in table
    assert "peak MB" in table and "memory: CUDA allocator" in table
    assert "beside default-stream kernels; tail after backward's last kernel 0.10 ms" in table

    summary = collect(tmp_path)
    assert [p["status"] for p in summary["parts"]] == ["ok", "passed"]
    text = format_summary(summary)
    assert "NVIDIA H200, torch 2.11.0+cu130" in text and "tests passed 80.5 s" in text
    row = next(line for line in text.splitlines() if line.startswith("gpt 12x768"))
    assert "skip" in row and " 0.864 " in row and " 0.71 " in row and "62%" in row  # ov/pf, hid(pf)
    assert "gpt 12x768 adamw (CUDA): floor 512+256" in text
    assert "skipped: gpt 12x768 adamw upstream: _register_fused_optim failed: no" in text
    assert [t["met"] for t in summary["targets"]] == [True, True]
    assert text.count(": met") == 2


def test_the_probe_reports_missing_imports_and_stops_only_for_required_ones(monkeypatch, capsys):
    from benchmarks import gpu_report

    # An optional module missing (no plots): the check goes on.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "numpy", None)
    assert gpu_report.probe("cpu") == 0
    out = capsys.readouterr().out
    assert "missing: matplotlib" in out and "no plots" in out and "missing: numpy" in out
    # The measurement does not need numpy: the statistics are plain Python.
    from benchmarks.stats import percentile, summarize

    assert percentile([4.0, 1.0, 3.0, 2.0], 25) == 1.75 and summarize([1.0, 2.0, 3.0])["median"] == 2.0
    # A required one missing: the probe fails (the check then stops after its env part).
    monkeypatch.setitem(sys.modules, "pytest_timeout", None)
    monkeypatch.setitem(sys.modules, "pytest", None)
    assert gpu_report.probe("cpu") == 4
    assert "missing: pytest (" in capsys.readouterr().err
