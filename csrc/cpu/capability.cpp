// diffkernels::cpu::capability(): the level ATen itself runs its CPU kernels at, so that
// ATEN_CPU_CAPABILITY=default|avx2|avx512 (ATen's own switch, capped at what the CPU supports)
// selects ours too, and CI can test every level on one machine.
#include "kernels.h"

#include <ATen/Version.h>

#include <string>

namespace diffkernels::cpu {

Capability capability() {
  static const Capability level = [] {
#if DK_X86_CAPABILITIES
    const std::string aten = at::get_cpu_capability();  // "DEFAULT", "AVX2", "AVX512", ...
    if (aten == "AVX512") return Capability::kAVX512;
    if (aten == "AVX2") return Capability::kAVX2;
#endif
    return Capability::kDefault;
  }();
  return level;
}

const char* capability_name(Capability c) {
  switch (c) {
    case Capability::kAVX512: return "avx512";
    case Capability::kAVX2: return "avx2";
    default: return "default";
  }
}

}  // namespace diffkernels::cpu

// diffkernels::cpu_capability() -> str: the level the CPU kernels run at in this process
// ("default", "avx2" or "avx512"), for tests and benchmark rows.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(diffkernels, m) {
  m.def("cpu_capability() -> str",
        [] { return std::string(diffkernels::cpu::capability_name(diffkernels::cpu::capability())); });
}
