#!/usr/bin/env bash
# The GPU check: the first thing to run whenever a GPU machine is available.
#
#   bash scripts/gpu_check.sh [OUTDIR]        # OUTDIR defaults to $OUT, else gpu_check_out
#
# 1. builds westar_ops in place with the CUDA kernels (TORCH_CUDA_ARCH_LIST defaults to
#    the visible GPU's compute capability; rebuilt with /usr/bin/g++ if $CXX links its own
#    copy of libstdc++'s stream code into the extension, see own_libstdcxx below);
# 2. runs tests/gpu and tests/triton (real Triton compiler, no interpreter);
# 3. the trainer end to end on CUDA (scripts/gpu_train_check.py: a Depth Anything V2
#    Small-sized model with random weights at 518 px on synthetic images with instance
#    maps and pairs: westar train in bf16 with a checkpoint, a SIGKILL and --resume,
#    --grad-accum 2, --gradient-checkpointing, westar masks (SAM2), eval, predict, merge,
#    demo --quick; one summary line per command and check);
# 4. the training step benchmark (benchmarks/train_step.py: westar's step vs the
#    researcher's at DAv2-Small size, 518 px, batch 4 and 8, bf16; the Large-sized
#    model's peak memory against benchmarks/memory_estimate.py; fails if the losses take
#    more than 2 % of the step or westar's step is not the faster);
# 5. runs compute-sanitizer memcheck and racecheck on small cases of every kernel of both
#    GPU backends (scripts/gpu_sanitize_cases.py);
# 6. runs benchmarks/gpu_bench.py --quick (the target cases: p10/median/p90, graph replay, launches, syncs, PASS/FAIL).
#
# Every step writes its log to OUTDIR (env.txt, build.log, pytest_gpu.log / .xml,
# pytest_triton.log, train.log and train/ (the trainer stage's logs, runs and
# train_check.json), train_step.log / .json, memcheck.log, racecheck.log, bench.log,
# bench.csv) and summary.txt lists each step's exit status and seconds (and, for the
# trainer stage, each command's). Each step has its own time limit (seconds, environment:
# T_BUILD T_GPU T_TRITON T_TRAIN T_STEP T_SAN T_BENCH), and no step runs past T_TOTAL
# (default 590) seconds from the start (a step's limit is cut to what is left; a step
# with less than 20 s left is skipped and counts as failed), so the whole check ends
# within 10 minutes on one GPU even if a step hangs. Exit status: 0 only if every step
# passed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
SUMMARY="$OUTDIR/summary.txt"
: >"$SUMMARY"
status=0

T_TOTAL=${T_TOTAL:-590}
step() {  # step NAME LIMIT_S LOG COMMAND...
  local name=$1 limit=$2 log=$3
  shift 3
  local t0=$SECONDS rc
  local left=$((T_TOTAL - SECONDS - 10))  # timeout's --kill-after below
  if [ "$left" -lt 20 ]; then
    printf '%-10s rc=%-3s %4ss  %s\n' "$name" 124 0 "skipped: $((T_TOTAL - SECONDS)) s left of T_TOTAL=$T_TOTAL" | tee -a "$SUMMARY"
    status=1
    return 124
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$OUTDIR/$log" 2>&1
  rc=$?
  printf '%-10s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" "$log" | tee -a "$SUMMARY"
  tail -n 15 "$OUTDIR/$log"
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

{
  date -u
  nvidia-smi || true
  nvcc --version || true
  command -v compute-sanitizer || echo "compute-sanitizer: not on PATH"
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")'
  "$PY" -c 'import triton; print("triton", triton.__version__)' || true
  nproc
} >"$OUTDIR/env.txt" 2>&1
cat "$OUTDIR/env.txt"

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))' 2>/dev/null || echo "9.0")
fi
export TORCH_CUDA_ARCH_LIST
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# pytest-xdist, where installed: the Triton kernels compile in parallel workers.
XDIST=""
if "$PY" -c "import xdist" 2>/dev/null; then XDIST="-n ${PYTEST_WORKERS:-8}"; fi

# A compiler that links its own copy of libstdc++'s stream code into the extension (seen
# on one CUDA image: CXX=/opt/gcc/bin/g++, a wrapper; together with Python's
# -Wl,-Bsymbolic-functions) makes every error message that formats a number segfault
# inside the extension (a locale facet of the wrong library). After the build, look for
# such definitions in _C and, if found, rebuild once with the system compiler.
own_libstdcxx() {
  local so
  so=$(ls westar_ops/_C*.so 2>/dev/null | head -1)
  [ -n "$so" ] && nm -C --defined-only "$so" 2>/dev/null | grep -q "basic_ostream<char, std::char_traits<char> >::_M_insert<long>"
}
build() {
  rm -rf build westar_ops/_C*.so
  env WESTAR_CUDA=1 "$PY" setup.py build_ext --inplace
}
if ! step build "${T_BUILD:-200}" build.log build; then
  echo "gpu_check: the build failed; see $OUTDIR/build.log" | tee -a "$SUMMARY"
  exit 1
fi
if own_libstdcxx && [ -x /usr/bin/g++ ] && [ "${CXX:-}" != /usr/bin/g++ ]; then
  echo "gpu_check: CXX=${CXX:-c++} put libstdc++'s stream code into _C (error messages would" \
    "segfault); rebuilding with /usr/bin/gcc and /usr/bin/g++" | tee -a "$SUMMARY"
  export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
  step build2 "${T_BUILD:-200}" build2.log build || exit 1
fi
if own_libstdcxx; then
  echo "gpu_check: WARNING: _C defines libstdc++ stream code; error messages may crash" | tee -a "$SUMMARY"
  status=1
fi
step build_info 30 build_info.log "$PY" -c 'import json, westar_ops; print(json.dumps(westar_ops.build_info(), indent=1))'

step pytest_gpu "${T_GPU:-120}" pytest_gpu.log "$PY" -m pytest tests/gpu -q $XDIST -rfEs -p no:cacheprovider \
  --junitxml="$OUTDIR/pytest_gpu.xml"
step pytest_tri "${T_TRITON:-90}" pytest_triton.log "$PY" -m pytest tests/triton -q $XDIST -rfEs -p no:cacheprovider \
  --junitxml="$OUTDIR/pytest_triton.xml"

# The trainer, as users run it: about 2 minutes expected (11 Python starts), limit 3 min;
# each command's line goes into the summary as it ends.
step train "${T_TRAIN:-180}" train.log "$PY" scripts/gpu_train_check.py "$OUTDIR/train" \
  --summary "$SUMMARY"
step trainstep "${T_STEP:-150}" train_step.log "$PY" benchmarks/train_step.py --model small \
  --size 518 --batch 4 8 --steps 20 --warmup 3 --profile-steps 5 --memory-arch large \
  --targets --json "$OUTDIR/train_step.json"

if command -v compute-sanitizer >/dev/null; then
  # No caching allocator: an out-of-bounds access past a tensor then leaves its allocation.
  for tool in memcheck racecheck; do
    step "$tool" "${T_SAN:-50}" "$tool.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      compute-sanitizer --tool "$tool" --error-exitcode 3 \
      "$PY" scripts/gpu_sanitize_cases.py
  done
else
  echo "sanitizer  skipped: compute-sanitizer not on PATH" | tee -a "$SUMMARY"
fi

step bench "${T_BENCH:-80}" bench.log "$PY" benchmarks/gpu_bench.py --quick --repeats 30 --csv "$OUTDIR/bench.csv"

echo "gpu_check: $( [ $status -eq 0 ] && echo passed || echo FAILED ) ($SECONDS s); logs in $OUTDIR" | tee -a "$SUMMARY"
exit $status
