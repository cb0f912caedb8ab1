// The per-element loops built for the "generic" instruction set (flags in CMakeLists.txt).
#define LOPT_TILES_NS isa_generic
#define LOPT_TILES_ISA_NAME "generic"
#define LOPT_TILES_VEC_BYTES 16
#include "lopt_cpu_tiles_impl.inc"
