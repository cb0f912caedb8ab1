// Picks the per-element loops built for the best instruction set this CPU has.
#include <cstdlib>
#include <cstring>

#include "lopt_cpu_tiles.h"

namespace lopt::tiles {
namespace isa_generic { const Kernels& Get(); }
const Kernels& GenericKernels() { return isa_generic::Get(); }
#if defined(LOPT_HAVE_X86_ISAS)
namespace isa_avx2 { const Kernels& Get(); }
namespace isa_avx512 { const Kernels& Get(); }
const Kernels& Avx2Kernels() { return isa_avx2::Get(); }
const Kernels& Avx512Kernels() { return isa_avx512::Get(); }
#else
const Kernels& Avx2Kernels() { return GenericKernels(); }
const Kernels& Avx512Kernels() { return GenericKernels(); }
#endif

namespace {
bool HasAvx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}
bool HasAvx512() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  return HasAvx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

const Kernels& Choose() {
  // LOPT_CPU_ISA forces a lower level (tests compare the builds with each other);
  // a level the CPU lacks is never chosen.
  const char* forced = std::getenv("LOPT_CPU_ISA");
  const bool allow512 = !forced || std::strcmp(forced, "avx512") == 0;
  const bool allow2 = allow512 || std::strcmp(forced, "avx2") == 0;
#if defined(LOPT_HAVE_X86_ISAS)
  if (allow512 && HasAvx512()) return Avx512Kernels();
  if (allow2 && HasAvx2()) return Avx2Kernels();
#else
  (void)allow512;
  (void)allow2;
#endif
  return GenericKernels();
}
}  // namespace

// Read on every call (a getenv is cheap next to a step) so that tests can switch.
const Kernels& SelectKernels() { return Choose(); }

}  // namespace lopt::tiles
