"""Run the emulated group_norm_silu CUDA kernels (built by generate.py) against a float64 reference.

Usage: python run_cases.py LIB.so [--subset default|extra|all] [name-substring ...]
--subset: the default (CI) cases, the others (CI's slow test), or all; names select among all.
Prints one line per case starting with "ok" or "FAIL" and a final "P/N cases passed"; exits 1 if
any case fails.
EMU_SMS (the emulated SM count) is set per case: few SMs force the split paths.
"""
import argparse
import os
import sys
import time

import torch

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # DESIGN.md 6
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
NAN, INF = float("nan"), float("inf")


def case(name, shape, G, dtype, fmt="contig", w=True, b=True, cb=True, silu=True, sms=132,
         offset=0, scale=1.0, shift=0.0, pdtype=None, launches=None, poison=None, default=False):
    """One emulator run. fmt: contig | cl | cl3d; offset: storage offset of x in elements
    (misaligned -> narrower vectors); launches: the kernel launches the path must take;
    poison: (where, value) puts a NaN/inf into x (group 1 of the last sample), x0 (the first
    element of group 1 of sample 0: the shift of the statistics), w, b or cb (channel 1)."""
    return dict(name=name, shape=shape, G=G, dtype=dtype, fmt=fmt, w=w, b=b, cb=cb, silu=silu,
                sms=sms, offset=offset, scale=scale, shift=shift, pdtype=pdtype or dtype,
                launches=launches, poison=poison, default=default)


D = dict(default=True)  # in the default (CI) subset
CASES = [
    # one block per group (gn_nchw<kBoth>): group cached in registers (single read)
    case("both", (2, 8, 5, 7), 4, BF16, launches=1, **D),
    case("both", (2, 8, 5, 7), 4, F32, launches=1),
    case("both", (2, 8, 5, 7), 4, F16, launches=1),
    case("both8", (1, 64, 16, 16), 32, F16, launches=1),
    case("both-nosilu", (3, 12, 3, 3), 3, F32, b=False, silu=False),
    case("S=1", (2, 40, 1, 1), 4, F16),
    case("3d", (2, 6, 10), 2, F32),
    case("5d", (1, 8, 3, 4, 5), 4, F16, cb=False),
    # one block per group, group too big for registers: two reads
    case("both-2rd", (1, 8, 70, 70), 2, F32, sms=1, launches=1, **D),
    # split contiguous path (gn_nchw<kStats> + <kNorm>), chunk boundaries inside channels
    case("split", (1, 8, 40, 40), 2, F16, sms=4, launches=2, **D),
    case("split", (1, 8, 40, 40), 2, F32, sms=4, launches=2),
    case("split-odd", (2, 6, 33, 31), 3, BF16, sms=8, launches=2),
    case("split-S", (1, 4, 3000, 1), 2, F16, b=False, sms=8, launches=2),
    # channels_last, one launch (gn_nhwc<kBoth>)
    case("cl-both", (2, 8, 5, 7), 4, F16, fmt="cl", launches=1, **D),
    case("cl-both", (2, 8, 5, 7), 4, F32, fmt="cl", launches=1),
    case("cl-both", (2, 8, 5, 7), 4, BF16, fmt="cl", launches=1),
    case("cl3d", (1, 8, 3, 4, 5), 2, BF16, fmt="cl3d", **D),
    # channels_last split: kStats + finalize + kNorm
    case("cl-split", (2, 16, 20, 20), 4, F32, fmt="cl", sms=4, launches=3, **D),
    case("cl-split", (1, 30, 17, 13), 3, BF16, fmt="cl", sms=8, launches=3, **D),
    case("cl-split", (1, 40, 17, 13), 4, F16, fmt="cl", sms=8, launches=3),
    case("cl", (1, 64, 16, 16), 32, F32, fmt="cl", launches=3),
    case("cl-odd", (1, 33, 9, 9), 11, F32, fmt="cl", sms=8, launches=3),
    # many groups: several column passes (G * Cg/VEC > 512 threads)
    case("cl-passes", (1, 1040, 2, 3), 520, F32, fmt="cl", sms=2, launches=3),
    case("cl-Cg1", (1, 520, 3, 3), 520, F16, fmt="cl", sms=2, launches=3),
    # group wider than a block's columns: falls back to the contiguous kernels
    case("cl-fallbk", (1, 1026, 2, 2), 1, F32, fmt="cl", launches=2, **D),
    # fp32 parameters with half x
    case("p32", (2, 16, 6, 6), 4, F16, fmt="cl", pdtype=F32, **D),
    case("p32", (2, 16, 6, 6), 4, BF16, pdtype=F32),
    # misaligned x (storage offset): narrower vectors
    case("offset1", (2, 16, 8, 8), 4, F16, offset=1, **D),
    case("offset2", (2, 16, 8, 8), 4, F32, offset=2),
    # numerics: large common offset (fp32), fp16 values near 6e4
    case("1e4", (2, 32, 16, 16), 8, F32, cb=False, shift=1e4),
    case("1e4-cl", (2, 32, 16, 16), 8, F32, fmt="cl", shift=1e4, sms=4, launches=3, **D),
    case("1e4-split", (1, 8, 40, 40), 2, F32, w=False, b=False, shift=1e4, sms=4, launches=2, **D),
    case("fp16big", (2, 32, 8, 8), 8, F16, cb=False, scale=1.5e4, launches=1),
    case("fp16big", (2, 32, 8, 8), 8, F16, fmt="cl", w=False, b=False, cb=False, scale=1.5e4,
         sms=2, **D),
    # NaN / inf (DESIGN.md 7): they propagate as eager F.group_norm + F.silu: a non-finite x
    # poisons its (n, group), a non-finite w / b its channel; SiLU(-inf) = NaN
    case("nan-x", (2, 8, 5, 7), 4, F16, launches=1, poison=("x", NAN), **D),
    case("inf-x0", (2, 8, 5, 7), 4, F32, launches=1, silu=False, poison=("x0", INF), **D),
    case("ninf-x-2rd", (1, 8, 70, 70), 2, F32, sms=1, launches=1, poison=("x", -INF), **D),
    case("nan-x0-split", (1, 8, 40, 40), 2, F16, sms=4, launches=2, poison=("x0", NAN), **D),
    case("inf-x-split", (2, 6, 33, 31), 3, BF16, sms=8, launches=2, poison=("x", INF)),
    case("nan-w-split", (1, 8, 40, 40), 2, F32, sms=4, launches=2, poison=("w", NAN)),
    case("nan-x-cl", (2, 8, 5, 7), 4, BF16, fmt="cl", launches=1, poison=("x", NAN), **D),
    case("inf-b-cl", (2, 8, 5, 7), 4, F16, fmt="cl", launches=1, poison=("b", INF)),
    case("ninf-b-cl", (2, 8, 5, 7), 4, F32, fmt="cl", launches=1, poison=("b", -INF), **D),
    case("inf-x-cl-split", (2, 16, 20, 20), 4, F32, fmt="cl", sms=4, launches=3,
         poison=("x", INF), **D),
    case("nan-x0-cl-split", (1, 30, 17, 13), 3, F16, fmt="cl", sms=8, launches=3,
         poison=("x0", NAN)),
    case("nan-cb-cl-split", (1, 40, 17, 13), 4, BF16, fmt="cl", sms=8, launches=3,
         poison=("cb", NAN), **D),
    case("ninf-cb", (2, 8, 5, 7), 4, F32, silu=False, launches=1, poison=("cb", -INF)),
    case("nan-x-cl-fallbk", (1, 1026, 2, 2), 1, F32, fmt="cl", launches=2, poison=("x", NAN)),
]


def truth(x, G, w, b, cb, eps, silu):
    """float64 group norm (+ per-(n, c) bias before it, + SiLU) of the values the kernel sees."""
    xd = x.double()
    n, c = x.shape[:2]
    bshape = (n, c) + (1,) * (x.dim() - 2)
    if cb is not None:
        xd = xd + cb.double().view(bshape)
    g = xd.reshape(n, G, -1)
    mean = g.mean(2, keepdim=True)
    var = ((g - mean) ** 2).mean(2, keepdim=True)
    y = ((g - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    pshape = (1, c) + (1,) * (x.dim() - 2)
    if w is not None:
        y = y * w.double().view(pshape)
    if b is not None:
        y = y + b.double().view(pshape)
    return torch.nn.functional.silu(y) if silu else y


def run_case(c, gn, eps=1e-5):
    """Returns (ok, report line)."""
    os.environ["EMU_SMS"] = str(c["sms"])
    shape, dtype, off = c["shape"], c["dtype"], c["offset"]
    n, ch = shape[:2]
    numel = torch.Size(shape).numel()
    vals = (torch.randn(numel + off) * c["scale"]).clamp(-6e4, 6e4) + c["shift"]
    x = vals.to(dtype)[off:].view(shape)  # storage offset `off`
    if c["fmt"] == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    elif c["fmt"] == "cl3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    pd = c["pdtype"]
    w = torch.randn(ch).to(pd) if c["w"] else None
    b = torch.randn(ch).to(pd) if c["b"] else None
    cb = torch.randn(n, ch).to(pd) if c["cb"] else None
    if c["poison"] is not None:
        where, value = c["poison"]
        cg = ch // c["G"]  # channels per group
        last, first = (-1,) * (x.dim() - 2), (0,) * (x.dim() - 2)
        if where == "x":
            x[(n - 1, min(ch - 1, cg + cg // 2)) + last] = value
        elif where == "x0":
            x[(0, cg % ch) + first] = value
        else:
            dict(w=w, b=b, cb=cb if cb is None else cb[-1])[where][1] = value
    l0 = torch.ops.dkemu.launches()
    t0 = time.time()
    y = gn(x, c["G"], w, b, eps, c["silu"], cb)
    dt = time.time() - t0
    launches = torch.ops.dkemu.launches() - l0
    t = truth(x, c["G"], w, b, cb, eps, c["silu"])
    err = (y.double() - t).abs()
    problems = []
    if y.dtype != dtype or y.shape != x.shape:
        problems.append(f"got {y.dtype} {tuple(y.shape)}")
    elif y.stride() != torch.empty_like(x).stride():
        problems.append(f"strides {y.stride()} != those of empty_like(x)")
    elif c["poison"] is not None:  # the non-finite outputs are eager's, the others close
        fin = t.isfinite()
        if fin.all():
            problems.append("the poison left every output finite")
        if not torch.equal(y.isnan(), t.isnan()):
            problems.append(f"{int(y.isnan().sum())} NaNs, eager {int(t.isnan().sum())}")
        elif not torch.equal(y.isinf(), t.isinf()) or not torch.equal(y[y.isinf()].double(),
                                                                      t[t.isinf()]):
            problems.append("inf outputs differ from eager")
        elif not (err[fin] <= TOL[dtype] * (1 + t[fin].abs())).all():
            problems.append("outside tolerance")
        err = err[fin]
    elif not (err <= TOL[dtype] * (1 + t.abs())).all():  # NaN fails too
        problems.append("outside tolerance")
    if c["launches"] is not None and launches != c["launches"]:
        problems.append(f"{launches} launches, expected {c['launches']} (wrong path)")
    line = (f"{c['name']:11s} {str(tuple(shape)):17s} G={c['G']:<4d} {str(dtype)[6:]:8s} "
            f"{c['fmt']:6s} params={str(pd)[6:]} w={c['w']:d} b={c['b']:d} cb={c['cb']:d} "
            f"silu={c['silu']:d} sms={c['sms']} off={off} launches={launches} "
            f"maxerr={err.max().item() if err.numel() else 0.0:.2e} {dt:.1f}s"
            + (f" poison={c['poison'][0]}:{c['poison'][1]}" if c["poison"] else ""))
    return not problems, ("ok   " if not problems else "FAIL ") + line + \
        ("" if not problems else "  <- " + "; ".join(problems))


def check_inputs(gn):
    """Empty inputs return empty outputs; bad inputs raise RuntimeError. Returns (ok, line) each."""
    out = []
    for shape in [(0, 8, 4, 4), (2, 8, 0, 3)]:
        y = gn(torch.randn(shape), 4, None, None, 1e-5, True, None)
        out.append((y.shape == shape, f"empty {shape} -> {tuple(y.shape)}"))
    bad = {
        "rank": lambda: gn(torch.randn(2, 8), 4, None, None, 1e-5, True, None),
        "groups": lambda: gn(torch.randn(2, 8, 3), 3, None, None, 1e-5, True, None),
        "weight shape": lambda: gn(torch.randn(2, 8, 3), 4, torch.randn(7), None, 1e-5, True, None),
        "bias dtype": lambda: gn(torch.randn(2, 8, 3).half(), 4, None, torch.randn(8).double(),
                                 1e-5, True, None),
        "channel_bias shape": lambda: gn(torch.randn(2, 8, 3), 4, None, None, 1e-5, True,
                                         torch.randn(8)),
        "int x": lambda: gn(torch.ones(2, 8, 3, dtype=torch.int32), 4, None, None, 1e-5, True, None),
        "strided x": lambda: gn(torch.randn(2, 8, 6)[..., ::2], 4, None, None, 1e-5, True, None),
    }
    for name, f in bad.items():
        try:
            f()
            out.append((False, f"bad {name}: no error"))
        except RuntimeError as e:
            out.append((True, f"bad {name} -> {str(e).splitlines()[0][:100]}"))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("lib")
    ap.add_argument("--subset", choices=["default", "extra", "all"], default="default")
    ap.add_argument("names", nargs="*", help="run only cases whose name contains one of these")
    a = ap.parse_args()
    torch.ops.load_library(a.lib)
    gn = torch.ops.dkemu.gn
    torch.manual_seed(0)
    results = []
    for c in CASES:
        chosen = a.subset == "all" or c["default"] == (a.subset == "default")
        if any(s in c["name"] for s in a.names) if a.names else chosen:
            results.append(run_case(c, gn))
            print(results[-1][1], flush=True)
    if not a.names and a.subset != "extra":
        for r in check_inputs(gn):
            results.append(r)
            print(("ok   " if r[0] else "FAIL ") + r[1], flush=True)
    passed = sum(ok for ok, _ in results)
    print(f"{passed}/{len(results)} cases passed")
    sys.exit(0 if results and passed == len(results) else 1)


if __name__ == "__main__":
    main()
