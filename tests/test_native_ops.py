"""The operators are C++ (csrc/<op>.cpp): one dispatcher op per public function, argument
checks in C++ with the same messages as the fake kernels, the backend route chosen in C++, and
the same op name in the profiler whichever backend runs."""
import threading

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import diffkernels as dk
from diffkernels import reference
from diffkernels.ops.diffusion_step import dynamic_threshold

COEFFS = [0.9, -0.3, 0.1, 0.2, -0.1, 0.5, 0.4, 0.05, 0.02, 0.0, 0.0]


def _gn_args():
    return (torch.randn(2, 64, 4, 4), 8, torch.randn(64), torch.randn(64), 1e-5, True,
            torch.randn(2, 64))


def _attn_args():
    return (torch.randn(1, 2, 9, 40), torch.randn(1, 2, 13, 40), torch.randn(1, 2, 13, 40), None,
            torch.rand(1, 13) > 0.3)


def _step_args():
    return (torch.randn(4, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), None,
            COEFFS, 0, 0.0, 7.5, True)


def _step_args_device_coeffs():  # the coefficients in a tensor (a CUDA-graph replay's step)
    return _step_args()[:4] + ([],) + _step_args()[5:] + (torch.ones(11),)


OPS = {
    "group_norm_silu": (torch.ops.diffkernels.group_norm_silu.default, _gn_args),
    "attention": (torch.ops.diffkernels.attention.default, _attn_args),
    "diffusion_step": (torch.ops.diffkernels.diffusion_step.default, _step_args),
}
CALLS = {**OPS, "diffusion_step_device_coeffs": (torch.ops.diffkernels.diffusion_step.default,
                                                 _step_args_device_coeffs)}

# (op, argument index, replacement): each breaks one check of csrc/<op>.cpp.
BAD = [
    ("group_norm_silu", 0, torch.randn(2, 64)),
    ("group_norm_silu", 0, torch.randn(2, 64, 4, 4).int()),
    ("group_norm_silu", 1, 30),
    ("group_norm_silu", 1, 0),
    ("group_norm_silu", 2, torch.randn(63)),
    ("group_norm_silu", 3, torch.ones(64, dtype=torch.int64)),
    ("group_norm_silu", 4, -1.0),
    ("group_norm_silu", 6, torch.randn(64)),
    ("attention", 0, torch.randn(2, 9, 40)),
    ("attention", 0, torch.randn(1, 3, 9, 40)),
    ("attention", 1, torch.randn(2, 2, 13, 40)),
    ("attention", 1, torch.randn(1, 2, 13, 48)),
    ("attention", 2, torch.randn(1, 2, 12, 40)),
    ("attention", 2, torch.randn(1, 2, 13, 40).half()),
    ("attention", 0, torch.randn(1, 2, 9, 36)),
    ("attention", 0, torch.randn(1, 2, 9, 520)),
    ("attention", 0, torch.randn(1, 2, 40, 9).transpose(-1, -2)),
    ("attention", 4, torch.ones(1, 12, dtype=torch.bool)),
    ("attention", 4, torch.ones(1, 13)),
    ("diffusion_step", 0, torch.randn(2, 4, 8, 8)),
    ("diffusion_step", 0, torch.randn(4, 8, 8, 8)),
    ("diffusion_step", 0, torch.randn(4, 5, 8, 8)),
    ("diffusion_step", 0, torch.randn(4, 4, 8, 8).half()),
    ("diffusion_step", 1, torch.randn(4)),
    ("diffusion_step", 2, torch.randn(2, 4, 8)),
    ("diffusion_step", 2, torch.randn(2, 4, 8, 8).half()),
    ("diffusion_step", 3, torch.ones(3)),
    ("diffusion_step", 3, torch.ones(2, dtype=torch.float16)),
    ("diffusion_step", 4, [1.0] * 10),
    ("diffusion_step", 5, 3),
    ("diffusion_step", 5, 1),
    ("diffusion_step", 6, -1.0),
    ("diffusion_step_device_coeffs", 4, [1.0] * 11),
    ("diffusion_step_device_coeffs", 9, torch.ones(10)),
    ("diffusion_step_device_coeffs", 9, torch.ones(11, dtype=torch.float64)),
]


def _error(fn):
    try:
        fn()
    except (TypeError, ValueError, RuntimeError) as e:
        return type(e), str(e).split("\n")[0]
    return None


@pytest.mark.parametrize("op_name,index,bad", BAD, ids=[f"{o}-{i}-{n}" for n, (o, i, _) in enumerate(BAD)])
def test_cpp_checks_and_fake_kernel_raise_the_same_error(op_name, index, bad):
    op, make = CALLS[op_name]
    args = list(make())
    args[index] = bad
    real = _error(lambda: op(*args))
    assert real is not None, "the C++ op accepted a bad argument"
    assert real[0] in (TypeError, ValueError), real
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = _error(lambda: op(*fake_args))
    assert fake == real


def _profiled_names(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.key for e in prof.key_averages()]


@pytest.mark.parametrize("backend", ["auto", "cpu", "reference"])
@pytest.mark.parametrize("op_name", sorted(OPS))
def test_profiler_shows_the_registered_op_on_every_backend(op_name, backend):
    op, make = OPS[op_name]
    args = make()
    with dk.backend(backend):
        names = _profiled_names(lambda: op(*args))
    assert f"diffkernels::{op_name}" in names, names
    python_impl = f"diffkernels::_{op_name}_backend"
    assert (python_impl in names) == (backend == "reference"), names


def test_float64_runs_on_the_reference():
    x = torch.randn(2, 16, 3, 3, dtype=torch.float64)
    names = _profiled_names(lambda: dk.group_norm_silu(x, 4))
    assert "diffkernels::_group_norm_silu_backend" in names
    torch.testing.assert_close(dk.group_norm_silu(x, 4), reference.group_norm_silu(x, 4, eps=1e-5))


def test_backend_choice_is_per_thread():
    seen = {}

    def worker():
        seen["thread"] = _profiled_names(lambda: dk.group_norm_silu(*_gn_args()[:2]))

    with dk.backend("reference"):
        t = threading.Thread(target=worker)
        t.start()
        t.join()
        mine = _profiled_names(lambda: dk.group_norm_silu(*_gn_args()[:2]))
    assert "diffkernels::_group_norm_silu_backend" in mine
    assert "diffkernels::_group_norm_silu_backend" not in seen["thread"]  # its own "auto"


@pytest.mark.parametrize("op_name", sorted(OPS))
def test_backward_raises_naming_the_op(op_name):
    op, make = OPS[op_name]
    args = [a.requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in make()]
    out = op(*args)
    out = out if isinstance(out, torch.Tensor) else out[0]
    assert out.requires_grad
    with pytest.raises(RuntimeError, match=f"diffkernels::{op_name}: backward is not implemented"):
        out.sum().backward()
    with torch.no_grad():
        out = op(*args)
    assert not (out if isinstance(out, torch.Tensor) else out[0]).requires_grad


def test_public_functions_keep_named_errors_for_non_tensors():
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        dk.group_norm_silu("x", 4)
    with pytest.raises(ValueError, match="num_groups: expected a positive int"):
        dk.group_norm_silu(torch.randn(2, 8, 2, 2), 2.5)
    with pytest.raises(TypeError, match="k: expected a torch.Tensor"):
        dk.attention(torch.randn(1, 1, 2, 8), None, torch.randn(1, 1, 2, 8))
    with pytest.raises(TypeError, match="model_output: expected a torch.Tensor"):
        dk.diffusion_step(None, torch.randn(2, 4), torch.ones(11))  # device coefficients


def test_dynamic_threshold_is_an_operator_without_host_reads():
    mo, x = torch.randn(4, 4, 8, 8), torch.randn(2, 4, 8, 8)
    s = dynamic_threshold(mo, x, COEFFS, 0.995, 1.5, guidance_scale=3.0, cfg=True)
    m = mo[:2] + 3.0 * (mo[2:] - mo[:2])
    x0 = COEFFS[0] * x + COEFFS[1] * m
    want = torch.quantile(x0.abs().reshape(2, -1), 0.995, dim=1).clamp(1.0, 1.5)
    torch.testing.assert_close(s, want)
    assert "diffkernels::dynamic_threshold" in _profiled_names(
        lambda: dynamic_threshold(mo, x, COEFFS, 0.995, 1.5, guidance_scale=3.0, cfg=True))


def test_python_checks_mirror_the_schema_defaults():
    # The public functions pass every argument; the schema's defaults serve libtorch and
    # torch.ops callers and must mean the same.
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(torch.ops.diffkernels.group_norm_silu(x, 2), dk.group_norm_silu(x, 2))
    q = torch.randn(1, 2, 5, 16)
    torch.testing.assert_close(torch.ops.diffkernels.attention(q, q, q), dk.attention(q, q, q))
