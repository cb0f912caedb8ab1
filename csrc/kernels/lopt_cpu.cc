// Driver of the fused CPU update: three passes over each tensor with small
// reductions in between, all tensors of a call in the same parallel loops.
//   A  (rank >= 2 only) sums g^2 along both factored axes -> new v_row, v_col,
//      row/column factors.
//   B  sums the squares of every per-element feature -> normalisation scales,
//      folded into the first-layer weights (and into per-row/column tables).
//   C  recomputes the features tile by tile, runs the MLP and writes the step
//      and the new state.
// Work is cut into chunks whose boundaries depend only on shapes and partial
// sums are combined in chunk order, so results do not depend on thread count.
#include "lopt_cpu.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <new>

#include "lopt_cpu_tiles.h"

namespace lopt {
namespace {

constexpr int64_t kChunk = 16384;     // elements per pass B/C task
constexpr int64_t kLineBlockMin = 32;  // lines per pass A task, at least

using tiles::TensorPlan;

struct Work {
  TensorArgs* args = nullptr;
  TensorPlan plan{};
  bool line_is_row = false;  // factored: line-indexed tables are v_row
  int64_t n_line = 0, n_cross = 0, n_group = 0;
  int64_t line_block = 0, n_line_blocks = 0;  // pass A: blocks of lines per (a, b)
  int64_t n_chunks = 0;
  std::vector<double> line_sums, cross_partial;
  int64_t cross_stride = 0;  // row length of the transposed cross tables
  std::vector<float> line_fac, cross_fac_t, line_tab, cross_tab_t;
  std::vector<float> line_rsqrt, cross_rsqrt;  // factored: rsqrt(new v + 1e-8), v's layout
  const float* v_row_new = nullptr;  // new factored accumulators (tables of pass C)
  const float* v_col_new = nullptr;
  std::vector<float> w0c;
  std::vector<uint32_t> amx_first, amx_hidden;  // bf16 precision: the layers as AMX tiles
  std::vector<float> amx_hidden_bias;
  std::vector<double> chunk_sumsq;  // [n_chunks][num_compact]
  // Logical-feature mean squares known before pass B (factored v features).
  std::vector<double> table_mean_sq;
};

inline float RSqrt(float x) { return 1.0f / std::sqrt(x); }

std::string Plan(const Config& cfg, bool write_delta, Work& w) {
  TensorArgs& a = *w.args;
  const int rank = static_cast<int>(a.shape.size());
  if (rank < 1) return "tensor rank must be >= 1 (pass scalars as shape [1])";
  int64_t numel = 1;
  for (int64_t d : a.shape) {
    if (d < 1) return "tensor dimensions must be >= 1";
    if (numel > (int64_t{1} << 62) / d) return "tensor is too large";
    numel *= d;
  }
  const bool factored = rank >= 2 && cfg.da > 0;  // da == 0: no accumulators at all
  if (!a.p || !a.g || !a.m || !a.rms || !a.out || !a.m_out || !a.rms_out || !a.packed)
    return "missing buffer";
  const ExternalStats& ext = a.external;
  if (cfg.celo && a.has_external) return "Celo's rule has no external-statistics path";
  if (cfg.celo && !a.lr_mult) return "missing lr_mult";
  if (a.has_external) {
    if (!ext.scales) return "missing external scales";
    if (factored && (!ext.v_row_new || !ext.v_col_new || !ext.row_factor || !ext.col_factor))
      return "missing external factored statistics";
    if (factored && (ext.d0 < 0 || ext.d0 >= rank || ext.d1 < 0 || ext.d1 >= rank || ext.d0 == ext.d1))
      return "external factored axes out of range";
    if (!factored && (!a.v_full || !a.v_full_out)) return "missing accumulator buffer";
  } else if (cfg.da > 0 && (factored ? (!a.v_row || !a.v_col || !a.v_row_out || !a.v_col_out)
                                     : (!a.v_full || !a.v_full_out))) {
    return "missing accumulator buffer";
  }
  const PackedLayout L(cfg);
  TensorPlan& P = w.plan;
  P.hidden = cfg.hidden;
  P.layers = cfg.hidden_layers;
  P.dm = cfg.dm;
  P.dr = cfg.dr;
  P.da = cfg.da;
  P.num_compact = tiles::NumCompactFeatures(cfg.dm, cfg.dr, cfg.da, factored, cfg.celo);
  P.factored = factored;
  P.celo = cfg.celo;
  P.mom_fac_eps = cfg.celo ? 0.0f : kMomFacEps;
  P.numel = numel;
  P.mom_beta = a.packed + L.mom_beta;
  P.mom_1mb = a.packed + L.mom_1mb;
  P.rms_beta = a.packed + L.rms_beta;
  P.rms_1mb = a.packed + L.rms_1mb;
  P.fac_beta = a.packed + L.fac_beta;
  P.fac_1mb = a.packed + L.fac_1mb;
  P.b0 = a.packed + L.b0;
  P.hidden_wb = a.packed + L.hidden;
  P.w_out = a.packed + L.w_out;
  P.b_out = a.packed + L.b_out;
  P.exp_mult = cfg.exp_mult;
  P.step_mult = cfg.step_mult;  // Celo: times lr_mult and the parameter scale (FinishB)
  P.write_delta = write_delta;
  P.amx_first = P.amx_hidden = nullptr;
  P.amx_hidden_bias = nullptr;
  P.p = a.p;
  P.g = a.g;
  P.m = a.m;
  P.rms = a.rms;
  P.v_full = a.v_full;
  P.out = a.out;
  P.m_out = a.m_out;
  P.rms_out = a.rms_out;
  P.v_full_out = a.v_full_out;
  w.n_chunks = (numel + kChunk - 1) / kChunk;
  if (!factored) {
    P.A = P.N1 = P.B = P.C = 1;
    P.N2 = P.W = numel;
    return "";
  }
  int d1 = 0, d0 = 0;
  if (a.has_external) {
    d1 = ext.d1;
    d0 = ext.d0;
  } else {
    FactoredDims(a.shape.data(), rank, &d1, &d0);
  }
  const FactoredView view = MakeFactoredView(a.shape.data(), rank, d1, d0);
  P.A = view.A, P.N1 = view.N1, P.B = view.B, P.N2 = view.N2, P.C = view.C;
  P.W = P.N2 * P.C;
  w.line_is_row = view.line_is_row;
  w.n_line = P.A * P.N1 * P.B * P.C;
  w.n_cross = P.A * P.B * P.W;
  w.n_group = P.A * P.B * P.C;
  w.cross_stride = w.n_cross + tiles::kTileLanes;
  P.cross_stride = w.cross_stride;
  w.line_block = (kChunk + P.W - 1) / P.W;
  if (w.line_block < kLineBlockMin) w.line_block = kLineBlockMin;
  if (w.line_block > P.N1) w.line_block = P.N1;
  w.n_line_blocks = (P.N1 + w.line_block - 1) / w.line_block;
  return "";
}

// Pass A task: lines [i0, i1) of slice (a, b).
void PassA(const tiles::Kernels& K, Work& w, int64_t task) {
  const TensorPlan& P = w.plan;
  const int64_t ab = task / w.n_line_blocks, blk = task % w.n_line_blocks;
  const int64_t a = ab / P.B, b = ab % P.B;
  const int64_t i0 = blk * w.line_block;
  const int64_t i1 = i0 + w.line_block < P.N1 ? i0 + w.line_block : P.N1;
  double* cross = w.cross_partial.data() + task * P.W;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t line = (a * P.N1 + i) * P.B + b;
    K.gsq_line(P.g + line * P.W, P.W, P.C, P.celo, w.line_sums.data() + line * P.C, cross);
  }
}

// Row/column factors in the layouts of TensorPlan (line-major, cross transposed).
void SetFactorTables(int da, const float* row_fac, const float* col_fac, Work& w) {
  const float* line = w.line_is_row ? row_fac : col_fac;
  const float* cross = w.line_is_row ? col_fac : row_fac;
  w.line_fac.assign(line, line + w.n_line * da);
  w.cross_fac_t.assign(da * w.cross_stride, 0.0f);
  for (int64_t i = 0; i < w.n_cross; ++i)
    for (int k = 0; k < da; ++k) w.cross_fac_t[k * w.cross_stride + i] = cross[i * da + k];
  w.plan.line_fac = w.line_fac.data();
  w.plan.cross_fac_t = w.cross_fac_t.data();
}

// Pass A and B replaced by statistics from elsewhere (ExternalStats).
void UseExternalFactors(const Config& cfg, Work& w) {
  const ExternalStats& ext = w.args->external;
  w.v_row_new = ext.v_row_new;
  w.v_col_new = ext.v_col_new;
  SetFactorTables(cfg.da, ext.row_factor, ext.col_factor, w);
}

// rsqrt(v + 1e-8) of the new factored accumulators, line- and cross-indexed, for the
// v-feature statistics (FinishA) and the first-layer tables (FinishB).
void RSqrtTables(const tiles::Kernels& K, const float* v_line, const float* v_cross, Work& w) {
  const int64_t da = w.plan.da;
  w.line_rsqrt.resize(w.n_line * da);
  w.cross_rsqrt.resize(w.n_cross * da);
  constexpr float kNoFloor = -std::numeric_limits<float>::infinity();  // max(x, -inf) is x, NaN too
  K.rsqrt_tables(v_line, w.n_line * da, kFacRsqrtEps, kNoFloor, w.line_rsqrt.data());
  K.rsqrt_tables(v_cross, w.n_cross * da, kFacRsqrtEps, kNoFloor, w.cross_rsqrt.data());
}

// Between A and B: new factored accumulators, factors and v-feature statistics.
void FinishA(const tiles::Kernels& K, const Config& cfg, const FeatureIndex& F, Work& w) {
  const TensorPlan& P = w.plan;
  TensorArgs& a = *w.args;
  const int da = cfg.da;
  // Means of g^2 along each factored axis, then the accumulator update.
  std::vector<float> v_line(w.n_line * da), v_cross(w.n_cross * da);
  const float* old_line = w.line_is_row ? a.v_row : a.v_col;
  const float* old_cross = w.line_is_row ? a.v_col : a.v_row;
  for (int64_t i = 0; i < w.n_line; ++i) {
    const float mean = static_cast<float>(w.line_sums[i] / static_cast<double>(P.N2));
    for (int k = 0; k < da; ++k)
      v_line[i * da + k] = P.fac_beta[k] * old_line[i * da + k] + P.fac_1mb[k] * mean;
  }
  for (int64_t ab = 0; ab < P.A * P.B; ++ab)
    for (int64_t t = 0; t < P.W; ++t) {
      double s = 0;
      for (int64_t blk = 0; blk < w.n_line_blocks; ++blk)
        s += w.cross_partial[(ab * w.n_line_blocks + blk) * P.W + t];
      const float mean = static_cast<float>(s / static_cast<double>(P.N1));
      const int64_t i = ab * P.W + t;
      for (int k = 0; k < da; ++k)
        v_cross[i * da + k] = P.fac_beta[k] * old_cross[i * da + k] + P.fac_1mb[k] * mean;
    }
  const std::vector<float>& v_row = w.line_is_row ? v_line : v_cross;
  const std::vector<float>& v_col = w.line_is_row ? v_cross : v_line;
  // Mean of the new v_row over the d1 axis: groups are (a, b, c) in both layouts.
  std::vector<double> group_sum(w.n_group * da, 0.0);
  const int64_t row_entries = static_cast<int64_t>(v_row.size()) / da;
  auto row_group = [&](int64_t i) {
    if (w.line_is_row) {  // line index ((a*N1 + i)*B + b)*C + c, mean over i
      const int64_t c = i % P.C, line = i / P.C;
      const int64_t b = line % P.B, aa = (line / P.B) / P.N1;
      return (aa * P.B + b) * P.C + c;
    }
    // cross index (a*B + b)*W + j*C + c, mean over j
    const int64_t ab = i / P.W, c = (i % P.W) % P.C;
    return ab * P.C + c;
  };
  for (int64_t i = 0; i < row_entries; ++i) {
    const int64_t gi = row_group(i);
    for (int k = 0; k < da; ++k) group_sum[gi * da + k] += v_row[i * da + k];
  }
  const double d1_size = static_cast<double>(w.line_is_row ? P.N1 : P.N2);
  std::vector<float> row_fac(v_row.size()), col_fac(v_col.size());
  for (int64_t i = 0; i < row_entries; ++i) {
    const int64_t gi = row_group(i);
    for (int k = 0; k < da; ++k) {
      const float mean = static_cast<float>(group_sum[gi * da + k] / d1_size);
      row_fac[i * da + k] = v_row[i * da + k] / (mean + kRowMeanEps);
    }
  }
  // SafeRSqrt of the row ratios and of v_col.
  K.rsqrt_tables(row_fac.data(), static_cast<int64_t>(row_fac.size()), 0.0f, kSafeRsqrtFloor, row_fac.data());
  K.rsqrt_tables(v_col.data(), static_cast<int64_t>(v_col.size()), 0.0f, kSafeRsqrtFloor, col_fac.data());
  RSqrtTables(K, v_line.data(), v_cross.data(), w);
  // Mean squares of the broadcast v features equal their means over the entries.
  w.table_mean_sq.assign(F.count, 0.0);
  auto mean_sq = [&](const std::vector<float>& v, const std::vector<float>& rs, int base_v, int base_rs) {
    const int64_t n = static_cast<int64_t>(v.size()) / da;
    for (int k = 0; k < da; ++k) {
      double sv = 0, sr = 0;
      for (int64_t i = 0; i < n; ++i) {
        const float x = v[i * da + k];
        const float r = rs[i * da + k];
        sv += double(x * x);
        sr += double(r * r);
      }
      w.table_mean_sq[base_v + k] = sv / static_cast<double>(n);
      w.table_mean_sq[base_rs + k] = sr / static_cast<double>(n);
    }
  };
  mean_sq(v_row, w.line_is_row ? w.line_rsqrt : w.cross_rsqrt, F.row_v, F.row_rsqrt);
  mean_sq(v_col, w.line_is_row ? w.cross_rsqrt : w.line_rsqrt, F.col_v, F.col_rsqrt);
  // The new accumulators are outputs and the source of pass C's tables.
  std::memcpy(w.line_is_row ? a.v_row_out : a.v_col_out, v_line.data(), v_line.size() * 4);
  std::memcpy(w.line_is_row ? a.v_col_out : a.v_row_out, v_cross.data(), v_cross.size() * 4);
  w.v_row_new = a.v_row_out;
  w.v_col_new = a.v_col_out;
  SetFactorTables(da, row_fac.data(), col_fac.data(), w);
  w.line_sums.clear();
  w.line_sums.shrink_to_fit();
  w.cross_partial.clear();
  w.cross_partial.shrink_to_fit();
}

// Between B and C: normalisation scales folded into the first layer.
void FinishB(const tiles::Kernels& Kn, const Config& cfg, const FeatureIndex& F, Work& w) {
  const TensorPlan& P = w.plan;
  TensorArgs& a = *w.args;
  const int H = cfg.hidden, dm = cfg.dm, dr = cfg.dr, da = cfg.da, K = P.num_compact;
  std::vector<double> sumsq(K, 0.0);
  for (int64_t c = 0; c < static_cast<int64_t>(w.chunk_sumsq.size()) / K; ++c)
    for (int f = 0; f < K; ++f) sumsq[f] += w.chunk_sumsq[c * K + f];
  // Logical feature of each compact feature (and a twin for rank <= 1 v features).
  std::vector<int> logical(K), twin(K, -1);
  int f = 0;
  logical[f++] = F.g;
  logical[f++] = F.p;
  for (int k = 0; k < dm; ++k) logical[f++] = F.m + k;
  for (int j = 0; j < dr; ++j) logical[f++] = F.rms + j;
  for (int k = 0; k < dm; ++k) logical[f++] = F.m_rsqrt + k;
  for (int j = 0; j < dr; ++j) logical[f++] = F.rsqrt_rms + j;
  for (int k = 0; k < da; ++k) logical[f++] = F.fac_g + k;
  for (int k = 0; k < da; ++k) logical[f++] = F.fac_m + k;
  if (!P.factored) {
    for (int k = 0; k < da; ++k) { twin[f] = F.col_v + k; logical[f++] = F.row_v + k; }
    for (int k = 0; k < da; ++k) { twin[f] = F.col_rsqrt + k; logical[f++] = F.row_rsqrt + k; }
  }
  if (cfg.celo) {
    logical[f++] = F.clip_g;
    for (int j = 0; j < dr; ++j) logical[f++] = F.g_rsqrt + j;
    // Celo's step is scaled by the tensor's RMS, sqrt(mean(p^2) + 1e-9): pass B summed p^2.
    const float mean_p2 = static_cast<float>(sumsq[1] / static_cast<double>(P.numel));
    w.plan.step_mult = cfg.step_mult * *a.lr_mult * std::sqrt(mean_p2 + kCeloParamScaleEps);
  }
  std::vector<float> scale(F.count, 0.0f);
  if (a.has_external) {
    scale.assign(a.external.scales, a.external.scales + F.count);
  } else {
    const double n = static_cast<double>(P.numel);
    for (int c = 0; c < K; ++c) {
      const float s = RSqrt(kNormEps + static_cast<float>(sumsq[c] / n));
      scale[logical[c]] = s;
      if (twin[c] >= 0) scale[twin[c]] = s;
    }
    if (P.factored)
      for (int lf : {F.row_v, F.col_v, F.row_rsqrt, F.col_rsqrt})
        for (int k = 0; k < da; ++k)
          scale[lf + k] = RSqrt(kNormEps + static_cast<float>(w.table_mean_sq[lf + k]));
  }
  const float* w0 = a.packed + PackedLayout(cfg).w0;
  w.w0c.assign(static_cast<size_t>(K) * H, 0.0f);
  for (int c = 0; c < K; ++c)
    for (int h = 0; h < H; ++h) {
      float v = scale[logical[c]] * w0[logical[c] * H + h];
      if (twin[c] >= 0) v += scale[twin[c]] * w0[twin[c] * H + h];
      w.w0c[c * H + h] = v;
    }
  w.plan.w0c = w.w0c.data();
  if (!P.factored) return;
  // First-layer contribution of the broadcast v features, once per row/column:
  // entry i, output h gets sum_k s*w0[v_k][h]*v + s*w0[rsqrt_k][h]*rsqrt(v + 1e-8).
  auto table = [&](const float* v, const float* rs, int64_t n_entries, int base_v, int base_rs,
                   std::vector<float>& out, int64_t entry_stride, int64_t h_stride) {
    for (int64_t i = 0; i < n_entries; ++i)
      for (int k = 0; k < da; ++k) {
        const float x = v[i * da + k] * scale[base_v + k];
        const float r = rs[i * da + k] * scale[base_rs + k];
        const float* wv = w0 + (base_v + k) * H;
        const float* wr = w0 + (base_rs + k) * H;
        for (int h = 0; h < H; ++h) out[i * entry_stride + h * h_stride] += x * wv[h] + r * wr[h];
      }
  };
  const bool row_is_line = w.line_is_row;
  const float* v_line = row_is_line ? w.v_row_new : w.v_col_new;
  const float* v_cross = row_is_line ? w.v_col_new : w.v_row_new;
  const int line_v = row_is_line ? F.row_v : F.col_v, line_rs = row_is_line ? F.row_rsqrt : F.col_rsqrt;
  const int cross_v = row_is_line ? F.col_v : F.row_v, cross_rs = row_is_line ? F.col_rsqrt : F.row_rsqrt;
  w.line_tab.assign(w.n_line * H, 0.0f);
  w.cross_tab_t.assign(H * w.cross_stride, 0.0f);
  if (a.has_external) RSqrtTables(Kn, v_line, v_cross, w);  // else FinishA made them
  table(v_line, w.line_rsqrt.data(), w.n_line, line_v, line_rs, w.line_tab, H, 1);
  table(v_cross, w.cross_rsqrt.data(), w.n_cross, cross_v, cross_rs, w.cross_tab_t, 1, w.cross_stride);
  w.plan.line_tab = w.line_tab.data();
  w.plan.cross_tab_t = w.cross_tab_t.data();
}

}  // namespace

ParallelFor ChooseParallelFor(int64_t total_elements, const ParallelFor& parallel_for) {
  if (total_elements >= kSerialBelowElements) return parallel_for;
  return [](int64_t n, const std::function<void(int64_t)>& fn) {
    for (int64_t i = 0; i < n; ++i) fn(i);
  };
}

bool CpuHasBf16() { return tiles::SelectBf16Kernels() != nullptr; }

std::string CpuFusedUpdate(const Config& cfg, bool write_delta, std::vector<TensorArgs>& tensors,
                           const ParallelFor& pool_parallel_for, CpuPrecision precision) {
  if (const char* err = ValidateConfig(cfg)) return err;
  const FeatureIndex F(cfg.dm, cfg.dr, cfg.da, cfg.celo);
  if (precision != CpuPrecision::kBf16 && precision != CpuPrecision::kFp32)
    return "unknown CPU precision";
  if (precision == CpuPrecision::kBf16 && !CpuHasBf16())
    return "bf16 precision needs a CPU with AMX-BF16 (Intel Xeon 4th generation or later), "
           "permission to use it, and LOPT_CPU_ISA unset or avx512";
  // Below 16 hidden units a 16-wide tile is mostly padding: float32 is faster there.
  const bool bf16 = precision == CpuPrecision::kBf16 && cfg.hidden >= kBf16MinHidden;
  const tiles::Kernels& K = bf16 ? *tiles::SelectBf16Kernels() : tiles::SelectKernels();
  std::vector<Work> work(tensors.size());
  int64_t total = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    work[i].args = &tensors[i];
    std::string err = Plan(cfg, write_delta, work[i]);
    if (!err.empty()) return "tensor " + std::to_string(i) + ": " + err;
    total += work[i].plan.numel;
  }
  const ParallelFor parallel_for = ChooseParallelFor(total, pool_parallel_for);
  try {
    if (bf16 && cfg.hidden_layers > 1) {
      // The hidden layers belong to the member, not the tensor: packed once per member
      // (tensors of one member share its packed buffer) and shared by its tensors' plans.
      const int H = cfg.hidden;
      const int64_t words = tiles::AmxLayerWords(H, H), bias_floats = 16 * tiles::AmxBiasRows(H);
      std::vector<const Work*> packed_by;  // the Work holding each member's packed layers
      for (Work& w : work) {
        const Work* owner = nullptr;
        for (const Work* o : packed_by)
          if (o->plan.hidden_wb == w.plan.hidden_wb) owner = o;
        if (!owner) {
          w.amx_hidden.resize((cfg.hidden_layers - 1) * words);
          w.amx_hidden_bias.resize((cfg.hidden_layers - 1) * bias_floats);
          for (int l = 1; l < cfg.hidden_layers; ++l) {
            const float* wb = w.plan.hidden_wb + int64_t{l - 1} * (H * H + H);
            tiles::PackAmxLayer(wb, H, H, w.amx_hidden.data() + (l - 1) * words);
            tiles::PackAmxBias(wb + H * H, H, w.amx_hidden_bias.data() + (l - 1) * bias_floats);
          }
          packed_by.push_back(&w);
          owner = &w;
        }
        w.plan.amx_hidden = owner->amx_hidden.data();
        w.plan.amx_hidden_bias = owner->amx_hidden_bias.data();
      }
    }
    // Pass A (factored tensors).
    std::vector<std::pair<int, int64_t>> tasks;
    for (size_t i = 0; i < work.size(); ++i) {
      Work& w = work[i];
      if (!w.plan.factored || w.args->has_external) continue;
      const int64_t n_tasks = w.plan.A * w.plan.B * w.n_line_blocks;
      w.line_sums.assign(w.n_line, 0.0);
      w.cross_partial.assign(n_tasks * w.plan.W, 0.0);
      for (int64_t t = 0; t < n_tasks; ++t) tasks.emplace_back(static_cast<int>(i), t);
    }
    parallel_for(static_cast<int64_t>(tasks.size()),
                 [&](int64_t t) { PassA(K, work[tasks[t].first], tasks[t].second); });
    parallel_for(static_cast<int64_t>(work.size()), [&](int64_t i) {
      Work& w = work[i];
      if (w.plan.factored) {
        if (w.args->has_external) UseExternalFactors(cfg, w);
        else FinishA(K, cfg, F, w);
      }
      if (!w.args->has_external) w.chunk_sumsq.assign(w.n_chunks * w.plan.num_compact, 0.0);
    });
    // Pass B: feature statistics.
    tasks.clear();
    for (size_t i = 0; i < work.size(); ++i)
      if (!work[i].args->has_external)
        for (int64_t c = 0; c < work[i].n_chunks; ++c) tasks.emplace_back(static_cast<int>(i), c);
    parallel_for(static_cast<int64_t>(tasks.size()), [&](int64_t t) {
      Work& w = work[tasks[t].first];
      const int64_t c = tasks[t].second;
      const int64_t e1 = (c + 1) * kChunk < w.plan.numel ? (c + 1) * kChunk : w.plan.numel;
      K.stats(w.plan, c * kChunk, e1, w.chunk_sumsq.data() + c * w.plan.num_compact);
    });
    tasks.clear();
    for (size_t i = 0; i < work.size(); ++i)
      for (int64_t c = 0; c < work[i].n_chunks; ++c) tasks.emplace_back(static_cast<int>(i), c);
    parallel_for(static_cast<int64_t>(work.size()), [&](int64_t i) {
      Work& w = work[i];
      FinishB(K, cfg, F, w);
      if (bf16) {  // the first layer's weights exist once the scales are folded in
        w.amx_first.resize(tiles::AmxLayerWords(w.plan.num_compact, cfg.hidden));
        tiles::PackAmxLayer(w.plan.w0c, w.plan.num_compact, cfg.hidden, w.amx_first.data());
        w.plan.amx_first = w.amx_first.data();
      }
    });
    // Pass C: the MLP and all writes.
    parallel_for(static_cast<int64_t>(tasks.size()), [&](int64_t t) {
      Work& w = work[tasks[t].first];
      const int64_t c = tasks[t].second;
      const int64_t e1 = (c + 1) * kChunk < w.plan.numel ? (c + 1) * kChunk : w.plan.numel;
      K.apply(w.plan, c * kChunk, e1);
    });
  } catch (const std::bad_alloc&) {
    return "out of host memory for the update's row/column tables";
  }
  return "";
}


std::string CpuPartialSumsq(const Config& cfg, std::vector<TensorArgs>& tensors,
                            const std::vector<float*>& sums, const ParallelFor& parallel_for) {
  if (const char* err = ValidateConfig(cfg)) return err;
  const tiles::Kernels& K = tiles::SelectKernels();
  std::vector<Work> work(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (!tensors[i].has_external) return "tensor " + std::to_string(i) + ": needs external statistics";
    work[i].args = &tensors[i];
    std::string err = Plan(cfg, false, work[i]);
    if (!err.empty()) return "tensor " + std::to_string(i) + ": " + err;
  }
  try {
    std::vector<std::pair<int, int64_t>> tasks;
    for (size_t i = 0; i < work.size(); ++i) {
      Work& w = work[i];
      if (w.plan.factored) UseExternalFactors(cfg, w);
      w.chunk_sumsq.assign(w.n_chunks * w.plan.num_compact, 0.0);
      for (int64_t c = 0; c < w.n_chunks; ++c) tasks.emplace_back(static_cast<int>(i), c);
    }
    parallel_for(static_cast<int64_t>(tasks.size()), [&](int64_t t) {
      Work& w = work[tasks[t].first];
      const int64_t c = tasks[t].second;
      const int64_t e1 = (c + 1) * kChunk < w.plan.numel ? (c + 1) * kChunk : w.plan.numel;
      K.stats(w.plan, c * kChunk, e1, w.chunk_sumsq.data() + c * w.plan.num_compact);
    });
    for (size_t i = 0; i < work.size(); ++i) {  // combined in chunk order: deterministic
      const int nc = work[i].plan.num_compact;
      for (int f = 0; f < nc; ++f) {
        double s = 0;
        for (int64_t c = 0; c < work[i].n_chunks; ++c) s += work[i].chunk_sumsq[c * nc + f];
        sums[i][f] = static_cast<float>(s);
      }
    }
  } catch (const std::bad_alloc&) {
    return "out of host memory for the row/column tables";
  }
  return "";
}

}  // namespace lopt
