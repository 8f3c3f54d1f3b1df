"""examples/train_ddp.py under torchrun: it trains, matches the post-backward step, and resumes
bit-identically after a rank is killed."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .models import assert_identical

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_ddp.py"
SMALL = ["--width", "32", "--depth", "2", "--batch-size", "16", "--bucket-cap-mb", "0.002"]


def torchrun(*args: str, cwd: Path, restarts: int = 0, timeout: float = 100, script: Path = EXAMPLE) -> str:
    """Run ``script`` (default: the DDP example) on 2 ranks; return its combined output,
    failing on a non-zero exit."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "--max-restarts", str(restarts), "--monitor-interval", "0.1", str(script), *args,
    ]
    # Not inherited from an enclosing launcher: the example reads these to detect a restart.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "TORCH_ELASTIC_"))}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # The workers run in sessions of their own: kill them by pid, then the launcher.
        for pid in [*_descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"torchrun did not finish within {timeout} s:\n{out[-6000:]}")
    assert proc.returncode == 0, f"torchrun exited with {proc.returncode}:\n{out[-6000:]}"
    return out


def _descendants(pid: int) -> list[int]:
    """Child processes of ``pid``, recursively (Linux /proc; empty elsewhere)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found


def summary(out: str) -> dict[str, str]:
    lines = [line for line in out.splitlines() if line.startswith("summary:")]
    assert len(lines) == 1, out[-4000:]
    patterns = {
        "mode": r"^summary: mode (\w+)",
        "optimizer": r"\| optimizer (\w+)",
        "mean step": r"\| mean step (\S+) ms",
        "final loss": r"\| final loss (\S+)$",
    }
    fields = {}
    for key, pattern in patterns.items():
        m = re.search(pattern, lines[0])
        assert m, f"no {key!r} in {lines[0]!r}"
        fields[key] = m.group(1)
    return fields


# One overlapped AdamW run serves the first two tests (each torchrun launch costs seconds).
COMMON = ["--steps", "8", "--optimizer", "adamw", "--schedule", "step", "--log-every", "4", "--warmup", "2", *SMALL]


@pytest.fixture(scope="module")
def overlap_run(tmp_path_factory) -> tuple[str, Path]:
    cwd = tmp_path_factory.mktemp("overlap")
    return torchrun(*COMMON, "--mode", "overlap", "--save-final", "final.pt", cwd=cwd), cwd / "final.pt"


@pytest.mark.timeout(120)
def test_short_overlapped_run_prints_progress_and_summary(overlap_run):
    out, _ = overlap_run
    assert re.search(r"^step +4 \| loss [\d.]+ \| lr [\d.e+-]+ \| +[\d.]+ ms$", out, re.M), out
    fields = summary(out)
    assert fields["mode"] == "overlap" and fields["optimizer"] == "adamw"
    assert float(fields["mean step"]) > 0
    assert math.isfinite(float(fields["final loss"]))
    assert "over 6 steps after 2 warm-up" in out


@pytest.mark.timeout(220)  # may include the shared overlapped run
def test_overlap_and_post_backward_step_train_alike(overlap_run, tmp_path):
    out_post = torchrun(*COMMON, "--mode", "post", "--save-final", "post.pt", cwd=tmp_path)
    assert summary(out_post)["mode"] == "post"

    overlap = torch.load(overlap_run[1], weights_only=True)
    post = torch.load(tmp_path / "post.pt", weights_only=True)
    assert overlap["step"] == post["step"] == 8
    assert overlap["model"].keys() == post["model"].keys()
    for name, value in overlap["model"].items():
        torch.testing.assert_close(value, post["model"][name], rtol=1e-5, atol=1e-6, msg=name)
    assert overlap["optimizer"]["state"].keys() == post["optimizer"]["state"].keys()
    for index, state in overlap["optimizer"]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(value, post["optimizer"]["state"][index][key], rtol=1e-5, atol=1e-6)
    assert overlap["optimizer"]["param_groups"] == post["optimizer"]["param_groups"]


@pytest.mark.timeout(240)
def test_killed_rank_resumes_bit_identical(tmp_path):
    args = ["--steps", "30", "--checkpoint-every", "5"]
    crashed = torchrun(
        *args, "--crash-at-step", "17", "--checkpoint-dir", "D1", "--save-final", "F1",
        restarts=1, cwd=tmp_path, timeout=150,
    )
    assert "rank 1: crashing (SIGKILL) before step 17" in crashed
    assert "resumed from step 15 (restart attempt 1)" in crashed, crashed[-4000:]
    assert sorted(p.name for p in (tmp_path / "D1").iterdir()) == [
        f"ckpt-{s:08d}.pt" for s in (5, 10, 15, 20, 25, 30)
    ]

    torchrun(*args, "--checkpoint-dir", "D2", "--save-final", "F2", cwd=tmp_path, timeout=80)
    f1 = torch.load(tmp_path / "F1", weights_only=True)
    f2 = torch.load(tmp_path / "F2", weights_only=True)
    assert f1["step"] == 30
    assert_identical(f1, f2)
