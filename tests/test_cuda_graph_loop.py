"""StableDiffusionPipeline(cuda_graph=True): the denoising step (UNet on the CFG batch + the
fused CFG/scheduler step) from static buffers, captured once and replayed on a GPU. Here on the
CPU the same static-buffer code path runs uncaptured, and what makes capture safe is tested:
the result equals the plain loop's bit for bit, nothing in the loop reads a tensor on the host,
every step reads the same buffers, and a new capture happens only for a new shape. The GPU
cases (replay == eager, capture counts) run when CUDA is present."""
import pytest
import torch

from sd_tiny import tiny  # noqa: F401  (the session fixture)

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffkernels.pipelines import StableDiffusionPipeline, _graph  # noqa: E402

SIZE = dict(height=16, width=24, num_inference_steps=3)
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "cpu", "numpy")


@pytest.fixture(scope="module")
def pipes(tiny):
    out = {}
    for name in ("ddim", "ddpm"):
        pipe = StableDiffusionPipeline.from_pretrained(tiny["folder"], scheduler=name)
        pipe.set_progress_bar_config(disable=True)
        out[name] = pipe
    return out


def _run(pipe, cuda_graph, guidance=7.5, eta=0.0, seed=0, **size):
    return pipe(prompt=["a cat", "a dog"], negative_prompt="blurry", guidance_scale=guidance,
                eta=eta, generator=torch.Generator().manual_seed(seed), output_type="latent",
                cuda_graph=cuda_graph, **{**SIZE, **size}).images


@pytest.mark.parametrize("name,guidance,eta", [
    ("ddim", 7.5, 0.0), ("ddim", 7.5, 0.6), ("ddim", 1.0, 0.0), ("ddpm", 7.5, 0.0),
    ("ddpm", 1.0, 0.0)])
def test_graph_path_equals_the_plain_loop(pipes, name, guidance, eta):
    pipe = pipes[name]
    plain = _run(pipe, False, guidance, eta)
    graphed = _run(pipe, True, guidance, eta)
    assert torch.equal(plain, graphed)
    assert len(pipe.timings["step_s"]) == SIZE["num_inference_steps"]
    assert not torch.equal(_run(pipe, True, guidance, eta, seed=1), graphed) or eta == 0 and \
        name == "ddim"  # the noise (and so the latents) come from the caller's generator


def test_no_host_reads_inside_the_loop(pipes, monkeypatch):
    """Inside GraphedDenoiser.run (every step), any host read of any tensor raises: on a GPU it
    would break the capture."""
    pipe = pipes["ddpm"]
    armed = {"on": False, "steps": 0}

    def trap(name):
        original = getattr(torch.Tensor, name)

        def method(self, *args, **kwargs):
            if armed["on"]:
                raise AssertionError(f"Tensor.{name} inside the captured loop")
            return original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, method)
    for name in HOST_READS:
        trap(name)
    run, step = _graph.GraphedDenoiser.run, _graph.GraphedDenoiser._step

    def armed_run(self):
        armed["on"] = True
        try:
            return run(self)
        finally:
            armed["on"] = False

    def counted_step(self, with_noise):
        armed["steps"] += armed["on"]
        return step(self, with_noise)
    monkeypatch.setattr(_graph.GraphedDenoiser, "run", armed_run)
    monkeypatch.setattr(_graph.GraphedDenoiser, "_step", counted_step)
    _run(pipe, True)
    assert armed["steps"] == SIZE["num_inference_steps"]
    armed["on"] = True  # the trap itself bites
    with pytest.raises(AssertionError, match="captured loop"):
        bool(torch.ones(()))
    armed["on"] = False


def test_every_step_reads_the_same_buffers(pipes, monkeypatch):
    pipe = pipes["ddim"]
    seen = []
    kernel = _graph.diffusion_step

    def recording_step(model_output, sample, coeffs, **kwargs):
        seen.append(sample.data_ptr())
        return kernel(model_output, sample, coeffs, **kwargs)
    forward = pipe.unet.forward
    embeds = []

    def recording_forward(sample, timestep, encoder_hidden_states, **kwargs):
        embeds.append(encoder_hidden_states.data_ptr())
        return forward(sample, timestep, encoder_hidden_states, **kwargs)
    monkeypatch.setattr(_graph, "diffusion_step", recording_step)
    monkeypatch.setattr(pipe.unet, "forward", recording_forward)
    _run(pipe, True)
    graphed = pipe._graphed
    assert len(seen) == len(embeds) == SIZE["num_inference_steps"]
    # The per-step timestep and coefficients are gathered from static tables by the device
    # step counter (new tensors here, fixed addresses in the graph's pool on a GPU).
    assert set(seen) == {graphed.latents.data_ptr()}
    assert set(embeds) == {graphed.prompt_embeds.data_ptr()}


def test_buffers_are_kept_until_the_shape_changes(pipes):
    pipe = pipes["ddim"]
    _run(pipe, True)
    first = pipe._graphed
    _run(pipe, True, seed=3)                      # same shapes, new noise: same buffers
    assert pipe._graphed is first
    _run(pipe, True, height=24)                   # new resolution: new buffers (a new capture)
    assert pipe._graphed is not first
    second = pipe._graphed
    _run(pipe, True, height=24, num_inference_steps=7)  # another step count: same tables
    assert pipe._graphed is second
    pipe.reset_cuda_graph()
    assert pipe._graphed is None


def test_the_fused_step_reads_device_coefficients():
    """What the captured step relies on: diffusion_step with an fp32 [11] coefficient tensor
    gives what the 11 host floats give (every backend here)."""
    import diffkernels as dk
    g = torch.Generator().manual_seed(0)
    x, mo = torch.randn(2, 4, 5, 7, generator=g), torch.randn(4, 8, 5, 7, generator=g)
    noise = torch.randn(2, 4, 5, 7, generator=g)
    mo[:, 4:] = mo[:, 4:].abs()  # a learned variance >= 0 (sqrt of it)
    k = torch.rand(11, generator=g).tolist()
    for backend in dk.available_backends():
        if backend in ("cuda", "triton"):
            continue  # CUDA tensors: tests/test_diffusion_step.py on a GPU
        with dk.backend(backend):
            for mode in (0, 1, 2):
                out = mo if mode else mo[:, :4]
                a = dk.diffusion_step(out, x, k, noise=noise, variance_mode=mode, cfg=True,
                                      guidance_scale=4.0)
                b = dk.diffusion_step(out, x, torch.tensor(k), noise=noise, variance_mode=mode,
                                      cfg=True, guidance_scale=4.0)
                assert all(torch.equal(u, v) for u, v in zip(a, b)), (backend, mode)
    with pytest.raises(TypeError, match="device_coeffs: expected dtype"):
        dk.diffusion_step(mo[:, :4], x, torch.tensor(k, dtype=torch.float64), cfg=True)
    with pytest.raises(ValueError, match=r"device_coeffs: expected shape \[11\]"):
        dk.diffusion_step(mo[:, :4], x, torch.zeros(10), cfg=True)


def test_unsupported_setups_raise(pipes, tiny):
    import diffusers
    pipe = pipes["ddim"]
    theirs = StableDiffusionPipeline(pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet,
                                     diffusers.DDIMScheduler.from_config(pipe.scheduler.config))
    theirs.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="cuda_graph: needs diffkernels' DDIMScheduler"):
        _run(theirs, True)
    thresholded = StableDiffusionPipeline.from_pretrained(tiny["folder"], scheduler="ddpm")
    thresholded.scheduler = type(thresholded.scheduler).from_config(
        {**thresholded.scheduler.config, "thresholding": True})
    thresholded.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="thresholding: dynamic thresholding is not supported"):
        _run(thresholded, True)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_replay_equals_the_eager_loop_on_cuda(tiny, name):
    pipe = StableDiffusionPipeline.from_pretrained(tiny["folder"], scheduler=name).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    eager = _run(pipe, False)
    replay = _run(pipe, True)
    torch.testing.assert_close(replay, eager, rtol=1e-4, atol=1e-4)  # cuBLAS may pick others
    graphed = pipe._graphed
    assert graphed.captures == (2 if name == "ddpm" else 1)  # DDPM: noisy steps + the last
    torch.testing.assert_close(_run(pipe, True), replay, rtol=0, atol=0)
    assert pipe._graphed is graphed and graphed.captures == (2 if name == "ddpm" else 1)
    _run(pipe, True, num_inference_steps=5)  # another step count: no new capture
    assert pipe._graphed is graphed and graphed.captures == (2 if name == "ddpm" else 1)
    _run(pipe, True, height=24)
    assert pipe._graphed is not graphed and pipe._graphed.captures >= 1
