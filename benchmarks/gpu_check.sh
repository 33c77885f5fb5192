#!/usr/bin/env bash
# The whole GPU check in one call (under 8 minutes on one H100/H200): carried wheels, the GPU tests, then the
# FLUX.1-dev-width benchmark, each result written under the output folder as it finishes.
#     benchmarks/gpu_check.sh                              # on the GPU machine; results in $OUT (or gpu_results/)
#     benchmarks/gpu_check.sh --device cpu --tiny --out d  # the dry run the test suite makes
# Other arguments go to benchmarks/gpu_check.py (--help lists them).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    SITE=${FXCACHE_WHEEL_SITE:-/tmp/fxcache-site}
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || { echo "gpu_check: installing the carried wheels (.whl/) failed" >&2; exit 3; }
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec timeout "${FXCACHE_GPU_CHECK_TIMEOUT:-470}" "$PYTHON" benchmarks/gpu_check.py "$@"
