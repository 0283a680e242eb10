"""DDIMScheduler (Song et al. 2020) on the fused diffusion_step op, with diffusers' config keys
and step-for-step diffusers results (diffusers.schedulers.scheduling_ddim)."""
from typing import List, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..reference import VARIANCE_SCALAR
from ._common import SchedulerBase, SchedulerOutput, resolve_noise_alias
from ._config import register_to_config

DDIMSchedulerOutput = SchedulerOutput


class DDIMScheduler(SchedulerBase):
    """Denoising diffusion implicit models. Same constructor keys and defaults as diffusers'
    DDIMScheduler; eta and use_clipped_model_output are step arguments.

    As in diffusers, the step from t goes to t - num_train_timesteps // num_inference_steps
    whatever the timestep_spacing (for "trailing"/"linspace" that need not be the next
    scheduled timestep), and below 0 it goes to final_alpha_cumprod (1 with set_alpha_to_one);
    t need not be in the schedule (img2img-style code steps from its own t).
    coefficient_dtype: see SchedulerBase.
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001,
                 beta_end: float = 0.02, beta_schedule: str = "linear",
                 trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
                 clip_sample: bool = True, set_alpha_to_one: bool = True, steps_offset: int = 0,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                 rescale_betas_zero_snr: bool = False, *,
                 coefficient_dtype: torch.dtype = torch.float32):
        self._setup(coefficient_dtype)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int,
                      device: Union[str, torch.device, None] = None):
        """The sampling schedule, spaced by config.timestep_spacing, on `device` (the host keeps
        its own copy)."""
        spaced = self._spaced(num_inference_steps)
        self.num_inference_steps = int(num_inference_steps)
        self._set_schedule(spaced, device)

    def _table(self, ts, eta, use_clipped_model_output):
        """Coefficients k0..k10 of the steps from each t in `ts`, computed with torch ops on
        coefficient_dtype tensors in diffusers' order of operations (fp32: its roundings)."""
        c = self.config
        t = torch.tensor(ts, device="cpu")
        p = t - c.num_train_timesteps // self.num_inference_steps
        acp = self._scalars()
        final = self.final_alpha_cumprod.to("cpu", acp.dtype)
        a = acp[t]
        a_prev = torch.where(p >= 0, acp[p.clamp(min=0)], final)
        b = 1 - a
        k0, k1 = self._x0_coeffs(c.prediction_type, a, b)
        zero = torch.zeros_like(a)
        # eps = k2 * x + k3 * m + k4 * x0 (x0 after clipping / thresholding).
        k2 = k3 = k4 = zero
        if use_clipped_model_output:  # eps recomputed from the clipped x0
            k2, k4 = 1 / b ** 0.5, -(a ** 0.5) / b ** 0.5
        elif c.prediction_type == "epsilon":
            k3 = torch.ones_like(a)
        elif c.prediction_type == "sample":  # from the unclipped prediction, as diffusers
            k2, k3 = 1 / b ** 0.5, -(a ** 0.5) / b ** 0.5
        else:  # v_prediction
            k2, k3 = b ** 0.5, a ** 0.5
        variance = ((1 - a_prev) / b) * (1 - a / a_prev)  # DDIM eq. 16
        std = eta * variance ** 0.5
        # prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev - std^2) * eps + std * noise
        k5, k7 = a_prev ** 0.5, (1 - a_prev - std ** 2) ** 0.5
        k = torch.stack([k0, k1, k2, k3, k4, k5, zero, k7, std, zero, zero], dim=1)
        return k.double().numpy().tolist()  # host tensors: no device involved

    def _coeffs(self, t, eta, use_clipped):
        """Cached per (t, eta, use_clipped): a miss fills the whole schedule (and t) at once."""
        key = (t, eta, use_clipped)
        row = self._coeff_cache.get(key)
        if row is None:
            if not 0 <= t < self.config.num_train_timesteps:
                raise ValueError(f"timestep: expected 0 <= t < num_train_timesteps="
                                 f"{self.config.num_train_timesteps}, got {t}")
            ts = self._schedule if t in self._index_of else self._schedule + [t]
            for s, r in zip(ts, self._table(ts, eta, use_clipped)):
                self._coeff_cache[(s, eta, use_clipped)] = r
            row = self._coeff_cache[key]
        return row

    def _ready(self):
        if self.num_inference_steps is None:
            raise ValueError("DDIMScheduler.step: call set_timesteps(num_inference_steps) first "
                             "(the step size is num_train_timesteps // num_inference_steps)")

    def coefficients(self, t: int, eta: float = 0.0, use_clipped_model_output: bool = False):
        """(coeffs k0..k10, variance_mode) of diffusion_step for the step from t
        (reference.diffusion_step documents k)."""
        self._ready()
        t, _ = self._resolve(t)
        return self._coeffs(t, float(eta), bool(use_clipped_model_output)), VARIANCE_SCALAR

    def _plan_rows(self, eta: float = 0.0, use_clipped_model_output: bool = False):
        eta = float(eta)
        rows = [self._coeffs(t, eta, bool(use_clipped_model_output)) for t in self._schedule]
        return rows, VARIANCE_SCALAR, [eta > 0] * len(rows)

    def _get_variance(self, timestep, prev_timestep):
        """diffusers' DDIMScheduler._get_variance (fp32 tensors), for code that calls it."""
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = (self.alphas_cumprod[prev_timestep] if prev_timestep >= 0
                             else self.final_alpha_cumprod)
        beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
        return (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)

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
        if self.num_inference_steps is None:
            self._ready()
        model_output, sample, cfg, g = self._prepare(
            model_output, sample, guidance_scale, False, "DDIMScheduler has no learned variance")
        if noise is not None:
            variance_noise = resolve_noise_alias(variance_noise, noise)
        t, index = self._resolve(timestep)
        if type(eta) is not float:
            eta = float(eta)
        row = self._coeff_cache.get((t, eta, use_clipped_model_output))
        if row is None:
            row = self._coeffs(t, eta, bool(use_clipped_model_output))
        step_noise = None
        if eta > 0:
            step_noise = self._noise(model_output, sample, generator, variance_noise)
        if index is not None:
            self._next_index = index + 1
        return self._fused(model_output, sample, row, step_noise, VARIANCE_SCALAR, cfg, g,
                           return_dict)
