// Fused small_fc_lopt update on NVIDIA GPUs. The same three passes as the CPU
// driver (lopt_cpu.cc), as a fixed sequence of kernels per group of tensors:
//   A1 (rank >= 2) partial sums of g^2 + 1e-30 along both factored axes
//   A2             new v_row / v_col accumulators (written to the results)
//   A3             partial sums of the new v_row along the d1 axis
//   A4             row / column factors, mean squares of the broadcast v features
//   B1             per-block sums of squares of the per-element features
//   B2             normalisation scales folded into the first-layer weights
//   C              features again, the MLP (fp32 FMAs or TF32 MMAs), all writes
// Every reduction is two-stage with a fixed split and a fixed combination order
// (no atomics), so results are bitwise reproducible run to run. All tensors of a
// group are handled by the same launches: a table of jobs travels as a
// __grid_constant__ kernel parameter and each block finds its job by a binary
// search over per-job block offsets. Nothing here allocates or synchronises:
// scratch comes from the caller and everything is enqueued on its stream.
#include "lopt_cuda.h"

#include <algorithm>
#include <cstdint>
#include <memory>

#if defined(LOPT_CUDA_EMULATION)
#define LOPT_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::emu::Launch(kernel, grid, block, smem, __VA_ARGS__)
#define LOPT_DYNAMIC_SMEM(type, name) type* name = ::emu::DynamicSmem<type>()
#else
#define LOPT_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define LOPT_DYNAMIC_SMEM(type, name) extern __shared__ type name[]
#endif

namespace lopt::cuda {
namespace {

constexpr int kMaxJobs = 64;  // tensors x members per launch (kernel parameter table)
// Compact MLP inputs: per-element features (2 + 2dm + 2dr + 2da, + 2da for rank <= 1, + Celo's
// 1 + dr) plus, for factored tensors, the 4da broadcast v features.
constexpr int kMaxCompact = 2 + 2 * kMaxDecays + 2 * kMaxDecays + 6 * kMaxDecays + 1 + kMaxDecays;
constexpr int kMaxLogical = kMaxCompact;  // 2 + 2dm + 2dr + 6da (+ 1 + dr) at most

constexpr int kReduceThreads = 256;
constexpr int64_t kCoopMinRows = 512;       // Y == 1 rows longer than this: a block per chunk
constexpr int64_t kReduceChunkCoop = 8192;  // rows per block in that case
constexpr int64_t kReduceChunkCol = 64;     // rows per thread otherwise
constexpr int kEntryThreads = 256;          // A2 / A4
constexpr int kStatsThreads = 256;
constexpr int kStatsPerThread = 8;
constexpr int64_t kStatsChunk = int64_t{kStatsThreads} * kStatsPerThread;
constexpr int kFoldThreads = 256;
constexpr int kApplyThreads = 256;          // fp32 MLP: one element per thread
constexpr int kMmaThreads = 128;            // TF32 MLP: 4 warps, 32 elements per warp tile
constexpr int64_t kMmaChunk = 4096;         // elements per block
constexpr int64_t kTensorCoreMinElems = 1024;  // smaller tensors: fp32 kernel in every mode
constexpr size_t kDefaultSmem = 48 * 1024;
constexpr size_t kMaxMmaSmem = 99 * 1024;   // fits every sm_80+ part

// Configuration and offsets into the packed buffer (lopt_config.h PackedLayout).
struct Params {
  int H, L, dm, dr, da;
  float exp_mult, step_mult;
  int write_delta;
  int celo;           // Config::celo: clipped gradients, two more features, per-tensor step scale
  float mom_fac_eps;  // rank <= 1: m * (v + mom_fac_eps)^-0.5
  int64_t mom_beta, mom_1mb, rms_beta, rms_1mb, fac_beta, fac_1mb, w0, b0, packed_size;
  int weights_in_smem;  // fp32 path: weights copied to shared memory
};

// One tensor of one population member. "line" tables are indexed like S without
// the later factored axis, "cross" tables like S without the earlier one (the
// CPU driver's convention); line_is_row says which of them is v_row.
struct Job {
  int64_t numel;
  int64_t A, N1, B, N2, C, W;
  int64_t n_line, n_cross;
  int factored, line_is_row, kpe, kc;
  int simple;  // factored with A = B = C = 1
  const float *p, *g, *m, *rms, *v_line_old, *v_cross_old, *v_full, *packed;
  float *out, *m_out, *rms_out, *v_line, *v_cross, *v_full_out;
  double *line_part, *cross_part, *group_part, *tab_part, *stats_part;
  float *line_fac, *cross_fac, *w0c;
  const float* lr_mult;  // celo: the scheduler's multiplier of this tensor's step (device)
  float* tensor_step;  // celo: step_mult * lr_mult * sqrt(mean(p^2) + 1e-9), written by Fold
  int64_t nch_line, nch_cross, nch_group;
  int64_t n_tab_blocks, n_stats_blocks;
};

struct Launch {
  Params cp;
  int n;
  int64_t start[kMaxJobs + 1];  // first block of each job in this launch
  Job jobs[kMaxJobs];
};

// Sum over the middle axis of a [X, R, Y] view, split into chunks of rc rows:
// part[(x * nch + chunk) * Y + y].
struct Reduction {
  const float* in;
  double* part;
  int64_t X, R, Y, rc, nch;
  int square;  // 1: g^2 + 1e-30, 2: the same of g clipped to +-kCeloGradClip, 0: the value itself
  int coop;    // Y == 1 and long rows: a block per (x, chunk)
};

struct ReduceLaunch {
  int n;
  int64_t start[2 * kMaxJobs + 1];
  Reduction r[2 * kMaxJobs];
};

static_assert(sizeof(Launch) <= 32000, "kernel parameter table too large");
static_assert(sizeof(ReduceLaunch) <= 32000, "kernel parameter table too large");

__device__ __forceinline__ int FindItem(const int64_t* start, int n, int64_t blk) {
  int lo = 0, hi = n - 1;  // largest i with start[i] <= blk: never an empty item
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (start[mid] <= blk) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

__device__ __forceinline__ float RSqrt(float x) { return 1.0f / sqrtf(x); }
__device__ __forceinline__ float MaxNan(float x, float floor) { return floor > x ? floor : x; }
__device__ __forceinline__ float SafeRSqrt(float x) { return RSqrt(MaxNan(x, kSafeRsqrtFloor)); }
__device__ __forceinline__ float Relu(float x) { return 0.0f > x ? 0.0f : x; }
// clip(x, -c, c) that propagates NaN like jnp.clip.
__device__ __forceinline__ float Clip(float x, float c) {
  x = x > c ? c : x;
  return x < -c ? -c : x;
}
// A term of the middle-axis reductions (Reduction::square).
__device__ __forceinline__ double ReduceTerm(float v, int square) {
  if (square == 2) v = Clip(v, kCeloGradClip);
  return square ? double(v * v + kGradSqEps) : double(v);
}

// Fixed-order warp reduction: the result is in lane 0.
__device__ __forceinline__ double WarpSum(double v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Fixed-order block reduction (blockDim.x a multiple of 32, <= 1024); result in thread 0.
__device__ double BlockSum(double v, double* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = WarpSum(v);
  __syncthreads();  // red may still be read from a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  double s = 0;
  if (threadIdx.x == 0)
    for (int w = 0; w < nw; ++w) s += red[w];
  return s;
}

// ---------------------------------------------------------------------------
// A1 / A3: first stage of the middle-axis reductions.
__global__ void __launch_bounds__(kReduceThreads) ReduceStage1(const __grid_constant__ ReduceLaunch L) {
  __shared__ double red[kReduceThreads / 32];
  const int64_t blk = blockIdx.x;
  const int i = FindItem(L.start, L.n, blk);
  const Reduction& r = L.r[i];
  int64_t local = blk - L.start[i];
  if (r.coop) {  // a block sums rc consecutive values
    const int64_t x = local / r.nch, ch = local % r.nch;
    const int64_t r0 = ch * r.rc, r1 = min(r.R, r0 + r.rc);
    const float* base = r.in + x * r.R;
    double s = 0;
    for (int64_t k = r0 + threadIdx.x; k < r1; k += blockDim.x) {
      s += ReduceTerm(base[k], r.square);
    }
    s = BlockSum(s, red);
    if (threadIdx.x == 0) r.part[x * r.nch + ch] = s;
    return;
  }
  // One thread per (x, chunk, y), y fastest: coalesced when Y is large, dense when small.
  const int64_t idx = local * blockDim.x + threadIdx.x;
  if (idx >= r.X * r.nch * r.Y) return;
  const int64_t y = idx % r.Y, rest = idx / r.Y;
  const int64_t ch = rest % r.nch, x = rest / r.nch;
  const int64_t r0 = ch * r.rc, r1 = min(r.R, r0 + r.rc);
  const float* base = r.in + x * r.R * r.Y + y;
  double s = 0;
  for (int64_t k = r0; k < r1; ++k) {
    s += ReduceTerm(base[k * r.Y], r.square);
  }
  r.part[(x * r.nch + ch) * r.Y + y] = s;
}

// A2: line/cross means of g^2 -> new factored accumulators.
__global__ void __launch_bounds__(kEntryThreads) NewAccumulators(const __grid_constant__ Launch L) {
  const int64_t blk = blockIdx.x;
  const int ji = FindItem(L.start, L.n, blk);
  const Job& jb = L.jobs[ji];
  const int da = L.cp.da;
  const int64_t i = (blk - L.start[ji]) * blockDim.x + threadIdx.x;
  if (i >= jb.n_line + jb.n_cross) return;
  const float* fb = jb.packed + L.cp.fac_beta;
  const float* f1 = jb.packed + L.cp.fac_1mb;
  double s = 0;
  float mean;
  const float* old;
  float* dst;
  int64_t entry;
  if (i < jb.n_line) {  // x = line, y = c; mean over N2
    entry = i;
    const int64_t x = entry / jb.C, y = entry % jb.C;
    for (int64_t ch = 0; ch < jb.nch_line; ++ch) s += jb.line_part[(x * jb.nch_line + ch) * jb.C + y];
    mean = static_cast<float>(s / static_cast<double>(jb.N2));
    old = jb.v_line_old;
    dst = jb.v_line;
  } else {  // x = a, y = b * W + t; mean over N1
    entry = i - jb.n_line;
    const int64_t Y = jb.B * jb.W;
    const int64_t x = entry / Y, y = entry % Y;
    for (int64_t ch = 0; ch < jb.nch_cross; ++ch) s += jb.cross_part[(x * jb.nch_cross + ch) * Y + y];
    mean = static_cast<float>(s / static_cast<double>(jb.N1));
    old = jb.v_cross_old;
    dst = jb.v_cross;
  }
  for (int k = 0; k < da; ++k) dst[entry * da + k] = fb[k] * old[entry * da + k] + f1[k] * mean;
}

// A4: factors and the mean squares of the broadcast v features.
// tab_part[block][4 da]: row v^2, col v^2, row rsqrt(v+1e-8)^2, col rsqrt(v+1e-8)^2.
__global__ void __launch_bounds__(kEntryThreads) Factors(const __grid_constant__ Launch L) {
  __shared__ double red[kEntryThreads / 32];
  const int64_t blk = blockIdx.x;
  const int ji = FindItem(L.start, L.n, blk);
  const Job& jb = L.jobs[ji];
  const int da = L.cp.da;
  const int64_t local_blk = blk - L.start[ji];
  const int64_t i = local_blk * blockDim.x + threadIdx.x;
  const bool valid = i < jb.n_line + jb.n_cross;
  const bool is_line = i < jb.n_line;
  const bool is_row = valid && (is_line == (jb.line_is_row != 0));
  const int64_t entry = is_line ? i : i - jb.n_line;
  const float* vnew = is_line ? jb.v_line : jb.v_cross;
  float* fac = is_line ? jb.line_fac : jb.cross_fac;
  // Row entries: their group in the A3 reduction, and that group's size (the d1 axis).
  int64_t gx = 0, gy = 0, gY = 1, gR = 1;
  if (is_row) {
    if (jb.line_is_row) {  // line entry ((a N1 + i) B + b) C + c -> x = a, y = (b C + c) da
      const int64_t c = entry % jb.C, line = entry / jb.C;
      const int64_t b = line % jb.B, a = (line / jb.B) / jb.N1;
      gx = a;
      gy = (b * jb.C + c) * da;
      gY = jb.B * jb.C * da;
      gR = jb.N1;
    } else {  // cross entry (a B + b) W + j C + c -> x = a B + b, y = c da
      gx = entry / jb.W;
      gy = (entry % jb.C) * da;
      gY = jb.C * da;
      gR = jb.N2;
    }
  }
  for (int k = 0; k < da; ++k) {
    double sv = 0, sr = 0;
    if (valid) {
      const float v = vnew[entry * da + k];
      float f;
      if (is_row) {
        double gs = 0;
        for (int64_t ch = 0; ch < jb.nch_group; ++ch)
          gs += jb.group_part[(gx * jb.nch_group + ch) * gY + gy + k];
        const float mean = static_cast<float>(gs / static_cast<double>(gR));
        f = SafeRSqrt(v / (mean + kRowMeanEps));
      } else {
        f = SafeRSqrt(v);
      }
      fac[entry * da + k] = f;
      const float rs = RSqrt(v + kFacRsqrtEps);
      sv = double(v * v);
      sr = double(rs * rs);
    }
    // Row and column terms go to separate slots: reduce each with the other zeroed.
    const double row_v = is_row ? sv : 0.0, col_v = is_row ? 0.0 : sv;
    const double row_r = is_row ? sr : 0.0, col_r = is_row ? 0.0 : sr;
    double* dst = jb.tab_part + local_blk * 4 * da;
    double t;
    t = BlockSum(row_v, red);
    if (threadIdx.x == 0) dst[k] = t;
    t = BlockSum(col_v, red);
    if (threadIdx.x == 0) dst[da + k] = t;
    t = BlockSum(row_r, red);
    if (threadIdx.x == 0) dst[2 * da + k] = t;
    t = BlockSum(col_r, red);
    if (threadIdx.x == 0) dst[3 * da + k] = t;
  }
}

// ---------------------------------------------------------------------------
// Per-element features. Compact order (the CPU driver's, lopt_cpu_tiles.h):
//   g, p, m[dm], rms[dr], m*rsqrt(rms+1e-6)[dm], rsqrt(rms+1e-6)[dr], fac_g[da], fac_m[da]
//   rank <= 1: v[da], rsqrt(v+1e-8)[da]     (each also stands for its twin feature)
//   Celo: clip(g, 0.1), g*rsqrt(rms+1e-6)[dr]
//   factored, MLP inputs only: row_v[da], col_v[da], row_rsqrt[da], col_rsqrt[da]
template <int DM, int DR>
struct Dec {
  static constexpr int kM = DM ? DM : kMaxDecays;
  static constexpr int kR = DR ? DR : kMaxDecays;
  static constexpr int kCompact = DM ? 2 + 2 * DM + 2 * DR + 6 * DM + 1 + DR : kMaxCompact;
  // Loops are unrolled only when their bounds are compile-time constants.
  static constexpr int kUM = DM ? DM : 1, kUR = DR ? DR : 1, kUC = DM ? kCompact : 1;
};

template <int DM, int DR>
__device__ __forceinline__ void Features(const Params& cp, const Job& jb, int64_t e, float* x,
                                         bool tables, bool write_state) {
  const int dm = DM ? DM : cp.dm, dr = DR ? DR : cp.dr, da = dm;
  const float* pk = jb.packed;
  const float g = cp.celo ? Clip(jb.g[e], kCeloGradClip) : jb.g[e], p = jb.p[e];
  float mn[Dec<DM, DR>::kM], rn[Dec<DM, DR>::kR], rs[Dec<DM, DR>::kR];
  x[0] = g;
  x[1] = p;
  const int o_m = 2, o_rms = 2 + dm, o_mrs = 2 + dm + dr, o_rs = 2 + 2 * dm + dr;
  const int o_fg = 2 + 2 * dm + 2 * dr, o_fm = o_fg + da, o_v = o_fg + 2 * da,
            o_rsv = o_fg + 3 * da;
  // Celo's two features follow the per-element ones; the factored tables come after them.
  const int o_ex = o_fg + (jb.factored ? 2 : 4) * da, o_tab = o_v + (cp.celo ? 1 + dr : 0);
#pragma unroll(Dec<DM, DR>::kUM)
  for (int k = 0; k < Dec<DM, DR>::kM; ++k) {
    if (k >= dm) break;
    mn[k] = pk[cp.mom_beta + k] * jb.m[e * dm + k] + pk[cp.mom_1mb + k] * g;
    x[o_m + k] = mn[k];
  }
#pragma unroll(Dec<DM, DR>::kUR)
  for (int j = 0; j < Dec<DM, DR>::kR; ++j) {
    if (j >= dr) break;
    rn[j] = pk[cp.rms_beta + j] * jb.rms[e * dr + j] + pk[cp.rms_1mb + j] * (g * g);
    rs[j] = RSqrt(rn[j] + kRmsEps);
    x[o_rms + j] = rn[j];
    x[o_rs + j] = rs[j];
  }
#pragma unroll(Dec<DM, DR>::kUM)
  for (int k = 0; k < Dec<DM, DR>::kM; ++k) {
    if (k >= dm) break;
    x[o_mrs + k] = mn[k] * rs[dr == 1 ? 0 : k];
  }
  if (cp.celo) {
    x[o_ex] = Clip(g, kCeloGradFeatureClip);
#pragma unroll(Dec<DM, DR>::kUR)
    for (int j = 0; j < Dec<DM, DR>::kR; ++j) {
      if (j >= dr) break;
      x[o_ex + 1 + j] = g * rs[j];
    }
  }
  if (jb.factored) {
    int64_t li, xi;
    if (jb.simple) {  // A = B = C = 1 (every matrix): one division, 32-bit when it fits
      if (jb.numel <= 0x7fffffff) {
        const uint32_t e32 = static_cast<uint32_t>(e), w32 = static_cast<uint32_t>(jb.W);
        const uint32_t line = e32 / w32;
        li = line;
        xi = e32 - line * w32;
      } else {
        li = e / jb.W;
        xi = e - li * jb.W;
      }
    } else {
      const int64_t line = e / jb.W, t = e - line * jb.W;
      li = line * jb.C + t % jb.C;
      const int64_t b = line % jb.B, a = (line / jb.B) / jb.N1;
      xi = (a * jb.B + b) * jb.W + t;
    }
    const int64_t ri = jb.line_is_row ? li : xi, ci = jb.line_is_row ? xi : li;
    const float* row_fac = jb.line_is_row ? jb.line_fac : jb.cross_fac;
    const float* col_fac = jb.line_is_row ? jb.cross_fac : jb.line_fac;
    const float* row_v = jb.line_is_row ? jb.v_line : jb.v_cross;
    const float* col_v = jb.line_is_row ? jb.v_cross : jb.v_line;
#pragma unroll(Dec<DM, DR>::kUM)
    for (int k = 0; k < Dec<DM, DR>::kM; ++k) {
      if (k >= da) break;
      const float rf = row_fac[ri * da + k], cf = col_fac[ci * da + k];
      x[o_fg + k] = g * rf * cf;
      x[o_fm + k] = mn[k] * rf * cf;
      if (tables) {
        const float vr = row_v[ri * da + k], vc = col_v[ci * da + k];
        x[o_tab + k] = vr;
        x[o_tab + da + k] = vc;
        x[o_tab + 2 * da + k] = RSqrt(vr + kFacRsqrtEps);
        x[o_tab + 3 * da + k] = RSqrt(vc + kFacRsqrtEps);
      }
    }
  } else {
    const float* fb = pk + cp.fac_beta;
    const float* f1 = pk + cp.fac_1mb;
#pragma unroll(Dec<DM, DR>::kUM)
    for (int k = 0; k < Dec<DM, DR>::kM; ++k) {
      if (k >= da) break;
      const float v = fb[k] * jb.v_full[e * da + k] + f1[k] * (g * g + kGradSqEps);
      x[o_fg + k] = g * RSqrt(MaxNan(v + kFullFacEps, kSafeRsqrtFloor));
      x[o_fm + k] = mn[k] * RSqrt(v + cp.mom_fac_eps);
      x[o_v + k] = v;
      x[o_rsv + k] = RSqrt(v + kFacRsqrtEps);
      if (write_state) jb.v_full_out[e * da + k] = v;
    }
  }
  if (write_state) {  // every input of this element has been read
#pragma unroll(Dec<DM, DR>::kUM)
    for (int k = 0; k < Dec<DM, DR>::kM; ++k) {
      if (k >= dm) break;
      jb.m_out[e * dm + k] = mn[k];
    }
#pragma unroll(Dec<DM, DR>::kUR)
    for (int j = 0; j < Dec<DM, DR>::kR; ++j) {
      if (j >= dr) break;
      jb.rms_out[e * dr + j] = rn[j];
    }
  }
}

// B1: sums of squares of the per-element features, per block of kStatsChunk elements.
template <int DM, int DR>
__global__ void __launch_bounds__(kStatsThreads, 2) Stats(const __grid_constant__ Launch L) {
  constexpr int KC = Dec<DM, DR>::kCompact;
  __shared__ double red[(kStatsThreads / 32) * KC];
  const int64_t blk = blockIdx.x;
  const int ji = FindItem(L.start, L.n, blk);
  const Job& jb = L.jobs[ji];
  const int kpe = jb.kpe;
  const int64_t local_blk = blk - L.start[ji];
  const int64_t e0 = local_blk * kStatsChunk;
  float x[KC];
  double acc[KC];
#pragma unroll(Dec<DM, DR>::kUC)
  for (int f = 0; f < KC; ++f) acc[f] = 0.0;
  for (int it = 0; it < kStatsPerThread; ++it) {
    const int64_t e = e0 + int64_t{it} * kStatsThreads + threadIdx.x;
    if (e >= jb.numel) break;
    Features<DM, DR>(L.cp, jb, e, x, false, false);
#pragma unroll(Dec<DM, DR>::kUC)
    for (int f = 0; f < KC; ++f)
      if (f < kpe) acc[f] += double(x[f] * x[f]);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll(Dec<DM, DR>::kUC)
  for (int f = 0; f < KC; ++f) {
    if (f >= kpe) break;
    const double s = WarpSum(acc[f]);
    if (lane == 0) red[warp * kpe + f] = s;
  }
  __syncthreads();
  for (int f = threadIdx.x; f < kpe; f += blockDim.x) {
    double s = 0;
    for (int w = 0; w < kStatsThreads / 32; ++w) s += red[w * kpe + f];
    jb.stats_part[local_blk * kpe + f] = s;
  }
}

// Logical (reference-order, lopt_config.h FeatureIndex) feature of compact feature c, and its
// twin (or -1).
__device__ __forceinline__ void LogicalOf(int c, int dm, int dr, int da, bool factored, bool celo,
                                          int* lg, int* twin) {
  const int fac_g = 2 + 2 * dm + 2 * dr;
  const int row_v = fac_g + da, col_v = fac_g + 2 * da, row_rs = fac_g + 3 * da,
            col_rs = fac_g + 4 * da, fac_m = fac_g + 5 * da, clip_g = fac_g + 6 * da;
  const int extras = celo ? 1 + dr : 0;
  *twin = -1;
  if (c < fac_g + da) {  // g p m rms m_rs rs fac_g: same order in both
    *lg = c;
    return;
  }
  c -= fac_g + da;
  if (c < da) {
    *lg = fac_m + c;
    return;
  }
  c -= da;
  if (!factored) {
    if (c < da) {
      *lg = row_v + c;
      *twin = col_v + c;
    } else if (c < 2 * da) {
      *lg = row_rs + (c - da);
      *twin = col_rs + (c - da);
    } else {
      *lg = clip_g + (c - 2 * da);  // Celo's clip(g, 0.1) then g*rsqrt(rms)[dr]
    }
    return;
  }
  if (c < extras) {
    *lg = clip_g + c;
    return;
  }
  c -= extras;
  const int kind = c / da, k = c % da;  // row_v, col_v, row_rs, col_rs
  *lg = (kind == 0 ? row_v : kind == 1 ? col_v : kind == 2 ? row_rs : col_rs) + k;
}

// B2: one block per job: scales from the partial sums, folded into w0.
__global__ void __launch_bounds__(kFoldThreads) Fold(const __grid_constant__ Launch L) {
  __shared__ float scale[kMaxLogical];
  const Job& jb = L.jobs[blockIdx.x];
  const Params& cp = L.cp;
  const int dm = cp.dm, dr = cp.dr, da = cp.da, H = cp.H;
  const bool factored = jb.factored != 0;
  for (int f = threadIdx.x; f < jb.kpe; f += blockDim.x) {
    double s = 0;
    for (int64_t b = 0; b < jb.n_stats_blocks; ++b) s += jb.stats_part[b * jb.kpe + f];
    const float mean_sq = static_cast<float>(s / static_cast<double>(jb.numel));
    const float sc = RSqrt(kNormEps + mean_sq);
    // Celo's step is scaled by the tensor's RMS: compact feature 1 is p
    if (cp.celo && f == 1) *jb.tensor_step = cp.step_mult * *jb.lr_mult * sqrtf(mean_sq + kCeloParamScaleEps);
    int lg, tw;
    LogicalOf(f, dm, dr, da, factored, cp.celo != 0, &lg, &tw);
    scale[lg] = sc;
    if (tw >= 0) scale[tw] = sc;
  }
  if (factored) {
    for (int f = threadIdx.x; f < 4 * da; f += blockDim.x) {
      double s = 0;
      for (int64_t b = 0; b < jb.n_tab_blocks; ++b) s += jb.tab_part[b * 4 * da + f];
      const bool row = (f / da) % 2 == 0;  // row_v, col_v, row_rs, col_rs
      const int64_t n = row == (jb.line_is_row != 0) ? jb.n_line : jb.n_cross;
      int lg, tw;
      LogicalOf(jb.kpe + f, dm, dr, da, true, cp.celo != 0, &lg, &tw);
      scale[lg] = RSqrt(kNormEps + static_cast<float>(s / static_cast<double>(n)));
    }
  }
  __syncthreads();
  const float* w0 = jb.packed + cp.w0;
  for (int i = threadIdx.x; i < jb.kc * H; i += blockDim.x) {
    const int c = i / H, h = i % H;
    int lg, tw;
    LogicalOf(c, dm, dr, da, factored, cp.celo != 0, &lg, &tw);
    float v = scale[lg] * w0[lg * H + h];
    if (tw >= 0) v += scale[tw] * w0[tw * H + h];
    jb.w0c[i] = v;
  }
}

__device__ __forceinline__ float StepOutput(const Params& cp, const Job& jb, float dir, float mag,
                                            float p) {
  const float step_mult = cp.celo ? *jb.tensor_step : cp.step_mult;
  const float step = dir * expf(mag * cp.exp_mult) * step_mult;
  return cp.write_delta ? -step : p - step;
}

// C, exact float32: one element per thread.
template <int DM, int DR, int HH>
__global__ void __launch_bounds__(kApplyThreads) ApplyFp32(const __grid_constant__ Launch L) {
  constexpr int KC = Dec<DM, DR>::kCompact;
  constexpr int HM = HH ? HH : kMaxHidden;
  constexpr int UH = HH ? HH : 1, UK = DM ? KC : 1;  // unroll only compile-time sizes
  LOPT_DYNAMIC_SMEM(float, smem);
  const int64_t blk = blockIdx.x;
  const int ji = FindItem(L.start, L.n, blk);
  const Job& jb = L.jobs[ji];
  const Params& cp = L.cp;
  const int H = HH ? HH : cp.H, kc = jb.kc;
  // Weights: w0c [kc][H] then packed[b0 ..): b0, hidden layers, w_out, b_out.
  const float* w0c = jb.w0c;
  const float* rest = jb.packed + cp.b0;
  if (cp.weights_in_smem) {
    const int n0 = kc * H;
    const int n1 = static_cast<int>(cp.packed_size - cp.b0);
    for (int i = threadIdx.x; i < n0; i += blockDim.x) smem[i] = w0c[i];
    for (int i = threadIdx.x; i < n1; i += blockDim.x) smem[n0 + i] = rest[i];
    __syncthreads();
    w0c = smem;
    rest = smem + n0;
  }
  const int64_t e = (blk - L.start[ji]) * blockDim.x + threadIdx.x;
  if (e >= jb.numel) return;
  float x[KC];
  Features<DM, DR>(cp, jb, e, x, true, true);
  float ha[HM], hb[HM];
  const float* b0 = rest;
#pragma unroll(UH)
  for (int h = 0; h < HM; ++h)
    if (h < H) ha[h] = b0[h];
#pragma unroll(UK)
  for (int k = 0; k < KC; ++k) {
    if (k >= kc) break;
    const float xk = x[k];
    const float* w = w0c + k * H;
#pragma unroll(UH)
    for (int h = 0; h < HM; ++h)
      if (h < H) ha[h] += w[h] * xk;
  }
#pragma unroll(UH)
  for (int h = 0; h < HM; ++h)
    if (h < H) ha[h] = Relu(ha[h]);
  const float* wl = rest + H;
  for (int l = 1; l < cp.L; ++l) {
    const float* bias = wl + H * H;
#pragma unroll(UH)
    for (int h = 0; h < HM; ++h)
      if (h < H) hb[h] = bias[h];
#pragma unroll(UH)
    for (int j = 0; j < HM; ++j) {
      if (j >= H) break;
      const float a = ha[j];
      const float* w = wl + j * H;
#pragma unroll(UH)
      for (int h = 0; h < HM; ++h)
        if (h < H) hb[h] += w[h] * a;
    }
#pragma unroll(UH)
    for (int h = 0; h < HM; ++h)
      if (h < H) ha[h] = Relu(hb[h]);
    wl += H * H + H;
  }
  const float* w_out = wl;
  const float* b_out = wl + 2 * H;
  float dir = b_out[0], mag = b_out[1];
#pragma unroll(UH)
  for (int j = 0; j < HM; ++j) {
    if (j >= H) break;
    dir += w_out[2 * j] * ha[j];
    mag += w_out[2 * j + 1] * ha[j];
  }
  jb.out[e] = StepOutput(cp, jb, dir, mag, x[1]);
}

// ---------------------------------------------------------------------------
// C on tensor cores: mma.sync m16n8k8 TF32, fp32 accumulation. A warp computes
// the features of 32 elements (one per lane) into shared memory, then runs two
// 16-row tiles through the MLP with activations kept in registers.
//
// Fragment layout (PTX ISA, m16n8k8 .tf32; g = lane / 4, q = lane % 4):
//   A: a0 (g, q) a1 (g + 8, q) a2 (g, q + 4) a3 (g + 8, q + 4)
//   B: b0 (k = q, n = g) b1 (k = q + 4, n = g)
//   C: c0 (g, 2q) c1 (g, 2q + 1) c2 (g + 8, 2q) c3 (g + 8, 2q + 1)
// An accumulator tile becomes the next layer's A fragment without moving data
// if A's k column q stands for hidden unit 2q and column q + 4 for unit 2q + 1:
// the hidden weight rows are stored permuted accordingly (PermRow).
#if defined(LOPT_CUDA_EMULATION)
__device__ __forceinline__ uint32_t ToTf32(float x) { return emu::Tf32(x); }
__device__ __forceinline__ void Mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                    uint32_t a3, uint32_t b0, uint32_t b1) {
  emu::MmaM16N8K8(d, a0, a1, a2, a3, b0, b1);
}
#else
__device__ __forceinline__ uint32_t ToTf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ void Mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                    uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
#endif

// Source row (hidden unit) of stored row r of a hidden-layer weight matrix.
__host__ __device__ constexpr int PermRow(int r) {
  return (r & ~7) + ((r & 7) < 4 ? 2 * (r & 7) : 2 * ((r & 7) - 4) + 1);
}

__host__ __device__ constexpr int MmaStride(int H) { return H + 8; }

// Shared memory (floats) of the TF32 kernel for kpad first-layer rows.
__host__ __device__ constexpr int64_t MmaSmemFloats(int H, int L, int kpad) {
  return int64_t{kpad} * MmaStride(H) + H + int64_t{L - 1} * (H * MmaStride(H) + H) + 2 * H + 2 +
         int64_t{kMmaThreads} * (kpad + 4);
}

template <int DM, int DR, int HH>
__global__ void __launch_bounds__(kMmaThreads) ApplyTf32(const __grid_constant__ Launch L) {
  constexpr int NT = HH / 8, HS = MmaStride(HH);
  // With compile-time decay counts and H <= 32 the B fragments of the first two
  // layers live in registers for the whole block (no shared-memory loads per MMA).
  constexpr bool kRegW = DM != 0 && HH <= 32;
  constexpr int KTM = kRegW ? (Dec<DM, DR>::kCompact + 7) / 8 : 1;
  LOPT_DYNAMIC_SMEM(float, smem);
  const int64_t blk = blockIdx.x;
  const int ji = FindItem(L.start, L.n, blk);
  const Job& jb = L.jobs[ji];
  const Params& cp = L.cp;
  const int kc = jb.kc, kpad = (kc + 7) & ~7, XS = kpad + 4, KT = kpad / 8;
  float* w0s = smem;                   // [kpad][HS] tf32 bits
  float* b0s = w0s + kpad * HS;        // [H]
  float* hid = b0s + HH;               // (L-1) x ([H][HS] permuted rows, bias[H])
  float* wos = hid + (cp.L - 1) * (HH * HS + HH);  // w_out [H][2], b_out[2]
  float* xs = wos + 2 * HH + 2;        // [128][XS] features
  const float* pk = jb.packed;
  for (int i = threadIdx.x; i < kpad * HH; i += blockDim.x) {
    const int k = i / HH, h = i % HH;
    w0s[k * HS + h] = __uint_as_float(ToTf32(k < kc ? jb.w0c[k * HH + h] : 0.0f));
  }
  for (int i = threadIdx.x; i < HH; i += blockDim.x) b0s[i] = pk[cp.b0 + i];
  for (int l = 1; l < cp.L; ++l) {
    const float* src = pk + cp.b0 + HH + int64_t{l - 1} * (HH * HH + HH);
    float* dst = hid + (l - 1) * (HH * HS + HH);
    for (int i = threadIdx.x; i < HH * HH; i += blockDim.x) {
      const int r = i / HH, h = i % HH;
      dst[r * HS + h] = __uint_as_float(ToTf32(src[PermRow(r) * HH + h]));
    }
    for (int i = threadIdx.x; i < HH; i += blockDim.x) dst[HH * HS + i] = src[HH * HH + i];
  }
  {
    const float* src = pk + cp.b0 + HH + int64_t{cp.L - 1} * (HH * HH + HH);
    for (int i = threadIdx.x; i < 2 * HH + 2; i += blockDim.x) wos[i] = src[i];
  }
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gq = lane >> 2, q = lane & 3;
  uint32_t bw0[KTM][NT][2], bw1[kRegW ? NT : 1][NT][2];
  if (kRegW) {
#pragma unroll
    for (int kt = 0; kt < KTM; ++kt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const float* wb = w0s + (kt * 8 + q) * HS + gq + nt * 8;
        bw0[kt][nt][0] = kt < KT ? __float_as_uint(wb[0]) : 0u;
        bw0[kt][nt][1] = kt < KT ? __float_as_uint(wb[4 * HS]) : 0u;
      }
#pragma unroll
    for (int kt = 0; kt < (kRegW ? NT : 1); ++kt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const float* wb = hid + (kt * 8 + q) * HS + gq + nt * 8;
        bw1[kt][nt][0] = cp.L > 1 ? __float_as_uint(wb[0]) : 0u;
        bw1[kt][nt][1] = cp.L > 1 ? __float_as_uint(wb[4 * HS]) : 0u;
      }
  }
  const int64_t blk_e0 = (blk - L.start[ji]) * kMmaChunk;
  const int64_t blk_e1 = min(jb.numel, blk_e0 + kMmaChunk);
  float* xw = xs + warp * 32 * XS;
  for (int64_t e0 = blk_e0 + warp * 32; e0 < blk_e1; e0 += 32 * (kMmaThreads / 32)) {
    {
      const int64_t e = e0 + lane;
      float* xr = xw + lane * XS;
      int from = 0;
      if (e < blk_e1) {
        Features<DM, DR>(cp, jb, e, xr, true, true);
        from = kc;
      }
      for (int k = from; k < kpad; ++k) xr[k] = 0.0f;
    }
    __syncwarp();
#pragma unroll 1
    for (int mt = 0; mt < 2; ++mt) {
      const float* x0 = xw + (mt * 16 + gq) * XS;
      const float* x1 = x0 + 8 * XS;
      float acc[NT][4];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        acc[nt][0] = acc[nt][2] = b0s[nt * 8 + 2 * q];
        acc[nt][1] = acc[nt][3] = b0s[nt * 8 + 2 * q + 1];
      }
      if (kRegW) {
#pragma unroll
        for (int kt = 0; kt < KTM; ++kt) {
          if (kt >= KT) break;
          const uint32_t a0 = ToTf32(x0[kt * 8 + q]), a1 = ToTf32(x1[kt * 8 + q]);
          const uint32_t a2 = ToTf32(x0[kt * 8 + q + 4]), a3 = ToTf32(x1[kt * 8 + q + 4]);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
            Mma(acc[nt], a0, a1, a2, a3, bw0[kt][nt][0], bw0[kt][nt][1]);
        }
      } else {
        for (int kt = 0; kt < KT; ++kt) {
          const uint32_t a0 = ToTf32(x0[kt * 8 + q]), a1 = ToTf32(x1[kt * 8 + q]);
          const uint32_t a2 = ToTf32(x0[kt * 8 + q + 4]), a3 = ToTf32(x1[kt * 8 + q + 4]);
          const float* wb = w0s + (kt * 8 + q) * HS + gq;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
            Mma(acc[nt], a0, a1, a2, a3, __float_as_uint(wb[nt * 8]),
                __float_as_uint(wb[4 * HS + nt * 8]));
        }
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[nt][r] = Relu(acc[nt][r]);
      for (int l = 1; l < cp.L; ++l) {
        const float* ws = hid + (l - 1) * (HH * HS + HH);
        const float* bias = ws + HH * HS;
        float nacc[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          nacc[nt][0] = nacc[nt][2] = bias[nt * 8 + 2 * q];
          nacc[nt][1] = nacc[nt][3] = bias[nt * 8 + 2 * q + 1];
        }
#pragma unroll
        for (int kt = 0; kt < NT; ++kt) {
          const uint32_t a0 = ToTf32(acc[kt][0]), a1 = ToTf32(acc[kt][2]);
          const uint32_t a2 = ToTf32(acc[kt][1]), a3 = ToTf32(acc[kt][3]);
          const float* wb = ws + (kt * 8 + q) * HS + gq;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            if (kRegW && l == 1)
              Mma(nacc[nt], a0, a1, a2, a3, bw1[kRegW ? kt : 0][nt][0],
                  bw1[kRegW ? kt : 0][nt][1]);
            else
              Mma(nacc[nt], a0, a1, a2, a3, __float_as_uint(wb[nt * 8]),
                  __float_as_uint(wb[4 * HS + nt * 8]));
          }
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int r = 0; r < 4; ++r) acc[nt][r] = Relu(nacc[nt][r]);
      }
      // Output layer in fp32: each lane holds units 2q, 2q + 1 of every n tile.
      float d0 = 0.f, m0 = 0.f, d1 = 0.f, m1 = 0.f;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int u = nt * 8 + 2 * q;
        d0 += wos[2 * u] * acc[nt][0] + wos[2 * u + 2] * acc[nt][1];
        m0 += wos[2 * u + 1] * acc[nt][0] + wos[2 * u + 3] * acc[nt][1];
        d1 += wos[2 * u] * acc[nt][2] + wos[2 * u + 2] * acc[nt][3];
        m1 += wos[2 * u + 1] * acc[nt][2] + wos[2 * u + 3] * acc[nt][3];
      }
#pragma unroll
      for (int off = 1; off <= 2; off <<= 1) {
        d0 += __shfl_xor_sync(0xffffffffu, d0, off);
        m0 += __shfl_xor_sync(0xffffffffu, m0, off);
        d1 += __shfl_xor_sync(0xffffffffu, d1, off);
        m1 += __shfl_xor_sync(0xffffffffu, m1, off);
      }
      if (q < 2) {
        const int row = mt * 16 + gq + 8 * q;
        const int64_t e = e0 + row;
        if (e < blk_e1) {
          const float dir = wos[2 * HH] + (q == 0 ? d0 : d1);
          const float mag = wos[2 * HH + 1] + (q == 0 ? m0 : m1);
          jb.out[e] = StepOutput(cp, jb, dir, mag, xw[row * XS + 1]);
        }
      }
    }
    __syncwarp();  // the feature tile is rewritten next iteration
  }
}

// ---------------------------------------------------------------------------
// Host side.

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct ScratchPlan {
  size_t bytes = 0;
  size_t Take(size_t n) {  // returns an offset, 256-byte aligned
    const size_t off = bytes;
    bytes += (n + 255) / 256 * 256;
    return off;
  }
};

Reduction MakeReduction(const float* in, int64_t X, int64_t R, int64_t Y, int square) {
  Reduction r{};
  r.in = in;
  r.X = X;
  r.R = R;
  r.Y = Y;
  r.square = square;
  r.coop = Y == 1 && R > kCoopMinRows;
  r.rc = r.coop ? kReduceChunkCoop : kReduceChunkCol;
  r.nch = CeilDiv(R, r.rc);
  return r;
}

int64_t ReductionBlocks(const Reduction& r) {
  return r.coop ? r.X * r.nch : CeilDiv(r.X * r.nch * r.Y, kReduceThreads);
}

// Launches kernel over the jobs [j0, j1) with per-job block counts.
template <typename Fn>
std::string LaunchJobs(const Launch& proto, const Job* jobs, int n, Fn blocks_of,
                       const std::function<void(const Launch&, int64_t)>& go) {
  auto L = std::make_unique<Launch>(proto);
  L->n = n;
  int64_t total = 0;
  for (int i = 0; i < n; ++i) {
    L->jobs[i] = jobs[i];
    L->start[i] = total;
    total += blocks_of(jobs[i]);
  }
  L->start[n] = total;
  if (total == 0) return "";
  if (total > 0x7fffffffLL) return "tensor too large for one launch";
  go(*L, total);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return std::string("CUDA launch failed: ") + cudaGetErrorString(err);
  return "";
}

std::string LaunchReductions(const std::vector<Reduction>& rs, cudaStream_t stream) {
  if (rs.empty()) return "";
  auto L = std::make_unique<ReduceLaunch>();
  int64_t total = 0;
  L->n = static_cast<int>(rs.size());
  for (size_t i = 0; i < rs.size(); ++i) {
    L->r[i] = rs[i];
    L->start[i] = total;
    total += ReductionBlocks(rs[i]);
  }
  L->start[rs.size()] = total;
  if (total == 0) return "";
  if (total > 0x7fffffffLL) return "tensor too large for one launch";
  LOPT_LAUNCH(ReduceStage1, static_cast<unsigned>(total), kReduceThreads, 0, stream, *L);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return std::string("CUDA launch failed: ") + cudaGetErrorString(err);
  return "";
}

template <int DM, int DR>
struct Kernels {
  static void Stats(const Launch& L, int64_t blocks, cudaStream_t s) {
    auto kernel = lopt::cuda::Stats<DM, DR>;
    LOPT_LAUNCH(kernel, static_cast<unsigned>(blocks), kStatsThreads, 0, s, L);
  }
  static void ApplyFp32(const Launch& L, int64_t blocks, size_t smem, cudaStream_t s) {
    auto run = [&](auto kernel) {
      if (smem > kDefaultSmem)
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem));
      LOPT_LAUNCH(kernel, static_cast<unsigned>(blocks), kApplyThreads, smem, s, L);
    };
    switch (L.cp.H) {
      case 4: run(lopt::cuda::ApplyFp32<DM, DR, 4>); break;
      case 32: run(lopt::cuda::ApplyFp32<DM, DR, 32>); break;
      default: run(lopt::cuda::ApplyFp32<DM, DR, 0>); break;
    }
  }
  static void ApplyTf32(const Launch& L, int64_t blocks, size_t smem, cudaStream_t s) {
    auto run = [&](auto kernel) {
      if (smem > kDefaultSmem)
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem));
      LOPT_LAUNCH(kernel, static_cast<unsigned>(blocks), kMmaThreads, smem, s, L);
    };
    switch (L.cp.H) {
      case 16: run(lopt::cuda::ApplyTf32<DM, DR, 16>); break;
      case 32: run(lopt::cuda::ApplyTf32<DM, DR, 32>); break;
      default: run(lopt::cuda::ApplyTf32<DM, DR, 64>); break;
    }
  }
};

int MaxKc(const Config& c) {  // factored tensors have the most MLP inputs
  return 2 + 2 * c.dm + 2 * c.dr + 6 * c.da + (c.celo ? 1 + c.dr : 0);
}

}  // namespace

bool UsesTensorCores(const Config& cfg, Precision precision) {
  if (precision != Precision::kTf32) return false;
  if (cfg.hidden != 16 && cfg.hidden != 32 && cfg.hidden != 64) return false;
  const int kpad = (MaxKc(cfg) + 7) & ~7;
  return MmaSmemFloats(cfg.hidden, cfg.hidden_layers, kpad) * 4 <= int64_t{kMaxMmaSmem};
}

std::string CudaFusedUpdate(const Config& cfg, bool write_delta, Precision precision,
                            const std::vector<TensorArgs>& tensors, const ScratchFn& scratch,
                            cudaStream_t stream) {
  if (const char* err = ValidateConfig(cfg)) return err;
  if (cfg.da == 0) return "the configuration without Adafactor features has no CUDA kernel (CPU only)";
  if (tensors.empty()) return "";
  const PackedLayout PL(cfg);
  Launch proto{};
  Params& cp = proto.cp;
  cp.H = cfg.hidden;
  cp.L = cfg.hidden_layers;
  cp.dm = cfg.dm;
  cp.dr = cfg.dr;
  cp.da = cfg.da;
  cp.exp_mult = cfg.exp_mult;
  cp.step_mult = cfg.step_mult;
  cp.write_delta = write_delta ? 1 : 0;
  cp.celo = cfg.celo ? 1 : 0;
  cp.mom_fac_eps = cfg.celo ? 0.0f : kMomFacEps;
  cp.mom_beta = PL.mom_beta;
  cp.mom_1mb = PL.mom_1mb;
  cp.rms_beta = PL.rms_beta;
  cp.rms_1mb = PL.rms_1mb;
  cp.fac_beta = PL.fac_beta;
  cp.fac_1mb = PL.fac_1mb;
  cp.w0 = PL.w0;
  cp.b0 = PL.b0;
  cp.packed_size = PL.size;
  const int da = cfg.da, H = cfg.hidden;
  const int64_t weight_floats = int64_t{MaxKc(cfg)} * H + (PL.size - PL.b0);
  const size_t fp32_smem = weight_floats * 4 <= int64_t{kDefaultSmem} ? weight_floats * 4 : 0;
  cp.weights_in_smem = fp32_smem > 0;
  const bool tensor_cores = UsesTensorCores(cfg, precision);
  const size_t mma_smem =
      tensor_cores ? MmaSmemFloats(H, cfg.hidden_layers, (MaxKc(cfg) + 7) & ~7) * 4 : 0;

  // Plan every job and its scratch (offsets first, pointers once allocated).
  std::vector<Job> jobs(tensors.size());
  struct Offsets {
    size_t line_part, cross_part, group_part, tab_part, stats_part, line_fac, cross_fac, w0c;
  };
  std::vector<Offsets> offs(tensors.size());
  ScratchPlan plan;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const TensorArgs& a = tensors[i];
    Job& j = jobs[i];
    const std::string where = "tensor " + std::to_string(i) + ": ";
    const int rank = static_cast<int>(a.shape.size());
    if (rank < 1) return where + "tensor rank must be >= 1 (pass scalars as shape [1])";
    int64_t numel = 1;
    for (int64_t d : a.shape) {
      if (d < 1) return where + "tensor dimensions must be >= 1";
      if (numel > (int64_t{1} << 40) / d) return where + "tensor is too large";
      numel *= d;
    }
    j.factored = rank >= 2;
    if (!a.p || !a.g || !a.m || !a.rms || !a.out || !a.m_out || !a.rms_out || !a.packed)
      return where + "missing buffer";
    if (j.factored ? (!a.v_row || !a.v_col || !a.v_row_out || !a.v_col_out)
                   : (!a.v_full || !a.v_full_out))
      return where + "missing accumulator buffer";
    j.numel = numel;
    j.p = a.p, j.g = a.g, j.m = a.m, j.rms = a.rms, j.v_full = a.v_full, j.packed = a.packed;
    j.out = a.out, j.m_out = a.m_out, j.rms_out = a.rms_out, j.v_full_out = a.v_full_out;
    j.kpe = 2 + 2 * cfg.dm + 2 * cfg.dr + 2 * da + (j.factored ? 0 : 2 * da) + (cfg.celo ? 1 + cfg.dr : 0);
    if (cfg.celo && !a.lr_mult) return where + "missing lr_mult";
    j.lr_mult = a.lr_mult;
    j.kc = j.kpe + (j.factored ? 4 * da : 0);
    j.A = j.N1 = j.B = j.C = 1;
    j.N2 = j.W = numel;
    Offsets& o = offs[i];
    if (j.factored) {
      int d1 = 0, d0 = 0;
      FactoredDims(a.shape.data(), rank, &d1, &d0);
      const FactoredView view = MakeFactoredView(a.shape.data(), rank, d1, d0);
      j.A = view.A, j.N1 = view.N1, j.B = view.B, j.N2 = view.N2, j.C = view.C;
      j.W = j.N2 * j.C;
      j.line_is_row = view.line_is_row;
      j.simple = j.A == 1 && j.B == 1 && j.C == 1;
      j.n_line = j.A * j.N1 * j.B * j.C;
      j.n_cross = j.A * j.B * j.W;
      j.v_line_old = j.line_is_row ? a.v_row : a.v_col;
      j.v_cross_old = j.line_is_row ? a.v_col : a.v_row;
      j.v_line = j.line_is_row ? a.v_row_out : a.v_col_out;
      j.v_cross = j.line_is_row ? a.v_col_out : a.v_row_out;
      const Reduction rl = MakeReduction(nullptr, j.A * j.N1 * j.B, j.N2, j.C, 1);
      const Reduction rx = MakeReduction(nullptr, j.A, j.N1, j.B * j.W, 1);
      const Reduction rg = j.line_is_row ? MakeReduction(nullptr, j.A, j.N1, j.B * j.C * da, 0)
                                         : MakeReduction(nullptr, j.A * j.B, j.N2, j.C * da, 0);
      j.nch_line = rl.nch;
      j.nch_cross = rx.nch;
      j.nch_group = rg.nch;
      j.n_tab_blocks = CeilDiv(j.n_line + j.n_cross, kEntryThreads);
      o.line_part = plan.Take(rl.X * rl.nch * rl.Y * 8);
      o.cross_part = plan.Take(rx.X * rx.nch * rx.Y * 8);
      o.group_part = plan.Take(rg.X * rg.nch * rg.Y * 8);
      o.tab_part = plan.Take(j.n_tab_blocks * 4 * da * 8);
      o.line_fac = plan.Take(j.n_line * da * 4);
      o.cross_fac = plan.Take(j.n_cross * da * 4);
    }
    j.n_stats_blocks = CeilDiv(numel, kStatsChunk);
    o.stats_part = plan.Take(j.n_stats_blocks * j.kpe * 8);
    o.w0c = plan.Take((size_t(j.kc) * H + 1) * 4);  // + Celo's tensor step multiplier
  }
  char* base = static_cast<char*>(scratch(plan.bytes));
  if (!base) return "could not allocate " + std::to_string(plan.bytes) + " bytes of GPU scratch";
  for (size_t i = 0; i < jobs.size(); ++i) {
    Job& j = jobs[i];
    const Offsets& o = offs[i];
    if (j.factored) {
      j.line_part = reinterpret_cast<double*>(base + o.line_part);
      j.cross_part = reinterpret_cast<double*>(base + o.cross_part);
      j.group_part = reinterpret_cast<double*>(base + o.group_part);
      j.tab_part = reinterpret_cast<double*>(base + o.tab_part);
      j.line_fac = reinterpret_cast<float*>(base + o.line_fac);
      j.cross_fac = reinterpret_cast<float*>(base + o.cross_fac);
    }
    j.stats_part = reinterpret_cast<double*>(base + o.stats_part);
    j.w0c = reinterpret_cast<float*>(base + o.w0c);
    j.tensor_step = j.w0c + size_t(j.kc) * H;
  }

  const bool fast = cfg.dm == 3 && cfg.dr == 1;
  auto stats = fast ? &Kernels<3, 1>::Stats : &Kernels<0, 0>::Stats;
  auto apply_fp32 = fast ? &Kernels<3, 1>::ApplyFp32 : &Kernels<0, 0>::ApplyFp32;
  auto apply_tf32 = fast ? &Kernels<3, 1>::ApplyTf32 : &Kernels<0, 0>::ApplyTf32;
  const int64_t n_jobs = static_cast<int64_t>(jobs.size());
  for (int64_t j0 = 0; j0 < n_jobs; j0 += kMaxJobs) {
    const int n = static_cast<int>(std::min<int64_t>(kMaxJobs, n_jobs - j0));
    const Job* group = jobs.data() + j0;
    std::string err;
    // A1: g^2 sums along both factored axes.
    std::vector<Reduction> rs;
    for (int i = 0; i < n; ++i) {
      const Job& j = group[i];
      if (!j.factored) continue;
      const int sq = cfg.celo ? 2 : 1;  // Celo clips g first
      Reduction rl = MakeReduction(j.g, j.A * j.N1 * j.B, j.N2, j.C, sq);
      rl.part = j.line_part;
      Reduction rx = MakeReduction(j.g, j.A, j.N1, j.B * j.W, sq);
      rx.part = j.cross_part;
      rs.push_back(rl);
      rs.push_back(rx);
    }
    if (!(err = LaunchReductions(rs, stream)).empty()) return err;
    // A2: new accumulators.
    auto entry_blocks = [](const Job& j) {
      return j.factored ? CeilDiv(j.n_line + j.n_cross, kEntryThreads) : int64_t{0};
    };
    err = LaunchJobs(proto, group, n, entry_blocks, [&](const Launch& L, int64_t b) {
      LOPT_LAUNCH(NewAccumulators, static_cast<unsigned>(b), kEntryThreads, 0, stream, L);
    });
    if (!err.empty()) return err;
    // A3: sums of the new v_row along d1.
    rs.clear();
    for (int i = 0; i < n; ++i) {
      const Job& j = group[i];
      if (!j.factored) continue;
      Reduction rg = j.line_is_row ? MakeReduction(j.v_line, j.A, j.N1, j.B * j.C * da, 0)
                                   : MakeReduction(j.v_cross, j.A * j.B, j.N2, j.C * da, 0);
      rg.part = j.group_part;
      rs.push_back(rg);
    }
    if (!(err = LaunchReductions(rs, stream)).empty()) return err;
    // A4: factors and broadcast-feature statistics.
    err = LaunchJobs(proto, group, n, entry_blocks, [&](const Launch& L, int64_t b) {
      LOPT_LAUNCH(Factors, static_cast<unsigned>(b), kEntryThreads, 0, stream, L);
    });
    if (!err.empty()) return err;
    // B1: feature statistics.
    err = LaunchJobs(proto, group, n, [](const Job& j) { return j.n_stats_blocks; },
                     [&](const Launch& L, int64_t b) { stats(L, b, stream); });
    if (!err.empty()) return err;
    // B2: fold the scales into w0.
    err = LaunchJobs(proto, group, n, [](const Job&) { return int64_t{1}; },
                     [&](const Launch& L, int64_t b) {
                       LOPT_LAUNCH(Fold, static_cast<unsigned>(b), kFoldThreads, 0, stream, L);
                     });
    if (!err.empty()) return err;
    // C: the MLP and every write. With tensor cores, small tensors still take the fp32
    // kernel: a per-tensor tolerance relative to the largest step means little for them.
    auto on_tc = [&](const Job& j) { return tensor_cores && j.numel >= kTensorCoreMinElems; };
    if (tensor_cores) {
      err = LaunchJobs(proto, group, n,
                       [&](const Job& j) { return on_tc(j) ? CeilDiv(j.numel, kMmaChunk) : 0; },
                       [&](const Launch& L, int64_t b) { apply_tf32(L, b, mma_smem, stream); });
      if (!err.empty()) return err;
    }
    err = LaunchJobs(proto, group, n,
                     [&](const Job& j) { return on_tc(j) ? 0 : CeilDiv(j.numel, kApplyThreads); },
                     [&](const Launch& L, int64_t b) { apply_fp32(L, b, fp32_smem, stream); });
    if (!err.empty()) return err;
  }
  return "";
}

}  // namespace lopt::cuda
