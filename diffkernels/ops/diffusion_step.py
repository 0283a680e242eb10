"""diffusion_step: one DDPM/DDIM update (CFG combine, x0, clip/threshold, posterior, noise) as
one operator. The schedulers compute the 11 scalar coefficients on the host; see
diffkernels.reference.diffusion_step for the exact math."""
import math
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .. import reference
from .._backend import Dispatch
from ..reference import VARIANCE_LEARNED, VARIANCE_LEARNED_RANGE, VARIANCE_SCALAR
from ._checks import check_device, check_dtype, check_tensor

NUM_COEFFS = 11
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_VARIANCE_MODES = {VARIANCE_SCALAR: "scalar", VARIANCE_LEARNED: "learned",
                   VARIANCE_LEARNED_RANGE: "learned_range"}

dispatch = Dispatch("diffusion_step")


def diffusion_step(model_output: Tensor, sample: Tensor, coeffs, *, noise: Optional[Tensor] = None,
                   threshold: Optional[Tensor] = None, variance_mode: int = VARIANCE_SCALAR,
                   clip_range: float = 0.0, guidance_scale: float = 1.0,
                   cfg: bool = False) -> Tuple[Tensor, Tensor]:
    """One sampler step; returns (prev_sample, pred_original_sample) in sample's dtype.

    sample: [B, C, *S]. model_output: [B, C, *S], or [2B, ...] with cfg (uncond half first,
    combined as u + guidance_scale * (c - u)), or [.., 2C, *S] with a learned variance_mode
    (the second C channels hold the variance, the cond half's with cfg). noise: like sample, or
    None for no noise term. threshold: fp32 [B] dynamic-thresholding scale s (see
    `dynamic_threshold`) or None. clip_range > 0 clamps x0 to +-clip_range. coeffs: 11 floats
    k0..k10 (reference.diffusion_step documents what each multiplies).
    """
    check_tensor("model_output", model_output)  # before the dispatcher's own schema error
    check_tensor("sample", sample)
    coeffs = _coeff_list(coeffs)
    return torch.ops.diffkernels.diffusion_step(model_output, sample, noise, threshold, coeffs,
                                                int(variance_mode), float(clip_range),
                                                float(guidance_scale), bool(cfg))


def _coeff_list(coeffs):
    if isinstance(coeffs, Tensor):
        raise TypeError("coeffs: expected a list of 11 Python floats computed on the host, got a "
                        "Tensor (reading it would sync the device)")
    coeffs = [float(c) for c in coeffs]
    if len(coeffs) != NUM_COEFFS:
        raise ValueError(f"coeffs: expected {NUM_COEFFS} floats k0..k10, got {len(coeffs)}")
    return coeffs


def check_args(model_output, sample, noise, threshold, coeffs, variance_mode, clip_range, cfg):
    check_tensor("sample", sample)
    check_tensor("model_output", model_output)
    if sample.dim() < 2:
        raise ValueError(f"sample: expected rank >= 2 [B, C, *spatial], got shape "
                         f"{tuple(sample.shape)}")
    check_dtype("sample", sample, _FLOATS)
    if model_output.dtype != sample.dtype:
        raise TypeError(f"model_output: expected dtype {sample.dtype} (the dtype of sample), got "
                        f"{model_output.dtype}")
    check_device("model_output", model_output, sample, "sample")
    if variance_mode not in _VARIANCE_MODES:
        raise ValueError(f"variance_mode: expected one of {sorted(_VARIANCE_MODES)} "
                         f"(scalar, learned, learned_range), got {variance_mode!r}")
    b, c, *spatial = sample.shape
    want_b = 2 * b if cfg else b
    want_c = c if variance_mode == VARIANCE_SCALAR else 2 * c
    got = list(model_output.shape)
    if model_output.dim() != sample.dim() or got[0] != want_b or got[2:] != spatial:
        what = "[2B, ...] (both CFG halves, cfg=True)" if cfg else "[B, ...]"
        raise ValueError(f"model_output: expected shape {what} = {[want_b, want_c, *spatial]} for "
                         f"sample {list(sample.shape)}, got {got}")
    if got[1] != want_c:
        if got[1] == 2 * c:
            raise ValueError(f"model_output: has 2C = {2 * c} channels (a learned variance) but "
                             f"variance_mode is scalar: expected {c} channels, or a learned "
                             f"variance_mode")
        mode = _VARIANCE_MODES[variance_mode]
        raise ValueError(f"model_output: expected {want_c} channels ("
                         + (f"C = {c}" if want_c == c else f"2C: mean and variance, variance_mode "
                            f"{mode}") + f") for sample {list(sample.shape)}, got {got[1]}")
    if noise is not None:
        check_tensor("noise", noise)
        if tuple(noise.shape) != tuple(sample.shape):
            raise ValueError(f"noise: expected shape {list(sample.shape)} (sample's), got "
                             f"{list(noise.shape)}")
        if noise.dtype != sample.dtype:
            raise TypeError(f"noise: expected dtype {sample.dtype} (the dtype of sample), got "
                            f"{noise.dtype}")
        check_device("noise", noise, sample, "sample")
    if threshold is not None:
        check_tensor("threshold", threshold)
        if tuple(threshold.shape) != (b,):
            raise ValueError(f"threshold: expected shape [B] = [{b}] (one scale per sample), got "
                             f"{list(threshold.shape)}")
        check_dtype("threshold", threshold, (torch.float32,))
        check_device("threshold", threshold, sample, "sample")
    if len(coeffs) != NUM_COEFFS:
        raise ValueError(f"coeffs: expected {NUM_COEFFS} floats k0..k10, got {len(coeffs)}")
    if not clip_range >= 0:
        raise ValueError(f"clip_range: expected >= 0 (0 = no clipping), got {clip_range}")


def _empty_outputs(sample):
    return (torch.empty_like(sample, memory_format=torch.contiguous_format),
            torch.empty_like(sample, memory_format=torch.contiguous_format))


@torch.library.custom_op("diffkernels::diffusion_step", mutates_args=())
def _diffusion_step(model_output: Tensor, sample: Tensor, noise: Optional[Tensor],
                    threshold: Optional[Tensor], coeffs: List[float], variance_mode: int,
                    clip_range: float, guidance_scale: float,
                    cfg: bool) -> Tuple[Tensor, Tensor]:
    check_args(model_output, sample, noise, threshold, coeffs, variance_mode, clip_range, cfg)
    if sample.numel() == 0:
        return _empty_outputs(sample)
    # Kernels see contiguous tensors; outputs are contiguous in sample's dtype.
    model_output, sample = model_output.contiguous(), sample.contiguous()
    noise = None if noise is None else noise.contiguous()
    threshold = None if threshold is None else threshold.contiguous()
    return dispatch(sample.device, model_output, sample, noise, threshold, coeffs, variance_mode,
                    clip_range, guidance_scale, cfg)


@_diffusion_step.register_fake
def _(model_output, sample, noise, threshold, coeffs, variance_mode, clip_range, guidance_scale,
      cfg):
    check_args(model_output, sample, noise, threshold, coeffs, variance_mode, clip_range, cfg)
    return _empty_outputs(sample)


def _kernel_supports(model_output, sample, *args):
    return sample.dtype in _KERNEL_DTYPES


def _reference(*args):
    prev, x0 = reference.diffusion_step(*args)
    return prev.contiguous(), x0.contiguous()


dispatch.register("reference")(_reference)


@dispatch.register("cpu", supports=_kernel_supports)
@dispatch.register("cuda", supports=_kernel_supports)
def _native(model_output, sample, noise, threshold, coeffs, variance_mode, clip_range,
            guidance_scale, cfg):
    return torch.ops.diffkernels.diffusion_step_cxx(model_output, sample, noise, threshold, coeffs,
                                                    variance_mode, clip_range, guidance_scale, cfg)


@dispatch.register("triton", supports=_kernel_supports)
def _triton(model_output, sample, noise, threshold, coeffs, variance_mode, clip_range,
            guidance_scale, cfg):
    from ..triton.diffusion_step import diffusion_step as kernel
    return kernel(model_output, sample, noise, threshold, coeffs, variance_mode, clip_range,
                  guidance_scale, cfg)


def dynamic_threshold(model_output: Tensor, sample: Tensor, coeffs, ratio: float,
                      max_value: float, *, guidance_scale: float = 1.0,
                      cfg: bool = False) -> Tensor:
    """Imagen's dynamic-thresholding scale s per sample, fp32 [B] on sample's device: the
    `ratio` quantile of |x0| (x0 = k0*x + k1*m, m the CFG-combined model output), clamped to
    [1, max_value]. Plain torch ops with host-side ranks: no device->host sync. Pass the result
    as `threshold` to diffusion_step (which then clamps x0 to [-s, s] and divides by s)."""
    k0, k1 = _coeff_list(coeffs)[:2]
    b, c = sample.shape[:2]
    mo = model_output.float()
    if cfg:
        m = mo[:b, :c] + guidance_scale * (mo[b:, :c] - mo[:b, :c])
    else:
        m = mo[:, :c]
    x0 = k0 * sample.float() + k1 * m
    return _quantile_rows(x0.abs().reshape(b, -1), ratio).clamp(min=1.0, max=max_value)


def _quantile_rows(x: Tensor, q: float) -> Tensor:
    """torch.quantile(x, q, dim=1) (linear interpolation), with the rank computed on the host in
    fp32 as torch computes it: sort + two column reads + lerp, nothing that reads device
    values back (torch.quantile also caps the input at 2**24 elements)."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"dynamic_thresholding_ratio: expected a quantile in [0, 1], got {q}")
    n = x.shape[1]
    if n == 0:
        return x.new_full((x.shape[0],), math.nan)
    rank = np.float32(q) * np.float32(n - 1)
    lo = int(np.floor(rank))
    hi = min(int(np.ceil(rank)), n - 1)
    weight = float(rank - np.float32(lo))
    v = x.sort(dim=1).values
    out = torch.lerp(v[:, lo], v[:, hi], weight)
    # torch.quantile propagates NaN (sort puts NaN last, where a low rank would miss it).
    return torch.where(v[:, -1].isnan(), v[:, -1], out)
