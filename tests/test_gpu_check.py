"""Tests of tools/gpu_check.sh without a GPU: its dry run, its arguments, and its whole pipeline
at tiny sizes on CPU (``--device cpu``), including a failing and a hanging test part."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_report import TARGETS, _targets
from benchmarks.modes import MODES
from benchmarks.overlap_bench import parse_args

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
        if line.startswith("[") and "/5] " in line:
            name, command = line.split("] ", 1)[1].split(":", 1)
            out[name.strip()] = shlex.split(command)
    return out


def test_dry_run_prints_each_part_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    proc = _run("--dry-run", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cmds = _commands(proc.stdout)
    assert list(cmds) == ["env", "tests", "bench-gpt", "bench-mlp", "report"]
    assert not out.exists(), "a dry run creates nothing"
    assert cmds["env"][1:] == ["-m", "benchmarks.gpu_report", "probe", "--device", "cuda"]
    assert cmds["tests"][1:5] == ["-m", "pytest", "tests/test_cuda.py", "-v"]
    assert not any("addopts" in a or "soak" in a for a in cmds["tests"])
    assert ("not found" in proc.stdout) == (not (ROOT / "tests" / "test_cuda.py").exists())
    assert cmds["report"][1:] == ["-m", "benchmarks.gpu_report", "summary", str(out)]
    assert "PYTHONPATH=" + str(ROOT) in proc.stdout

    # The benchmark commands are valid command lines of the benchmark, with the check's settings.
    gpt, mlp = (cmds[k] for k in ("bench-gpt", "bench-mlp"))
    assert gpt[1:3] == mlp[1:3] == ["-m", "benchmarks.overlap_bench"]
    g, _ = parse_args(gpt[3:])
    m, a = parse_args(mlp[3:])
    assert a.device == "cuda" and a.nproc == 1
    for job in (g, m):
        o = job.options
        assert (o.device, o.autocast, o.overlap_kernel) == ("cuda", "bf16", "fused")
        assert o.optimizers == ["sgd", "adamw"] and o.modes == list(MODES)
        assert o.trace_dir == str(out / "traces") and o.trace_steps >= 1
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
    assert _parts(out) == {"env": "ok", "tests": "failed", "bench-gpt": "ok", "bench-mlp": "ok",
                           "report": "ok"}
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
        assert set(r["median_s"]) == set(MODES)
        assert all(v is not None and v > 0 for v in r["median_s"].values()), r["skipped"]
        assert r["comparison"]["overlap/post-fused"] == pytest.approx(
            r["median_s"]["overlap"] / r["median_s"]["post-fused"])
        assert r["overlap_kernel_option"] == "fused" and r["kernels"]["overlap"] == "bucket fused"
        assert Path(r["trace"]).exists() and "no GPU kernel events" in r["trace_note"]
    assert [(t["workload"], t["optimizer"], t["metric"]) for t in summary["targets"]] == [
        (w, o, k) for w, o, k, _, _ in TARGETS]
    assert all(t["value"] is not None for t in summary["targets"])
    assert summary["environment"]["autocast"] == "bf16"
    assert "target (gpt, adamw): overlap/post-fused" in proc.stdout
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
