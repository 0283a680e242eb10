"""GroupNorm (+ the time-embedding add) + SiLU in Triton.

y = silu(((x + cb[n, c]) - mean) * rstd * w[c] + b[c]), statistics of each (n, group) in fp32.

A group is a [CPG, S] block of x (CPG = C / G channels, S = prod(spatial)). The kernels walk it
in tiles of BLOCK elements shaped [BLOCK // W, W], W contiguous in memory:
  - NCHW: each channel's S contiguous elements are cut into rows of W = 64 (the last row of a
    channel masked), so the channel index is computed once per row, not per element.
  - channels_last: a row is one spatial position and W >= CPG channels of it (W = 16 or 64),
    rows are C elements apart; a group of more than 64 channels takes several column tiles.
Statistics never form E[x^2] - E[x]^2: values are first shifted by the group's first element
(so x = 1e4 + noise loses nothing), each tile's mean and M2 = sum((v - mean)^2) come from the
registers, and tiles, then programs, are merged with Chan's formula.

Paths (chosen by `_plan`):
  - single: the whole group fits one tile (<= 16K elements): one program per (n, g) reads x
    once and writes y once.
  - split: a group is cut into SPLIT chunks so that N * G * SPLIT programs fill the GPU. Stage 1
    writes (count, mean, M2) per chunk to a small fp32 workspace; stage 2 merges its group's
    partials and normalises its chunk. Stage 2 walks the chunks in reverse so that the chunks
    stage 1 read last (still in L2) are read first.
"""
import contextlib
import functools

import torch
import triton
import triton.language as tl

SINGLE_MAX = 16384  # elements of a group held in registers by one program (NCHW)
SINGLE_MAX_CL = 4096  # channels_last: every element has its own address, so fewer fit
SPLIT_BLOCK = 4096  # elements per tile in the split kernels
MAX_SPLIT = 256  # chunks per group (stage 2 merges them as one vector)
PROGRAMS_PER_SM = 4


# ----------------------------------------------------------------------------- device code

@triton.jit
def _tile(t, n_ct, CPG, S, C, CL: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr):
    """Offsets (relative to the group's first element) and mask of tile t's elements, the channel
    (within the group) of each tile column (channels_last) or row (NCHW) with its mask, and the
    tile's element count. Per-channel values are loaded once per row/column, not per element."""
    ROWS: tl.constexpr = BLOCK // W
    if CL:
        rt = t // n_ct
        ct = t - rt * n_ct
        r = rt * ROWS + tl.arange(0, ROWS)  # spatial positions
        ch = ct * W + tl.arange(0, W)  # channels within the group
        offs = r[:, None] * C + ch[None, :]
        cmask = ch < CPG
        mask = (r < S)[:, None] & cmask[None, :]
        chan = ch
        cnt = tl.minimum(S - rt * ROWS, ROWS) * tl.minimum(CPG - ct * W, W)
    else:
        n_sb = tl.cdiv(S, W)  # a channel's S elements as rows of W (the last one masked)
        n_rows = CPG * n_sb
        r = t * ROWS + tl.arange(0, ROWS)
        c = r // n_sb
        s = (r - c * n_sb)[:, None] * W + tl.arange(0, W)[None, :]
        offs = c[:, None] * S + s
        cmask = r < n_rows
        mask = cmask[:, None] & (s < S)
        chan = c
        cnt = tl.sum(tl.where(cmask, tl.minimum(S - (r - c * n_sb) * W, W), 0), axis=0)
    return offs, mask, chan, cmask, cnt.to(tl.float32)


@triton.jit
def _group_base(pid_ng, G, CPG, S, C, stride_n, CL: tl.constexpr):
    n = pid_ng // G
    g = pid_ng - n * G
    if CL:
        return n.to(tl.int64) * stride_n + g * CPG
    else:
        return n.to(tl.int64) * stride_n + (g * CPG).to(tl.int64) * S


@triton.jit
def _bcast(vec, CL: tl.constexpr):
    """A per-channel vector broadcast against the tile: along columns (channels_last) or rows."""
    if CL:
        return vec[None, :]
    else:
        return vec[:, None]


@triton.jit
def _load_shifted(xg, cbg, offs, mask, chan, cmask, shift, HAS_CB, CL: tl.constexpr):
    """(x + cb) - shift in fp32: the add rounds exactly like the reference's; the shift is exact."""
    v = tl.load(xg + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_CB:
        v = v + _bcast(tl.load(cbg + chan, mask=cmask, other=0.0).to(tl.float32), CL)
    return v - shift


@triton.jit
def _shift(xg, cbg, HAS_CB):
    """The group's first element (+ its channel bias): every program of a group shifts by it."""
    k = tl.load(xg).to(tl.float32)
    if HAS_CB:
        k = k + tl.load(cbg).to(tl.float32)
    return k


@triton.jit
def _normalise_store(v, yg, w_ptr, b_ptr, offs, mask, chan, cmask, c0, mean, rstd,
                     HAS_W, HAS_B, SILU, CL: tl.constexpr):
    """y = v * a[c] + beta[c] with a = rstd * w, beta = b - mean * a (v, mean: shifted)."""
    a = tl.zeros(chan.shape, tl.float32) + rstd
    if HAS_W:
        a = a * tl.load(w_ptr + c0 + chan, mask=cmask, other=0.0).to(tl.float32)
    beta = -mean * a
    if HAS_B:
        beta = beta + tl.load(b_ptr + c0 + chan, mask=cmask, other=0.0).to(tl.float32)
    y = v * _bcast(a, CL) + _bcast(beta, CL)
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    tl.store(yg + offs, y.to(yg.dtype.element_ty), mask=mask)


# Arguments that are never worth a value-1 specialisation: one compiled variant serves all.
@triton.jit(do_not_specialize=["G"])
def _gn_single_kernel(x_ptr, y_ptr, w_ptr, b_ptr, cb_ptr, G, CPG, S, C, stride_n, eps,
                      HAS_W, HAS_B, HAS_CB, SILU,
                      CL: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr):
    """One program per (n, g): the whole group is one tile held in registers."""
    pid = tl.program_id(0)
    base = _group_base(pid, G, CPG, S, C, stride_n, CL)
    c0 = (pid % G) * CPG
    cbg = cb_ptr + (pid // G) * C + c0
    shift = _shift(x_ptr + base, cbg, HAS_CB)
    offs, mask, chan, cmask, cnt = _tile(0, 1, CPG, S, C, CL, W, BLOCK)
    v = _load_shifted(x_ptr + base, cbg, offs, mask, chan, cmask, shift, HAS_CB, CL)
    v = tl.where(mask, v, 0.0)
    mean = tl.sum(tl.sum(v, axis=1), axis=0) / cnt
    d = tl.where(mask, v - mean, 0.0)
    var = tl.sum(tl.sum(d * d, axis=1), axis=0) / cnt
    rstd = tl.rsqrt(var + eps)
    _normalise_store(v, y_ptr + base, w_ptr, b_ptr, offs, mask, chan, cmask, c0, mean, rstd,
                     HAS_W, HAS_B, SILU, CL)


@triton.jit(do_not_specialize=["G", "SPLIT", "tiles_per_chunk", "n_tiles", "n_ct"])
def _gn_stats_kernel(x_ptr, cb_ptr, ws_ptr, G, CPG, S, C, stride_n, SPLIT, tiles_per_chunk,
                     n_tiles, n_ct, HAS_CB,
                     CL: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr):
    """Stage 1: (count, mean, M2) of one chunk of a group, shifted by the group's first element."""
    pid = tl.program_id(0)
    pid_ng = pid // SPLIT
    chunk = pid - pid_ng * SPLIT
    base = _group_base(pid_ng, G, CPG, S, C, stride_n, CL)
    cbg = cb_ptr + (pid_ng // G) * C + (pid_ng % G) * CPG
    shift = _shift(x_ptr + base, cbg, HAS_CB)
    t0 = chunk * tiles_per_chunk
    t1 = tl.minimum(t0 + tiles_per_chunk, n_tiles)
    n_acc = 0.0
    mean_acc = 0.0
    m2_acc = 0.0
    for t in range(t0, t1):
        offs, mask, chan, cmask, cnt = _tile(t, n_ct, CPG, S, C, CL, W, BLOCK)
        v = _load_shifted(x_ptr + base, cbg, offs, mask, chan, cmask, shift, HAS_CB, CL)
        v = tl.where(mask, v, 0.0)
        mean_t = tl.sum(tl.sum(v, axis=1), axis=0) / cnt
        d = tl.where(mask, v - mean_t, 0.0)
        m2_t = tl.sum(tl.sum(d * d, axis=1), axis=0)
        # Chan et al.: merge (n_acc, mean_acc, m2_acc) with the tile's (cnt, mean_t, m2_t).
        n_new = n_acc + cnt
        delta = mean_t - mean_acc
        mean_acc = mean_acc + delta * (cnt / n_new)
        m2_acc = m2_acc + m2_t + delta * delta * (n_acc * cnt / n_new)
        n_acc = n_new
    n_prog = tl.num_programs(0)
    tl.store(ws_ptr + pid, n_acc)
    tl.store(ws_ptr + n_prog + pid, mean_acc)
    tl.store(ws_ptr + 2 * n_prog + pid, m2_acc)


@triton.jit(do_not_specialize=["G", "SPLIT", "tiles_per_chunk", "n_tiles", "n_ct"])
def _gn_apply_kernel(x_ptr, y_ptr, w_ptr, b_ptr, cb_ptr, ws_ptr, G, CPG, S, C, stride_n, eps,
                     SPLIT, tiles_per_chunk, n_tiles, n_ct, HAS_W, HAS_B, HAS_CB, SILU,
                     CL: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr,
                     MAX_SPLIT: tl.constexpr):
    """Stage 2: merge the group's partials, then normalise this program's chunk."""
    n_prog = tl.num_programs(0)
    pid = n_prog - 1 - tl.program_id(0)  # reverse of stage 1: its last chunks are still in L2
    pid_ng = pid // SPLIT
    chunk = pid - pid_ng * SPLIT
    # Parallel Chan merge of all partials: no E[x^2] - E[x]^2 anywhere.
    idx = tl.arange(0, MAX_SPLIT)
    pm = idx < SPLIT
    part = ws_ptr + pid_ng * SPLIT + idx
    cnt_p = tl.load(part, mask=pm, other=0.0)
    mean_p = tl.load(part + n_prog, mask=pm, other=0.0)
    m2_p = tl.load(part + 2 * n_prog, mask=pm, other=0.0)
    total = tl.sum(cnt_p, axis=0)
    mean = tl.sum(cnt_p * mean_p, axis=0) / total
    dm = mean_p - mean
    var = (tl.sum(m2_p, axis=0) + tl.sum(cnt_p * dm * dm, axis=0)) / total
    rstd = tl.rsqrt(var + eps)

    base = _group_base(pid_ng, G, CPG, S, C, stride_n, CL)
    c0 = (pid_ng % G) * CPG
    cbg = cb_ptr + (pid_ng // G) * C + c0
    shift = _shift(x_ptr + base, cbg, HAS_CB)
    t0 = chunk * tiles_per_chunk
    t1 = tl.minimum(t0 + tiles_per_chunk, n_tiles)
    for t in range(t0, t1):
        offs, mask, chan, cmask, cnt = _tile(t, n_ct, CPG, S, C, CL, W, BLOCK)
        v = _load_shifted(x_ptr + base, cbg, offs, mask, chan, cmask, shift, HAS_CB, CL)
        _normalise_store(v, y_ptr + base, w_ptr, b_ptr, offs, mask, chan, cmask, c0, mean, rstd,
                         HAS_W, HAS_B, SILU, CL)


# ----------------------------------------------------------------------------- host code

@functools.lru_cache(None)
def _num_sms(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _cdiv(a, b):
    return -(-a // b)


def _plan(n, c, s, groups, channels_last, num_sms=132, split_block=SPLIT_BLOCK, split=None,
          single=None):
    """The launch configuration for an [n, c, s] problem (pure host arithmetic).

    split_block / split / single override the rule (tests use them to reach the split path and
    multi-tile chunks with small shapes).
    """
    cpg = c // groups
    if channels_last:
        w = 16 if cpg <= 16 else 64
        n_ct = _cdiv(cpg, w)
        fits = n_ct == 1 and s * w <= SINGLE_MAX_CL
        group_elems = s * w  # what the single tile must hold
    else:
        w = 64
        n_ct = 1
        group_elems = cpg * _cdiv(s, w) * w
        fits = group_elems <= SINGLE_MAX
    if single is None:
        single = fits and split is None
    if single:
        if not fits:
            raise ValueError("group does not fit the single-pass kernel")
        block = 4096 if group_elems <= 4096 else SINGLE_MAX
        return dict(kind="single", CL=channels_last, W=w, BLOCK=block,
                    num_warps=16 if block > 4096 else 8, grid=n * groups)
    block = max(split_block, w)
    rows = block // w
    if channels_last:
        n_tiles = _cdiv(s, rows) * n_ct
    else:
        n_tiles = _cdiv(cpg * _cdiv(s, w), rows)
    if split is None:
        split = _cdiv(num_sms * PROGRAMS_PER_SM, n * groups)
    split = max(1, min(split, n_tiles, MAX_SPLIT))
    tiles_per_chunk = _cdiv(n_tiles, split)
    split = _cdiv(n_tiles, tiles_per_chunk)  # no empty chunk
    return dict(kind="split", CL=channels_last, W=w, BLOCK=block,
                num_warps=8 if block >= 4096 else 4, grid=n * groups * split, split=split,
                tiles_per_chunk=tiles_per_chunk, n_tiles=n_tiles, n_ct=n_ct)


def _layout(x):
    """(S, stride_n, channels_last) of x viewed as [N, C, S]."""
    n, c = x.shape[:2]
    s = 1
    for d in x.shape[2:]:
        s *= d
    if c == 1 or s == 1:
        return s, x.stride(0), True  # [N, C, 1, ...] or [N, 1, ...]: one layout covers both
    if x.is_contiguous():
        return s, x.stride(0), False
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    if x.dim() in (4, 5) and x.is_contiguous(memory_format=fmt):
        return s, x.stride(0), True
    raise ValueError("x: expected a contiguous or channels_last tensor")


def _launches(x, y, num_groups, weight, bias, eps, silu, channel_bias, plan_kw=None,
              num_sms=None):
    """[(kernel, grid, args, constexprs, num_warps)] for one call; the launcher runs them and
    compile_specs() reads them."""
    n, c = x.shape[:2]
    s, stride_n, cl = _layout(x)
    if c * s >= 2 ** 31:
        raise ValueError(f"x: {c * s} elements per sample is more than the Triton kernel indexes "
                         "(2**31)")
    if num_sms is None:
        num_sms = _num_sms(x.device.index if x.device.index is not None else
                           torch.cuda.current_device()) if x.is_cuda else 132
    p = _plan(n, c, s, num_groups, cl, num_sms, **(plan_kw or {}))
    cpg = c // num_groups
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None,
                 HAS_CB=channel_bias is not None, SILU=bool(silu))
    w, b, cb = (x if t is None else t for t in (weight, bias, channel_bias))
    meta = dict(CL=p["CL"], W=p["W"], BLOCK=p["BLOCK"])
    if p["kind"] == "single":
        args = dict(x_ptr=x, y_ptr=y, w_ptr=w, b_ptr=b, cb_ptr=cb, G=num_groups, CPG=cpg, S=s,
                    C=c, stride_n=stride_n, eps=float(eps), HAS_W=flags["HAS_W"],
                    HAS_B=flags["HAS_B"], HAS_CB=flags["HAS_CB"], SILU=flags["SILU"])
        return [(_gn_single_kernel, p["grid"], args, meta, p["num_warps"])]
    ws = torch.empty(3 * p["grid"], device=x.device, dtype=torch.float32)
    common = dict(G=num_groups, CPG=cpg, S=s, C=c, stride_n=stride_n)
    tiles = dict(SPLIT=p["split"], tiles_per_chunk=p["tiles_per_chunk"], n_tiles=p["n_tiles"],
                 n_ct=p["n_ct"])
    stats = dict(x_ptr=x, cb_ptr=cb, ws_ptr=ws, **common, **tiles, HAS_CB=flags["HAS_CB"])
    apply = dict(x_ptr=x, y_ptr=y, w_ptr=w, b_ptr=b, cb_ptr=cb, ws_ptr=ws, **common,
                 eps=float(eps), **tiles, **flags)
    return [(_gn_stats_kernel, p["grid"], stats, meta, p["num_warps"]),
            (_gn_apply_kernel, p["grid"], apply, dict(meta, MAX_SPLIT=MAX_SPLIT), p["num_warps"])]


def group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5, silu=True,
                    channel_bias=None, *, _plan_kw=None):
    """The "triton" backend of dk.group_norm_silu.

    The dispatcher hands over x [N, C, *spatial] (fp32/fp16/bf16, contiguous or
    channels_last(_3d)), weight/bias [C] and channel_bias [N, C] contiguous, in x's dtype or
    fp32. The output has x's dtype and memory format. _plan_kw: tests only (see _plan).
    """
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    launches = _launches(x, y, num_groups, weight, bias, eps, silu, channel_bias, _plan_kw)
    # Triton launches on the current device: make it x's.
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        for kernel, grid, args, meta, num_warps in launches:
            kernel[(grid,)](**args, **meta, num_warps=num_warps, num_stages=1)
    return y


# ----------------------------------------------------------------------------- compile specs

_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _specialize(value, specialize=True):
    """(signature type, is 16-divisible) as triton's launcher specialises an argument (3.x):
    ints equal to 1 become constexprs, ints divisible by 16 get a divisibility hint (neither for
    a do_not_specialize argument)."""
    if isinstance(value, bool):
        return "u1", False
    if isinstance(value, int):
        if value == 1 and specialize:
            return "constexpr", False
        return ("i32" if -2 ** 31 <= value < 2 ** 31 else "i64"), specialize and value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    return "*" + _TRITON_TYPES[value.dtype], True  # allocator pointers are 16B aligned


# Shapes whose plans together reach every (kernel, layout, W, BLOCK) the launcher can pick
# (tests/test_triton_compile.py checks that against a sweep of shapes): (N, C, groups, spatial).
_SPEC_SHAPES = (
    (2, 128, 32, (32, 32)),     # NCHW single 4096
    (1, 1280, 32, (16, 16)),    # NCHW single 16384
    (1, 128, 32, (256, 256)),   # NCHW split (VAE) | CL W=16 split
    (1, 1280, 32, (64, 64)),    # CL W=64 split
    (2, 128, 32, (16, 16)),     # CL W=16 single 4096
    (1, 1280, 32, (8, 8)),      # CL W=64 single 4096
)


def _sample_launches(dtype, shape_entry, channels_last):
    n, c, groups, spatial = shape_entry
    x = torch.empty((n, c) + spatial, dtype=dtype, device="meta")
    if channels_last and len(spatial) == 2:
        x = x.contiguous(memory_format=torch.channels_last)
    p = torch.empty(c, dtype=dtype, device="meta")
    cb = torch.empty(n, c, dtype=dtype, device="meta")
    return _launches(x, torch.empty_like(x), groups, p, p, 1e-5, True, cb, num_sms=132)


def compile_specs():
    """Every (kernel, constexpr config) the launcher can pick, for fp16/bf16/fp32, contiguous
    and channels_last, as dicts {name, fn, signature, constexprs, attrs, num_warps, num_stages}
    for diffkernels.triton._compile.compile_spec. Arguments are specialised as a real launch of
    an SD-like shape would be."""
    specs, seen = [], set()
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for cl in (False, True):
            for shape in _SPEC_SHAPES:
                for kernel, _, args, meta, num_warps in _sample_launches(dtype, shape, cl):
                    layout = "cl" if meta["CL"] else "nchw"
                    name = (f"{kernel.__name__.strip('_')}-{_TRITON_TYPES[dtype]}-{layout}"
                            f"-W{meta['W']}-B{meta['BLOCK']}")
                    if name in seen:
                        continue
                    seen.add(name)
                    signature, constexprs, attrs = {}, dict(meta), {}
                    for i, param in enumerate(kernel.params):
                        arg = param.name
                        if arg in meta:
                            signature[arg] = "constexpr"
                            continue
                        ty, div16 = _specialize(args[arg], not param.do_not_specialize)
                        signature[arg] = ty
                        if ty == "constexpr":
                            constexprs[arg] = args[arg]
                        elif div16:
                            attrs[(i,)] = [["tt.divisibility", 16]]
                    specs.append(dict(name=name, fn=kernel, signature=signature,
                                      constexprs=constexprs, attrs=attrs, num_warps=num_warps,
                                      num_stages=1))
    return specs
