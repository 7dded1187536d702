#!/usr/bin/env bash
# Prove the CUDA paths of patchbalance on a GPU machine, each figure beside its baseline.
#
#   bash bench/gpu/run.sh OUT_DIR                  # a GPU machine: all sizes, CUDA checked
#   bash bench/gpu/run.sh OUT_DIR --cpu --small    # every step, tiny, on the CPU (the test)
#
# Other options go to check.py (--work DIR, --budget SECONDS, --coreset-budget FRACTION).
# On a GPU machine the missing dependencies are installed first from bench/gpu/wheels/
# (bench/gpu/fetch_wheels.sh fills it where there is network), and patchbalance from this
# working tree. Writes OUT_DIR/gpu.json and OUT_DIR/gpu.md; exits non-zero when a step
# failed or a CUDA path did not run on CUDA.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
python="${PYTHON:-python3}"
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
  echo "usage: bash bench/gpu/run.sh OUT_DIR [--cpu] [--small] [--work DIR] [--budget SECONDS]" >&2
  exit 2
fi
out="$1"
shift
mkdir -p "$out"
# Everything printed also goes to OUT_DIR/check.log.
exec > >(tee -a "$out/check.log") 2>&1
cpu=0
for argument in "$@"; do
  if [ "$argument" = "--cpu" ]; then cpu=1; fi
done
export PYTHONUNBUFFERED=1
if [ "$cpu" = 0 ]; then
  site="${PATCHBALANCE_CHECK_SITE:-/tmp/patchbalance-check-site}"
  "$python" "$here/setup_env.py" --site "$site" --report "$out/setup.json" || {
    echo "setup failed: see above and $out/setup.json" >&2
    exit 1
  }
  # The installed copy first; the source folder serves when pip could not build it.
  export PYTHONPATH="$site:$repo/src${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$python" "$here/check.py" "$out" "$@"
