# CUDA backend: lopt_ext._lopt_cuda (XLA FFI handlers for platform "CUDA").
# Included by CMakeLists.txt when LOPT_CUDA is ON, or AUTO and nvcc was found.
set(LOPT_CUDA_ARCHITECTURES "80-real;90" CACHE STRING
    "CUDA architectures of the kernels (SASS for sm_80 and sm_90, PTX for sm_90+)")
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
  set(CMAKE_CUDA_ARCHITECTURES ${LOPT_CUDA_ARCHITECTURES})
endif()
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)
if(CMAKE_CUDA_COMPILER_VERSION VERSION_LESS 12.1)
  message(FATAL_ERROR "lopt_ext's CUDA kernels need nvcc >= 12.1 (large kernel parameters); "
                      "found ${CMAKE_CUDA_COMPILER_VERSION}")
endif()

add_library(lopt_kernels_cuda STATIC csrc/kernels/lopt_cuda.cu)
target_include_directories(lopt_kernels_cuda PUBLIC csrc/kernels)
set_target_properties(lopt_kernels_cuda PROPERTIES
  CUDA_ARCHITECTURES "${LOPT_CUDA_ARCHITECTURES}"
  CUDA_STANDARD 17
  POSITION_INDEPENDENT_CODE ON)
# No --use_fast_math: sqrt, division and exp must round as in IEEE float32.
target_compile_options(lopt_kernels_cuda PRIVATE
  $<$<COMPILE_LANGUAGE:CUDA>:-lineinfo -Xcompiler=-fPIC --expt-relaxed-constexpr>)
target_link_libraries(lopt_kernels_cuda PUBLIC CUDA::cudart_static)

pybind11_add_module(_lopt_cuda MODULE csrc/bindings/module_cuda.cc csrc/ffi/lopt_ffi_cuda.cc)
target_include_directories(_lopt_cuda PRIVATE csrc/ffi)
target_include_directories(_lopt_cuda SYSTEM PRIVATE "${XLA_FFI_INCLUDE_DIR}")
target_link_libraries(_lopt_cuda PRIVATE lopt_kernels_cuda CUDA::cudart_static)
target_compile_options(_lopt_cuda PRIVATE ${LOPT_WARNINGS})
install(TARGETS _lopt_cuda LIBRARY DESTINATION lopt_ext)
message(STATUS "lopt_ext: CUDA kernels with nvcc ${CMAKE_CUDA_COMPILER_VERSION} "
               "(${CMAKE_CUDA_COMPILER}) for architectures ${LOPT_CUDA_ARCHITECTURES}")
