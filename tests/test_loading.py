"""diffkernels.loading: diffusers folders and CompVis single files (.safetensors / .ckpt, SD 1.x
CLIP and SD 2.x OpenCLIP, EMA) load to the same weights; pickles never run; bad files, keys,
paths and Hub ids give errors that say what is wrong; nothing is downloaded."""
import os
import shutil
import socket

import pytest
import torch

from sd_tiny import tiny  # noqa: F401  (the session fixture)
import sd_tiny

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffkernels import loading  # noqa: E402
from diffkernels.loading import CheckpointError  # noqa: E402
from diffkernels.pipelines import StableDiffusionPipeline  # noqa: E402
from diffkernels.schedulers import DDIMScheduler, DDPMScheduler  # noqa: E402


def assert_same_weights(pipe, parts):
    for name in ("unet", "vae", "text_encoder"):
        ours, ref = getattr(pipe, name).state_dict(), parts[name].state_dict()
        assert set(ours) == set(ref), (name, sorted(set(ours) ^ set(ref))[:5])
        bad = [k for k in ref if not torch.equal(ours[k], ref[k])]
        assert not bad, (name, bad[:5])


def test_folder_and_single_files_load_the_same_weights(tiny):
    parts, tok = tiny["parts"], os.path.join(tiny["folder"], "tokenizer")
    folder = StableDiffusionPipeline.from_pretrained(tiny["folder"])
    assert_same_weights(folder, parts)
    assert folder.tokenizer("a cat").input_ids == parts["tokenizer"]("a cat").input_ids
    for key in ("safetensors", "ckpt", "ema_ckpt"):
        single = StableDiffusionPipeline.from_single_file(tiny[key], tokenizer=tok)
        assert_same_weights(single, parts)  # the EMA file's plain UNet weights are zeros
        for name in ("block_out_channels", "down_block_types", "up_block_types",
                     "attention_head_dim", "cross_attention_dim", "use_linear_projection",
                     "layers_per_block", "in_channels", "out_channels"):
            assert single.unet.config[name] == folder.unet.config[name], name
        for name in ("block_out_channels", "latent_channels", "layers_per_block", "scaling_factor"):
            assert single.vae.config[name] == folder.vae.config[name], name
        assert isinstance(single.scheduler, DDIMScheduler)
        assert single.scheduler.config.beta_schedule == "scaled_linear"


def test_ema_weights_are_used_when_present(tiny):
    parts = loading.load_single_file_components(tiny["ema_ckpt"])
    assert parts["used_ema"]
    plain = loading.load_single_file_components(tiny["ema_ckpt"], use_ema=False)
    assert not plain["used_ema"]
    assert all((p == 0).all() for p in plain["unet"].parameters())


def test_sd2_open_clip_single_file(tiny, tmp_path):
    """SD 2.x layout: linear projections, heads from 64-channel heads, OpenCLIP text encoder
    with fused in_proj and one extra (penultimate-layer) resblock, v-prediction by flag."""
    parts = sd_tiny.diffusers_components(str(tmp_path), sd_tiny.UNET_SD2, hidden_act="gelu")
    path = sd_tiny.save_single_file(sd_tiny.to_ldm(parts, open_clip=True),
                                    str(tmp_path / "sd2.safetensors"))
    pipe = StableDiffusionPipeline.from_single_file(path, prediction_type="v_prediction",
                                                    tokenizer=parts["tokenizer"])
    assert_same_weights(pipe, parts)
    assert pipe.unet.config.use_linear_projection and pipe.unet.config.attention_head_dim == [1, 1]
    assert pipe.text_encoder.config.hidden_act == "gelu"
    assert pipe.text_encoder.config.num_hidden_layers == 2  # the third (last) one dropped
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    ids = parts["tokenizer"]("a cat", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(pipe.text_encoder(ids)[0], parts["text_encoder"](ids)[0])


def test_fp16_variant_and_torch_dtype(tiny, tmp_path):
    folder = sd_tiny.save_folder(tiny["parts"], str(tmp_path / "fp16"), variant="fp16")
    assert os.path.isfile(os.path.join(folder, "unet", "diffusion_pytorch_model.fp16.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(folder, variant="fp16", torch_dtype=torch.float16)
    for name in ("unet", "vae", "text_encoder"):
        model = getattr(pipe, name)
        assert all(p.dtype == torch.float16 for p in model.parameters()), name
    ref = tiny["parts"]["unet"].state_dict()
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, ref[k].half()), k
    with pytest.raises(FileNotFoundError, match="variant='bf16'"):
        StableDiffusionPipeline.from_pretrained(folder, variant="bf16")
    single = StableDiffusionPipeline.from_single_file(tiny["safetensors"], torch_dtype=torch.bfloat16)
    assert single.unet.dtype == single.vae.dtype == torch.bfloat16


def test_single_component_from_pretrained(tiny):
    from diffkernels.models import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(tiny["folder"], subfolder="unet")
    ref = tiny["parts"]["unet"].state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in unet.state_dict().items())


class _Evil:
    """A pickle that would write a marker file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("container", ["torch.save", "plain pickle"])
def test_malicious_ckpt_is_refused_without_running(tmp_path, container):
    import pickle
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"model.diffusion_model.x": _Evil(str(marker))}}
    if container == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused .*weights_only"):
        loading.read_state_dict(path)
    with pytest.raises(CheckpointError, match="refused"):
        StableDiffusionPipeline.from_single_file(str(path))
    assert not marker.exists()


def _mutated(tiny, tmp_path, name, change, ext=".safetensors"):
    state = dict(tiny["ldm"])
    change(state)
    return sd_tiny.save_single_file(state, str(tmp_path / (name + ext)))


def test_bad_keys_are_listed(tiny, tmp_path):
    key = "model.diffusion_model.output_blocks.0.0.in_layers.0.weight"
    missing = _mutated(tiny, tmp_path, "missing", lambda s: s.pop(key))
    with pytest.raises(CheckpointError, match=r"unet .*missing keys \(1\).*up_blocks\.0\.resnets\.0\.norm1\.weight"):
        StableDiffusionPipeline.from_single_file(missing)
    extra = _mutated(tiny, tmp_path, "extra",
                     lambda s: s.update({"model.diffusion_model.input_blocks.1.0.extra.weight": torch.ones(1)}))
    with pytest.raises(CheckpointError, match=r"no diffusers counterpart .*input_blocks\.1\.0\.extra\.weight"):
        StableDiffusionPipeline.from_single_file(extra)
    vae_key = "first_stage_model.decoder.conv_out.weight"
    shaped = _mutated(tiny, tmp_path, "shape",
                      lambda s: s.update({vae_key: torch.ones(3, 32, 3, 1)}))
    with pytest.raises(CheckpointError, match=r"vae .*mis-shaped keys \(1\).*decoder\.conv_out\.weight: checkpoint \[3, 32, 3, 1\] vs model \[3, 32, 3, 3\]"):
        StableDiffusionPipeline.from_single_file(shaped)
    stray = _mutated(tiny, tmp_path, "stray", lambda s: s.update({"embedding_manager.x": torch.ones(1)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys outside .*embedding_manager\.x"):
        StableDiffusionPipeline.from_single_file(stray)
    te_key = "cond_stage_model.transformer.text_model.final_layer_norm.bias"
    no_te = _mutated(tiny, tmp_path, "te", lambda s: s.pop(te_key))
    with pytest.raises(CheckpointError, match=r"text_encoder .*missing keys \(1\).*final_layer_norm\.bias"):
        StableDiffusionPipeline.from_single_file(no_te)


def test_bad_files(tiny, tmp_path):
    data = open(tiny["safetensors"], "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read .*cut.safetensors.*truncated"):
        StableDiffusionPipeline.from_single_file(str(cut))
    data = open(tiny["ckpt"], "rb").read()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read .*cut.ckpt.*truncated"):
        StableDiffusionPipeline.from_single_file(str(cut))
    other = tmp_path / "model.onnx"
    other.write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match="unsupported extension.*safetensors"):
        StableDiffusionPipeline.from_single_file(str(other))
    diffusers_names = sd_tiny.save_single_file(tiny["parts"]["unet"].state_dict(),
                                               str(tmp_path / "unet.safetensors"))
    with pytest.raises(CheckpointError, match="unknown layout.*diffusers"):
        StableDiffusionPipeline.from_single_file(diffusers_names)
    sdxl = _mutated(tiny, tmp_path, "sdxl", lambda s: s.update(
        {"conditioner.embedders.0.transformer.text_model.final_layer_norm.bias": torch.ones(1)}))
    with pytest.raises(CheckpointError, match="SDXL .*not supported yet"):
        StableDiffusionPipeline.from_single_file(sdxl)
    with pytest.raises(CheckpointError, match="is a folder"):
        StableDiffusionPipeline.from_single_file(tiny["folder"])


def test_bad_folders(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        StableDiffusionPipeline.from_pretrained(str(tmp_path))
    broken = tmp_path / "broken"
    shutil.copytree(tiny["folder"], broken)
    from safetensors.torch import load_file, save_file
    f = broken / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(f))
    state.pop("conv_in.bias")
    save_file(state, str(f))
    with pytest.raises(CheckpointError, match=r"unet .*conv_in\.bias"):
        StableDiffusionPipeline.from_pretrained(str(broken))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StableDiffusionPipeline.from_pretrained(str(tmp_path / "nope"))


def test_hub_ids_are_refused_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a network connection was attempted")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    for call in (StableDiffusionPipeline.from_pretrained, StableDiffusionPipeline.from_single_file):
        with pytest.raises(FileNotFoundError, match="looks like a Hugging Face Hub id.*downloads nothing"):
            call("runwayml/stable-diffusion-v1-5")


def test_scheduler_of_another_class_runs_on_ddim(tiny, tmp_path, capsys):
    import diffusers
    pndm = {k: v for k, v in sd_tiny.SCHEDULER.items() if k != "clip_sample"}
    folder = sd_tiny.save_folder(tiny["parts"], str(tmp_path / "pndm"),
                                 scheduler=diffusers.PNDMScheduler(**pndm, skip_prk_steps=True))
    capsys.readouterr()
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1 and "PNDMScheduler" in notice[0] and "DDIMScheduler" in notice[0]
    assert isinstance(pipe.scheduler, DDIMScheduler)
    ref = diffusers.DDIMScheduler(**sd_tiny.SCHEDULER)
    torch.testing.assert_close(pipe.scheduler.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=0)
    assert pipe.scheduler.config.steps_offset == 1 and not pipe.scheduler.config.clip_sample
    ddpm = StableDiffusionPipeline.from_pretrained(folder, scheduler="ddpm")
    assert isinstance(ddpm.scheduler, DDPMScheduler) and not ddpm.scheduler.config.clip_sample
    mine = DDIMScheduler(num_train_timesteps=10)
    assert StableDiffusionPipeline.from_pretrained(folder, scheduler=mine).scheduler is mine
    with pytest.raises(ValueError, match="scheduler: expected 'ddim', 'ddpm'"):
        StableDiffusionPipeline.from_pretrained(folder, scheduler="euler")


def test_conversion_agrees_with_diffusers_single_file_utils(tmp_path):
    """The test exporter is the inverse of diffusers' own CompVis converter on SD 1.5's block
    structure (4 levels, 2 layers, the upsampler after a transformer at .2.conv) and SD 2.x's
    OpenCLIP layout, and our loader inverts the exporter: so our conversion is diffusers'."""
    from diffusers.loaders import single_file_utils as sfu
    torch.manual_seed(0)
    unet_cfg = dict(block_out_channels=[32, 32, 64, 64], layers_per_block=2, norm_num_groups=32,
                    cross_attention_dim=64, attention_head_dim=8, sample_size=8)  # SD 1.5 block types
    vae_cfg = dict(sd_tiny.VAE, block_out_channels=[32, 32, 64, 64], layers_per_block=2,
                   down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    parts = sd_tiny.diffusers_components(str(tmp_path), dict(unet_cfg), hidden_act="gelu")
    parts["vae"] = diffusers.AutoencoderKL(**vae_cfg).eval()
    ldm = sd_tiny.to_ldm(parts, open_clip=True)
    for name, converted in (
            ("unet", sfu.convert_ldm_unet_checkpoint(dict(ldm), dict(parts["unet"].config))),
            ("vae", sfu.convert_ldm_vae_checkpoint(dict(ldm), dict(parts["vae"].config))),
            ("text_encoder", sfu.convert_open_clip_checkpoint(parts["text_encoder"], dict(ldm)))):
        ref = parts[name].state_dict()
        if name == "text_encoder":
            converted = {k.removeprefix("text_model."): v for k, v in converted.items()
                         if k.removeprefix("text_model.") in ref}
        assert set(converted) == set(ref), (name, sorted(set(converted) ^ set(ref))[:6])
        assert all(torch.equal(converted[k].reshape(ref[k].shape), ref[k]) for k in ref), name
    path = sd_tiny.save_single_file(ldm, str(tmp_path / "sd15ish.safetensors"))
    comps = loading.load_single_file_components(path)
    assert list(comps["unet"].config.down_block_types) == list(parts["unet"].config.down_block_types)
    for name in ("unet", "vae", "text_encoder"):
        ours, ref = comps[name].state_dict(), parts[name].state_dict()
        assert set(ours) == set(ref) and all(torch.equal(ours[k], ref[k]) for k in ref), name
