// Kernel-level tests of the CPU update, without Python or XLA (built with
// -DLOPT_BUILD_TESTS=ON; tools/sanitize.sh runs it under ASan + UBSan):
//   1. state outputs equal hand-computed values (m, rms, v_full, v_row/v_col);
//   2. bit-identical results for 1, 2, 3 and 8 threads and a reversed task order;
//   3. two threads calling CpuFusedUpdate at once give the single-thread results;
//   4. 64-bit indexing: the per-element loops of every instruction set, run on an
//      element range beyond 2^31 (and one straddling it) through offset base
//      pointers, give exactly the results of the same data at small indices;
//   5. bad arguments give an error message and write nothing.
// Exit status 0 when every check passes; each failure prints one line.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "lopt_config.h"
#include "lopt_cpu.h"
#include "lopt_cpu_tiles.h"

namespace {

int g_failures = 0;
int g_checks = 0;

void Check(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

bool BitEqual(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * 4) == 0);
}

std::vector<float> Random(size_t n, uint32_t seed, float lo, float hi) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = d(gen);
  return v;
}

// A packed meta-parameter buffer with the default decays and random MLP weights.
std::vector<float> MakePacked(const lopt::Config& c, uint32_t seed) {
  const lopt::PackedLayout L(c);
  std::vector<float> p = Random(static_cast<size_t>(L.size), seed, -0.5f, 0.5f);
  const float mom[3] = {0.9f, 0.99f, 0.999f};
  for (int k = 0; k < c.dm; ++k) p[L.mom_beta + k] = mom[k % 3], p[L.mom_1mb + k] = 1 - mom[k % 3];
  for (int k = 0; k < c.dr; ++k) p[L.rms_beta + k] = 0.999f, p[L.rms_1mb + k] = 1 - 0.999f;
  for (int k = 0; k < c.da; ++k) p[L.fac_beta + k] = mom[k % 3], p[L.fac_1mb + k] = 1 - mom[k % 3];
  return p;
}

// Owns the buffers of one tensor; Args() points a TensorArgs at them.
struct Tensor {
  std::vector<int64_t> shape;
  bool factored = false;
  std::vector<float> p, g, m, rms, v_row, v_col, v_full;
  std::vector<float> out, m_out, rms_out, v_row_out, v_col_out, v_full_out;

  Tensor(const lopt::Config& c, std::vector<int64_t> s, uint32_t seed) : shape(std::move(s)) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    factored = shape.size() >= 2;
    p = Random(n, seed, -1, 1);
    g = Random(n, seed + 1, -0.1f, 0.1f);
    m = Random(n * c.dm, seed + 2, -0.05f, 0.05f);
    rms = Random(n * c.dr, seed + 3, 0.0f, 0.01f);
    if (factored) {
      int d1 = 0, d0 = 0;
      lopt::FactoredDims(shape.data(), static_cast<int>(shape.size()), &d1, &d0);
      v_row = Random(n / shape[d0] * c.da, seed + 4, 0.0f, 0.01f);
      v_col = Random(n / shape[d1] * c.da, seed + 5, 0.0f, 0.01f);
    } else {
      v_full = Random(n * c.da, seed + 6, 0.0f, 0.01f);
    }
    out.assign(p.size(), -7.0f);
    m_out.assign(m.size(), -7.0f);
    rms_out.assign(rms.size(), -7.0f);
    v_row_out.assign(v_row.size(), -7.0f);
    v_col_out.assign(v_col.size(), -7.0f);
    v_full_out.assign(v_full.size(), -7.0f);
  }

  lopt::TensorArgs Args(const float* packed) {
    lopt::TensorArgs a;
    a.shape = shape;
    a.p = p.data(), a.g = g.data(), a.m = m.data(), a.rms = rms.data();
    a.out = out.data(), a.m_out = m_out.data(), a.rms_out = rms_out.data();
    if (factored) {
      a.v_row = v_row.data(), a.v_col = v_col.data();
      a.v_row_out = v_row_out.data(), a.v_col_out = v_col_out.data();
    } else {
      a.v_full = v_full.data(), a.v_full_out = v_full_out.data();
    }
    a.packed = packed;
    return a;
  }

  std::vector<std::vector<float>> Outputs() const {
    return {out, m_out, rms_out, v_row_out, v_col_out, v_full_out};
  }
};

lopt::ParallelFor Threads(int n_threads, bool reverse = false) {
  return [n_threads, reverse](int64_t n, const std::function<void(int64_t)>& fn) {
    if (n_threads <= 1) {
      for (int64_t i = 0; i < n; ++i) fn(reverse ? n - 1 - i : i);
      return;
    }
    std::vector<std::thread> pool;
    for (int t = 0; t < n_threads; ++t)
      pool.emplace_back([&, t] {
        for (int64_t i = t; i < n; i += n_threads) fn(i);  // strided: every thread interleaves
      });
    for (auto& th : pool) th.join();
  };
}

std::vector<std::vector<float>> RunModel(const lopt::Config& c, const std::vector<std::vector<int64_t>>& shapes,
                                         const lopt::ParallelFor& pf, std::string* err,
                                         lopt::CpuPrecision precision = lopt::CpuPrecision::kFp32) {
  const std::vector<float> packed = MakePacked(c, 99);
  std::vector<Tensor> ts;
  for (size_t i = 0; i < shapes.size(); ++i) ts.emplace_back(c, shapes[i], 1000 + 17 * static_cast<uint32_t>(i));
  std::vector<lopt::TensorArgs> args;
  for (Tensor& t : ts) args.push_back(t.Args(packed.data()));
  *err = lopt::CpuFusedUpdate(c, false, args, pf, precision);
  std::vector<std::vector<float>> all;
  for (const Tensor& t : ts)
    for (auto& o : t.Outputs()) all.push_back(o);
  return all;
}

const std::vector<std::vector<int64_t>> kShapes = {
    {1}, {7}, {40000}, {5, 3}, {300, 517}, {4, 3, 2}, {2, 1, 6}, {70, 3, 90}, {3, 4, 5, 2}, {1, 1}, {20000, 3}};

void TestHandComputedState() {
  lopt::Config c;
  const std::vector<float> packed = MakePacked(c, 5);
  const lopt::PackedLayout L(c);
  Tensor vec(c, {33}, 1), mat(c, {6, 4}, 2);
  std::vector<lopt::TensorArgs> args = {vec.Args(packed.data()), mat.Args(packed.data())};
  Check(lopt::CpuFusedUpdate(c, false, args, Threads(1)).empty(), "hand: call failed");
  double worst = 0;
  // Error relative to the sum of the magnitudes of the two terms (m may cancel to ~0).
  auto rel2 = [&](float got, double t1, double t2) {
    worst = std::fmax(worst, std::fabs(got - (t1 + t2)) / (std::fabs(t1) + std::fabs(t2) + 1e-30));
  };
  for (Tensor* t : {&vec, &mat}) {
    const size_t n = t->p.size();
    for (size_t i = 0; i < n; ++i) {
      const double g = t->g[i];
      for (int k = 0; k < c.dm; ++k)
        rel2(t->m_out[i * c.dm + k], double(packed[L.mom_beta + k]) * t->m[i * c.dm + k], double(packed[L.mom_1mb + k]) * g);
      rel2(t->rms_out[i], double(packed[L.rms_beta]) * t->rms[i], double(packed[L.rms_1mb]) * g * g);
      Check(std::isfinite(t->out[i]) && t->out[i] != -7.0f, "hand: params written");
    }
  }
  for (size_t i = 0; i < vec.p.size(); ++i)
    for (int k = 0; k < c.da; ++k) {
      const double g = vec.g[i];
      rel2(vec.v_full_out[i * c.da + k],
           double(packed[L.fac_beta + k]) * vec.v_full[i * c.da + k], double(packed[L.fac_1mb + k]) * (g * g + 1e-30));
    }
  // (6, 4): d0 = 0 (size 6), d1 = 1; v_row drops d0 -> [4][da] = mean over rows.
  for (int j = 0; j < 4; ++j)
    for (int k = 0; k < c.da; ++k) {
      double s = 0;
      for (int i = 0; i < 6; ++i) s += double(mat.g[i * 4 + j]) * mat.g[i * 4 + j] + 1e-30;
      rel2(mat.v_row_out[j * c.da + k],
           double(packed[L.fac_beta + k]) * mat.v_row[j * c.da + k], double(packed[L.fac_1mb + k]) * s / 6);
    }
  for (int i = 0; i < 6; ++i)
    for (int k = 0; k < c.da; ++k) {
      double s = 0;
      for (int j = 0; j < 4; ++j) s += double(mat.g[i * 4 + j]) * mat.g[i * 4 + j] + 1e-30;
      rel2(mat.v_col_out[i * c.da + k],
           double(packed[L.fac_beta + k]) * mat.v_col[i * c.da + k], double(packed[L.fac_1mb + k]) * s / 4);
    }
  Check(worst < 1e-6, "hand: state within 1e-6 (of the terms' magnitude) of the hand-computed values, worst " + std::to_string(worst));
}

void TestThreadCounts() {
  for (int hidden : {4, 32}) {
    lopt::Config c;
    c.hidden = hidden;
    std::string err;
    const auto base = RunModel(c, kShapes, Threads(1), &err);
    Check(err.empty(), "threads: " + err);
    for (int n : {2, 3, 8}) {
      const auto got = RunModel(c, kShapes, Threads(n), &err);
      bool same = err.empty() && got.size() == base.size();
      for (size_t i = 0; same && i < got.size(); ++i) same = BitEqual(got[i], base[i]);
      Check(same, "threads: " + std::to_string(n) + " threads differ from 1 (hidden " + std::to_string(hidden) + ")");
    }
    const auto rev = RunModel(c, kShapes, Threads(1, true), &err);
    bool same = rev.size() == base.size();
    for (size_t i = 0; same && i < rev.size(); ++i) same = BitEqual(rev[i], base[i]);
    Check(same, "threads: reversed task order differs");
  }
}

void TestConcurrentCalls() {
  lopt::Config a, b;
  b.hidden = 16;
  b.hidden_layers = 3;
  std::string ea, eb;
  const auto want_a = RunModel(a, kShapes, Threads(1), &ea);
  const auto want_b = RunModel(b, kShapes, Threads(1), &eb);
  for (int round = 0; round < 3; ++round) {
    std::vector<std::vector<float>> got_a, got_b;
    std::string e1, e2;
    std::thread t1([&] { got_a = RunModel(a, kShapes, Threads(2), &e1); });
    std::thread t2([&] { got_b = RunModel(b, kShapes, Threads(3), &e2); });
    t1.join();
    t2.join();
    bool same = e1.empty() && e2.empty() && got_a.size() == want_a.size() && got_b.size() == want_b.size();
    for (size_t i = 0; same && i < got_a.size(); ++i) same = BitEqual(got_a[i], want_a[i]);
    for (size_t i = 0; same && i < got_b.size(); ++i) same = BitEqual(got_b[i], want_b[i]);
    Check(same, "concurrent: two simultaneous calls differ from sequential ones");
  }
}

// Element-range loops at indices >= 2^31 through base pointers offset by -e0, so only
// the touched elements need memory. Any 32-bit truncation reads or writes elsewhere
// (ASan reports it; without ASan the results differ or it faults).
void TestIndex64(const lopt::tiles::Kernels& K) {
  const std::string isa = K.isa;
  const int H = 8, dm = 3, dr = 1, da = 3;
  const int compact_full = lopt::tiles::NumCompactFeatures(dm, dr, da, false);
  const int compact_fac = lopt::tiles::NumCompactFeatures(dm, dr, da, true);
  const std::vector<float> betas = {0.9f, 0.99f, 0.999f, 0.1f, 0.01f, 0.001f};
  const std::vector<float> w0c = Random(static_cast<size_t>(compact_full) * H, 11, -0.3f, 0.3f);
  const std::vector<float> b0 = Random(H, 12, -0.1f, 0.1f);
  const std::vector<float> hidden_wb = Random(H * H + H, 13, -0.3f, 0.3f);
  const std::vector<float> w_out = Random(2 * H, 14, -0.3f, 0.3f);
  const std::vector<float> b_out = {0.01f, 0.02f};
  auto base_plan = [&](bool factored) {
    lopt::tiles::TensorPlan P{};
    P.hidden = H, P.layers = 2, P.dm = dm, P.dr = dr, P.da = da;
    P.num_compact = factored ? compact_fac : compact_full;
    P.factored = factored;
    P.mom_beta = betas.data(), P.mom_1mb = betas.data() + 3;
    P.rms_beta = betas.data() + 2, P.rms_1mb = betas.data() + 5;
    P.fac_beta = betas.data(), P.fac_1mb = betas.data() + 3;
    P.w0c = w0c.data(), P.b0 = b0.data(), P.hidden_wb = hidden_wb.data();
    P.w_out = w_out.data(), P.b_out = b_out.data();
    P.exp_mult = 0.01f, P.step_mult = 0.01f, P.write_delta = false;
    P.mom_fac_eps = lopt::kMomFacEps;
    return P;
  };
  const int64_t n = 1000;  // elements actually touched
  struct Bufs {
    std::vector<float> p, g, m, rms, v, out, m_out, rms_out, v_out;
    explicit Bufs(int64_t n)
        : p(Random(n, 1, -1, 1)), g(Random(n, 2, -1, 1)), m(Random(n * 3, 3, -1, 1)),
          rms(Random(n, 4, 0, 1)), v(Random(n * 3, 5, 0, 1)), out(n), m_out(n * 3), rms_out(n),
          v_out(n * 3) {}
  };
  // Points P at bufs as if they held elements [e0, e0 + n) of a huge tensor.
  auto point = [&](lopt::tiles::TensorPlan& P, Bufs& b, int64_t e0) {
    // uintptr_t arithmetic: the shifted pointers are never dereferenced outside [e0, e0 + n).
    auto shift = [e0](auto* ptr, int64_t per) {
      return reinterpret_cast<decltype(ptr)>(reinterpret_cast<uintptr_t>(ptr) - static_cast<uintptr_t>(e0 * per * 4));
    };
    P.p = shift(b.p.data(), 1), P.g = shift(b.g.data(), 1), P.m = shift(b.m.data(), dm);
    P.rms = shift(b.rms.data(), dr), P.v_full = shift(b.v.data(), da);
    P.out = shift(b.out.data(), 1), P.m_out = shift(b.m_out.data(), dm);
    P.rms_out = shift(b.rms_out.data(), dr), P.v_full_out = shift(b.v_out.data(), da);
  };
  auto compare = [&](const std::string& what, const Bufs& a, const Bufs& b, const std::vector<double>& sa,
                     const std::vector<double>& sb, bool with_v) {
    bool same = BitEqual(a.out, b.out) && BitEqual(a.m_out, b.m_out) && BitEqual(a.rms_out, b.rms_out) &&
                (!with_v || BitEqual(a.v_out, b.v_out)) && sa == sb;
    Check(same, "index64 " + isa + " " + what + ": results differ from the same data at small indices");
  };
  // Rank 1, a tensor of 2^32 + 2^20 elements: ranges above 2^32 and across 2^31.
  for (int64_t e0 : {(int64_t{1} << 32) + 5, (int64_t{1} << 31) - 501}) {
    lopt::tiles::TensorPlan big = base_plan(false), small = base_plan(false);
    big.numel = (int64_t{1} << 32) + (1 << 20);
    big.A = big.N1 = big.B = big.C = 1, big.N2 = big.W = big.numel;
    small.numel = n, small.A = small.N1 = small.B = small.C = 1, small.N2 = small.W = n;
    Bufs bb(n), bs(n);
    point(big, bb, e0);
    point(small, bs, 0);
    std::vector<double> sum_big(compact_full, 0.0), sum_small(compact_full, 0.0);
    K.stats(big, e0, e0 + n, sum_big.data());
    K.stats(small, 0, n, sum_small.data());
    K.apply(big, e0, e0 + n);
    K.apply(small, 0, n);
    compare("rank 1 at " + std::to_string(e0), bb, bs, sum_big, sum_small, true);
  }
  // Factored (A=1, N1, B=1, N2, C=2): line L of a 2^17 x 2^14 x 2 tensor (2^32 elements).
  {
    const int64_t N1 = int64_t{1} << 17, N2 = 500, C = 2, W = N2 * C;
    const int64_t line = N1 - 3, e0 = line * W;  // ~2^27 * 1000 > 2^36
    std::vector<float> line_fac = Random((line + 1) * C * da, 21, 0.5f, 2.0f);
    std::vector<float> line_tab = Random((line + 1) * C * H, 22, -0.2f, 0.2f);
    // Cross tables are transposed ([da][stride], [H][stride]) with tile padding.
    const int64_t stride = W + lopt::tiles::kTileLanes;
    std::vector<float> cross_fac = Random(da * stride, 23, 0.5f, 2.0f);
    std::vector<float> cross_tab = Random(H * stride, 24, -0.2f, 0.2f);
    // The small tensor is that one line alone: its line tables are line L's entries.
    std::vector<float> line_fac_s(line_fac.end() - C * da, line_fac.end());
    std::vector<float> line_tab_s(line_tab.end() - C * H, line_tab.end());
    lopt::tiles::TensorPlan big = base_plan(true), small = base_plan(true);
    big.A = big.B = 1, big.N1 = N1, big.N2 = N2, big.C = C, big.W = W, big.numel = N1 * W;
    small.A = small.B = small.N1 = 1, small.N2 = N2, small.C = C, small.W = W, small.numel = W;
    big.line_fac = line_fac.data(), big.line_tab = line_tab.data();
    small.line_fac = line_fac_s.data(), small.line_tab = line_tab_s.data();
    big.cross_fac_t = small.cross_fac_t = cross_fac.data();
    big.cross_tab_t = small.cross_tab_t = cross_tab.data();
    big.cross_stride = small.cross_stride = stride;
    Bufs bb(W), bs(W);
    point(big, bb, e0);
    point(small, bs, 0);
    std::vector<double> sum_big(compact_fac, 0.0), sum_small(compact_fac, 0.0);
    K.stats(big, e0, e0 + W, sum_big.data());
    K.stats(small, 0, W, sum_small.data());
    K.apply(big, e0, e0 + W);
    K.apply(small, 0, W);
    compare("factored line " + std::to_string(line), bb, bs, sum_big, sum_small, false);
    // Pass A's line reduction reads a line at an offset beyond 2^31 the same way.
    std::vector<double> ls_big(C, 0.0), ls_small(C, 0.0), cr_big(W, 0.0), cr_small(W, 0.0);
    K.gsq_line(big.g + e0, W, C, false, ls_big.data(), cr_big.data());
    K.gsq_line(small.g, W, C, false, ls_small.data(), cr_small.data());
    Check(ls_big == ls_small && cr_big == cr_small, "index64 " + isa + " gsq_line differs");
  }
}

void TestBadArguments() {
  lopt::Config c;
  const std::vector<float> packed = MakePacked(c, 1);
  Tensor t(c, {4, 5}, 3);
  auto expect_error = [&](lopt::Config cfg, std::vector<lopt::TensorArgs> args, const std::string& what) {
    const std::vector<float> before = t.out;
    const std::string err = lopt::CpuFusedUpdate(cfg, false, args, Threads(1));
    Check(!err.empty(), "bad args: no error for " + what);
    Check(BitEqual(before, t.out), "bad args: output written for " + what);
  };
  lopt::Config bad = c;
  bad.hidden = 0;
  expect_error(bad, {t.Args(packed.data())}, "hidden 0");
  bad = c, bad.hidden = lopt::kMaxHidden + 1;
  expect_error(bad, {t.Args(packed.data())}, "hidden too large");
  bad = c, bad.da = 2;
  expect_error(bad, {t.Args(packed.data())}, "da != dm");
  bad = c, bad.dr = 2;
  expect_error(bad, {t.Args(packed.data())}, "dr not in {1, dm}");
  bad = c, bad.hidden_layers = 0;
  expect_error(bad, {t.Args(packed.data())}, "0 layers");
  lopt::TensorArgs a = t.Args(packed.data());
  a.shape = {};
  expect_error(c, {a}, "rank 0");
  a = t.Args(packed.data()), a.shape = {4, 0};
  expect_error(c, {a}, "zero dimension");
  a = t.Args(packed.data()), a.shape = {-4, -5};
  expect_error(c, {a}, "negative dimensions");
  a = t.Args(packed.data()), a.shape = {int64_t{1} << 40, int64_t{1} << 40};
  expect_error(c, {a}, "size overflow");
  a = t.Args(packed.data()), a.v_row = nullptr;
  expect_error(c, {a}, "missing accumulator");
  a = t.Args(nullptr);
  expect_error(c, {a}, "missing packed");
  // An error in the second tensor must not have written the first.
  lopt::TensorArgs bad2 = t.Args(packed.data());
  bad2.shape = {};
  expect_error(c, {t.Args(packed.data()), bad2}, "second tensor bad");
  std::vector<lopt::TensorArgs> none;
  Check(lopt::CpuFusedUpdate(c, false, none, Threads(1)).empty(), "bad args: no tensors is fine");
}

// NaN/Inf gradients (exercises Exp(NaN) and the reductions under UBSan): the faulty
// tensor's outputs are NaN as in the reference, the other tensor is untouched by it.
void TestNonFinite() {
  lopt::Config c;
  const std::vector<float> packed = MakePacked(c, 8);
  for (float bad : {std::nanf(""), INFINITY, -INFINITY}) {
    for (std::vector<int64_t> shape : std::vector<std::vector<int64_t>>{{37}, {9, 20}, {3, 40, 5}}) {
      Tensor faulty(c, shape, 40), clean(c, {6, 7}, 41), alone(c, {6, 7}, 41);
      faulty.g[faulty.g.size() / 2] = bad;
      std::vector<lopt::TensorArgs> args = {faulty.Args(packed.data()), clean.Args(packed.data())};
      std::vector<lopt::TensorArgs> args_alone = {alone.Args(packed.data())};
      Check(lopt::CpuFusedUpdate(c, false, args, Threads(2)).empty(), "nonfinite: call failed");
      Check(lopt::CpuFusedUpdate(c, false, args_alone, Threads(1)).empty(), "nonfinite: call failed");
      bool all_nan = true;
      for (float x : faulty.out) all_nan = all_nan && std::isnan(x);
      Check(all_nan, "nonfinite: the faulty tensor's params must all be NaN (normalisation spreads it)");
      Check(BitEqual(clean.out, alone.out) && BitEqual(clean.m_out, alone.m_out),
            "nonfinite: another tensor of the same call is affected");
    }
  }
}

// MLPLOpt: a double-precision transcription of the rule for a small tensor, bit-equal
// results for every thread count on multi-chunk tensors, and bad arguments.
void TestMlpLOpt() {
  lopt::MlpConfig c;
  c.hidden = 3, c.hidden_layers = 2, c.exp_mult = 0.5f, c.step_mult = 0.01f;
  const lopt::MlpPackedLayout L(c);
  std::vector<float> packed = Random(L.size, 5, -0.8f, 0.8f);
  const float decays[lopt::kMlpDecays] = {0.1f, 0.5f, 0.9f, 0.99f, 0.999f, 0.9999f};
  for (int k = 0; k < lopt::kMlpDecays; ++k) {
    packed[L.beta + k] = decays[k];
    packed[L.one_minus_beta + k] = 1.0f - decays[k];
  }
  const int64_t n = 5;
  std::vector<float> p = Random(n, 6, -1, 1), g = Random(n, 7, -1, 1),
                     m = Random(n * lopt::kMlpDecays, 8, -0.5f, 0.5f), out(n), m_out(m.size());
  lopt::MlpTensorArgs a;
  a.shape = {n};
  a.p = p.data(), a.g = g.data(), a.m = m.data(), a.out = out.data(), a.m_out = m_out.data();
  a.packed = packed.data();
  std::vector<lopt::MlpTensorArgs> args = {a};
  Check(lopt::CpuMlpLOptUpdate(c, false, args, Threads(1)).empty(), "mlp: call failed");
  // The rule in double, feature by feature.
  std::vector<double> x(n * lopt::kMlpNormalized), sumsq(lopt::kMlpNormalized, 0.0);
  for (int64_t e = 0; e < n; ++e) {
    x[e * 8 + 0] = g[e];
    x[e * 8 + 1] = p[e];
    for (int k = 0; k < 6; ++k) {
      const double mk = double(packed[L.beta + k]) * m[e * 6 + k] + double(packed[L.one_minus_beta + k]) * g[e];
      x[e * 8 + 2 + k] = mk;
      Check(std::fabs(mk - m_out[e * 6 + k]) <= 1e-6 * (std::fabs(mk) + 1e-3), "mlp: momentum");
    }
    for (int f = 0; f < 8; ++f) sumsq[f] += x[e * 8 + f] * x[e * 8 + f];
  }
  const int H = c.hidden;
  double worst = 0, largest = 0;
  for (int64_t e = 0; e < n; ++e) {
    std::vector<double> h(H), h2(H);
    for (int j = 0; j < H; ++j) {
      double acc = packed[L.b0 + j];
      for (int f = 0; f < 8; ++f)
        acc += x[e * 8 + f] / std::sqrt(1e-5 + sumsq[f] / n) * packed[L.w0 + f * H + j];
      h[j] = acc > 0 ? acc : 0;
    }
    for (int j = 0; j < H; ++j) {
      double acc = packed[L.hidden + H * H + j];
      for (int i = 0; i < H; ++i) acc += h[i] * packed[L.hidden + i * H + j];
      h2[j] = acc > 0 ? acc : 0;
    }
    double d = packed[L.b_out], mag = packed[L.b_out + 1];
    for (int i = 0; i < H; ++i) d += h2[i] * packed[L.w_out + i * 2], mag += h2[i] * packed[L.w_out + i * 2 + 1];
    const double step = d * std::exp(mag * c.exp_mult) * c.step_mult;
    largest = std::max(largest, std::fabs(step));
    worst = std::max(worst, std::fabs((p[e] - step) - out[e]));
  }
  Check(worst <= 1e-6 * largest + 2e-7, "mlp: params within float32 round-off of the double rule, worst " +
                                            std::to_string(worst));
  // Thread counts and chunk boundaries: bit-equal.
  auto run = [&](const lopt::ParallelFor& pf) {
    std::vector<std::vector<int64_t>> shapes = {{40000}, {129, 300}, {3, 4, 5}, {1}};
    std::vector<std::vector<float>> bufs;
    std::vector<lopt::MlpTensorArgs> targs;
    bufs.reserve(shapes.size() * 5);
    for (size_t i = 0; i < shapes.size(); ++i) {
      int64_t numel = 1;
      for (int64_t d : shapes[i]) numel *= d;
      bufs.push_back(Random(numel, 20 + i, -1, 1));
      bufs.push_back(Random(numel, 40 + i, -1, 1));
      bufs.push_back(Random(numel * 6, 60 + i, -0.3f, 0.3f));
      bufs.emplace_back(numel);
      bufs.emplace_back(numel * 6);
      lopt::MlpTensorArgs t;
      t.shape = shapes[i];
      const size_t b = bufs.size() - 5;
      t.p = bufs[b].data(), t.g = bufs[b + 1].data(), t.m = bufs[b + 2].data();
      t.out = bufs[b + 3].data(), t.m_out = bufs[b + 4].data();
      t.packed = packed.data();
      targs.push_back(t);
    }
    Check(lopt::CpuMlpLOptUpdate(c, true, targs, pf).empty(), "mlp: multi-tensor call failed");
    return bufs;
  };
  const auto one = run(Threads(1)), many = run(Threads(3)), rev = run(Threads(1, true));
  bool same = true;
  for (size_t i = 0; i < one.size(); ++i) same = same && BitEqual(one[i], many[i]) && BitEqual(one[i], rev[i]);
  Check(same, "mlp: results depend on the thread count or order");
  // Bad arguments fail before anything is written.
  std::vector<float> before = out;
  auto expect_error = [&](lopt::MlpConfig cc, lopt::MlpTensorArgs t, const char* what) {
    std::vector<lopt::MlpTensorArgs> v = {t};
    Check(!lopt::CpuMlpLOptUpdate(cc, false, v, Threads(1)).empty(), std::string("mlp bad args: ") + what);
    Check(BitEqual(before, out), std::string("mlp bad args wrote output: ") + what);
  };
  lopt::MlpConfig bad = c;
  bad.hidden = 0;
  expect_error(bad, a, "hidden 0");
  bad = c, bad.hidden_layers = 17;
  expect_error(bad, a, "17 layers");
  lopt::MlpTensorArgs t = a;
  t.shape = {};
  expect_error(c, t, "rank 0");
  t = a, t.shape = {5, 0};
  expect_error(c, t, "zero dimension");
  t = a, t.shape = {int64_t{1} << 40, int64_t{1} << 40};
  expect_error(c, t, "too large");
  t = a, t.m = nullptr;
  expect_error(c, t, "missing buffer");
}

bool CpuHas(const char* isa) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (std::strcmp(isa, "avx2") == 0) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (std::strcmp(isa, "avx512") == 0)
    return CpuHas("avx2") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
#endif
  return std::strcmp(isa, "generic") == 0;
}

}  // namespace

// CpuScaleSums against sums in long double, for any thread count and task order (bit for bit),
// and its argument checks.
void TestScaleSums() {
  const int64_t n = 3 * 65536 + 77;  // several tasks and a tail that fills no lane block
  for (int dm : {1, 3}) {
    const int dr = dm == 3 ? 1 : 2;
    std::vector<float> p(n), m(n * dm), rms(n * dr);
    for (int64_t i = 0; i < n; ++i) p[i] = std::sin(0.37 * i);
    for (int64_t i = 0; i < n * dm; ++i) m[i] = std::cos(0.11 * i) * (1 + i % dm);
    for (int64_t i = 0; i < n * dr; ++i) rms[i] = 1e-3f * (1 + i % 7);
    long double want[2 + 3] = {};
    for (int64_t i = 0; i < n; ++i) want[0] += (long double)p[i] * p[i];
    for (int64_t i = 0; i < n * dm; ++i) want[1 + i % dm] += (long double)m[i] * m[i];
    for (int64_t i = 0; i < n * dr; ++i) want[1 + dm] += rms[i];
    std::vector<float> base;
    for (int threads : {1, 3}) {
      for (bool reverse : {false, true}) {
        std::vector<float> out(2 + dm, -1.0f);
        std::vector<lopt::ScaleSumsArgs> t(1);
        t[0].n = n, t[0].dm = dm, t[0].dr = dr, t[0].p = p.data(), t[0].m = m.data(), t[0].rms = rms.data();
        t[0].out = out.data();
        const std::string err = lopt::CpuScaleSums(t, Threads(threads, reverse));
        Check(err.empty(), "scale sums: " + err);
        for (int f = 0; f < 2 + dm; ++f)
          Check(std::fabs(out[f] - (double)want[f]) <= 1e-6 * std::fabs((double)want[f]),
                "scale sums: sum " + std::to_string(f) + " (dm " + std::to_string(dm) + ")");
        if (base.empty()) base = out;
        Check(BitEqual(out, base), "scale sums: threads/order change the bits");
      }
    }
  }
  std::vector<lopt::ScaleSumsArgs> bad(1);
  bad[0].n = 10, bad[0].dm = 0, bad[0].dr = 1;
  Check(!lopt::CpuScaleSums(bad, Threads(1)).empty(), "scale sums: dm 0 accepted");
  bad[0].dm = 3;  // no buffers
  Check(!lopt::CpuScaleSums(bad, Threads(1)).empty(), "scale sums: missing buffers accepted");
}

// 6. bf16 precision: the rounding of single values (hand-computed), the weight-tile layout,
//    and (on CPUs with AMX) steps within a bf16 tolerance of float32, the same bits for any
//    thread count, float32 bits below kBf16MinHidden; elsewhere a refusal that writes nothing.
void TestBf16() {
  using lopt::tiles::Bf16Bits;
  auto f = [](uint32_t u) { float x; std::memcpy(&x, &u, 4); return x; };
  Check(Bf16Bits(1.0f) == 0x3f80, "bf16: 1.0");
  Check(Bf16Bits(f(0x3f808000u)) == 0x3f80, "bf16: tie rounds to the even 0x3f80");
  Check(Bf16Bits(f(0x3f818000u)) == 0x3f82, "bf16: tie rounds to the even 0x3f82");
  Check(Bf16Bits(f(0x3f808001u)) == 0x3f81, "bf16: above the tie rounds up");
  Check(Bf16Bits(-2.5f) == 0xc020, "bf16: -2.5");
  Check(Bf16Bits(f(0x007fffffu)) == 0x0000 && Bf16Bits(f(0x807fffffu)) == 0x8000, "bf16: denormals to signed zero");
  Check(Bf16Bits(f(0x7f7fffffu)) == 0x7f80, "bf16: the largest float rounds to inf");
  Check((Bf16Bits(f(0x7f800001u)) & 0x7fc0) == 0x7fc0, "bf16: a NaN stays NaN");
  // Layout: H = 20 outputs, 3 inputs: 2 output blocks x 1 input block, zero padding.
  const int n_in = 3, H = 20;
  std::vector<float> w(n_in * H);
  for (int j = 0; j < n_in; ++j)
    for (int h = 0; h < H; ++h) w[j * H + h] = static_cast<float>(1 + j * 32 + h);  // exact in bf16
  std::vector<uint32_t> tiles(lopt::tiles::AmxLayerWords(n_in, H));
  Check(tiles.size() == 2 * 256, "bf16: tile words");
  lopt::tiles::PackAmxLayer(w.data(), n_in, H, tiles.data());
  auto word = [&](int ob, int r, int c) { return tiles[(ob * 16 + r) * 16 + c]; };
  Check(word(0, 5, 0) == (uint32_t(Bf16Bits(w[0 * H + 5])) | uint32_t(Bf16Bits(w[1 * H + 5])) << 16),
        "bf16: inputs 0, 1 of output 5");
  Check(word(1, 2, 1) == uint32_t(Bf16Bits(w[2 * H + 18])), "bf16: input 2 of output 18, odd half zero");
  Check(word(1, 4, 0) == 0 && word(0, 0, 2) == 0, "bf16: padding is zero");

  lopt::Config c;
  c.hidden = 32;
  std::string err;
  if (!lopt::CpuHasBf16()) {
    Tensor t(c, {8, 8}, 3);
    const std::vector<float> before = t.out;
    const std::vector<float> packed = MakePacked(c, 1);
    std::vector<lopt::TensorArgs> args = {t.Args(packed.data())};
    err = lopt::CpuFusedUpdate(c, false, args, Threads(1), lopt::CpuPrecision::kBf16);
    Check(err.find("AMX") != std::string::npos, "bf16: refused without AMX: " + err);
    Check(BitEqual(t.out, before), "bf16: a refused call writes nothing");
    std::printf("lopt_kernel_test: no AMX-BF16 here, bf16 steps not run\n");
    return;
  }
  for (int layers : {2, 3}) {
    c.hidden_layers = layers;
    const auto ref = RunModel(c, kShapes, Threads(1), &err);
    const auto base = RunModel(c, kShapes, Threads(1), &err, lopt::CpuPrecision::kBf16);
    Check(err.empty(), "bf16: " + err);
    for (int n : {2, 3}) {
      const auto got = RunModel(c, kShapes, Threads(n), &err, lopt::CpuPrecision::kBf16);
      bool same = got.size() == base.size();
      for (size_t i = 0; same && i < got.size(); ++i) same = BitEqual(got[i], base[i]);
      Check(same, "bf16: " + std::to_string(n) + " threads differ from 1");
    }
    // Outputs come as (p, m, rms, accumulators...) per tensor: the new params differ from
    // float32 by the step's bf16 error only; every state output is the same bits.
    double worst = 0, step_scale = 0;
    size_t i = 0;
    for (size_t k = 0; k < kShapes.size(); ++k) {
      Tensor probe(c, kShapes[k], 1000 + 17 * static_cast<uint32_t>(k));
      const size_t outs = probe.Outputs().size();
      for (size_t e = 0; e < ref[i].size(); ++e) {
        const double step = std::fabs(double(ref[i][e]) - probe.p[e]);
        step_scale = std::fmax(step_scale, step);
        worst = std::fmax(worst, std::fabs(double(base[i][e]) - ref[i][e]));
      }
      for (size_t o = 1; o < outs; ++o) Check(BitEqual(base[i + o], ref[i + o]), "bf16: state differs from float32");
      i += outs;
    }
    Check(worst <= 0.04 * step_scale, "bf16: steps too far from float32: " + std::to_string(worst / step_scale));
  }
  c.hidden = 8;
  c.hidden_layers = 2;
  const auto small32 = RunModel(c, kShapes, Threads(1), &err);
  const auto small16 = RunModel(c, kShapes, Threads(1), &err, lopt::CpuPrecision::kBf16);
  bool same = small16.size() == small32.size();
  for (size_t i = 0; same && i < small16.size(); ++i) same = BitEqual(small16[i], small32[i]);
  Check(same, "bf16: hidden 8 is not the float32 step");
  std::printf("lopt_kernel_test: bf16 (AMX) steps tested\n");
}

int main() {
  TestHandComputedState();
  TestThreadCounts();
  TestConcurrentCalls();
  TestIndex64(lopt::tiles::GenericKernels());
  if (CpuHas("avx2")) TestIndex64(lopt::tiles::Avx2Kernels());
  if (CpuHas("avx512")) TestIndex64(lopt::tiles::Avx512Kernels());
  std::printf("lopt_kernel_test: loops tested: generic%s%s\n", CpuHas("avx2") ? " avx2" : "",
              CpuHas("avx512") ? " avx512" : "");
  TestBadArguments();
  TestNonFinite();
  TestMlpLOpt();
  TestScaleSums();
  TestBf16();
  std::printf("lopt_kernel_test: %d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
