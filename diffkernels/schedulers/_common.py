"""What DDPMScheduler and DDIMScheduler share: diffusers-compatible config handling, beta
schedules, timestep spacing, host-side timestep lookup, diffusers-exact noise, and the call into
the fused diffusion_step op.

No step syncs the device: the schedule and alphas_cumprod live on the host (Python floats), a
timestep tensor is never read on the device, and the noise is drawn exactly as diffusers'
randn_tensor draws it (CPU generator: on the CPU, then an asynchronous copy)."""
import inspect
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..ops.diffusion_step import check_args, diffusion_step, dynamic_threshold

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# Init keys of the other diffusers schedulers a scheduler_config.json may come from (SD ships a
# PNDMScheduler config, others Euler/DPM-Solver/...): ignored silently, as diffusers ignores the
# keys of "compatible" schedulers. Anything else unknown is ignored with a warning.
_OTHER_SCHEDULER_KEYS = frozenset((
    "algorithm_type", "clip_sample", "clip_sample_range", "disable_corrector",
    "dynamic_thresholding_ratio", "euler_at_final", "final_sigmas_type", "flow_shift",
    "interpolation_type", "lambda_min_clipped", "lower_order_final", "predict_x0", "rho",
    "sample_max_value", "set_alpha_to_one", "shift_terminal", "sigma_data", "sigma_max",
    "sigma_min", "sigma_schedule", "skip_prk_steps", "solver_order", "solver_p", "solver_type",
    "steps_offset", "thresholding", "time_shift_type", "timestep_spacing", "timestep_type",
    "use_beta_sigmas", "use_dynamic_shifting", "use_exponential_sigmas", "use_flow_sigmas",
    "use_karras_sigmas", "use_lu_lambdas", "variance_type"))


class SchedulerConfig(dict):
    """A read-only dict with attribute access (`config.num_train_timesteps`), like diffusers'
    FrozenDict."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def _readonly(self, *args, **kwargs):
        raise TypeError("scheduler config is read-only: build a new scheduler with "
                        "from_config(config, key=value)")

    __setitem__ = __delitem__ = __setattr__ = update = pop = setdefault = clear = _readonly

    def __reduce__(self):  # copy / deepcopy / pickle without going through __setitem__
        return (SchedulerConfig, (dict(self),))


@dataclass
class SchedulerOutput:
    """prev_sample: x_{t-1}, the next model input; pred_original_sample: the predicted x0."""
    prev_sample: Tensor
    pred_original_sample: Optional[Tensor] = None

    def to_tuple(self):
        return (self.prev_sample, self.pred_original_sample)

    def __getitem__(self, k):  # out[0] / out["prev_sample"], as with diffusers' BaseOutput
        return getattr(self, k) if isinstance(k, str) else self.to_tuple()[k]


# ---------------------------------------------------------------- betas and timesteps

def make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
               rescale_betas_zero_snr) -> Tensor:
    """fp32 betas computed with the same torch ops as diffusers (bit-identical alphas_cumprod)."""
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32)
        if betas.dim() != 1 or len(betas) != num_train_timesteps:
            raise ValueError(f"trained_betas: expected {num_train_timesteps} values "
                             f"(num_train_timesteps), got shape {list(betas.shape)}")
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


# ---------------------------------------------------------------- host-side scalar math
# Float semantics as torch's (x/0 = inf, sqrt(<0) = nan) instead of Python exceptions, so a
# degenerate schedule gives diffusers' inf/nan rather than a crash.

def div(a, b):
    if b != 0:
        return a / b
    return math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a)


def sqrt(v):
    return math.sqrt(v) if v >= 0 else math.nan


def log(v):
    return math.log(v) if v > 0 else (-math.inf if v == 0 else math.nan)


def x0_coeffs(prediction_type, alpha_prod_t):
    """(k0, k1) with x0 = k0 * sample + k1 * model_output."""
    a, b = alpha_prod_t, 1.0 - alpha_prod_t
    if prediction_type == "epsilon":
        return div(1.0, sqrt(a)), -div(sqrt(b), sqrt(a))
    if prediction_type == "v_prediction":
        return sqrt(a), -sqrt(b)
    return 0.0, 1.0  # "sample"


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

class SchedulerBase:
    """Config handling, timesteps, add_noise and the fused step call; subclasses define
    __init__ (their diffusers config keys) and step."""

    order = 1
    init_noise_sigma = 1.0

    def _setup(self, config: dict):
        config = {k: v for k, v in config.items() if k not in ("self", "__class__")}
        if isinstance(config.get("trained_betas"), (np.ndarray, Tensor)):
            config["trained_betas"] = [float(b) for b in config["trained_betas"]]
        self._config = SchedulerConfig(config)
        c = self._config
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
        # The host copy every step reads (fp32 values, then float64 arithmetic).
        self._alphas_cumprod = self.alphas_cumprod.double().tolist()
        self._acp_cache = {}
        self.num_inference_steps = None
        self.custom_timesteps = False
        self._set_schedule(np.arange(0, c.num_train_timesteps)[::-1].copy().astype(np.int64),
                           None)
        self._ready = False  # step() needs set_timesteps()

    @property
    def config(self) -> SchedulerConfig:
        return self._config

    @classmethod
    def from_config(cls, config=None, **kwargs):
        """Build from a diffusers scheduler_config.json dict (or a scheduler's .config, or a
        scheduler); kwargs override it. Keys starting with "_" and keys of other diffusers
        schedulers are ignored silently, any other unknown key with a warning."""
        if config is not None and not isinstance(config, dict):
            config = getattr(config, "config", config)
        if config is not None and not isinstance(config, dict):
            raise TypeError(f"config: expected a dict (a scheduler_config.json), got "
                            f"{type(config).__name__}")
        merged = {**(config or {}), **kwargs}
        keys = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(k for k in merged if k not in keys and not k.startswith("_")
                         and k not in _OTHER_SCHEDULER_KEYS)
        if unknown:
            warnings.warn(f"The config attributes {unknown} were passed to {cls.__name__}, but "
                          f"are not expected and will be ignored.", stacklevel=2)
        return cls(**{k: v for k, v in merged.items() if k in keys})

    @classmethod
    def from_pretrained(cls, path, subfolder=None, **kwargs):
        """Read scheduler_config.json from a local diffusers folder (path[/subfolder])."""
        folder = os.path.join(path, subfolder) if subfolder else path
        with open(os.path.join(folder, "scheduler_config.json")) as f:
            return cls.from_config(json.load(f), **kwargs)

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
        self._next_index = 0
        self._pending_checks = []
        self._ready = True

    def _step_index(self, timestep) -> int:
        """The index of `timestep` in the schedule, found on the host without reading a device
        tensor: an int or a CPU tensor by value; a device tensor that is an element of
        self.timesteps (`for t in scheduler.timesteps`) by its storage offset; any other device
        tensor is taken to be the next step, checked asynchronously (a later step raises)."""
        if not self._ready:
            raise ValueError(f"{type(self).__name__}.step: call set_timesteps(num_inference_steps) "
                             f"first")
        self._run_pending_checks()
        n = len(self._schedule)
        if isinstance(timestep, Tensor):
            if timestep.numel() != 1 and any(s != 0 for s in timestep.stride()):
                raise ValueError(f"timestep: expected one timestep for the whole batch, got shape "
                                 f"{list(timestep.shape)}")
            if timestep.is_floating_point() or timestep.is_complex() or \
                    timestep.dtype == torch.bool:
                raise TypeError(f"timestep: expected an integer tensor, got {timestep.dtype}")
            index = self._view_index(timestep)
            if index is not None:
                return index
            if timestep.device.type != "cpu":
                if self._next_index >= n:
                    raise ValueError(f"timestep: a {timestep.device} tensor that is not an element "
                                     f"of scheduler.timesteps is taken as the next step, but all "
                                     f"{n} steps are done; call set_timesteps again, or pass ints")
                self._check_later(timestep, self._next_index)
                return self._next_index
            timestep = int(timestep.reshape(-1)[0])  # host memory: no sync
        if isinstance(timestep, float) and timestep.is_integer():
            timestep = int(timestep)
        if isinstance(timestep, bool) or not isinstance(timestep, (int, np.integer)):
            raise TypeError(f"timestep: expected an int or an integer tensor, got {timestep!r}")
        index = self._index_of.get(int(timestep))
        if index is None:
            shown = (self._schedule if n <= 12
                     else self._schedule[:6] + ["..."] + self._schedule[-3:])
            raise ValueError(f"timestep: {int(timestep)} is not in the schedule set by "
                             f"set_timesteps ({n} steps: {shown}; num_train_timesteps="
                             f"{self.config.num_train_timesteps})")
        return index

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
        their common dtype."""
        cfg = guidance_scale is not None
        if isinstance(guidance_scale, Tensor) and guidance_scale.device.type != "cpu":
            raise TypeError("guidance_scale: expected a Python float (reading a "
                            f"{guidance_scale.device} tensor would sync the device)")
        for name, t in (("model_output", model_output), ("sample", sample)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
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
        model_output, sample = model_output.to(dtype), sample.to(dtype)
        mode = 1 if learned else 0  # validation only: the right mode is chosen later
        check_args(model_output, sample, None, None, [0.0] * 11, mode, 0.0, cfg)
        return model_output, sample, cfg, (1.0 if not cfg else float(guidance_scale))

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
        c = self.config
        threshold, clip_range = None, 0.0
        if c.thresholding:  # diffusers: thresholding wins over clip_sample
            threshold = dynamic_threshold(model_output, sample, coeffs,
                                          float(c.dynamic_thresholding_ratio),
                                          float(c.sample_max_value), guidance_scale=g, cfg=cfg)
        elif c.clip_sample:
            clip_range = float(c.clip_sample_range)
        prev, x0 = diffusion_step(model_output, sample, coeffs, noise=noise, threshold=threshold,
                                  variance_mode=variance_mode, clip_range=clip_range,
                                  guidance_scale=g, cfg=cfg)
        if not return_dict:
            return prev, x0
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0)


def resolve_noise_alias(variance_noise, noise):
    if variance_noise is not None and noise is not None:
        raise ValueError("variance_noise and noise are the same argument: pass one")
    return noise if variance_noise is None else variance_noise
