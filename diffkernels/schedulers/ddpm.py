"""DDPMScheduler (Ho et al. 2020) on the fused diffusion_step op, with diffusers' config keys
and step-for-step diffusers results (diffusers.schedulers.scheduling_ddpm)."""
import math
import warnings
from typing import List, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..reference import VARIANCE_LEARNED, VARIANCE_LEARNED_RANGE, VARIANCE_SCALAR
from ._common import SchedulerBase, SchedulerOutput, div, log, resolve_noise_alias, sqrt, x0_coeffs

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned",
                  "learned_range")

DDPMSchedulerOutput = SchedulerOutput


class DDPMScheduler(SchedulerBase):
    """Ancestral DDPM sampling. Same constructor keys and defaults as diffusers' DDPMScheduler.

    variance_type: fixed_small / fixed_small_log / fixed_large / fixed_large_log (noise std from
    the schedule), learned (model_output's second C channels are the variance), learned_range
    (they interpolate the log variance between the fixed_small and fixed_large values). Note that
    diffusers' fixed_large_log takes the square root of log(beta_t) < 0 and so gives NaN; this
    class does the same (with a warning) so results stay diffusers' results.
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001,
                 beta_end: float = 0.02, beta_schedule: str = "linear",
                 trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
                 variance_type: str = "fixed_small", clip_sample: bool = True,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                 steps_offset: int = 0, rescale_betas_zero_snr: bool = False):
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type: expected one of {VARIANCE_TYPES}, got "
                             f"{variance_type!r}")
        if variance_type == "fixed_large_log":
            warnings.warn("variance_type='fixed_large_log' follows diffusers, whose noise std is "
                          "sqrt(log(beta_t)) = NaN for every t > 0; use 'fixed_large' for "
                          "std = sqrt(beta_t)", stacklevel=2)
        self._setup(locals())
        self.one = torch.tensor(1.0)
        self.variance_type = variance_type

    def set_timesteps(self, num_inference_steps: Optional[int] = None,
                      device: Union[str, torch.device, None] = None,
                      timesteps: Optional[List[int]] = None):
        """The sampling schedule: `num_inference_steps` spaced by config.timestep_spacing, or
        custom descending `timesteps`. Timesteps go to `device`; the host keeps its own copy."""
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `timesteps`.")
        if timesteps is not None:
            timesteps = [int(t) for t in timesteps]
            if any(b >= a for a, b in zip(timesteps, timesteps[1:])):
                raise ValueError("timesteps: custom timesteps must be in descending order")
            if not timesteps or timesteps[0] >= self.config.num_train_timesteps:
                raise ValueError(f"timesteps: must be non-empty and start below "
                                 f"num_train_timesteps={self.config.num_train_timesteps}")
            self.custom_timesteps = True
            self.num_inference_steps = len(timesteps)
            self._set_schedule(np.array(timesteps, dtype=np.int64), device)
            return
        if num_inference_steps is None:
            raise ValueError("set_timesteps: pass num_inference_steps or timesteps")
        spaced = self._spaced(num_inference_steps)
        self.custom_timesteps = False
        self.num_inference_steps = int(num_inference_steps)
        self._set_schedule(spaced, device)

    def previous_timestep(self, timestep) -> int:
        """The next timestep of the schedule after `timestep` (-1 after the last one)."""
        index = self._step_index(timestep)
        return self._schedule[index + 1] if index + 1 < len(self._schedule) else -1

    def coefficients(self, t: int, prev_t: int):
        """(coeffs k0..k10, variance_mode) of diffusion_step for one step t -> prev_t, in
        float64 on the host, with diffusers' formulas (reference.diffusion_step documents k)."""
        c = self.config
        acp = self._alphas_cumprod
        a = acp[t]
        a_prev = acp[prev_t] if prev_t >= 0 else 1.0
        b, b_prev = 1.0 - a, 1.0 - a_prev
        current_alpha = div(a, a_prev)
        current_beta = 1.0 - current_alpha
        k0, k1 = x0_coeffs(c.prediction_type, a)
        # Posterior mean (DDPM eq. 7): k5 * x0 + k6 * x_t.
        k5 = div(sqrt(a_prev) * current_beta, b)
        k6 = div(sqrt(current_alpha) * b_prev, b)
        variance = max(div(b_prev, b) * current_beta, 1e-20)  # diffusers clamps at 1e-20
        mode, k8, k9, k10 = VARIANCE_SCALAR, 0.0, 0.0, 0.0
        vt = self.variance_type
        if vt == "fixed_small":
            k8 = sqrt(variance)
        elif vt == "fixed_small_log":
            k8 = math.exp(0.5 * log(variance))
        elif vt == "fixed_large":
            k8 = sqrt(current_beta)
        elif vt == "fixed_large_log":
            k8 = sqrt(log(current_beta))  # diffusers' quirk: sqrt of a negative log = NaN
        elif vt == "learned":
            mode = VARIANCE_LEARNED  # std = sqrt(v)
        else:  # learned_range: log var = min_log + (v + 1) / 2 * (max_log - min_log)
            mode = VARIANCE_LEARNED_RANGE  # std = exp(k9 + k10 * v)
            min_log, max_log = log(variance), log(current_beta)
            k9, k10 = 0.25 * (min_log + max_log), 0.25 * (max_log - min_log)
        return [k0, k1, 0.0, 0.0, 0.0, k5, k6, 0.0, k8, k9, k10], mode

    def step(self, model_output: Tensor, timestep, sample: Tensor,
             generator: Union[torch.Generator, List[torch.Generator], None] = None,
             return_dict: bool = True, *, variance_noise: Optional[Tensor] = None,
             noise: Optional[Tensor] = None, guidance_scale: Optional[float] = None):
        """x_t -> x_{t-1}: returns SchedulerOutput(prev_sample, pred_original_sample), or the
        tuple with return_dict=False.

        model_output: [B, C, *S] ([B, 2C, *S] for learned variances); with guidance_scale,
        both classifier-free-guidance halves [2B, ...], unconditional first, combined in the
        same kernel. Noise (for t > 0) is drawn like diffusers' from `generator`, or given as
        variance_noise / noise ([B, C, *S]). Never syncs the device.
        """
        learned = self.variance_type in ("learned", "learned_range")
        model_output, sample, cfg, g = self._prepare(
            model_output, sample, guidance_scale, learned,
            f"variance_type={self.variance_type!r} is not learned")
        variance_noise = resolve_noise_alias(variance_noise, noise)
        index = self._step_index(timestep)
        t = self._schedule[index]
        prev_t = self._schedule[index + 1] if index + 1 < len(self._schedule) else -1
        coeffs, mode = self.coefficients(t, prev_t)
        step_noise = None
        if t > 0:  # diffusers adds no noise at t == 0 (decided on the host)
            step_noise = self._noise(model_output, sample, generator, variance_noise)
        elif generator is not None and variance_noise is not None:
            raise ValueError("Cannot pass both generator and variance_noise: one of them must "
                             "be None")
        self._next_index = index + 1
        return self._fused(model_output, sample, coeffs, step_noise, mode, cfg, g, return_dict)
