// pybind11 module of the CUDA backend: the same target names as _lopt_cpu,
// registered by lopt_ext/_ffi.py for platform "CUDA".
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include "lopt_config.h"
#include "lopt_cuda.h"
#include "xla/ffi/api/c_api.h"

namespace lopt::ffi_glue {
extern "C" XLA_FFI_Error* LoptFusedUpdateCuda(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* LoptCeloUpdateCuda(XLA_FFI_CallFrame* call_frame);
}

namespace py = pybind11;

PYBIND11_MODULE(_lopt_cuda, m) {
  m.doc() = "lopt_ext CUDA kernels (XLA FFI handlers for platform CUDA)";
  m.def("registrations", []() {
    py::dict d;
    d["lopt_fused_update"] =
        py::capsule(reinterpret_cast<void*>(&lopt::ffi_glue::LoptFusedUpdateCuda));
    d["lopt_celo_update"] =
        py::capsule(reinterpret_cast<void*>(&lopt::ffi_glue::LoptCeloUpdateCuda));
    return d;
  });
  m.attr("PRECISION_FP32") = static_cast<int>(lopt::cuda::Precision::kFp32);
  m.attr("PRECISION_TF32") = static_cast<int>(lopt::cuda::Precision::kTf32);
  m.def(
      "uses_tensor_cores",
      [](int hidden, int layers, int dm, int dr, int da, int precision) {
        lopt::Config c;
        c.hidden = hidden, c.hidden_layers = layers, c.dm = dm, c.dr = dr, c.da = da;
        return lopt::cuda::UsesTensorCores(c, static_cast<lopt::cuda::Precision>(precision));
      },
      py::arg("hidden"), py::arg("layers"), py::arg("dm"), py::arg("dr"), py::arg("da"),
      py::arg("precision"),
      "True when the MLP of this configuration runs on TF32 tensor cores.");
  m.def("cuda_runtime_version", []() {
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
  });
}
