#!/usr/bin/env bash
# GPU check, in one run on a machine with a CUDA GPU (an H100 or H200):
#   1. build convkit for sm_90 (TORCH_CUDA_ARCH_LIST overrides), against the torch installed;
#   2. run the whole test suite (the device-parametrized tests run on CUDA there);
#   3. run the CUDA tests under compute-sanitizer: memcheck, racecheck, synccheck;
#   4. run the benchmark on CUDA.
# Logs (at most 8 files) go to $OUT when set, else ./gpu-check-logs. Exits non-zero when the
# build, a test or a sanitizer failed.
#   usage: bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/gpu-check-logs}"
mkdir -p "$out"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" FORCE_CUDA=1 PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
failed=0

echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
start=$SECONDS
if ! "$python" -m pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1; then
  tail -40 "$out/build.log"
  exit 1
fi
echo "built in $((SECONDS - start)) s"
"$python" -c "import torch, convkit; print(torch.__version__, torch.cuda.get_device_name(), 'capability', torch.cuda.get_device_capability())"

echo "== tests (all, CUDA included)"
start=$SECONDS
"$python" -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$out/tests.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || failed=1
echo "tests took $((SECONDS - start)) s"

# The CUDA tests only (device id 'cuda' and tests/test_cuda.py); torch.compile and the
# hypothesis test are left out: they add minutes under the sanitizer and no new kernels.
selection="cuda and not compile and not property"
for tool in memcheck racecheck synccheck; do
  echo "== compute-sanitizer --tool $tool"
  start=$SECONDS
  compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 50 \
    "$python" -m pytest -q -x -p no:cacheprovider -k "$selection" tests >"$out/sanitizer_$tool.log" 2>&1
  rc=$?
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$out/sanitizer_$tool.log" | tail -3
  [ "$rc" -eq 0 ] || { echo "$tool: exit $rc"; failed=1; }
  echo "$tool took $((SECONDS - start)) s"
done

echo "== benchmark (CUDA)"
if [ -f benchmarks/conv_bench.py ]; then
  "$python" benchmarks/conv_bench.py --device cuda --json "$out/bench_cuda.json" \
    --plot "$out/bench_cuda.png" 2>&1 | tee "$out/bench_cuda.log" | tail -60
  [ "${PIPESTATUS[0]}" -eq 0 ] || failed=1
fi
exit $failed
