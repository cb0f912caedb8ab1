// Fused small_fc_lopt update on NVIDIA GPUs: framework-free entry point.
// Raw device pointers, sizes and a cudaStream_t; no XLA or pybind11 here.
#pragma once

#if defined(LOPT_CUDA_EMULATION)
#include "cuda_emu.h"  // host emulation of the CUDA subset used here (tests only)
#else
#include <cuda_runtime.h>
#endif

#include <cstddef>
#include <functional>
#include <string>
#include <vector>

#include "lopt_config.h"
#include "lopt_cpu.h"  // TensorArgs: the same per-tensor description as the CPU driver

namespace lopt::cuda {

// How the MLP is evaluated on the GPU.
enum class Precision : int {
  // float32 FMAs on CUDA cores: agrees with the reference to float32 round-off.
  kFp32 = 0,
  // TF32 tensor-core MMAs (inputs rounded to 10 mantissa bits, fp32 accumulation)
  // for the hidden layers; the output layer stays fp32. Used for hidden sizes
  // 16, 32 and 64 (other sizes run the fp32 path).
  kTf32 = 1,
};

// Returns device memory of at least `bytes` (256-byte aligned) that stays valid
// for the work enqueued by the current call, or nullptr.
using ScratchFn = std::function<void*(size_t bytes)>;

// Enqueues one fused step for every tensor on `stream`. Pointers in `tensors`
// are device pointers; outputs may alias the matching inputs as for the CPU
// driver. Never synchronises and never allocates except through `scratch`.
// Returns an empty string on success, else an error (nothing enqueued when the
// error is found before the first launch).
std::string CudaFusedUpdate(const Config& cfg, bool write_delta, Precision precision,
                            const std::vector<TensorArgs>& tensors, const ScratchFn& scratch,
                            cudaStream_t stream);

// True when the tensor-core path is used for this configuration and precision.
bool UsesTensorCores(const Config& cfg, Precision precision);

}  // namespace lopt::cuda
