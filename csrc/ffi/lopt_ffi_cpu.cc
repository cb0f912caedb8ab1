// XLA FFI handler of the fused update on the host: decode, check, call the kernel.
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>

#include "ffi_common.h"
#include "lopt_cpu.h"

namespace lopt::ffi_glue {
namespace {

// Runs fn over [0, n) on XLA's intra-op thread pool. The calling thread works
// too, so progress never depends on a free pool thread; pool tasks that start
// late find nothing left and only touch the shared counter block.
void PoolParallelFor(ffi::ThreadPool* pool, int64_t n, const std::function<void(int64_t)>& fn) {
  const int64_t threads = pool ? pool->num_threads() : 0;
  if (n <= 1 || threads <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t n = 0;
    const std::function<void(int64_t)>* fn = nullptr;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto shared = std::make_shared<Shared>();
  shared->n = n;
  shared->fn = &fn;
  auto worker = [shared]() {
    for (;;) {
      const int64_t i = shared->next.fetch_add(1);
      if (i >= shared->n) return;
      (*shared->fn)(i);
      if (shared->done.fetch_add(1) + 1 == shared->n) {
        std::lock_guard<std::mutex> lock(shared->mu);
        shared->cv.notify_all();
      }
    }
  };
  const int64_t helpers = (threads < n ? threads : n) - 1;
  for (int64_t h = 0; h < helpers; ++h) {
    auto task = worker;  // Schedule takes ownership of a copy
    pool->Schedule(std::move(task));
  }
  worker();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done.load() == shared->n; });
}

ffi::Error FusedUpdateCpu(ffi::ThreadPool pool, ffi::AnyBuffer packed, ffi::RemainingArgs args,
                          ffi::RemainingRets rets, int64_t hidden_size, int64_t hidden_layers,
                          int64_t dm, int64_t dr, int64_t da, float exp_mult, float step_mult,
                          bool write_delta) {
  // Range-check before narrowing to int: 2^32 + 4 must not pass as 4.
  for (int64_t v : {hidden_size, hidden_layers, dm, dr, da})
    if (v < 1 || v > (int64_t{1} << 20))
      return ffi::Error::InvalidArgument("hidden_size, hidden_layers, dm, dr, da must be in [1, 2^20], got " +
                                         std::to_string(v));
  Config cfg;
  cfg.hidden = static_cast<int>(hidden_size);
  cfg.hidden_layers = static_cast<int>(hidden_layers);
  cfg.dm = static_cast<int>(dm);
  cfg.dr = static_cast<int>(dr);
  cfg.da = static_cast<int>(da);
  cfg.exp_mult = exp_mult;
  cfg.step_mult = step_mult;
  int64_t batch = 1;
  std::vector<TensorBuffers> bufs;
  if (ffi::Error err = CollectOperands(cfg, packed, args, rets, &batch, &bufs); err.failure())
    return err;
  const int64_t packed_size = PackedLayout(cfg).size;
  std::vector<TensorArgs> tensors;
  tensors.reserve(batch * bufs.size());
  for (int64_t b = 0; b < batch; ++b) {
    for (TensorBuffers& t : bufs) {
      // Each operand is [population..., per-member shape]: member b starts at b * per.
      auto in = [&](size_t k) {
        const float* base = t.ins[k].typed_data<float>();
        return base + b * (static_cast<int64_t>(t.ins[k].element_count()) / batch);
      };
      auto out = [&](size_t k) {
        float* base = t.outs[k]->typed_data<float>();
        return base + b * (static_cast<int64_t>(t.outs[k]->element_count()) / batch);
      };
      TensorArgs a;
      a.shape = t.shape;
      a.packed = packed.typed_data<float>() + b * packed_size;
      a.p = in(0), a.g = in(1), a.m = in(2), a.rms = in(3);
      a.out = out(0), a.m_out = out(1), a.rms_out = out(2);
      if (t.factored) {
        a.v_row = in(4), a.v_col = in(5);
        a.v_row_out = out(3), a.v_col_out = out(4);
      } else {
        a.v_full = in(4);
        a.v_full_out = out(3);
      }
      tensors.push_back(std::move(a));
    }
  }
  const std::string err = CpuFusedUpdate(
      cfg, write_delta, tensors,
      [&pool](int64_t n, const std::function<void(int64_t)>& fn) { PoolParallelFor(&pool, n, fn); });
  if (!err.empty()) return ffi::Error::InvalidArgument(err);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LoptFusedUpdateCpu, FusedUpdateCpu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // packed meta-parameters
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("hidden_size")
                                  .Attr<int64_t>("hidden_layers")
                                  .Attr<int64_t>("dm")
                                  .Attr<int64_t>("dr")
                                  .Attr<int64_t>("da")
                                  .Attr<float>("exp_mult")
                                  .Attr<float>("step_mult")
                                  .Attr<bool>("write_delta"));

}  // namespace lopt::ffi_glue
