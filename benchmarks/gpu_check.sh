#!/usr/bin/env bash
# The GPU check: one run, on a machine with a CUDA GPU (an H100 or H200), that fits one call of
# the GPU machine (10 minutes; the whole run is bounded by GPU_CHECK_BUDGET_S, default 520 s):
#   1. build convkit for sm_90 (TORCH_CUDA_ARCH_LIST overrides) against the torch installed;
#   2. the CUDA tests (device id "cuda" and tests/test_cuda*.py), every failure listed;
#   3. one compute-sanitizer pass of each tool (memcheck, racecheck, synccheck, initcheck) on a
#      small selection of them, with PyTorch's caching allocator off;
#   4. conv_bench.py --device cuda --quick;
#   5. the emulated-CUDA tests, if time is left (the same code under the CPU emulator).
# Each stage runs under its own timeout and writes its log under $OUT (else ./gpu-check-logs)
# as it goes; a one-screen summary ends the run (and is $OUT/summary.txt). Exits non-zero when
# a stage failed. GPU_CHECK_BUILD_S bounds the build (default 240 s: ~3 min on 16 cores).
#   usage: bash benchmarks/gpu_check.sh            on the GPU machine
#          bash benchmarks/gpu_check.sh --dry-run  anywhere: the GPU stages are only listed
set -uo pipefail
cd "$(dirname "$0")/.."
dry_run=0
[ "${1:-}" = "--dry-run" ] && dry_run=1
out="${OUT:-$PWD/gpu-check-logs}"
mkdir -p "$out"
python=${PYTHON:-python3}
budget=${GPU_CHECK_BUDGET_S:-520}
deadline=$((SECONDS + budget))
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONUNBUFFERED=1
[ "$dry_run" -eq 0 ] && export FORCE_CUDA=1
failed=0
summary="$out/summary.txt"
: >"$summary"

# stage NAME CAP_SECONDS NEEDS_GPU COMMAND...: runs COMMAND with its output in $out/NAME.log,
# under a timeout of CAP_SECONDS or what is left of the budget, and records one summary line.
stage() {
  local name=$1 cap=$2 needs_gpu=$3
  shift 3
  local log="$out/$name.log" left=$((deadline - SECONDS - 5)) limit=$cap
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$dry_run" -eq 1 ] && [ "$needs_gpu" = gpu ]; then
    printf '%-22s skipped (dry run)  %s\n' "$name" "$(echo "$*" | cut -c1-75)" | tee -a "$summary"
    return 0
  fi
  if [ "$limit" -lt 15 ]; then
    printf '%-22s skipped: %d s of the %d s budget left\n' "$name" "$left" "$budget" | tee -a "$summary"
    failed=1
    return 1
  fi
  echo "== $name (at most $limit s): $*"
  local start=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  local status="ok"
  [ "$rc" -ne 0 ] && status="FAILED (exit $rc)" && failed=1
  [ "$rc" -eq 124 ] && status="TIMED OUT after $limit s"
  printf '%-22s %-22s %4d s  %s\n' "$name" "$status" "$((SECONDS - start))" \
    "$(grep -E "passed|failed|ERROR SUMMARY|RACECHECK SUMMARY|error:|Error" "$log" | tail -1 | cut -c1-90)" \
    | tee -a "$summary"
  return "$rc"
}

stage environment 60 cpu bash -c "$python -c 'import sys, torch; print(sys.version.split()[0], \
torch.__version__, torch.version.cuda, torch.cuda.is_available())'; nvidia-smi -L; \
\${CUDA_HOME:-/usr/local/cuda}/bin/nvcc --version | tail -2; compute-sanitizer --version | head -1; nproc"

if ! stage build "${GPU_CHECK_BUILD_S:-240}" cpu "$python" -m pip install --no-build-isolation --no-deps -e .; then
  tail -30 "$out/build.log"
  cat "$summary"
  exit 1
fi
stage kernels 60 cpu "$python" -c "import torch, convkit; d = torch._C._dispatch_dump('convkit::conv2d_forward'); \
k = [n for n in ('CPU', 'CUDA') if '\n' + n + ':' in d]; print('kernels:', k); \
assert 'CUDA' in k or not torch.cuda.is_available(), 'no CUDA kernels in the build'"

# The CUDA tests: device id "cuda" everywhere, and tests/test_cuda*.py (not the emulated ones).
stage tests_cuda 150 gpu "$python" -m pytest -q -p no:cacheprovider -rfE -k "cuda and not emu" tests

# Each sanitizer on a few tests that run every CUDA kernel once (conv forward/backward with
# groups, batch norm in both modes, the scalar and vectorised passes, im2col/col2im).
sanitized="tests/test_cuda.py::test_conv2d_cpu_and_cuda_agree[config2-cuda] \
tests/test_cuda.py::test_batch_norm_cpu_and_cuda_agree[True-True-cuda] \
tests/test_cuda.py::test_batch_norm_cpu_and_cuda_agree[False-False-cuda] \
tests/test_cuda_edge_cases.py::test_batch_norm_spatial_size_not_a_multiple_of_the_vector[True-shape0-cuda] \
tests/test_cuda_edge_cases.py::test_batch_norm_spatial_size_not_a_multiple_of_the_vector[True-shape3-cuda] \
tests/test_cuda_edge_cases.py::test_conv2d_storage_offset_breaks_alignment[cuda]"
for tool in memcheck racecheck synccheck initcheck; do
  # shellcheck disable=SC2086
  stage "sanitizer_$tool" 60 gpu env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer \
    --tool "$tool" --error-exitcode 99 --print-limit 20 \
    "$python" -m pytest -q -p no:cacheprovider $sanitized
done

stage bench_cuda 90 gpu "$python" benchmarks/conv_bench.py --device cuda --quick \
  --json "$out/bench_cuda.json"

# Last and optional: the same CUDA code under the emulator, on this machine's torch.
stage tests_emulated 60 cpu "$python" -m pytest -q -p no:cacheprovider -x -k "emu" \
  tests/test_cuda.py tests/test_cuda_edge_cases.py tests/test_cuda_emulator.py

echo
echo "== summary (logs in $out)"
cat "$summary"
failures=$(grep -h "^FAILED" "$out"/tests_*.log 2>/dev/null | head -15)
[ -n "$failures" ] && printf '\nfailed tests:\n%s\n' "$failures"
exit $failed
