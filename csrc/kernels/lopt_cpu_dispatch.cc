// Picks the per-element loops built for the best instruction set this CPU has.
#include <cstdlib>
#include <cstring>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "lopt_cpu_tiles.h"

namespace lopt::tiles {
namespace isa_generic { const Kernels& Get(); }
const Kernels& GenericKernels() { return isa_generic::Get(); }
#if defined(LOPT_HAVE_X86_ISAS)
namespace isa_avx2 { const Kernels& Get(); }
namespace isa_avx512 { const Kernels& Get(); }
const Kernels& Avx2Kernels() { return isa_avx2::Get(); }
const Kernels& Avx512Kernels() { return isa_avx512::Get(); }
#if defined(LOPT_HAVE_AMX)
namespace isa_amx { const Kernels& Get(); }
const Kernels& AmxKernels() { return isa_amx::Get(); }
#else
const Kernels& AmxKernels() { return Avx512Kernels(); }  // never selected: HasAmxBf16 is false
#endif
#else
const Kernels& Avx2Kernels() { return GenericKernels(); }
const Kernels& Avx512Kernels() { return GenericKernels(); }
const Kernels& AmxKernels() { return GenericKernels(); }
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

// AMX-BF16 on the CPU and, on Linux, the tile data permission (asked for once per process).
bool HasAmxBf16() {
#if defined(LOPT_HAVE_X86_ISAS) && defined(LOPT_HAVE_AMX) && defined(__linux__) && \
    (defined(__GNUC__) || defined(__clang__))
  static const bool ok = [] {
    if (!HasAvx512() || !__builtin_cpu_supports("avx512bf16") || !__builtin_cpu_supports("amx-tile") ||
        !__builtin_cpu_supports("amx-bf16"))
      return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

bool Avx512Allowed() {
  const char* forced = std::getenv("LOPT_CPU_ISA");
  return !forced || std::strcmp(forced, "avx512") == 0;
}

const Kernels& Choose() {
  // LOPT_CPU_ISA forces a lower level (tests compare the builds with each other);
  // a level the CPU lacks is never chosen.
  const char* forced = std::getenv("LOPT_CPU_ISA");
  const bool allow512 = Avx512Allowed();
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

const Kernels* SelectBf16Kernels() {
  return Avx512Allowed() && HasAmxBf16() ? &AmxKernels() : nullptr;
}

}  // namespace lopt::tiles
