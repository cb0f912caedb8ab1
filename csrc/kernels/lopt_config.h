// Shared description of the small_fc_lopt update: configuration, the layout of the
// packed per-member weight buffer, and the numerical constants of the rule.
// Framework-free: included by the CPU and CUDA kernels, the FFI glue and the bindings.
#pragma once

#include <cstdint>

namespace lopt {

// Step-count features: tanh(iteration / t - 1) for each timescale t. They are not
// normalised and are folded into the first-layer bias on the Python side.
inline constexpr int kNumStepFeatures = 11;

// Limits checked before any kernel runs (they bound stack-resident tiles).
inline constexpr int kMaxDecays = 16;
inline constexpr int kMaxHidden = 256;
inline constexpr int kMaxHiddenLayers = 16;

// Constants of the rule (spec: small_fc_lopt.md).
inline constexpr float kRmsEps = 1e-6f;         // rsqrt(rms + 1e-6)
inline constexpr float kFacRsqrtEps = 1e-8f;    // rsqrt(v + 1e-8) features
inline constexpr float kRowMeanEps = 1e-9f;     // v_row / (row_col_mean + 1e-9)
inline constexpr float kSafeRsqrtFloor = 1e-9f; // safe_rsqrt(x) = rsqrt(max(x, 1e-9))
inline constexpr float kFullFacEps = 1e-9f;     // g * safe_rsqrt(v + 1e-9), rank <= 1
inline constexpr float kMomFacEps = 1e-6f;      // m * (v + 1e-6)^-0.5, rank <= 1
inline constexpr float kGradSqEps = 1e-30f;     // g^2 + 1e-30 in factored accumulators
inline constexpr float kNormEps = 1e-5f;        // second-moment normaliser

// Celo's per-element rule (Config::celo; lopt_ext/celo.py): gradients clipped to +-1000 before
// everything, two more features (clip(g, +-0.1) and g * rsqrt(rms + 1e-6)), m * v^-0.5 (no
// epsilon) for rank <= 1 tensors, and the step times sqrt(mean(p^2) + 1e-9) and the tensor's
// lr_mult (TensorArgs).
inline constexpr float kCeloGradClip = 1000.0f;
inline constexpr float kCeloGradFeatureClip = 0.1f;
inline constexpr float kCeloParamScaleEps = 1e-9f;

struct Config {
  int hidden = 4;         // H
  int hidden_layers = 2;  // L
  int dm = 3, dr = 1, da = 3;
  float exp_mult = 1e-3f;
  float step_mult = 1e-3f;
  bool celo = false;  // Celo's variant of the rule (see kCeloGradClip)
};

// Number of per-tensor normalised features (28 for the default decays, Celo 30).
constexpr int NumNormalizedFeatures(int dm, int dr, int da, bool celo = false) {
  return 2 + 2 * dm + 2 * dr + 6 * da + (celo ? 1 + dr : 0);
}

// Indices of the logical (reference-order) features; Celo's two extra ones come last (the
// Python side orders Celo's first-layer rows to match).
struct FeatureIndex {
  int g, p, m, rms, m_rsqrt, rsqrt_rms, fac_g, row_v, col_v, row_rsqrt, col_rsqrt, fac_m;
  int clip_g, g_rsqrt;  // Celo only
  int count;
  explicit constexpr FeatureIndex(int dm, int dr, int da, bool celo = false)
      : g(0), p(1), m(2), rms(2 + dm), m_rsqrt(2 + dm + dr), rsqrt_rms(2 + 2 * dm + dr),
        fac_g(2 + 2 * dm + 2 * dr), row_v(fac_g + da), col_v(fac_g + 2 * da),
        row_rsqrt(fac_g + 3 * da), col_rsqrt(fac_g + 4 * da), fac_m(fac_g + 5 * da),
        clip_g(fac_g + 6 * da), g_rsqrt(clip_g + 1), count(NumNormalizedFeatures(dm, dr, da, celo)) {}
};

// Layout of the packed float32 buffer that carries one population member's
// traced meta-parameters into a kernel, in this order:
//   mom_beta[dm] mom_1mb[dm] rms_beta[dr] rms_1mb[dr] fac_beta[da] fac_1mb[da]
//   w0[F][H] (rows of the normalised features only, FeatureIndex order) b0[H] (step
//   features folded in; Celo has none)
//   (w_l[H][H] b_l[H]) for l = 1 .. L-1
//   w_out[H][2] b_out[2]
struct PackedLayout {
  int64_t mom_beta, mom_1mb, rms_beta, rms_1mb, fac_beta, fac_1mb;
  int64_t w0, b0, hidden, w_out, b_out, size;
  explicit constexpr PackedLayout(const Config& c)
      : mom_beta(0), mom_1mb(c.dm), rms_beta(2 * c.dm), rms_1mb(2 * c.dm + c.dr),
        fac_beta(2 * c.dm + 2 * c.dr), fac_1mb(2 * c.dm + 2 * c.dr + c.da),
        w0(2 * c.dm + 2 * c.dr + 2 * c.da),
        b0(w0 + int64_t{NumNormalizedFeatures(c.dm, c.dr, c.da, c.celo)} * c.hidden),
        hidden(b0 + c.hidden),
        w_out(hidden + int64_t{c.hidden_layers - 1} * (c.hidden * c.hidden + c.hidden)),
        b_out(w_out + 2 * c.hidden), size(b_out + 2) {}
};

// The per-parameter MLP every learned optimizer here has: nullptr when its sizes are usable.
inline const char* ValidateMlpSizes(int hidden, int hidden_layers) {
  if (hidden < 1 || hidden > kMaxHidden) return "hidden_size must be in [1, 256]";
  if (hidden_layers < 1 || hidden_layers > kMaxHiddenLayers) return "hidden_layers must be in [1, 16]";
  return nullptr;
}

// Returns nullptr when the configuration is usable, else a static message.
inline const char* ValidateConfig(const Config& c) {
  if (const char* err = ValidateMlpSizes(c.hidden, c.hidden_layers)) return err;
  if (c.dm < 1 || c.dm > kMaxDecays || c.da < 0 || c.da > kMaxDecays || c.dr < 1 ||
      c.dr > kMaxDecays)
    return "each decay count must be in [1, 16] (adafactor: [0, 16])";
  // da == 0: the ablation without row/column (Adafactor) accumulators and features.
  if (c.da != c.dm && c.da != 0)
    return "the adafactor decay count must equal the momentum decay count (or be 0)";
  if (c.dr != 1 && c.dr != c.dm) return "the rms decay count must be 1 or the momentum decay count";
  if (c.celo && c.da == 0) return "Celo's rule has Adafactor features (adafactor decay count >= 1)";
  return nullptr;
}

// The two factored axes of a rank >= 2 shape: d0 the largest, d1 the second
// largest, ties broken as a stable ascending argsort (a later axis counts as larger).
inline void FactoredDims(const int64_t* dims, int rank, int* d1, int* d0) {
  int best = -1, second = -1;
  for (int a = 0; a < rank; ++a) {
    if (best < 0 || dims[a] >= dims[best]) {
      second = best;
      best = a;
    } else if (second < 0 || dims[a] >= dims[second]) {
      second = a;
    }
  }
  *d0 = best;
  *d1 = second;
}

// A factored tensor viewed as (A, N1, B, N2, C): N1 and N2 are the two factored
// axes in memory order, A/B/C the products of the axes before, between and after
// them. A "line" is one (a, i, b): W = N2 * C contiguous elements. Line-indexed
// entries drop the later factored axis, so they are v_row when d0 is that axis.
struct FactoredView {
  int64_t A = 1, N1 = 1, B = 1, N2 = 1, C = 1;
  bool line_is_row = false;
};

inline FactoredView MakeFactoredView(const int64_t* dims, int rank, int d1, int d0) {
  const int p = d0 < d1 ? d0 : d1, q = d0 < d1 ? d1 : d0;
  FactoredView v;
  for (int i = 0; i < p; ++i) v.A *= dims[i];
  for (int i = p + 1; i < q; ++i) v.B *= dims[i];
  for (int i = q + 1; i < rank; ++i) v.C *= dims[i];
  v.N1 = dims[p];
  v.N2 = dims[q];
  v.line_is_row = d0 == q;
  return v;
}

// ----- MLPLOpt ("LOLv2", spec: mlp_lopt.md): 6 fixed momentum decays, the features g, p
// and the 6 new momenta each normalised by its root mean square over the tensor, the step
// features (folded into the first-layer bias on the Python side), an MLP 19 -> H^L -> 2.
inline constexpr int kMlpDecays = 6;
inline constexpr int kMlpNormalized = 2 + kMlpDecays;  // g, p, m[6]

struct MlpConfig {
  int hidden = 32;
  int hidden_layers = 2;
  float exp_mult = 1e-3f;
  float step_mult = 1e-3f;
};

// Packed per-member buffer: beta[6] one_minus_beta[6] w0[8][H] b0[H]
// (w_l[H][H] b_l[H]) for l = 1 .. L-1, w_out[H][2] b_out[2].
struct MlpPackedLayout {
  int64_t beta, one_minus_beta, w0, b0, hidden, w_out, b_out, size;
  explicit constexpr MlpPackedLayout(const MlpConfig& c)
      : beta(0), one_minus_beta(kMlpDecays), w0(2 * kMlpDecays),
        b0(w0 + int64_t{kMlpNormalized} * c.hidden), hidden(b0 + c.hidden),
        w_out(hidden + int64_t{c.hidden_layers - 1} * (c.hidden * c.hidden + c.hidden)),
        b_out(w_out + 2 * c.hidden), size(b_out + 2) {}
};

inline const char* ValidateMlpConfig(const MlpConfig& c) {
  return ValidateMlpSizes(c.hidden, c.hidden_layers);
}

}  // namespace lopt
