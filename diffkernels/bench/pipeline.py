"""End to end: the whole text-to-image call, diffkernels' StableDiffusionPipeline (plain and
with cuda_graph=True) against what a user would run instead, on the very same random weights
(no download), side by side in one process with the providers' calls interleaved rep by rep:

- diffusers: diffusers.StableDiffusionPipeline eager (its default SDPA attention processors);
- diffusers+compile: the same with torch.compile of its UNet (compile time reported apart);
- diffusers+accelerate: a copy of it run on our ops by diffkernels.integrations.diffusers.

CUDA: SD 1.5-shaped (512 px), SD 2.1-shaped (768 px, v-prediction) and SDXL-shaped (1024 px;
our pipeline is SD 1.x / 2.x only, so the diffusers providers alone) in fp16. CPU: a tiny
pipeline (the test suite's shapes) in fp32. Batch 1 with classifier-free guidance, DDIM.

Per provider: loop it/s = 1 / per-step time, the per-step time from whole calls with two step
counts ((T(n_long) - T(n_short)) / (n_long - n_short), the same method for every provider, no
hooks inside anyone's loop); end-to-end latency = the whole call at n_long steps (text encode,
loop, VAE decode); the first call at a new resolution (torch.compile recompiles, the graph is
captured again); process start -> first denoising step, in a fresh interpreter; and where one
step's time goes (torch.profiler, by kind of op). needs diffusers (the baseline)."""
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from . import common

TINY_UNET = dict(
    block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=32, cross_attention_dim=64,
    attention_head_dim=8, sample_size=32, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])
TINY_VAE = dict(block_out_channels=[32, 64], norm_num_groups=32, latent_channels=4,
                layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2)
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=1, max_position_embeddings=16)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77)
SD21_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                 num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu")
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                 steps_offset=1)
GUIDANCE = 7.5

NOTES = []  # BASE_NOTES + per-case figures, filled in by run()
BASE_NOTES = [
    "whole pipeline call: text encode, sampling loop (UNet batch 2 with classifier-free "
    "guidance 7.5, DDIM), VAE decode, output_type='pt'; random weights, the same for all",
    "diffkernels = diffkernels.pipelines.StableDiffusionPipeline (auto backend; guidance "
    "combined inside the fused step); +cuda-graph: cuda_graph=True (UNet + fused step captured "
    "once, replayed per step); diffusers = diffusers.StableDiffusionPipeline eager (SDPA); "
    "+compile: torch.compile of its UNet; +accelerate: diffkernels.integrations.diffusers."
    "accelerate() on a copy of it",
    "median_ms = end-to-end latency of the whole call at the row's step count; extra.it_s = "
    "loop iterations per second, from the difference of two step counts (same method for "
    "every provider); ratio = diffusers' latency / the provider's; extra.it_s_ratio the same "
    "for the loop alone",
    "extra.first_call_s: the provider's first call in this process (torch.compile compiles "
    "there; diffkernels' kernels are compiled ahead of time); extra.new_resolution_ms: the "
    "first call at another resolution minus a second one (a recompile / a new capture); "
    "extra.start_to_first_step_s: a fresh interpreter, imports + the first 1-step call "
    "(building the random weights excluded; extra.build_s)",
]


def _tokenizer(folder, max_length):
    """A CLIPTokenizer from a small local vocab (letters and a few words; no download)."""
    from transformers import CLIPTokenizer
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {t: i for i, t in enumerate(list(letters) + [c + "</w>" for c in letters]
                                        + ["!", "<|startoftext|>", "<|endoftext|>"])}
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                         model_max_length=max_length)


def _text_encoder(text_cfg):
    """(tokenizer, CLIP text encoder) with random weights, or (None, None) without
    transformers (then every provider gets the same prompt embeddings)."""
    try:
        from transformers import CLIPTextConfig, CLIPTextModel
    except ImportError:
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        tok = _tokenizer(tmp, text_cfg["max_position_embeddings"])
    te = CLIPTextModel(CLIPTextConfig(vocab_size=max(len(tok), 49408), **text_cfg,
                                      bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id)).eval()
    return tok, te


def build(unet_cfg, vae_cfg, text_cfg, device, dtype, scheduler=None, sdxl=False):
    """(ours or None, diffusers' pipeline, with_text) on the same random weights."""
    import diffusers

    from ..models import AutoencoderKL, UNet2DConditionModel
    from ..pipelines import StableDiffusionPipeline
    from ..schedulers import DDIMScheduler

    scheduler = dict(SCHEDULER, **(scheduler or {}))
    ref_unet = common.random_model(diffusers.UNet2DConditionModel, unet_cfg)
    ref_vae = common.random_model(diffusers.AutoencoderKL, vae_cfg, seed=1)
    if sdxl:  # embeddings given: the text encoders are outside the benchmark
        ref = diffusers.StableDiffusionXLPipeline(
            vae=ref_vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
            tokenizer_2=None, unet=ref_unet, scheduler=diffusers.DDIMScheduler(**scheduler),
            force_zeros_for_empty_prompt=False).to(device, dtype)
        ref.set_progress_bar_config(disable=True)
        return None, ref, False
    tok, te = _text_encoder(text_cfg)
    ours_models = []
    for model, cls in ((ref_unet, UNet2DConditionModel), (ref_vae, AutoencoderKL)):
        with torch.device("meta"):
            m = cls.from_config(dict(model.config))
        m.load_state_dict(model.state_dict(), strict=True, assign=True)
        ours_models.append(m.eval())
    ours = StableDiffusionPipeline(ours_models[1], te, tok, ours_models[0],
                                   DDIMScheduler.from_config(scheduler)).to(device, dtype)
    ref = diffusers.StableDiffusionPipeline(
        vae=ref_vae, text_encoder=te, tokenizer=tok, unet=ref_unet,
        scheduler=diffusers.DDIMScheduler(**scheduler), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False).to(device, dtype)
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)
    return ours, ref, te is not None


def _inputs(with_text, text_dim, device, dtype, sdxl=False):
    if with_text:
        return dict(prompt="a photo of a cat", negative_prompt="blurry")
    g = torch.Generator().manual_seed(1)
    out = dict(prompt_embeds=torch.randn((1, 77, text_dim), generator=g).to(device, dtype),
               negative_prompt_embeds=torch.randn((1, 77, text_dim), generator=g).to(device, dtype))
    if sdxl:
        out.update(pooled_prompt_embeds=torch.randn((1, 1280), generator=g).to(device, dtype),
                   negative_pooled_prompt_embeds=torch.randn((1, 1280), generator=g)
                   .to(device, dtype))
    return out


def cases_for(device, quick):
    """(label, unet, vae, text config, pixels, (n_short, n_long), dtype, scheduler, sdxl)."""
    if device.type != "cuda":
        return [("tiny", TINY_UNET, TINY_VAE, TINY_TEXT, 32 if quick else 64,
                 (2, 6) if quick else (2, 12), torch.float32, None, False)]
    from .unet import SD15, SD21, SD_VAE, SDXL
    steps = (5, 15) if quick else (10, 50)
    cases = [("sd15", SD15, SD_VAE, SD15_TEXT, 512, steps, torch.float16, None, False)]
    if not quick:
        cases += [
            ("sd21", SD21, SD_VAE, SD21_TEXT, 768, steps, torch.float16,
             {"prediction_type": "v_prediction"}, False),
            ("sdxl", SDXL, dict(SD_VAE, scaling_factor=0.13025, force_upcast=False),
             {"hidden_size": 2048}, 1024, steps, torch.float16, None, True)]
    return cases


def providers_for(ours, ref, device, compile_baseline=True):
    """name -> pipeline-like callable taking (n_steps, pixels, **inputs)."""
    import diffusers

    def pipe_call(pipe, **extra):
        def call(n, px, **kwargs):
            return pipe(**kwargs, height=px, width=px, num_inference_steps=n,
                        guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(0),
                        output_type="pt", **extra).images
        return call

    out = {}
    if ours is not None:
        out["diffkernels"] = pipe_call(ours)
        if device.type == "cuda":
            out["diffkernels+cuda-graph"] = pipe_call(ours, cuda_graph=True)
    out["diffusers"] = pipe_call(ref)
    if compile_baseline:
        compiled = type(ref)(**ref.components)  # the same modules, its UNet compiled
        compiled.unet = common.compiled(ref.unet)
        if compiled.unet is not None:
            compiled.set_progress_bar_config(disable=True)
            out["diffusers+compile"] = pipe_call(compiled)
    try:
        from ..integrations.diffusers import accelerate
        accelerated = type(ref)(**{**ref.components, "unet": copy.deepcopy(ref.unet),
                                   "vae": copy.deepcopy(ref.vae),
                                   "scheduler": diffusers.DDIMScheduler.from_config(
                                       ref.scheduler.config)})
        accelerated.set_progress_bar_config(disable=True)
        accelerate(accelerated)
        out["diffusers+accelerate"] = pipe_call(accelerated)
    except ImportError as err:
        print(f"  diffusers+accelerate: skipped ({err})", flush=True)
    return out


def _timed(fn, device):
    common._sync(device)
    t0 = time.perf_counter()
    fn()
    common._sync(device)
    return (time.perf_counter() - t0) * 1e3


# ------------------------------------------------------------------ where a step's time goes

KINDS = (("GroupNorm/SiLU", ("group_norm", "groupnorm", "silu")),
         ("attention", ("attention", "attn", "sdpa", "flash", "fmha", "softmax", "bmm")),
         ("conv", ("conv", "fprop", "dgrad", "cudnn")),
         ("matmul/linear", ("gemm", "addmm", "aten::mm", "linear", "matmul", "cutlass")),
         ("scheduler step", ("diffusion_step", "step")))


def kind_of(name):
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def step_breakdown(unet, scheduler_step, latents, embeds, t, device):
    """{kind: % of one denoising step's self time} (device time on GPUs, CPU time on CPUs)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad(), profile(activities=acts) as prof:
        noise_pred = unet(torch.cat([latents] * 2), t, encoder_hidden_states=embeds,
                          return_dict=False)[0]
        scheduler_step(noise_pred, latents)
        common._sync(device)
    totals = {}
    for e in prof.key_averages():
        own = e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total
        if own > 0:
            totals[kind_of(e.key)] = totals.get(kind_of(e.key), 0.0) + own
    total = sum(totals.values()) or 1.0
    return {k: round(100 * v / total, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def _breakdowns(ours, ref, device, dtype, px, text_dim):
    g = torch.Generator().manual_seed(2)
    size = px // 8 if ours is None else px // ours.vae_scale_factor
    latents = torch.randn((1, 4, size, size), generator=g).to(device, dtype)
    embeds = torch.randn((2, 77, text_dim), generator=g).to(device, dtype)
    out = {}
    if ours is not None:
        ours.scheduler.set_timesteps(10, device=device)
        t = int(ours.scheduler.timesteps[0])
        out["diffkernels"] = step_breakdown(
            ours.unet, lambda m, x: ours.scheduler.step(m, t, x, guidance_scale=GUIDANCE),
            latents, embeds, t, device)
    if ref.text_encoder is not None or ours is not None:  # SD: UNet + combine + step
        ref.scheduler.set_timesteps(10, device=device)
        t = int(ref.scheduler.timesteps[0])

        def combine_and_step(m, x):
            u, c = m.chunk(2)
            return ref.scheduler.step(u + GUIDANCE * (c - u), t, x)
        out["diffusers"] = step_breakdown(ref.unet, combine_and_step, latents, embeds, t, device)
    return out


# ------------------------------------------------------------------ process start -> first step

def _first_step_child(label, provider, device_str, parent_start):
    """Runs in a fresh interpreter: imports, builds the case, one 1-step call; prints JSON."""
    t_import = time.time()
    device = torch.device(device_str)
    case = next(c for c in cases_for(device, quick=True) + cases_for(device, quick=False)
                if c[0] == label)
    _, unet_cfg, vae_cfg, text_cfg, px, _, dtype, sched, sdxl = case
    ours, ref, with_text = build(unet_cfg, vae_cfg, text_cfg, device, dtype, sched, sdxl)
    common._sync(device)
    t_built = time.time()
    call = providers_for(ours, ref, device, compile_baseline=provider == "diffusers+compile")[
        provider]
    with torch.no_grad():
        call(1, px, **_inputs(with_text, text_cfg["hidden_size"], device, dtype, sdxl))
    common._sync(device)
    t_done = time.time()
    print(json.dumps({"import_s": t_import - parent_start, "build_s": t_built - t_import,
                      "first_step_s": t_done - t_built,
                      "start_to_first_step_s": (t_import - parent_start) + (t_done - t_built)}))


def start_to_first_step(label, provider, device, timeout=600):
    """{import_s, build_s, first_step_s, start_to_first_step_s} of a fresh interpreter."""
    code = ("import time, sys; _t0 = float(sys.argv[1]); "
            "from diffkernels.bench.pipeline import _first_step_child; "
            "_first_step_child(sys.argv[2], sys.argv[3], sys.argv[4], _t0)")
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", code, repr(start), label, provider, str(device)],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else
                           f"exit {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ the benchmark

def run(device, quick=False, reps=None, cases=None, first_step=None, compile_baseline=True,
        **_):
    import diffusers  # noqa: F401  (the baseline: fail early and clearly without it)

    device = torch.device(device)
    cases = cases or cases_for(device, quick)
    if reps is None:
        reps = 2 if quick else 5
    if first_step is None:  # fresh interpreters: ours and eager (+ compile in a full run)
        first_step = ("diffkernels", "diffkernels+cuda-graph", "diffusers") + (
            () if quick else ("diffusers+compile",))
        if quick and device.type != "cuda":
            first_step = ()
    dev_name = common.device_name(device)
    rows, notes = [], []
    for label, unet_cfg, vae_cfg, text_cfg, px, (n_short, n_long), dtype, sched, sdxl in cases:
        ours, ref, with_text = build(unet_cfg, vae_cfg, text_cfg, device, dtype, sched, sdxl)
        kwargs = _inputs(with_text, text_cfg["hidden_size"], device, dtype, sdxl)
        live, first = {}, {}
        with torch.no_grad():
            for name, call in providers_for(ours, ref, device, compile_baseline).items():
                try:  # the first call: compiles (torch.compile), captures (graph), warms up
                    first[name] = _timed(lambda: call(n_short, px, **kwargs), device)
                    live[name] = call
                except Exception as err:  # noqa: BLE001 - a provider that fails is reported
                    print(f"  pipeline {label} {name}: skipped ({type(err).__name__}: {err})"[:300],
                          flush=True)
            times = {(name, n): [] for name in live for n in (n_short, n_long)}
            for _ in range(reps):
                for n in (n_short, n_long):
                    for name, call in live.items():
                        times[(name, n)].append(_timed(lambda: call(n, px, **kwargs), device))
            # A new resolution: its first call minus its second (recompile / new capture);
            # not in quick mode (torch.compile's recompile alone takes 20 s on 2 CPU cores).
            new_px = px + (64 if device.type == "cuda" else 16)
            new_res = {}
            for name, call in (live.items() if not quick else ()):
                a = _timed(lambda: call(n_short, new_px, **kwargs), device)
                b = _timed(lambda: call(n_short, new_px, **kwargs), device)
                new_res[name] = a - b
            breakdown = _breakdowns(ours, ref, device, dtype, px, text_cfg["hidden_size"])
        med = {k: statistics.median(v) for k, v in times.items()}
        base_step = None
        for name in live:
            step_ms = (med[(name, n_long)] - med[(name, n_short)]) / (n_long - n_short)
            extra = dict(it_s=round(1e3 / step_ms, 2) if step_ms > 0 else None,
                         step_ms=round(step_ms, 3), steps_short=n_short,
                         short_ms=round(med[(name, n_short)], 1),
                         first_call_s=round(first[name] / 1e3, 2),
                         new_resolution_ms=round(new_res[name], 1) if name in new_res else None,
                         prompts="text" if with_text else "embeddings", reps=reps)
            if name in first_step:
                try:
                    fs = start_to_first_step(label, name, device)
                    extra.update(start_to_first_step_s=round(fs["start_to_first_step_s"], 2),
                                 build_s=round(fs["build_s"], 2))
                except Exception as err:  # noqa: BLE001
                    print(f"  pipeline {label} {name}: first-step run failed ({err})", flush=True)
            if name == "diffusers":
                base_step = step_ms
            rows.append(common.Row("pipeline", f"{label} {px}x{px} B1 CFG {n_long} steps",
                                   str(dtype).replace("torch.", ""), dev_name, name,
                                   med[(name, n_long)], extra=extra))
        for r in rows[-len(live):]:  # (a step time <= 0: noise beat the method; no ratio)
            if base_step and base_step > 0 and r.extra["step_ms"] > 0:
                r.extra["it_s_ratio"] = round(base_step / r.extra["step_ms"], 2)
        for name, kinds in breakdown.items():
            notes.append(f"{label} {px}px, one denoising step of {name} (UNet batch 2 + "
                         f"{'fused step' if name == 'diffkernels' else 'CFG combine + step'}), "
                         f"share of the self time: " + ", ".join(f"{k} {v}%" for k, v in
                                                               kinds.items()))
        del ours, ref, live
    for r in rows:
        e = r.extra
        notes.append(f"{r.shape} {r.provider}: {e['it_s']} it/s (loop), {r.median_ms:.0f} ms "
                     f"end to end; first call {e['first_call_s']} s" + (
                         f"; new resolution +{e['new_resolution_ms']} ms"
                         if e["new_resolution_ms"] is not None else "") + (
                         f"; process start -> first step {e['start_to_first_step_s']} s "
                         f"(+ {e['build_s']} s building random weights)"
                         if "start_to_first_step_s" in e else ""))
    NOTES[:] = BASE_NOTES + notes
    return common.finish_ratios(rows, lambda group: "diffusers")
