"""DDPM and DDIM samplers on the fused diffusion_step op: diffusers' config keys and config
files, diffusers' results step for step (same seeded noise), one kernel and no device sync per
step."""
from ._config import SchedulerConfig, SchedulerOutput
from .ddim import DDIMScheduler, DDIMSchedulerOutput
from .ddpm import DDPMScheduler, DDPMSchedulerOutput
from ._config import link_diffusers as _link_diffusers

__all__ = ["DDPMScheduler", "DDIMScheduler", "SchedulerOutput", "SchedulerConfig",
           "DDPMSchedulerOutput", "DDIMSchedulerOutput"]

_link_diffusers((DDPMScheduler, DDIMScheduler))
