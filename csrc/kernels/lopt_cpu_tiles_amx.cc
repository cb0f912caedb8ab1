// The "avx512" loops with AMX bf16 hidden layers (the opt-in CpuPrecision::kBf16): the same
// code as lopt_cpu_tiles_avx512.cc plus AMX (flags in CMakeLists.txt). Only the driver's
// bf16 plans (TensorPlan::amx_first set) reach the AMX instructions.
#define LOPT_TILES_NS isa_amx
#define LOPT_TILES_ISA_NAME "amx"
#define LOPT_TILES_VEC_BYTES 64
#define LOPT_TILES_AMX 1
#include "lopt_cpu_tiles_impl.inc"
