#!/usr/bin/env bash
# The one prepared accelerator check (issue 19; see tools/device_check.py for what it measures).
#
#   make device-wheels                                   # here, once: .whl/ with what the GPU machine lacks
#   bash tools/device_check.sh --out "$OUT" --commit SHA # on the GPU machine (carry .whl), about 5 minutes
#   bash tools/device_check.sh --out "$OUT" --sections step,trl --remat full   # the like-for-like TRL comparison
#   PYTHON=.venv/bin/python bash tools/device_check.sh --dry-run --out /tmp/dc   # tiny shapes on this CPU
#
# When python lacks cpo_jax's dependencies (grain, trl, datasets, omegaconf, ...), the wheels of .whl/ are installed
# with pip --no-index --no-deps into /tmp/site and put on PYTHONPATH; nothing is fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import grain, trl, datasets, omegaconf, tensorboardX" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "device_check: $PY lacks cpo_jax's dependencies and .whl/ is empty: run 'make device-wheels' first" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec timeout "${DEVICE_CHECK_TIMEOUT:-470}" "$PY" tools/device_check.py "$@"
