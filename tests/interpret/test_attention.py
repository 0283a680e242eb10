"""The Triton attention kernels under TRITON_INTERPRET=1 on CPU tensors, against
diffkernels.reference.attention (fp32 ground truth) at the DESIGN.md 6 tolerances.

Run in its own process: `TRITON_INTERPRET=1 pytest tests/interpret` (the variable must be set
before the kernels are defined). B*H is tiny and each case picks the path it exercises:
Lk <= 80 (fp16/bf16) takes the short-Lk kernel, longer Lk or fp32 the general one, whose
remainder loop runs whenever Lk is not a multiple of its key block (64 here).
"""
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1",
                                reason="needs TRITON_INTERPRET=1 (own pytest process)")
pytest.importorskip("triton")

from diffkernels import reference  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # DESIGN.md 6
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _kernel():
    from diffkernels.triton import attention
    return attention


def _qkv(B, H, Lq, Lk, D, dtype, layout="bhsd", seed=0, mag=1.0):
    """q [B,H,Lq,D], k/v [B,H,Lk,D] in a layout: "bhsd" contiguous, "bshd" the transposed
    view diffusers hands over, "slice" a non-dense view (rows of a longer buffer)."""
    g = torch.Generator().manual_seed(seed)

    def make(L):
        if layout == "bshd":
            return (torch.randn(B, L, H, D, generator=g) * mag).to(dtype).transpose(1, 2)
        if layout == "slice":
            return (torch.randn(B, H, L + 3, D, generator=g) * mag).to(dtype)[:, :, 1:L + 1]
        return (torch.randn(B, H, L, D, generator=g) * mag).to(dtype)
    return make(Lq), make(Lk), make(Lk)


def _mask(B, Lk, seed=1):
    """Batch 0 attends nothing (its rows must give zeros), the others a random subset."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, Lk, generator=g) > 0.4
    m[0] = False
    if B > 1:
        m[1, -1] = True  # at least one key, in the last (tail) block
    return m


def _check(out, q, k, v, scale, mask):
    ref = reference.attention(q, k, v, scale, mask)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all(), "non-finite values in the output"
    tol = TOL[q.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    if mask is not None:
        dead = ~mask.any(dim=1)
        assert (out[dead] == 0).all(), "a row with no key to attend must give zeros"


# (B, H, Lq, Lk, D, dtype, layout, masked, scale); scale None = D**-0.5
CASES = [
    # short-Lk kernel: cross-attention to 77 text tokens (64 + 16-key pieces), Lk = 64, 1
    (1, 2, 100, 77, 40, F16, "bshd", False, None),
    (2, 1, 77, 77, 80, BF16, "bhsd", True, None),
    (2, 1, 64, 64, 64, F16, "bhsd", True, 0.3),
    (1, 1, 33, 1, 8, BF16, "bshd", False, None),
    (1, 2, 300, 77, 8, F16, "bhsd", False, None),      # several query blocks per program
    (2, 1, 20, 77, 160, F16, "slice", True, None),
    (1, 1, 20, 64, 256, BF16, "bhsd", False, None),    # D = 256: general kernel, no tail
    # general kernel: Lk = 100, 130 (full 64-key blocks + 16-key remainder blocks)
    (2, 1, 100, 130, 40, F16, "bshd", True, None),
    (1, 2, 64, 100, 80, BF16, "bshd", False, None),
    (1, 1, 1, 130, 160, F16, "bhsd", False, 0.5),
    (2, 1, 77, 100, 72, F16, "slice", True, None),
    (1, 1, 40, 130, 256, F16, "bshd", True, None),
    (1, 1, 20, 100, 8, BF16, "bhsd", True, None),
    # fp32: exact (ieee) dots, always the general kernel
    (2, 1, 77, 77, 40, F32, "bshd", True, None),
    (1, 2, 64, 100, 64, F32, "bhsd", False, 0.2),
    (1, 1, 100, 1, 80, F32, "bshd", False, None),
    (2, 1, 30, 130, 160, F32, "bhsd", True, None),
    (1, 1, 20, 64, 256, F32, "slice", False, None),
    # D > 256: the output's head dim split over programs (128-wide slices), scores over all D
    (1, 1, 70, 100, 512, F16, "bshd", True, None),     # the VAE mid-block head
    (2, 1, 20, 77, 512, BF16, "bhsd", True, None),
    (1, 2, 33, 40, 264, F16, "slice", False, None),    # 256 + 8: last slice 8 columns wide
    (1, 1, 16, 130, 392, BF16, "bshd", False, 0.1),
    (2, 1, 20, 70, 512, F32, "bshd", True, None),
    (1, 1, 10, 33, 328, F32, "bhsd", False, None),
]


@pytest.mark.parametrize("B,H,Lq,Lk,D,dtype,layout,masked,scale", CASES)
def test_matches_reference(B, H, Lq, Lk, D, dtype, layout, masked, scale):
    q, k, v = _qkv(B, H, Lq, Lk, D, dtype, layout)
    mask = _mask(B, Lk) if masked else None
    scale = D ** -0.5 if scale is None else scale
    out = _kernel().attention(q, k, v, scale, mask)
    _check(out, q, k, v, scale, mask)
    if layout == "bshd":  # read in place, written through q's (transposed) strides
        assert out.stride() == q.stride()


@pytest.mark.parametrize("Lk", [77, 130])
def test_fp16_scores_beyond_fp16_range(Lk):
    """|q.k| ~ 1e5 > 65504: the scores live in fp32, so the softmax is still right."""
    q, k, v = _qkv(1, 1, 40, Lk, 64, F16, mag=12.0, seed=3)
    v = v / 12
    out = _kernel().attention(q, k, v, 1.0, None)
    _check(out, q, k, v, 1.0, None)


@pytest.mark.parametrize("Lk,dtype", [(130, F16), (77, BF16), (100, F32)])
def test_mask_with_empty_leading_blocks(Lk, dtype):
    """Rows whose first key blocks are all masked (running max still -inf) and later keys
    are not: no NaN from -inf - -inf, and the later keys get all the weight."""
    q, k, v = _qkv(2, 1, 30, Lk, 40, dtype, "bshd")
    mask = torch.zeros(2, Lk, dtype=torch.bool)
    mask[1, 70:] = True
    out = _kernel().attention(q, k, v, 0.2, mask)
    _check(out, q, k, v, 0.2, mask)


def test_config_tables_keep_every_warp_busy():
    """Chained dots place warps on query rows only: BLOCK_M >= 16 rows per warp (sm_80 mma)
    and >= 64 rows per warpgroup (sm_90 wgmma), or warps would duplicate work."""
    A = _kernel()
    for row in A._GENERAL + A._SHORT + ((0,) + A.WIDE["lowp"],):
        bm, warps = row[1], row[-2]
        assert bm >= 16 * warps and bm >= 64 * max(1, warps // 4), row


def test_unaligned_strides_are_copied_not_misread():
    """Strides that are not multiples of 8 elements: the launcher copies (the kernels assume
    16-byte aligned rows) and the answer stays right."""
    base = torch.randn(1, 2, 50, 68).half()
    q = base[..., :64]  # row stride 68
    k, v = torch.randn(2, 1, 2, 70, 64).half()
    out = _kernel().attention(q, k, v, 0.125, None)
    _check(out, q, k, v, 0.125, None)


def test_through_the_public_op():
    import diffkernels as dk
    q, k, v = _qkv(2, 2, 50, 77, 40, F16, "bshd")
    mask = _mask(2, 77)
    with dk.backend("triton"):
        out = dk.attention(q, k, v, key_padding_mask=mask)
    _check(out, q, k, v, 40 ** -0.5, mask)


def test_head_blocks_do_not_pad_to_powers_of_two():
    hb = _kernel().head_blocks
    assert hb(40) == (32, 16) and hb(80) == (64, 16) and hb(160) == (128, 32)
    assert hb(64) == (64, 0) and hb(8) == (16, 0) and hb(256) == (256, 0)
    assert hb(40, F32) == (64, 0)  # fp32: one power-of-two block
    pow2 = [16, 32, 64, 128, 256]
    for D in range(8, 257, 8):  # the narrowest D0 + D1 (D0 > D1, both powers of two >= 16)
        d0, d1 = hb(D)
        best = min(a + b for a in pow2 for b in [0] + pow2 if b < a and a + b >= D)
        assert d0 + d1 == best and d0 in pow2 and (d1 == 0 or d1 in pow2), (D, d0, d1)
    for dtype in (F16, BF16, F32):  # D > 256: 256 + the rest's power of two, any dtype
        assert hb(264, dtype) == (256, 16) and hb(392, dtype) == (256, 256)
        assert hb(512, dtype) == (256, 256) and hb(320, dtype) == (256, 64)


def test_compile_specs_cover_every_launch():
    """compile_specs() (compiled for sm_80/sm_90 by tests/test_triton_compile.py) holds every
    (kernel, constexprs, num_warps, num_stages) that _plan picks over a sweep of shapes."""
    A = _kernel()
    specs = {s["name"]: s for s in A.compile_specs()}
    for dtype in (F16, BF16, F32):
        for D in range(8, 513, 8):
            for Lk in (1, 16, 64, 77, 80, 81, 128, 1031, 4096):
                for has_mask in (False, True):
                    for B, H, Lq, sms in ((1, 1, 1, 2), (2, 8, 4096, 132), (2, 20, 1024, 78)):
                        kernel, meta, warps, stages, grid, _ = A._plan(
                            B, H, Lq, Lk, D, dtype, has_mask, sms)
                        name = A.spec_name(kernel, dtype, meta)
                        assert name in specs, f"launch {name} has no compile spec"
                        spec = specs[name]
                        assert spec["fn"] is kernel
                        assert (spec["num_warps"], spec["num_stages"]) == (warps, stages), name
                        assert all(spec["constexprs"][k] == v for k, v in meta.items()), name
                        assert all(g >= 1 for g in grid)
                        if D > A.WIDE_D:  # the output slices cover D
                            assert grid[1] * meta["BLOCK_DV"] >= D > (grid[1] - 1) * meta["BLOCK_DV"]


# ----------------------------------------------------------------------------- NaN / inf
# DESIGN.md 7: NaN and inf propagate as F.scaled_dot_product_attention's math implementation
# (fp32, attn_mask = mask[:, None, None, :], an additive -inf mask) propagates them; the one
# exception is our contract that a row the mask lets attend no key gives zeros.

def _sdpa_expected(q, k, v, scale, mask):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), scale=scale,
            attn_mask=None if mask is None else mask[:, None, None, :])
    if mask is not None:
        ref[~mask.any(dim=1)] = 0.0
    return ref


def _check_nonfinite(out, q, k, v, scale, mask):
    ref = _sdpa_expected(q, k, v, scale, mask)
    out = out.float()
    assert torch.equal(out.isnan(), ref.isnan()), (
        f"NaN pattern differs from SDPA: {int(out.isnan().sum())} NaNs, SDPA "
        f"{int(ref.isnan().sum())}; first mismatch at "
        f"{(out.isnan() != ref.isnan()).nonzero()[0].tolist()}")
    assert torch.equal(out.isinf(), ref.isinf()) and torch.equal(out[out.isinf()],
                                                                 ref[ref.isinf()]), "inf differs"
    fin = ref.isfinite()
    tol = TOL[q.dtype]
    torch.testing.assert_close(out[fin], ref[fin], atol=tol, rtol=tol)
    return ref


# kernel path per dtype: fp16 Lk = 77 the short-Lk kernel; bf16 Lk = 130 and fp32 Lk = 100 the
# general kernel with its remainder blocks; D = 264 the wide (split head dim) kernel
_PATHS = {F16: (77, 40), BF16: (130, 80), F32: (100, 40)}


@pytest.mark.parametrize("dtype", [F16, BF16, F32])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nonfinite_inputs_propagate_like_sdpa(where, value, masked, dtype):
    """One NaN/inf element in batch 0 and one in batch 1 of q (query row 3), k or v (key 5).
    With the mask, batch 0 attends nothing (zeros, whatever its data) and key 5 of batch 1 is
    masked: SDPA still propagates a NaN there (NaN + -inf = NaN, 0 * NaN = NaN)."""
    Lk, D = _PATHS[dtype]
    q, k, v = _qkv(2, 2, 20, Lk, D, dtype, "bshd")
    t = dict(q=q, k=k, v=v)[where]
    t[:, 1, 3 if where == "q" else 5, 5] = value
    mask = None
    if masked:
        mask = _mask(2, Lk)
        mask[1, 5] = False
    out = _kernel().attention(q, k, v, D ** -0.5, mask)
    ref = _check_nonfinite(out, q, k, v, D ** -0.5, mask)
    assert not ref.isfinite().all(), "the case must put a non-finite value in the output"


@pytest.mark.parametrize("dtype,D", [(F16, 264), (BF16, 512), (F32, 264)])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nonfinite_inputs_wide_head(where, dtype, D):
    q, k, v = _qkv(2, 1, 20, 40, D, dtype, "bhsd")
    dict(q=q, k=k, v=v)[where][1, 0, 3, D - 3] = float("nan")
    dict(q=q, k=k, v=v)[where][0, 0, 7, 100] = float("inf")
    mask = _mask(2, 40)
    out = _kernel().attention(q, k, v, D ** -0.5, mask)
    _check_nonfinite(out, q, k, v, D ** -0.5, mask)


@pytest.mark.parametrize("Lk,dtype,D", [(130, F16, 40), (77, BF16, 40), (100, F32, 64),
                                         (100, BF16, 264)])
def test_minus_inf_scores_without_mask(Lk, dtype, D):
    """-inf scores from inf inputs, no mask: the first key block is all -inf for every row
    (running max still -inf: exp2(-inf - -inf) must not make NaN), and the keys of batch 1
    all give -inf (SDPA's softmax gives zeros for such a row)."""
    q, k, v = _qkv(2, 1, 30, Lk, D, dtype, "bhsd")
    q[..., 0] = q[..., 0].abs() + 0.5
    k[0, :, :64, 0] = float("-inf")
    k[1, :, :, 0] = float("-inf")
    out = _kernel().attention(q, k, v, 0.3, None)
    ref = _check_nonfinite(out, q, k, v, 0.3, None)
    assert ref[0].isfinite().all() and (ref[1] == 0).all()


@pytest.mark.parametrize("Lk,dtype,D", [(77, F16, 40), (130, BF16, 80), (100, F32, 40),
                                         (40, F16, 264)])
def test_inf_query_against_padding_keys(Lk, dtype, D):
    """q[row 3, 0] = +inf and every k[:, 0] < 0: row 3 scores -inf at every key (SDPA gives
    zeros). The zero-filled key rows past Lk must not score inf * 0 = NaN."""
    q, k, v = _qkv(1, 2, 20, Lk, D, dtype, "bshd")
    q[:, :, 3, 0] = float("inf")
    k[..., 0] = -k[..., 0].abs() - 0.1
    out = _kernel().attention(q, k, v, D ** -0.5, None)
    ref = _check_nonfinite(out, q, k, v, D ** -0.5, None)
    assert (ref[:, :, 3] == 0).all() and ref.isfinite().all()
