// Hot loops of the CPU update, compiled once per instruction set and chosen at
// run time (lopt_cpu_dispatch.cc). Plain structs and function pointers only, so
// no inline function or template is shared between objects built with different
// instruction sets.
#pragma once

#include <cstdint>

#include "lopt_config.h"

namespace lopt::tiles {

// Everything the per-element loops need for one tensor of one member.
struct TensorPlan {
  int hidden, layers, dm, dr, da;
  int num_compact;  // per-element features actually computed (see CompactFeatures)
  bool factored;
  int64_t numel;
  // Factored tensors are viewed as (A, N1, B, N2, C): N1, N2 the two factored axes
  // in memory order. A "line" is one (a, i, b) with W = N2 * C contiguous elements.
  // Line-indexed tables follow S without the later factored axis (index l*C + c),
  // cross-indexed tables S without the earlier one (index (a*B + b)*W + t).
  int64_t A, N1, B, N2, C, W;
  const float *mom_beta, *mom_1mb, *rms_beta, *rms_1mb, *fac_beta, *fac_1mb;
  const float* w0c;     // [num_compact][H], normalisation scales folded in
  const float* b0;      // [H]
  const float* hidden_wb;  // (layers - 1) x (w[H][H], b[H])
  const float* w_out;   // [H][2]
  const float* b_out;   // [2]
  // Row/column factors and first-layer contributions of the broadcast v features.
  // Line-indexed tables are [n_line][da] and [n_line][H]; cross-indexed ones are
  // transposed, [da][cross_stride] and [H][cross_stride], so that the 16 lanes of a
  // tile (consecutive cross indices) load as one vector. cross_stride >= n_cross +
  // kTileLanes, the padding keeps a tail tile's loads in bounds.
  const float* line_fac;
  const float* cross_fac_t;
  const float* line_tab;
  const float* cross_tab_t;
  int64_t cross_stride;
  float exp_mult, step_mult;
  bool write_delta;
  const float *p, *g, *m, *rms, *v_full;
  float *out, *m_out, *rms_out, *v_full_out;
};

// MLPLOpt: everything the per-element loops need for one tensor of one member.
struct MlpPlan {
  int hidden, layers;
  int64_t numel;
  const float *beta, *one_minus_beta;  // [kMlpDecays]
  const float* w0c;                    // [kMlpNormalized][H], normalisation scales folded in
  const float* b0;                     // [H], step features folded in
  const float* hidden_wb;              // (layers - 1) x (w[H][H], b[H])
  const float* w_out;                  // [H][2]
  const float* b_out;                  // [2]
  float exp_mult, step_mult;
  bool write_delta;
  const float *p, *g, *m;
  float *out, *m_out;
};

inline constexpr int kTileLanes = 16;  // elements per tile (one AVX-512 vector of floats)

struct Kernels {
  const char* isa;
  // Sum of g^2 + 1e-30 over one line: line_sums[c] += over t with t % C == c;
  // cross_acc[t] += for every t (length W).
  void (*gsq_line)(const float* g, int64_t W, int64_t C, double* line_sums, double* cross_acc);
  // Adds the squares of the compact per-element features of elements [e0, e1).
  void (*stats)(const TensorPlan& plan, int64_t e0, int64_t e1, double* sumsq);
  // Writes new state and params (or the update) for elements [e0, e1).
  void (*apply)(const TensorPlan& plan, int64_t e0, int64_t e1);
  // MLPLOpt: sums of squares of g, p and the new momenta of elements [e0, e1)
  // (kMlpNormalized values added to sumsq), and the step with its writes.
  void (*mlp_stats)(const MlpPlan& plan, int64_t e0, int64_t e1, double* sumsq);
  void (*mlp_apply)(const MlpPlan& plan, int64_t e0, int64_t e1);
};

// Compact per-element feature order. Both kinds start with
//   g, p, m[dm], rms[dr], m*rsqrt(rms+1e-6)[dm], rsqrt(rms+1e-6)[dr], fac_g[da], fac_m[da]
// and rank <= 1 tensors add v[da], rsqrt(v + 1e-8)[da] (each stands for two
// identical reference features). Factored v features come from line/cross tables.
inline int NumCompactFeatures(int dm, int dr, int da, bool factored) {
  return 2 + 2 * dm + 2 * dr + 2 * da + (factored ? 0 : 2 * da);
}

const Kernels& GenericKernels();
const Kernels& Avx2Kernels();
const Kernels& Avx512Kernels();
const Kernels& SelectKernels();  // best for this CPU; LOPT_CPU_ISA=generic|avx2|avx512 overrides

}  // namespace lopt::tiles
