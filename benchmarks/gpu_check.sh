#!/usr/bin/env bash
# One device call for the Triton backend: GPU correctness tests, then the benchmark tables.
# Results land in $OUT (the device tool brings them back). The GPU image lacks diffusers and
# constriction: carry their wheels in .whl/ (see the device README) and they are installed first.
# Stage time limits: TEST_S, UNET_S, DIT_S, LINEAR_S, CONV_S, KTEST_S seconds.
set -u
source benchmarks/gpu_env.sh
export FXPRESS_CACHE_DIR="$OUT" TRITON_INTERPRET=0
stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/machine.txt"
python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, \
'diffusers', diffusers.__version__)" | tee -a "$OUT/machine.txt"
if [ "${BACKEND_TESTS:-1}" = 1 ]; then
    stage "lowering tests on the GPU (tiny-unet artifact vs torch backend)"
    FXPRESS_TUNE=0 timeout "${TEST_S:-150}" python3 -m pytest -q -x -p no:cacheprovider tests/test_triton_backend.py \
        2>&1 | tail -15 | tee "$OUT/pytest_backend.txt"
fi
stage "kernel tests compiled for the GPU"
FXPRESS_TUNE=0 timeout "${KTEST_S:-120}" python3 -m pytest -q --maxfail=5 -n 8 -p no:cacheprovider \
    tests/test_triton_kernels.py 2>&1 | tail -25 | tee "$OUT/pytest_kernels.txt"
for section in unet dit linear conv; do
    stage "benchmark: $section"
    limit_var="$(echo "$section" | tr a-z A-Z)_S"
    timeout "${!limit_var:-200}" python3 benchmarks/lowbit_kernels.py --sections "$section" --out "$OUT/kernels.md" \
        --timings "$OUT/timings_$section.json" 2>&1 | tail -40
done
stage "done"
