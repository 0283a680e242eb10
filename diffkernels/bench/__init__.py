"""Benchmarks behind `python -m diffkernels bench`: one module per op (OPS), the whole model
against diffusers (MODELS), shared timing and reporting in common.py. benchmarks/bench_<name>.py
are thin scripts over the same modules."""

OPS = ("group_norm_silu", "attention", "diffusion_step", "overhead")
# The UNet / VAE forward and the whole text-to-image call (end to end) against diffusers: rows
# carry times, it/s and ratios, not GB/s (tests/test_models_bench.py, tests/test_bench.py).
MODELS = ("unet", "pipeline")
