"""Shared test helpers: devices, backends, and the DESIGN.md 6 tolerances."""
import pytest
import torch

from diffkernels import _backend

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}


def device_backend_params():
    """(device, backend) pairs to parametrise equivalence tests over."""
    params = [(d, b) for d in DEVICES for b in _backend.kernel_backends(d)]
    return params or [pytest.param("cpu", "cpu", marks=pytest.mark.skip("C++ extension not built"))]


def assert_close(out, ref, dtype, scale=1.0):
    """out (in dtype) against ref (fp32 ground truth) at DESIGN.md 6 tolerances; `scale`
    widens both for quantities of large magnitude."""
    assert out.dtype == dtype, f"dtype {out.dtype} != {dtype}"
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), "non-finite values in the output"
    tol = TOL[dtype] * scale
    torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), atol=tol, rtol=tol)
