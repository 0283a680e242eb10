"""The latent-diffusion models on diffkernels' ops, with diffusers' module paths and parameter
names (a diffusers state dict loads with strict=True). diffusers is not needed to use them.

Like diffusers (and unlike DESIGN.md 3.2's first sketch, which said "returns a Tensor"),
UNet2DConditionModel.forward returns an output object with .sample (return_dict=False: a
1-tuple); AutoencoderKL.encode/decode return objects with .latent_dist / .sample.
encoder_attention_mask ([B, Lk], 1/True = attend) becomes the attention op's key_padding_mask:
the same result as diffusers' -10000 bias, except that a row with every key masked gives
zeros (diffusers: the mean of the values)."""
from ._config import (AutoencoderKLOutput, DecoderOutput, FrozenConfig, UNet2DConditionOutput)
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL, DiagonalGaussianDistribution

__all__ = ["UNet2DConditionModel", "AutoencoderKL", "DiagonalGaussianDistribution",
           "UNet2DConditionOutput", "DecoderOutput", "AutoencoderKLOutput", "FrozenConfig"]
