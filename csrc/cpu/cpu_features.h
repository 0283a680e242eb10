// Run-time check for the AVX2 kernel sections of csrc/cpu/*.cpp. setup.py compiles without
// -mavx2 (the library must load on any x86-64), so each file compiles its kernels for
// AVX2+FMA+F16C with a GCC target pragma and asks this before entering them.
#pragma once

#include <cstdlib>
#include <cstring>

namespace diffkernels {

inline bool cpu_has_avx2_fma_f16c() {
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
  // ATEN_CPU_CAPABILITY=default asks ATen for its scalar kernels; follow it.
  static const bool ok = [] {
    const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
    if (cap != nullptr && std::strcmp(cap, "default") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }();
  return ok;
#else
  return false;
#endif
}

}  // namespace diffkernels
