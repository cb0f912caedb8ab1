// Fused small_fc_lopt update on the CPU: framework-free entry point.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "lopt_config.h"

namespace lopt {

// Runs fn(i) for every i in [0, n), possibly concurrently, and returns when all
// calls have finished. Results must not depend on which thread runs which i.
using ParallelFor = std::function<void(int64_t n, const std::function<void(int64_t)>& fn)>;

// Below this many elements in a call (all tensors and members together) the passes run on
// the calling thread: waking a pool thread for each of the few short passes costs more than
// the work (a 3.6k-parameter model's whole step is ~10 us of arithmetic).
inline constexpr int64_t kSerialBelowElements = 32768;

// parallel_for, or a plain loop on this thread when the call is that small.
ParallelFor ChooseParallelFor(int64_t total_elements, const ParallelFor& parallel_for);

// Statistics computed elsewhere, e.g. reduced across the shards of a tensor that
// is split over devices. With them passes A and B are skipped and pass C uses:
// for rank >= 2 tensors the new v_row/v_col and the row/column factors (shaped
// like v_row/v_col), and for every tensor the normalisation scale of each
// reference-order feature (NumNormalizedFeatures of them). d0/d1 name the
// factored axes chosen on the GLOBAL shape, which a shard's shape may not show.
struct ExternalStats {
  int d0 = -1, d1 = -1;
  const float* v_row_new = nullptr;
  const float* v_col_new = nullptr;
  const float* row_factor = nullptr;
  const float* col_factor = nullptr;
  const float* scales = nullptr;
};

// One parameter tensor of one population member. Shapes exclude the population
// axis; rank 0 is not allowed here (callers pass scalars as shape [1]).
// State layout follows the reference: m is S + [dm], rms S + [dr]; rank >= 2
// tensors carry v_row (S without d0, + [da]) and v_col (S without d1, + [da]);
// rank 1 tensors carry v_full (S + [da]). Outputs may alias the matching inputs
// (and `out` may alias p or g): every element is read before it is written.
struct TensorArgs {
  std::vector<int64_t> shape;
  const float* p = nullptr;
  const float* g = nullptr;
  const float* m = nullptr;
  const float* rms = nullptr;
  const float* v_row = nullptr;
  const float* v_col = nullptr;
  const float* v_full = nullptr;
  float* out = nullptr;  // new params, or the update (-step) when write_delta
  float* m_out = nullptr;
  float* rms_out = nullptr;
  float* v_row_out = nullptr;
  float* v_col_out = nullptr;
  float* v_full_out = nullptr;
  const float* packed = nullptr;  // this member's PackedLayout buffer
  // Config::celo: where the scheduler's step multiplier of this tensor is (one float, in the
  // memory of the device that runs the step: the kernels read it, the host need not).
  const float* lr_mult = nullptr;
  bool has_external = false;      // use `external` instead of passes A and B;
  ExternalStats external;         // then v_row/v_col(_out) are not used
};

// How the MLP's first and hidden layers are evaluated:
//   kFp32: float32 FMAs, the reference to float32 round-off (default);
//   kBf16: inputs and weights rounded to bf16, exact products added in float32, on AMX
//          (refused where the CPU or OS lacks it). Used from kBf16MinHidden hidden units;
//          smaller MLPs keep float32, which is faster there.
enum class CpuPrecision { kFp32 = 0, kBf16 = 1 };
inline constexpr int kBf16MinHidden = 16;

// True when this CPU can run CpuPrecision::kBf16.
bool CpuHasBf16();

// Applies one step to every tensor. Returns an empty string on success, else an
// error message; on error nothing has been written.
std::string CpuFusedUpdate(const Config& cfg, bool write_delta, std::vector<TensorArgs>& tensors,
                           const ParallelFor& parallel_for,
                           CpuPrecision precision = CpuPrecision::kFp32);

// Local sums of squares of the compact per-element features (the order of
// tiles::NumCompactFeatures) of every tensor, from external row/column factors
// (has_external must be set; scales and the outputs are not used): the
// statistics of a tensor shard before they are reduced across devices.
// sums[i] receives NumCompactFeatures floats for tensors[i].
std::string CpuPartialSumsq(const Config& cfg, std::vector<TensorArgs>& tensors,
                            const std::vector<float*>& sums, const ParallelFor& parallel_for);

// One parameter tensor of one population member for MLPLOpt (lopt_mlp_cpu.cc): m is
// S + [kMlpDecays]; rank 0 is passed as shape [1]. Outputs may alias the matching inputs
// (`out` may alias p or g).
struct MlpTensorArgs {
  std::vector<int64_t> shape;
  const float* p = nullptr;
  const float* g = nullptr;
  const float* m = nullptr;
  float* out = nullptr;  // new params, or the update (-step) when write_delta
  float* m_out = nullptr;
  const float* packed = nullptr;  // this member's MlpPackedLayout buffer
};

// One MLPLOpt step for every tensor: a statistics pass (sums of squares of the 8
// normalised features) and an apply pass. Empty string on success, else an error
// message; on error nothing has been written.
std::string CpuMlpLOptUpdate(const MlpConfig& cfg, bool write_delta,
                             std::vector<MlpTensorArgs>& tensors, const ParallelFor& parallel_for);

// One tensor of one member for CpuScaleSums: n elements; m holds n records of dm floats and
// rms n records of dr floats (the NEW accumulators a step returned).
struct ScaleSumsArgs {
  int64_t n = 0;
  int dm = 0, dr = 0;
  const float* p = nullptr;
  const float* m = nullptr;
  const float* rms = nullptr;
  float* out = nullptr;  // 2 + dm floats: sum p^2, sum m[:, k]^2 for each k, sum of all rms
};

// The tensor-wide sums ScaledSmallFcLOpt's step scale needs (lopt_ext.scaled.scale_sums),
// on the pool: XLA:CPU reduces a 10M-element tensor on one thread at ~9 GB/s. Accumulated in
// double over fixed chunks combined in order: the same bits for any thread count.
std::string CpuScaleSums(std::vector<ScaleSumsArgs>& tensors, const ParallelFor& parallel_for);

}  // namespace lopt
