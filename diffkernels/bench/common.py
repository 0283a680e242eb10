"""Timing, rooflines and reporting shared by every benchmark (DESIGN.md 8).

Every row: op, shape, dtype, device, provider, median time, the derived figure (GB/s for
memory-bound ops, TFLOP/s for attention), % of the device's roofline measured in the same run,
and the ratio to the baseline named by the op. Absolute times are only meaningful with the
device name the row carries.
"""
import datetime
import functools
import glob
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """A folder name for results: 'nvidia-h100-80gb-hbm3', 'cpu-2-threads', ..."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{torch.get_num_threads()}-threads"
    return "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.lru_cache(None)
def last_level_cache_bytes(default=32 * 2**20):
    """The CPU's largest cache (sysfs), or default when it cannot be read."""
    sizes = []
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(index) as f:
                text = f.read().strip().upper()
            mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            pass
    return max(sizes) if sizes else default


@functools.lru_cache(None)
def _flush_buffer(device_str):
    # Larger than any L2 (H100: 50 MB): writing it between repeats evicts the inputs, so the
    # figures are memory figures, not cache figures.
    return torch.empty(256 * 2**20, dtype=torch.uint8, device=device_str)


def median_ms(fn, device: torch.device, *, warmup: int = 3, min_reps: int = 5,
              max_reps: int = 100, budget_s: float = 1.0) -> float:
    """Median wall time of fn() in ms: CUDA events with an L2 flush before each repeat on GPUs
    (outside the timed region, as triton.testing.do_bench does), perf_counter on CPUs. CPUs are
    not flushed: after a 10 ms flush the worker threads have gone to sleep and their wake-up
    dominates a small op; `bandwidth` labels the rows whose data stay in cache instead.
    Repeats until budget_s is spent (at least min_reps)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        if device.type == "cuda":
            _flush_buffer(str(device)).zero_()
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@functools.lru_cache(None)
def copy_bandwidth_gbs(device_str: str) -> float:
    """Measured device copy bandwidth (bytes read + bytes written per second), in GB/s."""
    device = torch.device(device_str)
    n = (512 if device.type == "cuda" else 64) * 2**20
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, budget_s=1.0)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


@functools.lru_cache(None)
def matmul_tflops(device_str: str, dtype: torch.dtype) -> float:
    """Measured dense matmul rate (TFLOP/s) for dtype: the compute roofline for attention."""
    device = torch.device(device_str)
    n = 8192 if device.type == "cuda" else 2048  # smaller ones miss the peak (1024: -25 %)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda: a @ b, device, budget_s=1.0)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def bandwidth(nbytes, ms, device, copy_bw):
    """(GB/s, % of the measured copy bandwidth or None, extra) of a row moving nbytes in ms.
    A CPU working set smaller than the last-level cache stays there between repeats: labelled
    cache-resident, no % (it is not a DRAM figure). Any figure above 100 % is labelled the same
    way rather than printed: it means the data did not come from memory."""
    gbps = nbytes / (ms * 1e-3) / 1e9
    pct = 100 * gbps / copy_bw
    if device.type != "cuda" and nbytes < last_level_cache_bytes():
        return gbps, None, {"cache": "resident (working set < last-level cache)"}
    if pct > 100:
        return gbps, None, {"cache": "resident (above the copy bandwidth)"}
    return gbps, pct, {}


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    device: str
    provider: str
    median_ms: float
    gbps: float = None
    pct_copy_bw: float = None
    tflops: float = None
    pct_matmul: float = None
    ratio: float = None          # baseline time / this time (> 1: faster than the baseline)
    baseline: str = None
    extra: dict = field(default_factory=dict)


def finish_ratios(rows, baseline_of):
    """Fill Row.ratio: for each (shape, dtype) group, baseline time / provider time."""
    by_key = {}
    for r in rows:
        by_key.setdefault((r.op, r.shape, r.dtype), []).append(r)
    for group in by_key.values():
        base_name = baseline_of(group)
        base = next((r for r in group if r.provider == base_name), None)
        for r in group:
            if base is not None and r.median_ms > 0:
                r.ratio = base.median_ms / r.median_ms
                r.baseline = base.provider
    return rows


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def to_markdown(rows, title, notes=()):
    lines = [f"# {title}", ""]
    lines += [f"- {n}" for n in notes]
    lines += ["", "| op | shape | dtype | provider | median ms | GB/s | % copy BW | TFLOP/s | "
              "% matmul | ratio | vs | extra |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        extra = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in r.extra.items())
        lines.append(f"| {r.op} | {r.shape} | {r.dtype} | {r.provider} | {r.median_ms:.4f} | "
                     f"{_fmt(r.gbps, '.1f')} | {_fmt(r.pct_copy_bw, '.1f')} | "
                     f"{_fmt(r.tflops, '.2f')} | {_fmt(r.pct_matmul, '.1f')} | "
                     f"{_fmt(r.ratio, '.2f')} | {r.baseline or ''} | {extra} |")
    return "\n".join(lines) + "\n"


def write_results(rows, outdir, name, title, device, notes=()):
    """benchmarks/results/<device>/<name>.json and .md (or outdir/<name>.*)."""
    os.makedirs(outdir, exist_ok=True)
    meta = {
        "device": device_name(device),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_bandwidth_gbs": copy_bandwidth_gbs(str(device)),
    }
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass
    notes = [f"device: {meta['device']}; torch {meta['torch']}; {meta['date']}",
             f"measured copy bandwidth: {meta['copy_bandwidth_gbs']:.1f} GB/s (read + write)",
             *notes]
    with open(os.path.join(outdir, f"{name}.json"), "w") as f:
        json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=1)
    md = to_markdown(rows, title, notes)
    with open(os.path.join(outdir, f"{name}.md"), "w") as f:
        f.write(md)
    return md


def random_model(cls, config, device="cpu", dtype=torch.float32, seed=0):
    """cls(**config) with random weights, made on the meta device and filled in place: seconds
    instead of the half minute a full-size UNet's own initialisers take on a CPU. Matrices and
    kernels ~ N(0, 1/fan_in) (activations keep their scale through the depth), norm weights 1,
    biases N(0, 0.02)."""
    with torch.device("meta"):
        model = cls(**config)
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, (p[0].numel()) ** -0.5, generator=g)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
        if any(True for _ in model.buffers()):
            raise ValueError(f"{cls.__name__}: random_model cannot fill buffers")
    return model.to(dtype).eval()


def default_outdir(device):
    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.dirname(os.path.dirname(here))
    base = os.path.join(repo, "benchmarks", "results")
    if not os.path.isdir(os.path.join(repo, "benchmarks")):
        base = os.path.join(os.getcwd(), "diffkernels-results")
    return os.path.join(base, device_slug(device))


def compiled(fn):
    """torch.compile of the eager baseline; None when this machine cannot compile. Shapes that
    change make it recompile once, then go dynamic; the limit is raised so that no shape falls
    back to eager unnoticed."""
    import torch._dynamo
    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 256))
    try:
        return torch.compile(fn)
    except Exception:  # noqa: BLE001 - a baseline we cannot build is left out, not fatal
        return None
