"""diffusion_step: every backend against the fp32 reference, the thresholding helper, op
contract (opcheck, torch.compile), bad inputs."""
import pytest
import torch

import diffkernels as dk
from diffkernels import reference
from diffkernels.ops.diffusion_step import dynamic_threshold
from diffkernels.reference import VARIANCE_LEARNED, VARIANCE_LEARNED_RANGE, VARIANCE_SCALAR

from conftest import DTYPES, assert_close, device_backend_params

PAIRS = device_backend_params()
MODES = {"scalar": VARIANCE_SCALAR, "learned": VARIANCE_LEARNED,
         "learned_range": VARIANCE_LEARNED_RANGE}
COEFFS = {  # k0..k10 as the schedulers produce them
    "ddpm": [1.41, -0.99, 0.0, 0.0, 0.0, 0.021, 0.978, 0.0, 0.145, -4.1, 0.37],
    "ddim-eps-highT": [158.1, -158.0, 0.0, 1.0, 0.0, 0.0156, 0.0, 0.9998, 0.0, 0.0, 0.0],
    "ddim-clipped": [0.0, 1.0, 1.02, 0.0, -0.2, 0.98, 0.0, 0.19, 0.07, 0.0, 0.0],
    "generic": [0.7, -1.3, 0.4, -0.6, 0.9, 1.1, -0.5, 0.8, 0.3, -1.0, 0.5],
}


def make_inputs(shape, dtype, device, *, mode="scalar", cfg=False, noise=True, threshold=False,
                seed=0):
    g = torch.Generator().manual_seed(seed)
    b, c, *spatial = shape
    mo = torch.randn(2 * b if cfg else b, c, *spatial, generator=g)
    if mode != "scalar":
        v = torch.rand(mo.shape, generator=g)
        v = 1e-3 + 0.05 * v if mode == "learned" else 2 * v - 1  # a variance / a [-1, 1] frac
        mo = torch.cat([mo, v], dim=1)
    x = torch.randn(shape, generator=g)
    n = torch.randn(shape, generator=g) if noise else None
    th = (1.0 + torch.rand(b, generator=g)) if threshold else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(mo), cast(x), cast(n), None if th is None else th.to(device)


def reference_of(mo, x, n, th, coeffs, mode, clip, g, cfg):
    f = lambda t: None if t is None else t.float()  # noqa: E731
    return reference.diffusion_step(f(mo), f(x), f(n), th, coeffs, mode, clip, g, cfg)


def check(backend, mo, x, n, th, coeffs, mode=VARIANCE_SCALAR, clip=0.0, g=1.0, cfg=False):
    with dk.backend(backend):
        prev, x0 = dk.diffusion_step(mo, x, coeffs, noise=n, threshold=th, variance_mode=mode,
                                     clip_range=clip, guidance_scale=g, cfg=cfg)
    ref_prev, ref_x0 = reference_of(mo, x, n, th, coeffs, mode, clip, g, cfg)
    # Tolerances relative to the magnitude (k0 ~ 158 gives x0 ~ 1e2 at large t).
    for out, ref in ((prev, ref_prev), (x0, ref_x0)):
        assert out.is_contiguous()
        assert_close(out, ref, x.dtype, scale=max(1.0, ref.abs().max().item()))
    # The same step with the coefficients in device memory (what a CUDA-graph replay runs):
    # the kernels read the same fp32 values, so the same bits.
    device_coeffs = torch.tensor(coeffs, dtype=torch.float64).float().to(x.device)
    with dk.backend(backend):
        got = dk.diffusion_step(mo, x, device_coeffs, noise=n, threshold=th, variance_mode=mode,
                                clip_range=clip, guidance_scale=g, cfg=cfg)
    for out, want in zip(got, (prev, x0)):
        torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True)
    return prev, x0


SHAPES = [(3, 4, 7, 9), (1, 3, 5), (2, 4, 8, 8), (2, 1, 1, 1), (1, 4, 2, 3, 5)]


@pytest.mark.parametrize("device,backend", PAIRS + [("cpu", "reference")])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("cfg", [False, True], ids=["single", "cfg"])
def test_against_reference(device, backend, dtype, shape, mode, cfg):
    mo, x, n, th = make_inputs(shape, dtype, device, mode=mode, cfg=cfg)
    coeffs = COEFFS["ddpm"] if mode != "scalar" else COEFFS["generic"]
    check(backend, mo, x, n, th, coeffs, MODES[mode], 0.0, 7.5 if cfg else 1.0, cfg)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("coeffs", list(COEFFS))
@pytest.mark.parametrize("clip,threshold", [(0.0, False), (1.0, False), (1.5, True), (0.0, True)],
                         ids=["plain", "clip", "clip+threshold", "threshold"])
@pytest.mark.parametrize("noise", [True, False], ids=["noise", "no-noise"])
def test_options(device, backend, dtype, coeffs, clip, threshold, noise):
    mo, x, n, th = make_inputs((3, 4, 7, 9), dtype, device, cfg=True, noise=noise,
                               threshold=threshold, seed=1)
    check(backend, mo, x, n, th, COEFFS[coeffs], VARIANCE_SCALAR, clip, 3.0, True)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("mode", ["learned", "learned_range"])
def test_learned_cfg_uses_cond_variance(device, backend, mode):
    mo, x, n, _ = make_inputs((2, 4, 5, 6), torch.float32, device, mode=mode, cfg=True, seed=2)
    prev, _ = check(backend, mo, x, n, None, COEFFS["ddpm"], MODES[mode], 1.0, 5.0, True)
    # The unconditional half's variance must not matter.
    mo2 = mo.clone()
    mo2[:2, 4:] = mo2[:2, 4:].flip(-1)
    with dk.backend(backend):
        prev2, _ = dk.diffusion_step(mo2, x, COEFFS["ddpm"], noise=n, variance_mode=MODES[mode],
                                     clip_range=1.0, guidance_scale=5.0, cfg=True)
    torch.testing.assert_close(prev2, prev)


@pytest.mark.parametrize("device,backend", PAIRS + [("cpu", "reference")])
def test_layouts_are_normalised(device, backend):
    mo, x, n, th = make_inputs((2, 4, 6, 10), torch.float32, device, cfg=True, threshold=True)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    mo_t = mo.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    n_s = torch.cat([n, n], dim=-1)[..., ::2]  # a strided view
    prev, x0 = check(backend, mo_t, x_cl, n_s, th, COEFFS["generic"], VARIANCE_SCALAR, 1.0, 2.0, True)
    with dk.backend(backend):
        want = dk.diffusion_step(mo, x, COEFFS["generic"], noise=n_s.contiguous(), threshold=th,
                                 clip_range=1.0, guidance_scale=2.0, cfg=True)
    torch.testing.assert_close(prev, want[0])
    torch.testing.assert_close(x0, want[1])


def test_float64_runs_on_the_reference():
    mo, x, n, _ = make_inputs((2, 3, 4, 4), torch.float64, "cpu")
    prev, x0 = dk.diffusion_step(mo, x, COEFFS["generic"], noise=n)
    assert prev.dtype == x0.dtype == torch.float64
    ref = reference.diffusion_step(mo, x, n, None, COEFFS["generic"], 0, 0.0, 1.0, False)
    torch.testing.assert_close(prev, ref[0])


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_empty(device):
    x = torch.empty(0, 4, 8, 8, device=device)
    prev, x0 = dk.diffusion_step(x, x, COEFFS["generic"], noise=x)
    assert prev.shape == x0.shape == (0, 4, 8, 8)
    x = torch.empty(2, 4, 0, device=device)
    prev, x0 = dk.diffusion_step(torch.empty(4, 8, 0, device=device), x, COEFFS["generic"],
                                 variance_mode=VARIANCE_LEARNED, cfg=True)
    assert prev.shape == (2, 4, 0)


# ---------------------------------------------------------------- dynamic thresholding helper

@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (3, 3, 5), (1, 1, 1)], ids=str)
@pytest.mark.parametrize("ratio", [0.995, 0.9, 0.5, 0.0, 1.0])
@pytest.mark.parametrize("cfg", [False, True])
def test_dynamic_threshold_is_diffusers_quantile(shape, ratio, cfg):
    mo, x, _, _ = make_inputs(shape, torch.float32, "cpu", cfg=cfg, seed=4)
    mo, x = mo * 3, x * 3  # |x0| mostly above 1 so the quantile decides
    k = COEFFS["generic"]
    s = dynamic_threshold(mo, x, k, ratio, 2.5, guidance_scale=4.0, cfg=cfg)
    b, c = x.shape[:2]
    m = mo[:b] + 4.0 * (mo[b:] - mo[:b]) if cfg else mo
    x0 = k[0] * x + k[1] * m
    want = torch.quantile(x0.abs().reshape(b, -1), ratio, dim=1).clamp(min=1, max=2.5)
    assert s.dtype == torch.float32 and s.shape == (b,)
    torch.testing.assert_close(s, want, atol=1e-6, rtol=1e-6)


def test_dynamic_threshold_half_and_nan():
    mo, x, _, _ = make_inputs((2, 4, 4, 4), torch.float16, "cpu", seed=5)
    s = dynamic_threshold(mo, x, COEFFS["generic"], 0.9, 5.0)
    x0 = 0.7 * x.float() - 1.3 * mo.float()
    want = torch.quantile(x0.abs().reshape(2, -1), 0.9, dim=1).clamp(1, 5)
    torch.testing.assert_close(s, want)
    x[1, 0, 0, 0] = float("nan")  # torch.quantile's NaN propagation
    s = dynamic_threshold(mo, x, COEFFS["generic"], 0.1, 5.0)
    assert not s[0].isnan() and s[1].isnan()


# ---------------------------------------------------------------- op contract

def _samples(device):
    out = []
    for i, (mode, cfg, noise, th, dtype) in enumerate([
            ("scalar", False, True, False, torch.float32),
            ("learned_range", True, True, True, torch.float32),
            ("learned", False, False, False, torch.float16),
            ("scalar", True, False, True, torch.bfloat16)]):
        mo, x, n, t = make_inputs((2, 4, 3, 5), dtype, device, mode=mode, cfg=cfg, noise=noise,
                                  threshold=th, seed=i)
        out.append((mo, x, n, t, COEFFS["ddpm"], MODES[mode], 1.0 if i % 2 else 0.0,
                    7.5 if cfg else 1.0, cfg))
    mo, x, n, t = make_inputs((2, 4, 3, 5), torch.float16, device, cfg=True, seed=9)
    out.append((mo, x, n, None, [], 0, 0.0, 7.5, True,  # coefficients in device memory
                torch.tensor(COEFFS["generic"], device=device)))
    return out


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_opcheck(device):
    for args in _samples(device):
        torch.library.opcheck(torch.ops.diffkernels.diffusion_step.default, args)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_compile_fullgraph(device):
    torch._dynamo.reset()
    k = COEFFS["ddpm"]

    def sampler_step(noise_pred, latents, noise, s):
        prev, x0 = dk.diffusion_step(noise_pred, latents, k, noise=noise, threshold=s,
                                     variance_mode=VARIANCE_LEARNED_RANGE, clip_range=1.0,
                                     guidance_scale=7.5, cfg=True)
        return prev * 0.5, x0

    mo, x, n, th = make_inputs((2, 4, 6, 6), torch.float32, device, mode="learned_range",
                               cfg=True, threshold=True)
    compiled = torch.compile(sampler_step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(mo, x, n, th), sampler_step(mo, x, n, th)):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------- bad inputs

def _call(mo=None, x=None, coeffs=None, **kw):
    x = torch.randn(2, 4, 8, 8) if x is None else x
    mo = torch.randn(2, 4, 8, 8) if mo is None else mo
    return dk.diffusion_step(mo, x, COEFFS["generic"] if coeffs is None else coeffs, **kw)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: _call(mo=torch.randn(2, 4, 8, 7)), ValueError,
     r"model_output: expected shape \[B, ...\] = \[2, 4, 8, 8\] for sample \[2, 4, 8, 8\], got \[2, 4, 8, 7\]"),
    (lambda: _call(mo=torch.randn(3, 4, 8, 8)), ValueError, r"model_output: expected shape \[B, ...\]"),
    (lambda: _call(mo=torch.randn(2, 4, 8, 8), cfg=True), ValueError,
     r"model_output: expected shape \[2B, ...\] \(both CFG halves, cfg=True\) = \[4, 4, 8, 8\]"),
    (lambda: _call(mo=torch.randn(2, 8, 8, 8)), ValueError,
     "model_output: has 2C = 8 channels .* but variance_mode is scalar"),
    (lambda: _call(variance_mode=VARIANCE_LEARNED), ValueError,
     r"model_output: expected 8 channels \(2C: mean and variance, variance_mode learned\)"),
    (lambda: _call(mo=torch.randn(2, 5, 8, 8)), ValueError, r"model_output: expected 4 channels \(C = 4\)"),
    (lambda: _call(mo=torch.randn(2, 4, 8)), ValueError, "model_output: expected shape"),
    (lambda: _call(x=torch.randn(4)), ValueError, r"sample: expected rank >= 2"),
    (lambda: _call(noise=torch.randn(2, 4, 8)), ValueError, r"noise: expected shape \[2, 4, 8, 8\]"),
    (lambda: _call(noise=torch.randn(2, 4, 8, 8).half()), TypeError, "noise: expected dtype torch.float32"),
    (lambda: _call(noise=torch.randn(2, 4, 8, 8, device="meta")), RuntimeError,
     "noise: expected a tensor on cpu"),
    (lambda: _call(threshold=torch.ones(4)), ValueError, r"threshold: expected shape \[B\] = \[2\]"),
    (lambda: _call(threshold=torch.ones(2, dtype=torch.float16)), TypeError,
     r"threshold: expected dtype in \(float32\)"),
    (lambda: _call(mo=torch.randn(2, 4, 8, 8).half()), TypeError,
     "model_output: expected dtype torch.float32 .the dtype of sample."),
    (lambda: _call(mo=torch.randn(2, 4, 8, 8, device="meta")), RuntimeError,
     "model_output: expected a tensor on cpu"),
    (lambda: _call(x=torch.randn(2, 4, 8, 8).int(), mo=torch.randn(2, 4, 8, 8).int()), TypeError,
     "sample: expected dtype"),
    (lambda: _call(coeffs=[1.0] * 10), ValueError, "coeffs: expected 11 floats k0..k10, got 10"),
    (lambda: _call(coeffs=torch.ones(11, dtype=torch.float64)), TypeError,
     r"device_coeffs: expected dtype in \(float32\)"),
    (lambda: _call(variance_mode=3), ValueError, "variance_mode: expected one of"),
    (lambda: _call(clip_range=-1.0), ValueError, "clip_range: expected >= 0"),
    (lambda: dk.diffusion_step([1.0], torch.randn(2, 4), [0.0] * 11), TypeError,
     "model_output: expected a torch.Tensor"),
    (lambda: dynamic_threshold(torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), [0.0] * 11, 1.5, 2.0),
     ValueError, "dynamic_thresholding_ratio: expected a quantile in"),
], ids=["spatial", "batch", "cfg-batch", "2C-scalar", "learned-C", "channels", "rank", "sample-rank",
        "noise-shape", "noise-dtype", "noise-device", "threshold-shape", "threshold-dtype",
        "dtype-mismatch", "device-mismatch", "int-dtype", "coeffs-len", "coeffs-tensor",
        "variance-mode", "clip-range", "not-tensor", "ratio"])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch_cuda():
    x = torch.randn(2, 4, 8, 8, device="cuda")
    with pytest.raises(RuntimeError, match="noise: expected a tensor on cuda"):
        dk.diffusion_step(x, x, COEFFS["generic"], noise=torch.randn(2, 4, 8, 8))
