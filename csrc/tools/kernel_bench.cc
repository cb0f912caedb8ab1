// Times CpuFusedUpdate directly (no JAX) on one call: a profiling aid for the per-element
// loops and the per-tensor fixed costs. Usage: lopt_kernel_bench SHAPES HIDDEN [REPEATS] [MEMBERS]
#include <chrono>
#include <ctime>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <thread>
#include <vector>

#include "lopt_cpu.h"

namespace {

// One tensor's buffers, filled with N(0, scale^2) values; the outputs alias the state.
struct Tensor {
  std::vector<int64_t> shape;
  std::vector<float> packed, p, g, m, rms, vr, vc, vfull, out;
};

// One shape ("64x32") of a comma-separated list, advancing s past it and its comma;
// empty when malformed.
std::vector<int64_t> ParseShape(const char*& s) {
  std::vector<int64_t> shape;
  for (;;) {
    char* end = nullptr;
    const long long d = std::strtoll(s, &end, 10);
    if (end == s || d < 1) return {};
    shape.push_back(d);
    s = end + (*end != '\0');
    if (*end != 'x') return *end == ',' || *end == '\0' ? shape : std::vector<int64_t>{};
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr,
                 "usage: %s SHAPES HIDDEN [REPEATS] [MEMBERS]\n"
                 "  SHAPES: comma-separated, e.g. 1000x1000 or 64x32,32,32x10,10 (a model);\n"
                 "  MEMBERS copies of every shape go to one call, each with its own weights\n"
                 "  (a meta-training population step)\n",
                 argv[0]);
    return 2;
  }
  std::vector<std::vector<int64_t>> shapes;
  for (const char* s = argv[1]; *s;) {
    shapes.push_back(ParseShape(s));
    if (shapes.back().empty()) { std::fprintf(stderr, "bad SHAPES: %s\n", argv[1]); return 2; }
  }
  lopt::Config cfg;
  cfg.hidden = std::atoi(argv[2]);
  if (const char* layers = std::getenv("LOPT_BENCH_LAYERS")) cfg.hidden_layers = std::atoi(layers);
  const int repeats = argc > 3 ? std::atoi(argv[3]) : 5;
  const int members = argc > 4 ? std::atoi(argv[4]) : 1;
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  auto fill = [&](int64_t size, float scale) {
    std::vector<float> v(size);
    for (auto& x : v) x = scale * normal(rng);
    return v;
  };
  const lopt::PackedLayout layout(cfg);
  std::vector<Tensor> store;
  int64_t n_total = 0;
  for (int member = 0; member < members; ++member)
    for (const auto& shape : shapes) {
      Tensor t;
      t.shape = shape;
      int64_t n = 1;
      for (int64_t d : shape) n *= d;
      n_total += n;
      t.packed = fill(layout.size, 0.2f);
      for (int k = 0; k < cfg.dm; ++k) t.packed[layout.mom_beta + k] = 0.9f, t.packed[layout.mom_1mb + k] = 0.1f;
      for (int k = 0; k < cfg.dr; ++k) t.packed[layout.rms_beta + k] = 0.99f, t.packed[layout.rms_1mb + k] = 0.01f;
      for (int k = 0; k < cfg.da; ++k) t.packed[layout.fac_beta + k] = 0.9f, t.packed[layout.fac_1mb + k] = 0.1f;
      t.p = fill(n, 1), t.g = fill(n, 1), t.m.assign(n * cfg.dm, 0.0f), t.rms.assign(n * cfg.dr, 0.0f);
      t.out.assign(n, 0.0f);
      if (shape.size() >= 2) {  // v_row drops the factored axis d0, v_col the axis d1
        int d1 = 0, d0 = 0;
        lopt::FactoredDims(shape.data(), static_cast<int>(shape.size()), &d1, &d0);
        t.vr.assign(n / shape[d0] * cfg.da, 0.0f);
        t.vc.assign(n / shape[d1] * cfg.da, 0.0f);
      } else {
        t.vfull.assign(n * cfg.da, 0.0f);
      }
      store.push_back(std::move(t));
    }
  std::vector<lopt::TensorArgs> tensors;
  for (Tensor& t : store) {
    lopt::TensorArgs a;
    a.shape = t.shape;
    a.p = t.p.data(), a.g = t.g.data(), a.m = t.m.data(), a.rms = t.rms.data();
    a.out = t.out.data(), a.m_out = t.m.data(), a.rms_out = t.rms.data();
    if (t.shape.size() >= 2) {
      a.v_row = t.vr.data(), a.v_col = t.vc.data();
      a.v_row_out = t.vr.data(), a.v_col_out = t.vc.data();
    } else {
      a.v_full = t.vfull.data(), a.v_full_out = t.vfull.data();
    }
    a.packed = t.packed.data();
    tensors.push_back(a);
  }
  const int threads = std::getenv("LOPT_BENCH_THREADS") ? std::atoi(std::getenv("LOPT_BENCH_THREADS")) : 1;
  lopt::ParallelFor pfor = [threads](int64_t count, const std::function<void(int64_t)>& fn) {
    std::vector<std::thread> pool;
    for (int w = 0; w < threads; ++w)
      pool.emplace_back([&, w] { for (int64_t i = w; i < count; i += threads) fn(i); });
    for (auto& th : pool) th.join();
  };
  const lopt::CpuPrecision precision =
      std::getenv("LOPT_BENCH_BF16") ? lopt::CpuPrecision::kBf16 : lopt::CpuPrecision::kFp32;
  // CPU time as well as wall time: on a shared machine the process's CPU time is
  // what the kernel cost, whatever else was scheduled meanwhile.
  auto cpu_now = [] {
    timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
  };
  double best = 1e30, best_cpu = 1e30;
  for (int r = 0; r < repeats; ++r) {
    const double c0 = cpu_now();
    auto t0 = std::chrono::steady_clock::now();
    std::string err = lopt::CpuFusedUpdate(cfg, true, tensors, pfor, precision);
    auto t1 = std::chrono::steady_clock::now();
    const double c1 = cpu_now();
    if (!err.empty()) { std::fprintf(stderr, "error: %s\n", err.c_str()); return 1; }
    const double s = std::chrono::duration<double>(t1 - t0).count();
    best = s < best ? s : best;
    best_cpu = (c1 - c0) < best_cpu ? (c1 - c0) : best_cpu;
  }
  const double flops = 2.0 * (28 * cfg.hidden + cfg.hidden * cfg.hidden + 2 * cfg.hidden) * n_total;
  std::printf("%s%s x%d (%lld elements) H=%d threads=%d: %.2f us wall, %.2f us cpu, %.2f ns/element, "
              "%.1f GFLOP/s (useful, wall)\n",
              precision == lopt::CpuPrecision::kBf16 ? "bf16 " : "", argv[1], members, (long long)n_total,
              cfg.hidden, threads, best * 1e6, best_cpu * 1e6, best * 1e9 / n_total, flops / best / 1e9);
  return 0;
}
