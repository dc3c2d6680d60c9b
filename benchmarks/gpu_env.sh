# Sourced by the device-call scripts (gpu_*.sh): the output folder, quiet unbuffered Python, and the
# wheels carried in .whl/ (the GPU image lacks diffusers and constriction; see the device README).
OUT=${OUT:-/tmp/fxpress-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FXPRESS_QUIET=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
stage() { echo; echo "=== $1 ($(date +%T))"; }
