"""Attention, GEGLU feed-forward and BasicTransformerBlock (diffusers' names and math).

Every attention runs through diffkernels.attention without head copies: the projections'
[B, L, H*D] outputs are viewed as [B, L, H, D] and transposed to [B, H, L, D] views (the op
reads them in place), and the output, which follows q's strides (a BSHD view), is transposed
back and viewed as [B, L, H*D] without a copy.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..ops import attention
from .resnet import group_norm


def _heads(t, heads):
    b, l, _ = t.shape
    return t.view(b, l, heads, -1).transpose(1, 2)  # [B, H, L, D] view, unit last stride


class Attention(nn.Module):
    """Multi-head attention on [B, L, C] tokens; with norm_num_groups (the VAE mid block) it
    takes a [B, C, H, W] map: GroupNorm, attention over the H*W positions, residual add."""

    def __init__(self, query_dim, cross_attention_dim=None, heads=8, dim_head=64, dropout=0.0,
                 bias=False, out_bias=True, norm_num_groups=None, eps=1e-5,
                 residual_connection=False, rescale_output_factor=1.0):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head, self.scale = heads, dim_head, dim_head ** -0.5
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = (nn.GroupNorm(norm_num_groups, query_dim, eps=eps, affine=True)
                           if norm_num_groups else None)
        kv_dim = cross_attention_dim or query_dim
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(kv_dim, inner, bias=bias)
        self.to_v = nn.Linear(kv_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=out_bias), nn.Dropout(dropout)])

    def attend(self, x, context=None, key_padding_mask=None):
        """[B, L, C] tokens (attending to context [B, Lk, Ck], or to themselves) -> [B, L, C]."""
        context = x if context is None else context
        q = _heads(self.to_q(x), self.heads)
        k = _heads(self.to_k(context), self.heads)
        v = _heads(self.to_v(context), self.heads)
        o = attention(q, k, v, scale=self.scale, key_padding_mask=key_padding_mask)
        b, _, l, _ = o.shape
        o = o.transpose(1, 2).reshape(b, l, self.heads * self.dim_head)  # a view: o is BSHD
        return self.to_out[1](self.to_out[0](o))

    def forward(self, x, encoder_hidden_states=None, key_padding_mask=None):
        if x.dim() == 3:
            return self.attend(x, encoder_hidden_states, key_padding_mask)
        # Spatial (VAE): [B, C, H, W] -> tokens [B, H*W, C] as a view of the normed map.
        b, c, hgt, wid = x.shape
        h = group_norm(self.group_norm, x, silu=False) if self.group_norm is not None else x
        h = h.view(b, c, hgt * wid).transpose(1, 2)
        h = self.attend(h, encoder_hidden_states, key_padding_mask)
        h = h.transpose(1, 2).view(b, c, hgt, wid)  # a channels_last-strided view, no copy
        # residual first: the add's output takes the residual's memory format
        out = x + h if self.residual_connection else h.contiguous(memory_format=_format(x))
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out


def _format(x):
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """net = [GEGLU(dim, 4*dim), Dropout, Linear(4*dim, dim)] (parameter names ff.net.0/2)."""

    def __init__(self, dim, mult=4, dropout=0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention to the text, GEGLU feed-forward."""

    def __init__(self, dim, heads, dim_head, cross_attention_dim, dropout=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim_head, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(dim, cross_attention_dim=cross_attention_dim, heads=heads,
                               dim_head=dim_head, dropout=dropout)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x, encoder_hidden_states, key_padding_mask=None):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), encoder_hidden_states, key_padding_mask)
        return x + self.ff(self.norm3(x))
