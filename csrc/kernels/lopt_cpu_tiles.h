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
  bool celo;          // Config::celo: clipped gradients and the two extra features
  float mom_fac_eps;  // rank <= 1: m * (v + mom_fac_eps)^-0.5
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
  // bf16 precision only (else nullptr): the first layer's w0c and the hidden layers'
  // weights as AMX tiles (PackAmxLayer), AmxLayerWords(num_compact, H) and (layers - 1)
  // blocks of AmxLayerWords(H, H) words; the hidden layers' biases as (layers - 1) blocks of
  // AmxBiasRows(H) rows of 16 floats, row h = bias[h] on every lane (PackAmxBias).
  const uint32_t* amx_first;
  const uint32_t* amx_hidden;
  const float* amx_hidden_bias;
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
  // cross_acc[t] += for every t (length W); g clipped to +-kCeloGradClip first when clip.
  void (*gsq_line)(const float* g, int64_t W, int64_t C, bool clip, double* line_sums, double* cross_acc);
  // Adds the squares of the compact per-element features of elements [e0, e1).
  void (*stats)(const TensorPlan& plan, int64_t e0, int64_t e1, double* sumsq);
  // Writes new state and params (or the update) for elements [e0, e1).
  void (*apply)(const TensorPlan& plan, int64_t e0, int64_t e1);
  // MLPLOpt: sums of squares of g, p and the new momenta of elements [e0, e1)
  // (kMlpNormalized values added to sumsq), and the step with its writes.
  void (*mlp_stats)(const MlpPlan& plan, int64_t e0, int64_t e1, double* sumsq);
  void (*mlp_apply)(const MlpPlan& plan, int64_t e0, int64_t e1);
  // out[i] = 1 / sqrt(max(x[i] + eps, floor)) (max propagating NaN; out may be x),
  // IEEE-rounded: the per-row/column tables of factored tensors (a few hundred entries
  // per tensor, which scalar sqrt and division made a tenth of a small population's call).
  void (*rsqrt_tables)(const float* x, int64_t n, float eps, float floor, float* out);
};

// Compact per-element feature order. Both kinds start with
//   g, p, m[dm], rms[dr], m*rsqrt(rms+1e-6)[dm], rsqrt(rms+1e-6)[dr], fac_g[da], fac_m[da]
// and rank <= 1 tensors add v[da], rsqrt(v + 1e-8)[da] (each stands for two
// identical reference features); Celo then adds clip(g, +-0.1), g*rsqrt(rms+1e-6)[dr].
// Factored v features come from line/cross tables.
inline int NumCompactFeatures(int dm, int dr, int da, bool factored, bool celo = false) {
  return 2 + 2 * dm + 2 * dr + 2 * da + (factored ? 0 : 2 * da) + (celo ? 1 + dr : 0);
}

// float -> bf16 bits as VCVTNE2PS2BF16 rounds: to nearest even, denormals to signed zero,
// NaN stays a (quiet) NaN.
inline uint16_t Bf16Bits(float x) {
  uint32_t u;
  __builtin_memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) == 0) return static_cast<uint16_t>((u >> 16) & 0x8000u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// AMX bf16 layers (CpuPrecision::kBf16): a layer of n_in inputs and H outputs is cut into
// tiles of 16 outputs (ob < AmxBlocks(H, 16)) by 32 inputs (kb < AmxBlocks(n_in, 32)),
// zero-padded; tile (ob, kb) is 16 rows of 16 words, row r word c = bf16(w[32 kb + 2c][h])
// in the low half and bf16(w[32 kb + 2c + 1][h]) in the high half, h = 16 ob + r.
constexpr int AmxBlocks(int n, int block) { return (n + block - 1) / block; }
inline int64_t AmxLayerWords(int n_in, int H) {
  return int64_t{AmxBlocks(H, 16)} * AmxBlocks(n_in, 32) * 256;
}
// w: [n_in][H] row-major.
inline void PackAmxLayer(const float* w, int n_in, int H, uint32_t* out) {
  const int KB = AmxBlocks(n_in, 32), MB = AmxBlocks(H, 16);
  auto bits = [&](int j, int h) -> uint32_t {
    return j < n_in && h < H ? Bf16Bits(w[int64_t{j} * H + h]) : 0u;
  };
  for (int ob = 0; ob < MB; ++ob)
    for (int kb = 0; kb < KB; ++kb)
      for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 16; ++c) {
          const int j = 32 * kb + 2 * c, h = 16 * ob + r;
          out[((int64_t{ob} * KB + kb) * 16 + r) * 16 + c] = bits(j, h) | (bits(j + 1, h) << 16);
        }
}

// bias[h] for h < H, zero in the padding rows.
inline int AmxBiasRows(int H) { return 16 * AmxBlocks(H, 16); }
inline void PackAmxBias(const float* bias, int H, float* out) {
  for (int h = 0; h < AmxBiasRows(H); ++h)
    for (int t = 0; t < 16; ++t) out[h * 16 + t] = h < H ? bias[h] : 0.0f;
}

const Kernels& GenericKernels();
const Kernels& Avx2Kernels();
const Kernels& Avx512Kernels();
const Kernels& AmxKernels();  // the avx512 loops with AMX bf16 hidden layers
const Kernels& SelectKernels();  // best for this CPU; LOPT_CPU_ISA=generic|avx2|avx512 overrides
// AmxKernels, or nullptr where the CPU, the OS (no AMX permission) or LOPT_CPU_ISA (below
// avx512) rules them out.
const Kernels* SelectBf16Kernels();

}  // namespace lopt::tiles
