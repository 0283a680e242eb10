"""AutoencoderKL: Encoder, Decoder and the diagonal Gaussian posterior (diffusers' names)."""
import torch
from torch import nn

from ._config import AutoencoderKLOutput, DecoderOutput, PretrainedMixin, resolve_config
from .resnet import group_norm
from .unet_blocks import DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D

DEFAULTS = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
    up_block_types=("UpDecoderBlock2D",), block_out_channels=(64,), layers_per_block=1,
    act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=32,
    scaling_factor=0.18215, shift_factor=None, latents_mean=None, latents_std=None,
    force_upcast=True, use_quant_conv=True, use_post_quant_conv=True,
    mid_block_add_attention=True,
)
# scaling_factor / shift_factor / latents_mean / latents_std / force_upcast are used by
# pipelines around the VAE, not inside encode/decode: accepted, exposed in .config.
ALLOWED = dict(act_fn=("silu",))


def randn_tensor(shape, generator=None, device=None, dtype=None):
    """diffusers' randn_tensor: noise drawn on the generator's device (a CPU generator gives
    the same numbers for any target device); a list of generators seeds each batch entry."""
    device = torch.device(device or "cpu")
    gens = generator if isinstance(generator, (list, tuple)) else [generator]
    rand_device = device
    if gens[0] is not None and gens[0].device.type != device.type:
        if gens[0].device.type != "cpu":
            raise ValueError(f"generator: cannot draw a {device} tensor from a "
                             f"{gens[0].device} generator")
        rand_device = torch.device("cpu")
    if len(gens) == 1:
        return torch.randn(shape, generator=gens[0], device=rand_device, dtype=dtype).to(device)
    if len(gens) != shape[0]:
        raise ValueError(f"generator: expected {shape[0]} generators (one per batch entry), "
                         f"got {len(gens)}")
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=rand_device, dtype=dtype)
                      for g in gens]).to(device)


class DiagonalGaussianDistribution:
    """The posterior: parameters [B, 2C, H, W] = (mean, logvar), logvar clamped to [-30, 20]."""

    def __init__(self, parameters, deterministic=False):
        self.parameters = parameters
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    def sample(self, generator=None):
        noise = randn_tensor(self.mean.shape, generator, self.parameters.device,
                             self.parameters.dtype)
        return self.mean + self.std * noise

    def mode(self):
        return self.mean

    def kl(self, other=None):
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum((self.mean - other.mean).pow(2) / other.var + self.var / other.var
                               - 1.0 - self.logvar + other.logvar, dim=[1, 2, 3])


class Encoder(nn.Module):
    def __init__(self, in_channels, out_channels, block_out_channels, layers_per_block,
                 norm_num_groups, double_z=True, mid_block_add_attention=True):
        super().__init__()
        ch = list(block_out_channels)
        self.conv_in = nn.Conv2d(in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], layers_per_block, 1e-6, norm_num_groups,
                               add_downsample=i < len(ch) - 1, downsample_padding=0)
            for i in range(len(ch)))
        self.mid_block = UNetMidBlock2D(ch[-1], resnet_eps=1e-6, resnet_groups=norm_num_groups,
                                        attention_head_dim=ch[-1],
                                        add_attention=mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, ch[-1], eps=1e-6)
        self.conv_act = nn.SiLU()  # fused into conv_norm_out's kernel
        self.conv_out = nn.Conv2d(ch[-1], 2 * out_channels if double_z else out_channels, 3,
                                  padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(group_norm(self.conv_norm_out, x, silu=True))


class Decoder(nn.Module):
    def __init__(self, in_channels, out_channels, block_out_channels, layers_per_block,
                 norm_num_groups, mid_block_add_attention=True):
        super().__init__()
        ch = list(block_out_channels)
        rch = ch[::-1]
        self.conv_in = nn.Conv2d(in_channels, ch[-1], 3, padding=1)
        self.mid_block = UNetMidBlock2D(ch[-1], resnet_eps=1e-6, resnet_groups=norm_num_groups,
                                        attention_head_dim=ch[-1],
                                        add_attention=mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(rch[max(i - 1, 0)], rch[i], layers_per_block + 1, 1e-6,
                             norm_num_groups, add_upsample=i < len(ch) - 1)
            for i in range(len(ch)))
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, ch[0], eps=1e-6)
        self.conv_act = nn.SiLU()  # fused into conv_norm_out's kernel
        self.conv_out = nn.Conv2d(ch[0], out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        x = x.to(self.up_blocks[0].resnets[0].conv1.weight.dtype)  # diffusers' upscale_dtype
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(group_norm(self.conv_norm_out, x, silu=True))


class AutoencoderKL(PretrainedMixin, nn.Module):
    """encode(x) -> AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution),
    decode(z) -> DecoderOutput(sample); return_dict=False gives tuples, as diffusers.
    Latents for the UNet are posterior.sample(generator) * config.scaling_factor."""

    def __init__(self, **config):
        super().__init__()
        c = resolve_config("AutoencoderKL", DEFAULTS, config, ALLOWED)
        for key, kind in (("down_block_types", "DownEncoderBlock2D"),
                          ("up_block_types", "UpDecoderBlock2D")):
            bad = [t for t in c[key] if t != kind]
            if bad:
                raise ValueError(f"AutoencoderKL: config key {key!r}: block type(s) {bad} are "
                                 f"not supported (supported: ['{kind}'])")
            if len(c[key]) != len(c.block_out_channels):
                raise ValueError(f"AutoencoderKL: config key {key!r} must have one entry per "
                                 f"block_out_channels entry ({len(c.block_out_channels)})")
        self.config = c
        self.encoder = Encoder(c.in_channels, c.latent_channels, c.block_out_channels,
                               c.layers_per_block, c.norm_num_groups,
                               mid_block_add_attention=c.mid_block_add_attention)
        self.decoder = Decoder(c.latent_channels, c.out_channels, c.block_out_channels,
                               c.layers_per_block, c.norm_num_groups,
                               mid_block_add_attention=c.mid_block_add_attention)
        lat = c.latent_channels
        self.quant_conv = nn.Conv2d(2 * lat, 2 * lat, 1) if c.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(lat, lat, 1) if c.use_post_quant_conv else None

    @property
    def dtype(self):
        return self.encoder.conv_in.weight.dtype

    @property
    def device(self):
        return self.encoder.conv_in.weight.device

    def encode(self, x, return_dict=True):
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        posterior = DiagonalGaussianDistribution(h)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z, return_dict=True):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        x = self.decoder(z)
        return DecoderOutput(sample=x) if return_dict else (x,)

    def forward(self, sample, sample_posterior=False, return_dict=True, generator=None):
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)
