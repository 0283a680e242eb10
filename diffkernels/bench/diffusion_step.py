"""The sampler step: our DDPMScheduler.step (one fused kernel, CFG combine included) vs
diffusers' DDPMScheduler.step after the pipeline's CFG combine, and torch.compile of the same
eager math, on SD1.5 / SD2-768 / SDXL latents."""
import torch

import diffkernels as dk
from diffkernels import _backend
from diffkernels.schedulers import DDPMScheduler
from . import common

LATENTS = [("sd15", 64), ("sd2-768", 96), ("sdxl", 128)]
QUICK_LATENTS = [("sd15", 64)]
CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
              beta_schedule="scaled_linear", clip_sample=False, prediction_type="epsilon")
STEPS, T_INDEX, GUIDANCE = 50, 25, 7.5


def eager_step(out, x, noise, a0, a1, c0, c1, std, g, cfg: bool):
    """What a pipeline + diffusers' DDPM step compute, as eager elementwise torch ops."""
    if cfg:
        u, c = out.chunk(2)
        out = u + g * (c - u)
    x0 = a0 * x + a1 * out
    return c0 * x0 + c1 * x + std * noise, x0


def _kernel_launches(fn):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


def run(device, dtypes=None, quick=False, batches=(1, 2, 4), compile_baseline=True):
    device = torch.device(device)
    if dtypes is None:
        dtypes = [torch.float32] if device.type == "cpu" else [torch.float16, torch.float32]
    try:
        import diffusers
    except ImportError:
        diffusers = None
    ours_backends = _backend.kernel_backends(device)
    compiled = common.compiled(eager_step) if compile_baseline else None
    copy_bw = common.copy_bandwidth_gbs(str(device))
    dev_name = common.device_name(device)
    ours = DDPMScheduler.from_config(CONFIG)
    ours.set_timesteps(STEPS, device=device)
    t = int(ours.timesteps[T_INDEX])
    # The step's host coefficients (epsilon, fixed_small): the fused op takes them whole; the
    # eager/compiled baselines use x0 = a0*x + a1*m, prev = c0*x0 + c1*x + std*noise.
    coeffs, mode = ours.coefficients(t, int(ours.timesteps[T_INDEX + 1]))
    a0, a1, c0, c1, std = (coeffs[i] for i in (0, 1, 5, 6, 8))
    theirs = None
    if diffusers is not None:
        theirs = diffusers.DDPMScheduler.from_config(CONFIG)
        theirs.set_timesteps(STEPS, device=device)
    rows = []
    for label, size in (QUICK_LATENTS if quick else LATENTS):
        for b in batches:
            for dtype in dtypes:
                for cfg in (False, True):
                    x = torch.randn(b, 4, size, size, device=device, dtype=dtype)
                    out = torch.randn(2 * b if cfg else b, 4, size, size, device=device, dtype=dtype)
                    noise = torch.randn_like(x)
                    gen = torch.Generator(device=device).manual_seed(0)
                    g = GUIDANCE if cfg else None
                    providers = {}
                    for name in ours_backends:
                        def ours_call(name=name):
                            with dk.backend(name):
                                return ours.step(out, t, x, generator=gen, guidance_scale=g)
                        providers[f"diffkernels-{name}"] = ours_call
                    if theirs is not None:
                        def diffusers_call():
                            m = out
                            if cfg:
                                u, c = out.chunk(2)
                                m = u + GUIDANCE * (c - u)
                            return theirs.step(m, t, x, generator=gen)
                        providers["diffusers"] = diffusers_call
                    # The same step with the noise drawn like the schedulers draw it, and the
                    # math compiled: what torch.compile of a pipeline's step would give.
                    def randn():
                        return torch.randn(x.shape, generator=gen, device=device, dtype=dtype)
                    if compiled is not None:
                        providers["torch.compile"] = lambda: compiled(out, x, randn(), a0, a1, c0, c1,
                                                                      std, GUIDANCE, cfg)
                    # The fused op alone, noise given: the kernel without the noise draw.
                    for name in ours_backends:
                        def op_call(name=name):
                            with dk.backend(name):
                                return dk.diffusion_step(out, x, coeffs, noise=noise,
                                                         variance_mode=mode, cfg=cfg,
                                                         guidance_scale=GUIDANCE if cfg else 1.0)
                        providers[f"diffkernels-{name} op, noise given"] = op_call
                    if compiled is not None:
                        providers["torch.compile, noise given"] = lambda: compiled(
                            out, x, noise, a0, a1, c0, c1, std, GUIDANCE, cfg)
                    # bytes: model output, sample and noise read once; prev and x0 written once
                    nbytes = (out.numel() + 4 * x.numel()) * x.element_size()
                    shape = f"{label} {b}x4x{size}x{size}" + (" cfg" if cfg else "")
                    for name, fn in providers.items():
                        try:
                            ms = common.median_ms(fn, device, budget_s=0.3)
                        except Exception as e:  # noqa: BLE001
                            print(f"  {name} {shape}: skipped ({type(e).__name__}: {e})"[:200])
                            continue
                        gbps, pct, extra = common.bandwidth(nbytes, ms, device, copy_bw)
                        if device.type == "cuda":
                            extra["kernel_launches"] = _kernel_launches(fn)
                        rows.append(common.Row("diffusion_step", shape, str(dtype).replace("torch.", ""),
                                               dev_name, name, ms, gbps=gbps,
                                               pct_copy_bw=pct, extra=extra))
    return common.finish_ratios(rows, lambda group: "diffusers")


NOTES = ["DDPM, epsilon prediction, fixed_small variance, scaled_linear betas, 50 steps, t at "
         "step 25; ours = DDPMScheduler.step (host coefficients + one fused op, noise drawn from "
         "a generator like diffusers); diffusers = the pipeline's CFG combine + its step",
         "'noise given' rows take the noise as an input (the fused op alone vs the compiled "
         "math); the other rows draw it from a torch.Generator, as diffusers does",
         "GB/s counts model output, sample and noise read once, prev_sample and "
         "pred_original_sample written once; ratio = diffusers time / provider time"]
