#!/usr/bin/env bash
# The GPU suite in one command, for a machine with a CUDA GPU and no network:
#   install this checkout (no dependencies fetched), run the tests natively, run the benchmarks,
#   write benchmarks/results/<date>-<device>.json and rebuild the README table and perf.png.
#
#   bash benchmarks/run_gpu_suite.sh [all|tests|bench|bench-step|bench-memory|bench-ops]   (default: all)
#
# One device-tool command may run 10 minutes: run "tests", "bench-step" (whole step, scaling),
# "bench-memory" (largest d_sae, one process per trial) and "bench-ops" (single ops) as four
# calls; "bench" runs all three benchmark parts.
#
# Peer wheels: if .whl/*.whl exists (benchmarks/fetch_peer_wheels.sh fills it; name .whl in the
# device tool's carry) they are installed to /tmp/site first, so the sparsify figures run too.
# Environment: PYTHON (default python3), BENCH_ARGS (pytest arguments for the benchmarks instead
# of "benchmarks/", e.g. "benchmarks/bench_train_step.py benchmarks/bench_memory.py"), BENCH_TAG (suffix of the results
# file's name when the suite runs in parts). Everything worth keeping is also copied to $OUT
# when that is set (the device tool returns it): logs, the results file, perf.png, the section.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAGE=${1:-all}
DEST=${OUT:-benchmarks/results}
mkdir -p "$DEST" benchmarks/results
export PYTHONUNBUFFERED=1

case "$STAGE" in
  all|tests|bench) ;;
  bench-step) BENCH_TAG=${BENCH_TAG:-step}
              BENCH_ARGS=${BENCH_ARGS:-"benchmarks/bench_train_step.py benchmarks/bench_scaling.py"} ;;
  bench-memory) BENCH_TAG=${BENCH_TAG:-memory}
                BENCH_ARGS=${BENCH_ARGS:-"benchmarks/bench_memory.py"} ;;
  bench-ops) BENCH_TAG=${BENCH_TAG:-ops}
             BENCH_ARGS=${BENCH_ARGS:-"benchmarks/bench_topk_encode.py benchmarks/bench_sparse_decode.py benchmarks/bench_auxk.py benchmarks/bench_decoder_norm.py"} ;;
  *) echo "usage: $0 [all|tests|bench|bench-step|bench-memory|bench-ops]" >&2; exit 2 ;;
esac

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -m pip install -q --no-deps --no-build-isolation -e . || { echo "editable install failed" >&2; exit 1; }
"$PY" - <<'PYEOF'
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
PYEOF

status=0
if [ "$STAGE" = all ] || [ "$STAGE" = tests ]; then
  "$PY" -m pytest tests/ -q -p no:cacheprovider -rs 2>&1 | tee "$DEST/tests.log"
  status=${PIPESTATUS[0]}
fi

if [ "$STAGE" != tests ]; then
  before=$(ls benchmarks/results/*.json 2>/dev/null | sort)
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of pytest arguments
  "$PY" -m pytest ${BENCH_ARGS:-benchmarks/} --benchmark-only -q -p no:cacheprovider -rs --save-results \
    --results-tag "${BENCH_TAG:-}" --benchmark-columns=median,min,max,rounds 2>&1 \
    | tee "$DEST/bench.log"
  bench_status=${PIPESTATUS[0]}
  [ "$bench_status" -ne 0 ] && status=$bench_status
  after=$(ls benchmarks/results/*.json 2>/dev/null | sort)
  new=$(comm -13 <(echo "$before") <(echo "$after"))
  for f in $new; do
    [ "$DEST" != benchmarks/results ] && cp "$f" "$DEST/"
    "$PY" benchmarks/report.py "$f" --print > "$DEST/perf-section.md"
  done
  "$PY" benchmarks/report.py
  if [ "$DEST" != benchmarks/results ] && [ -f benchmarks/results/perf.png ]; then
    cp benchmarks/results/perf.png "$DEST/"
  fi
fi
exit "$status"
