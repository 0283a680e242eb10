"""Benchmark group_norm_silu: `python benchmarks/bench_group_norm_silu.py [--device cuda] [--quick]`
(the same as `python -m diffkernels bench --op group_norm_silu`)."""
import sys

from diffkernels.cli import main

sys.exit(main(["bench", "--op", "group_norm_silu", *sys.argv[1:]]))
