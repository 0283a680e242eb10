"""Benchmarks behind `python -m diffkernels bench`: one module per op (OPS), shared timing and
reporting in common.py. benchmarks/bench_<op>.py are thin scripts over the same modules."""

OPS = ("group_norm_silu", "attention", "diffusion_step", "overhead")
