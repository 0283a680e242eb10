"""The latent-diffusion models on diffkernels' ops, with diffusers' module paths and parameter
names (a diffusers state dict loads with strict=True). diffusers is not needed to use them."""
from ._config import (AutoencoderKLOutput, DecoderOutput, FrozenConfig, UNet2DConditionOutput)
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL, DiagonalGaussianDistribution

__all__ = ["UNet2DConditionModel", "AutoencoderKL", "DiagonalGaussianDistribution",
           "UNet2DConditionOutput", "DecoderOutput", "AutoencoderKLOutput", "FrozenConfig"]
