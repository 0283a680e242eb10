"""StableDiffusionPipeline against diffusers' (test-only) on the same tiny components and seed:
DDIM and DDPM, with and without classifier-free guidance, batches of prompts, negative prompts,
given latents and given embeddings; output types; no host sync inside the sampling loop;
argument errors."""
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sd_tiny import tiny  # noqa: F401  (the session fixture)
import sd_tiny

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffkernels.pipelines import StableDiffusionPipeline  # noqa: E402

SIZE = dict(height=16, width=24, num_inference_steps=2)


@pytest.fixture(scope="module")
def pipes(tiny):
    """scheduler name -> (ours from the folder, diffusers' on the very same components)."""
    out = {}
    for name, cls in (("ddim", diffusers.DDIMScheduler), ("ddpm", diffusers.DDPMScheduler)):
        ours = StableDiffusionPipeline.from_pretrained(tiny["folder"], scheduler=name)
        ours.set_progress_bar_config(disable=True)
        ref = sd_tiny.diffusers_pipeline(tiny["parts"], cls.from_config(sd_tiny.SCHEDULER))
        out[name] = ours, ref
    return out


def _embeds(tiny, texts):
    tok, te = tiny["parts"]["tokenizer"], tiny["parts"]["text_encoder"]
    ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        return te(ids)[0] * 1.5  # not what the prompts would give: the embeddings are used


CASES = {
    "ddim-cfg-batch-negative": ("ddim", dict(prompt=["a cat", "a red house"],
                                            negative_prompt=["the dog", "blue"], guidance_scale=7.5)),
    "ddim-no-cfg-2-per-prompt": ("ddim", dict(prompt="a photo of a tree", guidance_scale=1.0,
                                             num_images_per_prompt=2)),
    "ddim-eta-embeds": ("ddim", dict(prompt_embeds="a cat|the dog", negative_prompt_embeds="|",
                                     guidance_scale=5.0, eta=0.7)),
    "ddpm-cfg-latents": ("ddpm", dict(prompt="a cat on a tree", guidance_scale=4.0, latents=True)),
    "ddpm-no-cfg-embeds": ("ddpm", dict(prompt_embeds="the house", guidance_scale=1.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers(pipes, tiny, case):
    sched, kwargs = CASES[case]
    ours, ref = pipes[sched]
    kwargs = dict(kwargs)
    for key in ("prompt_embeds", "negative_prompt_embeds"):
        if key in kwargs:
            kwargs[key] = _embeds(tiny, kwargs[key].split("|"))
    if kwargs.pop("latents", False):
        kwargs["latents"] = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(3))
    images = {}
    for name, pipe in (("ours", ours), ("diffusers", ref)):
        images[name] = pipe(**kwargs, **SIZE, generator=torch.Generator().manual_seed(0),
                            output_type="pt").images
    out, expected = images["ours"], images["diffusers"]
    assert out.shape == expected.shape and out.shape[-2:] == (16, 24)
    assert expected.std() > 0.05  # a real image, not a constant
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_output_types(pipes):
    ours, ref = pipes["ddim"]
    common = dict(prompt="a cat", guidance_scale=3.0, height=16, width=24, num_inference_steps=1)
    pil = ours(**common, generator=torch.Generator().manual_seed(1)).images
    assert len(pil) == 1 and pil[0].size == (24, 16) and pil[0].mode == "RGB"
    ref_pil = ref(**common, generator=torch.Generator().manual_seed(1)).images[0]
    diff = (torch.tensor(list(pil[0].getdata())) - torch.tensor(list(ref_pil.getdata()))).abs()
    assert diff.max() <= 1  # uint8 rounding of values equal within fp32 tolerance
    arr = ours(**common, generator=torch.Generator().manual_seed(1), output_type="np").images
    assert arr.shape == (1, 16, 24, 3) and arr.dtype.name == "float32" and 0 <= arr.min() <= arr.max() <= 1
    lat = ours(**common, generator=torch.Generator().manual_seed(1), output_type="latent")
    assert lat.images.shape == (1, 4, 8, 12)
    image, nsfw = ours(**common, generator=torch.Generator().manual_seed(1), return_dict=False)
    assert nsfw is None and image[0].size == (24, 16)
    assert len(ours.timings["step_s"]) == 1 and ours.timings["total_s"] > 0


class _Taint(TorchDispatchMode):
    """Marks every tensor computed from a marked one (the latents, the prompt embeddings)."""

    def __init__(self):
        super().__init__()
        self.ids = set()

    def mark(self, t):
        if isinstance(t, torch.Tensor) and id(t) not in self.ids:
            self.ids.add(id(t))
            weakref.finalize(t, self.ids.discard, id(t))
        return t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = tree_flatten((args, kwargs))[0]
        if any(isinstance(a, torch.Tensor) and id(a) in self.ids for a in inputs):
            for t in tree_flatten(out)[0]:
                self.mark(t)
        return out


def test_no_host_sync_inside_the_loop(pipes, monkeypatch):
    """From the progress bar's creation (right before the loop) until the VAE decode, reading
    on the host (Tensor.item / tolist / bool / int / float / nonzero / cpu / numpy) any tensor
    computed from the latents or the prompt embeddings raises: on a GPU each would be a
    device sync. (The scheduler may read its own host-side tables: they are not tainted.)"""
    ours, _ = pipes["ddpm"]
    taint = _Taint()
    state = {"armed": False, "steps": 0}

    def trap(name):
        original = getattr(torch.Tensor, name)

        def method(self, *args, **kwargs):
            if state["armed"] and id(self) in taint.ids:
                raise AssertionError(f"Tensor.{name} inside the sampling loop (host sync)")
            return original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, method)

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "cpu", "numpy"):
        trap(name)
    progress_bar, decode, unet_forward = ours.progress_bar, ours.vae.decode, ours.unet.forward
    prepare_latents, encode_prompt = ours.prepare_latents, ours.encode_prompt

    def armed_progress_bar(*args, **kwargs):
        state["armed"] = True
        return progress_bar(*args, **kwargs)

    def disarmed_decode(*args, **kwargs):
        state["armed"] = False
        return decode(*args, **kwargs)

    def counted_forward(*args, **kwargs):
        state["steps"] += state["armed"]
        return unet_forward(*args, **kwargs)
    monkeypatch.setattr(ours, "progress_bar", armed_progress_bar)
    monkeypatch.setattr(ours, "prepare_latents", lambda *a, **k: taint.mark(prepare_latents(*a, **k)))
    monkeypatch.setattr(ours, "encode_prompt",
                        lambda *a, **k: tuple(map(taint.mark, encode_prompt(*a, **k))))
    monkeypatch.setattr(ours.vae, "decode", disarmed_decode)
    monkeypatch.setattr(ours.unet, "forward", counted_forward)
    with taint:
        ours(prompt="a cat", guidance_scale=7.5, generator=torch.Generator().manual_seed(0),
             output_type="np", **SIZE)
    assert state["steps"] == 2 and not state["armed"]
    with taint:  # the trap itself bites on a tainted tensor
        x = taint.mark(torch.ones(2))
        y = x * 2
        state["armed"] = True
        with pytest.raises(AssertionError, match="host sync"):
            y.sum().item()
        state["armed"] = False


def test_prompt_embeds_without_text_encoder(pipes, tiny):
    ours, _ = pipes["ddim"]
    bare = StableDiffusionPipeline(ours.vae, None, None, ours.unet, ours.scheduler)
    bare.set_progress_bar_config(disable=True)
    embeds, negative = _embeds(tiny, ["a cat"]), _embeds(tiny, [""])
    with pytest.raises(ValueError, match="no text_encoder .*pass prompt_embeds"):
        bare(prompt="a cat", **SIZE)
    a = bare(prompt_embeds=embeds, negative_prompt_embeds=negative, output_type="pt", **SIZE,
             generator=torch.Generator().manual_seed(0)).images
    b = ours(prompt_embeds=embeds, negative_prompt_embeds=negative, output_type="pt", **SIZE,
             generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_long_prompt_is_truncated_with_a_warning(pipes):
    ours, _ = pipes["ddim"]
    long = " ".join(["a red cat on the blue house"] * 4)  # > 16 tokens
    with pytest.warns(UserWarning, match="truncated because CLIP can only handle sequences up to 16"):
        ours(prompt=long, output_type="latent", height=16, width=16, num_inference_steps=1)


def test_bad_arguments(pipes):
    ours, _ = pipes["ddim"]
    with pytest.raises(ValueError, match="multiples of 8, got 20x24"):
        ours(prompt="a cat", height=20, width=24, num_inference_steps=1)
    with pytest.raises(ValueError, match="pass a prompt"):
        ours(**SIZE)
    with pytest.raises(ValueError, match="not both"):
        ours(prompt="a", prompt_embeds=torch.zeros(1, 16, 64), **SIZE)
    with pytest.raises(ValueError, match="negative_prompt: has batch size 1, but prompt has 2"):
        ours(prompt=["a", "b"], negative_prompt=["c"], **SIZE)
    with pytest.raises(ValueError, match="latents: expected shape \\[1, 4, 8, 12\\]"):
        ours(prompt="a", latents=torch.zeros(1, 4, 8, 8), **SIZE)
    with pytest.raises(ValueError, match="output_type"):
        ours(prompt="a", output_type="jpeg", **SIZE)
    with pytest.raises(ValueError, match="num_inference_steps"):
        ours(prompt="a", height=16, width=16, num_inference_steps=0)
