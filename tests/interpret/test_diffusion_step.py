"""The Triton diffusion_step kernel under TRITON_INTERPRET=1 on CPU tensors, against
diffkernels.reference.diffusion_step computed in fp32 from the same inputs.

Run in its own process: `TRITON_INTERPRET=1 pytest tests/interpret` (the variable must be set
before the kernels are defined). Every constexpr variant (cfg x noise/variance mode x
clip/threshold) in fp32/fp16/bf16 on a small shape, then odd shapes and edge cases.
"""
import itertools
import math
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1",
                                reason="needs TRITON_INTERPRET=1 (own pytest process)")
pytest.importorskip("triton")

from diffkernels import reference  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # DESIGN.md 6
DTYPES = list(TOL)
NOISE_MODES = [None, 0, 1, 2]  # None: no noise; else the variance mode with noise
X0_MODES = {"none": (0.0, False), "clip": (1.2, False), "threshold": (0.0, True),
            "clip+threshold": (1.2, True)}


def _kernel():
    from diffkernels.triton.diffusion_step import diffusion_step
    return diffusion_step


def _inputs(shape, dtype, cfg, noise_mode, threshold, two_c=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, c = shape[:2]
    two_c = noise_mode in (1, 2) if two_c is None else two_c
    x = (torch.randn(shape, generator=g) * 2).to(dtype)
    mo = torch.randn((2 * b if cfg else b, 2 * c if two_c else c) + tuple(shape[2:]), generator=g)
    if two_c:
        mo[:, c:] = mo[:, c:].abs() * 0.1  # a variance (learned) / a log-variance interpolant
    mo = mo.to(dtype)
    noise = None if noise_mode is None else torch.randn(shape, generator=g).to(dtype)
    thr = 1 + torch.rand(b, generator=g) if threshold else None
    coeffs = (torch.rand(11, generator=g) * 2 - 1).tolist()
    return mo, x, noise, thr, coeffs


def _check(mo, x, noise, thr, coeffs, mode, clip, guidance, cfg):
    prev, x0 = _kernel()(mo, x, noise, thr, coeffs, mode, clip, guidance, cfg)
    ref = reference.diffusion_step(mo.float(), x.float(), None if noise is None else noise.float(),
                                   thr, coeffs, mode, clip, guidance, cfg)
    for name, out, r in (("prev_sample", prev, ref[0]), ("pred_original_sample", x0, ref[1])):
        assert out.dtype == x.dtype and out.shape == x.shape and out.is_contiguous(), name
        tol = TOL[x.dtype]
        torch.testing.assert_close(out.float(), r, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")
    # K_PTR: the coefficients read from a device tensor (CUDA-graph replay) give the same bits.
    k = torch.tensor(coeffs, dtype=torch.float64).float()
    for out, again in zip((prev, x0), _kernel()(mo, x, noise, thr, k, mode, clip, guidance, cfg)):
        torch.testing.assert_close(again, out, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", [False, True], ids=["nocfg", "cfg"])
@pytest.mark.parametrize("noise_mode", NOISE_MODES, ids=["nonoise", "var0", "var1", "var2"])
@pytest.mark.parametrize("x0_mode", list(X0_MODES))
def test_every_variant(dtype, cfg, noise_mode, x0_mode):
    clip, threshold = X0_MODES[x0_mode]
    mo, x, noise, thr, coeffs = _inputs((2, 3, 5, 7), dtype, cfg, noise_mode, threshold)
    _check(mo, x, noise, thr, coeffs, noise_mode or 0, clip, 7.5, cfg)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 4, 7, 9), (1, 3, 5), (2, 1), (2, 3, 25, 29), (1, 4, 32, 32)],
                         ids=lambda s: "x".join(map(str, s)))
def test_odd_sizes(dtype, shape):
    """Rows that are not multiples of 16 or of BLOCK, rank 2..4, several programs per row."""
    mo, x, noise, thr, coeffs = _inputs(shape, dtype, True, 2, True, seed=1)
    _check(mo, x, noise, thr, coeffs, 2, 1.5, 4.0, True)


def test_two_c_output_with_scalar_variance():
    """A learned-variance model output (2C channels) stepped with a scalar std (e.g. DDIM):
    the variance channels are skipped."""
    mo, x, noise, thr, coeffs = _inputs((2, 3, 4, 4), torch.float32, True, 0, False, two_c=True)
    _check(mo, x, noise, thr, coeffs, 0, 0.0, 3.0, True)


def test_non_contiguous_inputs():
    mo, x, noise, thr, coeffs = _inputs((2, 3, 6, 5), torch.float32, False, 1, False)
    _check(mo.transpose(2, 3).contiguous().transpose(2, 3), x.transpose(2, 3).contiguous()
           .transpose(2, 3), noise, thr, coeffs, 1, 0.0, 1.0, False)
    # the real thing: strided views
    xs = torch.randn(2, 3, 5, 6).transpose(2, 3)
    ms = torch.randn(2, 3, 5, 6).transpose(2, 3)
    _check(ms, xs, None, None, coeffs, 0, 1.0, 1.0, False)


def test_nan_survives_clip_and_threshold():
    x = torch.tensor([[[math.nan, 0.5, 5.0, -5.0]]])
    mo = torch.zeros(1, 1, 4)
    k = [1.0] + [0.0] * 4 + [1.0] + [0.0] * 5  # x0 = x, prev = x0
    for clip, thr in ((2.0, None), (0.0, torch.tensor([3.0])), (2.0, torch.tensor([3.0]))):
        prev, x0 = _kernel()(mo, x, None, thr, k, 0, clip, 1.0, False)
        ref = reference.diffusion_step(mo, x, None, thr, k, 0, clip, 1.0, False)
        torch.testing.assert_close(x0, ref[1], equal_nan=True)
        torch.testing.assert_close(prev, ref[0], equal_nan=True)


def test_empty():
    x = torch.empty(0, 4, 3, 3)
    prev, x0 = _kernel()(x, x, None, None, [0.0] * 11, 0, 0.0, 1.0, False)
    assert prev.shape == x.shape and x0.shape == x.shape


def test_compile_specs_cover_the_launcher():
    """Every constexpr set the launcher picks is in compile_specs() (which the sm_80/sm_90
    compile test builds)."""
    from diffkernels.triton import diffusion_step as ds

    specs = ds.compile_specs()
    assert 0 < len(specs) <= 100
    assert len({s["name"] for s in specs}) == len(specs)
    meta_keys = ("CFG", "NOISE", "VARIANCE_MODE", "CLIP", "THRESHOLD", "BLOCK")
    have = {(s["signature"]["x_ptr"], tuple(s["constexprs"][k] for k in meta_keys))
            for s in specs}
    for dtype, cfg, noise_mode, (clip, threshold) in itertools.product(
            DTYPES, (False, True), NOISE_MODES, X0_MODES.values()):
        mo, x, noise, thr, coeffs = _inputs((2, 4, 8, 8), dtype, cfg, noise_mode, threshold)
        _, args, meta = ds._launch(mo, x, noise, thr, coeffs, noise_mode or 0, clip, 7.5, cfg, x, x)
        key = (ds._specialize(x)[0], tuple(meta[k] for k in meta_keys))
        assert key in have, key


# ----------------------------------------------------------------------------- NaN / inf
# DESIGN.md 7: NaN and inf propagate as the eager fp32 math (reference.diffusion_step) does:
# torch.clamp keeps NaN (a clip must not turn it into a bound), inf is clipped to the bound.

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("x0_mode", ["none", "clip", "threshold", "clip+threshold"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=str)
@pytest.mark.parametrize("where", ["sample", "uncond", "cond", "noise", "variance", "threshold"])
def test_nonfinite_propagates_like_eager(where, value, x0_mode, dtype):
    clip, use_thr = X0_MODES[x0_mode]
    if where == "threshold" and not use_thr:
        pytest.skip("no threshold in this mode")
    cfg, mode = True, 2 if where == "variance" else 0
    mo, x, noise, thr, coeffs = _inputs((2, 3, 5, 7), dtype, cfg, mode, use_thr, seed=11)
    c = x.shape[1]
    if where == "sample":
        x[1, 2, 3, 4] = value
    elif where == "uncond":
        mo[1, 2, 3, 4] = value
    elif where == "cond":
        mo[3, 1, 0, 0] = value
    elif where == "noise":
        noise[0, 0, 4, 6] = value
    elif where == "variance":
        mo[2, c + 1, 2, 2] = value  # cond half's variance channels
    else:
        thr[1] = value
    prev, x0 = _kernel()(mo, x, noise, thr, coeffs, mode, clip, 7.5, cfg)
    ref = reference.diffusion_step(mo.float(), x.float(), noise.float(), thr, coeffs, mode, clip,
                                   7.5, cfg)
    # exp(k9 + k10 * inf) may be 0, and x0 / (threshold = inf) is 0: finite answers there
    if where != "variance" and not (where == "threshold" and value == math.inf):
        assert not all(r.isfinite().all() for r in ref)
    for name, out, r in (("prev_sample", prev, ref[0]), ("pred_original_sample", x0, ref[1])):
        out = out.float()
        assert torch.equal(out.isnan(), r.isnan()), f"{name}: NaN pattern differs from eager"
        assert torch.equal(out.isinf(), r.isinf()) and torch.equal(out[out.isinf()],
                                                                   r[r.isinf()]), name
        fin = r.isfinite()
        tol = TOL[dtype]
        torch.testing.assert_close(out[fin], r[fin], atol=tol, rtol=tol)
