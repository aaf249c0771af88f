#!/usr/bin/env bash
# Compile check of the CUDA sources (no GPU and no CUDA build of torch needed).
#
# Compiles every csrc/cuda/*.cu with nvcc for sm_86, sm_89 and sm_90 (-c only, into a
# temp dir, nothing is linked), -std=c++20, against torch's headers and csrc/include.
# Warnings are errors for OUR code: host-compiler warnings (-Wall -Wextra) and nvcc's
# own diagnostics whose file lies under csrc/ fail the check; warnings that come from
# torch's, CUB's or CUDA's headers are counted and reported but do not fail it.
#
# Environment:
#   NVCC           nvcc to use (default: $CUDA_HOME/bin/nvcc, /usr/local/cuda/bin/nvcc)
#   JOBS           parallel nvcc processes (default: number of cores)
#   WESTAR_ARCHS   space-separated compute capabilities (default: "86 89 90")
#
# The CPU build of torch lacks the generated c10/cuda/impl/cuda_cmake_macros.h: a
# one-line stand-in is written to a temp include dir (only used when torch has none).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

NVCC=${NVCC:-}
if [ -z "$NVCC" ]; then
  for cand in "${CUDA_HOME:-/nonexistent}/bin/nvcc" /usr/local/cuda/bin/nvcc "$(command -v nvcc || true)"; do
    if [ -n "$cand" ] && [ -x "$cand" ]; then NVCC=$cand; break; fi
  done
fi
if [ -z "$NVCC" ]; then
  echo "check_cuda_compile: nvcc not found (set NVCC or CUDA_HOME); skipping the CUDA compile check" >&2
  exit 0
fi

shopt -s nullglob
SOURCES=(csrc/cuda/*.cu)
if [ ${#SOURCES[@]} -eq 0 ]; then
  echo "check_cuda_compile: no csrc/cuda/*.cu files"
  exit 0
fi

ARCHS=${WESTAR_ARCHS:-"86 89 90"}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
PYTHON=${PYTHON:-python}

TMP=$(mktemp -d "${TMPDIR:-/tmp}/westar_cuda_check.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/include/c10/cuda/impl" "$TMP/obj" "$TMP/log"

mapfile -t TORCH_INC < <("$PYTHON" -c 'import torch.utils.cpp_extension as c; print("\n".join(c.include_paths()))')
INC_FLAGS=()
for d in "${TORCH_INC[@]}"; do INC_FLAGS+=(-isystem "$d"); done
if [ ! -f "${TORCH_INC[0]}/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  echo "#define C10_CUDA_BUILD_SHARED_LIBS" >"$TMP/include/c10/cuda/impl/cuda_cmake_macros.h"
  INC_FLAGS=(-I "$TMP/include" "${INC_FLAGS[@]}")
fi

GENCODE=()
for a in $ARCHS; do GENCODE+=(-gencode "arch=compute_${a},code=sm_${a}"); done

# Same defines as torch.utils.cpp_extension uses for a CUDA extension, plus our flags
# from setup.py.
FLAGS=(-c -O3 -std=c++20 --expt-relaxed-constexpr -lineinfo
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H -D_GLIBCXX_USE_CXX11_ABI=1
  -Xcompiler -Wall,-Wextra,-fPIC
  -I "$ROOT/csrc/include" "${INC_FLAGS[@]}" "${GENCODE[@]}")

echo "check_cuda_compile: $($NVCC --version | tail -1)"
echo "check_cuda_compile: ${#SOURCES[@]} file(s) x archs [$ARCHS], $JOBS job(s)"
start=$(date +%s)

compile_one() {
  local src=$1 name
  name=$(basename "$src" .cu)
  local t0=$(date +%s)
  if "$NVCC" "${FLAGS[@]}" "$src" -o "$TMP/obj/$name.o" >"$TMP/log/$name.log" 2>&1; then
    echo "ok $(( $(date +%s) - t0 ))" >"$TMP/log/$name.status"
  else
    echo "fail $(( $(date +%s) - t0 ))" >"$TMP/log/$name.status"
  fi
}
export -f compile_one
export NVCC TMP
# Arrays cannot be exported: pass the flags through a file read by each job.
printf '%s\0' "${FLAGS[@]}" >"$TMP/flags"
run_job() {
  local src=$1
  mapfile -d '' -t FLAGS <"$TMP/flags"
  compile_one "$src"
}
export -f run_job
printf '%s\0' "${SOURCES[@]}" | xargs -0 -n 1 -P "$JOBS" bash -c 'run_job "$0"'

# Our files: paths relative to the repository root, or absolute under it (torch's own
# headers live under .../torch/csrc/, which must not count as ours).
ROOT_RE=$(printf '%s' "$ROOT" | sed 's/[.[\*^$()+?{|]/\\&/g')
failed=0
our_warnings=0
other_warnings=0
for src in "${SOURCES[@]}"; do
  name=$(basename "$src" .cu)
  log="$TMP/log/$name.log"
  read -r state secs <"$TMP/log/$name.status"
  # Diagnostics naming a file under csrc/ (host: "path:line:col: warning:", nvcc:
  # "path(line): warning #..."), relative or absolute.
  ours=$(grep -E "^(${ROOT_RE}/)?csrc/[^:(]*(:[0-9]+(:[0-9]+)?|\([0-9]+\)): (warning|error)" "$log" || true)
  n_ours=$(printf '%s' "$ours" | grep -c "warning" || true)
  n_all=$(grep -cE "warning( #[0-9A-Z-]+)?:|: warning" "$log" || true)
  n_other=$((n_all - n_ours))
  our_warnings=$((our_warnings + n_ours))
  other_warnings=$((other_warnings + n_other))
  if [ "$state" != ok ]; then
    failed=1
    echo "FAIL $src (${secs}s)"
    cat "$log"
  elif [ "$n_ours" -gt 0 ]; then
    failed=1
    echo "FAIL $src (${secs}s): $n_ours warning(s) in our code"
    printf '%s\n' "$ours"
    grep -A3 -E "^(${ROOT_RE}/)?csrc/.*warning" "$log" | head -60 || true
  else
    echo "ok   $src (${secs}s; $n_other warning(s) from torch/CUDA headers ignored)"
  fi
done

echo "check_cuda_compile: ${#SOURCES[@]} file(s), archs [$ARCHS], $our_warnings warning(s) in csrc/," \
  "$other_warnings outside, $(( $(date +%s) - start )) s"
if [ "$failed" -ne 0 ]; then
  echo "check_cuda_compile: FAILED"
  exit 1
fi
echo "check_cuda_compile: passed"
