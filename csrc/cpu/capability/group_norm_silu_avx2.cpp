// csrc/cpu/group_norm_silu_kernel.h compiled for CPU capability AVX2 (see csrc/cpu/capability.h).
#include "../kernels.h"
#if DK_X86_CAPABILITIES
#define DK_CAPABILITY_AVX2
#include "../capability.h"
#include "../group_norm_silu_kernel.h"
#endif
