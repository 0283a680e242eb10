"""Benchmark attention: `python benchmarks/bench_attention.py [--device cuda] [--quick]`
(the same as `python -m diffkernels bench --op attention`)."""
import sys

from diffkernels.cli import main

sys.exit(main(["bench", "--op", "attention", *sys.argv[1:]]))
