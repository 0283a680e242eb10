// csrc/cpu/diffusion_step_kernel.h compiled for CPU capability AVX2 (see csrc/cpu/capability.h).
#include "../kernels.h"
#if DK_X86_CAPABILITIES
#define DK_CAPABILITY_AVX2
#include "../capability.h"
#include "../diffusion_step_kernel.h"
#endif
