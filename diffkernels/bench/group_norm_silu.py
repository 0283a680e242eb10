"""group_norm_silu vs eager (F.group_norm + F.silu with the time-embedding add) and
torch.compile of the same function, on SD1.5 / SD2 / SDXL UNet and VAE GroupNorm shapes."""
import torch
import torch.nn.functional as F

import diffkernels as dk
from diffkernels import _backend
from . import common

GROUPS = 32
# (label, C, H, W): ResNet-block GroupNorms at 512 px (SD1.5, latent 64), 768 px (SD2, 96),
# 1024 px (SDXL, 128), and the VAE decoder at 512 px.
SHAPES = [
    ("sd15-unet", 320, 64, 64), ("sd15-unet", 640, 32, 32), ("sd15-unet", 1280, 16, 16),
    ("sd15-unet", 1280, 8, 8), ("sd15-unet", 960, 32, 32), ("sd15-unet", 640, 64, 64),
    ("sd2-unet", 320, 96, 96), ("sd2-unet", 1280, 24, 24),
    ("sdxl-unet", 320, 128, 128), ("sdxl-unet", 640, 64, 64), ("sdxl-unet", 1280, 32, 32),
    ("vae", 512, 64, 64), ("vae", 512, 128, 128), ("vae", 256, 256, 256), ("vae", 128, 512, 512),
]
QUICK = [("sd15-unet", 320, 64, 64), ("sd15-unet", 1280, 16, 16), ("vae", 512, 64, 64)]


def eager(x, w, b, temb):
    return F.silu(F.group_norm(x + temb[:, :, None, None], GROUPS, w, b, 1e-5))


def run(device, dtypes=None, quick=False, batches=(1, 2), compile_baseline=True):
    device = torch.device(device)
    if dtypes is None:
        dtypes = [torch.float32] if device.type == "cpu" else [torch.float16, torch.bfloat16]
    shapes = QUICK if quick else SHAPES
    if device.type == "cpu" and not quick:  # the biggest VAE maps take minutes on 2 cores
        shapes = [s for s in shapes if s[1] * s[2] * s[3] <= 512 * 128 * 128]
    ours = _backend.kernel_backends(device)
    compiled = common.compiled(eager) if compile_baseline else None
    copy_bw = common.copy_bandwidth_gbs(str(device))
    dev_name = common.device_name(device)
    rows = []
    for label, c, h, w_ in shapes:
        for n in batches:
            for dtype in dtypes:
                for fmt in ([torch.contiguous_format, torch.channels_last]
                            if (c, h) in ((320, 64), (1280, 16)) else [torch.contiguous_format]):
                    x = torch.randn(n, c, h, w_, device=device, dtype=dtype).contiguous(memory_format=fmt)
                    wt = torch.randn(c, device=device, dtype=dtype)
                    bs = torch.randn(c, device=device, dtype=dtype)
                    temb = torch.randn(n, c, device=device, dtype=dtype)
                    providers = {f"diffkernels-{b}": (b, None) for b in ours}
                    providers["eager"] = (None, eager)
                    if compiled is not None:
                        providers["torch.compile"] = (None, compiled)
                    nbytes = 2 * x.numel() * x.element_size()
                    shape = f"{label} {n}x{c}x{h}x{w_}" + (" CL" if fmt == torch.channels_last else "")
                    for name, (backend, fn) in providers.items():
                        if backend is not None:
                            def call(backend=backend):
                                with dk.backend(backend):
                                    return dk.group_norm_silu(x, GROUPS, wt, bs, channel_bias=temb)
                        else:
                            def call(fn=fn):
                                return fn(x, wt, bs, temb)
                        try:
                            ms = common.median_ms(call, device, budget_s=0.5)
                        except Exception as e:  # noqa: BLE001 - e.g. inductor unavailable
                            print(f"  {name} {shape}: skipped ({type(e).__name__}: {e})"[:200])
                            continue
                        gbps, pct, extra = common.bandwidth(nbytes, ms, device, copy_bw)
                        rows.append(common.Row("group_norm_silu", shape, str(dtype).replace("torch.", ""),
                                               dev_name, name, ms, gbps=gbps,
                                               pct_copy_bw=pct, extra=extra))
    return common.finish_ratios(rows, lambda group: "eager")


NOTES = ["GB/s counts one read of x and one write of y; ratio = eager time / provider time",
         "eager = F.silu(F.group_norm(x + temb[:, :, None, None], 32, w, b)); 32 groups"]
