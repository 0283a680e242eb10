"""The fused DDPM/DDIM sampler step in Triton: one kernel launch per step.

The math is the generic affine step of diffkernels.reference.diffusion_step (its docstring is
the spec); the scheduler computes the 11 coefficients on the host and they travel as kernel
arguments (no device buffer, no sync), or, for a step captured once in a CUDA graph and replayed
for every step, the kernel reads them from an fp32 [11] device tensor (K_PTR).

Layout (contiguous): sample [B, C, *S] is B rows of n = C * prod(S) elements; model_output
[B or 2B (cfg: uncond half first), C or 2C, *S] is rows of mo_row = n or 2n elements. For the
element (b, j) of the sample: uncond = mo[b * mo_row + j], cond = that + cond_off
(cond_off = B * mo_row), the learned variance (channels C..2C; of the cond half with cfg) =
mo[b * mo_row + var_off + j]. Program (i, b) handles elements [i * BLOCK, (i + 1) * BLOCK) of
row b. cfg, noise, the variance mode, clip and threshold are constexprs: every variant is its
own specialised kernel. With both clip and threshold, the clip folds into the threshold's
bound (clamp(clamp(x, -r, r), -s, s) = clamp(x, -min(r, s), min(r, s))), so the launcher
never picks CLIP and THRESHOLD together.
"""
import contextlib
import math

import torch
import triton
import triton.language as tl

BLOCK = 1024    # elements per program: 8 per thread at 4 warps (two 16-byte vectors in fp16)
NUM_WARPS = 4
MAX_BATCH = 65535  # grid axis 1 limit


@triton.jit
def _clamp(x, lo, hi):
    # NaN stays NaN (like torch.clamp); tl.minimum / tl.maximum leave NaN handling open.
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def _diffusion_step_kernel(mo_ptr, x_ptr, noise_ptr, thr_ptr, prev_ptr, x0_ptr, k_ptr,
                           n, mo_row, cond_off, var_off,
                           k0, k1, k2, k3, k4, k5, k6, k7, k8, k9, k10, clip_range, guidance,
                           CFG: tl.constexpr, NOISE: tl.constexpr, VARIANCE_MODE: tl.constexpr,
                           CLIP: tl.constexpr, THRESHOLD: tl.constexpr, K_PTR: tl.constexpr,
                           BLOCK: tl.constexpr):
    if K_PTR:  # coefficients in device memory (CUDA-graph replay), else by value
        k0, k1, k2, k3 = tl.load(k_ptr), tl.load(k_ptr + 1), tl.load(k_ptr + 2), \
            tl.load(k_ptr + 3)
        k4, k5, k6, k7 = tl.load(k_ptr + 4), tl.load(k_ptr + 5), tl.load(k_ptr + 6), \
            tl.load(k_ptr + 7)
        k8, k9, k10 = tl.load(k_ptr + 8), tl.load(k_ptr + 9), tl.load(k_ptr + 10)
    b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    row = b * n
    u_row = mo_ptr + b * mo_row
    x = tl.load(x_ptr + row + offs, mask=mask).to(tl.float32)
    m = tl.load(u_row + offs, mask=mask).to(tl.float32)
    if CFG:
        c = tl.load(u_row + cond_off + offs, mask=mask).to(tl.float32)
        m = m + guidance * (c - m)
    x0 = k0 * x + k1 * m
    if THRESHOLD:
        s = tl.load(thr_ptr + b)
        h = tl.minimum(s, clip_range)  # clip_range is +inf without clip
        x0 = _clamp(x0, -h, h) / s
    if CLIP:
        x0 = _clamp(x0, -clip_range, clip_range)
    eps = k2 * x + k3 * m + k4 * x0
    prev = k5 * x0 + k6 * x + k7 * eps
    if NOISE:
        nz = tl.load(noise_ptr + row + offs, mask=mask).to(tl.float32)
        if VARIANCE_MODE == 0:
            prev = prev + k8 * nz
        else:
            v = tl.load(u_row + var_off + offs, mask=mask).to(tl.float32)
            if VARIANCE_MODE == 1:
                std = tl.sqrt(v)
            else:
                std = tl.exp(k9 + k10 * v)
            prev = prev + std * nz
    tl.store(prev_ptr + row + offs, prev.to(prev_ptr.dtype.element_ty), mask=mask)
    tl.store(x0_ptr + row + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def _launch(model_output, sample, noise, threshold, coeffs, variance_mode, clip_range,
            guidance_scale, cfg, prev, x0):
    """(grid, args, constexprs) of the one launch for these arguments. coeffs: 11 floats or an
    fp32 [11] tensor on the sample's device."""
    if len(coeffs) != 11:
        raise ValueError(f"coeffs: expected 11 floats, got {len(coeffs)}")
    k_tensor = isinstance(coeffs, torch.Tensor)
    b = sample.shape[0]
    n = sample.numel() // b
    mo_row = model_output.numel() // model_output.shape[0]
    cond_off = b * mo_row if cfg else 0
    threshold_on = threshold is not None
    clip_on = clip_range > 0
    args = dict(mo_ptr=model_output, x_ptr=sample,
                # absent tensors: a pointer of the sample is passed and never read
                noise_ptr=sample if noise is None else noise,
                thr_ptr=sample if threshold is None else threshold,
                prev_ptr=prev, x0_ptr=x0, k_ptr=coeffs.contiguous() if k_tensor else sample,
                n=n, mo_row=mo_row, cond_off=cond_off, var_off=cond_off + n,
                **{f"k{i}": 0.0 if k_tensor else float(c) for i, c in enumerate(coeffs)},
                clip_range=float(clip_range) if clip_on else math.inf,
                guidance=float(guidance_scale))
    meta = dict(CFG=bool(cfg), NOISE=noise is not None,
                VARIANCE_MODE=int(variance_mode) if noise is not None else 0,
                CLIP=clip_on and not threshold_on, THRESHOLD=threshold_on, K_PTR=k_tensor,
                BLOCK=BLOCK)
    return (triton.cdiv(n, BLOCK), b), args, meta


def diffusion_step(model_output, sample, noise, threshold, coeffs, variance_mode, clip_range,
                   guidance_scale, cfg):
    """(prev_sample, pred_original_sample) in sample's dtype; arguments as
    diffkernels.reference.diffusion_step (checked by the op). Tensors are made contiguous."""
    sample = sample.contiguous()
    model_output = model_output.contiguous()
    noise = None if noise is None else noise.contiguous()
    threshold = None if threshold is None else threshold.contiguous()
    prev = torch.empty_like(sample)
    x0 = torch.empty_like(sample)
    if sample.numel() == 0:
        return prev, x0
    if sample.shape[0] > MAX_BATCH:
        raise ValueError(f"sample: the Triton kernel takes at most {MAX_BATCH} samples, "
                         f"got {sample.shape[0]}")
    if sample.numel() // sample.shape[0] >= 2 ** 31:
        raise ValueError("sample: the Triton kernel takes at most 2**31 - 1 elements per sample")
    grid, args, meta = _launch(model_output, sample, noise, threshold, coeffs, variance_mode,
                               clip_range, guidance_scale, cfg, prev, x0)
    # Triton launches on the current device: make it the sample's.
    with torch.cuda.device(sample.device) if sample.is_cuda else contextlib.nullcontext():
        _diffusion_step_kernel[grid](**args, **meta, num_warps=NUM_WARPS, num_stages=1)
    return prev, x0


# ----------------------------------------------------------------------------- compile specs

_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _specialize(value):
    """(signature type, is 16-divisible) as triton's launcher specialises an argument (3.x):
    ints equal to 1 become constexprs, ints divisible by 16 get a divisibility hint."""
    if isinstance(value, bool):
        return "u1", False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", False
        return ("i32" if -2 ** 31 <= value < 2 ** 31 else "i64"), value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    return "*" + _TRITON_TYPES[value.dtype], True  # allocator pointers are 16-byte aligned


def compile_specs():
    """Every constexpr variant the launcher can pick, for fp16/bf16/fp32 (3 x cfg 2 x
    noise/variance 4 x clip/threshold 3 = 72, plus the device-coefficient variants of the
    unclipped steps a CUDA-graph sampling loop runs, 3 x 2 x 4 = 24), as dicts {name, fn,
    signature, constexprs, attrs, num_warps, num_stages} for
    diffkernels.triton._compile.compile_spec. Arguments are
    specialised as a launch on an SD latent ([2, 4, 64, 64]) would be."""
    specs = []
    kernel = _diffusion_step_kernel
    for dtype, tname in _TRITON_TYPES.items():
        for cfg in (False, True):
            for noise_mode in (None, 0, 1, 2):  # None: no noise, else the variance mode
                for x0_mode in ("none", "clip", "threshold", "none-kptr"):
                    b, c = 2, 4
                    x = torch.empty((b, c, 64, 64), dtype=dtype, device="meta")
                    mo = torch.empty((2 * b if cfg else b, 2 * c, 64, 64), dtype=dtype,
                                     device="meta")
                    thr = (torch.empty((b,), dtype=torch.float32, device="meta")
                           if x0_mode == "threshold" else None)
                    k = (torch.empty(11, dtype=torch.float32, device="meta")
                         if x0_mode == "none-kptr" else [0.5] * 11)
                    _, args, meta = _launch(
                        mo, x, None if noise_mode is None else x, thr, k,
                        noise_mode or 0, 1.0 if x0_mode == "clip" else 0.0, 7.5, cfg, x, x)
                    signature, constexprs, attrs = {}, dict(meta), {}
                    for i, arg in enumerate(kernel.arg_names):
                        if arg in meta:
                            signature[arg] = "constexpr"
                            continue
                        ty, div16 = _specialize(args[arg])
                        signature[arg] = ty
                        if ty == "constexpr":
                            constexprs[arg] = args[arg]
                        elif div16:
                            attrs[(i,)] = [["tt.divisibility", 16]]
                    noise_name = "nonoise" if noise_mode is None else f"var{noise_mode}"
                    specs.append(dict(
                        name=f"step-{tname}-{'cfg' if cfg else 'nocfg'}-{noise_name}-{x0_mode}",
                        fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs,
                        num_warps=NUM_WARPS, num_stages=1))
    return specs
