// csrc/cpu/group_norm_silu_kernel.h compiled for CPU capability DEFAULT (see csrc/cpu/capability.h).
#define DK_CAPABILITY_DEFAULT
#include "../capability.h"
#include "../group_norm_silu_kernel.h"
