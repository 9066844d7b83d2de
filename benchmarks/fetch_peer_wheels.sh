#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels a GPU machine without network needs to run
# the peer benchmarks (eai-sparsify and what its import pulls in that the GPU image lacks), into
# .whl/ (git-ignored). Name .whl in the device tool's `carry`; gpu_check.sh installs them.
# sae-lens needs transformer-lens < 4 and dictionary-learning needs nnsight: both are left out.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PYVER=${PEER_PYTHON_VERSION:-3.12}
mkdir -p .whl
for req in eai-sparsify==1.3.3 natsort==8.4.0 simple-parsing==0.1.9 docstring-parser==0.18.0 \
           schedulefree==1.4.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19; do
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$req"
done
ls -l .whl
