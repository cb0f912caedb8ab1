// The per-element loops built for the "avx2" instruction set (flags in CMakeLists.txt).
#define LOPT_TILES_NS isa_avx2
#define LOPT_TILES_ISA_NAME "avx2"
#define LOPT_TILES_VEC_BYTES 32
#include "lopt_cpu_tiles_impl.inc"
