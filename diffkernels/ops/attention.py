"""attention: softmax(q k^T * scale + mask) v for diffusion self- and cross-attention."""
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from .._backend import Dispatch
from ._checks import check_device, check_dtype, check_tensor

MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

dispatch = Dispatch("attention", auto_order_cuda=("cuda", "triton"))


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None,
              key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """softmax(q @ k^T * scale, masked) @ v, flash-style (online softmax in fp32).

    q: [B, H, Lq, D], k/v: [B, H, Lk, D], any strides with unit last-dim stride (transposed
    [B, L, H, D] views are read in place). D a multiple of 8, at most 256. scale defaults to
    D**-0.5. key_padding_mask: bool [B, Lk], True = attend; a query with no key to attend
    gives zeros. The output has q's layout when q is dense (a BSHD view gives a BSHD view).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)  # before the dispatcher's own, less helpful, schema error
    return torch.ops.diffkernels.attention(q, k, v, scale, key_padding_mask)


def check_args(q, k, v, key_padding_mask):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name}: expected rank 4 [B, H, L, D], got shape {tuple(t.shape)}")
        check_dtype(name, t, _DTYPES)
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (the dtype of q), got {t.dtype}")
        check_device(name, t, q, "q")
        if t.numel() > 0 and t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name}: expected unit stride in the last (head) dim, got strides "
                             f"{tuple(t.stride())}")
    B, H, _, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"k, v: expected batch {B} (q's), got k {k.shape[0]} and v {v.shape[0]}")
    if k.shape[1] != H or v.shape[1] != H:
        raise ValueError(f"k, v: expected {H} heads (q's), got k {k.shape[1]} and v {v.shape[1]}")
    if k.shape[3] != D or v.shape[3] != D:
        raise ValueError(f"k, v: expected head dim {D} (q's), got k {k.shape[3]} and v {v.shape[3]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"v: expected length {k.shape[2]} (k's), got {v.shape[2]}")
    if D > MAX_HEAD_DIM or D % 8 != 0:
        raise ValueError(f"q: head dim D must be a multiple of 8 and at most {MAX_HEAD_DIM}, got {D}")
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask)
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask: expected dtype bool (True = attend), got "
                            f"{key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (B, k.shape[2]):
            raise ValueError(f"key_padding_mask: expected shape [B, Lk] = [{B}, {k.shape[2]}], got "
                             f"{list(key_padding_mask.shape)}")
        check_device("key_padding_mask", key_padding_mask, q, "q")


def _empty_out(q):
    # Same strides as q when q is dense (empty_like preserves them), else contiguous.
    return torch.empty_like(q)


@torch.library.custom_op("diffkernels::attention", mutates_args=())
def _attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float],
               key_padding_mask: Optional[Tensor]) -> Tensor:
    check_args(q, k, v, key_padding_mask)
    if q.numel() == 0:
        return _empty_out(q)
    if k.shape[2] == 0:  # nothing to attend to: zeros, like a fully masked row
        return _empty_out(q).zero_()
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.contiguous()
    return dispatch(q.device, q, k, v, scale, key_padding_mask)


@_attention.register_fake
def _(q, k, v, scale, key_padding_mask):
    check_args(q, k, v, key_padding_mask)
    return _empty_out(q)


def _backward(ctx, grad):
    raise RuntimeError("diffkernels::attention: backward is not implemented yet (forward only); "
                       "use F.scaled_dot_product_attention for training")


def _setup_context(ctx, inputs, output):
    pass


_attention.register_autograd(_backward, setup_context=_setup_context)

dispatch.register("reference")(reference.attention)


def _native_supports(q, k, v, scale, mask):
    if q.device.type == "cpu":
        return True
    # The CUDA kernel: fp16/bf16 tensor cores (mma.sync m16n8k16, cp.async): sm_80 and newer.
    return (q.dtype in (torch.float16, torch.bfloat16)
            and torch.cuda.get_device_capability(q.device)[0] >= 8)


@dispatch.register("cpu", supports=_native_supports)
@dispatch.register("cuda", supports=_native_supports)
def _native(q, k, v, scale, key_padding_mask):
    return torch.ops.diffkernels.attention_cxx(q, k, v, scale, key_padding_mask)


@dispatch.register("triton")
def _triton(q, k, v, scale, key_padding_mask):
    from ..triton.attention import attention as kernel
    return kernel(q, k, v, scale, key_padding_mask)
