// CpuScaleSums (lopt_cpu.h): sums of squares of p and of each momentum column, and the sum of
// the rms accumulators, per tensor.
#include <cstdint>
#include <string>
#include <vector>

#include "lopt_cpu.h"

namespace lopt {
namespace {

constexpr int64_t kSumsChunk = 1 << 16;  // records per task
constexpr int kLanesPerColumn = 8;       // independent accumulators per column (vectorisable)

// Adds over values x[0, count) of `width` interleaved columns: col[c] += sum of x[j]^2 (or x[j]
// when !square) over j % width == c. width * kLanesPerColumn float lanes accumulate blocks of
// kBlock rows (short float sums, vectorised), the blocks are added in double, and the lanes
// in order at the end: the result depends only on the data and the chunking.
template <bool kSquare>
void ColumnSums(const float* x, int64_t count, int width, double* col) {
  constexpr int kMaxLanes = kMaxDecays * kLanesPerColumn;
  constexpr int kBlock = 32;
  double total[kMaxLanes] = {};
  float block[kMaxLanes];
  const int L = width * kLanesPerColumn;
  int64_t j = 0;
  while (j + L <= count) {
    for (int l = 0; l < L; ++l) block[l] = 0.0f;
    for (int r = 0; r < kBlock && j + L <= count; ++r, j += L)
      for (int l = 0; l < L; ++l) {
        const float v = x[j + l];
        block[l] += kSquare ? v * v : v;
      }
    for (int l = 0; l < L; ++l) total[l] += block[l];
  }
  for (int l = 0; j < count; ++j, ++l) {
    const double v = x[j];
    total[l] += kSquare ? v * v : v;
  }
  for (int l = 0; l < L; ++l) col[l % width] += total[l];
}

}  // namespace

std::string CpuScaleSums(std::vector<ScaleSumsArgs>& tensors, const ParallelFor& pool_parallel_for) {
  int64_t total = 0;
  std::vector<std::pair<size_t, int64_t>> tasks;  // (tensor, chunk)
  for (size_t i = 0; i < tensors.size(); ++i) {
    const ScaleSumsArgs& t = tensors[i];
    if (t.n < 0 || t.dm < 1 || t.dm > kMaxDecays || t.dr < 1 || t.dr > kMaxDecays)
      return "tensor " + std::to_string(i) + ": bad scale-sums sizes";
    if (t.n > 0 && (!t.p || !t.m || !t.rms || !t.out))
      return "tensor " + std::to_string(i) + ": missing buffer";
    total += t.n;
    for (int64_t c = 0; c * kSumsChunk < t.n; ++c) tasks.emplace_back(i, c);
  }
  // per task: sum p^2, sum m_k^2 (dm), sum rms
  const int stride = 2 + kMaxDecays;
  std::vector<double> partial(tasks.size() * stride, 0.0);
  ChooseParallelFor(total, pool_parallel_for)(static_cast<int64_t>(tasks.size()), [&](int64_t k) {
    const ScaleSumsArgs& t = tensors[tasks[k].first];
    const int64_t r0 = tasks[k].second * kSumsChunk;
    const int64_t r1 = r0 + kSumsChunk < t.n ? r0 + kSumsChunk : t.n;
    double* out = partial.data() + k * stride;
    ColumnSums<true>(t.p + r0, r1 - r0, 1, out);
    ColumnSums<true>(t.m + r0 * t.dm, (r1 - r0) * t.dm, t.dm, out + 1);
    double rms = 0;
    ColumnSums<false>(t.rms + r0 * t.dr, (r1 - r0) * t.dr, 1, &rms);
    out[1 + t.dm] = rms;
  });
  size_t k = 0;
  for (ScaleSumsArgs& t : tensors) {  // chunks combined in order
    double sums[stride] = {};
    for (; k < tasks.size() && &tensors[tasks[k].first] == &t; ++k)
      for (int f = 0; f < 2 + t.dm; ++f) sums[f] += partial[k * stride + f];
    if (t.out)
      for (int f = 0; f < 2 + t.dm; ++f) t.out[f] = static_cast<float>(sums[f]);
  }
  return "";
}

}  // namespace lopt
