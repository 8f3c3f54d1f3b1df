"""examples/train_ddp.py under torchrun: it trains, matches the post-backward step, and resumes
bit-identically after a rank is killed."""

from __future__ import annotations

import math
import os
import re
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .distributed import loopback_store
from .models import assert_identical

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_ddp.py"
SMALL = ["--width", "32", "--depth", "2", "--batch-size", "16", "--bucket-cap-mb", "0.002"]


def _env() -> dict[str, str]:
    # Not inherited from an enclosing launcher: the example reads these to detect a restart.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "TORCH_ELASTIC_"))}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _launch(cmd: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    """Wait for every launcher; kill them all (and their workers) at the deadline and fail."""
    deadline = time.monotonic() + timeout
    outs: list[str] = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outs.append(out)
    except subprocess.TimeoutExpired:
        for proc in procs:
            # The workers run in sessions of their own: kill them by pid, then the launcher.
            for pid in [*_descendants(proc.pid), proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        logs = "\n".join(f"--- launcher {i} ---\n{p.communicate(timeout=30)[0][-4000:]}" for i, p in enumerate(procs))
        pytest.fail(f"torchrun did not finish within {timeout} s:\n{logs}")
    return [(proc.returncode, out) for proc, out in zip(procs, outs)]


def _torchrun(*args: str, nproc: int = 2, restarts: int = 0) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--max-restarts", str(restarts), "--monitor-interval", "0.1", *args,
    ]


def torchrun(*args: str, cwd: Path, nproc: int = 2, restarts: int = 0, timeout: float = 100,
             script: Path = EXAMPLE) -> str:
    """Run ``script`` (default: the DDP example) on ``nproc`` ranks of one node; return its
    output, failing on a non-zero exit."""
    cmd = _torchrun("--standalone", str(script), *args, nproc=nproc, restarts=restarts)
    ((status, out),) = _finish([_launch(cmd, cwd)], timeout)
    assert status == 0, f"torchrun exited with {status}:\n{out[-6000:]}"
    return out


def torchrun_nodes(*args: str, cwd: Path, nnodes: int = 2, timeout: float = 100,
                   script: Path = EXAMPLE) -> list[tuple[int, str]]:
    """Run the example as ``nnodes`` nodes of one rank each, one torchrun per node, on this machine;
    return each launcher's (exit status, output).

    The c10d rendezvous store is served by this process, as by a dedicated host in a cluster, so
    that a node that dies does not take the rendezvous with it: the other node's launcher then
    always reports its own rank's failure.
    """
    store = loopback_store()
    try:
        procs = [
            _launch(_torchrun("--nnodes", str(nnodes), "--node-rank", str(i), "--rdzv-backend", "c10d",
                              "--rdzv-endpoint", f"127.0.0.1:{store.port}", "--rdzv-conf", "is_host=false",
                              "--rdzv-id", "test", str(script), *args, nproc=1), cwd)
            for i in range(nnodes)
        ]
        return _finish(procs, timeout)
    finally:
        del store


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
    # Within rounding: the example leaves AdamW's kernel to torch, so the overlapped update runs
    # the fused kernel and the post-backward step the multi-tensor one.
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


# -- several nodes, other world sizes, and ranks that die or stall ------------------------------


@pytest.mark.timeout(220)  # may include the shared overlapped run
def test_two_nodes_of_one_rank_train_bit_identical_to_one_node_of_two(overlap_run, tmp_path):
    launches = torchrun_nodes(*COMMON, "--mode", "overlap", "--save-final", "nodes.pt", cwd=tmp_path)
    for status, out in launches:
        assert status == 0, out[-6000:]
    (out,) = [out for _, out in launches if "summary:" in out]  # the node that got rank 0
    assert "| 2 ranks on cpu |" in out, out[-4000:]
    one_node = torch.load(overlap_run[1], weights_only=True)
    two_nodes = torch.load(tmp_path / "nodes.pt", weights_only=True)
    assert two_nodes["step"] == 8
    assert_identical(two_nodes, one_node)


def _resume(nproc: int, mode: str, checkpoint: Path, cwd: Path) -> tuple[str, dict]:
    """Resume ``checkpoint`` (the only one in a fresh directory) on ``nproc`` ranks to step 10."""
    directory = cwd / f"{mode}-{nproc}"
    directory.mkdir()
    shutil.copy(checkpoint, directory / checkpoint.name)
    final = cwd / f"{mode}-{nproc}.pt"
    out = torchrun(*RESUME, "--mode", mode, "--checkpoint-dir", str(directory), "--save-final",
                   str(final), nproc=nproc, cwd=cwd)
    return out, torch.load(final, weights_only=True)


RESUME = ["--steps", "10", "--log-every", "5", "--optimizer", "adamw", *SMALL]


@pytest.mark.timeout(300)
def test_a_checkpoint_of_two_ranks_resumes_on_three_and_on_one(tmp_path):
    # Every rank holds the whole (replicated) optimizer state, so a checkpoint written by two
    # ranks loads as it is on any number of ranks: nothing to re-shard. Each world size then
    # trains on as post-backward training does from the same checkpoint.
    torchrun(*RESUME, "--checkpoint-every", "5", "--checkpoint-dir", "two", cwd=tmp_path)
    checkpoint = tmp_path / "two" / "ckpt-00000005.pt"
    saved = torch.load(checkpoint, weights_only=True)
    for nproc in (3, 1):
        out, final = _resume(nproc, "overlap", checkpoint, tmp_path)
        assert "resumed from step 5" in out and f"| {nproc} ranks on cpu |" in out, out[-4000:]
        assert final["step"] == 10
        _, post = _resume(nproc, "post", checkpoint, tmp_path)
        for name, value in final["model"].items():
            assert torch.isfinite(value).all(), name
            assert not torch.equal(value, saved["model"][name]), f"{name} did not train after resuming"
            # Within rounding: unpinned AdamW runs torch's fused kernel in the overlapped update
            # and its multi-tensor kernel after backward; with 3 ranks DDP also averages before
            # summing and the overlap after, which rounds differently when dividing by 3.
            torch.testing.assert_close(value, post["model"][name], rtol=1e-5, atol=1e-6, msg=name)
        assert final["optimizer"]["param_groups"] == post["optimizer"]["param_groups"]


FAULT = ["--steps", "8", "--log-every", "4", "--pg-timeout", "4", *SMALL]
PEER_GONE = re.compile(r"Connection (reset|closed) by peer")


def _errors(out: str) -> str:
    """The lines of a launcher's output that say what failed, for assertion messages."""
    return "\n".join(line[-300:] for line in out.splitlines() if re.search(r"Error|Timed out|exitcode|SIG", line))


def _fault(flag: str, said: str, cwd: Path) -> tuple[str, str]:
    """Two nodes of one rank, rank 1 faulted by ``flag`` before step 2 (it prints ``said``); the
    faulty node's output and the survivor's, once both launchers have failed."""
    launches = torchrun_nodes(*FAULT, flag, "2", cwd=cwd)
    (faulty,) = [out for _, out in launches if said in out]
    (survivor,) = [out for _, out in launches if out is not faulty]
    assert all(status != 0 for status, _ in launches), launches
    return faulty, survivor


@pytest.mark.timeout(150)
def test_a_rank_that_dies_fails_the_other_node_with_a_clear_error(tmp_path):
    killed, survivor = _fault("--crash-at-step", "rank 1: crashing (SIGKILL) before step 2", tmp_path)
    # The survivor's backward() raises the communication error at once, and its rank exits with 1.
    assert re.search(r"RuntimeError: .*" + PEER_GONE.pattern, survivor), _errors(survivor)
    assert re.search(r"exitcode\s*: 1 ", survivor), _errors(survivor)
    assert re.search(r"exitcode\s*: -9 ", killed), _errors(killed)
    assert "SIGABRT" not in survivor + killed, _errors(survivor + killed)


@pytest.mark.timeout(150)
def test_a_rank_that_stalls_fails_the_other_node_at_the_process_group_timeout(tmp_path):
    stalled, survivor = _fault("--stall-at-step", "rank 1: stalling before step 2", tmp_path)
    # The collective the survivor waits in fails at --pg-timeout (4 s), and the rank exits with
    # 1. Gloo names the timeout in the collective that times out first; others still in flight
    # then fail with the pair it closed, and backward() raises whichever DDP waits for first.
    # The stalled node ends too: its rank, once it resumes, finds its peer gone and exits with
    # 1. Nothing aborts, nothing hangs.
    assert re.search(r"RuntimeError: .*(Timed out waiting 4000ms|Application timeout caused pair closure)",
                     survivor), _errors(survivor)
    assert re.search(r"exitcode\s*: 1 ", survivor) and "SIGABRT" not in survivor, _errors(survivor)
    assert re.search(r"RuntimeError: .*" + PEER_GONE.pattern, stalled), _errors(stalled)
    assert re.search(r"exitcode\s*: 1 ", stalled) and "SIGABRT" not in stalled, _errors(stalled)


# -- sharded optimizer state --------------------------------------------------------------------


@pytest.mark.timeout(400)
def test_sharded_example_resumes_bit_identical_after_a_crash_and_on_three_ranks(tmp_path):
    # --shard: each rank writes its share of the optimizer state into a checkpoint directory. A
    # killed rank's job resumes from it and ends bit-identical to one that never crashed; and the
    # same checkpoint resumes on three ranks, sharded again, as post-backward training does.
    # Global-norm clipping too: its policy state travels in the checkpoint, so the resumed run
    # speculates or defers as the uninterrupted one does.
    args = ["--shard", "--steps", "10", "--checkpoint-every", "5", "--log-every", "5", "--optimizer", "adamw",
            "--clip", "0.5", *SMALL]
    crashed = torchrun(*args, "--crash-at-step", "7", "--checkpoint-dir", "D1", "--save-final", "F1",
                       restarts=1, cwd=tmp_path, timeout=150)
    assert "resumed from step 5 (restart attempt 1)" in crashed, crashed[-4000:]
    assert sorted(p.name for p in (tmp_path / "D1").iterdir()) == ["ckpt-00000005.dcp", "ckpt-00000010.dcp"]
    torchrun(*args, "--checkpoint-dir", "D2", "--save-final", "F2", cwd=tmp_path, timeout=100)
    f1 = torch.load(tmp_path / "F1", weights_only=True)
    assert f1["step"] == 10
    assert_identical(f1, torch.load(tmp_path / "F2", weights_only=True))

    results = {}
    for mode, extra in (("overlap", ["--shard"]), ("post", [])):
        directory = tmp_path / f"three-{mode}"
        shutil.copytree(tmp_path / "D1" / "ckpt-00000005.dcp", directory / "ckpt-00000005.dcp")
        out = torchrun(*RESUME, "--mode", mode, *extra, "--clip", "0.5", "--checkpoint-dir", str(directory),
                       "--save-final", f"three-{mode}.pt", nproc=3, cwd=tmp_path, timeout=120)
        assert "resumed from step 5" in out and "| 3 ranks on cpu |" in out, out[-4000:]
        results[mode] = torch.load(tmp_path / f"three-{mode}.pt", weights_only=True)
    for name, value in results["overlap"]["model"].items():
        assert torch.isfinite(value).all(), name
        # Within rounding: with 3 ranks DDP averages before summing and the sharded update after,
        # unpinned AdamW runs the fused kernel in the update, the multi-tensor one after backward,
        # and a clipped step is corrected after its update (Adam's m / sqrt(v) amplifies the
        # correction's last bits where a gradient element is near zero).
        torch.testing.assert_close(value, results["post"]["model"][name], rtol=1e-4, atol=5e-5, msg=name)
