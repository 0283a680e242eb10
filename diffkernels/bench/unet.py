"""The whole model: our UNet2DConditionModel forward (and the VAE decode) against diffusers
eager (its default SDPA attention processor) and diffusers + torch.compile, with the same
random weights (diffusers' state dict loaded into ours), side by side in one process.

Full-size SD1.5 / SD2.1 / SDXL configs are written out below (no download). Each row also
carries the share of the forward's time spent in our ops (torch.profiler), and the compile
time of the torch.compile baseline separately. needs diffusers (the baseline)."""
import statistics
import time

import torch
import torch._dynamo

from . import common

SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=[320, 640, 1280, 1280], attention_head_dim=8, cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, norm_num_groups=32,
    norm_eps=1e-5, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
    mid_block_scale_factor=1, center_input_sample=False)
SD21 = dict(SD15, sample_size=96, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
            use_linear_projection=True, upcast_attention=True)
SDXL = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=[320, 640, 1280], attention_head_dim=[5, 10, 20],
    transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, flip_sin_to_cos=True,
    freq_shift=0, act_fn="silu")
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, sample_size=512, scaling_factor=0.18215)

# (label, config, latent size); batch 2 = classifier-free guidance.
CUDA_CASES = [("sd15", SD15, 64), ("sd21", SD21, 96), ("sdxl", SDXL, 128), ("vae", SD_VAE, 64)]
CPU_CASES = [("sd15", SD15, 32), ("sd15", SD15, 64), ("vae", SD_VAE, 32)]
QUICK_CASES = [("sd15", SD15, 32)]
OUR_OPS = ("diffkernels::group_norm_silu", "diffkernels::attention")
NOTES = []  # BASE_NOTES + where the time went, filled in by run()

BASE_NOTES = [
    "UNet forward, batch 2 (classifier-free guidance), 77 text tokens, timestep 500; VAE: "
    "decode of batch-1 latents; random weights, the same for every provider",
    "diffkernels-auto = diffkernels.models on the auto backend; diffusers-eager = diffusers "
    "with its default attention processor (SDPA); diffusers-compile = torch.compile of it "
    "(compile time in extra.compile_s, not in the median)",
    "ratio = diffusers-eager time / provider time (> 1: faster); extra.ours_share_pct = share "
    "of our forward's time inside diffkernels ops (torch.profiler)",
]


def _inputs(label, cfg, size, batch, device, dtype):
    g = torch.Generator().manual_seed(0)
    if label == "vae":
        return (torch.randn(batch, cfg["latent_channels"], size, size, generator=g)
                .to(device, dtype),), {}
    x = torch.randn(batch, cfg["in_channels"], size, size, generator=g).to(device, dtype)
    ctx = torch.randn(batch, 77, cfg["cross_attention_dim"], generator=g).to(device, dtype)
    kwargs = {}
    if cfg.get("addition_embed_type") == "text_time":
        px = 8.0 * size
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 1280, generator=g).to(device, dtype),
            "time_ids": torch.tensor([[px, px, 0, 0, px, px]] * batch, device=device,
                                     dtype=dtype)}
    return (x, torch.tensor(500, device=device), ctx), kwargs


def _models(label, cfg, device, dtype):
    """diffusers' model with random weights and ours sharing the very same tensors."""
    import diffusers

    from diffkernels.models import AutoencoderKL, UNet2DConditionModel
    ref_cls, our_cls = ((diffusers.AutoencoderKL, AutoencoderKL) if label == "vae" else
                        (diffusers.UNet2DConditionModel, UNet2DConditionModel))
    ref = common.random_model(ref_cls, cfg, device, dtype)
    with torch.device("meta"):
        ours = our_cls.from_config(dict(ref.config))
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ref, ours.eval()


def _call(model, label, args, kwargs):
    if label == "vae":
        return lambda: model.decode(*args).sample
    return lambda: model(*args, **kwargs).sample


def ours_share_and_profile(fn, device, top=10):
    """(% of the forward's time inside our ops, the top ops by self time) from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    if device.type == "cuda":
        total = sum(e.self_device_time_total for e in events)
        ours = sum(e.device_time_total for e in events if e.key in OUR_OPS)
        self_time = lambda e: e.self_device_time_total  # noqa: E731
    else:
        total = sum(e.self_cpu_time_total for e in events)
        ours = sum(e.cpu_time_total for e in events if e.key in OUR_OPS)
        self_time = lambda e: e.self_cpu_time_total  # noqa: E731
    # our ops counted as a whole (their inner ATen/C++ calls are part of them)
    inner = {e.key: e for e in events}
    rows = [(e.key, self_time(e), e.count) for e in events if self_time(e) > 0]
    for key in OUR_OPS:
        if key in inner:
            e = inner[key]
            rows.append((key + " (total)", e.device_time_total if device.type == "cuda"
                         else e.cpu_time_total, e.count))
    rows.sort(key=lambda r: -r[1])
    return 100.0 * ours / max(total, 1e-9), [(k, 100.0 * t / max(total, 1e-9), n)
                                             for k, t, n in rows[:top]]


def _interleaved_medians(providers, device, iters, label, shape):
    """Median ms per provider, the providers' calls interleaved rep by rep, so that load from
    other processes on a shared machine falls on all of them alike. A provider that rejects
    the case (ours: the VAE's 512-wide head where the op still allows D <= 256) is skipped
    with a message; without ours the case is skipped."""
    live = {}
    for name, fn in providers.items():  # warm-up: oneDNN primitives, allocator, autotuning
        try:
            fn()
        except (ValueError, RuntimeError) as err:  # the op's argument check (Python or C++)
            print(f"  {label} {shape} {name}: skipped ({type(err).__name__}: {err})", flush=True)
            if name == "diffkernels-auto":
                return {}
            continue
        live[name] = fn
    times = {name: [] for name in live}
    for _ in range(iters):
        for name, fn in live.items():
            times[name].append(common.median_ms(fn, device, warmup=0, min_reps=1, max_reps=1,
                                                budget_s=0.0))
    return {name: statistics.median(t) for name, t in times.items()}


def run(device, quick=False, batches=(2,), compile_baseline=None, cases=None, iters=None,
        profile_baseline=None):
    import diffusers  # noqa: F401  (the baseline: fail early and clearly without it)

    device = torch.device(device)
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    if cases is None:
        cases = QUICK_CASES if quick else (CPU_CASES if device.type == "cpu" else CUDA_CASES)
    if compile_baseline is None:  # inductor on a full UNet takes minutes of CPU
        compile_baseline = device.type == "cuda"
    if iters is None:
        iters = 2 if quick else (3 if device.type == "cpu" else 10)
    if profile_baseline is None:  # where diffusers' time goes, for comparison with ours
        profile_baseline = not quick
    dev_name = common.device_name(device)
    rows, built = [], {}
    for label, cfg, size in cases:
        key = (label, id(cfg))
        if key not in built:
            built.clear()  # one full-size model pair in memory at a time
            built[key] = _models(label, cfg, device, dtype)
        ref, ours = built[key]
        for batch in (batches if label != "vae" else (1,)):
            full = dict(ours.config)  # the config with diffusers' defaults filled in
            args, kwargs = _inputs(label, full, size, batch, device, dtype)
            shape = (f"B{batch} latent {args[0].shape[1]}x{size}x{size}"
                     + ("" if label == "vae" else f" ctx 77x{full['cross_attention_dim']}"))
            providers = {"diffkernels-auto": _call(ours, label, args, kwargs),
                         "diffusers-eager": _call(ref, label, args, kwargs)}
            extra = {"diffusers-compile": {}}
            if compile_baseline:
                torch._dynamo.reset()
                compiled = common.compiled(ref.decode if label == "vae" else ref)
                if compiled is not None:
                    cfn = (lambda c=compiled: c(*args).sample) if label == "vae" else \
                        (lambda c=compiled: c(*args, **kwargs).sample)
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        cfn()
                    common._sync(device)
                    extra["diffusers-compile"]["compile_s"] = round(time.perf_counter() - t0, 1)
                    providers["diffusers-compile"] = cfn
            with torch.no_grad():
                medians = _interleaved_medians(providers, device, iters, label, shape)
            if "diffkernels-auto" not in medians:
                continue
            for name, ms in medians.items():
                e = extra.setdefault(name, {})
                with torch.no_grad():
                    if name == "diffkernels-auto":
                        share, top = ours_share_and_profile(providers[name], device)
                        e["ours_share_pct"] = round(share, 1)
                        e["top_ops_pct"] = [(k, round(p, 1), n) for k, p, n in top]
                    elif name == "diffusers-eager" and profile_baseline:
                        e["top_ops_pct"] = [(k, round(p, 1), n) for k, p, n in
                                            ours_share_and_profile(providers[name], device)[1]]
                rows.append(common.Row(f"{label}-{'decode' if label == 'vae' else 'unet'}",
                                       shape, str(dtype).replace("torch.", ""), dev_name, name,
                                       ms, extra=e))
                print(f"  {label} {shape} {name}: {ms:.1f} ms {e.get('ours_share_pct', '')}",
                      flush=True)
    NOTES[:] = BASE_NOTES + _time_notes(rows)
    return common.finish_ratios(rows, lambda group: "diffusers-eager")


def _time_notes(rows):
    """Where the time goes, per row (the markdown table has no column for it)."""
    lines = []
    for r in rows:
        e = r.extra
        if "compile_s" in e:
            lines.append(f"{r.op} {r.shape} {r.provider}: compile time {e['compile_s']} s")
        if "top_ops_pct" in e:
            share = (f"{e['ours_share_pct']}% of the time in diffkernels ops; "
                     if "ours_share_pct" in e else "")
            top = ", ".join(f"{k} {p}% ({n} calls)" for k, p, n in e["top_ops_pct"])
            lines.append(f"{r.op} {r.shape} {r.provider}: {share}self time by op: {top}")
    return lines
