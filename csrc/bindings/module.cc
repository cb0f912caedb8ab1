// The only pybind11 file: exposes the FFI handlers and the shared constants.
#include <pybind11/pybind11.h>

#include "lopt_config.h"
#include "lopt_cpu.h"
#include "lopt_cpu_tiles.h"
#include "xla/ffi/api/c_api.h"

namespace lopt::ffi_glue {
extern "C" XLA_FFI_Error* LoptFusedUpdateCpu(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* LoptFusedApplyCpu(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* LoptCeloUpdateCpu(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* LoptPartialSumsqCpu(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* LoptMlpUpdateCpu(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* LoptScaleSumsCpu(XLA_FFI_CallFrame* call_frame);
}

namespace py = pybind11;

PYBIND11_MODULE(_lopt_cpu, m) {
  m.doc() = "lopt_ext CPU kernels (XLA FFI handlers)";
  m.def("registrations", []() {
    py::dict d;
    d["lopt_fused_update"] =
        py::capsule(reinterpret_cast<void*>(&lopt::ffi_glue::LoptFusedUpdateCpu));
    d["lopt_fused_apply"] =
        py::capsule(reinterpret_cast<void*>(&lopt::ffi_glue::LoptFusedApplyCpu));
    d["lopt_partial_sumsq"] =
        py::capsule(reinterpret_cast<void*>(&lopt::ffi_glue::LoptPartialSumsqCpu));
    d["lopt_celo_update"] =
        py::capsule(reinterpret_cast<void*>(&lopt::ffi_glue::LoptCeloUpdateCpu));
    d["lopt_mlp_update"] = py::capsule(reinterpret_cast<void*>(&lopt::ffi_glue::LoptMlpUpdateCpu));
    d["lopt_scale_sums"] = py::capsule(reinterpret_cast<void*>(&lopt::ffi_glue::LoptScaleSumsCpu));
    return d;
  });
  m.attr("NUM_STEP_FEATURES") = lopt::kNumStepFeatures;
  m.attr("MAX_DECAYS") = lopt::kMaxDecays;
  m.attr("MAX_HIDDEN") = lopt::kMaxHidden;
  m.attr("MAX_HIDDEN_LAYERS") = lopt::kMaxHiddenLayers;
  m.def(
      "num_normalized_features",
      [](int dm, int dr, int da, bool celo) { return lopt::NumNormalizedFeatures(dm, dr, da, celo); },
      py::arg("dm"), py::arg("dr"), py::arg("da"), py::arg("celo") = false);
  m.def(
      "packed_size",
      [](int hidden, int layers, int dm, int dr, int da, bool celo) {
        lopt::Config c;
        c.hidden = hidden, c.hidden_layers = layers, c.dm = dm, c.dr = dr, c.da = da, c.celo = celo;
        return lopt::PackedLayout(c).size;
      },
      py::arg("hidden"), py::arg("layers"), py::arg("dm"), py::arg("dr"), py::arg("da"),
      py::arg("celo") = false);
  m.def(
      "mlp_packed_size",
      [](int hidden, int layers) {
        lopt::MlpConfig c;
        c.hidden = hidden, c.hidden_layers = layers;
        return lopt::MlpPackedLayout(c).size;
      },
      py::arg("hidden"), py::arg("layers"));
  m.def("cpu_isa", []() { return std::string(lopt::tiles::SelectKernels().isa); },
        "Instruction set of the CPU loops that the next call will use.");
  m.def("cpu_has_bf16", &lopt::CpuHasBf16,
        "True when this CPU and OS run the bf16 (AMX) precision of the fused update.");
  m.attr("BF16_MIN_HIDDEN") = lopt::kBf16MinHidden;
}
