// Driver of the fused MLPLOpt update on the CPU: per tensor a statistics pass (sums of
// squares of g, p and the six new momenta), the normalisation scales folded into the
// first-layer weights, then an apply pass that recomputes the features tile by tile,
// runs the MLP and writes the step and the momenta. Chunk boundaries depend only on
// shapes and partial sums are combined in chunk order: results do not depend on the
// thread count.
#include <cmath>
#include <new>

#include "lopt_cpu.h"
#include "lopt_cpu_tiles.h"

namespace lopt {
namespace {

constexpr int64_t kMlpChunk = 16384;  // elements per task

struct MlpWork {
  tiles::MlpPlan plan{};
  int64_t n_chunks = 0;
  std::vector<double> chunk_sumsq;  // [n_chunks][kMlpNormalized]
  std::vector<float> w0c;
};

std::string PlanMlp(const MlpConfig& cfg, bool write_delta, const MlpTensorArgs& a, MlpWork& w) {
  if (a.shape.empty()) return "tensor rank must be >= 1 (pass scalars as shape [1])";
  int64_t numel = 1;
  for (int64_t d : a.shape) {
    if (d < 1) return "tensor dimensions must be >= 1";
    if (numel > ((int64_t{1} << 62) / kMlpDecays) / d) return "tensor is too large";
    numel *= d;
  }
  if (!a.p || !a.g || !a.m || !a.out || !a.m_out || !a.packed) return "missing buffer";
  const MlpPackedLayout L(cfg);
  tiles::MlpPlan& P = w.plan;
  P.hidden = cfg.hidden;
  P.layers = cfg.hidden_layers;
  P.numel = numel;
  P.beta = a.packed + L.beta;
  P.one_minus_beta = a.packed + L.one_minus_beta;
  P.b0 = a.packed + L.b0;
  P.hidden_wb = a.packed + L.hidden;
  P.w_out = a.packed + L.w_out;
  P.b_out = a.packed + L.b_out;
  P.exp_mult = cfg.exp_mult;
  P.step_mult = cfg.step_mult;
  P.write_delta = write_delta;
  P.p = a.p, P.g = a.g, P.m = a.m, P.out = a.out, P.m_out = a.m_out;
  w.n_chunks = (numel + kMlpChunk - 1) / kMlpChunk;
  return "";
}

// x * rsqrt(1e-5 + mean x^2) per feature, folded into the first-layer rows.
void FoldScales(const MlpConfig& cfg, const float* packed, MlpWork& w) {
  const int H = cfg.hidden;
  const float* w0 = packed + MlpPackedLayout(cfg).w0;
  w.w0c.assign(static_cast<size_t>(kMlpNormalized) * H, 0.0f);
  const double n = static_cast<double>(w.plan.numel);
  for (int f = 0; f < kMlpNormalized; ++f) {
    double s = 0;
    for (int64_t c = 0; c < w.n_chunks; ++c) s += w.chunk_sumsq[c * kMlpNormalized + f];
    const float scale = 1.0f / std::sqrt(kNormEps + static_cast<float>(s / n));
    for (int h = 0; h < H; ++h) w.w0c[f * H + h] = scale * w0[f * H + h];
  }
  w.plan.w0c = w.w0c.data();
}

}  // namespace

std::string CpuMlpLOptUpdate(const MlpConfig& cfg, bool write_delta,
                             std::vector<MlpTensorArgs>& tensors,
                             const ParallelFor& pool_parallel_for) {
  if (const char* err = ValidateMlpConfig(cfg)) return err;
  const tiles::Kernels& K = tiles::SelectKernels();
  std::vector<MlpWork> work(tensors.size());
  int64_t total = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const std::string err = PlanMlp(cfg, write_delta, tensors[i], work[i]);
    if (!err.empty()) return "tensor " + std::to_string(i) + ": " + err;
    total += work[i].plan.numel;
  }
  const ParallelFor parallel_for = ChooseParallelFor(total, pool_parallel_for);
  try {
    std::vector<std::pair<int, int64_t>> tasks;
    for (size_t i = 0; i < work.size(); ++i) {
      work[i].chunk_sumsq.assign(work[i].n_chunks * kMlpNormalized, 0.0);
      for (int64_t c = 0; c < work[i].n_chunks; ++c) tasks.emplace_back(static_cast<int>(i), c);
    }
    auto chunk_end = [](const MlpWork& w, int64_t c) {
      return (c + 1) * kMlpChunk < w.plan.numel ? (c + 1) * kMlpChunk : w.plan.numel;
    };
    parallel_for(static_cast<int64_t>(tasks.size()), [&](int64_t t) {
      MlpWork& w = work[tasks[t].first];
      const int64_t c = tasks[t].second;
      K.mlp_stats(w.plan, c * kMlpChunk, chunk_end(w, c), w.chunk_sumsq.data() + c * kMlpNormalized);
    });
    for (size_t i = 0; i < work.size(); ++i) FoldScales(cfg, tensors[i].packed, work[i]);
    parallel_for(static_cast<int64_t>(tasks.size()), [&](int64_t t) {
      MlpWork& w = work[tasks[t].first];
      const int64_t c = tasks[t].second;
      K.mlp_apply(w.plan, c * kMlpChunk, chunk_end(w, c));
    });
  } catch (const std::bad_alloc&) {
    return "out of host memory for the update's tables";
  }
  return "";
}

}  // namespace lopt
