"""diffusion_step: one DDPM/DDIM update (CFG combine, x0, clip/threshold, posterior, noise) as
one operator. The schedulers compute the 11 scalar coefficients on the host; see
diffkernels.reference.diffusion_step for the exact math.

The operators diffkernels::diffusion_step and ::dynamic_threshold are defined in C++
(csrc/diffusion_step.cpp: schemas, checks, backend route, CPU and CUDA kernels). This module
holds the public functions, the fake kernel for torch.compile, and the Python backends the C++
router calls."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import reference
from ..reference import VARIANCE_LEARNED, VARIANCE_LEARNED_RANGE, VARIANCE_SCALAR
from ._checks import check_device, check_dtype, check_tensor
from ._library import clearer_error, define_python_backends

NUM_COEFFS = 11
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_VARIANCE_MODES = {VARIANCE_SCALAR: "scalar", VARIANCE_LEARNED: "learned",
                   VARIANCE_LEARNED_RANGE: "learned_range"}

_op = torch.ops.diffkernels.diffusion_step.default
_threshold_op = torch.ops.diffkernels.dynamic_threshold.default


def diffusion_step(model_output: Tensor, sample: Tensor, coeffs, *, noise: Optional[Tensor] = None,
                   threshold: Optional[Tensor] = None, variance_mode: int = VARIANCE_SCALAR,
                   clip_range: float = 0.0, guidance_scale: float = 1.0,
                   cfg: bool = False) -> Tuple[Tensor, Tensor]:
    """One sampler step; returns (prev_sample, pred_original_sample) in sample's dtype.

    sample: [B, C, *S]. model_output: [B, C, *S], or [2B, ...] with cfg (uncond half first,
    combined as u + guidance_scale * (c - u)), or [.., 2C, *S] with a learned variance_mode
    (the second C channels hold the variance, the cond half's with cfg). noise: like sample, or
    None for no noise term. threshold: fp32 [B] dynamic-thresholding scale s (see
    `dynamic_threshold`) or None. clip_range > 0 clamps x0 to +-clip_range. coeffs: 11 Python
    floats k0..k10 (reference.diffusion_step documents what each multiplies), or a float32 [11]
    tensor on sample's device that the kernel reads (nothing is read on the host: a CUDA graph
    captured once replays every step with new coefficients in that buffer).
    """
    device_coeffs = None
    if isinstance(coeffs, Tensor):
        coeffs, device_coeffs = [], coeffs
    try:
        return _op(model_output, sample, noise, threshold, coeffs, variance_mode, clip_range,
                   guidance_scale, cfg, device_coeffs)
    except (TypeError, RuntimeError) as e:
        clearer_error(e, _check_call, model_output, sample, noise, threshold, coeffs,
                      variance_mode, clip_range, cfg, device_coeffs)


def _coeff_list(coeffs):
    if isinstance(coeffs, Tensor):
        raise TypeError("coeffs: expected a list of 11 Python floats computed on the host, got a "
                        "Tensor (reading it would sync the device)")
    coeffs = [float(c) for c in coeffs]
    if len(coeffs) != NUM_COEFFS:
        raise ValueError(f"coeffs: expected {NUM_COEFFS} floats k0..k10, got {len(coeffs)}")
    return coeffs


def _check_call(model_output, sample, noise, threshold, coeffs, variance_mode, clip_range, cfg,
                device_coeffs):
    check_tensor("model_output", model_output)
    check_tensor("sample", sample)
    if device_coeffs is None:
        coeffs = _coeff_list(coeffs)
    check_args(model_output, sample, noise, threshold, coeffs, variance_mode, clip_range, cfg,
               device_coeffs)


def check_args(model_output, sample, noise, threshold, coeffs, variance_mode, clip_range, cfg,
               device_coeffs=None):
    """The checks of csrc/diffusion_step.cpp, with the same messages (for the fake kernel and
    for arguments the dispatcher rejects before the C++ checks run)."""
    check_tensor("sample", sample)
    check_tensor("model_output", model_output)
    if sample.dim() < 2:
        raise ValueError(f"sample: expected rank >= 2 [B, C, *spatial], got shape "
                         f"{list(sample.shape)}")
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
    if device_coeffs is not None:
        if len(coeffs):
            raise ValueError(f"coeffs: expected [] with device_coeffs (the kernel reads k0..k10 "
                             f"from device_coeffs), got {len(coeffs)} floats")
        check_tensor("device_coeffs", device_coeffs)
        if tuple(device_coeffs.shape) != (NUM_COEFFS,):
            raise ValueError(f"device_coeffs: expected shape [{NUM_COEFFS}] (k0..k10), got "
                             f"{list(device_coeffs.shape)}")
        check_dtype("device_coeffs", device_coeffs, (torch.float32,))
        check_device("device_coeffs", device_coeffs, sample, "sample")
    elif len(coeffs) != NUM_COEFFS:
        raise ValueError(f"coeffs: expected {NUM_COEFFS} floats k0..k10, got {len(coeffs)}")
    if not clip_range >= 0:
        raise ValueError(f"clip_range: expected >= 0 (0 = no clipping), got {clip_range}")


@torch.library.register_fake("diffkernels::diffusion_step")
def _(model_output, sample, noise, threshold, coeffs, variance_mode=VARIANCE_SCALAR,
      clip_range=0.0, guidance_scale=1.0, cfg=False, device_coeffs=None):
    check_args(model_output, sample, noise, threshold, coeffs, variance_mode, clip_range, cfg,
               device_coeffs)
    return (torch.empty_like(sample, memory_format=torch.contiguous_format),
            torch.empty_like(sample, memory_format=torch.contiguous_format))


def _reference(model_output, sample, noise, threshold, coeffs, variance_mode, clip_range,
               guidance_scale, cfg, device_coeffs):
    if device_coeffs is not None:
        coeffs = device_coeffs.unbind()  # 0-d tensors: the math reads nothing on the host
    prev, x0 = reference.diffusion_step(model_output, sample, noise, threshold, coeffs,
                                        variance_mode, clip_range, guidance_scale, cfg)
    return prev.contiguous(), x0.contiguous()


def _triton(model_output, sample, noise, threshold, coeffs, variance_mode, clip_range,
            guidance_scale, cfg, device_coeffs):
    from ..triton.diffusion_step import diffusion_step as kernel
    return kernel(model_output, sample, noise, threshold,
                  coeffs if device_coeffs is None else device_coeffs, variance_mode, clip_range,
                  guidance_scale, cfg)


define_python_backends(
    "diffusion_step",
    "Tensor model_output, Tensor sample, Tensor? noise, Tensor? threshold, float[] coeffs, "
    "int variance_mode, float clip_range, float guidance_scale, bool cfg, Tensor? device_coeffs"
    ") -> (Tensor, Tensor)",
    {"reference": _reference, "triton": _triton})


def dynamic_threshold(model_output: Tensor, sample: Tensor, coeffs, ratio: float,
                      max_value: float, *, guidance_scale: float = 1.0,
                      cfg: bool = False) -> Tensor:
    """Imagen's dynamic-thresholding scale s per sample, fp32 [B] on sample's device: the
    `ratio` quantile of |x0| (x0 = k0*x + k1*m, m the CFG-combined model output), clamped to
    [1, max_value]. Plain ATen ops with host-side ranks (diffkernels::dynamic_threshold): no
    device->host sync. Pass the result as `threshold` to diffusion_step (which then clamps x0
    to [-s, s] and divides by s)."""
    try:
        return _threshold_op(model_output, sample, coeffs, ratio, max_value, guidance_scale, cfg)
    except (TypeError, RuntimeError) as e:
        clearer_error(e, _coeff_list, coeffs)
