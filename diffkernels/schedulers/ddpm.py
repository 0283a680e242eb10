"""DDPMScheduler (Ho et al. 2020) on the fused diffusion_step op, with diffusers' config keys
and step-for-step diffusers results (diffusers.schedulers.scheduling_ddpm)."""
import warnings
from typing import List, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..reference import VARIANCE_LEARNED, VARIANCE_LEARNED_RANGE, VARIANCE_SCALAR
from ._common import SchedulerBase, SchedulerOutput, resolve_noise_alias
from ._config import register_to_config

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned",
                  "learned_range")
_MODES = {"learned": VARIANCE_LEARNED, "learned_range": VARIANCE_LEARNED_RANGE}

DDPMSchedulerOutput = SchedulerOutput


class DDPMScheduler(SchedulerBase):
    """Ancestral DDPM sampling. Same constructor keys and defaults as diffusers' DDPMScheduler.

    variance_type: fixed_small / fixed_small_log / fixed_large / fixed_large_log (noise std from
    the schedule), learned (model_output's second C channels are the variance), learned_range
    (they interpolate the log variance between the fixed_small and fixed_large values). Note that
    diffusers' fixed_large_log takes the square root of log(beta_t) < 0 and so gives NaN; this
    class does the same (with a warning) so results stay diffusers' results.

    As diffusers', it samples over the full training schedule (num_train_timesteps - 1 .. 0)
    until set_timesteps is called. coefficient_dtype: see SchedulerBase.
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001,
                 beta_end: float = 0.02, beta_schedule: str = "linear",
                 trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
                 variance_type: str = "fixed_small", clip_sample: bool = True,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                 steps_offset: int = 0, rescale_betas_zero_snr: bool = False, *,
                 coefficient_dtype: torch.dtype = torch.float32):
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type: expected one of {VARIANCE_TYPES}, got "
                             f"{variance_type!r} (diffusers accepts any string here and then "
                             f"samples as 'fixed_small' without a word)")
        if variance_type == "fixed_large_log":
            warnings.warn("variance_type='fixed_large_log' follows diffusers, whose noise std is "
                          "sqrt(log(beta_t)) = NaN for every t > 0; use 'fixed_large' for "
                          "std = sqrt(beta_t)", stacklevel=2)
        self.one = torch.tensor(1.0)
        self.variance_type = variance_type
        self._setup(coefficient_dtype)

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

    def _index(self, timestep):
        t, index = self._resolve(timestep)
        if index is None:
            raise self._not_in_schedule(t)
        return t, index

    def previous_timestep(self, timestep):
        """The timestep after `timestep` in the schedule (-1 after the last one). As diffusers:
        an int for an int, a tensor for a tensor (no device read)."""
        if isinstance(timestep, Tensor) and not (self.custom_timesteps or
                                                 self.num_inference_steps):
            return timestep - 1  # diffusers' own arithmetic before set_timesteps
        t, index = self._index(timestep)
        if not isinstance(timestep, Tensor):
            return self._schedule[index + 1] if index + 1 < len(self._schedule) else -1
        return self.timesteps[index + 1] if index + 1 < len(self._schedule) else torch.tensor(-1)

    def _table(self):
        """Coefficients k0..k10 of every schedule step (index i: t_i -> t_{i+1}), computed with
        torch ops on coefficient_dtype tensors in diffusers' order of operations (fp32: its
        roundings exactly)."""
        t = torch.tensor(self._schedule, device="cpu")
        p = torch.tensor(self._schedule[1:] + [-1], device="cpu")
        acp = self._scalars()
        a = acp[t]
        a_prev = torch.where(p >= 0, acp[p.clamp(min=0)], self.one.to("cpu", acp.dtype))
        b, b_prev = 1 - a, 1 - a_prev
        current_alpha = a / a_prev
        current_beta = 1 - current_alpha
        k0, k1 = self._x0_coeffs(self.config.prediction_type, a, b)
        # Posterior mean (DDPM eq. 7): k5 * x0 + k6 * x_t.
        k5 = (a_prev ** 0.5 * current_beta) / b
        k6 = current_alpha ** 0.5 * b_prev / b
        variance = torch.clamp((1 - a_prev) / (1 - a) * current_beta, min=1e-20)
        zero = torch.zeros_like(a)
        k8 = k9 = k10 = zero
        vt = self.variance_type
        if vt == "fixed_small":
            k8 = variance ** 0.5
        elif vt == "fixed_small_log":
            k8 = torch.exp(0.5 * torch.log(variance))
        elif vt == "fixed_large":
            k8 = current_beta ** 0.5
        elif vt == "fixed_large_log":
            k8 = torch.log(current_beta) ** 0.5  # diffusers' quirk: sqrt of a negative log = NaN
        elif vt == "learned_range":  # std = exp(0.5 * (min_log + (v + 1) / 2 * (max - min)))
            min_log, max_log = torch.log(variance), torch.log(current_beta)
            k9, k10 = 0.25 * (min_log + max_log), 0.25 * (max_log - min_log)
        k = torch.stack([k0, k1, zero, zero, zero, k5, k6, zero, k8, k9, k10], dim=1)
        return k.double().numpy().tolist()  # host tensors: no device involved

    def _rows(self):
        rows = self._coeff_cache.get("rows")
        if rows is None:
            rows = self._coeff_cache["rows"] = self._table()
        return rows

    def coefficients(self, t: int, prev_t: Optional[int] = None):
        """(coeffs k0..k10, variance_mode) of diffusion_step for the step from t (a schedule
        timestep) to the next (reference.diffusion_step documents k)."""
        t, index = self._index(t)
        if prev_t is not None and prev_t != self.previous_timestep(t):
            raise ValueError(f"prev_t: the step from {t} goes to {self.previous_timestep(t)} in "
                             f"this schedule, got {prev_t}")
        return self._rows()[index], _MODES.get(self.variance_type, VARIANCE_SCALAR)

    def _plan_rows(self):
        return (self._rows(), _MODES.get(self.variance_type, VARIANCE_SCALAR),
                [t > 0 for t in self._schedule])  # diffusers adds no noise at t == 0

    def _get_variance(self, t, predicted_variance=None, variance_type=None):
        """diffusers' DDPMScheduler._get_variance (fp32 tensors), for code that calls it."""
        prev_t = self.previous_timestep(t)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        current_beta_t = 1 - alpha_prod_t / alpha_prod_t_prev
        variance = torch.clamp((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t,
                               min=1e-20)
        variance_type = variance_type or self.variance_type
        if variance_type == "fixed_small_log":
            return torch.exp(0.5 * torch.log(variance))
        if variance_type == "fixed_large":
            return current_beta_t
        if variance_type == "fixed_large_log":
            return torch.log(current_beta_t)
        if variance_type == "learned":
            return predicted_variance
        if variance_type == "learned_range":
            frac = (predicted_variance + 1) / 2
            return frac * torch.log(current_beta_t) + (1 - frac) * torch.log(variance)
        return variance

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
        learned = self.variance_type in _MODES
        model_output, sample, cfg, g = self._prepare(
            model_output, sample, guidance_scale, learned,
            f"variance_type={self.variance_type!r} is not learned")
        if noise is not None or variance_noise is not None:
            variance_noise = resolve_noise_alias(variance_noise, noise)
        t, index = self._index(timestep)
        rows = self._coeff_cache.get("rows") or self._rows()
        step_noise = None
        if t > 0:  # diffusers adds no noise at t == 0 (decided on the host)
            step_noise = self._noise(model_output, sample, generator, variance_noise)
        elif generator is not None and variance_noise is not None:
            raise ValueError("Cannot pass both generator and variance_noise: one of them must "
                             "be None")
        self._next_index = index + 1
        return self._fused(model_output, sample, rows[index], step_noise,
                           _MODES.get(self.variance_type, VARIANCE_SCALAR), cfg, g, return_dict)
