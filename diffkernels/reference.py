"""Plain-PyTorch ground truth for every op, computed in fp32 or better (returned in the input's
dtype)."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def group_norm_silu(x: Tensor, num_groups: int, weight: Optional[Tensor] = None,
                    bias: Optional[Tensor] = None, eps: float = 1e-5, silu: bool = True,
                    channel_bias: Optional[Tensor] = None) -> Tensor:
    """silu(group_norm(x + channel_bias[:, :, None, ...])), computed in fp64: the ground truth
    for fp32 kernels too (x = 1e4 + noise loses nothing; two-pass variance)."""
    xf = x.double()
    if channel_bias is not None:
        xf = xf + channel_bias.double().reshape(*channel_bias.shape, *([1] * (x.dim() - 2)))
    n, c = x.shape[:2]
    g = xf.reshape(n, num_groups, -1)
    mean = g.mean(dim=2, keepdim=True)
    rstd = torch.rsqrt((g - mean).square().mean(dim=2, keepdim=True) + eps)
    # y = x * scale + shift per (n, c), the form F.group_norm computes, so that an inf/NaN
    # weight or bias gives NaN/inf where eager's does (fp64 keeps x = 1e4 + noise exact).
    spatial = (1,) * (x.dim() - 2)
    scale = rstd.expand(n, num_groups, c // num_groups).reshape(n, c)
    shift = -mean.expand(n, num_groups, c // num_groups).reshape(n, c) * scale
    if weight is not None:
        scale = scale * weight.double()
        shift = shift * weight.double()
    if bias is not None:
        shift = shift + bias.double()
    y = xf * scale.reshape(n, c, *spatial) + shift.reshape(n, c, *spatial)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype).contiguous(memory_format=memory_format_of(x))


def memory_format_of(x: Tensor):
    """channels_last(_3d) when x is laid out so (and is not also plain contiguous), else
    contiguous: the layout group_norm_silu's output keeps."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float,
              key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """softmax(q k^T * scale + mask) v in fp32; a query with no key to attend gives zeros, and
    NaN/inf propagate as in F.scaled_dot_product_attention's math. The output has q's strides
    when q is dense (torch.empty_like)."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if key_padding_mask is not None:  # added, as SDPA adds a mask: a NaN score stays NaN
        s = s + torch.zeros_like(key_padding_mask, dtype=s.dtype).masked_fill(
            ~key_padding_mask, float("-inf"))[:, None, None, :]
    o = torch.matmul(torch.softmax(s, dim=-1), v.float())
    if key_padding_mask is not None:  # all keys masked: zeros (softmax alone gives NaN there)
        o = o.masked_fill(~key_padding_mask.any(dim=1)[:, None, None, None], 0.0)
    out = torch.empty_like(q)
    out.copy_(o)
    return out


# variance_mode of diffusion_step: how the noise's standard deviation is given.
VARIANCE_SCALAR, VARIANCE_LEARNED, VARIANCE_LEARNED_RANGE = 0, 1, 2


def diffusion_step(model_output: Tensor, sample: Tensor, noise: Optional[Tensor],
                   threshold: Optional[Tensor], coeffs: "list[float]", variance_mode: int,
                   clip_range: float, guidance_scale: float, cfg: bool):
    """One DDPM/DDIM update as a generic affine step, in fp32. x = sample [B, C, *S].

    m = model_output[:, :C] (with cfg: model_output is [2B, ...], uncond half first, and
        m = u + guidance_scale * (c - u)); v = model_output[:, C:2C] (cond half with cfg) holds
        the learned variance when variance_mode != VARIANCE_SCALAR.
    x0 = k0*x + k1*m;  clamp to +-clip_range when clip_range > 0;  with threshold (fp32 [B]):
        x0 = clamp(x0, -s, s) / s
    eps = k2*x + k3*m + k4*x0
    std = k8 (scalar) | sqrt(v) (learned) | exp(k9 + k10*v) (learned_range)
    prev = k5*x0 + k6*x + k7*eps + std*noise (no noise term when noise is None)
    Returns (prev_sample, pred_original_sample) in sample's dtype. coeffs: 11 floats, or 11 fp32
    0-d tensors on sample's device.
    """
    k = list(coeffs) + [0.0] * (11 - len(coeffs))
    x = sample.float()
    b, c = sample.shape[:2]
    mo = model_output.float()
    if cfg:
        uncond, cond = mo[:b], mo[b:]
        m = uncond[:, :c] + guidance_scale * (cond[:, :c] - uncond[:, :c])
        var_src = cond
    else:
        m, var_src = mo[:, :c], mo
    x0 = k[0] * x + k[1] * m
    if clip_range > 0:
        x0 = x0.clamp(-clip_range, clip_range)
    if threshold is not None:
        s = threshold.float().reshape(b, *([1] * (x.dim() - 1)))
        x0 = torch.minimum(torch.maximum(x0, -s), s) / s
    eps = k[2] * x + k[3] * m + k[4] * x0
    prev = k[5] * x0 + k[6] * x + k[7] * eps
    if noise is not None:
        if variance_mode == VARIANCE_SCALAR:
            std = k[8]
        elif variance_mode == VARIANCE_LEARNED:
            std = var_src[:, c:2 * c].sqrt()
        else:
            std = torch.exp(k[9] + k[10] * var_src[:, c:2 * c])
        prev = prev + std * noise.float()
    return prev.to(sample.dtype), x0.to(sample.dtype)
