// csrc/cpu/diffusion_step_kernel.h compiled for CPU capability DEFAULT (see csrc/cpu/capability.h).
#define DK_CAPABILITY_DEFAULT
#include "../capability.h"
#include "../diffusion_step_kernel.h"
