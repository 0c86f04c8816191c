#!/usr/bin/env bash
# The GPU check in one go, as the device machine runs it (under 6 minutes on an H200; no package index there, so the
# project runs from source): the GPU tests, then benchmarks/gpu_report.py, then the whole suite on that machine.
#
#   OUT=results bash benchmarks/gpu_check.sh      # everything goes under $OUT (default: ./gpu_check)
set -u
out="${OUT:-gpu_check}"
mkdir -p "$out"
export PYTHONPATH=src
{ nvidia-smi -L; date -u; python -c "import sys, torch, lightning, triton; print(sys.version.split()[0], 'torch',
torch.__version__, 'lightning', lightning.__version__, 'triton', triton.__version__)"; } > "$out/versions.txt" 2>&1
cat "$out/versions.txt"
# the GPU tests: CUDA equivalences, no sync, the Triton pass against the eager one (compiled kernels here)
timeout 70 python -m pytest -q -p no:cacheprovider -n 8 tests/test_gpu.py tests/test_rate_triton.py \
  > "$out/gpu_tests.log" 2>&1
echo "gpu tests rc=$?" | tee -a "$out/gpu_tests.log"; tail -5 "$out/gpu_tests.log"
# the figures of BENCHMARKS.md's GPU table, measured in one run
timeout 200 python benchmarks/gpu_report.py --out "$out" --budget-s "${BUDGET_S:-175}" > "$out/gpu_report.log" 2>&1
echo "gpu report rc=$?" | tee -a "$out/gpu_report.log"
# the whole suite where users run it (a GPU machine): one line per test, so that a cut-off run still reports
timeout "${SUITE_S:-85}" python -m pytest -p no:cacheprovider -n 14 -v --deselect tests/test_gpu.py \
  --deselect tests/test_rate_triton.py > "$out/suite.log" 2>&1
echo "suite rc=$?" | tee -a "$out/suite.log"
grep -E "FAILED|ERROR" "$out/suite.log" | head -40
tail -3 "$out/suite.log"
