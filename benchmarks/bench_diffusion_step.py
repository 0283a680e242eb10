"""Benchmark the sampler step: `python benchmarks/bench_diffusion_step.py [--device cuda] [--quick]`
(the same as `python -m diffkernels bench --op diffusion_step`)."""
import sys

from diffkernels.cli import main

sys.exit(main(["bench", "--op", "diffusion_step", *sys.argv[1:]]))
