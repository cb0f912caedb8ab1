// Host emulation of the small CUDA subset used by lopt_cuda.cu, for testing the
// kernels' logic on machines without a GPU (csrc/tests/cuda_emu_test.cc). Blocks run
// one after another; the threads of a block are real threads that meet at barriers,
// so __syncthreads, warp shuffles and mma.sync behave as on a GPU (for code that
// uses them with all threads or all lanes present). Slow: small tensors only.
#pragma once
#if !defined(LOPT_CUDA_EMULATION)
#error "cuda_emu.h is for LOPT_CUDA_EMULATION builds only"
#endif

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __grid_constant__
#define __launch_bounds__(...)
#define __shared__ static  // one block at a time: a function static is block-shared

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 0 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "no error"; }
template <typename T>
cudaError_t cudaFuncSetAttribute(T, cudaFuncAttribute, int) { return cudaSuccess; }
using std::max;
using std::min;

inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

namespace emu {

struct Block {
  unsigned bx = 0, bdim = 0;
  std::unique_ptr<std::barrier<>> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
  std::vector<uint64_t> xch;   // one slot per thread for shuffles
  std::vector<float> mma;      // per thread: a[4], b[2], c[4]
  std::vector<double> smem;    // dynamic shared memory
};
inline Block* g_block = nullptr;
inline thread_local unsigned t_tid = 0;

inline dim3 ThreadIdx() { return {t_tid, 1, 1}; }
inline dim3 BlockIdx() { return {g_block->bx, 1, 1}; }
inline dim3 BlockDim() { return {g_block->bdim, 1, 1}; }

template <typename T>
T* DynamicSmem() { return reinterpret_cast<T*>(g_block->smem.data()); }

inline std::barrier<>& WarpBar() { return *g_block->warp_bar[t_tid / 32]; }

template <typename T>
T Shfl(T v, unsigned src_lane) {
  static_assert(sizeof(T) <= 8);
  const unsigned base = t_tid & ~31u;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  g_block->xch[t_tid] = bits;
  WarpBar().arrive_and_wait();
  T r = v;
  if (src_lane < 32) std::memcpy(&r, &g_block->xch[base + src_lane], sizeof(T));
  WarpBar().arrive_and_wait();
  return r;
}

// round to nearest, ties away from zero, to 10 mantissa bits (cvt.rna.tf32.f32)
inline uint32_t Tf32(float x) {
  uint32_t u = __float_as_uint(x);
  if ((u & 0x7f800000u) == 0x7f800000u) return u;  // inf / nan unchanged
  u += 0x1000u;
  return u & 0xffffe000u;
}

// mma.sync.m16n8k8 row.col f32.tf32.tf32.f32, d += A B, all 32 lanes of a warp.
inline void MmaM16N8K8(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                       uint32_t b0, uint32_t b1) {
  float* mine = &g_block->mma[t_tid * 10];
  const uint32_t av[4] = {a0, a1, a2, a3};
  for (int i = 0; i < 4; ++i) mine[i] = __uint_as_float(av[i]);
  mine[4] = __uint_as_float(b0);
  mine[5] = __uint_as_float(b1);
  for (int i = 0; i < 4; ++i) mine[6 + i] = d[i];
  WarpBar().arrive_and_wait();
  const unsigned base = t_tid & ~31u, lane = t_tid & 31u;
  float A[16][8], B[8][8];
  for (unsigned l = 0; l < 32; ++l) {
    const float* f = &g_block->mma[(base + l) * 10];
    const unsigned g = l / 4, q = l % 4;
    A[g][q] = f[0];
    A[g + 8][q] = f[1];
    A[g][q + 4] = f[2];
    A[g + 8][q + 4] = f[3];
    B[q][g] = f[4];
    B[q + 4][g] = f[5];
  }
  const unsigned g = lane / 4, q = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const unsigned row = g + (i >= 2 ? 8 : 0), col = 2 * q + (i & 1);
    float acc = mine[6 + i];
    for (int k = 0; k < 8; ++k) acc += A[row][k] * B[k][col];
    d[i] = acc;
  }
  WarpBar().arrive_and_wait();
}

template <typename Kernel, typename Arg>
void Launch(Kernel kernel, unsigned grid, unsigned block, size_t smem, const Arg& arg) {
  Block b;
  b.bdim = block;
  b.xch.assign(block, 0);
  b.mma.assign(block * 10, 0.f);
  b.smem.assign((smem + 7) / 8, 0.0);
  g_block = &b;
  for (unsigned bx = 0; bx < grid; ++bx) {
    b.bx = bx;
    b.bar = std::make_unique<std::barrier<>>(block);
    b.warp_bar.clear();
    for (unsigned w = 0; w < (block + 31) / 32; ++w)
      b.warp_bar.push_back(std::make_unique<std::barrier<>>(std::min(32u, block - 32 * w)));
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; ++t)
      threads.emplace_back([&, t] {
        t_tid = t;
        kernel(arg);
        b.warp_bar[t / 32]->arrive_and_drop();
        b.bar->arrive_and_drop();
      });
    for (auto& th : threads) th.join();
  }
  g_block = nullptr;
}

}  // namespace emu

#define threadIdx (::emu::ThreadIdx())
#define blockIdx (::emu::BlockIdx())
#define blockDim (::emu::BlockDim())
inline void __syncthreads() { emu::g_block->bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::WarpBar().arrive_and_wait(); }
template <typename T>
T __shfl_down_sync(unsigned, T v, int off) {
  const unsigned lane = emu::t_tid & 31u;
  return emu::Shfl(v, lane + off < 32 ? lane + off : 32u);
}
template <typename T>
T __shfl_xor_sync(unsigned, T v, int off) {
  return emu::Shfl(v, (emu::t_tid & 31u) ^ static_cast<unsigned>(off));
}
