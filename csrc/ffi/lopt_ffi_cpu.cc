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

// An int64 attribute as int; out-of-range values become -1 and fail the configuration
// checks (ValidateConfig, ValidateMlpConfig) before any use.
int NarrowAttr(int64_t v) { return v < 0 || v > (1 << 20) ? -1 : static_cast<int>(v); }

Config MakeConfig(int64_t hidden_size, int64_t hidden_layers, int64_t dm, int64_t dr, int64_t da,
                  float exp_mult, float step_mult) {
  Config cfg;
  cfg.hidden = NarrowAttr(hidden_size);
  cfg.hidden_layers = NarrowAttr(hidden_layers);
  cfg.dm = NarrowAttr(dm);
  cfg.dr = NarrowAttr(dr);
  cfg.da = NarrowAttr(da);
  cfg.exp_mult = exp_mult;
  cfg.step_mult = step_mult;
  return cfg;
}

// Per-member views of every tensor. `fill` sets the pointers that differ between
// the calls from in(k) / out(k), the member's operand / result k; with_outputs
// also points out/m/rms at results 0-2.
template <typename Fill>
std::vector<TensorArgs> MemberViews(const Config& cfg, const ffi::AnyBuffer& packed, int64_t batch,
                                    std::vector<TensorBuffers>& bufs, bool with_outputs, Fill fill) {
  const int64_t packed_size = PackedLayout(cfg).size;
  std::vector<TensorArgs> tensors;
  tensors.reserve(batch * bufs.size());
  for (int64_t b = 0; b < batch; ++b) {
    for (TensorBuffers& t : bufs) {
      auto in = [&](size_t k) { return MemberData<const float>(t.ins[k], b, batch); };
      auto out = [&](size_t k) { return MemberData<float>(*t.outs[k], b, batch); };
      TensorArgs a;
      a.shape = t.shape;
      a.packed = packed.typed_data<float>() + b * packed_size;
      a.p = in(0), a.g = in(1), a.m = in(2), a.rms = in(3);
      if (with_outputs) a.out = out(0), a.m_out = out(1), a.rms_out = out(2);
      fill(t, in, out, a);
      tensors.push_back(std::move(a));
    }
  }
  return tensors;
}

// Statistics operands of the apply-only and partial-sums calls (ffi_common.h).
template <typename In, typename Out>
void SetExternal(const TensorBuffers& t, In in, Out out, TensorArgs& a) {
  a.has_external = true;
  if (t.factored) {
    a.external.d1 = t.d1, a.external.d0 = t.d0;
    a.external.v_row_new = in(4), a.external.v_col_new = in(5);
    a.external.row_factor = in(6), a.external.col_factor = in(7);
    a.external.scales = in(8);
  } else {
    a.v_full = in(4);
    a.external.scales = in(5);
  }
}

// The accumulator operands and results of lopt_fused_update / lopt_celo_update (none
// without Adafactor features).
template <typename In, typename Out>
void SetAccumulators(const TensorBuffers& t, In in, Out out, TensorArgs& a) {
  if (t.factored) {
    a.v_row = in(4), a.v_col = in(5);
    a.v_row_out = out(3), a.v_col_out = out(4);
  } else if (t.ins.size() > 4) {
    a.v_full = in(4), a.v_full_out = out(3);
  }
}

template <typename Fill>
ffi::Error RunMembers(ffi::ThreadPool& pool, const Config& cfg, bool write_delta,
                      const ffi::AnyBuffer& packed, int64_t batch,
                      std::vector<TensorBuffers>& bufs, Fill fill,
                      CpuPrecision precision = CpuPrecision::kFp32) {
  std::vector<TensorArgs> tensors = MemberViews(cfg, packed, batch, bufs, true, fill);
  const std::string err = CpuFusedUpdate(
      cfg, write_delta, tensors,
      [&pool](int64_t n, const std::function<void(int64_t)>& fn) { PoolParallelFor(&pool, n, fn); },
      precision);
  if (!err.empty()) return ffi::Error::InvalidArgument(err);
  return ffi::Error::Success();
}

ffi::Error FusedUpdateCpu(ffi::ThreadPool pool, ffi::AnyBuffer packed, ffi::RemainingArgs args,
                          ffi::RemainingRets rets, int64_t hidden_size, int64_t hidden_layers,
                          int64_t dm, int64_t dr, int64_t da, float exp_mult, float step_mult,
                          bool write_delta, int64_t /*precision: CUDA only, ignored here*/,
                          int64_t cpu_precision) {
  if (cpu_precision != 0 && cpu_precision != 1)
    return ffi::Error::InvalidArgument("cpu_precision must be 0 (fp32) or 1 (bf16)");
  const Config cfg = MakeConfig(hidden_size, hidden_layers, dm, dr, da, exp_mult, step_mult);
  int64_t batch = 1;
  std::vector<TensorBuffers> bufs;
  if (ffi::Error err = CollectOperands(cfg, packed, args, rets, &batch, &bufs); err.failure())
    return err;
  return RunMembers(pool, cfg, write_delta, packed, batch, bufs,
                    [](const TensorBuffers& t, auto in, auto out, TensorArgs& a) {
                      SetAccumulators(t, in, out, a);
                    },
                    static_cast<CpuPrecision>(cpu_precision));
}

// Celo's per-element rule (Config::celo): operands packed, lr_mult [population..., tensors]
// (the scheduler's per-tensor multipliers), then the tensors as lopt_fused_update's.
ffi::Error CeloUpdateCpu(ffi::ThreadPool pool, ffi::AnyBuffer packed, ffi::AnyBuffer lr_mult,
                         ffi::RemainingArgs args, ffi::RemainingRets rets, int64_t hidden_size,
                         int64_t hidden_layers, int64_t dm, int64_t dr, int64_t da, float exp_mult,
                         float step_mult, bool write_delta) {
  Config cfg = MakeConfig(hidden_size, hidden_layers, dm, dr, da, exp_mult, step_mult);
  cfg.celo = true;
  int64_t batch = 1;
  std::vector<TensorBuffers> bufs;
  if (ffi::Error err = CollectOperands(cfg, packed, args, rets, &batch, &bufs); err.failure())
    return err;
  std::vector<int64_t> want = Dims(packed);
  want.back() = static_cast<int64_t>(bufs.size());
  if (lr_mult.element_type() != ffi::DataType::F32 || Dims(lr_mult) != want)
    return ffi::Error::InvalidArgument("lr_mult must be float32 of shape " + ShapeStr(want) +
                                       " (population axes, then one per tensor)");
  const int64_t n = static_cast<int64_t>(bufs.size());
  int64_t index = 0;  // MemberViews visits member-major, tensors in order
  return RunMembers(pool, cfg, write_delta, packed, batch, bufs,
                    [&](const TensorBuffers& t, auto in, auto out, TensorArgs& a) {
                      const int64_t b = index / n, i = index % n;
                      ++index;
                      a.lr_mult = MemberData<const float>(lr_mult, b, batch) + i;
                      SetAccumulators(t, in, out, a);
                    });
}

ffi::Error FusedApplyCpu(ffi::ThreadPool pool, ffi::AnyBuffer packed, ffi::RemainingArgs args,
                         ffi::RemainingRets rets, int64_t hidden_size, int64_t hidden_layers,
                         int64_t dm, int64_t dr, int64_t da, float exp_mult, float step_mult,
                         bool write_delta, ffi::Span<const int64_t> factored_axes) {
  const Config cfg = MakeConfig(hidden_size, hidden_layers, dm, dr, da, exp_mult, step_mult);
  int64_t batch = 1;
  std::vector<TensorBuffers> bufs;
  if (ffi::Error err = CollectApplyOperands(cfg, packed, args, rets, factored_axes, &batch, &bufs);
      err.failure())
    return err;
  return RunMembers(pool, cfg, write_delta, packed, batch, bufs,
                    [](const TensorBuffers& t, auto in, auto out, TensorArgs& a) {
                      SetExternal(t, in, out, a);
                      if (!t.factored) a.v_full_out = out(3);
                    });
}

// Local per-feature sums of squares of tensor shards, from external row/column
// factors: the same operands as lopt_fused_apply (scales unused), one result per
// tensor of NumCompactFeatures floats. Reads every buffer, writes only the sums.
ffi::Error PartialSumsqCpu(ffi::ThreadPool pool, ffi::AnyBuffer packed, ffi::RemainingArgs args,
                           ffi::RemainingRets rets, int64_t hidden_size, int64_t hidden_layers,
                           int64_t dm, int64_t dr, int64_t da, float exp_mult, float step_mult,
                           ffi::Span<const int64_t> factored_axes) {
  const Config cfg = MakeConfig(hidden_size, hidden_layers, dm, dr, da, exp_mult, step_mult);
  int64_t batch = 1;
  std::vector<TensorBuffers> bufs;
  if (ffi::Error err = CollectApplyOperands(cfg, packed, args, rets, factored_axes, &batch, &bufs,
                                            /*sums_only=*/true);
      err.failure())
    return err;
  std::vector<float*> sums;
  std::vector<TensorArgs> tensors = MemberViews(
      cfg, packed, batch, bufs, /*with_outputs=*/false,
      [&](const TensorBuffers& t, auto in, auto out, TensorArgs& a) {
        sums.push_back(out(0));
        // The planner wants output buffers; nothing is written through these.
        float* unused = const_cast<float*>(in(0));
        a.out = a.m_out = a.rms_out = unused;
        SetExternal(t, in, out, a);
        if (!t.factored) a.v_full_out = unused;
      });
  const std::string err = CpuPartialSumsq(
      cfg, tensors, sums,
      [&pool](int64_t n, const std::function<void(int64_t)>& fn) { PoolParallelFor(&pool, n, fn); });
  if (!err.empty()) return ffi::Error::InvalidArgument(err);
  return ffi::Error::Success();
}

// MLPLOpt: operands packed, then (p, g, m) per tensor; results (out, m) per tensor.
ffi::Error MlpUpdateCpu(ffi::ThreadPool pool, ffi::AnyBuffer packed, ffi::RemainingArgs args,
                        ffi::RemainingRets rets, int64_t hidden_size, int64_t hidden_layers,
                        float exp_mult, float step_mult, bool write_delta) {
  MlpConfig cfg;
  cfg.hidden = NarrowAttr(hidden_size);
  cfg.hidden_layers = NarrowAttr(hidden_layers);
  cfg.exp_mult = exp_mult;
  cfg.step_mult = step_mult;
  int64_t batch = 1;
  std::vector<TensorBuffers> bufs;
  if (ffi::Error err = CollectMlpOperands(cfg, packed, args, rets, &batch, &bufs); err.failure())
    return err;
  const int64_t packed_size = MlpPackedLayout(cfg).size;
  std::vector<MlpTensorArgs> tensors;
  tensors.reserve(batch * bufs.size());
  for (int64_t b = 0; b < batch; ++b) {
    for (TensorBuffers& t : bufs) {
      MlpTensorArgs a;
      a.shape = t.shape;
      a.packed = packed.typed_data<float>() + b * packed_size;
      a.p = MemberData<const float>(t.ins[0], b, batch);
      a.g = MemberData<const float>(t.ins[1], b, batch);
      a.m = MemberData<const float>(t.ins[2], b, batch);
      a.out = MemberData<float>(*t.outs[0], b, batch);
      a.m_out = MemberData<float>(*t.outs[1], b, batch);
      tensors.push_back(std::move(a));
    }
  }
  const std::string err = CpuMlpLOptUpdate(
      cfg, write_delta, tensors,
      [&pool](int64_t n, const std::function<void(int64_t)>& fn) { PoolParallelFor(&pool, n, fn); });
  if (!err.empty()) return ffi::Error::InvalidArgument(err);
  return ffi::Error::Success();
}

// ScaledSmallFcLOpt's tensor-wide sums (CpuScaleSums): operands (p, m, rms) per tensor, one
// result of 2 + dm floats per tensor. A vmapped call (broadcast_all) gives every operand and
// result the same leading population axes; the result's shape says which they are.
ffi::Error ScaleSumsCpu(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::RemainingRets rets,
                        int64_t dm, int64_t dr) {
  const int idm = NarrowAttr(dm), idr = NarrowAttr(dr);
  if (idm < 1 || idm > kMaxDecays || idr < 1 || idr > kMaxDecays)
    return ffi::Error::InvalidArgument("dm and dr must be in [1, 16]");
  if (args.size() != 3 * rets.size())
    return ffi::Error::InvalidArgument("expected (params, momentum, rms) per tensor and one result each");
  std::vector<ScaleSumsArgs> tensors;
  for (size_t i = 0; i < rets.size(); ++i) {
    const std::string where = "tensor " + std::to_string(i);
    auto out = rets.get<ffi::AnyBuffer>(i);
    if (!out.has_value() || (*out)->element_type() != ffi::DataType::F32)
      return ffi::Error::InvalidArgument(where + ": cannot decode the float32 result");
    const std::vector<int64_t> rd = Dims(**out);
    if (rd.empty() || rd.back() != 2 + idm)
      return ffi::Error::InvalidArgument(where + ": result must be [..., " + std::to_string(2 + idm) + "]");
    const std::vector<int64_t> bdims(rd.begin(), rd.end() - 1);
    int64_t batch = 1;
    for (int64_t d : bdims) batch *= d;
    auto p = args.get<ffi::AnyBuffer>(3 * i);
    if (!p.has_value() || p->element_type() != ffi::DataType::F32)
      return ffi::Error::InvalidArgument(where + ": params must be float32");
    const std::vector<int64_t> pd = Dims(*p);
    if (pd.size() < bdims.size() || !std::equal(bdims.begin(), bdims.end(), pd.begin()))
      return ffi::Error::InvalidArgument(where + ": parameter shape " + ShapeStr(pd) +
                                         " lacks the population axes " + ShapeStr(bdims));
    std::vector<int64_t> m_shape = pd, r_shape = pd;
    m_shape.push_back(idm);
    r_shape.push_back(idr);
    auto m = args.get<ffi::AnyBuffer>(3 * i + 1);
    auto rms = args.get<ffi::AnyBuffer>(3 * i + 2);
    if (!m.has_value() || m->element_type() != ffi::DataType::F32 || Dims(*m) != m_shape)
      return ffi::Error::InvalidArgument(where + " momentum: expected float32 " + ShapeStr(m_shape));
    if (!rms.has_value() || rms->element_type() != ffi::DataType::F32 || Dims(*rms) != r_shape)
      return ffi::Error::InvalidArgument(where + " rms: expected float32 " + ShapeStr(r_shape));
    const int64_t n = batch ? static_cast<int64_t>(p->element_count()) / batch : 0;
    for (int64_t b = 0; b < batch; ++b) {
      ScaleSumsArgs a;
      a.n = n, a.dm = idm, a.dr = idr;
      a.p = MemberData<const float>(*p, b, batch);
      a.m = MemberData<const float>(*m, b, batch);
      a.rms = MemberData<const float>(*rms, b, batch);
      a.out = MemberData<float>(**out, b, batch);
      tensors.push_back(a);
    }
  }
  const std::string err = CpuScaleSums(
      tensors, [&pool](int64_t n, const std::function<void(int64_t)>& fn) { PoolParallelFor(&pool, n, fn); });
  if (!err.empty()) return ffi::Error::InvalidArgument(err);
  return ffi::Error::Success();
}

}  // namespace

// Operands and attributes shared by the calls (see ffi_common.h for the order).
auto BaseBinding() {
  return WithConfigAttrs(ffi::Ffi::Bind()
                             .Ctx<ffi::ThreadPool>()
                             .Arg<ffi::AnyBuffer>()  // packed meta-parameters
                             .RemainingArgs()
                             .RemainingRets());
}

// "precision" selects the CUDA MLP path and "cpu_precision" this one; the shared call
// site passes both to both handlers.
XLA_FFI_DEFINE_HANDLER_SYMBOL(LoptFusedUpdateCpu, FusedUpdateCpu,
                              BaseBinding()
                                  .Attr<bool>("write_delta")
                                  .Attr<int64_t>("precision")
                                  .Attr<int64_t>("cpu_precision"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LoptCeloUpdateCpu, CeloUpdateCpu,
                              WithConfigAttrs(ffi::Ffi::Bind()
                                                  .Ctx<ffi::ThreadPool>()
                                                  .Arg<ffi::AnyBuffer>()  // packed meta-parameters
                                                  .Arg<ffi::AnyBuffer>()  // lr_mult per tensor
                                                  .RemainingArgs()
                                                  .RemainingRets())
                                  .Attr<bool>("write_delta"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LoptFusedApplyCpu, FusedApplyCpu,
                              BaseBinding()
                                  .Attr<bool>("write_delta")
                                  .Attr<ffi::Span<const int64_t>>("factored_axes"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LoptPartialSumsqCpu, PartialSumsqCpu,
                              BaseBinding().Attr<ffi::Span<const int64_t>>("factored_axes"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LoptScaleSumsCpu, ScaleSumsCpu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("dm")
                                  .Attr<int64_t>("dr"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LoptMlpUpdateCpu, MlpUpdateCpu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // packed meta-parameters
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("hidden_size")
                                  .Attr<int64_t>("hidden_layers")
                                  .Attr<float>("exp_mult")
                                  .Attr<float>("step_mult")
                                  .Attr<bool>("write_delta"));

}  // namespace lopt::ffi_glue
