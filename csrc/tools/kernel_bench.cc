// Times CpuFusedUpdate directly (no JAX) on one matrix: a profiling aid for the
// per-element loops. Usage: lopt_kernel_bench ROWS COLS HIDDEN [REPEATS]
#include <chrono>
#include <ctime>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <thread>
#include <vector>

#include "lopt_cpu.h"

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s ROWS COLS HIDDEN [REPEATS]\n", argv[0]);
    return 2;
  }
  const int64_t rows = std::atoll(argv[1]), cols = std::atoll(argv[2]);
  lopt::Config cfg;
  cfg.hidden = std::atoi(argv[3]);
  if (const char* layers = std::getenv("LOPT_BENCH_LAYERS")) cfg.hidden_layers = std::atoi(layers);
  const int repeats = argc > 4 ? std::atoi(argv[4]) : 5;
  const int64_t n = rows * cols;
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  auto fill = [&](int64_t size, float scale) {
    std::vector<float> v(size);
    for (auto& x : v) x = scale * normal(rng);
    return v;
  };
  const lopt::PackedLayout layout(cfg);
  std::vector<float> packed = fill(layout.size, 0.2f);
  for (int k = 0; k < cfg.dm; ++k) packed[layout.mom_beta + k] = 0.9f, packed[layout.mom_1mb + k] = 0.1f;
  for (int k = 0; k < cfg.dr; ++k) packed[layout.rms_beta + k] = 0.99f, packed[layout.rms_1mb + k] = 0.01f;
  for (int k = 0; k < cfg.da; ++k) packed[layout.fac_beta + k] = 0.9f, packed[layout.fac_1mb + k] = 0.1f;
  std::vector<float> p = fill(n, 1), g = fill(n, 1), m(n * cfg.dm), rms(n * cfg.dr);
  std::vector<float> vr(rows * cfg.da), vc(cols * cfg.da), out(n);
  lopt::TensorArgs t;
  t.shape = {rows, cols};
  t.p = p.data(), t.g = g.data(), t.m = m.data(), t.rms = rms.data();
  const bool cols_larger = cols >= rows;  // v_row drops d0 (the larger axis)
  t.v_row = cols_larger ? vr.data() : vc.data();
  t.v_col = cols_larger ? vc.data() : vr.data();
  t.out = out.data(), t.m_out = m.data(), t.rms_out = rms.data();
  t.v_row_out = const_cast<float*>(t.v_row), t.v_col_out = const_cast<float*>(t.v_col);
  t.packed = packed.data();
  const int threads = std::getenv("LOPT_BENCH_THREADS") ? std::atoi(std::getenv("LOPT_BENCH_THREADS")) : 1;
  lopt::ParallelFor pfor = [threads](int64_t count, const std::function<void(int64_t)>& fn) {
    std::vector<std::thread> pool;
    for (int w = 0; w < threads; ++w)
      pool.emplace_back([&, w] { for (int64_t i = w; i < count; i += threads) fn(i); });
    for (auto& th : pool) th.join();
  };
  std::vector<lopt::TensorArgs> tensors{t};
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
  const double flops = 2.0 * (28 * cfg.hidden + cfg.hidden * cfg.hidden + 2 * cfg.hidden) * n;
  std::printf("%s%lldx%lld H=%d threads=%d: %.2f ms wall, %.2f ms cpu, %.1f Mparam/s, "
              "%.1f GFLOP/s (useful, wall)\n",
              precision == lopt::CpuPrecision::kBf16 ? "bf16 " : "", (long long)rows,
              (long long)cols, cfg.hidden, threads, best * 1e3, best_cpu * 1e3,
              n / best / 1e6, flops / best / 1e9);
  return 0;
}
