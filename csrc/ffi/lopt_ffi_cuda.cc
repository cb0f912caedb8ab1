// XLA FFI handler of the fused update on CUDA devices: decode, check, enqueue.
// The stream comes from the FFI context and scratch from XLA's allocator; the
// handler never synchronises and never calls cudaMalloc.
#include <cuda_runtime.h>

#include "ffi_common.h"
#include "lopt_cuda.h"

namespace lopt::ffi_glue {
namespace {

// Enqueues the step of every member's tensors; lr_mult (Celo only, else nullptr) holds
// [population..., tensors] per-tensor step multipliers.
ffi::Error RunCuda(cudaStream_t stream, ffi::ScratchAllocator& scratch, const Config& cfg,
                   ffi::AnyBuffer packed, const ffi::AnyBuffer* lr_mult, ffi::RemainingArgs& args,
                   ffi::RemainingRets& rets, bool write_delta, int64_t precision) {
  if (precision != 0 && precision != 1)
    return ffi::Error::InvalidArgument("precision must be 0 (fp32) or 1 (tf32)");
  if (cfg.da == 0)
    return ffi::Error::InvalidArgument(
        "the configuration without Adafactor features has no CUDA kernel (CPU only)");
  int64_t batch = 1;
  std::vector<TensorBuffers> bufs;
  if (ffi::Error err = CollectOperands(cfg, packed, args, rets, &batch, &bufs); err.failure())
    return err;
  if (lr_mult) {
    std::vector<int64_t> want = Dims(packed);
    want.back() = static_cast<int64_t>(bufs.size());
    if (lr_mult->element_type() != ffi::DataType::F32 || Dims(*lr_mult) != want)
      return ffi::Error::InvalidArgument("lr_mult must be float32 of shape " + ShapeStr(want) +
                                         " (population axes, then one per tensor)");
  }
  const int64_t packed_size = PackedLayout(cfg).size;
  std::vector<TensorArgs> tensors;
  tensors.reserve(batch * bufs.size());
  for (int64_t b = 0; b < batch; ++b) {
    for (size_t i = 0; i < bufs.size(); ++i) {
      TensorBuffers& t = bufs[i];
      if (t.ins[0].element_count() == 0) continue;  // nothing to do for empty tensors
      auto in = [&](size_t k) { return MemberData<const float>(t.ins[k], b, batch); };
      auto out = [&](size_t k) { return MemberData<float>(*t.outs[k], b, batch); };
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
      if (lr_mult) a.lr_mult = MemberData<const float>(*lr_mult, b, batch) + i;  // device memory
      tensors.push_back(std::move(a));
    }
  }
  auto alloc = [&scratch](size_t bytes) -> void* {
    std::optional<void*> p = scratch.Allocate(bytes, 256);
    return p.has_value() ? *p : nullptr;
  };
  const std::string err =
      cuda::CudaFusedUpdate(cfg, write_delta, static_cast<cuda::Precision>(precision), tensors,
                            alloc, stream);
  if (!err.empty()) return ffi::Error::Internal(err);
  return ffi::Error::Success();
}

Config MakeConfig(int64_t hidden_size, int64_t hidden_layers, int64_t dm, int64_t dr, int64_t da,
                  float exp_mult, float step_mult) {
  Config cfg;
  cfg.hidden = static_cast<int>(hidden_size);
  cfg.hidden_layers = static_cast<int>(hidden_layers);
  cfg.dm = static_cast<int>(dm);
  cfg.dr = static_cast<int>(dr);
  cfg.da = static_cast<int>(da);
  cfg.exp_mult = exp_mult;
  cfg.step_mult = step_mult;
  return cfg;
}

ffi::Error FusedUpdateCuda(cudaStream_t stream, ffi::ScratchAllocator scratch,
                           ffi::AnyBuffer packed, ffi::RemainingArgs args, ffi::RemainingRets rets,
                           int64_t hidden_size, int64_t hidden_layers, int64_t dm, int64_t dr,
                           int64_t da, float exp_mult, float step_mult, bool write_delta,
                           int64_t precision, int64_t /*cpu_precision: CPU only, ignored here*/) {
  const Config cfg = MakeConfig(hidden_size, hidden_layers, dm, dr, da, exp_mult, step_mult);
  return RunCuda(stream, scratch, cfg, packed, nullptr, args, rets, write_delta, precision);
}

// Celo's per-element rule (Config::celo): lr_mult then the tensors, as on the CPU.
ffi::Error CeloUpdateCuda(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer packed,
                          ffi::AnyBuffer lr_mult, ffi::RemainingArgs args, ffi::RemainingRets rets,
                          int64_t hidden_size, int64_t hidden_layers, int64_t dm, int64_t dr,
                          int64_t da, float exp_mult, float step_mult, bool write_delta) {
  Config cfg = MakeConfig(hidden_size, hidden_layers, dm, dr, da, exp_mult, step_mult);
  cfg.celo = true;
  return RunCuda(stream, scratch, cfg, packed, &lr_mult, args, rets, write_delta, 0);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LoptFusedUpdateCuda, FusedUpdateCuda,
                              WithConfigAttrs(ffi::Ffi::Bind()
                                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                                  .Ctx<ffi::ScratchAllocator>()
                                                  .Arg<ffi::AnyBuffer>()  // packed meta-parameters
                                                  .RemainingArgs()
                                                  .RemainingRets())
                                  .Attr<bool>("write_delta")
                                  .Attr<int64_t>("precision")
                                  .Attr<int64_t>("cpu_precision"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LoptCeloUpdateCuda, CeloUpdateCuda,
                              WithConfigAttrs(ffi::Ffi::Bind()
                                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                                  .Ctx<ffi::ScratchAllocator>()
                                                  .Arg<ffi::AnyBuffer>()  // packed meta-parameters
                                                  .Arg<ffi::AnyBuffer>()  // lr_mult per tensor
                                                  .RemainingArgs()
                                                  .RemainingRets())
                                  .Attr<bool>("write_delta"));

}  // namespace lopt::ffi_glue
