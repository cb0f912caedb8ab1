#!/usr/bin/env bash
# One-shot check on a machine with an NVIDIA GPU (written for an H200 with nvcc 13,
# CMake, ninja, pybind11, scikit-build-core and jax + its CUDA plugin preinstalled, no
# network). Builds the package with its CUDA kernels, runs the GPU tests, the GPU
# benchmark and then the rest of the test suite on the GPU; results go to OUT_DIR.
#
#   tools/gpu_check.sh OUT_DIR
#
# OUT_DIR receives: gpu_check.log (everything), env.txt, build.log, pytest_gpu.{log,xml},
# bench.json + bench.log, pytest_all.{log,xml}, summary.json (status and seconds per stage).
# Stage time limits (seconds) can be changed with BUILD_TIMEOUT, GPU_TEST_TIMEOUT,
# BENCH_TIMEOUT, SUITE_TIMEOUT; SKIP_SUITE=1 skips the full suite; BENCH_ARGS adds options
# to bench/gpu_bench.py (e.g. "--repeats 10"); BUILD_DIR reuses a build folder.
# Nothing is downloaded: the build uses cmake + ninja directly (the same CMakeLists that
# pip uses) and puts the modules next to the sources; no pip install is needed.
set -uo pipefail

OUT="${1:?usage: tools/gpu_check.sh OUT_DIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
exec > >(tee "$OUT/gpu_check.log") 2>&1

BUILD_DIR="${BUILD_DIR:-$ROOT/build/gpu}"
# The whole script stays within TOTAL_BUDGET seconds (default 540: one 10-minute device
# call); each stage gets min(its own limit, what is left), the full suite goes last.
TOTAL_BUDGET="${TOTAL_BUDGET:-540}"
BUILD_TIMEOUT="${BUILD_TIMEOUT:-300}"
GPU_TEST_TIMEOUT="${GPU_TEST_TIMEOUT:-200}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-180}"
SUITE_TIMEOUT="${SUITE_TIMEOUT:-600}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # tests and bench share the GPU politely
export PIP_NO_INDEX=1                        # never reach for the network

declare -A STATUS SECONDS_USED
stage() {  # stage NAME TIMEOUT CMD...: runs CMD with a time limit, records rc and seconds
  local name="$1" limit="$2"
  shift 2
  local left=$((TOTAL_BUDGET - SECONDS - 15))
  if [ "$left" -lt 20 ]; then
    echo "=== [$name] skipped: the time budget is spent"
    STATUS[$name]=124
    SECONDS_USED[$name]=0
    return 124
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== [$name] $(date -u +%H:%M:%S) limit ${limit}s: $*"
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=20 "$limit" "$@"
  local rc=$?
  STATUS[$name]=$rc
  SECONDS_USED[$name]=$((SECONDS - t0))
  echo "=== [$name] rc=$rc in ${SECONDS_USED[$name]}s"
  return $rc
}

write_summary() {
  python3 - "$OUT/summary.json" <<EOF
import json, sys
status = {$(for k in "${!STATUS[@]}"; do printf '"%s": %s, ' "$k" "${STATUS[$k]}"; done)}
secs = {$(for k in "${!SECONDS_USED[@]}"; do printf '"%s": %s, ' "$k" "${SECONDS_USED[$k]}"; done)}
json.dump({"status_rc": status, "seconds": secs, "ok": all(v == 0 for v in status.values())},
          open(sys.argv[1], "w"), indent=2)
EOF
  cat "$OUT/summary.json"
}

# --- environment -------------------------------------------------------------------------
{
  date -u
  git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo "(not a git checkout)"
  nvidia-smi 2>&1 || echo "nvidia-smi unavailable"
  command -v nvcc && nvcc --version
  cmake --version | head -1
  ninja --version
  python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__); print(jax.devices())"
  python3 -c "import pybind11; print('pybind11', pybind11.__version__)"
  python3 -c "import optax; print('optax', optax.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# --- build: CPU + CUDA modules -----------------------------------------------------------
build() {
  cmake -S "$ROOT" -B "$BUILD_DIR" -G Ninja -DLOPT_CUDA=ON -DCMAKE_BUILD_TYPE=Release \
    -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v python3)" &&
    cmake --build "$BUILD_DIR" -j "$(nproc)" &&
    cp "$BUILD_DIR"/_lopt_cpu*.so "$BUILD_DIR"/_lopt_cuda*.so "$ROOT/lopt_ext/" &&
    python3 -c "
import jax, lopt_ext
from lopt_ext import _ffi
_ffi.ensure_registered()
m = _ffi._cuda_module()
print('CUDA module OK: targets', sorted(m.registrations()), 'runtime', m.cuda_runtime_version(),
      'devices', jax.devices())"
}
export -f build
export BUILD_DIR ROOT
if ! stage build "$BUILD_TIMEOUT" bash -c build > "$OUT/build.log" 2>&1; then
  cat "$OUT/build.log"
  echo "BUILD FAILED: see $OUT/build.log"
  write_summary
  exit 1
fi
grep -E "lopt_ext|CUDA module OK" "$OUT/build.log"

# --- GPU tests ---------------------------------------------------------------------------
stage pytest_gpu "$GPU_TEST_TIMEOUT" python3 -m pytest -q -rs python_tests/test_gpu.py \
  --junitxml="$OUT/pytest_gpu.xml" > "$OUT/pytest_gpu.log" 2>&1
tail -30 "$OUT/pytest_gpu.log"

# --- benchmark ---------------------------------------------------------------------------
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
stage bench "$BENCH_TIMEOUT" python3 bench/gpu_bench.py --out "$OUT/bench.json" --repeats 10 ${BENCH_ARGS:-} \
  > "$OUT/bench.log" 2>&1
tail -40 "$OUT/bench.log"

# --- the rest of the suite on the GPU ----------------------------------------------------
if [ "${SKIP_SUITE:-0}" != "1" ]; then
  stage pytest_all "$SUITE_TIMEOUT" python3 -m pytest -q -rs python_tests \
    --ignore=python_tests/test_gpu.py --junitxml="$OUT/pytest_all.xml" \
    > "$OUT/pytest_all.log" 2>&1
  tail -30 "$OUT/pytest_all.log"
fi

write_summary
python3 -c "import json,sys; sys.exit(0 if json.load(open('$OUT/summary.json'))['ok'] else 1)"
