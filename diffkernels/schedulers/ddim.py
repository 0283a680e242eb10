"""DDIMScheduler (Song et al. 2020) on the fused diffusion_step op, with diffusers' config keys
and step-for-step diffusers results (diffusers.schedulers.scheduling_ddim)."""
from typing import List, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..reference import VARIANCE_SCALAR
from ._common import SchedulerBase, SchedulerOutput, div, resolve_noise_alias, sqrt, x0_coeffs

DDIMSchedulerOutput = SchedulerOutput


class DDIMScheduler(SchedulerBase):
    """Denoising diffusion implicit models. Same constructor keys and defaults as diffusers'
    DDIMScheduler; eta and use_clipped_model_output are step arguments.

    As in diffusers, the step from t goes to t - num_train_timesteps // num_inference_steps
    whatever the timestep_spacing (for "trailing"/"linspace" that need not be the next
    scheduled timestep), and below 0 it goes to final_alpha_cumprod (1 with set_alpha_to_one).
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001,
                 beta_end: float = 0.02, beta_schedule: str = "linear",
                 trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
                 clip_sample: bool = True, set_alpha_to_one: bool = True, steps_offset: int = 0,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                 rescale_betas_zero_snr: bool = False):
        self._setup(locals())
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self._final_alpha_cumprod = 1.0 if set_alpha_to_one else self._alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int,
                      device: Union[str, torch.device, None] = None):
        """The sampling schedule, spaced by config.timestep_spacing, on `device` (the host keeps
        its own copy)."""
        spaced = self._spaced(num_inference_steps)
        self.num_inference_steps = int(num_inference_steps)
        self._set_schedule(spaced, device)

    def coefficients(self, t: int, eta: float = 0.0, use_clipped_model_output: bool = False):
        """(coeffs k0..k10, variance_mode) of diffusion_step for the step from t, in float64 on
        the host, with diffusers' formulas (reference.diffusion_step documents k)."""
        c = self.config
        prev_t = t - c.num_train_timesteps // self.num_inference_steps
        a = self._alphas_cumprod[t]
        a_prev = self._alphas_cumprod[prev_t] if prev_t >= 0 else self._final_alpha_cumprod
        b = 1.0 - a
        k0, k1 = x0_coeffs(c.prediction_type, a)
        # eps = k2 * x + k3 * m + k4 * x0 (x0 after clipping / thresholding).
        if use_clipped_model_output:  # eps recomputed from the clipped x0
            k2, k3, k4 = div(1.0, sqrt(b)), 0.0, -div(sqrt(a), sqrt(b))
        elif c.prediction_type == "epsilon":
            k2, k3, k4 = 0.0, 1.0, 0.0
        elif c.prediction_type == "sample":  # from the unclipped prediction, as diffusers
            k2, k3, k4 = div(1.0, sqrt(b)), -div(sqrt(a), sqrt(b)), 0.0
        else:  # v_prediction
            k2, k3, k4 = sqrt(b), sqrt(a), 0.0
        variance = div(1.0 - a_prev, b) * (1.0 - div(a, a_prev))  # DDIM eq. 16
        std = eta * sqrt(variance)
        # prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev - std^2) * eps + std * noise
        k5, k7 = sqrt(a_prev), sqrt(1.0 - a_prev - std ** 2)
        return [k0, k1, k2, k3, k4, k5, 0.0, k7, std, 0.0, 0.0], VARIANCE_SCALAR

    def step(self, model_output: Tensor, timestep, sample: Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False,
             generator: Union[torch.Generator, List[torch.Generator], None] = None,
             variance_noise: Optional[Tensor] = None, return_dict: bool = True, *,
             noise: Optional[Tensor] = None, guidance_scale: Optional[float] = None):
        """x_t -> x_{t-1}: returns SchedulerOutput(prev_sample, pred_original_sample), or the
        tuple with return_dict=False.

        model_output: [B, C, *S]; with guidance_scale, both classifier-free-guidance halves
        [2B, C, *S], unconditional first, combined in the same kernel. With eta > 0 noise is
        drawn like diffusers' from `generator` (every step, also the last), or given as
        variance_noise / noise ([B, C, *S]). Never syncs the device.
        """
        model_output, sample, cfg, g = self._prepare(
            model_output, sample, guidance_scale, False, "DDIMScheduler has no learned variance")
        variance_noise = resolve_noise_alias(variance_noise, noise)
        eta = float(eta)
        index = self._step_index(timestep)
        coeffs, mode = self.coefficients(self._schedule[index], eta, use_clipped_model_output)
        step_noise = None
        if eta > 0:
            step_noise = self._noise(model_output, sample, generator, variance_noise)
        self._next_index = index + 1
        return self._fused(model_output, sample, coeffs, step_noise, mode, cfg, g, return_dict)
