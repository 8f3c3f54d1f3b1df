#!/usr/bin/env bash
# The GPU check: the CUDA tests, then the benchmark on one GPU, then a short table.
#
#   bash tools/gpu_check.sh [OUTDIR]             # default OUTDIR: gpu-check-out/ in the checkout
#   bash tools/gpu_check.sh --dry-run [OUTDIR]   # print what it would run; runs nothing
#
# For a machine with one CUDA GPU and torch already installed: no network, no pip install, no
# virtual environment. The package runs from this checkout (PYTHONPATH) with the machine's
# python3 ($PYTHON overrides it), which needs torch, pytest and pytest-timeout; matplotlib and
# numpy are used when present (numpy is needed by the benchmark).
#
# Parts, in this order, each under its own time limit so that one hang cannot eat the others:
#   env        versions, the GPU and every import the check needs (stops the check when torch
#              sees no CUDA device or a required module does not import; a missing optional
#              one, matplotlib or numpy, costs only the plots)
#   tests      python3 -m pytest tests/test_cuda.py -v (a missing file is reported, not fatal)
#   sanitizer  the NCCL race detectors and stream tests again under torch's CUDA sanitizer
#              (CSAN, TORCH_CUDA_SANITIZER=1, inherited by the ranks), which reports any kernel that touches a tensor another stream may still
#              be using without an event between them; reported on its own line and in
#              OUTDIR/sanitizer_tests.xml, not counted in the exit status: CSAN does not see
#              the streams inside NCCL, so a report that names an NCCL collective's tensor
#              (c10d::allreduce_, all_gather, ...) is its noise, not a race of the overlap
#   bench-gpt  GPT-2-small-sized decoder (12 x 768, 12 heads, seq 1024, vocab 50304, batch 8)
#   bench-mlp  MLP of 32 x Linear(4096), batch 4096, also with fsdp-post-fused and fsdp-overlap
#   report     OUTDIR/gpu_check.json, OUTDIR/gpu_check.png (with matplotlib), the table
# Both benchmark parts: world size 1 on NCCL (127.0.0.1, a free port), cuda:0, bf16 autocast,
# SGD momentum and AdamW, modes floor / post / post-fused / upstream / overlap, each step timed
# with CUDA events, CUDA allocator peaks per mode, and a profiler trace of 3 overlap steps per
# configuration (OUTDIR/traces/) from which the update stream's overlap and tail are reported.
# The benchmark runs whether or not the tests passed. Everything printed also goes to
# OUTDIR/gpu_check.log. Exit status: 0 when every part passed; 1 when the CUDA tests failed, are
# missing or were all skipped, or a part failed or ran out of time; 2 for bad arguments or no
# CUDA device.
#
# For development: --device cpu runs the same pipeline at tiny sizes on CPU (gloo);
# GPU_CHECK_TESTS names another test file (absolute, or relative to the checkout);
# GPU_CHECK_TIMEOUT_<PART> (ENV, TESTS, SANITIZER,
# BENCH_GPT, BENCH_MLP, REPORT) changes a part's limit in seconds.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
dry_run=0
device=cuda
out=""

usage() { sed -n '2,5p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --device) shift; device="${1:-}" ;;
        --device=*) device="${1#--device=}" ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "gpu_check: unknown option '$1'" >&2; usage >&2; exit 2 ;;
        *)
            if [ -n "$out" ]; then
                echo "gpu_check: one OUTDIR only, got '$out' and '$1'" >&2; exit 2
            fi
            out="$1" ;;
    esac
    shift
done
case "$device" in
    cuda|cpu) ;;
    *) echo "gpu_check: --device must be cuda or cpu, got '$device'" >&2; exit 2 ;;
esac
case "$out" in
    "") out="$root/gpu-check-out" ;;
    /*) ;;
    *) out="$PWD/$out" ;;
esac
tests="${GPU_CHECK_TESTS:-tests/test_cuda.py}"  # relative to the checkout, or absolute

# Time limits (seconds): 400 in all, with the 3 s grace each part gets after its limit
# under 7 minutes; a normal run takes well under that (each part prints its time).
t_env="${GPU_CHECK_TIMEOUT_ENV:-15}"
t_tests="${GPU_CHECK_TIMEOUT_TESTS:-150}"
t_sanitizer="${GPU_CHECK_TIMEOUT_SANITIZER:-55}"
t_gpt="${GPU_CHECK_TIMEOUT_BENCH_GPT:-110}"
t_mlp="${GPU_CHECK_TIMEOUT_BENCH_MLP:-55}"
t_report="${GPU_CHECK_TIMEOUT_REPORT:-15}"

# Benchmark settings: a few rounds, enough for a median; CPU sizes only prove the pipeline.
if [ "$device" = cuda ]; then
    gpt_size=(--tf-width 768 --tf-depth 12 --tf-heads 12 --seq-len 1024 --vocab 50304 --batch 8)
    mlp_size=(--width 4096 --depth 32 --batch 4096)
    rounds=(--rounds 3 --steps-per-round 5 --warmup 3 --trace-steps 3)
else
    gpt_size=(--tf-width 32 --tf-depth 2 --tf-heads 2 --seq-len 16 --vocab 128 --batch 2
              --bucket-cap-mb 0.02)
    mlp_size=(--width 64 --depth 4 --batch 8 --bucket-cap-mb 0.02)
    rounds=(--rounds 2 --steps-per-round 2 --warmup 1 --trace-steps 2)
fi
# overlap gets fused=True: its own default for Adam/AdamW on CUDA is foreach, which would not
# compare like with like against post-fused.
# The GPT also runs the clipped modes (global-norm clipping firing on every fourth step, the
# overlapped side under the default "auto" policy): what a transformer loop does. The MLP also
# runs FSDP2 (fully_shard per layer and on the root, world size 1: nothing is reduce-scattered,
# the group updates still go to the side stream) post-backward and overlapped.
modes=floor,post,post-fused,upstream,overlap
common=(--device "$device" --nproc 1 --optim sgd,adamw --autocast bf16 --overlap-kernel fused
        "${rounds[@]}" --timeout 90 --trace-dir "$out/traces")

env_cmd=("$python" -m benchmarks.gpu_report probe --device "$device")
# The CUDA cases of the distributed-checkpoint tests run too (when the file is there).
more_tests=()
if [ -z "${GPU_CHECK_TESTS:-}" ] && [ -f "$root/tests/test_dcp.py" ]; then
    more_tests=(tests/test_dcp.py::test_cuda_state_saves_and_loads_on_nccl
                tests/test_dcp.py::test_cuda_state_of_two_gloo_ranks_loads_on_one_nccl_rank)
fi
tests_cmd=("$python" -m pytest "$tests" "${more_tests[@]}" -v -rA -p no:cacheprovider --junitxml "$out/cuda_tests.xml")
# The sanitizer checks every op from Python, which is slow: only the stream-ordering tests.
sanitized="race_detectors_on_nccl or streams_of_their_own or check_finite_reports_from_step"
sanitizer_cmd=(env TORCH_CUDA_SANITIZER=1 "$python" -m pytest "$tests" -k "$sanitized" -v -rA
               -p no:cacheprovider --junitxml "$out/sanitizer_tests.xml")
gpt_cmd=("$python" -m benchmarks.overlap_bench --model gpt "${gpt_size[@]}" "${common[@]}"
         --modes "$modes,post-fused+clip,overlap+clip" --clip sometimes --out "$out/bench-gpt")
mlp_cmd=("$python" -m benchmarks.overlap_bench --model mlp "${mlp_size[@]}" "${common[@]}"
         --modes "$modes,fsdp-post-fused,fsdp-overlap" --out "$out/bench-mlp")
report_cmd=("$python" -m benchmarks.gpu_report summary "$out")

quoted() {  # the command as a shell would read it back, quoting only where needed
    local arg line=""
    for arg in "$@"; do
        if [[ "$arg" =~ ^[A-Za-z0-9_./,=:@%+-]+$ ]]; then
            line+=" $arg"
        else
            line+=" $(printf '%q' "$arg")"
        fi
    done
    echo "${line# }"
}

if [ "$dry_run" = 1 ]; then
    echo "gpu check, dry run: prints the commands, runs nothing"
    echo "  in:      $root (PYTHONPATH=$root, no install, no network)"
    echo "  device:  $device; python: $python"
    echo "  output:  $out/ (gpu_check.log, gpu_check.json, gpu_check.png, cuda_tests.xml, bench-gpt/, bench-mlp/, traces/)"
    echo "  limits:  env ${t_env} s, tests ${t_tests} s, sanitizer ${t_sanitizer} s, bench-gpt ${t_gpt} s, bench-mlp ${t_mlp} s, report ${t_report} s ($((t_env + t_tests + t_sanitizer + t_gpt + t_mlp + t_report)) s in all)"
    echo "[1/6] env:       $(quoted "${env_cmd[@]}")"
    echo "[2/6] tests:     $(quoted "${tests_cmd[@]}")"
    if ! (cd "$root" && [ -f "$tests" ]); then
        echo "      note: $tests not found; a real run reports the CUDA tests as missing and goes on"
    fi
    echo "[3/6] sanitizer: $(quoted "${sanitizer_cmd[@]}")"
    echo "[4/6] bench-gpt: $(quoted "${gpt_cmd[@]}")"
    echo "[5/6] bench-mlp: $(quoted "${mlp_cmd[@]}")"
    echo "[6/6] report:    $(quoted "${report_cmd[@]}")"
    exit 0
fi

cd "$root" || exit 2
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$out" || exit 2
# Only what this script writes is replaced; anything else in OUTDIR stays.
rm -rf "$out/bench-gpt" "$out/bench-mlp" "$out/traces"
rm -f "$out/gpu_check.log" "$out/gpu_check.json" "$out/gpu_check.png" "$out/cuda_tests.xml" \
    "$out/sanitizer_tests.xml" "$out/parts.tsv"
log="$out/gpu_check.log"
started=$(date +%s.%N)

say() { echo "[gpu-check] $*" | tee -a "$log"; }

elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# run_part NAME LIMIT COMMAND...: run under `timeout`, output to the terminal and the log;
# sets $rc and appends "name status rc seconds limit" to parts.tsv (status set by the caller).
run_part() {
    local name="$1" limit="$2"
    shift 2
    say "$name (limit ${limit} s): $(quoted "$@")"
    local t0
    t0=$(date +%s.%N)
    timeout --kill-after=3 "$limit" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    secs=$(elapsed "$t0")
}

record() {  # record NAME STATUS
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$rc" "$secs" "$3" >> "$out/parts.tsv"
    say "$1: $2 (exit code $rc, ${secs} s of ${3} s)"
}

status_of() {  # the status word for exit code $rc of a part that should exit 0
    case "$rc" in
        0) echo ok ;;
        124|137) echo timeout ;;
        *) echo failed ;;
    esac
}

failed=0

# 1. The machine.
run_part env "$t_env" "${env_cmd[@]}"
st=$(status_of)
record env "$st" "$t_env"
if [ "$st" != ok ]; then
    if [ "$rc" = 4 ]; then
        say "stopping: a module the check needs does not import (see 'missing:' above)"
    else
        say "stopping: no usable CUDA device (see above); --dry-run shows what the check runs"
    fi
    exit 2
fi

# 2. The CUDA tests (the project's addopts deselect only soak tests, which stays so here).
if [ -f "$tests" ]; then
    run_part tests "$t_tests" "${tests_cmd[@]}"
    case "$rc" in
        0) st=passed
           # On a GPU every CUDA test should run: all of them skipped means CUDA went unseen.
           if [ "$device" = cuda ] && ! tail -n 5 "$log" | grep -Eq '[0-9]+ passed'; then
               st=all-skipped
           fi ;;
        5) st="no-tests" ;;
        124|137) st=timeout ;;
        *) st=failed ;;
    esac
    [ "$st" = passed ] || failed=1
else
    rc=-1 secs=0.0 st=missing failed=1
    say "tests: $tests not found: the CUDA tests are missing, so none ran; going on with the benchmark"
fi
record tests "$st" "$t_tests"

# 3. The ordering tests under the CUDA sanitizer: reported, not counted (see the top).
if [ -f "$tests" ] && [ "$device" = cuda ]; then
    run_part sanitizer "$t_sanitizer" "${sanitizer_cmd[@]}"
    case "$rc" in
        0) st=passed ;;
        5) st="no-tests" ;;
        124|137) st=timeout ;;
        *) st=reported ;;
    esac
else
    rc=-1 secs=0.0 st=skipped
    say "sanitizer: skipped (it needs the CUDA tests and a CUDA device)"
fi
record sanitizer "$st" "$t_sanitizer"

# 4-5. The benchmark, one process per workload.
run_part bench-gpt "$t_gpt" "${gpt_cmd[@]}"
st=$(status_of)
record bench-gpt "$st" "$t_gpt"
[ "$st" = ok ] || failed=1

run_part bench-mlp "$t_mlp" "${mlp_cmd[@]}"
st=$(status_of)
record bench-mlp "$st" "$t_mlp"
[ "$st" = ok ] || failed=1

# 6. The summary: JSON, PNG, table.
run_part report "$t_report" "${report_cmd[@]}"
st=$(status_of)
record report "$st" "$t_report"
[ "$st" = ok ] || failed=1

say "total $(elapsed "$started") s; results in $out/ (gpu_check.log, gpu_check.json, gpu_check.png)"
if [ "$failed" != 0 ]; then
    say "FAILED: $(awk -F'\t' '$1 != "sanitizer" && $2 != "ok" && $2 != "passed" { printf "%s%s %s", sep, $1, $2; sep = ", " }' "$out/parts.tsv")"
    exit 1
fi
say "all parts passed"
exit 0
