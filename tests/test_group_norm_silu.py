"""group_norm_silu: every backend against the fp32 reference, op contract, bad inputs."""
import pytest
import torch
import torch.nn.functional as F

import diffkernels as dk
from diffkernels import reference
from diffkernels.reference import memory_format_of

from conftest import DTYPES, TOL, assert_close, device_backend_params

PAIRS = device_backend_params()


def make(shape, dtype, device, fmt=torch.contiguous_format, offset=0.0, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale + offset
    return x.to(device=device, dtype=dtype).contiguous(memory_format=fmt)


def params(c, n, dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(c, generator=g) + 0.5).to(device, dtype)
    b = torch.randn(c, generator=g).to(device, dtype)
    cb = torch.randn(n, c, generator=g).to(device, dtype)
    return w, b, cb


def run(backend, *args, **kwargs):
    with dk.backend(backend):
        return dk.group_norm_silu(*args, **kwargs)


def check(backend, x, groups, w=None, b=None, cb=None, silu=True, eps=1e-5, scale=1.0):
    out = run(backend, x, groups, w, b, eps, silu=silu, channel_bias=cb)
    ref = reference.group_norm_silu(x.float(), groups, None if w is None else w.float(),
                                    None if b is None else b.float(), eps, silu,
                                    None if cb is None else cb.float())
    assert_close(out, ref, x.dtype, scale)
    assert out.is_contiguous(memory_format=memory_format_of(x))  # x's layout is kept
    return out


SD_CHANNELS = [320, 640, 960, 1280, 128, 512]
SPATIAL = [(7, 9), (1, 1), (64, 64)]


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", SD_CHANNELS)
@pytest.mark.parametrize("hw", SPATIAL, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_sd_shapes(device, backend, dtype, c, hw, channels_last):
    n = 1 + (c + hw[0]) % 3  # N = 1, 2, 3 across the grid
    if hw == (64, 64) and c >= 960:
        n = 1  # keeps the fp32 reference cheap on 2 cores
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = make((n, c, *hw), dtype, device, fmt)
    w, b, cb = params(c, n, dtype, device)
    check(backend, x, 32, w, b, cb)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("with_cb", [False, True])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_options(device, backend, dtype, affine, with_cb, silu, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = make((2, 64, 13, 11), dtype, device, fmt)
    w, b, cb = params(64, 2, dtype, device)
    check(backend, x, 8, w if affine else None, b if affine else None, cb if with_cb else None, silu)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_weight_only_and_bias_only(device, backend):
    x = make((2, 32, 5, 6), torch.float32, device)
    w, b, _ = params(32, 2, torch.float32, device)
    check(backend, x, 4, w=w)
    check(backend, x, 4, b=b)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 32, 17), (1, 64, 3, 4, 5), (3, 96, 1), (2, 40, 1000)],
                         ids=str)
def test_other_ranks(device, backend, dtype, shape):
    x = make(shape, dtype, device)
    w, b, cb = params(shape[1], shape[0], dtype, device)
    check(backend, x, 8, w, b, cb)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_channels_last_3d(device, backend):
    x = make((2, 64, 3, 4, 5), torch.float32, device).contiguous(memory_format=torch.channels_last_3d)
    out = check(backend, x, 16, *params(64, 2, torch.float32, device))
    assert out.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_large_offset_fp32(device, backend, channels_last):
    # x = 1e4 + noise: E[x^2] - E[x]^2 in fp32 would lose every digit of the variance.
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = make((2, 320, 24, 24), torch.float32, device, fmt, offset=1e4)
    w, b, cb = params(320, 2, torch.float32, device)
    out = check(backend, x, 32, w, b, cb)
    assert out.float().std() > 0.1  # normalised, not collapsed


@pytest.mark.parametrize("device,backend", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_large_magnitude_half(device, backend, dtype, channels_last):
    # |x| up to ~6e4: x^2 overflows fp16; statistics must be fp32 (and stable).
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = make((1, 128, 16, 16), dtype, device, fmt, scale=2e4).clamp(-6e4, 6e4)
    check(backend, x, 32, *params(128, 1, dtype, device))
    y = make((1, 128, 16, 16), dtype, device, fmt, offset=1000.0, scale=1.0)
    check(backend, y, 32, *params(128, 1, dtype, device))


@pytest.mark.parametrize("device,backend", PAIRS)
def test_fp32_params_with_half_input(device, backend):
    x = make((2, 64, 9, 9), torch.float16, device)
    w, b, cb = params(64, 2, torch.float32, device)
    out = run(backend, x, 32, w, b, channel_bias=cb)
    ref = reference.group_norm_silu(x.float(), 32, w, b, 1e-5, True, cb)
    assert_close(out, ref, torch.float16)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_matches_torch_group_norm(device, backend):
    x = make((2, 320, 16, 16), torch.float32, device)
    w, b, cb = params(320, 2, torch.float32, device)
    expected = F.silu(F.group_norm(x + cb[:, :, None, None], 32, w, b, 1e-6))
    torch.testing.assert_close(run(backend, x, 32, w, b, 1e-6, channel_bias=cb), expected,
                               atol=TOL[torch.float32], rtol=TOL[torch.float32])


@pytest.mark.parametrize("device,backend", PAIRS)
def test_non_dense_input_is_handled(device, backend):
    base = make((2, 64, 10, 20), torch.float32, device)
    x = base[:, :, :, ::2]  # neither contiguous nor channels_last
    out = check(backend, x, 8)
    assert out.is_contiguous()


def test_float64_falls_back_to_reference():
    x = make((2, 32, 4, 4), torch.float64, "cpu")
    out = dk.group_norm_silu(x, 4)
    torch.testing.assert_close(out, reference.group_norm_silu(x, 4), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_empty(device):
    x = torch.empty(0, 64, 4, 4, device=device)
    assert dk.group_norm_silu(x, 32).shape == (0, 64, 4, 4)
    x = torch.empty(2, 64, 0, 4, device=device)
    assert dk.group_norm_silu(x, 32).shape == (2, 64, 0, 4)


@pytest.mark.parametrize("call,exc,match", [
    (lambda x: dk.group_norm_silu(x[0, 0], 32), ValueError, "x: expected rank >= 3"),
    (lambda x: dk.group_norm_silu(x, 30), ValueError, "num_groups: C=64 is not divisible"),
    (lambda x: dk.group_norm_silu(x, 0), ValueError, "num_groups"),
    (lambda x: dk.group_norm_silu(x, 32, torch.ones(63)), ValueError, r"weight: expected shape \[64\]"),
    (lambda x: dk.group_norm_silu(x, 32, None, torch.ones(2, 64)), ValueError, "bias: expected shape"),
    (lambda x: dk.group_norm_silu(x, 32, channel_bias=torch.ones(64)), ValueError,
     r"channel_bias: expected shape \[2, 64\]"),
    (lambda x: dk.group_norm_silu(x.to(torch.int32), 32), TypeError, "x: expected dtype"),
    (lambda x: dk.group_norm_silu(x, 32, torch.ones(64, dtype=torch.int64)), TypeError, "weight: expected dtype"),
    (lambda x: dk.group_norm_silu(x, 32, eps=-1.0), ValueError, "eps"),
    (lambda x: dk.group_norm_silu([1.0], 32), TypeError, "x: expected a torch.Tensor"),
], ids=["rank", "groups", "zero-groups", "weight-size", "bias-rank", "cb-shape", "int-x",
        "int-weight", "eps", "not-tensor"])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call(torch.randn(2, 64, 4, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch():
    x = torch.randn(2, 64, 4, 4, device="cuda")
    with pytest.raises(RuntimeError, match="weight: expected a tensor on cuda"):
        dk.group_norm_silu(x, 32, torch.ones(64))


def test_device_mismatch_meta():
    # A meta tensor stands in for "another device" on machines without a GPU.
    with pytest.raises(RuntimeError, match="channel_bias: expected a tensor on cpu"):
        dk.group_norm_silu(torch.randn(2, 64, 4, 4), 32, channel_bias=torch.ones(2, 64, device="meta"))


def _samples(device):
    x = make((2, 64, 5, 7), torch.float32, device)
    w, b, cb = params(64, 2, torch.float32, device)
    xh = make((1, 32, 8, 8), torch.float16, device, torch.channels_last)
    return [
        (x, 8, w, b, 1e-5, True, cb),
        (x, 32, None, None, 1e-6, False, None),
        (xh, 4, *params(32, 1, torch.float16, device)[:2], 1e-5, True, None),
    ]


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_opcheck(device):
    for args in _samples(device):
        torch.library.opcheck(torch.ops.diffkernels.group_norm_silu.default, args)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_compile_fullgraph(device):
    torch._dynamo.reset()

    def block(x, w, b, temb):
        h = dk.group_norm_silu(x, 8, w, b, channel_bias=temb)
        return h * 2 + 1

    x = make((2, 64, 6, 6), torch.float32, device)
    w, b, cb = params(64, 2, torch.float32, device)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w, b, cb), block(x, w, b, cb))


def test_backend_selection_api():
    assert "reference" in dk.available_backends()
    with pytest.raises(ValueError, match="backend: expected 'auto' or one of"):
        dk.set_backend("nope")
    before = dk.get_backend()
    with dk.backend("reference"):
        assert dk.get_backend() == "reference"
    assert dk.get_backend() == before
    if "cuda" not in dk.available_backends():
        with pytest.raises(RuntimeError, match="'cuda' is not available"):
            dk.set_backend("cuda")
