#!/usr/bin/env bash
# CI compile-only check of the CUDA backend (no GPU needed): configures with
# LOPT_CUDA=ON (fails loudly without nvcc) into a separate build folder and builds
# only the CUDA module. Usage: tools/cuda_compile_check.sh [build-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR="${1:-build/cuda-check}"
start=$(date +%s)
mkdir -p "$BUILD_DIR"
if ! cmake -S . -B "$BUILD_DIR" -G Ninja -DLOPT_CUDA=ON \
    -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v python3)" \
    > "$BUILD_DIR/configure.log" 2>&1; then
  cat "$BUILD_DIR/configure.log"
  echo "cuda_compile_check: configure FAILED" >&2
  exit 1
fi
grep -E "lopt_ext" "$BUILD_DIR/configure.log"
cmake --build "$BUILD_DIR" --target _lopt_cuda
ls "$BUILD_DIR"/_lopt_cuda*.so >/dev/null
echo "cuda_compile_check: OK in $(( $(date +%s) - start )) s ($BUILD_DIR)"
