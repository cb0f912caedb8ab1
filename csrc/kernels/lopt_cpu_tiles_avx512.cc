// The per-element loops built for the "avx512" instruction set (flags in CMakeLists.txt).
#define LOPT_TILES_NS isa_avx512
#define LOPT_TILES_ISA_NAME "avx512"
#define LOPT_TILES_VEC_BYTES 64
#include "lopt_cpu_tiles_impl.inc"
