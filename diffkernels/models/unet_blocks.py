"""The UNet's and the VAE's blocks, with diffusers' names: resnets / attentions /
downsamplers / upsamplers ModuleLists."""
import torch
from torch import nn

from .attention import Attention
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D
from .transformer import Transformer2DModel


def _per_layer(value, n):
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


class DownBlock2D(nn.Module):
    has_cross_attention = False

    def __init__(self, in_channels, out_channels, temb_channels, num_layers=1, resnet_eps=1e-6,
                 resnet_groups=32, output_scale_factor=1.0, add_downsample=True,
                 downsample_padding=1, dropout=0.0):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels,
                          resnet_groups, resnet_eps, dropout, output_scale_factor)
            for i in range(num_layers))
        self.downsamplers = (nn.ModuleList([Downsample2D(out_channels, out_channels,
                                                         downsample_padding)])
                             if add_downsample else None)

    def forward(self, x, temb=None):
        states = ()
        for resnet in self.resnets:
            x = resnet(x, temb)
            states += (x,)
        if self.downsamplers is not None:
            for down in self.downsamplers:
                x = down(x)
            states += (x,)
        return x, states


class CrossAttnDownBlock2D(nn.Module):
    has_cross_attention = True

    def __init__(self, in_channels, out_channels, temb_channels, num_layers=1,
                 transformer_layers_per_block=1, resnet_eps=1e-6, resnet_groups=32,
                 num_attention_heads=1, cross_attention_dim=1280, output_scale_factor=1.0,
                 add_downsample=True, downsample_padding=1, use_linear_projection=False,
                 dropout=0.0):
        super().__init__()
        layers = _per_layer(transformer_layers_per_block, num_layers)
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels,
                          resnet_groups, resnet_eps, dropout, output_scale_factor)
            for i in range(num_layers))
        self.attentions = nn.ModuleList(
            Transformer2DModel(num_attention_heads, out_channels // num_attention_heads,
                               out_channels, layers[i], cross_attention_dim, resnet_groups,
                               use_linear_projection, dropout)
            for i in range(num_layers))
        self.downsamplers = (nn.ModuleList([Downsample2D(out_channels, out_channels,
                                                         downsample_padding)])
                             if add_downsample else None)

    def forward(self, x, temb, encoder_hidden_states, key_padding_mask=None):
        states = ()
        for resnet, attn in zip(self.resnets, self.attentions):
            x = attn(resnet(x, temb), encoder_hidden_states, key_padding_mask)
            states += (x,)
        if self.downsamplers is not None:
            for down in self.downsamplers:
                x = down(x)
            states += (x,)
        return x, states


class UNetMidBlock2DCrossAttn(nn.Module):
    has_cross_attention = True

    def __init__(self, in_channels, temb_channels, num_layers=1, transformer_layers_per_block=1,
                 resnet_eps=1e-6, resnet_groups=32, num_attention_heads=1,
                 cross_attention_dim=1280, output_scale_factor=1.0, use_linear_projection=False,
                 dropout=0.0):
        super().__init__()
        layers = _per_layer(transformer_layers_per_block, num_layers)
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels, in_channels, temb_channels, resnet_groups, resnet_eps,
                          dropout, output_scale_factor)
            for _ in range(num_layers + 1))
        self.attentions = nn.ModuleList(
            Transformer2DModel(num_attention_heads, in_channels // num_attention_heads,
                               in_channels, layers[i], cross_attention_dim, resnet_groups,
                               use_linear_projection, dropout)
            for i in range(num_layers))

    def forward(self, x, temb, encoder_hidden_states, key_padding_mask=None):
        x = self.resnets[0](x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x, encoder_hidden_states, key_padding_mask), temb)
        return x


class UpBlock2D(nn.Module):
    has_cross_attention = False

    def __init__(self, in_channels, prev_output_channel, out_channels, temb_channels,
                 num_layers=1, resnet_eps=1e-6, resnet_groups=32, output_scale_factor=1.0,
                 add_upsample=True, dropout=0.0):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D((prev_output_channel if i == 0 else out_channels)
                          + (in_channels if i == num_layers - 1 else out_channels),
                          out_channels, temb_channels, resnet_groups, resnet_eps, dropout,
                          output_scale_factor)
            for i in range(num_layers))
        self.upsamplers = (nn.ModuleList([Upsample2D(out_channels, out_channels)])
                           if add_upsample else None)

    def forward(self, x, skips, temb=None, upsample_size=None):
        for resnet in self.resnets:
            x, skips = torch.cat([x, skips[-1]], dim=1), skips[:-1]
            x = resnet(x, temb)
        if self.upsamplers is not None:
            for up in self.upsamplers:
                x = up(x, upsample_size)
        return x


class CrossAttnUpBlock2D(nn.Module):
    has_cross_attention = True

    def __init__(self, in_channels, out_channels, prev_output_channel, temb_channels,
                 num_layers=1, transformer_layers_per_block=1, resnet_eps=1e-6,
                 resnet_groups=32, num_attention_heads=1, cross_attention_dim=1280,
                 output_scale_factor=1.0, add_upsample=True, use_linear_projection=False,
                 dropout=0.0):
        super().__init__()
        layers = _per_layer(transformer_layers_per_block, num_layers)
        self.resnets = nn.ModuleList(
            ResnetBlock2D((prev_output_channel if i == 0 else out_channels)
                          + (in_channels if i == num_layers - 1 else out_channels),
                          out_channels, temb_channels, resnet_groups, resnet_eps, dropout,
                          output_scale_factor)
            for i in range(num_layers))
        self.attentions = nn.ModuleList(
            Transformer2DModel(num_attention_heads, out_channels // num_attention_heads,
                               out_channels, layers[i], cross_attention_dim, resnet_groups,
                               use_linear_projection, dropout)
            for i in range(num_layers))
        self.upsamplers = (nn.ModuleList([Upsample2D(out_channels, out_channels)])
                           if add_upsample else None)

    def forward(self, x, skips, temb, encoder_hidden_states, upsample_size=None,
                key_padding_mask=None):
        for resnet, attn in zip(self.resnets, self.attentions):
            x, skips = torch.cat([x, skips[-1]], dim=1), skips[:-1]
            x = attn(resnet(x, temb), encoder_hidden_states, key_padding_mask)
        if self.upsamplers is not None:
            for up in self.upsamplers:
                x = up(x, upsample_size)
        return x


# --- VAE blocks (no time embedding) ---

class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels, out_channels, num_layers=1, resnet_eps=1e-6,
                 resnet_groups=32, add_downsample=True, downsample_padding=0, dropout=0.0):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None,
                          resnet_groups, resnet_eps, dropout)
            for i in range(num_layers))
        self.downsamplers = (nn.ModuleList([Downsample2D(out_channels, out_channels,
                                                         downsample_padding)])
                             if add_downsample else None)

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            for down in self.downsamplers:
                x = down(x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels, out_channels, num_layers=1, resnet_eps=1e-6,
                 resnet_groups=32, add_upsample=True, dropout=0.0):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None,
                          resnet_groups, resnet_eps, dropout)
            for i in range(num_layers))
        self.upsamplers = (nn.ModuleList([Upsample2D(out_channels, out_channels)])
                           if add_upsample else None)

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            for up in self.upsamplers:
                x = up(x)
        return x


class UNetMidBlock2D(nn.Module):
    """The VAE's mid block: resnet, (single-head spatial attention, resnet) x num_layers."""

    def __init__(self, in_channels, num_layers=1, resnet_eps=1e-6, resnet_groups=32,
                 attention_head_dim=None, add_attention=True, dropout=0.0):
        super().__init__()
        head_dim = attention_head_dim or in_channels
        self.add_attention = add_attention
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels, in_channels, None, resnet_groups, resnet_eps, dropout)
            for _ in range(num_layers + 1))
        self.attentions = nn.ModuleList(
            Attention(in_channels, heads=in_channels // head_dim, dim_head=head_dim,
                      dropout=dropout, bias=True, norm_num_groups=resnet_groups, eps=resnet_eps,
                      residual_connection=True)
            for _ in range(num_layers)) if add_attention else None

    def forward(self, x):
        x = self.resnets[0](x)
        for i, resnet in enumerate(self.resnets[1:]):
            if self.attentions is not None:
                x = self.attentions[i](x)
            x = resnet(x)
        return x
