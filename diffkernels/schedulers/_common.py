"""What DDPMScheduler and DDIMScheduler share: diffusers-compatible config handling, beta
schedules, timestep spacing, host-side timestep lookup, diffusers-exact noise, and the call into
the fused diffusion_step op.

No step syncs the device: the schedule and alphas_cumprod live on the host (Python floats), a
timestep tensor is never read on the device, and the noise is drawn exactly as diffusers'
randn_tensor draws it (CPU generator: on the CPU, then an asynchronous copy)."""
import json
import math

from typing import List, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..ops.diffusion_step import check_args, diffusion_step, dynamic_threshold
from ._config import ConfigMixin, SchedulerOutput

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# ---------------------------------------------------------------- betas and timesteps

def make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
               rescale_betas_zero_snr) -> Tensor:
    """fp32 betas computed with the same torch ops as diffusers (bit-identical alphas_cumprod)."""
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32)
        if betas.dim() != 1 or len(betas) != num_train_timesteps:
            raise ValueError(f"trained_betas: expected {num_train_timesteps} values "
                             f"(num_train_timesteps), got shape {list(betas.shape)}. diffusers "
                             f"accepts this and silently builds a {betas.numel()}-step schedule "
                             f"that disagrees with num_train_timesteps (set_timesteps and add_noise "
                             f"then index past its end); pass "
                             f"num_train_timesteps={betas.numel()}")
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":  # the latent-diffusion schedule
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps,
                               dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":  # Glide cosine schedule
        betas = _betas_for_cosine_alpha_bar(num_train_timesteps)
    else:
        raise ValueError(f"beta_schedule: expected one of {BETA_SCHEDULES} (or trained_betas), "
                         f"got {beta_schedule!r}")
    if rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def _betas_for_cosine_alpha_bar(n, max_beta=0.999):
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta)
                         for i in range(n)], dtype=torch.float32)


def _rescale_zero_terminal_snr(betas):
    """Zero terminal SNR (arXiv 2305.08891, Algorithm 1), in diffusers' op order."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt ** 2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def spaced_timesteps(num_train_timesteps, n, spacing, steps_offset) -> np.ndarray:
    """The descending int64 schedule of diffusers' set_timesteps for each timestep_spacing."""
    if spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, n).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = num_train_timesteps // n
        return (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64) + steps_offset
    ratio = num_train_timesteps / n  # trailing
    return np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1


# ---------------------------------------------------------------- noise

def randn_tensor(shape, generator, device, dtype) -> Tensor:
    """diffusers.utils.torch_utils.randn_tensor, value for value: a CPU generator draws on the
    CPU (then the tensor moves, through pinned memory so the copy does not sync), a list of
    generators draws one sample each. generator=None draws on `device` from the global RNG."""
    device = torch.device(device)
    rand_device = device
    if generator is not None:
        gens = generator if isinstance(generator, (list, tuple)) else [generator]
        if len(gens) == 0 or not all(isinstance(g, torch.Generator) for g in gens):
            raise TypeError("generator: expected a torch.Generator or a list of them")
        gen_type = gens[0].device.type
        if gen_type != device.type and gen_type == "cpu":
            rand_device = torch.device("cpu")
        elif gen_type != device.type:
            raise ValueError(f"generator: cannot draw a {device} tensor from a {gen_type} "
                             f"generator")
        if isinstance(generator, (list, tuple)):
            if len(generator) == 1:
                generator = generator[0]
            elif len(generator) < shape[0]:
                raise ValueError(f"generator: a list of generators needs one per sample: got "
                                 f"{len(generator)} for batch {shape[0]}")
    if isinstance(generator, (list, tuple)):
        one = (1,) + tuple(shape[1:])
        noise = torch.cat([torch.randn(one, generator=generator[i], device=rand_device,
                                       dtype=dtype) for i in range(shape[0])], dim=0)
    else:
        noise = torch.randn(tuple(shape), generator=generator, device=rand_device, dtype=dtype)
    if noise.device != device:
        if device.type == "cuda":
            noise = noise.pin_memory()  # a non_blocking copy from pinned memory does not sync
        noise = noise.to(device, non_blocking=True)
    return noise


# ---------------------------------------------------------------- the base class

# diffusers' KarrasDiffusionSchedulers: the family whose configs interchange with DDPM/DDIM.
KARRAS_SCHEDULERS = [
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler",
    "EulerDiscreteScheduler", "HeunDiscreteScheduler", "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler",
    "DPMSolverSDEScheduler", "EDMEulerScheduler"]
COEFFICIENT_DTYPES = (torch.float32, torch.float64)


class SchedulerBase(ConfigMixin):
    """Config handling, timesteps, add_noise and the fused step call; subclasses define
    __init__ (their diffusers config keys, under @register_to_config), the coefficient table
    and step.

    coefficient_dtype (keyword, not part of the config): the dtype of the per-step scalar
    math. torch.float32 (default) rounds every scalar op as diffusers does (its 0-d fp32
    tensors), so results equal diffusers' to fp32 rounding of the elementwise math also where
    fp32 scalars lose digits (DDPM's last step: 1 - acp[1] / acp[0]; DDIM at eta = 1 near T);
    torch.float64 computes the same formulas in float64 from the same fp32 alphas_cumprod (more
    accurate, no longer diffusers' numbers)."""

    order = 1
    init_noise_sigma = 1.0
    _output = SchedulerOutput
    _compatibles = KARRAS_SCHEDULERS
    ignore_for_config = ["coefficient_dtype"]

    def _setup(self, coefficient_dtype):
        c = self.config
        if c.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type: expected one of {PREDICTION_TYPES}, got "
                             f"{c.prediction_type!r}")
        if c.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing: expected one of {TIMESTEP_SPACINGS}, got "
                             f"{c.timestep_spacing!r}")
        if c.clip_sample and not c.thresholding and not c.clip_sample_range > 0:
            raise ValueError(f"clip_sample_range: expected > 0 with clip_sample=True, got "
                             f"{c.clip_sample_range}")
        if c.thresholding and not 0.0 <= c.dynamic_thresholding_ratio <= 1.0:
            raise ValueError(f"dynamic_thresholding_ratio: expected a quantile in [0, 1], got "
                             f"{c.dynamic_thresholding_ratio}")
        if int(c.num_train_timesteps) != c.num_train_timesteps or c.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps: expected a positive int, got "
                             f"{c.num_train_timesteps!r}")
        self.betas = make_betas(c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule,
                                c.trained_betas, c.rescale_betas_zero_snr)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self._alphas_cumprod = self.alphas_cumprod.double().tolist()  # host copy (fp32 values)
        self._acp_cache = {}
        self._checked = None
        # diffusers: thresholding wins over clip_sample. Read once (config access costs host time)
        self._x0_limits = (bool(c.thresholding), float(c.dynamic_thresholding_ratio),
                           float(c.sample_max_value),
                           float(c.clip_sample_range) if c.clip_sample and not c.thresholding
                           else 0.0)
        self.coefficient_dtype = coefficient_dtype
        self.num_inference_steps = None
        self.custom_timesteps = False
        self._set_schedule(np.arange(0, c.num_train_timesteps)[::-1].copy().astype(np.int64),
                           None)

    @property
    def coefficient_dtype(self) -> torch.dtype:
        return self._coefficient_dtype

    @coefficient_dtype.setter
    def coefficient_dtype(self, dtype):
        if dtype not in COEFFICIENT_DTYPES:
            raise ValueError(f"coefficient_dtype: expected torch.float32 (diffusers' rounding) or "
                             f"torch.float64, got {dtype!r}")
        self._coefficient_dtype = dtype
        self._coeff_cache = {}

    def __len__(self):
        return self.config.num_train_timesteps

    def __repr__(self):
        return f"{type(self).__name__}({json.dumps(dict(self.config), default=str)})"

    def scale_model_input(self, sample: Tensor, timestep=None) -> Tensor:
        return sample

    # -------------------------------------------------------------- timesteps

    def _spaced(self, num_inference_steps):
        c = self.config
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps,
                                                                    (int, np.integer)):
            raise TypeError(f"num_inference_steps: expected an int, got {num_inference_steps!r}")
        if not 1 <= num_inference_steps <= c.num_train_timesteps:
            raise ValueError(f"num_inference_steps: expected 1..{c.num_train_timesteps} "
                             f"(num_train_timesteps), got {num_inference_steps}")
        return spaced_timesteps(c.num_train_timesteps, int(num_inference_steps),
                                c.timestep_spacing, c.steps_offset)

    def _set_schedule(self, timesteps: np.ndarray, device):
        self._schedule = [int(t) for t in timesteps]
        bad = [t for t in self._schedule if not 0 <= t < self.config.num_train_timesteps]
        if bad:
            raise ValueError(f"timesteps: {bad} fall outside [0, {self.config.num_train_timesteps})"
                             f" (num_train_timesteps; check steps_offset)")
        self._index_of = {t: i for i, t in enumerate(self._schedule)}
        self.timesteps = torch.from_numpy(np.asarray(timesteps, dtype=np.int64)).to(device)
        # Where the schedule's elements live: `for t in scheduler.timesteps` hands over views
        # whose data_ptr gives the index (no device read).
        self._ts_ptr = self.timesteps.data_ptr() if self.timesteps.device.type != "meta" else -1
        self._ts_end = self._ts_ptr + 8 * len(self._schedule)
        self._next_index = 0
        self._pending_checks = []
        self._coeff_cache = {}

    def _resolve(self, timestep):
        """(t, index in the schedule or None) for `timestep`, found on the host without reading
        a device tensor: an int or a CPU tensor by value; a tensor that is an element of
        self.timesteps (`for t in scheduler.timesteps`) by its address; any other device tensor
        is taken to be the next step, checked asynchronously (a later step raises)."""
        if self._pending_checks:
            self._run_pending_checks()
        if type(timestep) is int:  # the fast paths first
            return timestep, self._index_of.get(timestep)
        if isinstance(timestep, Tensor) and timestep.dim() == 0 \
                and timestep.dtype == torch.int64:
            ptr = timestep.data_ptr()
            if self._ts_ptr <= ptr < self._ts_end and self._ts_ptr > 0:
                index = (ptr - self._ts_ptr) >> 3
                return self._schedule[index], index
        if isinstance(timestep, Tensor):
            if timestep.dim() and timestep.numel() != 1 and any(s != 0 for s in timestep.stride()):
                raise ValueError(f"timestep: expected one timestep for the whole batch, got shape "
                                 f"{list(timestep.shape)}")
            if timestep.is_floating_point() or timestep.is_complex() or \
                    timestep.dtype == torch.bool:
                raise TypeError(f"timestep: expected an integer tensor, got {timestep.dtype}")
            if timestep.is_cpu:  # host memory: read it (no sync)
                timestep = int(timestep.reshape(-1)[0]) if timestep.dim() else int(timestep)
            else:
                index = self._view_index(timestep)
                if index is not None:
                    return self._schedule[index], index
                n = len(self._schedule)
                if self._next_index >= n:
                    raise ValueError(f"timestep: a {timestep.device} tensor that is not an element "
                                     f"of scheduler.timesteps is taken as the next step, but all "
                                     f"{n} steps are done; call set_timesteps again, or pass ints")
                self._check_later(timestep, self._next_index)
                return self._schedule[self._next_index], self._next_index
        if isinstance(timestep, float) and timestep.is_integer():
            timestep = int(timestep)
        if isinstance(timestep, bool) or not isinstance(timestep, (int, np.integer)):
            raise TypeError(f"timestep: expected an int or an integer tensor, got {timestep!r}")
        timestep = int(timestep)
        return timestep, self._index_of.get(timestep)

    def _not_in_schedule(self, t):
        n = len(self._schedule)
        shown = self._schedule if n <= 12 else self._schedule[:6] + ["..."] + self._schedule[-3:]
        return ValueError(f"timestep: {t} is not in the schedule set by set_timesteps ({n} steps: "
                          f"{shown}; num_train_timesteps={self.config.num_train_timesteps})")

    def _view_index(self, timestep):
        ts = self.timesteps
        if (timestep.device != ts.device or timestep.dtype != ts.dtype
                or timestep.untyped_storage().data_ptr() != ts.untyped_storage().data_ptr()):
            return None
        index = timestep.storage_offset() - ts.storage_offset()
        return index if 0 <= index < len(self._schedule) else None

    def _check_later(self, timestep, index):
        """Copy the device timestep to pinned host memory without waiting; a later step (once
        the copy has landed) compares it with the schedule and raises on a mismatch."""
        if timestep.device.type != "cuda":
            return  # e.g. meta tensors in tests: nothing to read
        host = torch.empty((), dtype=torch.int64, pin_memory=True)
        host.copy_(timestep.reshape(-1)[0], non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending_checks.append((host, event, index))

    def _run_pending_checks(self):
        still = []
        for host, event, index in self._pending_checks:
            if not event.query():
                still.append((host, event, index))
            elif int(host) != self._schedule[index]:
                self._pending_checks = []
                raise ValueError(f"timestep: step {index} was given timestep {int(host)}, but "
                                 f"step {index} of the schedule is {self._schedule[index]} (a "
                                 f"device tensor that is not an element of scheduler.timesteps "
                                 f"is taken as the next step); pass scheduler.timesteps elements "
                                 f"or ints")
        self._pending_checks = still

    def _scalars(self):
        """The fp32 tensors the coefficient formulas start from, in coefficient_dtype."""
        return self.alphas_cumprod.to("cpu", self._coefficient_dtype)  # host math only

    @staticmethod
    def _x0_coeffs(prediction_type, a, b):
        """(k0, k1) tensors with x0 = k0 * sample + k1 * model_output (diffusers' op order for
        the scalars: sqrt(b) and sqrt(a) first)."""
        if prediction_type == "epsilon":
            return 1 / a ** 0.5, -(b ** 0.5) / a ** 0.5
        if prediction_type == "v_prediction":
            return a ** 0.5, -(b ** 0.5)
        return torch.zeros_like(a), torch.ones_like(a)

    def sampling_plan(self, **step_kwargs) -> "SamplingPlan":
        """Every step of the current schedule at once, for a sampling loop captured in a CUDA
        graph: the fused step's coefficient rows, variance mode and clip range, and which
        steps add noise. step_kwargs: the step arguments that change the coefficients (DDIM:
        eta). Dynamic thresholding needs the sample's quantile on the host side of the math:
        it raises here."""
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}.sampling_plan: call set_timesteps first")
        thresholding, _, _, clip_range = self._x0_limits
        if thresholding:
            raise ValueError("thresholding: dynamic thresholding is not supported in a captured "
                             "sampling loop (cuda_graph=True); turn it off or sample without "
                             "the graph")
        rows, variance_mode, noisy = self._plan_rows(**step_kwargs)
        return SamplingPlan(list(self._schedule), rows, variance_mode, clip_range, noisy)

    # -------------------------------------------------------------- forward process

    def _acp(self, device, dtype):
        key = (device, dtype)
        if key not in self._acp_cache:
            self._acp_cache[key] = self.alphas_cumprod.to(device=device).to(dtype=dtype)
        return self._acp_cache[key]

    def _gather(self, like: Tensor, timesteps):
        if not isinstance(timesteps, Tensor):
            timesteps = torch.as_tensor(timesteps)
        if timesteps.device.type == "cpu" and timesteps.numel():  # host memory: check for free
            lo, hi = int(timesteps.min()), int(timesteps.max())
            if lo < 0 or hi >= self.config.num_train_timesteps:
                raise ValueError(f"timesteps: expected values in [0, "
                                 f"{self.config.num_train_timesteps}), got {lo}..{hi}")
        acp = self._acp(like.device, like.dtype)[timesteps.to(like.device)]
        shape = (-1,) + (1,) * (like.dim() - 1)
        return (acp ** 0.5).flatten().reshape(shape), ((1 - acp) ** 0.5).flatten().reshape(shape)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps) -> Tensor:
        """sqrt(acp[t]) * x0 + sqrt(1 - acp[t]) * noise, per sample (diffusers' op order)."""
        sqrt_alpha, sqrt_one_minus_alpha = self._gather(original_samples, timesteps)
        return sqrt_alpha * original_samples + sqrt_one_minus_alpha * noise

    def get_velocity(self, sample: Tensor, noise: Tensor, timesteps) -> Tensor:
        """The v-prediction target sqrt(acp[t]) * noise - sqrt(1 - acp[t]) * sample."""
        sqrt_alpha, sqrt_one_minus_alpha = self._gather(sample, timesteps)
        return sqrt_alpha * noise - sqrt_one_minus_alpha * sample

    # -------------------------------------------------------------- the fused step

    def _prepare(self, model_output, sample, guidance_scale, learned: bool, where: str):
        """Checks shapes before any noise is drawn; returns (model_output, sample, cfg, g) in
        their common dtype. A call shaped like the last one skips the checks (host cost)."""
        cfg = guidance_scale is not None
        if cfg and isinstance(guidance_scale, Tensor) and guidance_scale.device.type != "cpu":
            raise TypeError("guidance_scale: expected a Python float (reading a "
                            f"{guidance_scale.device} tensor would sync the device)")
        if type(model_output) is not Tensor or type(sample) is not Tensor:
            for name, t in (("model_output", model_output), ("sample", sample)):
                if not isinstance(t, Tensor):
                    raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        key = (model_output.shape, sample.shape, model_output.dtype, sample.dtype,
               model_output.device, sample.device, cfg, learned)
        if key != self._checked:
            self._check_shapes(model_output, sample, cfg, learned, where)
            self._checked = key
        if model_output.dtype != sample.dtype:
            dtype = torch.promote_types(model_output.dtype, sample.dtype)
            model_output, sample = model_output.to(dtype), sample.to(dtype)
        return model_output, sample, cfg, (1.0 if not cfg else float(guidance_scale))

    def _check_shapes(self, model_output, sample, cfg, learned, where):
        if sample.dim() >= 2 and model_output.dim() == sample.dim() and not learned \
                and model_output.shape[1] == 2 * sample.shape[1] != 0:
            raise ValueError(f"model_output: has 2C = {model_output.shape[1]} channels (a learned "
                             f"variance) but {where}; expected {sample.shape[1]} channels")
        if sample.dim() >= 2 and model_output.dim() == sample.dim() and learned \
                and model_output.shape[1] != 2 * sample.shape[1]:
            raise ValueError(f"model_output: variance_type={self.config.variance_type!r} needs "
                             f"2C = {2 * sample.shape[1]} channels (mean and variance), got "
                             f"{model_output.shape[1]}")
        dtype = torch.promote_types(model_output.dtype, sample.dtype)
        mode = 1 if learned else 0  # validation only: the right mode is chosen later
        check_args(model_output.to(dtype), sample.to(dtype), None, None, [0.0] * 11, mode, 0.0,
                   cfg)

    def _noise(self, model_output, sample, generator, variance_noise):
        """Noise of shape sample.shape (diffusers: the model output after the CFG combine and
        the variance split), drawn in the model output's dtype on its device."""
        if variance_noise is not None:
            if generator is not None:
                raise ValueError("Cannot pass both generator and variance_noise: one of them "
                                 "must be None")
            if tuple(variance_noise.shape) != tuple(sample.shape):
                raise ValueError(f"variance_noise: expected shape {list(sample.shape)}, got "
                                 f"{list(variance_noise.shape)}")
            return variance_noise.to(device=sample.device, dtype=sample.dtype)
        noise = randn_tensor(sample.shape, generator, model_output.device, model_output.dtype)
        return noise.to(sample.dtype)

    def _fused(self, model_output, sample, coeffs, noise, variance_mode, cfg, g, return_dict):
        thresholding, ratio, max_value, clip_range = self._x0_limits
        threshold = None
        if thresholding:
            threshold = dynamic_threshold(model_output, sample, coeffs, ratio, max_value,
                                          guidance_scale=g, cfg=cfg)
        prev, x0 = diffusion_step(model_output, sample, coeffs, noise=noise, threshold=threshold,
                                  variance_mode=variance_mode, clip_range=clip_range,
                                  guidance_scale=g, cfg=cfg)
        if not return_dict:
            return prev, x0
        return self._output(prev, x0)


class SamplingPlan(NamedTuple):
    """SchedulerBase.sampling_plan: per step i, timesteps[i], coeffs[i] (11 floats) and
    noise_steps[i] (whether step i adds variance_mode noise)."""
    timesteps: List[int]
    coeffs: List[List[float]]
    variance_mode: int
    clip_range: float
    noise_steps: List[bool]


def resolve_noise_alias(variance_noise, noise):
    if variance_noise is not None and noise is not None:
        raise ValueError("variance_noise and noise are the same argument: pass one")
    return noise if variance_noise is None else variance_noise
