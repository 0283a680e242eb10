"""Transformer2DModel: GroupNorm, proj_in, BasicTransformerBlocks over the H*W tokens,
proj_out, residual (diffusers' continuous-input path)."""
import torch.nn.functional as F
from torch import nn

from .attention import BasicTransformerBlock
from .resnet import group_norm


class Transformer2DModel(nn.Module):
    def __init__(self, num_attention_heads, attention_head_dim, in_channels, num_layers=1,
                 cross_attention_dim=None, norm_num_groups=32, use_linear_projection=False,
                 dropout=0.0):
        super().__init__()
        inner = num_attention_heads * attention_head_dim
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6, affine=True)
        # SD 1.x uses 1x1 convs, SD 2.x / SDXL linears: the same map, parameter names differ.
        proj = nn.Linear if use_linear_projection else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = proj(in_channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, num_attention_heads, attention_head_dim,
                                  cross_attention_dim, dropout=dropout)
            for _ in range(num_layers))
        self.proj_out = proj(inner, in_channels)

    @staticmethod
    def _linear(layer, x):
        # A 1x1 conv applied to [B, L, C] tokens is a linear with the conv's weight viewed
        # [out, in]: running it on the tokens saves the NCHW <-> NHWC copies around the convs.
        return F.linear(x, layer.weight.flatten(1), layer.bias)

    def forward(self, x, encoder_hidden_states, key_padding_mask=None):
        b, c, hgt, wid = x.shape
        h = group_norm(self.norm, x, silu=False)
        h = h.permute(0, 2, 3, 1).reshape(b, hgt * wid, c)  # free when x is channels_last
        h = self._linear(self.proj_in, h)
        for block in self.transformer_blocks:
            h = block(h, encoder_hidden_states, key_padding_mask)
        h = self._linear(self.proj_out, h)
        h = h.view(b, hgt, wid, c).permute(0, 3, 1, 2)  # NCHW view of the tokens, no copy
        return x + h  # residual first: the sum takes x's memory format (the copy fuses in)
