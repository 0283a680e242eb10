"""`python -m diffkernels {info,bench,sample}`."""
import argparse
import importlib
import os
import platform
import sys
import time

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
    """Every benchmark (or --op one), a progress bar over them, a short summary on stdout; the
    rows, plots and a summary report under benchmarks/results/<device>/."""
    from tqdm.auto import tqdm

    from diffkernels import bench as bench_pkg
    from diffkernels.bench import common, report
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ops = bench_pkg.OPS + bench_pkg.MODELS if args.op == "all" else [args.op]
    outdir = args.out or common.default_outdir(device)
    results, t0 = {}, time.perf_counter()
    print(f"diffkernels bench on {common.device_name(device)}{' (quick)' if args.quick else ''}"
          f": {', '.join(ops)}", flush=True)
    with tqdm(ops, unit="part", disable=args.verbose) as bar:
        for op in bar:
            bar.set_description(op)
            module = importlib.import_module(f"diffkernels.bench.{op}")
            start = time.perf_counter()
            try:
                rows = module.run(device, quick=args.quick)
            except ImportError as err:  # e.g. diffusers absent: the model baselines need it
                tqdm.write(f"{op}: skipped ({err})")
                continue
            md = common.write_results(rows, outdir, op, f"{op} on {common.device_name(device)}",
                                      device, module.NOTES)
            results[op] = dict(rows=rows, notes=list(module.NOTES),
                               seconds=time.perf_counter() - start)
            if args.verbose:
                print(md, flush=True)
    summary = report.write(results, outdir, device, quick=args.quick,
                           seconds=time.perf_counter() - t0)
    print(summary, flush=True)
    print(f"results (JSON, markdown, PNG plots, summary.md) written to {outdir}")


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _out_paths(out, n):
    """image.png -> [image.png] for one image, [image-0.png, image-1.png, ...] for a batch."""
    if n == 1:
        return [out]
    root, ext = os.path.splitext(out)
    return [f"{root}-{i}{ext or '.png'}" for i in range(n)]


def sample(args):
    """Load a checkpoint, make images, write PNGs with the settings in their text metadata."""
    import diffkernels as dk
    from diffkernels import loading
    from diffkernels.pipelines import StableDiffusionPipeline

    for name in ("steps", "batch", "height", "width"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name}: expected a positive integer, got {value}")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and value % 8:
            raise ValueError(f"--{name}: must be a multiple of 8, got {value}")
    if not args.out.lower().endswith(".png"):
        raise ValueError(f"--out: expected a .png file name, got {args.out!r}")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"--out: folder {out_dir!r} does not exist")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    dtype = DTYPES[args.dtype]
    dk.set_backend(args.backend)
    path = loading.check_local_path(args.model, "--model")

    t0 = time.perf_counter()
    kwargs = dict(torch_dtype=dtype, scheduler=args.scheduler, tokenizer=args.tokenizer)
    if os.path.isdir(path):
        pipe = StableDiffusionPipeline.from_pretrained(path, variant=args.variant, **kwargs)
    else:
        pipe = StableDiffusionPipeline.from_single_file(
            path, prediction_type=args.prediction_type, **kwargs)
    pipe.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    load_s = time.perf_counter() - t0
    generator = torch.Generator().manual_seed(args.seed)  # CPU noise: the same on any device
    result = pipe(prompt=args.prompt, negative_prompt=args.negative_prompt,
                  num_inference_steps=args.steps, guidance_scale=args.guidance,
                  height=args.height, width=args.width, num_images_per_prompt=args.batch,
                  generator=generator, eta=args.eta, output_type="pil",
                  cuda_graph=args.cuda_graph)

    from PIL.PngImagePlugin import PngInfo
    settings = dict(prompt=args.prompt, negative_prompt=args.negative_prompt or "",
                    seed=args.seed, steps=args.steps, guidance_scale=args.guidance,
                    scheduler=type(pipe.scheduler).__name__, eta=args.eta,
                    size=f"{result.images[0].width}x{result.images[0].height}",
                    dtype=args.dtype, device=str(device), backend=args.backend,
                    cuda_graph=args.cuda_graph,
                    model=os.path.abspath(path))
    paths = _out_paths(args.out, len(result.images))
    for i, (image, file) in enumerate(zip(result.images, paths)):
        info_ = PngInfo()
        for key, value in {**settings, "batch_index": i, "software": f"diffkernels {dk.__version__}"}.items():
            info_.add_text(key, str(value))
        image.save(file, pnginfo=info_)
    t = pipe.timings
    steps = t["step_s"]
    mean_step = sum(steps) / len(steps)
    print(f"device: {common_device_name(device)}, dtype {args.dtype}, backend {dk.get_backend()}")
    print(f"load {load_s:.2f} s | text encode {t['text_encode_s'] * 1e3:.1f} ms | "
          f"{len(steps)} steps: {mean_step * 1e3:.1f} ms/step ({1.0 / mean_step:.2f} it/s, "
          f"batch {2 * args.batch if args.guidance > 1 else args.batch} through the UNet) | "
          f"VAE decode {t['decode_s'] * 1e3:.1f} ms | total {t['total_s']:.2f} s")
    for file in paths:
        print(f"wrote {file}")
    return 0


def common_device_name(device):
    from diffkernels.bench.common import device_name
    return device_name(device)


def _sample_parser(sub):
    s = sub.add_parser(
        "sample", help="text to image with a local Stable Diffusion 1.x / 2.x checkpoint",
        description="Make images from a prompt with a local Stable Diffusion 1.x / 2.x "
                    "checkpoint: a diffusers folder (model_index.json, unet/, vae/, "
                    "text_encoder/, tokenizer/, scheduler/) or a CompVis single file "
                    "(.safetensors, or .ckpt read with torch.load(weights_only=True)). "
                    "Nothing is downloaded. Prints load, text-encode, per-step, VAE-decode "
                    "and total times.")
    def one_line_error(message):  # a bad flag: one line and a non-zero exit, no usage dump
        print(f"diffkernels sample: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)
    s.error = one_line_error
    s.add_argument("--model", required=True, metavar="DIR_OR_FILE",
                   help="diffusers folder or .safetensors/.ckpt single file (local)")
    s.add_argument("--prompt", required=True)
    s.add_argument("--negative-prompt", default=None)
    s.add_argument("--steps", type=int, default=30, help="sampling steps (default 30)")
    s.add_argument("--guidance", type=float, default=7.5,
                   help="classifier-free guidance scale; <= 1 turns guidance off (default 7.5)")
    s.add_argument("--seed", type=int, default=0, help="seed of the CPU noise generator (default 0)")
    s.add_argument("--scheduler", choices=["ddim", "ddpm"], default=None,
                   help="sampler (default: the model's, on DDIM when it is another class)")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    s.add_argument("--height", type=int, default=None, help="pixels, a multiple of 8 "
                   "(default: the model's sample size)")
    s.add_argument("--width", type=int, default=None, help="pixels, a multiple of 8")
    s.add_argument("--batch", type=int, default=1, help="images to make (default 1)")
    s.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    s.add_argument("--backend", default="auto", help="kernel backend (default auto): "
                   "auto, reference, cpu, triton, cuda")
    s.add_argument("--cuda-graph", action="store_true",
                   help="capture the denoising step (UNet + fused scheduler step) once as a CUDA "
                        "graph and replay it for every step (DDIM/DDPM)")
    s.add_argument("--variant", default=None, help="weights variant of a folder, e.g. fp16")
    s.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="CLIP tokenizer folder (single files hold none)")
    s.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None,
                   help="single files: SD 2.x 768 px models are v_prediction")
    s.add_argument("--out", required=True, metavar="IMAGE.png",
                   help="output PNG; a batch writes IMAGE-0.png, IMAGE-1.png, ...")
    return s


def main(argv=None):
    from diffkernels import bench as bench_pkg
    parser = argparse.ArgumentParser(prog="python -m diffkernels")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, device, built extension, available backends")
    b = sub.add_parser("bench", help="benchmark the ops against eager, torch.compile and SDPA, "
                                     "and the UNet/VAE (--op unet) and the whole pipeline (--op pipeline) against "
                                     "diffusers")
    b.add_argument("--op", default="all", choices=["all", *bench_pkg.OPS, *bench_pkg.MODELS])
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    b.add_argument("--quick", action="store_true",
                   help="a few shapes and steps only (under 3 minutes on a 2-core CPU)")
    b.add_argument("--out", default=None, help="results folder (default benchmarks/results/<device>)")
    b.add_argument("--verbose", action="store_true", help="print every row (not only the summary)")
    _sample_parser(sub)
    args = parser.parse_args(argv)
    if args.cmd == "info":
        info(args)
    elif args.cmd == "sample":
        try:
            return sample(args)
        except (ValueError, TypeError, FileNotFoundError, OSError, ImportError) as err:
            print(f"diffkernels sample: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
                  file=sys.stderr)
            return 2
    else:
        bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
