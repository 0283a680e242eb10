"""Tiny random Stable Diffusion components for the loading / pipeline / CLI tests (no download):
diffusers' UNet and VAE, transformers' CLIPTextModel and a CLIPTokenizer from a small vocab
written into a folder, saved as a diffusers folder; and an exporter to the CompVis single-file
layout (the inverse of diffkernels.loading's key conversion, written out independently)."""
import json
import os
import re

import torch

# GroupNorm 32 and 8 heads (SD 1.x) / 64 channels per head (SD 2.x) are what the CompVis
# configs fix and what the single-file loader assumes; channels stay small.
UNET_SD1 = dict(
    block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=32, cross_attention_dim=64,
    attention_head_dim=8, sample_size=8,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])
UNET_SD2 = dict(UNET_SD1, attention_head_dim=[1, 1], use_linear_projection=True,
                layers_per_block=2, upcast_attention=True,
                down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                block_out_channels=[64, 64])
VAE = dict(block_out_channels=[32, 64], norm_num_groups=32, latent_channels=4, layers_per_block=1,
           down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
           sample_size=16)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                 steps_offset=1, prediction_type="epsilon")
MAX_TOKENS = 16
WORDS = ["a", "cat", "dog", "photo", "of", "red", "blue", "house", "tree", "the", "in", "on"]


def write_tokenizer_files(folder):
    """vocab.json + merges.txt of a small CLIP BPE: letters, a few whole words."""
    os.makedirs(folder, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = list(letters) + [c + "</w>" for c in letters]
    merges = []
    for word in WORDS:  # merge each word left to right into one token
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            if parts[0] not in tokens:
                tokens.append(parts[0])
    merges = list(dict.fromkeys(merges))
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens + ["!", "<|startoftext|>",
                                                                 "<|endoftext|>"]))}
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def tokenizer(folder):
    from transformers import CLIPTokenizer
    write_tokenizer_files(folder)
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                         model_max_length=MAX_TOKENS)


def text_encoder(tok, hidden_act="quick_gelu", layers=2, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                            num_hidden_layers=layers, num_attention_heads=1,
                            max_position_embeddings=MAX_TOKENS, hidden_act=hidden_act,
                            projection_dim=64, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = CLIPTextModel(config).eval()
    with torch.no_grad():  # CLIP's init is tiny: give the weights some spread
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def diffusers_components(tmp, unet_config=UNET_SD1, hidden_act="quick_gelu", seed=0):
    """diffusers UNet/VAE/scheduler + transformers text encoder/tokenizer, random weights."""
    import diffusers
    tok = tokenizer(os.path.join(tmp, "vocab"))
    te = text_encoder(tok, hidden_act, seed=seed)
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**unet_config).eval()
    vae = diffusers.AutoencoderKL(**VAE).eval()
    with torch.no_grad():  # random (not zero-initialised) output convs: a non-trivial image
        for p in list(unet.conv_out.parameters()) + list(vae.decoder.conv_out.parameters()):
            p.copy_(0.1 * torch.randn_like(p))
    return dict(unet=unet, vae=vae, text_encoder=te, tokenizer=tok,
                scheduler=diffusers.DDIMScheduler(**SCHEDULER))


def diffusers_pipeline(parts, scheduler=None):
    import diffusers
    pipe = diffusers.StableDiffusionPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
        unet=parts["unet"], scheduler=scheduler or parts["scheduler"], safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_folder(parts, folder, scheduler=None, **kwargs):
    diffusers_pipeline(parts, scheduler).save_pretrained(folder, **kwargs)
    return folder


# ---------------------------------------------------------------- CompVis exporter

def _flat_clip(sd):
    return {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in sd.items()}


_RESNET_INV = {"norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "norm2.": "out_layers.0.",
               "conv2.": "out_layers.3.", "time_emb_proj.": "emb_layers.1.",
               "conv_shortcut.": "skip_connection."}


def _resnet_inv(rest):
    for new, old in _RESNET_INV.items():
        if rest.startswith(new):
            return old + rest[len(new):]
    raise KeyError(rest)


def unet_to_ldm(sd, config):
    L = config["layers_per_block"]
    attn_up = {i for i, t in enumerate(config["up_block_types"]) if t.startswith("CrossAttn")}
    fixed = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
             "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
    out = {}
    for key, v in sd.items():
        new = None
        for a, b in fixed.items():
            if key.startswith(a):
                new = b + key[len(a):]
        m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", key)
        if m:
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            first = 1 + b * (L + 1)
            if kind == "resnets":
                new = f"input_blocks.{first + j}.0.{_resnet_inv(rest)}"
            elif kind == "attentions":
                new = f"input_blocks.{first + j}.1.{rest}"
            else:
                new = f"input_blocks.{first + L}.0.op.{rest[len('conv.'):]}"
        m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
        if m:
            if m[1] == "resnets":
                new = f"middle_block.{2 * int(m[2])}.{_resnet_inv(m[3])}"
            else:
                new = f"middle_block.1.{m[3]}"
        m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", key)
        if m:
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            first = b * (L + 1)
            if kind == "resnets":
                new = f"output_blocks.{first + j}.0.{_resnet_inv(rest)}"
            elif kind == "attentions":
                new = f"output_blocks.{first + j}.1.{rest}"
            else:
                new = f"output_blocks.{first + L}.{2 if b in attn_up else 1}.conv.{rest[len('conv.'):]}"
        if new is None:
            raise KeyError(key)
        out["model.diffusion_model." + new] = v
    return out


def vae_to_ldm(sd, config):
    n = len(config["block_out_channels"])
    attn = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.",
            "to_out.0.": "proj_out."}
    out = {}
    for key, v in sd.items():
        new = key
        m = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
        if m:
            part, rest = m[1], m[2]
            rest = rest.replace("conv_norm_out.", "norm_out.")
            mm = re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest)
            if mm:
                rest = f"down.{mm[1]}.block.{mm[2]}.{mm[3].replace('conv_shortcut.', 'nin_shortcut.')}"
            mm = re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest)
            if mm:
                rest = (f"up.{n - 1 - int(mm[1])}.block.{mm[2]}."
                        f"{mm[3].replace('conv_shortcut.', 'nin_shortcut.')}")
            mm = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", rest)
            if mm:
                rest = f"down.{mm[1]}.downsample.conv.{mm[2]}"
            mm = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", rest)
            if mm:
                rest = f"up.{n - 1 - int(mm[1])}.upsample.conv.{mm[2]}"
            mm = re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest)
            if mm:
                rest = f"mid.block_{int(mm[1]) + 1}.{mm[2]}"
            mm = re.fullmatch(r"mid_block\.attentions\.0\.(.+?\.)(weight|bias)", rest)
            if mm:
                rest = f"mid.attn_1.{attn[mm[1]]}{mm[2]}"
                if mm[2] == "weight" and v.dim() == 2:
                    v = v[:, :, None, None]  # CompVis: 1x1 convs
            new = f"{part}.{rest}"
        out["first_stage_model." + new] = v
    return out


def clip_to_ldm(sd):
    return {"cond_stage_model.transformer.text_model." + k: v for k, v in _flat_clip(sd).items()}


def open_clip_to_ldm(sd, seed=1):
    """OpenCLIP layout, plus one more random resblock (SD 2.x conditions on the penultimate
    layer, so the loader must drop it) and a text_projection."""
    sd = _flat_clip(sd)
    p = "cond_stage_model.model."
    out = {p + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
           p + "positional_embedding": sd["embeddings.position_embedding.weight"],
           p + "ln_final.weight": sd["final_layer_norm.weight"],
           p + "ln_final.bias": sd["final_layer_norm.bias"]}
    n = len({k.split(".")[2] for k in sd if k.startswith("encoder.layers.")})
    names = {"layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "mlp.fc1.": "mlp.c_fc.",
             "mlp.fc2.": "mlp.c_proj.", "self_attn.out_proj.": "attn.out_proj."}
    for i in range(n):
        base = f"encoder.layers.{i}."
        dst = f"{p}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [sd[f"{base}self_attn.{q}_proj.{kind}"] for q in "qkv"])
        for k, v in sd.items():
            if k.startswith(base) and ".self_attn." not in k.replace("self_attn.out_proj", ""):
                rest = k[len(base):]
                for a, b in names.items():
                    if rest.startswith(a):
                        out[dst + b + rest[len(a):]] = v
    g = torch.Generator().manual_seed(seed)
    last = {k.replace(f"resblocks.{n - 1}.", f"resblocks.{n}."): torch.randn(v.shape, generator=g)
            for k, v in out.items() if f"resblocks.{n - 1}." in k}
    out.update(last)
    hidden = sd["final_layer_norm.weight"].shape[0]
    out[p + "text_projection"] = torch.randn(hidden, hidden, generator=g)
    return out


def to_ldm(parts, open_clip=False, ema=False):
    """A CompVis checkpoint dict of the components (UNet EMA copy under model_ema.* when
    ema=True, with the plain UNet weights zeroed so that the two are told apart)."""
    unet = unet_to_ldm(parts["unet"].state_dict(), dict(parts["unet"].config))
    out = dict(unet)
    if ema:
        for k, v in unet.items():
            out["model_ema." + k[len("model."):].replace(".", "")] = v
            out[k] = torch.zeros_like(v)
        out["model_ema.decay"] = torch.tensor(0.9999)
        out["model_ema.num_updates"] = torch.tensor(10, dtype=torch.int32)
    out.update(vae_to_ldm(parts["vae"].state_dict(), dict(parts["vae"].config)))
    te = parts["text_encoder"].state_dict()
    out.update(open_clip_to_ldm(te) if open_clip else clip_to_ldm(te))
    out["alphas_cumprod"] = torch.linspace(0.99, 0.01, 1000)  # schedule buffers ride along
    return {k: v.contiguous() for k, v in out.items()}


def save_single_file(state, path):
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(state, path)
    else:
        torch.save({"state_dict": state, "global_step": 1}, path)
    return path


# ---------------------------------------------------------------- shared pytest fixture

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The SD 1.x tiny components, their diffusers folder and CompVis single files (built once
    per test session): {"parts", "folder", "safetensors", "ckpt", "ema_ckpt", "tmp"}."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    tmp = str(tmp_path_factory.mktemp("sd_tiny"))
    parts = diffusers_components(tmp)
    folder = save_folder(parts, os.path.join(tmp, "folder"))
    ldm = to_ldm(parts)
    return dict(parts=parts, folder=folder, tmp=tmp, ldm=ldm,
                safetensors=save_single_file(ldm, os.path.join(tmp, "sd1.safetensors")),
                ckpt=save_single_file(ldm, os.path.join(tmp, "sd1.ckpt")),
                ema_ckpt=save_single_file(to_ldm(parts, ema=True), os.path.join(tmp, "sd1-ema.ckpt")))
