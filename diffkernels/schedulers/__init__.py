"""DDPM and DDIM samplers on the fused diffusion_step op: diffusers' config keys, diffusers'
results step for step (same seeded noise), one kernel and no device sync per step."""
from ._common import SchedulerConfig, SchedulerOutput
from .ddim import DDIMScheduler, DDIMSchedulerOutput
from .ddpm import DDPMScheduler, DDPMSchedulerOutput

__all__ = ["DDPMScheduler", "DDIMScheduler", "SchedulerOutput", "SchedulerConfig",
           "DDPMSchedulerOutput", "DDIMSchedulerOutput"]
