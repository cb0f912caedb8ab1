#!/usr/bin/env bash
# Builds the C++ kernels with AddressSanitizer + UndefinedBehaviorSanitizer into
# build-asan/ and runs the kernel tests under them:
#   1. the C++ test binary lopt_kernel_test (determinism, concurrency, 64-bit
#      indexing, bad arguments) - instrumented end to end;
#   2. pytest on the Python tests that call the kernels, with the sanitized
#      _lopt_cpu module and libasan preloaded into the (uninstrumented) Python.
# Usage: tools/sanitize.sh [pytest args...]   (default: the kernel-facing test files)
# Env:   PYTHON (default python3), JOBS (ninja -j), SANITIZE_BUILD_DIR (default build-asan).
# Leak detection is off: CPython and jaxlib keep allocations alive until exit.
# Exit status: non-zero on any sanitizer report or test failure.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
BUILD="${SANITIZE_BUILD_DIR:-$ROOT/build-asan}"
START=$(date +%s)

cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DLOPT_SANITIZE=ON -DLOPT_BUILD_TESTS=ON -DLOPT_CUDA=OFF \
  -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v "$PY")" >/dev/null
ninja -C "$BUILD" ${JOBS:+-j "$JOBS"} _lopt_cpu lopt_kernel_test
BUILT=$(date +%s)

export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"

echo "== lopt_kernel_test (ASan + UBSan)"
"$BUILD/lopt_kernel_test"
for isa in generic avx2; do  # the forced lower instruction sets as well
  LOPT_CPU_ISA=$isa "$BUILD/lopt_kernel_test" >/dev/null
done
CPP_DONE=$(date +%s)

# A private copy of the package whose extension is the sanitized build, so that
# nothing in the source tree (or anyone's installed copy) changes.
STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
mkdir "$STAGE/lopt_ext"
cp "$ROOT"/lopt_ext/*.py "$STAGE/lopt_ext/"
cp "$BUILD"/_lopt_cpu*.so "$STAGE/lopt_ext/"
LIBASAN="$(${CXX:-c++} -print-file-name=libasan.so)"
LIBUBSAN="$(${CXX:-c++} -print-file-name=libubsan.so)"
if [ $# -eq 0 ]; then
  # The kernel-facing tests, less the two 100-step trajectories on ~1M-element tensors
  # (minutes under ASan; SANITIZE_ALL=1 keeps them).
  set -- "$ROOT/python_tests/test_nonfinite.py" "$ROOT/python_tests/test_bad_input.py" \
         "$ROOT/python_tests/test_fuzz.py" "$ROOT/python_tests/test_concurrency.py" \
         "$ROOT/python_tests/test_fused.py" -q -x
  [ -n "${SANITIZE_ALL:-}" ] || set -- "$@" -k "not large_tensor"
fi
# pytest runs from the staging directory: make path arguments absolute first.
ARGS=()
for a in "$@"; do
  if [ -e "$a" ]; then ARGS+=("$(cd "$(dirname "$a")" && pwd)/$(basename "$a")"); else ARGS+=("$a"); fi
done
set -- "${ARGS[@]}"
echo "== pytest under ASan + UBSan (libasan: $LIBASAN)"
cd "$STAGE"
# The tests must import the sanitized copy, not the source tree's.
LD_PRELOAD="$LIBASAN:$LIBUBSAN" "$PY" -c "import lopt_ext._ffi as f, sys; m = f._cpu_module().__file__; \
print('sanitized module:', m); sys.exit(0 if m.startswith('$STAGE') else 1)"
LD_PRELOAD="$LIBASAN:$LIBUBSAN" "$PY" -m pytest -p no:cacheprovider --rootdir "$ROOT" "$@"
cd "$ROOT"
END=$(date +%s)
echo "sanitize.sh: build $((BUILT - START)) s, C++ tests $((CPP_DONE - BUILT)) s, pytest $((END - CPP_DONE)) s, total $((END - START)) s"
