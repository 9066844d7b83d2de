#!/usr/bin/env bash
# The GPU check in one command of at most 8 minutes, for a machine with a CUDA GPU and no network:
#
#   SAEFAST_COMMIT=<sha> bash benchmarks/gpu_check.sh            (results in $OUT, else benchmarks/results/gpu-check-<date>)
#
# Installs this checkout without fetching anything (and the peer wheels in .whl/ when present:
# benchmarks/fetch_peer_wheels.sh fills it; name .whl in the device tool's carry), then runs
# benchmarks/gpu_check.py: env, native kernel tests, whole step (fp32 and bf16 autocast, against
# dense, sparsify and the floor), largest d_sae, single ops; each stage's figures land in
# check.json as soon as it ends. GPU_CHECK_DEADLINE (seconds, default 420) bounds the stages;
# the install comes on top (about 20 s). See docs/benchmarks.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${OUT:-benchmarks/results/gpu-check-$(date +%Y-%m-%d)}
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
{
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . || { echo "editable install failed"; exit 1; }
} > "$DEST/install.log" 2>&1 || { cat "$DEST/install.log" >&2; exit 1; }
exec "$PY" benchmarks/gpu_check.py --out "$DEST" --deadline "${GPU_CHECK_DEADLINE:-420}" ${GPU_CHECK_ARGS:-}
