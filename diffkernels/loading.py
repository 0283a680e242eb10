"""Weights from disk: diffusers folders and CompVis / original single-file checkpoints.

Nothing is ever downloaded. A path that does not exist and looks like a Hub id ("org/name")
gives an error that says to pass a local folder.

Single files (.safetensors, or .ckpt/.pt/.pth/.bin read with torch.load(weights_only=True), so
a pickle can never run code) in the CompVis layout:
    model.diffusion_model.*        the UNet          (model_ema.* : its EMA, used when present)
    first_stage_model.*            the VAE
    cond_stage_model.transformer.* SD 1.x: the CLIP ViT-L text encoder (transformers' names)
    cond_stage_model.model.*       SD 2.x: the OpenCLIP ViT-H text encoder
are converted to diffusers' names (the inverse of what diffusers' single_file_utils documents)
and the configs are inferred from the tensors' shapes. What shapes cannot tell is taken from
the original configs and can be overridden: GroupNorm 32 groups, SD 1.x 8 heads per attention
(`num_heads: 8`), SD 2.x 64 channels per head (`num_head_channels: 64`), prediction_type
epsilon (SD 2.x 768 px checkpoints are v-prediction: pass prediction_type="v_prediction").
"""
import json
import os
import re
import sys
import warnings
from typing import Optional

import torch

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# The latent-diffusion schedule of SD 1.x / 2.x (their v1-inference.yaml / v2-inference.yaml),
# as the DDIM config diffusers' own SD folders ship.
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    timestep_spacing="leading")

# Buffers of the original LatentDiffusion module that are not weights of any component.
_SCHEDULE_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights",
    "model_ema.decay", "model_ema.num_updates", "cond_stage_model.model.logit_scale",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message says which file, which keys, and why."""


# ---------------------------------------------------------------- paths and files

def _looks_like_hub_id(path: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", path)) and not path.startswith(".")


def check_local_path(path, what="model") -> str:
    """The path as a str, or FileNotFoundError: a Hub id is named as such, nothing is fetched."""
    path = os.fspath(path)
    if os.path.exists(path):
        return path
    if _looks_like_hub_id(path):
        raise FileNotFoundError(
            f"{what}: {path!r} is not a local path; it looks like a Hugging Face Hub id. "
            "diffkernels downloads nothing: fetch the model first (for example with "
            "huggingface_hub.snapshot_download) and pass the local folder or file.")
    raise FileNotFoundError(f"{what}: {path!r} does not exist (expected a diffusers folder with "
                            "model_index.json, or a .safetensors / .ckpt single file)")


def read_state_dict(path) -> dict:
    """A flat {name: tensor} from a .safetensors file, or from a .ckpt/.pt/.pth/.bin read with
    torch.load(weights_only=True) (a pickle that holds anything but tensors and plain
    containers is refused, without running it). Anything else is refused."""
    path = check_local_path(path, "checkpoint")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint: {path!r} is a folder; a single file was expected")
    lower = path.lower()
    if lower.endswith(SAFE_SUFFIXES):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            state = load_file(path)
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"checkpoint: cannot read {path!r} as safetensors ({err}); "
                                  "is the file truncated or of another format?") from None
    elif lower.endswith(PICKLE_SUFFIXES):
        import pickle
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(
                f"checkpoint: refused {path!r}: it holds objects other than tensors, which "
                f"torch.load(weights_only=True) does not run ({first}). Convert it to "
                ".safetensors with a tool you trust, or use a .safetensors file.") from None
        except (RuntimeError, EOFError, OSError, ValueError) as err:
            raise CheckpointError(f"checkpoint: cannot read {path!r} ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''}); is the file "
                                  "truncated or not a torch checkpoint?") from None
        # Lightning checkpoints keep the weights under "state_dict" (with optimizer state etc.)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    else:
        raise CheckpointError(
            f"checkpoint: {path!r} has an unsupported extension; expected .safetensors (or "
            f"{'/'.join(PICKLE_SUFFIXES)}, read with torch.load(weights_only=True))")
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        bad = [k for k, v in state.items() if not torch.is_tensor(v)][:5] \
            if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint: {path!r} is not a flat dict of tensors (non-tensor "
                              f"entries: {bad})")
    return state


def _sample(keys, n=12):
    keys = sorted(keys)
    return keys if len(keys) <= n else keys[:n] + [f"... ({len(keys) - n} more)"]


def load_checked(model, state: dict, component: str, origin: Optional[dict] = None,
                 source: str = ""):
    """model.load_state_dict(state, strict) with errors that list the missing, unexpected and
    mis-shaped keys (unexpected ones under their original checkpoint names when converted)."""
    origin = origin or {}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [origin.get(k, k) for k in state if k not in expected]
    shapes = [f"{origin.get(k, k)}: checkpoint {list(v.shape)} vs model "
              f"{list(expected[k].shape)}" for k, v in state.items()
              if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_sample(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_sample(unexpected)}")
        if shapes:
            parts.append(f"mis-shaped keys ({len(shapes)}): {_sample(shapes, 6)}")
        raise CheckpointError(f"{component}{' from ' + source if source else ''}: the weights do "
                              f"not fit the inferred config; " + "; ".join(parts))
    meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict(state, strict=True, assign=meta)
    return model


# ---------------------------------------------------------------- UNet: CompVis -> diffusers

_UNET_PREFIX = "model.diffusion_model."
_RESNET = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("out_layers.0.", "norm2."),
           ("out_layers.3.", "conv2."), ("emb_layers.1.", "time_emb_proj."),
           ("skip_connection.", "conv_shortcut."))
_UNET_FIXED = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
               "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out."}


def _resnet(rest):
    for old, new in _RESNET:
        if rest.startswith(old):
            return new + rest[len(old):]
    return None


def unet_key(key: str, layers_per_block: int) -> Optional[str]:
    """One CompVis UNet key (without model.diffusion_model.) -> diffusers' name, or None.

    input_blocks: 0 is conv_in, then per level L resnets (+ a transformer at .1) and, but for
    the last level, a downsampler (.0.op). output_blocks: per level L + 1 resnets (+ a
    transformer at .1), the level's upsampler last (.1.conv, or .2.conv after a transformer).
    The transformer's own names (norm, proj_in, transformer_blocks.*, proj_out) are the same.
    """
    for old, new in _UNET_FIXED.items():
        if key.startswith(old):
            return new + key[len(old):]
    per = layers_per_block + 1
    m = re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.+)", key)
    if m:
        i, sub, rest = int(m[1]), int(m[2]), m[3]
        block, layer = (i - 1) // per, (i - 1) % per
        if sub == 0 and rest.startswith("op."):
            return f"down_blocks.{block}.downsamplers.0.conv.{rest[3:]}"
        if sub == 0 and _resnet(rest):
            return f"down_blocks.{block}.resnets.{layer}.{_resnet(rest)}"
        if sub == 1:
            return f"down_blocks.{block}.attentions.{layer}.{rest}"
        return None
    m = re.fullmatch(r"middle_block\.(\d+)\.(.+)", key)
    if m:
        sub, rest = int(m[1]), m[2]
        if sub in (0, 2) and _resnet(rest):
            return f"mid_block.resnets.{sub // 2}.{_resnet(rest)}"
        return f"mid_block.attentions.0.{rest}" if sub == 1 else None
    m = re.fullmatch(r"output_blocks\.(\d+)\.(\d+)\.(.+)", key)
    if m:
        i, sub, rest = int(m[1]), int(m[2]), m[3]
        block, layer = i // per, i % per
        if sub == 0 and _resnet(rest):
            return f"up_blocks.{block}.resnets.{layer}.{_resnet(rest)}"
        if sub in (1, 2) and rest.startswith("conv."):
            return f"up_blocks.{block}.upsamplers.0.conv.{rest[5:]}"
        if sub == 1:
            return f"up_blocks.{block}.attentions.{layer}.{rest}"
    return None


def _count(keys, pattern):
    return len({m[1] for k in keys for m in [re.match(pattern, k)] if m})


def infer_unet_config(sd: dict, prediction_type=None, image_size=None, vae_scale=8) -> dict:
    """The diffusers UNet config of a CompVis UNet state dict (keys without the prefix)."""
    keys = list(sd)
    if "input_blocks.0.0.weight" not in sd:
        raise CheckpointError("UNet: no model.diffusion_model.input_blocks.0.0.weight")
    if any(k.startswith("label_emb.") for k in keys):
        raise CheckpointError("UNet: the checkpoint has a label_emb (SDXL's added conditioning "
                              "or a class-conditional model): not supported yet for single "
                              "files; use a diffusers folder of an SD 1.x / 2.x model")
    conv_in = sd["input_blocks.0.0.weight"]
    num_input = _count(keys, r"input_blocks\.(\d+)\.")
    downs = sorted(int(m[1]) for k in keys for m in [re.fullmatch(r"input_blocks\.(\d+)\.0\.op\.weight", k)] if m)
    levels = len(downs) + 1
    layers, rem = divmod(num_input - 1 - len(downs), levels)
    if rem or layers < 1:
        raise CheckpointError(f"UNet: cannot make out the block structure ({num_input} input "
                              f"blocks, {len(downs)} downsamplers)")
    per = layers + 1
    channels, attn, depth = [], [], []
    for b in range(levels):
        first = 1 + b * per
        channels.append(sd[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0])
        n = _count(keys, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.")
        attn.append(n > 0)
        depth.append(max(n, 1))
    num_output = _count(keys, r"output_blocks\.(\d+)\.")
    if num_output != levels * per:
        raise CheckpointError(f"UNet: expected {levels * per} output blocks for {levels} levels "
                              f"of {layers} layers, found {num_output}")
    to_k = [v for k, v in sd.items() if k.endswith("attn2.to_k.weight")]
    proj_in = [v for k, v in sd.items() if k.endswith(".proj_in.weight")]
    linear = bool(proj_in) and proj_in[0].dim() == 2
    context = to_k[0].shape[1] if to_k else 768
    if linear:  # SD 2.x: num_head_channels 64
        heads = [max(1, c // 64) for c in channels]
    else:       # SD 1.x: num_heads 8
        heads = 8
    if context >= 2048:
        raise CheckpointError("UNet: cross-attention dim 2048 is SDXL, not supported yet for "
                              "single files")
    if image_size is None:  # SD 2.x v-prediction models are the 768 px ones
        image_size = 768 if (linear and prediction_type == "v_prediction") else 512
    config = dict(
        sample_size=image_size // vae_scale, in_channels=conv_in.shape[1],
        out_channels=sd["out.2.weight"].shape[0], block_out_channels=channels,
        layers_per_block=layers, cross_attention_dim=context, attention_head_dim=heads,
        use_linear_projection=linear,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn[::-1]],
        transformer_layers_per_block=depth if any(d > 1 for d in depth) else 1)
    if linear:
        config["upcast_attention"] = True  # as SD 2.1's config (our softmax is fp32 anyway)
    return config


def convert_unet(sd: dict, layers_per_block: int):
    """(diffusers state dict, {new key: original key}, [original keys nothing converted])."""
    out, origin, left = {}, {}, []
    for key, value in sd.items():
        new = unet_key(key, layers_per_block)
        if new is None:
            left.append(_UNET_PREFIX + key)
            continue
        out[new], origin[new] = value, _UNET_PREFIX + key
    return out, origin, left


# ---------------------------------------------------------------- VAE: CompVis -> diffusers

_VAE_PREFIX = "first_stage_model."
_VAE_ATTN = {"norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v.",
             "proj_out.": "to_out.0."}


def vae_key(key: str, num_blocks: int) -> Optional[str]:
    """One CompVis VAE key (without first_stage_model.) -> diffusers' name, or None. The
    decoder's `up` levels are numbered from the lowest resolution: up.{i} is up_blocks.{n-1-i}."""
    m = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
    if not m:
        return key if re.fullmatch(r"(post_)?quant_conv\.(weight|bias)", key) else None
    part, rest = m[1], m[2]
    if re.fullmatch(r"conv_(in|out)\.(weight|bias)", rest):
        return key
    if rest.startswith("norm_out."):
        return f"{part}.conv_norm_out.{rest[9:]}"
    m = re.fullmatch(r"(down|up)\.(\d+)\.block\.(\d+)\.(.+)", rest)
    if m:
        i = int(m[2]) if m[1] == "down" else num_blocks - 1 - int(m[2])
        name = m[4].replace("nin_shortcut.", "conv_shortcut.")
        return f"{part}.{m[1]}_blocks.{i}.resnets.{m[3]}.{name}"
    m = re.fullmatch(r"down\.(\d+)\.downsample\.conv\.(.+)", rest)
    if m:
        return f"{part}.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    m = re.fullmatch(r"up\.(\d+)\.upsample\.conv\.(.+)", rest)
    if m:
        return f"{part}.up_blocks.{num_blocks - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
    m = re.fullmatch(r"mid\.block_([12])\.(.+)", rest)
    if m:
        return f"{part}.mid_block.resnets.{int(m[1]) - 1}.{m[2].replace('nin_shortcut.', 'conv_shortcut.')}"
    m = re.fullmatch(r"mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)", rest)
    if m:
        return f"{part}.mid_block.attentions.0.{_VAE_ATTN[m[1] + '.']}{m[2]}"
    return None


def infer_vae_config(sd: dict, scaling_factor=None) -> dict:
    keys = list(sd)
    if "encoder.conv_in.weight" not in sd or "decoder.conv_in.weight" not in sd:
        raise CheckpointError("VAE: no first_stage_model.encoder.conv_in / decoder.conv_in")
    levels = _count(keys, r"encoder\.down\.(\d+)\.")
    channels = [sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(levels)]
    return dict(
        in_channels=sd["encoder.conv_in.weight"].shape[1],
        out_channels=sd["decoder.conv_out.weight"].shape[0],
        latent_channels=sd["decoder.conv_in.weight"].shape[1],
        block_out_channels=channels, layers_per_block=_count(keys, r"encoder\.down\.0\.block\.(\d+)\."),
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        scaling_factor=0.18215 if scaling_factor is None else scaling_factor,
        use_quant_conv="quant_conv.weight" in sd, use_post_quant_conv="post_quant_conv.weight" in sd,
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in sd)


def convert_vae(sd: dict, num_blocks: int):
    out, origin, left = {}, {}, []
    for key, value in sd.items():
        new = vae_key(key, num_blocks)
        if new is None:
            if not key.startswith("loss."):  # the training loss (LPIPS, discriminator)
                left.append(_VAE_PREFIX + key)
            continue
        if ".mid_block.attentions.0.to_" in new and new.endswith("weight") and value.dim() > 2:
            value = value.flatten(1)  # 1x1 conv [C, C, 1, 1] -> linear [C, C]
        out[new], origin[new] = value, _VAE_PREFIX + key
    return out, origin, left


# ---------------------------------------------------------------- text encoders

_CLIP_PREFIX = "cond_stage_model.transformer."
_OPENCLIP_PREFIX = "cond_stage_model.model."


def convert_clip(sd: dict):
    """SD 1.x: cond_stage_model.transformer.text_model.* are transformers' CLIPTextModel names;
    returned without the text_model. prefix (see _fit_clip_names)."""
    out, origin, left = {}, {}, []
    for key, value in sd.items():
        if key.startswith("text_model."):
            new = key[len("text_model."):]
            if new == "embeddings.position_ids":  # a buffer, not a weight
                continue
            out[new], origin[new] = value, _CLIP_PREFIX + key
        else:
            left.append(_CLIP_PREFIX + key)
    return out, origin, left


_OPENCLIP_LAYER = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "mlp.c_fc.": "mlp.fc1.",
                   "mlp.c_proj.": "mlp.fc2.", "attn.out_proj.": "self_attn.out_proj."}


def convert_open_clip(sd: dict):
    """SD 2.x OpenCLIP ViT-H: fused in_proj -> q/k/v_proj, OpenCLIP names -> CLIPTextModel's.
    SD 2.x conditions on the penultimate layer (then ln_final): the last resblock is dropped,
    as diffusers' SD 2 text_encoder (23 layers) does; text_projection is not used."""
    out, origin, left = {}, {}, []
    n_layers = _count(sd, r"transformer\.resblocks\.(\d+)\.")
    fixed = {"token_embedding.weight": "embeddings.token_embedding.weight",
             "positional_embedding": "embeddings.position_embedding.weight",
             "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
    for key, value in sd.items():
        src = _OPENCLIP_PREFIX + key
        if key in fixed:
            out[fixed[key]], origin[fixed[key]] = value, src
            continue
        if key in ("text_projection", "logit_scale"):
            continue
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", key)
        if not m:
            left.append(src)
            continue
        i, rest = int(m[1]), m[2]
        if i == n_layers - 1:
            continue  # the last layer: SD 2.x uses the penultimate one
        base = f"encoder.layers.{i}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]
            for name, part in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                new = f"{base}self_attn.{name}_proj.{kind}"
                out[new], origin[new] = part.contiguous(), src
            continue
        for old, new_part in _OPENCLIP_LAYER.items():
            if rest.startswith(old):
                new = base + new_part + rest[len(old):]
                out[new], origin[new] = value, src
                break
        else:
            left.append(src)
    return out, origin, left


def infer_clip_config(sd: dict, act: str, overrides=None) -> dict:
    """CLIPTextConfig kwargs from converted (flat-named) CLIP weights. Heads are hidden / 64
    (CLIP ViT-L: 12, OpenCLIP ViT-H: 16): shapes do not tell the head count."""
    tok = sd["embeddings.token_embedding.weight"]
    hidden = tok.shape[1]
    cfg = dict(vocab_size=tok.shape[0], hidden_size=hidden,
               max_position_embeddings=sd["embeddings.position_embedding.weight"].shape[0],
               num_hidden_layers=_count(sd, r"encoder\.layers\.(\d+)\."),
               intermediate_size=sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
               num_attention_heads=max(1, hidden // 64), hidden_act=act,
               projection_dim=hidden)
    cfg.update(overrides or {})
    return cfg


def _fit_clip_names(model, state, origin):
    """transformers >= 5.6 flattened CLIPTextModel (no text_model. wrapper); older ones keep it."""
    if hasattr(model, "text_model"):
        state = {f"text_model.{k}": v for k, v in state.items()}
        origin = {f"text_model.{k}": v for k, v in origin.items()}
    return state, origin


def _position_ids(model, state):
    """embeddings.position_ids is a buffer (0..L-1), persistent in some transformers versions
    and not in others: taken from the model, whatever the file holds."""
    expected = model.state_dict()
    for key in ("text_model.embeddings.position_ids", "embeddings.position_ids"):
        if key in expected:
            state[key] = expected[key]
        else:
            state.pop(key, None)
    return state


def build_text_encoder(state, origin, act, dtype, overrides=None, source=""):
    try:
        from transformers import CLIPTextConfig, CLIPTextModel
    except ImportError:
        warnings.warn("transformers is not installed: the checkpoint's text encoder is not "
                      "loaded; pass prompt_embeds (pip install transformers to use prompts)",
                      stacklevel=3)
        return None
    config = CLIPTextConfig(**infer_clip_config(state, act, overrides))
    model = CLIPTextModel(config)
    state, origin = _fit_clip_names(model, state, origin)
    load_checked(model, _position_ids(model, state), "text_encoder", origin, source)
    return model.to(dtype).eval()


# ---------------------------------------------------------------- single files

def split_checkpoint(state: dict, path: str = "", use_ema: bool = True):
    """{component: state dict without its prefix} of a CompVis checkpoint; unknown layouts and
    keys outside the known prefixes raise."""
    keys = list(state)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise CheckpointError(f"{path or 'checkpoint'}: an SDXL single file (conditioner.embedders.*):"
                              " not supported yet; use a diffusers folder")
    if _UNET_PREFIX + "input_blocks.0.0.weight" not in state:
        if any(k.startswith(("down_blocks.", "unet.", "text_model.", "encoder.down_blocks.")) for k in keys):
            hint = "it looks like diffusers/transformers names: pass the diffusers folder instead"
        else:
            hint = f"top-level prefixes found: {sorted({k.split('.')[0] for k in keys})[:10]}"
        raise CheckpointError(f"{path or 'checkpoint'}: unknown layout, not a CompVis Stable "
                              f"Diffusion checkpoint (no {_UNET_PREFIX}input_blocks.0.0.weight); {hint}")
    parts = {"unet": {}, "vae": {}, "clip": {}, "open_clip": {}, "ema": {}}
    prefixes = (("unet", _UNET_PREFIX), ("vae", _VAE_PREFIX), ("clip", _CLIP_PREFIX),
                ("open_clip", _OPENCLIP_PREFIX), ("ema", "model_ema."))
    unknown = []
    for key, value in state.items():
        for name, prefix in prefixes:
            if key.startswith(prefix):
                parts[name][key[len(prefix):]] = value
                break
        else:
            if key not in _SCHEDULE_BUFFERS:
                unknown.append(key)
    if unknown:
        raise CheckpointError(f"{path or 'checkpoint'}: unexpected keys outside the UNet / VAE / "
                              f"text-encoder prefixes ({len(unknown)}): {_sample(unknown)}")
    ema = parts.pop("ema")
    ema = {k: v for k, v in ema.items() if k not in ("decay", "num_updates")}
    if ema and use_ema:
        # LitEma's names: the parameter's name after "model." with the dots removed.
        flat = {k: "diffusion_model" + k.replace(".", "") for k in parts["unet"]}
        if all(f in ema for f in flat.values()):
            parts["unet"] = {k: ema[f] for k, f in flat.items()}
            parts["used_ema"] = True
        else:
            warnings.warn(f"{path}: model_ema.* does not cover every UNet weight; using the "
                          "non-EMA weights", stacklevel=3)
    return parts


def _build(cls, config, state, origin, left, component, source, dtype):
    with torch.device("meta"):  # no random init of weights that are overwritten next
        model = cls.from_config(config)
    if left:
        raise CheckpointError(f"{component} from {source}: keys with no diffusers counterpart "
                              f"({len(left)}): {_sample(left)}")
    load_checked(model, state, component, origin, source)
    return model.to(dtype).eval()


def load_single_file_components(path, torch_dtype=None, prediction_type=None, image_size=None,
                                use_ema=True, unet_config=None, vae_config=None,
                                text_encoder_config=None):
    """{"unet", "vae", "text_encoder" (None without transformers or without a text encoder in
    the file), "scheduler_config", "kind" ("sd1" | "sd2"), "used_ema"} from a single file."""
    from .models import AutoencoderKL, UNet2DConditionModel

    path = check_local_path(path, "checkpoint")
    dtype = torch_dtype or torch.float32
    parts = split_checkpoint(read_state_dict(path), path, use_ema)
    source = os.path.basename(path)

    if not parts["vae"]:
        raise CheckpointError(f"{source}: no VAE weights ({_VAE_PREFIX}*)")
    vconfig = infer_vae_config(parts["vae"])
    vconfig.update(vae_config or {})
    vae_scale = 2 ** (len(vconfig["block_out_channels"]) - 1)

    config = infer_unet_config(parts["unet"], prediction_type, image_size, vae_scale)
    config.update(unet_config or {})
    vconfig.setdefault("sample_size", config["sample_size"] * vae_scale)
    state, origin, left = convert_unet(parts["unet"], config["layers_per_block"])
    unet = _build(UNet2DConditionModel, config, state, origin, left, "unet", source, dtype)

    state, origin, left = convert_vae(parts["vae"], len(vconfig["block_out_channels"]))
    vae = _build(AutoencoderKL, vconfig, state, origin, left, "vae", source, dtype)

    text_encoder, kind = None, "sd2" if config["use_linear_projection"] else "sd1"
    if parts["clip"]:
        state, origin, left = convert_clip(parts["clip"])
        act, kind = "quick_gelu", "sd1"
    elif parts["open_clip"]:
        state, origin, left = convert_open_clip(parts["open_clip"])
        act, kind = "gelu", "sd2"
    else:
        warnings.warn(f"{source}: no text encoder in the file (cond_stage_model.*): pass "
                      "prompt_embeds", stacklevel=2)
        left = None
    if left:
        raise CheckpointError(f"text_encoder from {source}: keys with no transformers counterpart "
                              f"({len(left)}): {_sample(left)}")
    if left is not None:
        text_encoder = build_text_encoder(state, origin, act, dtype, text_encoder_config, source)

    sched = dict(SD_SCHEDULER_CONFIG)
    if prediction_type is not None:
        sched["prediction_type"] = prediction_type
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, scheduler_config=sched, kind=kind,
                used_ema=parts.get("used_ema", False))


def local_clip_tokenizer(kind):
    """The SD 1.x / 2.x tokenizer from the local Hugging Face cache if it is there (never
    fetched: local_files_only), else None."""
    try:
        from transformers import CLIPTokenizer
        if kind == "sd2":
            return CLIPTokenizer.from_pretrained("stabilityai/stable-diffusion-2-1", subfolder="tokenizer",
                                                 local_files_only=True)
        return CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14", local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached / transformers missing: no tokenizer
        return None


def load_tokenizer(tokenizer):
    """A tokenizer object as it is, or a local folder with a CLIP tokenizer."""
    if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    path = check_local_path(tokenizer, "tokenizer")
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(path, local_files_only=True)


# ---------------------------------------------------------------- schedulers

def make_scheduler(config: dict, scheduler=None, source=""):
    """Our DDIM (default) or DDPM from a scheduler_config.json; another class's config (SD 1.5
    ships PNDMScheduler, others Euler, DPM-Solver) keeps its betas and prediction type and runs
    on DDIM, with a one-line notice. `scheduler` = "ddim" | "ddpm" | a scheduler object."""
    from .schedulers import DDIMScheduler, DDPMScheduler

    if scheduler is not None and not isinstance(scheduler, str):
        return scheduler
    classes = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}
    name = (scheduler or "").lower()
    if scheduler is not None and name not in classes:
        raise ValueError(f"scheduler: expected 'ddim', 'ddpm' or a scheduler object, got {scheduler!r}")
    config = dict(config or SD_SCHEDULER_CONFIG)
    given = config.get("_class_name")
    if not name:
        name = "ddpm" if given == "DDPMScheduler" else "ddim"
        if given not in (None, "DDIMScheduler", "DDPMScheduler"):
            print(f"diffkernels: {source + ' ' if source else ''}scheduler is {given}; sampling "
                  "with diffkernels' DDIMScheduler on its betas (scheduler='ddim'|'ddpm' picks one)",
                  file=sys.stderr, flush=True)
    if given not in ("DDIMScheduler", "DDPMScheduler"):
        # Latent diffusion never clips x0: another class's config without the key means none.
        config.setdefault("clip_sample", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # keys of the other class are ignored on purpose
        return classes[name].from_config(config)


# ---------------------------------------------------------------- diffusers folders

def read_model_index(path) -> dict:
    path = check_local_path(path, "model")
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise FileNotFoundError(f"model: {path!r} has no model_index.json (not a diffusers "
                                f"pipeline folder); it holds {sorted(os.listdir(path))[:12]}")
    with open(index) as f:
        return json.load(f)


def load_folder_components(path, torch_dtype=None, variant=None):
    """{"unet", "vae", "text_encoder", "tokenizer", "scheduler_config"} of a diffusers
    StableDiffusionPipeline folder. The safety checker and feature extractor are not loaded."""
    from .models import AutoencoderKL, UNet2DConditionModel

    index = read_model_index(path)
    cls = index.get("_class_name")
    if cls not in (None, "StableDiffusionPipeline"):
        raise CheckpointError(f"model: {path!r} is a {cls} folder; only StableDiffusionPipeline "
                              "folders (SD 1.x / 2.x text-to-image) are supported")
    for comp in ("unet", "vae"):
        if not os.path.isdir(os.path.join(path, comp)):
            raise FileNotFoundError(f"model: {path!r} has no {comp}/ folder")
    dtype = torch_dtype or torch.float32
    out = {}
    for comp, model_cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        try:
            out[comp] = model_cls.from_pretrained(path, subfolder=comp, torch_dtype=dtype,
                                                  variant=variant)
        except RuntimeError as err:  # load_state_dict's strict errors
            raise CheckpointError(f"{comp} in {path!r}: {' '.join(str(err).split())}") from None
    out["text_encoder"] = out["tokenizer"] = None
    te_dir, tok_dir = os.path.join(path, "text_encoder"), os.path.join(path, "tokenizer")
    if os.path.isdir(te_dir):
        te_cls = (index.get("text_encoder") or [None, None])[1]
        if te_cls not in (None, "CLIPTextModel"):
            raise CheckpointError(f"text_encoder in {path!r} is a {te_cls}; expected CLIPTextModel")
        try:
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError:
            warnings.warn("transformers is not installed: the folder's text encoder and "
                          "tokenizer are not loaded; pass prompt_embeds (pip install "
                          "transformers to use prompts)", stacklevel=3)
        else:
            out["text_encoder"] = _folder_text_encoder(te_dir, variant, dtype, CLIPTextModel)
            if os.path.isdir(tok_dir):
                out["tokenizer"] = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
    sched_file = os.path.join(path, "scheduler", "scheduler_config.json")
    out["scheduler_config"] = None
    if os.path.isfile(sched_file):
        with open(sched_file) as f:
            out["scheduler_config"] = json.load(f)
    return out


def _folder_text_encoder(folder, variant, dtype, model_cls):
    """transformers' CLIPTextModel from config.json + model[.variant].safetensors (or
    pytorch_model.bin), loaded by hand: the same checks as every other component, and either
    naming (text_model.* before transformers 5.6, flat after) fits either transformers."""
    from transformers import CLIPTextConfig
    suffix = f".{variant}" if variant else ""
    names = [f"model{suffix}.safetensors", f"pytorch_model{suffix}.bin"]
    files = [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]
    if not files:
        raise FileNotFoundError(f"text_encoder: no {' or '.join(names)} in {folder!r}; it holds "
                                f"{sorted(os.listdir(folder))}"
                                + (f" (variant={variant!r} was asked for)" if variant else ""))
    state = read_state_dict(files[0])
    state = {k[len("text_model."):] if k.startswith("text_model.") else k: v
             for k, v in state.items()}
    model = model_cls(CLIPTextConfig.from_pretrained(folder, local_files_only=True))
    state, origin = _fit_clip_names(model, state, {})
    load_checked(model, _position_ids(model, state), "text_encoder", origin, folder)
    return model.to(dtype).eval()
