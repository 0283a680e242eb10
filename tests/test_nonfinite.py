"""NaN and inf propagate through the kernels exactly as through the eager PyTorch computation
(DESIGN.md 7): F.scaled_dot_product_attention for attention (with attn_mask=mask[:, None, None,
:]), F.group_norm + F.silu for group_norm_silu, reference.diffusion_step's math for the step.
Only an attention row whose keys are all masked gives zeros.

Runs on every backend of every device here (reference, cpu; cuda and triton on a GPU); the
Triton kernels under the interpreter are checked in tests/interpret."""

import pytest
import torch
import torch.nn.functional as F

import diffkernels as dk
from diffkernels import _backend, reference

from conftest import DEVICES, DTYPES, TOL

NAN, INF = float("nan"), float("inf")
BACKENDS = [(d, b) for d in DEVICES for b in ["reference", *_backend.kernel_backends(d)]]
pytestmark = pytest.mark.parametrize("device,backend", BACKENDS,
                                     ids=[f"{d}-{b}" for d, b in BACKENDS])


def assert_same_nonfinite(out, expected, dtype, what):
    """NaN where expected has NaN, inf of the same sign where it has inf, finite values close."""
    out, expected = out.float().cpu(), expected.float().cpu()
    assert out.shape == expected.shape, what
    nan_o, nan_e = torch.isnan(out), torch.isnan(expected)
    assert torch.equal(nan_o, nan_e), (
        f"{what}: NaN at {int(nan_o.sum())} positions, expected {int(nan_e.sum())} "
        f"(first differing index {(nan_o != nan_e).nonzero()[0].tolist()})")
    inf_o, inf_e = torch.isinf(out), torch.isinf(expected)
    assert torch.equal(inf_o, inf_e), f"{what}: inf at {int(inf_o.sum())} positions, expected {int(inf_e.sum())}"
    assert torch.equal(out[inf_o], expected[inf_e]), f"{what}: inf of the wrong sign"
    fin = torch.isfinite(expected)
    tol = TOL[dtype]
    torch.testing.assert_close(out[fin], expected[fin], atol=tol * 4, rtol=tol * 4, msg=what)


def _poison(t, index, value):
    t = t.clone()
    t[index] = value
    return t


def _attention(backend, q, k, v, mask):
    with dk.backend(backend):
        return dk.attention(q, k, v, key_padding_mask=mask)


def check_attention_nonfinite(backend, device, dtype, where, value, masked, d=40):
    """One non-finite value in q, k or v against SDPA on the same inputs (upcast to fp32)."""
    g = torch.Generator().manual_seed(3)
    b, h, lq, lk = 2, 2, 5, 77
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(device, dtype) for n in (lq, lk, lk))
    mask = None
    if masked:
        mask = torch.rand(b, lk, generator=g) > 0.3
        mask[0, 0] = True
        mask[0, 9] = False       # the poisoned key of batch 0 is a masked one
        mask[1] = False          # batch 1 attends to nothing: zeros, whatever the inputs
        mask = mask.to(device)
    index = {"q": (0, 1, 2, 7), "k": (0, 1, 9, 7), "v": (0, 1, 9, 7)}[where]
    q, k, v = (_poison(t, index, value) if name == where else t
               for name, t in (("q", q), ("k", k), ("v", v)))
    out = _attention(backend, q, k, v, mask)
    am = None if mask is None else mask[:, None, None, :]
    expected = F.scaled_dot_product_attention(q.float().cpu(), k.float().cpu(), v.float().cpu(),
                                              attn_mask=None if am is None else am.cpu())
    if masked:
        expected[1] = 0.0  # our contract for rows with no key to attend
        assert (out[1] == 0).all(), "a fully masked row must give zeros"
    assert_same_nonfinite(out, expected, dtype, f"attention {where}={value} masked={masked}")
    return out


def check_group_norm_silu_nonfinite(backend, device, dtype, where, value, channels_last=False):
    g = torch.Generator().manual_seed(4)
    n, c, hw, groups = 2, 64, 6, 8
    x = torch.randn(n, c, hw, hw, generator=g).to(device, dtype)
    w = torch.randn(c, generator=g).to(device, dtype)
    bias = torch.randn(c, generator=g).to(device, dtype)
    cb = torch.randn(n, c, generator=g).to(device, dtype)
    index = {"x": (0, 11, 2, 3), "weight": (13,), "bias": (13,), "channel_bias": (1, 13)}[where]
    args = {"x": x, "weight": w, "bias": bias, "channel_bias": cb}
    args[where] = _poison(args[where], index, value)
    x, w, bias, cb = args["x"], args["weight"], args["bias"], args["channel_bias"]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with dk.backend(backend):
        out = dk.group_norm_silu(x, groups, w, bias, 1e-5, channel_bias=cb)
    xf = x.float().cpu() + cb.float().cpu()[:, :, None, None]
    expected = F.silu(F.group_norm(xf, groups, w.float().cpu(), bias.float().cpu(), 1e-5))
    assert_same_nonfinite(out, expected, dtype, f"group_norm_silu {where}={value}")


def check_diffusion_step_nonfinite(backend, device, dtype, where, value, clip=True):
    g = torch.Generator().manual_seed(5)
    shape = (2, 4, 5, 7)
    x = torch.randn(*shape, generator=g).to(device, dtype)
    mo = torch.randn(2 * shape[0], *shape[1:], generator=g).to(device, dtype)  # cfg halves
    noise = torch.randn(*shape, generator=g).to(device, dtype)
    index = (1, 2, 3, 4)
    if where == "sample":
        x = _poison(x, index, value)
    elif where == "model_output":
        mo = _poison(mo, index, value)
    else:
        noise = _poison(noise, index, value)
    coeffs = [1.2, -0.4, 0.3, 0.5, -0.2, 0.7, 0.1, 0.05, 0.3, 0.0, 0.0]
    kw = dict(noise=noise, threshold=None, variance_mode=0, clip_range=1.0 if clip else 0.0,
              guidance_scale=7.5, cfg=True)
    with dk.backend(backend):
        prev, x0 = dk.diffusion_step(mo, x, coeffs, **kw)
    ep, ex0 = reference.diffusion_step(mo.float(), x.float(), noise.float(), None, coeffs, 0,
                                       kw["clip_range"], 7.5, True)
    assert_same_nonfinite(prev, ep, dtype, f"diffusion_step prev {where}={value}")
    assert_same_nonfinite(x0, ex0, dtype, f"diffusion_step x0 {where}={value}")


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_nonfinite(device, backend, dtype, where, value, masked):
    check_attention_nonfinite(backend, device, dtype, where, value, masked)


def test_attention_nan_in_q_cross_attention_is_not_zero(device, backend):
    """The case of the issue: q [2,2,5,40], k/v [2,2,77,40], one NaN in q."""
    out = check_attention_nonfinite(backend, device, torch.float32, "q", NAN, False).cpu()
    assert torch.isnan(out[0, 1, 2]).all() and torch.isfinite(out[1]).all()


@pytest.mark.parametrize("d", [160, 512])
def test_attention_nonfinite_wide_heads(device, backend, d):
    for where in "qkv":
        check_attention_nonfinite(backend, device, torch.float32, where, NAN, True, d=d)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
@pytest.mark.parametrize("where", ["x", "weight", "bias", "channel_bias"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_silu_nonfinite(device, backend, dtype, where, value, channels_last):
    check_group_norm_silu_nonfinite(backend, device, dtype, where, value, channels_last)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
@pytest.mark.parametrize("where", ["sample", "model_output", "noise"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_diffusion_step_nonfinite(device, backend, dtype, where, value, clip):
    check_diffusion_step_nonfinite(backend, device, dtype, where, value, clip)
