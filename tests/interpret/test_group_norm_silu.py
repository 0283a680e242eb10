"""The Triton group_norm_silu kernels under TRITON_INTERPRET=1 on CPU tensors, against
diffkernels.reference (and a float64 ground truth where fp32 itself is the limit).

Run in its own process: `TRITON_INTERPRET=1 pytest tests/interpret` (the variable must be set
before the kernels are defined). Shapes are small; the split path is forced through the
launcher's plan override (_plan_kw) instead of big shapes.
"""
import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1",
                                reason="needs TRITON_INTERPRET=1 (own pytest process)")
pytest.importorskip("triton")

from diffkernels import reference  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # DESIGN.md 6

# _plan overrides: None = the launcher's own choice (single pass for these small groups);
# the split ones cut groups into several chunks of several tiles each.
SINGLE = None
SPLIT = dict(split=3, split_block=128)
SPLIT_1 = dict(split=1, split_block=256)  # one chunk of several tiles: merge across tiles only


def _kernel():
    from diffkernels.triton.group_norm_silu import group_norm_silu
    return group_norm_silu


def _inputs(shape, dtype, cl=False, weight=True, bias=True, cb=True, offset=0.0, scale=1.0,
            seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * scale + offset).to(dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4
                         else torch.channels_last_3d)
    n, c = shape[:2]
    w = (torch.randn(c, generator=g) * 0.5 + 1).to(dtype) if weight else None
    b = (torch.randn(c, generator=g) * 0.5).to(dtype) if bias else None
    cbias = torch.randn(n, c, generator=g).to(dtype) if cb else None
    return x, w, b, cbias


def _truth64(x, groups, w, b, eps, silu, cb):
    """float64 ground truth; x + cb is added in fp32 first, as the op defines it."""
    xf = x.float()
    if cb is not None:
        xf = xf + cb.float().reshape(*cb.shape, *([1] * (x.dim() - 2)))
    y = F.group_norm(xf.double(), groups, None, None, eps)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if w is not None:
        y = y * w.double().reshape(shape)
    if b is not None:
        y = y + b.double().reshape(shape)
    return F.silu(y) if silu else y


def _check(x, groups, w, b, eps, silu, cb, plan_kw):
    y = _kernel()(x, groups, w, b, eps, silu, cb, _plan_kw=plan_kw)
    ref = reference.group_norm_silu(x, groups, w, b, eps, silu, cb)
    assert y.dtype == x.dtype and y.shape == x.shape and y.stride() == x.stride()
    tol = TOL[x.dtype]
    torch.testing.assert_close(y.float(), ref.float(), atol=tol, rtol=tol)
    return y


@pytest.mark.parametrize("plan", [SINGLE, SPLIT, SPLIT_1], ids=["single", "split", "split1"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_matches_reference(dtype, cl, plan):
    # 7x9: the last 64-row of every NCHW channel is partial; C/G = 6 < W masks columns in CL.
    x, w, b, cb = _inputs((2, 12, 7, 9), dtype, cl)
    _check(x, 2, w, b, 1e-5, True, cb, plan)


@pytest.mark.parametrize("weight,bias,cb,silu,cl,plan", [
    (False, False, False, False, False, SINGLE),  # plain GroupNorm
    (False, False, False, False, True, SPLIT),
    (True, False, True, True, True, SINGLE),
    (True, False, True, True, False, SPLIT),
    (False, True, False, True, False, SINGLE),
    (False, True, False, True, True, SPLIT),
    (True, True, False, False, True, SINGLE),
    (True, True, False, False, False, SPLIT),
])
def test_optional_args(weight, bias, cb, silu, cl, plan):
    x, w, b, c = _inputs((1, 8, 6, 6), torch.float32, cl, weight, bias, cb, seed=1)
    _check(x, 4, w, b, 1e-3, silu, c, plan)


@pytest.mark.parametrize("plan", [SINGLE, SPLIT], ids=["single", "split"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_large_offset_fp32(cl, plan):
    """x = 1e4 + noise: no E[x^2] - E[x]^2 cancellation. Checked against float64, where even
    the fp32 reference is off by ~1e-3; the shifted statistics stay within 1e-4."""
    for cb in (False, True):
        x, w, b, c = _inputs((2, 8, 8, 8), torch.float32, cl, cb=cb, offset=1e4, seed=2)
        y = _kernel()(x, 2, w, b, 1e-5, True, c, _plan_kw=plan)
        torch.testing.assert_close(y.double(), _truth64(x, 2, w, b, 1e-5, True, c),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("plan", [SINGLE, SPLIT], ids=["single", "split"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_large_magnitude_fp16(cl, plan):
    """fp16 values up to ~6e4 (their squares overflow fp16): fp32 statistics stay finite."""
    x, w, b, c = _inputs((2, 8, 8, 8), torch.float16, cl, cb=False, scale=2e4, seed=3)
    x = x.clamp(-6e4, 6e4)
    y = _check(x, 2, w, b, 1e-5, True, c, plan)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), _truth64(x, 2, w, b, 1e-5, True, c).half().double(),
                               atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("shape,groups,cl,plan", [
    ((2, 6, 1, 1), 3, False, SINGLE),               # S = 1
    ((1, 4, 5, 3), 4, True, SINGLE),                # one channel per group
    ((3, 6, 10), 1, False, SPLIT),                  # rank 3, one group
    ((1, 4, 2, 3, 5), 2, True, SPLIT),              # 5-D channels_last_3d
    ((2, 160, 3, 3), 2, True, dict(split=2, split_block=128)),  # C/G = 80 > 64: 2 column tiles
    ((1, 6, 130), 3, False, dict(split=4, split_block=64)),     # S > W: 3 rows per channel
])
def test_shapes(shape, groups, cl, plan):
    x, w, b, cb = _inputs(shape, torch.float32, cl, seed=4)
    _check(x, groups, w, b, 1e-5, True, cb, plan)


def test_params_in_fp32_with_half_input():
    """weight/bias/channel_bias may stay fp32 when x is fp16 (the dispatcher allows it)."""
    x, _, _, _ = _inputs((2, 8, 4, 4), torch.float16, cb=False, seed=5)
    w, b, cb = torch.randn(8), torch.randn(8), torch.randn(2, 8)
    _check(x, 2, w, b, 1e-5, True, cb, SINGLE)
    _check(x, 2, w, b, 1e-5, True, cb, SPLIT)


def test_empty():
    x = torch.empty(0, 8, 4, 4)
    assert _kernel()(x, 2, None, None, 1e-5, True, None).shape == x.shape


def test_split_plan_fills_the_gpu():
    from diffkernels.triton.group_norm_silu import _plan
    p = _plan(1, 320, 64 * 64, 32, False, num_sms=132)  # SD1.5 64x64, batch 1
    assert p["kind"] == "split" and p["grid"] >= 132
    p = _plan(1, 1280, 8 * 8, 32, False, num_sms=132)  # group of 2560 elements: one pass
    assert p["kind"] == "single" and p["grid"] == 32


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_public_op_on_triton_backend(cl, monkeypatch):
    import diffkernels as dk
    from diffkernels.triton import group_norm_silu as launcher

    calls = []
    kernel = launcher.group_norm_silu
    monkeypatch.setattr(launcher, "group_norm_silu", lambda *a: calls.append(1) or kernel(*a))
    x, w, b, cb = _inputs((2, 8, 5, 5), torch.float16, cl, seed=6)
    with dk.backend("triton"):
        y = dk.group_norm_silu(x, 4, w, b, 1e-5, silu=True, channel_bias=cb)
    assert calls == [1], "the C++ router did not run the Triton launcher"
    ref = reference.group_norm_silu(x, 4, w, b, 1e-5, True, cb)
    assert y.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    torch.testing.assert_close(y.float(), ref.float(), atol=2e-3, rtol=2e-3)


# ----------------------------------------------------------------------------- NaN / inf
# DESIGN.md 7: NaN and inf propagate as eager F.group_norm + F.silu propagate them (in fp32):
# a non-finite x poisons its whole (n, group), a non-finite weight/bias only its channel, and
# SiLU(-inf) = -inf * sigmoid(-inf) = NaN.

def _eager(x, groups, w, b, eps, silu, cb):
    xf = x.float()
    if cb is not None:
        xf = xf + cb.float().reshape(*cb.shape, *([1] * (x.dim() - 2)))
    y = F.group_norm(xf, groups, None if w is None else w.float(),
                     None if b is None else b.float(), eps)
    return F.silu(y) if silu else y


def assert_same_nonfinite(y, ref, tol):
    y = y.float()
    assert torch.equal(y.isnan(), ref.isnan()), (
        f"NaN pattern differs from eager: {int(y.isnan().sum())} NaNs, eager "
        f"{int(ref.isnan().sum())}")
    assert torch.equal(y.isinf(), ref.isinf()) and torch.equal(y[y.isinf()], ref[ref.isinf()])
    fin = ref.isfinite()
    torch.testing.assert_close(y[fin], ref[fin], atol=tol, rtol=tol)


@pytest.mark.parametrize("plan", [SINGLE, SPLIT], ids=["single", "split"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("where,value,silu", [
    ("x", float("nan"), True), ("x", float("inf"), True), ("x", float("-inf"), False),
    ("x0", float("nan"), True),   # the group's first element: the statistics' shift
    ("x0", float("inf"), False),
    ("w", float("nan"), True), ("b", float("inf"), True), ("b", float("-inf"), True),
    ("b", float("-inf"), False), ("cb", float("nan"), True), ("cb", float("-inf"), False),
])
def test_nonfinite_propagates_like_eager(where, value, silu, dtype, cl, plan):
    x, w, b, cb = _inputs((2, 12, 7, 9), dtype, cl, seed=7)
    if where == "x":
        x[1, 7, 3, 4] = value      # group 1 of sample 1
    elif where == "x0":
        x[0, 6, 0, 0] = value      # first element of group 1 of sample 0
    elif where == "w":
        w[5] = value
    elif where == "b":
        b[5] = value
    else:
        cb[1, 2] = value
    y = _kernel()(x, 2, w, b, 1e-5, silu, cb, _plan_kw=plan)
    ref = _eager(x, 2, w, b, 1e-5, silu, cb)
    assert not ref.isfinite().all()
    assert_same_nonfinite(y, ref, TOL[dtype])
