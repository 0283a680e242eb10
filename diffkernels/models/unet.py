"""UNet2DConditionModel: diffusers' module tree and parameter names, running on our ops.

Configs: SD 1.x, SD 2.x (attention_head_dim list, use_linear_projection, upcast_attention),
SDXL (transformer_layers_per_block, addition_embed_type "text_time") and small test configs.
"""
import torch
from torch import nn

from ._config import PretrainedMixin, UNet2DConditionOutput, per_block, resolve_config
from .embeddings import TimestepEmbedding, Timesteps
from .resnet import group_norm
from .unet_blocks import (CrossAttnDownBlock2D, CrossAttnUpBlock2D, DownBlock2D, UpBlock2D,
                          UNetMidBlock2DCrossAttn)

DEFAULTS = dict(
    sample_size=None, in_channels=4, out_channels=4, center_input_sample=False,
    flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D"),
    only_cross_attention=False, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    downsample_padding=1, mid_block_scale_factor=1, dropout=0.0, act_fn="silu",
    norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1280,
    transformer_layers_per_block=1, reverse_transformer_layers_per_block=None,
    encoder_hid_dim=None, encoder_hid_dim_type=None, attention_head_dim=8,
    num_attention_heads=None, dual_cross_attention=False, use_linear_projection=False,
    class_embed_type=None, addition_embed_type=None, addition_time_embed_dim=None,
    num_class_embeds=None, upcast_attention=False, resnet_time_scale_shift="default",
    resnet_skip_time_act=False, resnet_out_scale_factor=1.0, time_embedding_type="positional",
    time_embedding_dim=None, time_embedding_act_fn=None, timestep_post_act=None,
    time_cond_proj_dim=None, conv_in_kernel=3, conv_out_kernel=3,
    projection_class_embeddings_input_dim=None, attention_type="default",
    class_embeddings_concat=False, mid_block_only_cross_attention=None,
    cross_attention_norm=None, addition_embed_type_num_heads=64,
)
# Keys whose other values change the math in ways we do not implement. upcast_attention is
# accepted either way: our attention always computes the softmax in fp32. dropout only acts
# in training; sample_size is informational.
ALLOWED = dict(
    mid_block_type=("UNetMidBlock2DCrossAttn",), only_cross_attention=(False,),
    act_fn=("silu",), encoder_hid_dim=(None,), encoder_hid_dim_type=(None,),
    num_attention_heads=(None,), dual_cross_attention=(False,), class_embed_type=(None,),
    addition_embed_type=(None, "text_time"), num_class_embeds=(None,),
    resnet_time_scale_shift=("default",), resnet_skip_time_act=(False,),
    time_embedding_type=("positional",), time_embedding_act_fn=(None,),
    timestep_post_act=(None,), time_cond_proj_dim=(None,), attention_type=("default",),
    class_embeddings_concat=(False,), mid_block_only_cross_attention=(None, False),
    cross_attention_norm=(None,), reverse_transformer_layers_per_block=(None,),
)
_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("CrossAttnUpBlock2D", "UpBlock2D")


def _check_config(c):
    name = "UNet2DConditionModel"
    n = len(c["down_block_types"])
    for key, kinds in (("down_block_types", _DOWN), ("up_block_types", _UP)):
        bad = [t for t in c[key] if t not in kinds]
        if bad:
            raise ValueError(f"{name}: config key {key!r}: block type(s) {bad} are not "
                             f"supported (supported: {list(kinds)})")
    if len(c["up_block_types"]) != n or len(c["block_out_channels"]) != n:
        raise ValueError(f"{name}: config keys 'down_block_types', 'up_block_types' and "
                         f"'block_out_channels' must have the same length, got "
                         f"{list(c['down_block_types'])}, {list(c['up_block_types'])}, "
                         f"{list(c['block_out_channels'])}")
    if isinstance(c["cross_attention_dim"], (list, tuple)) and len(c["cross_attention_dim"]) != n:
        raise ValueError(f"{name}: config key 'cross_attention_dim' needs one entry per block")
    if c["addition_embed_type"] == "text_time":
        for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            if not c[key]:
                raise ValueError(f"{name}: addition_embed_type 'text_time' needs config key {key!r}")
    for key in ("conv_in_kernel", "conv_out_kernel"):
        if c[key] % 2 != 1:
            raise ValueError(f"{name}: config key {key!r} must be odd, got {c[key]}")


class UNet2DConditionModel(PretrainedMixin, nn.Module):
    """forward(sample, timestep, encoder_hidden_states, added_cond_kwargs=None,
    encoder_attention_mask=None, return_dict=True) -> UNet2DConditionOutput(.sample), or a
    1-tuple with return_dict=False, as diffusers.

    timestep: int, float, 0-d or [B] tensor. encoder_attention_mask: [B, Lk], 1/True = attend.
    SDXL ("text_time") takes added_cond_kwargs={"text_embeds": [B, 1280], "time_ids": [B, 6]}.
    """

    def __init__(self, **config):
        super().__init__()
        c = resolve_config("UNet2DConditionModel", DEFAULTS, config, ALLOWED)
        _check_config(c)
        self.config = c
        n = len(c.down_block_types)
        ch = list(c.block_out_channels)
        # diffusers' naming quirk: attention_head_dim is the number of heads (SD 1.x: 8 heads
        # of 40/80/160 channels); num_attention_heads must stay unset.
        heads = per_block("UNet2DConditionModel", "attention_head_dim", c.attention_head_dim, n)
        layers = per_block("UNet2DConditionModel", "layers_per_block", c.layers_per_block, n)
        cross = per_block("UNet2DConditionModel", "cross_attention_dim", c.cross_attention_dim, n)
        tlayers = per_block("UNet2DConditionModel", "transformer_layers_per_block",
                            c.transformer_layers_per_block, n)
        groups, eps, drop = c.norm_num_groups, c.norm_eps, c.dropout
        rscale = c.resnet_out_scale_factor

        self.center_input_sample = c.center_input_sample
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], c.conv_in_kernel,
                                 padding=(c.conv_in_kernel - 1) // 2)
        temb_dim = c.time_embedding_dim or ch[0] * 4
        self.time_proj = Timesteps(ch[0], c.flip_sin_to_cos, c.freq_shift)
        self.time_embedding = TimestepEmbedding(ch[0], temb_dim)
        self.text_time = c.addition_embed_type == "text_time"
        if self.text_time:
            self.add_time_proj = Timesteps(c.addition_time_embed_dim, c.flip_sin_to_cos,
                                           c.freq_shift)
            self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim,
                                                   temb_dim)

        self.down_blocks = nn.ModuleList()
        out = ch[0]
        for i, kind in enumerate(c.down_block_types):
            inp, out = out, ch[i]
            common = dict(in_channels=inp, out_channels=out, temb_channels=temb_dim,
                          num_layers=layers[i], resnet_eps=eps, resnet_groups=groups,
                          output_scale_factor=rscale, add_downsample=i < n - 1,
                          downsample_padding=c.downsample_padding, dropout=drop)
            if kind == "CrossAttnDownBlock2D":
                block = CrossAttnDownBlock2D(
                    **common, transformer_layers_per_block=tlayers[i],
                    num_attention_heads=heads[i], cross_attention_dim=cross[i],
                    use_linear_projection=c.use_linear_projection)
            else:
                block = DownBlock2D(**common)
            self.down_blocks.append(block)

        self.mid_block = UNetMidBlock2DCrossAttn(
            ch[-1], temb_dim, transformer_layers_per_block=tlayers[-1], resnet_eps=eps,
            resnet_groups=groups, num_attention_heads=heads[-1], cross_attention_dim=cross[-1],
            output_scale_factor=c.mid_block_scale_factor,
            use_linear_projection=c.use_linear_projection, dropout=drop)

        self.up_blocks = nn.ModuleList()
        rch, rheads, rlayers = ch[::-1], heads[::-1], layers[::-1]
        rcross, rtlayers = cross[::-1], tlayers[::-1]
        out = rch[0]
        for i, kind in enumerate(c.up_block_types):
            prev, out = out, rch[i]
            common = dict(in_channels=rch[min(i + 1, n - 1)], prev_output_channel=prev,
                          out_channels=out, temb_channels=temb_dim, num_layers=rlayers[i] + 1,
                          resnet_eps=eps, resnet_groups=groups, output_scale_factor=rscale,
                          add_upsample=i < n - 1, dropout=drop)
            if kind == "CrossAttnUpBlock2D":
                block = CrossAttnUpBlock2D(
                    **common, transformer_layers_per_block=rtlayers[i],
                    num_attention_heads=rheads[i], cross_attention_dim=rcross[i],
                    use_linear_projection=c.use_linear_projection)
            else:
                block = UpBlock2D(**common)
            self.up_blocks.append(block)
        self.num_upsamplers = n - 1

        self.conv_norm_out = nn.GroupNorm(groups, ch[0], eps=eps)
        self.conv_act = nn.SiLU()  # fused into conv_norm_out's kernel; kept for the module tree
        self.conv_out = nn.Conv2d(ch[0], c.out_channels, c.conv_out_kernel,
                                  padding=(c.conv_out_kernel - 1) // 2)

    @property
    def dtype(self):
        return self.conv_in.weight.dtype

    @property
    def device(self):
        return self.conv_in.weight.device

    def _time_embedding(self, sample, timestep, added_cond_kwargs):
        b = sample.shape[0]
        if not torch.is_tensor(timestep):  # a fill on the device: no host-to-device copy
            dtype = torch.float32 if isinstance(timestep, float) else torch.int64
            timestep = torch.full((b,), timestep, dtype=dtype, device=sample.device)
        else:
            timestep = timestep.to(sample.device).reshape(-1).expand(b)  # 0-d, [1] or [B]
        emb = self.time_embedding(self.time_proj(timestep).to(sample.dtype))
        if self.text_time:
            if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs \
                    or "time_ids" not in added_cond_kwargs:
                raise ValueError("added_cond_kwargs: this UNet (addition_embed_type 'text_time') "
                                 "needs {'text_embeds': ..., 'time_ids': ...}")
            text_embeds = added_cond_kwargs["text_embeds"]
            time_ids = added_cond_kwargs["time_ids"]
            time_embeds = self.add_time_proj(time_ids.flatten()).reshape(text_embeds.shape[0], -1)
            add = torch.cat([text_embeds, time_embeds], dim=-1).to(emb.dtype)
            emb = emb + self.add_embedding(add)
        return emb

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None,
                encoder_attention_mask=None, return_dict=True):
        mask = None if encoder_attention_mask is None else encoder_attention_mask.bool()
        # Latents that are not a multiple of the overall factor: upsample to the skip's size.
        factor = 2 ** self.num_upsamplers
        forward_upsample_size = any(s % factor != 0 for s in sample.shape[-2:])
        if self.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self._time_embedding(sample, timestep, added_cond_kwargs)

        x = self.conv_in(sample)
        skips = (x,)
        for block in self.down_blocks:
            if block.has_cross_attention:
                x, states = block(x, emb, encoder_hidden_states, mask)
            else:
                x, states = block(x, emb)
            skips += states

        x = self.mid_block(x, emb, encoder_hidden_states, mask)

        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[2:] if forward_upsample_size and i < len(self.up_blocks) - 1 else None
            if block.has_cross_attention:
                x = block(x, block_skips, emb, encoder_hidden_states, size, mask)
            else:
                x = block(x, block_skips, emb, size)

        x = self.conv_out(group_norm(self.conv_norm_out, x, silu=True))
        return UNet2DConditionOutput(sample=x) if return_dict else (x,)
