"""The denoising loop as one CUDA graph: the UNet on the CFG batch and the fused CFG/scheduler
step are captured once and replayed for every step, with no host work per step beyond the
replay.

Everything a step reads lives in static device buffers that the captured kernels read by
address: the latents (updated in place), the prompt embeddings, and per-step tables indexed by
a device step counter that the graph itself increments: timesteps [N], the fused step's
coefficients [N, 11] (diffusion_step reads them from device memory) and the noise [N, ...],
drawn before the loop from the caller's generator in the order the plain loop draws it, so the
result equals the plain loop's. Steps with and without noise (DDPM's last step) are two
captures sharing one memory pool; the tables are sized for the scheduler's training steps, so
another step count needs no new capture.

On a CPU the same static-buffer step runs uncaptured: the code path that is captured on a GPU,
testable here (no host reads, the same buffers every step, the plain loop's result).
"""
import torch

from .._backend import get_backend
from ..models.vae import randn_tensor
from ..ops.diffusion_step import diffusion_step


class GraphedDenoiser:
    """Static buffers and captured graphs for one (latent shape, embeddings shape, dtype, CFG,
    guidance, variance mode, clip range, dk backend). The step tables hold up to max_steps
    rows, so a change of the step count re-captures nothing (a noise table that must grow
    re-captures the noisy step only)."""

    def __init__(self, unet, latents, prompt_embeds, plan, guidance_scale, do_cfg, capture,
                 max_steps):
        device = latents.device
        self.unet, self.do_cfg, self.guidance = unet, do_cfg, float(guidance_scale)
        self.variance_mode, self.clip_range = plan.variance_mode, plan.clip_range
        self.latents = torch.empty_like(latents, memory_format=torch.contiguous_format)
        self.prompt_embeds = prompt_embeds.clone()
        self.step_index = torch.zeros(1, dtype=torch.int64, device=device)
        self.timesteps = torch.zeros(max_steps, dtype=torch.int64, device=device)
        self.coeffs = torch.zeros(max_steps, 11, dtype=torch.float32, device=device)
        self.noise = None      # [steps, *latents.shape], allocated when a plan needs noise
        self.noise_steps = []  # of the loaded plan
        self.graphs = {}       # with_noise -> torch.cuda.CUDAGraph
        self.capture = capture
        self.captures = 0
        self.backend = get_backend()  # the kernels a capture holds

    def key_matches(self, latents, prompt_embeds, plan, guidance_scale, do_cfg):
        return (get_backend() == self.backend and tuple(latents.shape) == tuple(self.latents.shape)
                and latents.dtype == self.latents.dtype and latents.device == self.latents.device
                and tuple(prompt_embeds.shape) == tuple(self.prompt_embeds.shape)
                and prompt_embeds.dtype == self.prompt_embeds.dtype
                and len(plan.timesteps) <= len(self.timesteps) and do_cfg == self.do_cfg
                and float(guidance_scale) == self.guidance
                and plan.variance_mode == self.variance_mode
                and plan.clip_range == self.clip_range)

    def _step(self, with_noise):
        """One denoising step from the static buffers (what the graph holds)."""
        i = self.step_index
        x = self.latents
        t = self.timesteps.index_select(0, i)
        model_input = torch.cat([x, x]) if self.do_cfg else x
        noise_pred = self.unet(model_input, t, encoder_hidden_states=self.prompt_embeds,
                               return_dict=False)[0]
        noise = self.noise.index_select(0, i).view(x.shape) if with_noise else None
        prev, _ = diffusion_step(noise_pred, x, self.coeffs.index_select(0, i).view(11),
                                 noise=noise, variance_mode=self.variance_mode,
                                 clip_range=self.clip_range, guidance_scale=self.guidance,
                                 cfg=self.do_cfg)
        x.copy_(prev)
        i.add_(1)

    def _capture(self, with_noise):
        # Warm up on a side stream first (lazy inits, cuBLAS workspaces, Triton compiles), as
        # torch.cuda.graphs asks; the warm-up's effect on the buffers is reset before the run.
        side = torch.cuda.Stream(self.latents.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step(with_noise)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        pool = next(iter(self.graphs.values())).pool() if self.graphs else None
        with torch.cuda.graph(graph, pool=pool):
            self._step(with_noise)
        self.graphs[with_noise] = graph
        self.captures += 1

    def load(self, latents, prompt_embeds, plan, generator):
        """Fills the static buffers for one sampling run (host -> device copies, before the
        loop), draws the noise of every noisy step in the plain loop's order, and captures
        the graphs this plan needs that are not captured yet."""
        n = len(plan.timesteps)
        self.noise_steps = list(plan.noise_steps)
        self.timesteps[:n].copy_(torch.tensor(plan.timesteps, dtype=torch.int64))
        self.coeffs[:n].copy_(torch.tensor(plan.coeffs, dtype=torch.float64).float())
        self.prompt_embeds.copy_(prompt_embeds)
        if any(self.noise_steps):
            if self.noise is None or len(self.noise) < n:  # a new table: re-capture its step
                self.graphs.pop(True, None)
                self.noise = torch.zeros((n, *latents.shape), dtype=latents.dtype,
                                         device=latents.device)
            for i, noisy in enumerate(self.noise_steps):
                if noisy:
                    self.noise[i].copy_(randn_tensor(tuple(latents.shape), generator,
                                                     latents.device, latents.dtype))
        if self.capture:
            for with_noise in sorted(set(self.noise_steps)):
                if with_noise not in self.graphs:
                    self.latents.copy_(latents)
                    self.step_index.zero_()
                    self._capture(with_noise)
        self.latents.copy_(latents)
        self.step_index.zero_()

    def run(self):
        """Every step: graph replays only (or the uncaptured step on a CPU)."""
        if self.capture:
            for with_noise in self.noise_steps:
                self.graphs[with_noise].replay()
        else:
            for with_noise in self.noise_steps:
                self._step(with_noise)
        return self.latents
