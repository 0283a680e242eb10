// Prologue of a per-capability translation unit (csrc/cpu/capability/<op>_<level>.cpp):
//   #define DK_CAPABILITY_AVX512   (or _AVX2, _DEFAULT)
//   #include "../capability.h"
//   #include "../<op>_kernel.h"
// Everything that is not at::vec is included first, still compiled for baseline x86-64, so no
// inline function outside the capability namespaces gets AVX code. Then a GCC target pragma
// (setuptools cannot give one source its own -m flags) covers the rest of the unit, and
// CPU_CAPABILITY selects at::vec's implementation and names the namespace the kernel goes in.
#pragma once

#include "kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(DK_CAPABILITY_AVX512) || defined(DK_CAPABILITY_AVX2)
#if !DK_X86_CAPABILITIES
#error "AVX2/AVX-512 units are compiled only where DK_X86_CAPABILITIES is set"
#endif
// The flags ATen compiles its AVX2 / AVX512 kernels with (cmake/Codegen.cmake), as a pragma.
#ifdef DK_CAPABILITY_AVX512
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#else
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
#pragma GCC diagnostic ignored "-Wpsabi"  // notes about the ABI of vector arguments
// The pragma does not define the ISA macros; sleef.h declares its vector functions only under
// them. Defined around at::vec's includes only (every other header is already in).
#ifndef __AVX__
#define __AVX__ 1
#define DK_UNDEF_AVX
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#define DK_UNDEF_AVX2
#endif
#if defined(DK_CAPABILITY_AVX512) && !defined(__AVX512F__)
#define __AVX512F__ 1
#define DK_UNDEF_AVX512F
#endif
#elif defined(DK_CAPABILITY_DEFAULT)
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#else
#error "define DK_CAPABILITY_DEFAULT, DK_CAPABILITY_AVX2 or DK_CAPABILITY_AVX512 first"
#endif

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunknown-pragmas"  // at::vec's `#pragma unroll` (a clang one)
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#pragma GCC diagnostic pop

#ifdef DK_UNDEF_AVX
#undef __AVX__
#endif
#ifdef DK_UNDEF_AVX2
#undef __AVX2__
#endif
#ifdef DK_UNDEF_AVX512F
#undef __AVX512F__
#endif
