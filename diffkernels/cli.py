"""`python -m diffkernels {info,bench}`."""
import argparse
import importlib
import platform
import sys

import torch


def info(_args=None):
    import diffkernels as dk
    from diffkernels import _backend
    print(f"diffkernels {dk.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__} "
          f"(CUDA build: {torch.version.cuda or 'no'})")
    try:
        import triton
        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"cuda:{i} {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                  f"{p.total_memory / 2**30:.0f} GiB")
    else:
        print("CUDA device: none")
    print(f"C++ extension (diffkernels._C): {'built' if _backend.extension_loaded() else 'NOT built'}; "
          f"CUDA kernels in it: {'yes' if _backend.extension_has_cuda() else 'no'}")
    print(f"available backends: {', '.join(dk.available_backends())} (selected: {dk.get_backend()})")


def bench(args):
    from diffkernels import bench as bench_pkg
    from diffkernels.bench import common
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ops = bench_pkg.OPS + bench_pkg.MODELS if args.op == "all" else [args.op]
    outdir = args.out or common.default_outdir(device)
    for op in ops:
        module = importlib.import_module(f"diffkernels.bench.{op}")
        print(f"== {op} on {common.device_name(device)}", flush=True)
        rows = module.run(device, quick=args.quick)
        md = common.write_results(rows, outdir, op, f"{op} on {common.device_name(device)}",
                                  device, module.NOTES)
        print(md, flush=True)
    print(f"results written to {outdir}")


def main(argv=None):
    from diffkernels import bench as bench_pkg
    parser = argparse.ArgumentParser(prog="python -m diffkernels")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, device, built extension, available backends")
    b = sub.add_parser("bench", help="benchmark the ops against eager, torch.compile and SDPA, "
                                     "and the UNet/VAE against diffusers (--op unet)")
    b.add_argument("--op", default="all", choices=["all", *bench_pkg.OPS, *bench_pkg.MODELS])
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    b.add_argument("--quick", action="store_true", help="a few shapes only")
    b.add_argument("--out", default=None, help="results folder (default benchmarks/results/<device>)")
    args = parser.parse_args(argv)
    if args.cmd == "info":
        info(args)
    else:
        bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
