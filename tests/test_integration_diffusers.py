"""diffkernels.integrations.diffusers: accelerate() / restore() of diffusers pipelines and models
(tiny random components built here, nothing downloaded), compared with the unaccelerated ones.

test_oldest_diffusers_version_in_a_subprocess runs this whole file again with diffusers 0.30.3
(build/diffusers-0.30, from .ci/install) first on the path."""
import os
import subprocess
import sys
import types

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
sys.path.insert(0, os.path.dirname(__file__))
import sd_tiny  # noqa: E402

from diffkernels.integrations.diffusers import (Report, SiLUFusedIntoNorm,  # noqa: E402
                                                accelerate, restore)

IN_OLD = os.environ.get("DIFFKERNELS_OLD_DIFFUSERS_RUN") == "1"
TOL = dict(atol=1e-4, rtol=1e-4)  # DESIGN.md 6, fp32
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD = os.path.join(ROOT, "build", "diffusers-0.30")


def close(a, b, **tol):
    torch.testing.assert_close(a, b, **(tol or TOL))


def tiny_unet(seed=0, **over):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**dict(sd_tiny.UNET_SD1, **over)).eval()
    with torch.no_grad():
        for p in unet.conv_out.parameters():
            p.copy_(0.1 * torch.randn_like(p))
    return unet


def unet_inputs(unet, batch=2, lk=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=g)
    ehs = torch.randn(batch, lk, c.cross_attention_dim, generator=g)
    return x, torch.tensor([10, 500][:batch] * (batch // 2 or 1)), ehs


def snapshot(model):
    """What restore() must give back: processor objects, module objects, state_dict bits."""
    return dict(procs=dict(model.attn_processors) if hasattr(model, "attn_processors") else {},
                modules={n: m for n, m in model.named_modules()},
                state={k: v.clone() for k, v in model.state_dict().items()},
                ptrs={k: v.data_ptr() for k, v in model.state_dict().items()})


def assert_restored(model, snap):
    if snap["procs"]:
        now = model.attn_processors
        assert now.keys() == snap["procs"].keys()
        assert all(now[k] is snap["procs"][k] for k in now)
    now = dict(model.named_modules())
    assert now.keys() == snap["modules"].keys()
    assert all(now[k] is snap["modules"][k] for k in now)
    assert not [n for n, m in now.items() if "forward" in m.__dict__]
    state = model.state_dict()
    assert state.keys() == snap["state"].keys()
    for k, v in state.items():
        assert torch.equal(v, snap["state"][k]) and v.data_ptr() == snap["ptrs"][k], k


# ------------------------------------------------------------------ models

@torch.no_grad()
def test_unet_equals_unaccelerated_and_restore_gives_it_back():
    unet = tiny_unet()
    args = unet_inputs(unet)
    want = unet(*args).sample
    snap = snapshot(unet)
    report = accelerate(unet)
    assert isinstance(report, Report)
    assert len(report.replaced["attention"]) == len(unet.attn_processors) == 8
    assert not report.left.get("attention")
    # every ResnetBlock2D, and conv_norm_out
    n_resnets = sum(type(m).__name__ == "ResnetBlock2D" for m in unet.modules())
    assert len(report.replaced["group_norm_silu"]) == n_resnets + 1
    assert "conv_norm_out" in report.replaced["group_norm_silu"]
    assert isinstance(unet.conv_act, SiLUFusedIntoNorm)
    assert "scheduler" not in report.replaced
    assert "replaced" in str(report)
    got = unet(*args).sample
    close(got, want)
    assert not torch.equal(got, want)  # really ran something else
    restore(unet)
    assert_restored(unet, snap)
    assert torch.equal(unet(*args).sample, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@torch.no_grad()
def test_unet_low_precision_error_within_twice_eager(dtype, channels_last):
    """DESIGN.md 6: against the fp32 UNet, the accelerated one in `dtype` errs at most 2x as much
    as diffusers' eager one in `dtype` (plus a small floor)."""
    unet = tiny_unet()
    x, t, ehs = unet_inputs(unet)
    ref = unet(x, t, ehs).sample
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    unet = unet.to(dtype=dtype, memory_format=fmt)
    args = (x.to(dtype=dtype, memory_format=fmt), t, ehs.to(dtype))
    eager = unet(*args).sample.float()
    accelerate(unet)
    got = unet(*args).sample
    assert got.dtype == dtype
    err, eager_err = (got.float() - ref).abs().max(), (eager - ref).abs().max()
    assert err <= 2 * eager_err + 1e-3, (err, eager_err)


@torch.no_grad()
def test_vae_encode_decode_equals_unaccelerated():
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**sd_tiny.VAE).eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    want_lat = vae.encode(x).latent_dist.mean
    want = vae.decode(want_lat).sample
    snap = snapshot(vae)
    report = accelerate(vae, backend="cpu")
    # encoder + decoder conv_norm_out; the mid-block attention (one head of 64)
    assert "encoder.conv_norm_out" in report.replaced["group_norm_silu"]
    assert "decoder.conv_norm_out" in report.replaced["group_norm_silu"]
    assert report.replaced["attention"] == ["encoder.mid_block.attentions.0",
                                            "decoder.mid_block.attentions.0"]
    close(vae.encode(x).latent_dist.mean, want_lat)
    close(vae.decode(want_lat).sample, want)
    restore(vae)
    assert_restored(vae, snap)
    assert torch.equal(vae.decode(want_lat).sample, want)


@torch.no_grad()
def test_added_kv_attention_and_resnet_down_up_sampling():
    unet = tiny_unet(down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
                     up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
                     mid_block_type="UNetMidBlock2DSimpleCrossAttn")
    kinds = {type(p).__name__ for p in unet.attn_processors.values()}
    assert kinds == {"AttnAddedKVProcessor2_0"}
    args = unet_inputs(unet)
    want = unet(*args).sample
    report = accelerate(unet)
    assert len(report.replaced["attention"]) == len(unet.attn_processors)
    assert not report.left.get("group_norm_silu")
    close(unet(*args).sample, want)
    restore(unet)
    assert torch.equal(unet(*args).sample, want)


@torch.no_grad()
def test_padding_mask_runs_on_dk_and_other_masks_fall_back():
    unet = tiny_unet()
    x, t, ehs = unet_inputs(unet)
    mask = torch.ones(2, ehs.shape[1], dtype=torch.bool)
    mask[0, 4:] = False  # padded text tokens (diffusers turns it into a 0 / -10000 bias)
    want = unet(x, t, ehs, encoder_attention_mask=mask).sample
    accelerate(unet)
    calls = []
    attn2 = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2
    proc = attn2.processor
    original = proc.original
    proc.original = lambda *a, **k: calls.append(1) or original(*a, **k)
    close(unet(x, t, ehs, encoder_attention_mask=mask).sample, want)
    assert not calls  # the padding mask went to dk.attention
    # a per-query mask is not a key padding mask: the original processor computes it
    hs = torch.randn(2, 16, 64)
    full = torch.zeros(2, 16, ehs.shape[1])
    full[1, 3, 2] = -5.0
    got = attn2(hs, ehs, attention_mask=full)
    assert calls == [1]
    # a row with no key left: SDPA averages all keys (bias) or gives NaN (bool), not zeros
    none_left = torch.zeros(2, 1, ehs.shape[1])
    none_left[1] = -10000.0
    got_none = attn2(hs, ehs, attention_mask=none_left)
    bool_none = torch.ones(2, ehs.shape[1], dtype=torch.bool)
    bool_none[0] = False
    got_bool = attn2(hs, ehs, attention_mask=bool_none)
    assert calls == [1, 1, 1]
    bool_ok = torch.ones(2, ehs.shape[1], dtype=torch.bool)
    bool_ok[1, :3] = False
    got_ok = attn2(hs, ehs, attention_mask=bool_ok)
    assert calls == [1, 1, 1]
    proc.original = original
    restore(unet)
    close(got, attn2(hs, ehs, attention_mask=full), atol=0, rtol=0)
    close(got_none, attn2(hs, ehs, attention_mask=none_left), atol=0, rtol=0)
    close(got_bool, attn2(hs, ehs, attention_mask=bool_none), atol=0, rtol=0, equal_nan=True)
    close(got_ok, attn2(hs, ehs, attention_mask=bool_ok))


def test_torch_compile_fullgraph_no_graph_break():
    unet = tiny_unet(layers_per_block=1)
    args = unet_inputs(unet, batch=1)
    with torch.no_grad():
        want = unet(*args).sample
        accelerate(unet)
        torch._dynamo.reset()
        ops = []

        def backend(gm, example_inputs):  # one graph (fullgraph), holding our ops
            ops.extend(str(n.target) for n in gm.graph.nodes if "diffkernels" in str(n.target))
            return gm.forward

        compiled = torch.compile(unet, fullgraph=True, backend=backend)
        close(compiled(*args).sample, want)
        assert ops.count("diffkernels.attention.default") == len(unet.attn_processors)
        n_resnets = sum(type(m).__name__ == "ResnetBlock2D" for m in unet.modules())
        assert ops.count("diffkernels.group_norm_silu.default") == 2 * n_resnets + 1
    torch._dynamo.reset()


def test_autograd_uses_the_original_code():
    unet = tiny_unet()
    args = unet_inputs(unet, batch=1)
    accelerate(unet)
    out = unet(*args).sample  # grad enabled, parameters require grad: eager code, backward works
    out.square().mean().backward()
    assert unet.conv_in.weight.grad is not None
    restore(unet)


def test_unsupported_is_left_and_listed():
    unet = tiny_unet()
    from diffusers.models.attention_processor import AttnProcessor
    unet.set_attn_processor(AttnProcessor())  # classic: replaced too (same math, attn.scale)
    odd = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    odd.set_processor(diffusers.models.attention_processor.SlicedAttnProcessor(2))
    block = unet.down_blocks[0].resnets[0]
    block.nonlinearity = torch.nn.Mish()
    report = accelerate(unet)
    left = report.left
    assert left["attention"] == ["down_blocks.1.attentions.0.transformer_blocks.0.attn1: "
                                 "processor SlicedAttnProcessor is not one we replace"]
    assert left["group_norm_silu"] == ["down_blocks.0.resnets.0: activation Mish is not SiLU"]
    assert "forward" not in block.__dict__
    assert odd.processor.__class__.__name__ == "SlicedAttnProcessor"
    assert "left: down_blocks.0.resnets.0" in str(report)
    with torch.no_grad():
        args = unet_inputs(unet)
        got = unet(*args).sample
        restore(unet)
        close(got, unet(*args).sample)


def test_accelerate_twice_and_bad_arguments():
    unet = tiny_unet()
    snap = snapshot(unet)
    accelerate(unet)
    accelerate(unet, backend="reference")  # re-applies with the new options
    assert unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.processor.backend == \
        "reference"
    restore(unet)
    assert_restored(unet, snap)
    holder = types.SimpleNamespace(unet=torch.compile(unet))  # a pipeline with a compiled unet
    assert len(accelerate(holder).replaced["attention"]) == len(unet.attn_processors)
    restore(holder)
    assert_restored(unet, snap)
    with pytest.raises(ValueError, match="backend"):
        accelerate(unet, backend="nope")
    with pytest.raises(TypeError, match="pipe_or_model"):
        accelerate(torch.nn.Linear(2, 2))


def test_too_old_diffusers_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(diffusers, "__version__", "0.29.2")
    with pytest.raises(RuntimeError, match="too old.*>= 0.30"):
        accelerate(tiny_unet())


# diffusers 0.30's pipeline loader imports a constant that transformers 5 dropped (the library
# code paths these tests use do not need it): define it, in the subprocess only.
_OLD_RUN = """
import sys, pytest, transformers.utils as u
u.FLAX_WEIGHTS_NAME = getattr(u, "FLAX_WEIGHTS_NAME", "flax_model.msgpack")
import diffusers
assert diffusers.__version__ == "0.30.3", diffusers.__version__
sys.exit(pytest.main(["-q", "-x", "-p", "no:cacheprovider", sys.argv[1]]))
"""


@pytest.mark.skipif(IN_OLD or not os.path.isdir(OLD),
                    reason="build/diffusers-0.30 absent (.ci/install puts diffusers 0.30.3 there)")
def test_oldest_diffusers_version_in_a_subprocess():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([OLD, ROOT]),
               DIFFKERNELS_OLD_DIFFUSERS_RUN="1")
    r = subprocess.run([sys.executable, "-c", _OLD_RUN, __file__], env=env, cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout, r.stdout[-2000:]


# ------------------------------------------------------------------ pipelines

def sd_pipe(tmp, scheduler=None):
    parts = sd_tiny.diffusers_components(tmp)
    return sd_tiny.diffusers_pipeline(parts, scheduler)


def images(pipe, steps=3, size=32, **kw):
    return pipe("a photo of a cat", negative_prompt="blue", num_inference_steps=steps,
                generator=torch.Generator().manual_seed(0), output_type="pt", height=size,
                width=size, **kw).images


@pytest.mark.parametrize("kind", ["DDIMScheduler", "DDPMScheduler"])
@torch.no_grad()
def test_sd_pipeline_equals_unaccelerated_and_restores(kind, tmp_path):
    sched = getattr(diffusers, kind).from_config(sd_tiny.SCHEDULER)
    pipe = sd_pipe(str(tmp_path), sched)
    want = images(pipe)
    unet_snap, vae_snap = snapshot(pipe.unet), snapshot(pipe.vae)
    te = pipe.text_encoder
    config = dict(pipe.config)
    report = accelerate(pipe)
    assert report.replaced["scheduler"] == [f"scheduler ({kind})"]
    assert type(pipe.scheduler).__module__.startswith("diffkernels.schedulers")
    assert any(n.startswith("vae.") for n in report.replaced["attention"])
    assert any(n.startswith("unet.") for n in report.replaced["group_norm_silu"])
    assert pipe.text_encoder is te
    close(images(pipe), want)
    restore(pipe)
    assert pipe.scheduler is sched and dict(pipe.config) == config
    assert_restored(pipe.unet, unet_snap)
    assert_restored(pipe.vae, vae_snap)
    assert torch.equal(images(pipe), want)


def sdxl_pipe(tmp):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    tok = sd_tiny.tokenizer(os.path.join(tmp, "vocab"))
    cfg = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=2, max_position_embeddings=sd_tiny.MAX_TOKENS,
               hidden_act="gelu", projection_dim=32, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    te1 = CLIPTextModel(CLIPTextConfig(**cfg)).eval()
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg)).eval()
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64, norm_num_groups=32).eval()
    vae = diffusers.AutoencoderKL(**sd_tiny.VAE).eval()
    with torch.no_grad():
        for p in list(unet.conv_out.parameters()) + list(vae.decoder.conv_out.parameters()):
            p.copy_(0.1 * torch.randn_like(p))
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok, unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler.from_config(sd_tiny.SCHEDULER))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def test_sdxl_pipeline_equals_unaccelerated_and_lists_its_scheduler(tmp_path):
    pipe = sdxl_pipe(str(tmp_path))
    want = images(pipe, steps=2)
    sched = pipe.scheduler
    report = accelerate(pipe)
    assert report.left["scheduler"] == ["scheduler: EulerDiscreteScheduler has no diffkernels "
                                        "drop-in"]
    assert pipe.scheduler is sched
    assert len(report.replaced["attention"]) == len(pipe.unet.attn_processors) + 2 == 18
    close(images(pipe, steps=2), want)
    restore(pipe)
    assert torch.equal(images(pipe, steps=2), want)


def make_lora(tmp, seed=3):
    """A LoRA of the tiny UNet (attention projections and ResNet convs), random non-zero B."""
    pytest.importorskip("peft")
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    unet = tiny_unet()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1",
                                                "conv2"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_" in n:
                p.copy_(0.3 * torch.randn_like(p))
    folder = os.path.join(tmp, "lora")
    diffusers.StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True)
    return folder


@torch.no_grad()
def test_lora_before_and_after_accelerate_changes_the_output_as_unaccelerated(tmp_path):
    lora = make_lora(str(tmp_path))
    pipe = sd_pipe(str(tmp_path))
    plain = images(pipe)
    pipe.load_lora_weights(lora, adapter_name="a")
    with_lora = images(pipe)
    assert (with_lora - plain).abs().max() > 1e-2  # the LoRA matters
    pipe.unload_lora_weights()
    close(images(pipe), plain)  # not bitwise: fuse + unfuse above rounded the weights (diffusers)

    accelerate(pipe)  # then load
    pipe.load_lora_weights(lora, adapter_name="a")
    close(images(pipe), with_lora)
    pipe.fuse_lora()
    close(images(pipe), with_lora)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    close(images(pipe), plain)
    restore(pipe)

    pipe.load_lora_weights(lora, adapter_name="b")  # load, then accelerate
    accelerate(pipe)
    close(images(pipe), with_lora)
    restore(pipe)
    pipe.unload_lora_weights()
    close(images(pipe), plain)  # not bitwise: fuse + unfuse above rounded the weights (diffusers)
