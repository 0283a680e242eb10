"""Text-to-image pipelines on diffkernels' models and fused samplers."""
from .stable_diffusion import StableDiffusionPipeline, StableDiffusionPipelineOutput

__all__ = ["StableDiffusionPipeline", "StableDiffusionPipelineOutput"]
