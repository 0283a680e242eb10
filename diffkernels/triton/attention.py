"""Flash-attention forward in Triton for diffusion self- and cross-attention.

Two kernels, one launcher (`attention`, called by the op's "triton" backend):

* `_attn_fwd` (any Lk; all fp32 calls): one program per (query block, batch*head), looping
  over key blocks with the online softmax (fp32 running max and sum): first the whole key
  blocks (no bounds checks), then the remainder in blocks of 16 keys, so Lk = 1031 pays 9
  padded keys, not BLOCK_N - 7.
* `_attn_fwd_short` (fp16/bf16, Lk <= 80: the 77 CLIP tokens of cross-attention, the 8x8
  self-attention level): all of K/V fits in a 64-key piece plus a 16-key piece, loaded once
  per program; the program then streams several query blocks through them with a
  single-pass softmax (no running rescale). The query loop is the innermost loop, so the
  pipeliner prefetches the next Q tiles while the current one computes: Q and O move at
  memory speed, and 77 keys cost 80 exponentials per query row, not 128.

Head dims are not padded to a power of two: D is split into at most two power-of-two
chunks D0 + D1 (tl.arange needs powers of two, tl.dot widths >= 16); the scores are
dot(q0, k0^T) + dot(q1, k1^T) and the output is two accumulators. D = 40 -> 32 + 16,
80 -> 64 + 16, 160 -> 128 + 32 instead of 64, 128, 256: 25-60 % fewer MMA columns,
accumulator registers and K/V bytes in shared memory. The last chunk is loaded with a
column mask (D = 40: 8 of its 16 columns) whose granularity is 8 elements (D % 8 == 0), so
the loads stay 16-byte vectors.

Head dims above 256 (up to 512, the VAE's single head): a [BLOCK_M, 512] fp32 accumulator
does not fit in registers beside the Q tile, so `_attn_fwd` runs on a 2-D grid whose second
axis splits the output's head dim into BLOCK_DV = 128 wide slices: every program computes the
scores over the whole head dim (chunks 256 + the rest) and accumulates only its slice of P V.

NaN and inf propagate as in F.scaled_dot_product_attention's math implementation (fp32, an
additive -inf mask), except that a row the mask lets attend no key gives zeros.
"""
import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

TAIL_N = tl.constexpr(16)  # key block of the general kernel's remainder loop (tl.dot minimum)
SHORT_N0, SHORT_N1 = 64, 16  # the short kernel's two key pieces
SHORT_MAX_LK = SHORT_N0 + SHORT_N1
WIDE_D = 256  # head dims above it split the output's head dim over programs (BLOCK_DV)
LOG2E = 1.4426950408889634  # the kernels use exp2: e^x = 2^(x log2 e)
# TRITON_INTERPRET=1 (CPU tensors): the interpreter's tl.dot multiplies the raw bit patterns
# of bf16 operands (triton 3.6 and 3.8), so there bf16 operands are widened to fp32 first.
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    if _INTERPRET and a.dtype == tl.bfloat16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _head(P, b, h, stride_b8, stride_h8):
    """Pointer to head (b, h). Strides arrive in units of 8 elements (the launcher guarantees
    multiples of 8): the compiler then knows every row is 16-byte aligned and emits 16-byte
    vector loads, also for D = 40, whose head stride (40) has no divisibility-by-16 hint."""
    return P + b * stride_b8 * 8 + h * stride_h8 * 8


@triton.jit
def _load_tile(base, offs_r, stride_r, n_rows, offs_c, c_valid8,
               MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Rows offs_r (row stride stride_r, n_rows valid) and columns offs_c (unit stride) of a
    matrix; masked elements read 0. Columns are masked in groups of 8 (c_valid8 = valid
    columns // 8), which keeps 8-element vectors."""
    ptrs = base + offs_r[:, None] * stride_r + offs_c[None, :]
    if MASK_ROWS:
        mask = offs_r[:, None] < n_rows
        if MASK_COLS:
            mask = mask & ((offs_c // 8)[None, :] < c_valid8)
        x = tl.load(ptrs, mask=mask, other=0.0)
    elif MASK_COLS:
        x = tl.load(ptrs, mask=(offs_c // 8)[None, :] < c_valid8, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _load_chunks(base, offs_r, stride_r, n_rows, dv8, MASK_ROWS: tl.constexpr,
                 BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr):
    """The head-dim chunks [rows, D0] and [rows, D1] of a row block; only the last chunk can
    hold padded columns. Without a second chunk, x1 repeats x0 (an unused placeholder)."""
    x0 = _load_tile(base, offs_r, stride_r, n_rows, tl.arange(0, BLOCK_D0), dv8, MASK_ROWS,
                    BLOCK_D1 == 0)
    x1 = x0
    if BLOCK_D1 > 0:
        x1 = _load_tile(base + BLOCK_D0, offs_r, stride_r, n_rows, tl.arange(0, BLOCK_D1), dv8,
                        MASK_ROWS, True)
    return x0, x1


@triton.jit
def _store_chunks(base, acc0, acc1, l_i, keep, offs_r, stride_r, n_rows, dv8,
                  BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr):
    """acc0/acc1 / l_i (per row) in the output's dtype; masked rows and padded columns skipped.
    l = 0 (every score -inf) divides by 1: acc is 0 then, or NaN from a NaN/inf in V, as SDPA
    gives. keep = False (the mask lets the rows attend no key) writes zeros, whatever the data."""
    inv_l = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)
    mask = offs_r[:, None] < n_rows
    ptrs = base + offs_r[:, None] * stride_r
    offs_d0 = tl.arange(0, BLOCK_D0)
    if BLOCK_D1 == 0:
        mask = mask & ((offs_d0 // 8)[None, :] < dv8)
    out_ty = base.dtype.element_ty
    tl.store(ptrs + offs_d0[None, :], tl.where(keep, acc0 * inv_l[:, None], 0.0).to(out_ty),
             mask=mask)
    if BLOCK_D1 > 0:
        offs_d1 = tl.arange(0, BLOCK_D1)
        mask = mask & ((offs_d1 // 8)[None, :] < dv8)
        tl.store(ptrs + BLOCK_D0 + offs_d1[None, :],
                 tl.where(keep, acc1 * inv_l[:, None], 0.0).to(out_ty), mask=mask)


@triton.jit
def _key_valid(mask_row, offs_n, Lk, MASK_N: tl.constexpr, HAS_MASK: tl.constexpr):
    """(keys inside [0, Lk), keys the mask lets us attend) for a block of keys."""
    inside = offs_n < Lk
    if HAS_MASK:
        if MASK_N:
            attend = tl.load(mask_row + offs_n, mask=inside, other=0) != 0
        else:
            attend = tl.load(mask_row + offs_n) != 0
    else:
        attend = inside
    return inside, attend


@triton.jit
def _mask_scores(s, inside, attend, MASK_N: tl.constexpr, HAS_MASK: tl.constexpr):
    """SDPA's additive mask: masked keys get -inf added, so a NaN score stays NaN (as it does
    in F.scaled_dot_product_attention). Keys past Lk are padding: set to -inf, since their
    zero-filled K rows give inf * 0 = NaN when q holds an inf."""
    if HAS_MASK:
        s = s + tl.where(attend, 0.0, float("-inf"))[None, :]
    if MASK_N:
        s = tl.where(inside[None, :], s, float("-inf"))
    return s


@triton.jit
def _softmax_base(m):
    """The running max to subtract: 0 while it is -inf (no key with a finite score yet, from a
    mask or from -inf scores of inf inputs), so exp2(-inf - 0) = 0 instead of
    exp2(-inf + inf) = NaN. A NaN max (the interpreter's max keeps NaN) stays NaN: its row has
    a NaN score, and SDPA's answer for it is NaN too."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _scores(q0, q1, k0, k1, qk_scale, BLOCK_D1: tl.constexpr, PRECISION: tl.constexpr):
    """q k^T * scale * log2(e) in fp32 (scores that overflow fp16 stay finite)."""
    s = _dot(q0, tl.trans(k0), None, PRECISION)
    if BLOCK_D1 > 0:
        s = _dot(q1, tl.trans(k1), s, PRECISION)
    return s * qk_scale


@triton.jit
def _online_block(acc0, acc1, m_i, l_i, n_keys, q0, q1, k_base, v_base, stride_kn, stride_vn,
                  mask_row, start_n, Lk, dq8, dv8, qk_scale,
                  BLOCK_N: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
                  BLOCK_V0: tl.constexpr, BLOCK_V1: tl.constexpr,
                  MASK_N: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr):
    """One key block of the online softmax: scores over the head-dim chunks (D0, D1) of q/k,
    running max and sum, rescaled P @ V over the V chunks (V0, V1) of v_base (the whole head,
    or, in the wide kernel, one slice of it). n_keys counts the keys the mask lets us attend."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k0, k1 = _load_chunks(k_base, offs_n, stride_kn, Lk, dq8, MASK_N, BLOCK_D0, BLOCK_D1)
    s = _scores(q0, q1, k0, k1, qk_scale, BLOCK_D1, PRECISION)
    if MASK_N or HAS_MASK:
        inside, attend = _key_valid(mask_row, offs_n, Lk, MASK_N, HAS_MASK)
        s = _mask_scores(s, inside, attend, MASK_N, HAS_MASK)
        if HAS_MASK:
            n_keys += tl.sum(attend.to(tl.int32), 0)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = _softmax_base(m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(v_base.dtype.element_ty)
    v0, v1 = _load_chunks(v_base, offs_n, stride_vn, Lk, dv8, MASK_N, BLOCK_V0, BLOCK_V1)
    acc0 = _dot(p, v0, acc0 * alpha[:, None], PRECISION)
    if BLOCK_V1 > 0:
        acc1 = _dot(p, v1, acc1 * alpha[:, None], PRECISION)
    return acc0, acc1, m_new, l_i, n_keys


@triton.jit
def _attn_fwd(Q, K, V, O, Mask, qk_scale,
              stride_qb8, stride_qh8, stride_qm8, stride_kb8, stride_kh8, stride_kn8,
              stride_vb8, stride_vh8, stride_vn8, stride_ob8, stride_oh8, stride_om8,
              H, Lq, Lk, D,
              HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_DV: tl.constexpr,
              PRECISION: tl.constexpr):
    """BLOCK_DV = 0: the program accumulates the whole head dim (chunks D0 + D1).
    BLOCK_DV > 0 (D > 256, where a [BLOCK_M, D] fp32 accumulator does not fit in registers):
    program (i, j) of the 2-D grid computes the scores over the whole head dim but accumulates
    only output columns [j * BLOCK_DV, (j + 1) * BLOCK_DV) of P V."""
    # Query blocks fastest on axis 0: the programs of one head run together and share K/V in L2.
    num_m = tl.cdiv(Lq, BLOCK_M)
    pid = tl.program_id(0)
    b = (pid // num_m // H).to(tl.int64)
    h = (pid // num_m % H).to(tl.int64)
    q_base = _head(Q, b, h, stride_qb8, stride_qh8)
    k_base = _head(K, b, h, stride_kb8, stride_kh8)
    v_base = _head(V, b, h, stride_vb8, stride_vh8)
    o_base = _head(O, b, h, stride_ob8, stride_oh8)
    mask_row = Mask
    if HAS_MASK:
        mask_row = Mask + b * Lk
    dq8 = (D - BLOCK_D0) // 8 if BLOCK_D1 > 0 else D // 8  # valid 8-column groups, last chunk
    V0: tl.constexpr = BLOCK_DV if BLOCK_DV > 0 else BLOCK_D0  # accumulator chunks
    V1: tl.constexpr = 0 if BLOCK_DV > 0 else BLOCK_D1
    dv8 = dq8
    if BLOCK_DV > 0:
        dv_start = tl.program_id(1) * BLOCK_DV
        v_base += dv_start
        o_base += dv_start
        dv8 = (D - dv_start) // 8  # >= BLOCK_DV // 8 except in the last slice

    offs_m = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    q0, q1 = _load_chunks(q_base, offs_m, stride_qm8 * 8, Lq, dq8, True, BLOCK_D0, BLOCK_D1)
    acc0 = tl.zeros([BLOCK_M, V0], tl.float32)
    acc1 = acc0  # placeholder without a second chunk (the compiler drops it)
    if V1 > 0:
        acc1 = tl.zeros([BLOCK_M, V1], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    n_keys = 0

    n_full = (Lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc0, acc1, m_i, l_i, n_keys = _online_block(
            acc0, acc1, m_i, l_i, n_keys, q0, q1, k_base, v_base, stride_kn8 * 8,
            stride_vn8 * 8, mask_row, start_n, Lk, dq8, dv8, qk_scale, BLOCK_N, BLOCK_D0,
            BLOCK_D1, V0, V1, False, HAS_MASK, PRECISION)
    for start_n in range(n_full, Lk, TAIL_N):
        acc0, acc1, m_i, l_i, n_keys = _online_block(
            acc0, acc1, m_i, l_i, n_keys, q0, q1, k_base, v_base, stride_kn8 * 8,
            stride_vn8 * 8, mask_row, start_n, Lk, dq8, dv8, qk_scale, TAIL_N, BLOCK_D0,
            BLOCK_D1, V0, V1, True, HAS_MASK, PRECISION)

    # Rows that may attend no key (the mask) write zeros, even where K/V hold NaN.
    keep = (n_keys > 0) if HAS_MASK else True
    _store_chunks(o_base, acc0, acc1, l_i, keep, offs_m, stride_om8 * 8, Lq, dv8, V0, V1)


@triton.jit
def _attn_fwd_short(Q, K, V, O, Mask, qk_scale,
                    stride_qb8, stride_qh8, stride_qm8, stride_kb8, stride_kh8, stride_kn8,
                    stride_vb8, stride_vh8, stride_vn8, stride_ob8, stride_oh8, stride_om8,
                    H, Lq, Lk, D, PROGS_M,
                    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N0: tl.constexpr,
                    BLOCK_N1: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
                    PRECISION: tl.constexpr):
    # Grid: PROGS_M programs per (batch, head); program i takes query blocks i, i + PROGS_M, ...
    pid = tl.program_id(0)
    b = (pid // PROGS_M // H).to(tl.int64)
    h = (pid // PROGS_M % H).to(tl.int64)
    q_base = _head(Q, b, h, stride_qb8, stride_qh8)
    k_base = _head(K, b, h, stride_kb8, stride_kh8)
    v_base = _head(V, b, h, stride_vb8, stride_vh8)
    o_base = _head(O, b, h, stride_ob8, stride_oh8)
    mask_row = Mask
    if HAS_MASK:
        mask_row = Mask + b * Lk
    dv8 = (D - BLOCK_D0) // 8 if BLOCK_D1 > 0 else D // 8

    # All of K and V, loaded once (keys [0, N0) and [N0, N0 + N1), Lk <= N0 + N1); the
    # compiler keeps them in shared memory across the query loop.
    offs_n0 = tl.arange(0, BLOCK_N0)
    offs_n1 = BLOCK_N0 + tl.arange(0, BLOCK_N1)
    k00, k01 = _load_chunks(k_base, offs_n0, stride_kn8 * 8, Lk, dv8, True, BLOCK_D0, BLOCK_D1)
    v00, v01 = _load_chunks(v_base, offs_n0, stride_vn8 * 8, Lk, dv8, True, BLOCK_D0, BLOCK_D1)
    k10, k11 = _load_chunks(k_base, offs_n1, stride_kn8 * 8, Lk, dv8, True, BLOCK_D0, BLOCK_D1)
    v10, v11 = _load_chunks(v_base, offs_n1, stride_vn8 * 8, Lk, dv8, True, BLOCK_D0, BLOCK_D1)
    inside0, attend0 = _key_valid(mask_row, offs_n0, Lk, True, HAS_MASK)
    inside1, attend1 = _key_valid(mask_row, offs_n1, Lk, True, HAS_MASK)
    keep = True
    if HAS_MASK:  # rows that may attend no key write zeros, even where K/V hold NaN
        keep = tl.sum(attend0.to(tl.int32), 0) + tl.sum(attend1.to(tl.int32), 0) > 0

    for mb in range(pid % PROGS_M, tl.cdiv(Lq, BLOCK_M), PROGS_M):
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        q0, q1 = _load_chunks(q_base, offs_m, stride_qm8 * 8, Lq, dv8, True, BLOCK_D0, BLOCK_D1)
        # Single-pass softmax over all keys.
        s0 = _mask_scores(_scores(q0, q1, k00, k01, qk_scale, BLOCK_D1, PRECISION),
                          inside0, attend0, True, HAS_MASK)
        s1 = _mask_scores(_scores(q0, q1, k10, k11, qk_scale, BLOCK_D1, PRECISION),
                          inside1, attend1, True, HAS_MASK)
        m = _softmax_base(tl.maximum(tl.max(s0, 1), tl.max(s1, 1)))
        p0 = tl.exp2(s0 - m[:, None])
        p1 = tl.exp2(s1 - m[:, None])
        l = tl.sum(p0, 1) + tl.sum(p1, 1)
        p0 = p0.to(v00.dtype)
        p1 = p1.to(v00.dtype)
        acc0 = _dot(p1, v10, _dot(p0, v00, None, PRECISION), PRECISION)
        acc1 = acc0  # placeholder without a second chunk
        if BLOCK_D1 > 0:
            acc1 = _dot(p1, v11, _dot(p0, v01, None, PRECISION), PRECISION)
        _store_chunks(o_base, acc0, acc1, l, keep, offs_m, stride_om8 * 8, Lq, dv8, BLOCK_D0,
                      BLOCK_D1)


# ----------------------------------------------------------------------------- launcher

def head_blocks(D, dtype=torch.float16):
    """(D0, D1): the power-of-two chunks (each >= 16, D1 = 0 for one chunk) covering D with
    the fewest padded columns: 40 -> (32, 16), 80 -> (64, 16), 160 -> (128, 32). fp32 (exact
    FMA dots, a correctness path) uses one power-of-two block up to 256: fewer kernels to
    build. D > 256 (the wide kernel, every dtype): 256 + the rest, 512 -> (256, 256)."""
    if D > WIDE_D:
        return WIDE_D, max(16, triton.next_power_of_2(D - WIDE_D))
    if dtype == torch.float32:
        return max(16, triton.next_power_of_2(D)), 0
    d0 = max(16, 1 << (D.bit_length() - 1))
    rest = D - d0
    if rest <= 0:
        return d0, 0
    d1 = max(16, triton.next_power_of_2(rest))
    return (2 * d0, 0) if d1 == d0 else (d0, d1)


# Fixed configs, picked per head-dim width (D0 + D1), no autotuning. Every entry compiles for
# sm_80 and sm_90 without register spills within the shared-memory limits (checked by
# tests/test_triton_compile.py). BLOCK_M >= 16 * num_warps (sm_80 mma) and >= 64 per warpgroup
# (sm_90 wgmma): the chained dots put every warp on distinct query rows. sm_80 holds the
# Q tile and the K/V operands in registers, so wide heads take narrower key blocks.
# _attn_fwd, fp16/bf16: (max width, BLOCK_M, BLOCK_N, num_warps, num_stages)
_GENERAL = ((48, 128, 64, 4, 3), (96, 128, 64, 8, 3), (128, 128, 32, 8, 3),
            (160, 128, 32, 8, 2), (192, 128, 16, 8, 2), (256, 64, 16, 4, 2))
# _attn_fwd, fp32: exact (ieee) dots run on the FMA units, where the operands of one thread
# grow with D: small tiles (ptxas of triton 3.6 spills some 4-warp ones, none of these).
_GENERAL_FP32 = ((32, 32, 32, 4, 2), (128, 32, 32, 8, 2), (256, 32, 16, 8, 2))
# _attn_fwd_short, fp16/bf16: (max width, BLOCK_M, num_warps, num_stages); wider heads take
# the general kernel (all of K/V for D = 192..256 does not fit beside the Q pipeline).
_SHORT = ((48, 128, 4, 3), (128, 128, 8, 3), (160, 128, 8, 2))
# _attn_fwd with D > 256 (the VAE's 512-wide head): (BLOCK_M, BLOCK_N, BLOCK_DV, num_warps,
# num_stages). A [BLOCK_M, 512] fp32 accumulator does not fit in registers beside the Q tile,
# so each program accumulates a BLOCK_DV-wide slice of the output and recomputes the scores
# over the whole head dim: D / BLOCK_DV times the Q K^T work, no spills.
WIDE = dict(lowp=(64, 32, 128, 4, 2), fp32=(32, 16, 128, 8, 2))


def _pick(table, width):
    return next(row[1:] for row in table if width <= row[0])


def _plan(B, H, Lq, Lk, D, dtype, has_mask, num_sms):
    """What one call launches: (kernel, constexprs, num_warps, num_stages, grid, extra
    runtime args after D)."""
    d0, d1 = head_blocks(D, dtype)
    meta = dict(HAS_MASK=has_mask, BLOCK_D0=d0, BLOCK_D1=d1,
                PRECISION="ieee" if dtype == torch.float32 else "tf32")
    if dtype != torch.float32 and Lk <= SHORT_MAX_LK and d0 + d1 <= _SHORT[-1][0]:
        bm, warps, stages = _pick(_SHORT, d0 + d1)
        num_m = triton.cdiv(Lq, bm)
        # About two resident programs per SM, each streaming several query blocks.
        progs_m = max(1, min(num_m, triton.cdiv(2 * num_sms, B * H)))
        meta.update(BLOCK_M=bm, BLOCK_N0=SHORT_N0, BLOCK_N1=SHORT_N1)
        return _attn_fwd_short, meta, warps, stages, (progs_m * B * H,), (progs_m,)
    if D > WIDE_D:
        bm, bn, bdv, warps, stages = WIDE["fp32" if dtype == torch.float32 else "lowp"]
        meta.update(BLOCK_M=bm, BLOCK_N=bn, BLOCK_DV=bdv)
        return _attn_fwd, meta, warps, stages, (triton.cdiv(Lq, bm) * B * H, triton.cdiv(D, bdv)), ()
    bm, bn, warps, stages = _pick(_GENERAL_FP32 if dtype == torch.float32 else _GENERAL, d0 + d1)
    meta.update(BLOCK_M=bm, BLOCK_N=bn, BLOCK_DV=0)
    return _attn_fwd, meta, warps, stages, (triton.cdiv(Lq, bm) * B * H,), ()


def _aligned(t):
    """t, or a contiguous copy when a stride of a dim longer than 1 is not a multiple of 8
    elements (the kernels assume 16-byte aligned rows; BSHD views and contiguous tensors
    with D % 8 == 0 always qualify, so they are read in place)."""
    if all(st % 8 == 0 for st, n in zip(t.stride()[:3], t.shape[:3]) if n > 1):
        return t
    return t.contiguous()


def _strides8(t):
    """Strides of the B, H, L dims in units of 8 elements (0 for a dim of size 1)."""
    return tuple(st // 8 if n > 1 else 0 for st, n in zip(t.stride()[:3], t.shape[:3]))


@functools.lru_cache(None)
def _num_sms(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def attention(q, k, v, scale, key_padding_mask=None):
    """softmax(q k^T * scale, masked) v for q [B, H, Lq, D], k/v [B, H, Lk, D] (unit stride in
    D, any other strides), key_padding_mask None or contiguous bool [B, Lk] (True = attend).
    The output is torch.empty_like(q), written through its strides."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    q, k, v = (_aligned(t) for t in (q, k, v))
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.contiguous()
    out = torch.empty_like(q)
    if out.numel() == 0 or Lk == 0:  # nothing to attend to: zeros, like a fully masked row
        return out.zero_()
    num_sms = _num_sms(q.device.index) if q.is_cuda else 2
    kernel, meta, warps, stages, grid, extra = _plan(B, H, Lq, Lk, D, q.dtype,
                                                     key_padding_mask is not None, num_sms)
    other_gpu = q.is_cuda and q.device.index != torch.cuda.current_device()
    with torch.cuda.device(q.device) if other_gpu else contextlib.nullcontext():
        kernel[grid](q, k, v, out, key_padding_mask, scale * LOG2E,
                        *_strides8(q), *_strides8(k), *_strides8(v), *_strides8(out),
                        H, Lq, Lk, D, *extra, num_warps=warps, num_stages=stages, **meta)
    return out


# ----------------------------------------------------------------------------- compile specs

_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def spec_name(kernel, dtype, meta):
    """Names one compiled variant (the kernel and its constexprs)."""
    keys = f"n{meta['BLOCK_N']}" if "BLOCK_N" in meta else f"n{meta['BLOCK_N0']}+{meta['BLOCK_N1']}"
    return (f"{kernel.__name__.strip('_')}-{_TYPES[dtype]}-d{meta['BLOCK_D0']}+{meta['BLOCK_D1']}"
            f"-m{meta['BLOCK_M']}-{keys}" + (f"-dv{meta['BLOCK_DV']}" if meta.get("BLOCK_DV") else "")
            + ("-mask" if meta["HAS_MASK"] else ""))


def _arg_type(value):
    """(signature type, divisible by 16) as triton's launcher specialises an argument."""
    if isinstance(value, float):
        return "fp32", False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", False
        return ("i32" if -2 ** 31 <= value < 2 ** 31 else "i64"), value % 16 == 0
    return "*" + {torch.bool: "i1", **_TYPES}[value.dtype], True  # allocations: 16B aligned


def _spec(dtype, D, Lk, has_mask, B=2, H=8, Lq=4096, num_sms=132):
    """The compile spec of what `attention` launches for this call, its arguments
    specialised as for diffusers-style [B, L, H, D] buffers seen as [B, H, L, D]."""
    kernel, meta, warps, stages, _, extra = _plan(B, H, Lq, Lk, D, dtype, has_mask, num_sms)
    t = torch.empty(1, dtype=dtype, device="meta")
    strides8 = [(L * H * D // 8, D // 8, H * D // 8) for L in (Lq, Lk, Lk, Lq)]  # q, k, v, out
    values = dict(Q=t, K=t, V=t, O=t, qk_scale=0.5, H=H, Lq=Lq, Lk=Lk, D=D,
                  Mask=torch.empty(1, dtype=torch.bool, device="meta") if has_mask else None,
                  **dict(zip(_STRIDE_ARGS, sum(strides8, ()))), **dict(zip(["PROGS_M"], extra)),
                  **meta)
    signature, constexprs, attrs = {}, {}, {}
    for i, arg in enumerate(kernel.arg_names):
        value = values[arg]
        ty, div16 = ("constexpr", False) if arg in meta or value is None else _arg_type(value)
        signature[arg] = ty
        if ty == "constexpr":
            constexprs[arg] = value
        elif div16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return dict(name=spec_name(kernel, dtype, meta), fn=kernel, signature=signature,
                constexprs=constexprs, attrs=attrs, num_warps=warps, num_stages=stages)


_STRIDE_ARGS = tuple(f"stride_{t}{d}8" for t, n in (("q", "m"), ("k", "n"), ("v", "n"), ("o", "m"))
                     for d in ("b", "h", n))


def compile_specs():
    """Every (kernel, constexprs, num_warps, num_stages) `attention` can launch: fp16/bf16/fp32,
    every head-dim block, mask on/off, the general and the short-Lk kernel (Lk 4096 and 77),
    as dicts {name, fn, signature, constexprs, attrs, num_warps, num_stages} for
    diffkernels.triton._compile.compile_spec."""
    specs = {}
    for dtype in _TYPES:
        for D in _spec_D(dtype):
            for Lk in (4096, 77):
                for has_mask in (False, True):
                    spec = _spec(dtype, D, Lk, has_mask)
                    specs.setdefault(spec["name"], spec)
    return list(specs.values())


def _spec_D(dtype):
    """One head dim per head-dim block (the smallest that maps to it: 40, 72, 152, ...)."""
    out = {}
    for D in range(512, 7, -8):
        out[head_blocks(D, dtype)] = D
    return sorted(out.values())
