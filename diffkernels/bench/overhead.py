"""Host cost per call (DESIGN.md 8): a UNet step calls group_norm_silu ~61 times and attention
~32 times, so what a call costs beyond its kernel matters. Tiny inputs, so the time is the
call's fixed cost: the public dk.* function against the bare registered op
(torch.ops.diffkernels.<op>.default) and the eager composite a user would write; and the DDIM
sampler step, CFG combine included, against diffusers' DDIM step after the pipeline's combine."""
import statistics
import time

import torch
import torch.nn.functional as F

import diffkernels as dk
from diffkernels.schedulers import DDIMScheduler
from . import common

CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
              steps_offset=1, prediction_type="epsilon")
STEP_LATENTS = [(1, 64), (2, 96), (1, 128)]
GUIDANCE = 7.5


def per_call_ms(providers, device, calls=200, repeats=9):
    """{name: ms per call} for {name: fn}: the median over repeats of (time of `calls`
    back-to-back calls) / calls, the providers interleaved repeat by repeat so that a slow
    moment of the machine hits all of them alike. On CUDA each timing ends with a sync."""
    for fn in providers.values():
        for _ in range(20):
            fn()
    common._sync(device)
    times = {name: [] for name in providers}
    for _ in range(repeats):
        for name, fn in providers.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            common._sync(device)
            times[name].append((time.perf_counter() - t0) / calls * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def _op_rows(device, dev_name, calls):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    x, w, b, temb = rand(1, 64, 4, 4), rand(64), rand(64), rand(1, 64)
    q, kv = rand(1, 1, 8, 40), rand(1, 1, 8, 40)
    mo, xs, noise = rand(2, 4, 8, 8), rand(1, 4, 8, 8), rand(1, 4, 8, 8)
    coeffs = [0.9, -0.3, 0.1, 0.2, -0.1, 0.5, 0.4, 0.05, 0.02, 0.0, 0.0]
    gn, attn, step = (torch.ops.diffkernels.group_norm_silu.default,
                      torch.ops.diffkernels.attention.default,
                      torch.ops.diffkernels.diffusion_step.default)

    def eager_step():
        u, c = mo.chunk(2)
        m = u + GUIDANCE * (c - u)
        x0 = coeffs[0] * xs + coeffs[1] * m
        return coeffs[5] * x0 + coeffs[6] * xs + coeffs[8] * noise, x0

    cases = [
        ("group_norm_silu", "1x64x4x4 + temb", "eager", {
            "dk.group_norm_silu": lambda: dk.group_norm_silu(x, 32, w, b, channel_bias=temb),
            "torch.ops (bare op)": lambda: gn(x, 32, w, b, 1e-5, True, temb),
            "eager": lambda: F.silu(F.group_norm(x + temb[:, :, None, None], 32, w, b)),
        }),
        ("attention", "1x1x8x40", "SDPA", {
            "dk.attention": lambda: dk.attention(q, kv, kv),
            "torch.ops (bare op)": lambda: attn(q, kv, kv, None, None),
            "SDPA": lambda: F.scaled_dot_product_attention(q, kv, kv),
        }),
        ("diffusion_step", "1x4x8x8 cfg, noise given", "eager", {
            "dk.diffusion_step": lambda: dk.diffusion_step(mo, xs, coeffs, noise=noise,
                                                           guidance_scale=GUIDANCE, cfg=True),
            "torch.ops (bare op)": lambda: step(mo, xs, noise, None, coeffs, 0, 0.0, GUIDANCE, True),
            "eager": eager_step,
        }),
    ]
    rows = []
    for op, shape, base, providers in cases:
        times = per_call_ms(providers, device, calls)
        for name, ms in times.items():
            extra = {"host_us": ms * 1e3}
            if name.startswith("dk."):
                extra["over_bare_op_us"] = (ms - times["torch.ops (bare op)"]) * 1e3
            rows.append(common.Row(f"overhead {op}", shape, "float32", dev_name, name, ms,
                                   extra=extra))
    return rows


def _step_rows(device, dev_name, calls, latents):
    try:
        import diffusers
    except ImportError:
        diffusers = None
    ours = DDIMScheduler.from_config(CONFIG)
    ours.set_timesteps(50, device=device)
    t = ours.timesteps[25]
    theirs = None
    if diffusers is not None:
        theirs = diffusers.DDIMScheduler.from_config(CONFIG)
        theirs.set_timesteps(50, device=device)
    rows = []
    for b, size in latents:
        x = torch.randn(b, 4, size, size, device=device)
        out = torch.randn(2 * b, 4, size, size, device=device)
        providers = {"DDIMScheduler.step (ours)":
                     lambda: ours.step(out, t, x, guidance_scale=GUIDANCE).prev_sample}
        if theirs is not None:
            def diffusers_step():
                u, c = out.chunk(2)
                return theirs.step(u + GUIDANCE * (c - u), t, x).prev_sample
            providers["diffusers DDIM step"] = diffusers_step
        for name, ms in per_call_ms(providers, device, calls).items():
            rows.append(common.Row("overhead DDIM step", f"{b}x4x{size}x{size} cfg", "float32",
                                   dev_name, name, ms, extra={"host_us": ms * 1e3}))
    return rows


def run(device, quick=False, batches=None, compile_baseline=True):
    device = torch.device(device)
    dev_name = common.device_name(device)
    calls = 50 if quick else 200
    rows = _op_rows(device, dev_name, calls)
    rows += _step_rows(device, dev_name, calls // 2, STEP_LATENTS[:1] if quick else STEP_LATENTS)
    baselines = {"overhead group_norm_silu": "eager", "overhead attention": "SDPA",
                 "overhead diffusion_step": "eager", "overhead DDIM step": "diffusers DDIM step"}
    return common.finish_ratios(rows, lambda group: baselines[group[0].op])


NOTES = ["time per call of back-to-back calls (host throughput; CUDA rows end with a sync), "
         "median of 9 repeats, the providers of a row group interleaved repeat by repeat; "
         "tiny inputs, so the figure is the call's fixed cost",
         "torch.ops (bare op) = torch.ops.diffkernels.<op>.default called directly: the C++ "
         "operator (checks, route, kernel) without the public Python function; "
         "extra.over_bare_op_us = public - bare",
         "DDIM step rows: ours takes both CFG halves (the combine is fused); diffusers = the "
         "pipeline's combine + DDIMScheduler.step; eta = 0; ratio = baseline time / provider time"]
