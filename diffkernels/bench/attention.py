"""attention vs F.scaled_dot_product_attention (each of its backends that accepts the case),
eager math and torch.compile of it, on SD1.5 / SD2.x / SDXL self- and cross-attention shapes."""
import contextlib

import torch

import diffkernels as dk
from diffkernels import _backend
from . import common

# (label, heads, Lq, Lk, D): SD1.5 at 512 px (heads 8, D = C/8), SD2.x at 768 px (D 64),
# SDXL at 1024 px (D 64); Lk = 77 is cross-attention to the text tokens.
SHAPES = [
    ("sd15-self", 8, 4096, 4096, 40), ("sd15-self", 8, 1024, 1024, 80),
    ("sd15-self", 8, 256, 256, 160), ("sd15-self", 8, 64, 64, 160),
    ("sd15-cross", 8, 4096, 77, 40), ("sd15-cross", 8, 1024, 77, 80),
    ("sd15-cross", 8, 256, 77, 160), ("sd15-cross", 8, 64, 77, 160),
    ("sd2-self", 5, 9216, 9216, 64), ("sd2-self", 10, 2304, 2304, 64), ("sd2-self", 20, 576, 576, 64),
    ("sd2-cross", 5, 9216, 77, 64), ("sd2-cross", 20, 576, 77, 64),
    ("sdxl-self", 10, 4096, 4096, 64), ("sdxl-self", 20, 1024, 1024, 64),
    ("sdxl-cross", 10, 4096, 77, 64), ("sdxl-cross", 20, 1024, 77, 64),
]
CPU_SHAPES = [("sd15-self", 8, 1024, 1024, 80), ("sd15-self", 8, 256, 256, 160),
              ("sd15-self", 8, 64, 64, 160), ("sd15-cross", 8, 4096, 77, 40),
              ("sd15-cross", 8, 1024, 77, 80), ("sd2-self", 20, 576, 576, 64)]
QUICK = [("sd15-self", 8, 1024, 1024, 80), ("sd15-cross", 8, 4096, 77, 40)]


def eager(q, k, v):
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(scores, dim=-1) @ v


def _sdpa_providers(device, dtype):
    import torch.nn.functional as F
    out = {}
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        sdpa_kernel = None
    if device.type == "cpu" or sdpa_kernel is None:
        out["sdpa"] = (contextlib.nullcontext, F.scaled_dot_product_attention)
        return out
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        if hasattr(SDPBackend, name):
            out[f"sdpa-{name.split('_')[0].lower()}"] = (
                lambda b=getattr(SDPBackend, name): sdpa_kernel(b), F.scaled_dot_product_attention)
    return out


def run(device, dtypes=None, quick=False, batches=(1, 2), compile_baseline=True):
    device = torch.device(device)
    if dtypes is None:
        dtypes = [torch.float32] if device.type == "cpu" else [torch.float16, torch.bfloat16]
    shapes = QUICK if quick else (CPU_SHAPES if device.type == "cpu" else SHAPES)
    ours = _backend.kernel_backends(device)
    compiled = common.compiled(eager) if compile_baseline else None
    copy_bw = common.copy_bandwidth_gbs(str(device))
    dev_name = common.device_name(device)
    rows = []
    for label, h, lq, lk, d in shapes:
        for b in batches:
            for dtype in dtypes:
                mm = common.matmul_tflops(str(device), dtype)
                # diffusers' layout: [B, L, H*D] projections viewed as [B, H, L, D]
                q = torch.randn(b, lq, h, d, device=device, dtype=dtype).transpose(1, 2)
                k = torch.randn(b, lk, h, d, device=device, dtype=dtype).transpose(1, 2)
                v = torch.randn(b, lk, h, d, device=device, dtype=dtype).transpose(1, 2)
                flops = 4 * b * h * lq * lk * d
                nbytes = (2 * q.numel() + k.numel() + v.numel()) * q.element_size()
                shape = f"{label} B{b} H{h} {lq}x{lk} D{d}"
                providers = {}
                for name in ours:
                    providers[f"diffkernels-{name}"] = (lambda n=name: dk.backend(n), dk.attention)
                providers.update(_sdpa_providers(device, dtype))
                if lq * lk * b * h <= 2**28:  # the eager score matrix must fit comfortably
                    providers["eager"] = (contextlib.nullcontext, eager)
                    if compiled is not None:
                        providers["torch.compile"] = (contextlib.nullcontext, compiled)
                for name, (ctx, fn) in providers.items():
                    def call(ctx=ctx, fn=fn):
                        with ctx():
                            return fn(q, k, v)
                    try:
                        ms = common.median_ms(call, device, budget_s=0.5)
                    except Exception as e:  # noqa: BLE001 - an SDPA backend that refuses the case
                        print(f"  {name} {shape}: skipped ({type(e).__name__})")
                        continue
                    tflops = flops / (ms * 1e-3) / 1e12
                    gbps, pct, extra = common.bandwidth(nbytes, ms, device, copy_bw)
                    pct_mm = 100 * tflops / mm
                    if pct_mm > 100:  # the measured matmul is not this device's peak: say so
                        extra["matmul"] = f"{pct_mm:.0f} % of the measured matmul rate"
                        pct_mm = None
                    rows.append(common.Row("attention", shape, str(dtype).replace("torch.", ""),
                                           dev_name, name, ms, gbps=gbps, pct_copy_bw=pct,
                                           tflops=tflops, pct_matmul=pct_mm, extra=extra))

    def best_sdpa(group):
        sdpa = [r for r in group if r.provider.startswith("sdpa")]
        return min(sdpa, key=lambda r: r.median_ms).provider if sdpa else "eager"
    return common.finish_ratios(rows, best_sdpa)


NOTES = ["inputs are [B, L, H, D] tensors viewed as [B, H, L, D] (what diffusers passes)",
         "TFLOP/s counts 4*B*H*Lq*Lk*D useful FLOPs; % matmul is against a dense matmul of the "
         "same dtype measured in this run; GB/s counts q, k, v read once and o written once",
         "ratio = time of the fastest SDPA backend for the row / provider time"]
