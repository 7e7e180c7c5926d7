"""Paged MLA decode, variant "v4": v3's splits and merge kernel with the dots transposed.

Same math and tensor contracts as kernels/mla_decode.py (its docstring); mla_decode(variant="v4")
dispatches here. Grid (head_groups, B, S) and split lengths as v1/v3 (`_split_len`); a sequence
with one active split is written directly by split 0, otherwise each active split stores its
normalized partial and base-2 lse and v3's merge kernel (`_mla_merge_v3`) combines them.

Why transposed: with 8 (or 16) heads per rank the head dimension is a poor MMA M. v1/v3 compute
S = Q K^T with heads as M (16 rows, mma.sync), so every warp holds a slice of the tokens and
re-reads ALL of q from shared memory for every tile: at BLOCK_N 64 and 8 warps that is ~147 KB of
shared-memory reads per 36 KB fp8 tile, which (with the converted tile's store and the two
operand reads) exceeds what an SM's shared memory delivers in the time the tile's bytes take to
arrive (offline sm_90 count, bench/RESULTS.md session 10). v4 computes the transposes:

    S^T [BLOCK_N, BLOCK_H] = K_tile [BLOCK_N, D] @ Q^T [D, BLOCK_H]      (tokens are M)
    O^T [R, BLOCK_H]      += C_tile^T [R, BLOCK_N] @ P^T [BLOCK_N, BLOCK_H]   (latent dims are M)

so M is 64+ on both dots (one warpgroup MMA on sm_90, where the 16-bit tile operand may be
read transposed from shared memory), heads are N = BLOCK_H, and q / p are the small operand read
once per MMA instead of once per warp. The online softmax runs over axis 0 (tokens) of S^T.
fp8 caches: the tile is converted to fp16 in registers (one cvt per two values, k_scale folded
out as in v3) and that one converted tile feeds both dots.

Triton only (NVIDIA and AMD); no host syncs; graph-capturable as v3.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .. import envs
from .mla_decode_v3 import _SPLIT_ARGS, _TABLE_ARGS, _load_tile, _mla_merge_v3, _split_len

# mla_decode.py reloads this module when the interpreter setting changed since it was imported
INTERPRET = envs.triton_interpreted()
_ = _SPLIT_ARGS  # the merge kernel's do_not_specialize list (imported for readers)


@triton.jit
def _attend_t(qp_t, q0_t, q1_t, q2_t, q3_t, kp, c0, c1, c2, c3, nmask, m_i, l_i,
              a0, a1, a2, a3, qk_scale, cdt: tl.constexpr, NC: tl.constexpr):
    """One tile of online softmax, transposed: q*_t [D*, BLOCK_H] (already in cdt), tile chunks
    [BLOCK_N, *] raw; accumulators a* [CH, BLOCK_H] fp32; m_i / l_i [BLOCK_H]. (O = P @ C with
    heads as M instead compiles to 8-bit shared loads and spills: offline sm_90 count.)"""
    kp = kp.to(cdt)
    c0 = c0.to(cdt)
    s = tl.dot(kp, qp_t)
    s = tl.dot(c0, q0_t, s)
    if NC > 1:
        c1 = c1.to(cdt)
        s = tl.dot(c1, q1_t, s)
    if NC > 2:
        c2 = c2.to(cdt)
        c3 = c3.to(cdt)
        s = tl.dot(c2, q2_t, s)
        s = tl.dot(c3, q3_t, s)
    s = tl.where(nmask[:, None], s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 0))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[None, :])
    l_i = l_i * alpha + tl.sum(p, 0)
    pc = p.to(cdt)
    a0 = tl.dot(tl.trans(c0), pc, a0 * alpha[None, :])
    if NC > 1:
        a1 = tl.dot(tl.trans(c1), pc, a1 * alpha[None, :])
    if NC > 2:
        a2 = tl.dot(tl.trans(c2), pc, a2 * alpha[None, :])
        a3 = tl.dot(tl.trans(c3), pc, a3 * alpha[None, :])
    return m_new, l_i, a0, a1, a2, a3


@triton.jit
def _split_q8(q, f8: tl.constexpr):
    """q [*, BLOCK_H] (any float) -> (hi, lo) in the cache's fp8 type, q ~= hi + lo / 256."""
    q = q.to(tl.float32)
    hi = q.to(f8)
    return hi, ((q - hi.to(tl.float32)) * 256.0).to(f8)


@triton.jit
def _attend_t8(qp_h, qp_l, q0_h, q0_l, q1_h, q1_l, q2_h, q2_l, q3_h, q3_l, kp, c0, c1, c2, c3,
               nmask, m_i, l_i, a0, a1, a2, a3, qk_scale, NC: tl.constexpr):
    """_attend_t for fp8 caches with QK^T on fp8 MMAs (QK8): the raw tile against q's two fp8
    halves (hi, lo x 256: ~7 significant bits together) -- no conversion of the tile for the
    first dot; PV on the tile converted to fp16."""
    sh = tl.dot(kp, qp_h)
    sl = tl.dot(kp, qp_l)
    sh = tl.dot(c0, q0_h, sh)
    sl = tl.dot(c0, q0_l, sl)
    if NC > 1:
        sh = tl.dot(c1, q1_h, sh)
        sl = tl.dot(c1, q1_l, sl)
    if NC > 2:
        sh = tl.dot(c2, q2_h, sh)
        sl = tl.dot(c2, q2_l, sl)
        sh = tl.dot(c3, q3_h, sh)
        sl = tl.dot(c3, q3_l, sl)
    s = tl.where(nmask[:, None], (sh + sl * (1.0 / 256.0)) * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 0))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[None, :])
    l_i = l_i * alpha + tl.sum(p, 0)
    pc = p.to(tl.float16)
    a0 = tl.dot(tl.trans(c0.to(tl.float16)), pc, a0 * alpha[None, :])
    if NC > 1:
        a1 = tl.dot(tl.trans(c1.to(tl.float16)), pc, a1 * alpha[None, :])
    if NC > 2:
        a2 = tl.dot(tl.trans(c2.to(tl.float16)), pc, a2 * alpha[None, :])
        a3 = tl.dot(tl.trans(c3.to(tl.float16)), pc, a3 * alpha[None, :])
    return m_new, l_i, a0, a1, a2, a3


@triton.jit
def _store_o_t(dst_t, a0, a1, a2, a3, norm, hm_t, CH: tl.constexpr, NC: tl.constexpr):
    """dst_t: pointers [CH, BLOCK_H] of chunk 0 (dims x heads); a* [CH, BLOCK_H] fp32."""
    odt = dst_t.dtype.element_ty
    tl.store(dst_t, (a0 * norm[None, :]).to(odt), mask=hm_t)
    if NC > 1:
        tl.store(dst_t + CH, (a1 * norm[None, :]).to(odt), mask=hm_t)
    if NC > 2:
        tl.store(dst_t + 2 * CH, (a2 * norm[None, :]).to(odt), mask=hm_t)
        tl.store(dst_t + 3 * CH, (a3 * norm[None, :]).to(odt), mask=hm_t)


@triton.jit
def _load_q_t(QN, b, heads, hmask, stride_qn_b, stride_qn_h, j, CH: tl.constexpr):
    """q_nope chunk j transposed: [CH, BLOCK_H] in q's dtype (0 for padded heads)."""
    offs = tl.arange(0, CH)
    ptr = QN + b * stride_qn_b + heads[None, :] * stride_qn_h + j * CH + offs[:, None]
    return tl.load(ptr, mask=hmask[None, :], other=0.0)


@triton.jit(do_not_specialize=_TABLE_ARGS)
def _mla_decode_v4(
    QN, QP, KV, BT, LENS, OPART, LSE, OUT,
    qk_scale, out_scale, num_splits, H,
    stride_qn_b, stride_qn_h, stride_qp_b, stride_qp_h, stride_bt_b,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
    R: tl.constexpr, DR: tl.constexpr, CH: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, MIN_SPLIT: tl.constexpr, F16: tl.constexpr,
    QK8: tl.constexpr,
):
    NC: tl.constexpr = R // CH
    hg = tl.program_id(0)
    b = tl.program_id(1)
    s = tl.program_id(2)
    seq_len = tl.load(LENS + b)
    split = _split_len(seq_len, num_splits, BLOCK_N, MIN_SPLIT)
    n_act = tl.cdiv(seq_len, split)
    start = s * split
    end = tl.minimum(start + split, seq_len)
    direct = n_act <= 1
    if direct:
        run = s == 0  # split 0 writes the whole sequence (len 0: zeros)
    else:
        run = s < n_act
    if run:
        heads = hg * BLOCK_H + tl.arange(0, BLOCK_H)
        hmask = heads < H
        offs_c = tl.arange(0, CH)
        offs_p = tl.arange(0, DR)
        cdt: tl.constexpr = tl.float16 if F16 else QN.dtype.element_ty
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        a0 = tl.zeros([CH, BLOCK_H], tl.float32)
        a1 = a0
        a2 = a0
        a3 = a0
        bt_row = BT + b * stride_bt_b
        # q^T, loaded once: [DR, BLOCK_H] and NC chunks [CH, BLOCK_H]
        qp_t = tl.load(QP + b * stride_qp_b + heads[None, :] * stride_qp_h + offs_p[:, None],
                       mask=hmask[None, :], other=0.0)
        q0_t = _load_q_t(QN, b, heads, hmask, stride_qn_b, stride_qn_h, 0, CH)
        q1_t = q0_t
        q2_t = q0_t
        q3_t = q0_t
        if NC > 1:
            q1_t = _load_q_t(QN, b, heads, hmask, stride_qn_b, stride_qn_h, 1, CH)
        if NC > 2:
            q2_t = _load_q_t(QN, b, heads, hmask, stride_qn_b, stride_qn_h, 2, CH)
            q3_t = _load_q_t(QN, b, heads, hmask, stride_qn_b, stride_qn_h, 3, CH)
        if QK8:
            f8: tl.constexpr = KV.dtype.element_ty
            qp_h, qp_l = _split_q8(qp_t, f8)
            q0_h, q0_l = _split_q8(q0_t, f8)
            q1_h, q1_l = _split_q8(q1_t, f8)
            q2_h, q2_l = _split_q8(q2_t, f8)
            q3_h, q3_l = _split_q8(q3_t, f8)
            for n0 in range(start, end, BLOCK_N):
                kp, c0, c1, c2, c3 = _load_tile(KV, bt_row, n0, end, offs_c, offs_p,
                                                R, DR, CH, NC, PAGE, BLOCK_N)
                nmask = n0 + tl.arange(0, BLOCK_N) < end
                m_i, l_i, a0, a1, a2, a3 = _attend_t8(
                    qp_h, qp_l, q0_h, q0_l, q1_h, q1_l, q2_h, q2_l, q3_h, q3_l,
                    kp, c0, c1, c2, c3, nmask, m_i, l_i, a0, a1, a2, a3, qk_scale, NC)
        else:
            qp_t = qp_t.to(cdt)
            q0_t = q0_t.to(cdt)
            q1_t = q1_t.to(cdt)
            q2_t = q2_t.to(cdt)
            q3_t = q3_t.to(cdt)
            for n0 in range(start, end, BLOCK_N):
                kp, c0, c1, c2, c3 = _load_tile(KV, bt_row, n0, end, offs_c, offs_p,
                                                R, DR, CH, NC, PAGE, BLOCK_N)
                nmask = n0 + tl.arange(0, BLOCK_N) < end
                m_i, l_i, a0, a1, a2, a3 = _attend_t(
                    qp_t, q0_t, q1_t, q2_t, q3_t, kp, c0, c1, c2, c3, nmask, m_i, l_i,
                    a0, a1, a2, a3, qk_scale, cdt, NC)
        hm_t = hmask[None, :]
        if direct:
            norm = out_scale / tl.where(l_i > 0, l_i, 1.0)
            _store_o_t(OUT + b * stride_ob + heads[None, :] * stride_oh + offs_c[:, None],
                       a0, a1, a2, a3, norm, hm_t, CH, NC)
        else:
            tl.store(LSE + b * stride_lb + heads * stride_lh + s, m_i + tl.log2(l_i), mask=hmask)
            _store_o_t(OPART + b * stride_pb + heads[None, :] * stride_ph + s * stride_ps
                       + offs_c[:, None], a0, a1, a2, a3, out_scale / l_i, hm_t, CH, NC)


def launch_v4(q_nope, q_pe, kv_cache, block_tables, seq_lens, out, qk_scale, out_scale,
              num_splits, workspace, *, f16, block_h, block_n, warps, stages, chunk,
              min_split, qk8=False, maxnreg=None):
    """Launch v4 (+ v3's merge kernel when num_splits > 1). workspace: v3's (opart [B, H, S, R]
    fp32, lse [B, H, S] fp32, counters (unused)); scales folded by the caller as for v3.
    qk8 (fp8 caches only): QK^T on fp8 MMAs against q split in two fp8 halves (_attend_t8).
    Output error ~3e-3 relative (vs ~1e-4 with the fp16 tile): an A/B candidate, not a
    default."""
    B, H, R = q_nope.shape
    DR = q_pe.shape[-1]
    page = kv_cache.shape[1]
    S = num_splits
    if S == 1:
        opart = lse = out  # never touched: every sequence is direct
        strides = (0, 0, 0, 0, 0)
    else:
        opart, lse = workspace[0], workspace[1]
        assert opart.shape == (B, H, S, R) and lse.shape == (B, H, S)
        strides = (opart.stride(0), opart.stride(1), opart.stride(2), lse.stride(0),
                   lse.stride(1))
    _mla_decode_v4[(triton.cdiv(H, block_h), B, S)](
        q_nope, q_pe, kv_cache, block_tables, seq_lens, opart, lse, out,
        qk_scale, out_scale, S, H,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1), block_tables.stride(0),
        *strides, out.stride(0), out.stride(1),
        R=R, DR=DR, CH=chunk, PAGE=page, BLOCK_H=block_h, BLOCK_N=block_n, MIN_SPLIT=min_split,
        F16=f16, QK8=bool(qk8 and f16), num_warps=warps, num_stages=stages,
        **({"maxnreg": maxnreg} if maxnreg and not INTERPRET else {}),
    )
    if S > 1:
        block_s = triton.next_power_of_2(S)
        block_r = min(R, max(16, 4096 // block_s))
        _mla_merge_v3[(H, B, R // block_r)](
            opart, lse, seq_lens, out, S, *strides, out.stride(0), out.stride(1),
            BLOCK_N=block_n, MIN_SPLIT=min_split, BLOCK_S=block_s, BLOCK_R=block_r, num_warps=4,
        )
    return out
