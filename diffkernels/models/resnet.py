"""ResnetBlock2D, Downsample2D, Upsample2D, and the GroupNorm call every block uses.

nn.GroupNorm modules only hold the parameters (so the names match diffusers'); the forward
always calls diffkernels.group_norm_silu: GroupNorm followed by SiLU is one kernel, and the
ResNet's time-embedding add rides along as channel_bias (add + GN + SiLU in one pass).
"""
import torch.nn.functional as F
from torch import nn

from ..ops import group_norm_silu


def group_norm(norm: nn.GroupNorm, x, silu: bool, channel_bias=None):
    """norm(x) (+ SiLU) through our op, with norm's parameters."""
    return group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps, silu=silu,
                           channel_bias=channel_bias)


class ResnetBlock2D(nn.Module):
    """x + conv2(gns(conv1(gns(x)) + time_emb_proj(silu(temb)))), gns = GroupNorm + SiLU
    (diffusers' time_embedding_norm="default")."""

    def __init__(self, in_channels, out_channels=None, temb_channels=512, groups=32, eps=1e-6,
                 dropout=0.0, output_scale_factor=1.0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.output_scale_factor = output_scale_factor
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps, affine=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1)
        self.conv_shortcut = (nn.Conv2d(in_channels, out_channels, 1, stride=1, padding=0)
                              if in_channels != out_channels else None)

    def forward(self, x, temb=None):
        h = self.conv1(group_norm(self.norm1, x, silu=True))
        t = None
        if self.time_emb_proj is not None and temb is not None:
            t = self.time_emb_proj(F.silu(temb))  # [N, C]: added before norm2, in the kernel
        h = group_norm(self.norm2, h, silu=True, channel_bias=t)
        h = self.conv2(self.dropout(h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nn.Module):
    """3x3 stride-2 conv. padding=0 (the VAE) pads right/bottom by one first, as diffusers."""

    def __init__(self, channels, out_channels=None, padding=1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0)
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest x2 (or to output_size, for latents that are not a multiple of the UNet's
    overall factor), then a 3x3 conv."""

    def __init__(self, channels, out_channels=None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x, output_size=None):
        # upsample_nearest on channels_last fails for batch >= 64 or > 2**31 output elements
        # (pytorch#141831, diffusers#984): only then fall back to a contiguous input.
        if x.shape[0] >= 64 or x.numel() * 4 > 2**31:
            x = x.contiguous()
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=output_size, mode="nearest")
        return self.conv(x)
