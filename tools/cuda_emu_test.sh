#!/usr/bin/env bash
# Checks the CUDA kernels' logic without a GPU: compiles csrc/kernels/lopt_cuda.cu for
# the host with a small emulation of the CUDA features it uses (csrc/kernels/cuda_emu.h)
# and compares its results, computed in place, with the CPU driver's.
# Usage: tools/cuda_emu_test.sh [build-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-build/cuda-emu}"
mkdir -p "$OUT"
CXX="${CXX:-g++}"
flags=(-std=c++20 -O2 -pthread -DLOPT_CUDA_EMULATION -Icsrc/kernels -Wno-unknown-pragmas)
"$CXX" "${flags[@]}" -x c++ -c csrc/kernels/lopt_cuda.cu -o "$OUT/lopt_cuda_emu.o"
"$CXX" "${flags[@]}" csrc/tests/cuda_emu_test.cc csrc/kernels/lopt_cpu.cc \
  csrc/kernels/lopt_cpu_dispatch.cc csrc/kernels/lopt_cpu_tiles_generic.cc "$OUT/lopt_cuda_emu.o" \
  -o "$OUT/cuda_emu_test"
"$OUT/cuda_emu_test"
