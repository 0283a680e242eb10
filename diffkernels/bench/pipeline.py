"""The whole text-to-image pipeline: diffkernels' StableDiffusionPipeline against diffusers'
StableDiffusionPipeline on the very same components (random weights, no download), side by
side in one process, the providers' calls interleaved rep by rep.

CPU: a tiny pipeline (the test suite's shapes). CUDA: an SD 1.5-shaped one (UNet 320..1280,
VAE 128..512, CLIP ViT-L-shaped text encoder) at 512 x 512 in fp16. Prompts go through the
CLIP text encoder when transformers is installed, else both pipelines get the same prompt
embeddings. Per-step time = (T(n_long) - T(n_short)) / (n_long - n_short) of whole calls, the
same method for both providers (no hooks inside either loop); it/s = 1 / per-step time.
needs diffusers (the baseline)."""
import json
import os
import statistics
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
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                 steps_offset=1)

NOTES = []  # BASE_NOTES + it/s per row, filled in by run()
BASE_NOTES = [
    "whole pipeline call: text encode, sampling loop (UNet batch 2B with classifier-free "
    "guidance 7.5, DDIM), VAE decode, output_type='pt'; random weights, the same for both",
    "diffkernels = diffkernels.pipelines.StableDiffusionPipeline (auto backend; guidance "
    "combined inside the fused step); diffusers = diffusers.StableDiffusionPipeline, eager",
    "extra.cpu_ms / cpu_ms_per_step: this process' CPU time (user + system, all threads) for "
    "the same calls: less sensitive than wall time to other processes on a shared machine",
    "median_ms = latency of the whole call with the row's step count; extra.step_ms from the "
    "difference of two step counts; extra.it_s = 1000 / step_ms; ratio = diffusers / ours",
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


def build(unet_cfg, vae_cfg, text_cfg, device, dtype):
    """(ours, diffusers') pipelines sharing the same random weights."""
    import diffusers

    from ..models import AutoencoderKL, UNet2DConditionModel
    from ..pipelines import StableDiffusionPipeline
    from ..schedulers import DDIMScheduler

    torch.manual_seed(0)
    ref_unet = diffusers.UNet2DConditionModel(**unet_cfg).eval()
    ref_vae = diffusers.AutoencoderKL(**vae_cfg).eval()
    tok = te = None
    try:
        from transformers import CLIPTextConfig, CLIPTextModel
        with tempfile.TemporaryDirectory() as tmp:
            tok = _tokenizer(tmp, text_cfg["max_position_embeddings"])
        te = CLIPTextModel(CLIPTextConfig(vocab_size=max(len(tok), 49408), **text_cfg,
                                          bos_token_id=tok.bos_token_id,
                                          eos_token_id=tok.eos_token_id,
                                          pad_token_id=tok.pad_token_id)).eval()
    except ImportError:
        pass
    ours_models = []
    for ref, cls in ((ref_unet, UNet2DConditionModel), (ref_vae, AutoencoderKL)):
        with torch.device("meta"):
            m = cls.from_config(dict(ref.config))
        m.load_state_dict(ref.state_dict(), strict=True, assign=True)
        ours_models.append(m.eval())
    ours = StableDiffusionPipeline(ours_models[1], te, tok, ours_models[0],
                                   DDIMScheduler.from_config(SCHEDULER)).to(device, dtype)
    ref = diffusers.StableDiffusionPipeline(
        vae=ref_vae, text_encoder=te, tokenizer=tok, unet=ref_unet,
        scheduler=diffusers.DDIMScheduler(**SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False).to(device, dtype)
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)
    return ours, ref, te is not None


def _inputs(with_text, text_cfg, device, dtype):
    if with_text:
        return dict(prompt="a photo of a cat", negative_prompt="blurry")
    g = torch.Generator().manual_seed(1)
    shape = (1, text_cfg["max_position_embeddings"], text_cfg["hidden_size"])
    return dict(prompt_embeds=torch.randn(shape, generator=g).to(device, dtype),
                negative_prompt_embeds=torch.randn(shape, generator=g).to(device, dtype))


def run(device, quick=False, reps=None, cases=None, **_):
    import diffusers  # noqa: F401  (the baseline: fail early and clearly without it)

    device = torch.device(device)
    if cases is None:
        if device.type == "cuda":
            from .unet import SD15, SD_VAE
            cases = [("sd15", SD15, SD_VAE, SD15_TEXT, 512, (5, 20), torch.float16)]
        else:
            cases = [("tiny", TINY_UNET, TINY_VAE, TINY_TEXT, 32 if quick else 64,
                      (1, 2) if quick else (2, 10), torch.float32)]
    if reps is None:
        reps = 1 if quick else 5
    dev_name = common.device_name(device)
    rows = []
    for label, unet_cfg, vae_cfg, text_cfg, px, (n_short, n_long), dtype in cases:
        ours, ref, with_text = build(unet_cfg, vae_cfg, text_cfg, device, dtype)
        kwargs = _inputs(with_text, text_cfg, device, dtype)
        providers = {"diffkernels": ours, "diffusers": ref}

        def call(pipe, n):
            return pipe(**kwargs, height=px, width=px, num_inference_steps=n, guidance_scale=7.5,
                        generator=torch.Generator().manual_seed(0), output_type="pt").images

        live = {}
        for name, pipe in providers.items():  # warm-up; a provider that rejects the case is skipped
            try:
                call(pipe, 1)
                live[name] = pipe
            except ValueError as err:
                print(f"  pipeline {label} {name}: skipped ({err})", flush=True)
        if "diffkernels" not in live:
            continue
        times = {(name, n): [] for name in live for n in (n_short, n_long)}
        cpu = {k: [] for k in times}
        for _ in range(reps):
            for n in (n_short, n_long):
                for name, pipe in live.items():
                    c0 = time.process_time()
                    times[(name, n)].append(common.median_ms(
                        lambda p=pipe, n=n: call(p, n), device, warmup=0, min_reps=1,
                        max_reps=1, budget_s=0.0))
                    cpu[(name, n)].append((time.process_time() - c0) * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
        for name in live:
            step_ms = (med[(name, n_long)] - med[(name, n_short)]) / (n_long - n_short)
            cpu_step = (cpu_med[(name, n_long)] - cpu_med[(name, n_short)]) / (n_long - n_short)
            extra = dict(step_ms=round(step_ms, 3),
                         cpu_ms_per_step=round(cpu_step, 3),  # this process' CPU time: robust
                         cpu_ms=round(cpu_med[(name, n_long)], 2),  # on a shared machine
                         it_s=round(1e3 / step_ms, 3) if step_ms > 0 else None,
                         steps_short=n_short, short_ms=round(med[(name, n_short)], 2),
                         prompts="text" if with_text else "embeddings", reps=reps)
            rows.append(common.Row("pipeline", f"{label} {px}x{px} B1 CFG {n_long} steps",
                                   str(dtype).replace("torch.", ""), dev_name, name,
                                   med[(name, n_long)], extra=extra))
            print(f"  pipeline {label} {px}px {name}: {med[(name, n_long)]:.1f} ms for {n_long} "
                  f"steps, {extra['it_s']} it/s", flush=True)
        del ours, ref, live, providers
    NOTES[:] = BASE_NOTES + [
        f"{r.shape} {r.dtype} {r.provider}: {r.extra['step_ms']:.1f} ms/step = {r.extra['it_s']} it/s"
        f" (UNet batch 2), {r.median_ms:.1f} ms for the whole call; process CPU time "
        f"{r.extra['cpu_ms_per_step']:.1f} ms/step, {r.extra['cpu_ms']:.1f} ms per call"
        for r in rows]
    return common.finish_ratios(rows, lambda group: "diffusers")
