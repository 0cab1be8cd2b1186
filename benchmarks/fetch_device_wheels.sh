#!/usr/bin/env bash
# Download the wheels benchmarks/device_check.sh installs on a machine without network into
# benchmarks/wheels/ (run here, where pip reaches an index; the wheels are committed: ~6.7 MB).
#
# The device image has jax (0.11.2 + CUDA 13 plugin), flax, optax, orbax-checkpoint and chex.
# What the project imports on the device check's path and the image may lack:
#   grain (mxdna_jax.data -> parity, objectives, benchmarks) + its deps array_record, cloudpickle,
#   portpicker (-> psutil); ml_collections (configs/*.py); and, should the image lack them although
#   orbax/chex normally bring them, absl-py, etils, PyYAML, protobuf. tqdm and safetensors are only
#   imported lazily (eval/convert export) but are small, so they come too.
# grain, array_record and PyYAML are compiled: their wheels are for CPython 3.12 on x86_64 Linux
# (PYTHON_VERSION / PLATFORM below). device_check.sh installs only what does not import already,
# and if grain cannot be installed (another Python) it puts an import stub in its place: nothing on
# the check's path calls grain, the modules only import it.
#
#   bash benchmarks/fetch_device_wheels.sh            # into benchmarks/wheels/
#   PYTHON_VERSION=3.13 bash benchmarks/fetch_device_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-benchmarks/wheels}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
PIP=${PIP:-.venv/bin/pip}
PLATFORMS=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_28_x86_64)
PACKAGES=(grain array-record cloudpickle portpicker psutil ml-collections absl-py etils PyYAML protobuf tqdm
          safetensors)
mkdir -p "$DEST"
"$PIP" download --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" "${PLATFORMS[@]}" \
    -d "$DEST" "${PACKAGES[@]}"
ls -la "$DEST"
du -sh "$DEST"
