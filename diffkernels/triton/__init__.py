"""Triton kernels, one module per op. Each module exposes the launcher its op's "triton"
backend calls and `compile_specs()`: every (kernel, config) the launcher can pick, so the tests
compile them all for sm_80/sm_90 without a GPU (diffkernels/triton/_compile.py)."""

KERNEL_MODULES = ("group_norm_silu", "attention", "diffusion_step")
