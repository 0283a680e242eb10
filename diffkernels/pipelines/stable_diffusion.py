"""Text-to-image Stable Diffusion (SD 1.x / 2.x) on diffkernels' models and fused samplers.

Same arguments and, for the same components, seed and settings, the same images as diffusers'
StableDiffusionPipeline (DDIM / DDPM). Differences by design: classifier-free guidance runs as
one UNet batch of 2B whose two halves go straight into the scheduler's fused step (the combine
`uncond + g * (cond - uncond)` happens inside its kernel); no safety checker; nothing in the
sampling loop reads the device (no host sync); weights come from local files only;
cuda_graph=True captures the whole denoising step (UNet + fused step) once and replays it.
"""
import inspect
import time
import warnings
from dataclasses import dataclass
from typing import Any, List, Optional, Union

import numpy as np
import torch

from .. import loading
from ..models.vae import randn_tensor
from ._graph import GraphedDenoiser


@dataclass
class StableDiffusionPipelineOutput:
    """images: a list of PIL images, a [B, H, W, 3] float array in [0, 1] ("np"), a
    [B, 3, H, W] tensor in [0, 1] ("pt"), or the final latents ("latent")."""
    images: Any
    nsfw_content_detected: Optional[List[bool]] = None

    def __getitem__(self, i):
        return (self.images, self.nsfw_content_detected)[i]


class StableDiffusionPipeline:
    """pipe = StableDiffusionPipeline.from_pretrained(folder) (or .from_single_file(file)),
    pipe.to("cuda", torch.float16), pipe("a photo of a cat").images[0].save("cat.png")."""

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None,
                 feature_extractor=None, requires_safety_checker=False):
        if safety_checker is not None:
            raise ValueError("safety_checker: diffkernels' pipeline has none; pass None")
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.unet, self.scheduler = unet, scheduler
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._progress = {}
        self.timings = {}  # of the last call: text_encode_s, step_s (list), decode_s, total_s
        self._graphed = None  # the last cuda_graph=True denoiser (static buffers + graphs)

    # ------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, path, torch_dtype=None, variant=None, scheduler=None,
                        tokenizer=None, safety_checker=None, **kwargs):
        """A local diffusers StableDiffusionPipeline folder (model_index.json, unet/, vae/,
        text_encoder/, tokenizer/, scheduler/). variant="fp16" reads the *.fp16.* weights;
        scheduler: None (the folder's, on DDIM when it is another class), "ddim", "ddpm" or a
        scheduler object. Nothing is downloaded."""
        if kwargs:
            raise TypeError(f"from_pretrained: unsupported argument(s) {sorted(kwargs)}")
        parts = loading.load_folder_components(path, torch_dtype, variant)
        sched = loading.make_scheduler(parts["scheduler_config"], scheduler, source=str(path))
        return cls(parts["vae"], parts["text_encoder"],
                   loading.load_tokenizer(tokenizer) or parts["tokenizer"], parts["unet"], sched)

    @classmethod
    def from_single_file(cls, path, torch_dtype=None, scheduler=None, prediction_type=None,
                         tokenizer=None, image_size=None, use_ema=True, unet_config=None,
                         vae_config=None, text_encoder_config=None, **kwargs):
        """A CompVis / original SD 1.x / 2.x checkpoint (.safetensors, or .ckpt read with
        torch.load(weights_only=True)). The file holds no tokenizer: pass tokenizer= (a
        CLIPTokenizer or a local folder) to use prompts; otherwise one from the local Hugging
        Face cache is used if present, else only prompt_embeds work. SD 2.x 768 px models
        need prediction_type="v_prediction". unet_config / vae_config / text_encoder_config
        override what the tensors' shapes cannot tell (head counts, GroupNorm groups)."""
        if kwargs:
            raise TypeError(f"from_single_file: unsupported argument(s) {sorted(kwargs)}")
        parts = loading.load_single_file_components(
            path, torch_dtype, prediction_type, image_size, use_ema, unet_config, vae_config,
            text_encoder_config)
        sched = loading.make_scheduler(parts["scheduler_config"], scheduler)
        tok = loading.load_tokenizer(tokenizer)
        if tok is None and parts["text_encoder"] is not None:
            tok = loading.local_clip_tokenizer(parts["kind"])
        return cls(parts["vae"], parts["text_encoder"], tok, parts["unet"], sched)

    def components(self):
        return dict(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                    unet=self.unet, scheduler=self.scheduler)

    def to(self, device=None, dtype=None):
        """Moves (and casts) the UNet, VAE and text encoder; returns self."""
        if isinstance(device, torch.dtype) and dtype is None:
            device, dtype = None, device
        for m in (self.unet, self.vae, self.text_encoder):
            if m is not None:
                m.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def set_progress_bar_config(self, **kwargs):
        """tqdm options (disable=True turns the bar off)."""
        self._progress = kwargs

    def progress_bar(self, total):
        from tqdm.auto import tqdm
        return tqdm(total=total, **self._progress)

    # ------------------------------------------------------------ pieces of __call__

    def check_inputs(self, prompt, height, width, negative_prompt, prompt_embeds,
                     negative_prompt_embeds, num_inference_steps, num_images_per_prompt):
        if height % 8 != 0 or width % 8 != 0:
            raise ValueError(f"height and width: must be multiples of 8, got {height}x{width}")
        if height <= 0 or width <= 0:
            raise ValueError(f"height and width: must be positive, got {height}x{width}")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("prompt and prompt_embeds: pass one of them, not both")
        if prompt is None and prompt_embeds is None:
            raise ValueError("prompt: pass a prompt (str or list of str) or prompt_embeds")
        if prompt is not None and not (isinstance(prompt, str) or (
                isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt))):
            raise TypeError(f"prompt: expected a str or a non-empty list of str, got {type(prompt).__name__}")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("negative_prompt and negative_prompt_embeds: pass one of them")
        if prompt_embeds is not None and negative_prompt_embeds is not None and \
                prompt_embeds.shape != negative_prompt_embeds.shape:
            raise ValueError(f"negative_prompt_embeds: shape {list(negative_prompt_embeds.shape)} "
                             f"must equal prompt_embeds' {list(prompt_embeds.shape)}")
        if prompt_embeds is not None and prompt_embeds.dim() != 3:
            raise ValueError(f"prompt_embeds: expected [batch, tokens, dim], got shape "
                             f"{list(prompt_embeds.shape)}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps: expected a positive int, got {num_inference_steps!r}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt: expected a positive int, got {num_images_per_prompt!r}")

    def _encode(self, text: List[str], device, max_length=None, check_truncation=True):
        if self.text_encoder is None or self.tokenizer is None:
            missing = "text_encoder" if self.text_encoder is None else "tokenizer"
            raise ValueError(f"prompt: this pipeline has no {missing} (transformers not installed,"
                             f" or a single file loaded without tokenizer= / --tokenizer DIR): "
                             f"pass prompt_embeds and negative_prompt_embeds instead")
        max_length = max_length or self.tokenizer.model_max_length
        ids = self.tokenizer(text, padding="max_length", max_length=max_length, truncation=True,
                             return_tensors="pt").input_ids
        if check_truncation:
            full = self.tokenizer(text, padding="longest", return_tensors="pt").input_ids
            if full.shape[-1] >= ids.shape[-1] and not torch.equal(ids, full[:, :ids.shape[-1]]):
                removed = self.tokenizer.batch_decode(full[:, max_length - 1:-1])
                warnings.warn(f"The following part of your input was truncated because CLIP can "
                              f"only handle sequences up to {max_length} tokens: {removed}",
                              stacklevel=3)
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = self.tokenizer(text, padding="max_length", max_length=max_length,
                                  truncation=True, return_tensors="pt").attention_mask.to(device)
        with torch.no_grad():
            return self.text_encoder(ids.to(device), attention_mask=mask)[0]

    def encode_prompt(self, prompt, device, num_images_per_prompt, do_classifier_free_guidance,
                      negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None):
        """(prompt_embeds, negative_prompt_embeds) with num_images_per_prompt copies each, as
        diffusers' encode_prompt (negative None without guidance)."""
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype
        if prompt_embeds is None:
            prompt = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds = self._encode(prompt, device)
        batch = prompt_embeds.shape[0]
        prompt_embeds = prompt_embeds.to(dtype=dtype, device=device)
        _, seq, _ = prompt_embeds.shape
        prompt_embeds = prompt_embeds.repeat(1, num_images_per_prompt, 1).view(
            batch * num_images_per_prompt, seq, -1)
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            if negative_prompt is None:
                uncond = [""] * batch
            elif isinstance(negative_prompt, str):  # the same one for every prompt
                uncond = [negative_prompt] * batch
            else:
                uncond = list(negative_prompt)
            if len(uncond) != batch:
                raise ValueError(f"negative_prompt: has batch size {len(uncond)}, but prompt has "
                                 f"{batch}; pass one negative prompt per prompt")
            negative_prompt_embeds = self._encode(uncond, device, max_length=seq,
                                                  check_truncation=False)
        if do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_embeds.to(dtype=dtype, device=device)
            negative_prompt_embeds = negative_prompt_embeds.repeat(1, num_images_per_prompt, 1).view(
                batch * num_images_per_prompt, seq, -1)
        return prompt_embeds, negative_prompt_embeds

    def prepare_latents(self, batch, channels, height, width, dtype, device, generator, latents):
        shape = (batch, channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"generator: a list of {len(generator)} generators for batch {batch}"
                             f"; pass one per image")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents: expected shape {list(shape)}, got {list(latents.shape)}")
            latents = latents.to(device)
        sigma = getattr(self.scheduler, "init_noise_sigma", 1.0)
        return latents if sigma == 1.0 else latents * sigma

    def _step_fn(self, guidance, do_cfg, eta, generator):
        """scheduler.step with the CFG combine inside it when the scheduler fuses it (ours);
        a scheduler without guidance_scale (e.g. diffusers') gets the combined output."""
        params = inspect.signature(self.scheduler.step).parameters
        extra = {}
        if "eta" in params:
            extra["eta"] = eta
        if "generator" in params:
            extra["generator"] = generator
        fused = "guidance_scale" in params
        step = self.scheduler.step

        def run(noise_pred, t, latents):
            if do_cfg and fused:
                return step(noise_pred, t, latents, guidance_scale=guidance, return_dict=False, **extra)[0]
            if do_cfg:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + guidance * (cond - uncond)
            return step(noise_pred, t, latents, return_dict=False, **extra)[0]
        return run

    def _denoise_graphed(self, latents, prompt_embeds, guidance_scale, do_cfg, eta, generator):
        """(latents, the loop's _StepClock) of the cuda_graph=True loop."""
        plan_of = getattr(self.scheduler, "sampling_plan", None)
        if plan_of is None:
            raise ValueError(f"cuda_graph: needs diffkernels' DDIMScheduler or DDPMScheduler "
                             f"(their steps read coefficients from device memory), got "
                             f"{type(self.scheduler).__name__}")
        # eta as the plain loop passes it: to a scheduler whose step takes it.
        takes_eta = "eta" in inspect.signature(self.scheduler.step).parameters
        plan = plan_of(**({"eta": eta} if takes_eta else {}))
        graphed = self._graphed
        if graphed is None or graphed.unet is not self.unet or not graphed.key_matches(
                latents, prompt_embeds, plan, guidance_scale, do_cfg):
            self._graphed = None  # frees the old graphs' memory first
            graphed = self._graphed = GraphedDenoiser(
                self.unet, latents, prompt_embeds, plan, guidance_scale, do_cfg,
                capture=latents.device.type == "cuda",
                max_steps=max(len(plan.timesteps), self.scheduler.config.num_train_timesteps))
        graphed.load(latents, prompt_embeds, plan, generator)
        n = len(plan.timesteps)
        marks = _StepClock(latents.device, steps_per_mark=n)  # the loop alone, no capture
        with self.progress_bar(total=n) as bar:
            latents = graphed.run().clone()
            marks.mark()
            bar.update(n)  # once: the loop does nothing but replay
        return latents, marks

    def reset_cuda_graph(self):
        """Drops the captured graphs and their buffers (the next cuda_graph=True call
        captures again): after replacing parameter tensors, or to free their memory."""
        self._graphed = None

    def decode_latents(self, latents):
        return self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]

    @staticmethod
    def postprocess(image, output_type):
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return image
        array = image.cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "np":
            return array
        from PIL import Image
        return [Image.fromarray(a) for a in (array * 255).round().astype("uint8")]

    # ------------------------------------------------------------ the call

    @torch.no_grad()
    def __call__(self, prompt: Union[str, List[str], None] = None,
                 height: Optional[int] = None, width: Optional[int] = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 negative_prompt: Union[str, List[str], None] = None,
                 num_images_per_prompt: int = 1, eta: float = 0.0,
                 generator: Union[torch.Generator, List[torch.Generator], None] = None,
                 latents: Optional[torch.Tensor] = None,
                 prompt_embeds: Optional[torch.Tensor] = None,
                 negative_prompt_embeds: Optional[torch.Tensor] = None,
                 output_type: str = "pil", return_dict: bool = True, cuda_graph: bool = False):
        """Text (or prompt embeddings) -> images, diffusers' argument names and defaults.
        guidance_scale > 1 enables classifier-free guidance.

        cuda_graph=True: the denoising step (UNet on the CFG batch + the fused CFG/scheduler
        step) is captured once per (resolution, batch, dtype, guidance) and replayed
        for every step, the same result as the plain loop (pipelines/_graph.py). Needs
        diffkernels' DDIM/DDPM scheduler; changes of the weights in place are seen by the
        replay, new parameter tensors need reset_cuda_graph(). On a CPU the same static-buffer
        loop runs uncaptured."""
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type: expected 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        self.check_inputs(prompt, height, width, negative_prompt, prompt_embeds,
                          negative_prompt_embeds, num_inference_steps, num_images_per_prompt)
        device = self.device
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        do_cfg = guidance_scale > 1.0
        t_start = time.perf_counter()

        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, do_cfg, negative_prompt, prompt_embeds,
            negative_prompt_embeds)
        if do_cfg:  # unconditional first: the order the fused step expects
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
        prompt_embeds = prompt_embeds.to(self.unet.dtype)
        batch = prompt_embeds.shape[0] // (2 if do_cfg else 1)
        sync()
        t_text = time.perf_counter()

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self.prepare_latents(batch, self.unet.config.in_channels, height, width,
                                       prompt_embeds.dtype, device, generator, latents)
        if cuda_graph:
            latents, marks = self._denoise_graphed(latents, prompt_embeds, guidance_scale,
                                                   do_cfg, eta, generator)
        else:
            step = self._step_fn(float(guidance_scale), do_cfg, eta, generator)
            scale_input = getattr(self.scheduler, "scale_model_input", None)
            # Read once before the loop (the only device read): host ints go to the scheduler
            # (a dict lookup) and the UNet (a fill on the device), so the loop never syncs.
            host_timesteps = self.scheduler.timesteps.tolist()
            marks = _StepClock(device)
            with self.progress_bar(total=len(host_timesteps)) as bar:
                for t in host_timesteps:
                    model_input = torch.cat([latents] * 2) if do_cfg else latents
                    if scale_input is not None:
                        model_input = scale_input(model_input, t)
                    noise_pred = self.unet(model_input, t, encoder_hidden_states=prompt_embeds,
                                           return_dict=False)[0]
                    latents = step(noise_pred, t, latents)
                    marks.mark()
                    bar.update()

        if output_type == "latent":
            image = latents
        else:
            image = self.postprocess(self.decode_latents(latents.to(self.vae.dtype)), output_type)
        sync()
        t_end = time.perf_counter()
        step_s = marks.seconds()
        loop_s = sum(step_s)
        self.timings = dict(text_encode_s=t_text - t_start, step_s=step_s,
                            decode_s=max(0.0, t_end - t_text - loop_s) if output_type != "latent" else 0.0,
                            total_s=t_end - t_start)
        if not return_dict:
            return (image, None)
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=None)


class _StepClock:
    """Per-step wall times without syncing inside the loop: CUDA events recorded after each
    step and read once at the end; perf_counter on the CPU."""

    def __init__(self, device, steps_per_mark=1):
        self.steps_per_mark = steps_per_mark  # > 1: marks around n steps run without the host
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.events = [torch.cuda.Event(enable_timing=True)]
            self.events[0].record()
        else:
            self.times = [time.perf_counter()]

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.events.append(e)
        else:
            self.times.append(time.perf_counter())

    def seconds(self):
        if self.cuda:
            self.events[-1].synchronize()
            out = [a.elapsed_time(b) / 1e3 for a, b in zip(self.events, self.events[1:])]
        else:
            out = [float(d) for d in np.diff(self.times)]
        n = self.steps_per_mark
        return [d / n for d in out for _ in range(n)]
