"""Paged MLA decode, variant "v5": fp8 caches read as 16-bit pairs through v1's bf16 pipeline.

Same math and tensor contracts as kernels/mla_decode.py (its docstring); mla_decode(variant="v5")
dispatches here, for float8 caches (e4m3fn / e4m3fnuz) only. Splits, workspace and merges are v3's
(kernels/mla_decode_v3.py: split per sequence, fused last-arriver merge or the merge kernel).

Why: an 8-bit tile cannot take v1's bf16 path (cp.async into shared memory, ldmatrix straight into
the MMA operand layout for both dots): the PV operand reads the tile transposed, and sm_90 has no
transposing 8-bit shared load, so v1 / v3 convert the tile to fp16 in registers and store it back
to shared memory (one CTA per SM, shared-memory bound: bench/RESULTS.md sessions 10-11). Here the
cache is viewed as int16, each element the pair of fp8 values of dims (2i, 2i+1), so every shared
load is 16-bit (ldmatrix / ldmatrix.trans). The pair is split in registers by integer bit moves
into two fp16 tiles, `lo` (even dims) and `hi` (odd dims), each holding the exact value * 2^(bias
- 15) (the e4m3 exponent / mantissa bits placed under fp16's; zero-exponent codes land on fp16
subnormals, exactly); the factor and k_scale are folded into the score scale and the output
scale. The reduction over latent dims does not care about their order, so with q split the same
way (even / odd dims),
    q . c = q_even . lo + q_odd . hi           (QK^T: two dots per chunk)
    o[:, even] = P lo,  o[:, odd] = P hi       (PV: two accumulators per chunk)
and the output is re-interleaved (tl.join) at the store. Needs R / 2 and DR / 2 >= 16 (the dots'
minimum K / N); mla_decode falls back to v3 otherwise.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import envs
from .mla_decode_v3 import (
    _TABLE_ARGS,
    _merge_if_last,
    _split_range,
    fused_merge_tiles,
    launch_merge,
    split_workspace,
)

# mla_decode.py reloads this module when the interpreter setting changed since it was imported
INTERPRET = envs.triton_interpreted()


@triton.jit
def _unpack(w, ASM: tl.constexpr):
    """int16 pairs [.., n] of fp8 e4m3 codes (low byte = even dim) -> (lo, hi) fp16 [.., n].
    ASM (NVIDIA, e4m3fn): the native cvt.rn.f16x2.e4m3x2 on two pairs per 32-bit register (one
    PRMT + two cvt per four values), exact values. Otherwise integer bit moves: each code's
    value * 2^(bias - 15), sign to bit 15 and exponent / mantissa bits 6..0 to fp16 bits 13..7."""
    if ASM:
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b32 t; .reg .b16 a, b; prmt.b32 t, $2, 0, 0x3120; mov.b32 {a, b}, t; "
            "cvt.rn.f16x2.e4m3x2 $0, a; cvt.rn.f16x2.e4m3x2 $1, b; }",
            "=r,=r,r", [w], dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
        return lo, hi
    lo = ((w << 8) & -32768) | ((w << 7) & 0x3F80)
    hi = (w & -32768) | ((w >> 1) & 0x3F80)
    return lo.to(tl.float16, bitcast=True), hi.to(tl.float16, bitcast=True)


@triton.jit
def _split_q(ptr, hm, NP: tl.constexpr, BLOCK_H: tl.constexpr):
    """q[:, 0:2 NP] (a row pointer tile [BLOCK_H, 2 NP]) -> (even, odd dims) fp16 [BLOCK_H, NP]."""
    q = tl.load(ptr, mask=hm, other=0.0).to(tl.float16)
    return tl.split(tl.reshape(q, (BLOCK_H, NP, 2)))


@triton.jit
def _rope_q(ptr, hm, COS, SIN, POS, b, stride_cos, NP: tl.constexpr):
    """q_pe rows (a row pointer tile [BLOCK_H, 1] at dim 0) rotated by interleaved RoPE at
    position POS[b] (pairs (2j, 2j + 1), fp32 math, rounded to q's dtype as
    kernels/norm_rope.rope_interleaved_ does) -> (even, odd dims) fp16 [BLOCK_H, NP]. Strided
    loads instead of _split_q's reshape / split: no layout conversion."""
    j = tl.arange(0, NP)
    x0 = tl.load(ptr + 2 * j[None, :], mask=hm, other=0.0).to(tl.float32)
    x1 = tl.load(ptr + 2 * j[None, :] + 1, mask=hm, other=0.0).to(tl.float32)
    pos = tl.load(POS + b).to(tl.int64)
    cs = tl.load(COS + pos * stride_cos + j)[None, :]
    sn = tl.load(SIN + pos * stride_cos + j)[None, :]
    dt = ptr.dtype.element_ty
    return ((x0 * cs - x1 * sn).to(dt).to(tl.float16),
            (x0 * sn + x1 * cs).to(dt).to(tl.float16))


@triton.jit
def _pv(p, w, acc_e, acc_o, alpha, ASM: tl.constexpr):
    lo, hi = _unpack(w, ASM)
    acc_e = tl.dot(p, lo, acc_e * alpha[:, None])
    acc_o = tl.dot(p, hi, acc_o * alpha[:, None])
    return acc_e, acc_o


@triton.jit
def _qk(q_ptr, hm, w, acc, NP: tl.constexpr, BLOCK_H: tl.constexpr, ASM: tl.constexpr):
    qe, qo = _split_q(q_ptr, hm, NP, BLOCK_H)
    lo, hi = _unpack(w, ASM)
    acc = tl.dot(qe, tl.trans(lo), acc)
    return tl.dot(qo, tl.trans(hi), acc)


@triton.jit
def _store_pairs(dst, acc_e, acc_o, norm, hm, NP: tl.constexpr, BLOCK_H: tl.constexpr):
    o = tl.reshape(tl.join(acc_e * norm[:, None], acc_o * norm[:, None]), (BLOCK_H, 2 * NP))
    tl.store(dst + tl.arange(0, 2 * NP)[None, :], o.to(dst.dtype.element_ty), mask=hm)


@triton.jit
def _store_o(dst, a0e, a0o, a1e, a1o, a2e, a2o, a3e, a3o, norm, hm, CP: tl.constexpr,
             NC: tl.constexpr, BLOCK_H: tl.constexpr):
    _store_pairs(dst, a0e, a0o, norm, hm, CP, BLOCK_H)
    if NC > 1:
        _store_pairs(dst + 2 * CP, a1e, a1o, norm, hm, CP, BLOCK_H)
    if NC > 2:
        _store_pairs(dst + 4 * CP, a2e, a2o, norm, hm, CP, BLOCK_H)
        _store_pairs(dst + 6 * CP, a3e, a3o, norm, hm, CP, BLOCK_H)


@triton.jit(do_not_specialize=_TABLE_ARGS)
def _mla_decode_v5(
    QN, QP, KV, BT, LENS, OPART, LSE, CNT, OUT, COS, SIN, POS,
    qk_scale, out_scale, num_splits, H,
    stride_qn_b, stride_qn_h, stride_qp_b, stride_qp_h, stride_bt_b,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh, stride_cos,
    R: tl.constexpr, DR: tl.constexpr, CP: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, MIN_SPLIT: tl.constexpr,
    MERGE: tl.constexpr, BLOCK_S: tl.constexpr, MC: tl.constexpr, ASM: tl.constexpr,
    ROPE: tl.constexpr,
):
    """KV: the cache as int16 [blocks, PAGE, (R + DR) / 2]; CP pairs per chunk, NC = R / 2 / CP
    chunks (1, 2 or 4), each with an even- and an odd-dim accumulator. ROPE: q_pe arrives
    unrotated and each program rotates its rows at POS[b] (COS / SIN [P, DR / 2] fp32)."""
    NC: tl.constexpr = R // 2 // CP
    W: tl.constexpr = (R + DR) // 2
    hg = tl.program_id(0)
    b = tl.program_id(1)
    s = tl.program_id(2)
    n_act, start, end, direct, run = _split_range(LENS, b, s, num_splits, BLOCK_N, MIN_SPLIT)
    if run:
        heads = hg * BLOCK_H + tl.arange(0, BLOCK_H)
        hmask = heads < H
        hm = hmask[:, None]
        offs_c = tl.arange(0, CP)
        offs_p = tl.arange(0, DR // 2)
        q_row = QN + b * stride_qn_b + heads[:, None] * stride_qn_h
        q_c = q_row + tl.arange(0, 2 * CP)[None, :]
        qp_row = QP + b * stride_qp_b + heads[:, None] * stride_qp_h
        if ROPE:
            pe_e, pe_o = _rope_q(qp_row, hm, COS, SIN, POS, b, stride_cos, DR // 2)
        else:
            pe_e, pe_o = _split_q(qp_row + tl.arange(0, DR)[None, :], hm, DR // 2, BLOCK_H)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        a0e = tl.zeros([BLOCK_H, CP], tl.float32)
        a0o = a0e
        a1e = a0e
        a1o = a0e
        a2e = a0e
        a2o = a0e
        a3e = a0e
        a3o = a0e
        bt_row = BT + b * stride_bt_b
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < end
            nm = nmask[:, None]
            page = tl.load(bt_row + offs_n // PAGE, mask=nmask, other=0)
            row = KV + ((page.to(tl.int64) * PAGE + offs_n % PAGE) * W)[:, None]
            kp = tl.load(row + R // 2 + offs_p[None, :], mask=nm, other=0)
            w0 = tl.load(row + offs_c[None, :], mask=nm, other=0)
            lo, hi = _unpack(kp, ASM)
            qk = tl.dot(pe_e, tl.trans(lo))
            qk = tl.dot(pe_o, tl.trans(hi), qk)
            qk = _qk(q_c, hm, w0, qk, CP, BLOCK_H, ASM)
            if NC > 1:
                w1 = tl.load(row + CP + offs_c[None, :], mask=nm, other=0)
                qk = _qk(q_c + 2 * CP, hm, w1, qk, CP, BLOCK_H, ASM)
            if NC > 2:
                w2 = tl.load(row + 2 * CP + offs_c[None, :], mask=nm, other=0)
                qk = _qk(q_c + 4 * CP, hm, w2, qk, CP, BLOCK_H, ASM)
                w3 = tl.load(row + 3 * CP + offs_c[None, :], mask=nm, other=0)
                qk = _qk(q_c + 6 * CP, hm, w3, qk, CP, BLOCK_H, ASM)
            qk = tl.where(nmask[None, :], qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            pc = p.to(tl.float16)
            a0e, a0o = _pv(pc, w0, a0e, a0o, alpha, ASM)
            if NC > 1:
                a1e, a1o = _pv(pc, w1, a1e, a1o, alpha, ASM)
            if NC > 2:
                a2e, a2o = _pv(pc, w2, a2e, a2o, alpha, ASM)
                a3e, a3o = _pv(pc, w3, a3e, a3o, alpha, ASM)
            m_i = m_new
        if direct:
            norm = out_scale / tl.where(l_i > 0, l_i, 1.0)
            _store_o(OUT + b * stride_ob + heads[:, None] * stride_oh, a0e, a0o, a1e, a1o,
                     a2e, a2o, a3e, a3o, norm, hm, CP, NC, BLOCK_H)
        else:
            tl.store(LSE + b * stride_lb + heads * stride_lh + s, m_i + tl.log2(l_i), mask=hmask)
            _store_o(OPART + b * stride_pb + heads[:, None] * stride_ph + s * stride_ps, a0e,
                     a0o, a1e, a1o, a2e, a2o, a3e, a3o, out_scale / l_i, hm, CP, NC, BLOCK_H)
        if not direct and MERGE:
            _merge_if_last(CNT, OPART, LSE, OUT, b, hg, heads, hmask, n_act, stride_pb,
                           stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh, R,
                           BLOCK_S, MC)


def supported(r: int, dr: int) -> bool:
    """v5 takes latent / rope widths whose halves are >= 16 (the dots' minimum)."""
    return r >= 32 and dr >= 32


# developer switch for A/Bs on NVIDIA: the portable bit moves (the path AMD GPUs take) instead of
# the native cvt; read at each launch
FORCE_BIT_MOVES = False


@functools.lru_cache(maxsize=16)
def _has_fp8_cvt(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 9)  # cvt ... e4m3x2: sm_89+


def native_cvt(kv_dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the launch unpacks with the native e4m3x2 -> f16x2 cvt (NVIDIA sm_89+, e4m3fn,
    compiled): then the tile holds the values themselves, else value * 2^(bias - 15) (see
    _unpack)."""
    if (FORCE_BIT_MOVES or device.type != "cuda" or torch.version.hip is not None or INTERPRET
            or kv_dtype != torch.float8_e4m3fn):
        return False
    return _has_fp8_cvt(device.index if device.index is not None else torch.cuda.current_device())


def launch_v5(q_nope, q_pe, kv_cache, block_tables, seq_lens, out, qk_scale, out_scale,
              num_splits, workspace, *, merge, block_h, block_n, warps, stages, pairs,
              min_split, asm, maxnreg=None, defer_merge=False, rope=None):
    """Launch v5 (+ v3's merge kernel when S > 1 and not merged in-kernel). kv_cache: the fp8
    cache (viewed as int16 here); qk_scale / out_scale already hold k_scale and, without `asm`
    (native_cvt), the fp16 factor 2^(15 - bias) (mla_decode). pairs: int16 columns per chunk
    (R / 2 / pairs in 1, 2, 4). maxnreg: register cap per thread (NVIDIA; None = none).
    defer_merge: no merge at all (the caller launches v3's launch_merge_uv next).
    rope: None, or (cos, sin [P, DR / 2] fp32 with a contiguous last dim, positions [B]): q_pe
    is unrotated and the kernel applies interleaved RoPE as it loads it (q_pe unchanged)."""
    B, H, R = q_nope.shape
    DR = q_pe.shape[-1]
    page = kv_cache.shape[1]
    assert supported(R, DR) and (R // 2) // pairs in (1, 2, 4)
    kv16 = kv_cache.view(torch.int16)
    S = num_splits
    opart, lse, cnt, strides = split_workspace(out, seq_lens, workspace, B, H, S, R, block_h)
    merge = bool(merge) and S > 1 and not defer_merge
    bs, mc = fused_merge_tiles(S, merge, R, block_h)
    if rope is not None:
        cos, sin, pos = rope
        assert (cos.shape[-1] == DR // 2 and cos.stride(-1) == 1 and sin.stride() == cos.stride()
                and pos.shape[0] == B), "rope: cos / sin [P, DR / 2], positions [B]"
    else:
        cos = sin = pos = seq_lens  # unused
    _mla_decode_v5[(triton.cdiv(H, block_h), B, S)](
        q_nope, q_pe, kv16, block_tables, seq_lens, opart, lse, cnt, out, cos, sin, pos,
        qk_scale, out_scale, S, H,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1), block_tables.stride(0),
        *strides, out.stride(0), out.stride(1), cos.stride(0),
        R=R, DR=DR, CP=pairs, PAGE=page, BLOCK_H=block_h, BLOCK_N=block_n, MIN_SPLIT=min_split,
        MERGE=int(merge), BLOCK_S=bs, MC=mc, ASM=int(asm), ROPE=int(rope is not None),
        num_warps=warps, num_stages=stages,
        **({"maxnreg": maxnreg} if maxnreg and not INTERPRET else {}),
    )
    if S > 1 and not merge and not defer_merge:
        launch_merge(opart, lse, seq_lens, out, S, strides, block_n, min_split)
    return out
