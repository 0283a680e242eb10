"""Benchmark the UNet (and VAE decode) against diffusers:
`python benchmarks/bench_unet.py [--device cuda] [--quick]`
(the same as `python -m diffkernels bench --op unet`)."""
import sys

from diffkernels.cli import main

sys.exit(main(["bench", "--op", "unet", *sys.argv[1:]]))
