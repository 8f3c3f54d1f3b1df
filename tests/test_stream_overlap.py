"""Tests of the profiler-trace analysis (benchmarks.stream_overlap) on synthetic CUDA traces.

The synthetic traces follow what torch.profiler's Chrome export writes on a GPU (kineto's format,
torch 2.9 to 2.13): kernels with ``"cat": "kernel"``, ``args.stream`` and ``args.correlation``,
the launching ``cudaLaunchKernel`` on the CPU thread with the same correlation, and
``record_function`` ranges as ``user_annotation`` events, mixed with the other events such a
trace holds (metadata, flows, memcpy, GPU-side annotations, the profiler's own span).
"""

from __future__ import annotations

import copy
import gzip
import json
import random

import pytest
import torch

from benchmarks.stream_overlap import analyze, intersect, kernels, load_trace, total, union

PID = 4242
MAIN_THREAD = 4242  # the Python thread: forward, the step ranges
AUTOGRAD_THREAD = 4250  # the autograd device thread: backward, the comm hook, the updates
MAIN, SIDE, NCCL = 7, 20, 28


class _Trace:
    """Builds a kineto-style Chrome trace; times in microseconds."""

    def __init__(self) -> None:
        self.corr = 100
        self.events: list[dict] = [
            {"ph": "M", "name": "process_name", "ts": 0.0, "pid": PID, "tid": 0, "args": {"name": "python"}},
            {"ph": "M", "name": "thread_name", "ts": 0.0, "pid": 0, "tid": MAIN,
             "args": {"name": f"stream {MAIN}"}},
            {"ph": "X", "cat": "Trace", "name": "PyTorch Profiler (0)", "pid": "Spans",
             "tid": "PyTorch Profiler", "ts": 0.0, "dur": 5000.0, "args": {"Op count": 0}},
        ]

    def annotation(self, name: str, thread: int, ts: float, dur: float) -> None:
        self.events.append({"ph": "X", "cat": "user_annotation", "name": name, "pid": PID,
                            "tid": thread, "ts": ts, "dur": dur,
                            "args": {"External id": self.corr, "Record function id": 0}})

    def kernel(self, name: str, stream: int, launch: float, thread: int, start: float, end: float) -> None:
        self.corr += 1
        self.events.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "pid": PID,
                            "tid": thread, "ts": launch, "dur": 2.5,
                            "args": {"cbid": 211, "correlation": self.corr}})
        self.events.append({"ph": "X", "cat": "kernel", "name": name, "pid": 0, "tid": stream,
                            "ts": start, "dur": end - start,
                            "args": {"queued": 0, "device": 0, "context": 1, "stream": stream,
                                     "correlation": self.corr, "registers per thread": 32,
                                     "shared memory": 0, "blocks per SM": 1.5, "warps per SM": 6.0,
                                     "grid": [64, 1, 1], "block": [128, 1, 1],
                                     "est. achieved occupancy %": 25}})
        self.events.append({"ph": "s", "id": self.corr, "pid": PID, "tid": thread, "ts": launch,
                            "cat": "ac2g", "name": "ac2g"})
        self.events.append({"ph": "f", "id": self.corr, "pid": 0, "tid": stream, "ts": start,
                            "cat": "ac2g", "name": "ac2g", "bp": "e"})

    def trace(self) -> dict:
        return {"schemaVersion": 1, "deviceProperties": [], "displayTimeUnit": "ms",
                "baseTimeNanoseconds": 1700000000000000000, "traceEvents": self.events}


def _step(t: _Trace, k: int, last_update_end: float) -> None:
    """One training step at ``1000 * k`` us.

    Main stream: forward [20, 200] (two kernels), backward [200, 420] and [430, 600] (a 10 us gap).
    Update bucket1: side kernel [350, 450], of which [350, 420] and [430, 450] overlap the main
    stream (90 us). Update bucket0: side kernel [560, last_update_end]. NCCL all-reduces on their
    own stream, a copy on the main stream and, launched after backward but starting once the
    updates are done, a main-stream kernel that is not backward's.
    """
    b = 1000.0 * k
    t.annotation(f"step{k}", MAIN_THREAD, b, 900)
    t.kernel("gemm_fwd", MAIN, b + 5, MAIN_THREAD, b + 20, b + 120)
    t.kernel("gelu_fwd", MAIN, b + 8, MAIN_THREAD, b + 120, b + 200)
    t.kernel("gemm_dgrad", MAIN, b + 150, AUTOGRAD_THREAD, b + 200, b + 300)
    t.kernel("gemm_wgrad", MAIN, b + 160, AUTOGRAD_THREAD, b + 300, b + 420)
    t.kernel("ncclDevKernel_AllReduce_Sum_f32_RING_LL", NCCL, b + 305, AUTOGRAD_THREAD, b + 330, b + 345)
    t.annotation("bucket1/update", AUTOGRAD_THREAD, b + 310, 20)
    t.kernel("multi_tensor_apply_kernel<FusedAdamMathFunctor>", SIDE, b + 315, AUTOGRAD_THREAD,
             b + 350, b + 450)
    t.kernel("gemm_dgrad", MAIN, b + 400, AUTOGRAD_THREAD, b + 430, b + 500)
    t.kernel("gemm_wgrad", MAIN, b + 410, AUTOGRAD_THREAD, b + 500, b + 600)
    t.events.append({"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD (Device -> Device)",
                     "pid": 0, "tid": MAIN, "ts": b + 600, "dur": 400.0,
                     "args": {"stream": MAIN, "correlation": 1}})
    t.kernel("ncclDevKernel_AllReduce_Sum_f32_RING_LL", NCCL, b + 505, AUTOGRAD_THREAD, b + 540, b + 555)
    t.annotation("bucket0/update", AUTOGRAD_THREAD, b + 520, 20)
    t.kernel("multi_tensor_apply_kernel<FusedAdamMathFunctor>", SIDE, b + 525, AUTOGRAD_THREAD,
             b + 560, b + last_update_end)
    t.events.append({"ph": "X", "cat": "gpu_user_annotation", "name": "bucket0/update", "pid": 0,
                     "tid": SIDE, "ts": b + 559.999, "dur": last_update_end - 559.998,
                     "args": {"External id": 1}})
    # Launched after backward (the optimizer's bookkeeping); runs once the main stream has
    # waited for the updates.
    t.kernel("fill_kernel", MAIN, b + 650, MAIN_THREAD, b + max(last_update_end, 600) + 5,
             b + max(last_update_end, 600) + 8)


def _three_steps() -> dict:
    t = _Trace()
    for k, end in enumerate((700.0, 590.0, 700.0)):
        _step(t, k, end)
    return t.trace()


# Hand-computed from _step: side busy 100 + (end - 560); overlapped 90 + (min(end, 600) - 560).
SHARES = [130 / 240, 120 / 130, 130 / 240]
TAILS = [100.0, 0.0, 100.0]
OVERALL = (130 + 120 + 130) / (240 + 130 + 240)


def _check(r: dict) -> None:
    assert r["main_stream"] == MAIN and r["side_streams"] == [SIDE]
    assert [s["step"] for s in r["steps"]] == ["step0", "step1", "step2"]
    for s, share, tail in zip(r["steps"], SHARES, TAILS, strict=True):
        assert s["overlap_share"] == pytest.approx(share)
        assert s["tail_us"] == pytest.approx(tail)
        assert s["side_kernels"] == 2
        assert s["exposed_us"] == pytest.approx(s["side_busy_us"] - s["overlapped_us"])
    assert r["overlap_share"] == pytest.approx(OVERALL)
    assert r["tail_us"] == {"median": pytest.approx(100.0), "min": pytest.approx(0.0),
                            "max": pytest.approx(100.0)}
    assert r["side_busy_us"] == pytest.approx(240 + 130 + 240)


def test_overlap_share_and_tail_per_step():
    r = analyze(_three_steps())
    _check(r)
    assert r["side_streams_from"] == "update ranges, same thread"
    assert r["update_ranges"] == 6 and r["update_kernels"] == 6
    assert r["update_kernels_on_main_stream"] == 0
    assert r["steps"][0]["backward_last_kernel_end_us"] == pytest.approx(600.0)
    assert r["steps"][0]["last_update_end_us"] == pytest.approx(700.0)
    assert r["streams"][str(NCCL)]["nccl"] and not r["streams"][str(MAIN)]["nccl"]
    assert r["streams"][str(SIDE)]["kernels"] == 6


def test_older_trace_format():
    trace = _three_steps()
    for e in trace["traceEvents"]:
        if e.get("cat") == "kernel":
            e["cat"] = "Kernel"
            e["tid"] = f"stream {e['args'].pop('stream')}"
    assert {k.stream for k in kernels(trace)} == {MAIN, SIDE, NCCL}
    _check(analyze(trace))


def test_streams_without_update_ranges_and_without_launches():
    trace = _three_steps()
    trace["traceEvents"] = [e for e in trace["traceEvents"] if "/update" not in e.get("name", "")]
    r = analyze(trace)
    _check(r)
    assert r["update_kernels"] == 0 and "no update ranges" in r["side_streams_from"]
    # Without the launch records the kernels go to the step in which they start.
    bare = {"traceEvents": [e for e in trace["traceEvents"] if e.get("cat") != "cuda_runtime"]}
    _check(analyze(bare))


def test_update_ranges_matched_on_any_thread_when_thread_ids_differ():
    trace = _three_steps()
    for e in trace["traceEvents"]:
        if e.get("cat") == "cuda_runtime":
            e["tid"] = f"thread {e['tid']}"  # the same thread, written differently
    r = analyze(trace)
    _check(r)
    assert r["side_streams_from"] == "update ranges, any thread" and r["update_kernels"] == 6


def test_update_kernels_on_the_main_stream_are_counted_not_measured():
    t = _Trace()
    _step(t, 0, 700.0)
    t.annotation("bucket2/update@1024", AUTOGRAD_THREAD, 170, 10)
    t.kernel("multi_tensor_apply_kernel", MAIN, 175, AUTOGRAD_THREAD, 180, 195)
    r = analyze(t.trace())
    assert r["update_kernels"] == 3 and r["update_kernels_on_main_stream"] == 1
    assert r["side_streams"] == [SIDE] and r["overlap_share"] == pytest.approx(SHARES[0])


def test_given_streams_override_and_a_step_without_steps_ranges():
    trace = _three_steps()
    trace["traceEvents"] = [e for e in trace["traceEvents"] if not e.get("name", "").startswith("step")]
    r = analyze(trace, main_stream=MAIN, side_streams=[SIDE, MAIN])
    assert r["side_streams"] == [SIDE] and r["side_streams_from"] == "given"
    assert [s["step"] for s in r["steps"]] == ["all"]
    assert r["overlap_share"] == pytest.approx(OVERALL)
    assert r["steps"][0]["tail_us"] == pytest.approx(100.0)
    # Another main stream turns the measurement around: the updates against NCCL's stream.
    assert analyze(trace, main_stream=NCCL, side_streams=[SIDE])["overlap_share"] == 0.0


def test_load_trace_plain_and_gzip(tmp_path):
    trace = _three_steps()
    plain, packed = tmp_path / "t.json", tmp_path / "t.json.gz"
    plain.write_text(json.dumps(trace))
    with gzip.open(packed, "wt") as f:
        json.dump(trace, f)
    assert load_trace(plain) == load_trace(packed) == trace
    _check(analyze(load_trace(packed)))


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="traceEvents"):
        analyze({"events": []})
    # A real CPU trace of this torch: parsed without trouble, and no kernels in it.
    model = torch.nn.Linear(4, 4)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.profiler.record_function("step0"):
            model(torch.randn(2, 4)).sum().backward()
    path = tmp_path / "cpu.json.gz"
    prof.export_chrome_trace(str(path))
    cpu_trace = load_trace(path)
    assert any(e.get("name") == "step0" for e in cpu_trace["traceEvents"])
    assert kernels(cpu_trace) == []
    with pytest.raises(ValueError, match="no GPU kernel events"):
        analyze(cpu_trace)
    only_main = copy.deepcopy(_three_steps())
    only_main["traceEvents"] = [e for e in only_main["traceEvents"]
                                if (e.get("args") or {}).get("stream") in (None, MAIN)]
    with pytest.raises(ValueError, match="no kernels on any stream but the main stream 7"):
        analyze(only_main)


def _covered(intervals: list[tuple[int, int]]) -> set[int]:
    return {x for a, b in intervals for x in range(a, b)}


def test_interval_algebra_against_unit_cells():
    rng = random.Random(3)
    for _ in range(300):
        a = [(s, s + rng.randint(0, 8)) for s in (rng.randint(0, 60) for _ in range(rng.randint(0, 6)))]
        b = [(s, s + rng.randint(0, 8)) for s in (rng.randint(0, 60) for _ in range(rng.randint(0, 6)))]
        ua, ub = union(a), union(b)
        assert all(x[1] < y[0] for x, y in zip(ua, ua[1:]))  # sorted and disjoint
        assert _covered(ua) == _covered(a) and total(ua) == len(_covered(a))
        both = intersect(ua, ub)
        assert total(both) == len(_covered(a) & _covered(b))
