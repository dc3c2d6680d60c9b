#!/usr/bin/env bash
# One device call that trains a testbed on the GPU (classifier and quality evaluation on the machine's
# CPU) and brings its weights and training.json back in $OUT/<testbed>/. Usage: gpu_train_testbed.sh NAME
# The GPU image lacks diffusers: carry its wheel in .whl/ (see the device README).
# Stage time limits: TRAIN_S, QUALITY_S seconds.
set -u -o pipefail
NAME=${1:?testbed name}
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/machine.txt"
echo "=== train $NAME ($(date +%T))"
timeout "${TRAIN_S:-330}" python3 -m fxpress.testbed.train "$NAME" --out "$OUT/$NAME" --no-quality 2>&1 \
    | grep -v -e Warning -e torchao | tail -5 || exit 1
rm -rf "$OUT/$NAME/checkpoint"  # model + EMA + optimizer: too large to bring back, and not needed
echo "=== quality ($(date +%T))"
timeout "${QUALITY_S:-150}" python3 - "$NAME" "$OUT/$NAME" <<'PY'
import json, sys, time
from pathlib import Path
from fxpress.testbed import load_testbed
from fxpress.testbed.quality import evaluate
name, out = sys.argv[1], Path(sys.argv[2])
start = time.perf_counter()
quality = evaluate(load_testbed(name, out))[0].to_json()
record = json.loads((out / "training.json").read_text())
record["quality"] = quality
(out / "training.json").write_text(json.dumps(record, indent=1))
print(json.dumps(quality), f"{time.perf_counter() - start:.0f} s")
PY
echo "=== done ($(date +%T))"
