"""Paged MLA decode, variant "v3": v1's split per sequence, an in-kernel merge, a leaner fp8 path.

Same math and tensor contracts as kernels/mla_decode.py (its docstring); mla_decode(variant="v3")
dispatches here. Grid (head_groups, B, S) as v1: sequence b's split length is
ceil(len / S) rounded up to BLOCK_N and >= MIN_SPLIT, so n_b = cdiv(len, split) <= S splits are
active and the rest exit at once. What differs from v1:

- One launch when S <= FUSED_MAX_S (MERGE == 1). A sequence with n_b <= 1 is written directly
  by split 0 (no partials; len 0 -> zeros). Otherwise each active split stores its partial
  (o normalized, lse base 2) into opart[b, :, s] / lse[b, :, s], then (CTA barrier, one acq_rel
  atomic per CTA) bumps counter[b, head group]; the last arriver merges the n_b partials (.cg
  loads: written by other CTAs of this launch) and resets the counter to 0, so the next launch /
  CUDA-graph replay starts from zeros. The merge is one straight-line pass: all loads of the
  [BLOCK_S, BLOCK_H, R / MC] tiles are issued before the sums (no run-time loop: v2's 32-step
  merge loop paid one L2 round trip per step, ~20 us). S > FUSED_MAX_S (B=1, B=16 at long
  contexts): v1's separate merge kernel (MERGE == 0), which spreads the merge over H x R / 256
  CTAs.
- fp8 caches: k_scale is folded out of the per-element path (scores x qk_scale * k_scale, the
  output x k_scale once). FP8_PATH 1 ("regs"): the tile is loaded global -> registers (16-byte
  loads), converted fp8 -> fp16 (one cvt per two values, no fp32 round trip) and stored to
  shared memory once per dot; the next tile's loads are issued before this tile's dots (a
  register double buffer, num_stages=1), so there is no cp.async staging buffer and no
  shared-memory read of the fp8 bytes. FP8_PATH 0 ("cpasync"): v1's cp.async pipeline with the
  plain fp16 cast times a run-time 1.0 (v2's fp8_mode 1).
- 16/32-bit caches run v1's loop unchanged (cp.async pipeline, both dots from one buffer).

Workspace (alloc_v3_workspace): opart [B, H, S, R] fp32, lse [B, H, S] fp32, counters
[B * head_groups] int32 (zero before the first launch; kernels leave them zero). Concurrent
launches on different streams need separate workspaces.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import envs

# mla_decode.py reloads this module when the interpreter setting changed since it was imported
INTERPRET = envs.triton_interpreted()
# _mla_merge_uv's (splits per step, warps): every program of a (row, head) walks all active
# splits (128 at B=1 x 8K), a chain of dependent L2 round trips: at 16 per step (8 steps) the
# launch took 12.3 µs per layer there vs 3.6 at 1K (H200, session 21). 32 with 4 warps (at R 512)
# measured best of (splits, warps) 16/4, 32/4, 32/8, 64/8, 64/16, 128/16, of a smaller first
# step, and of 32 / 16 / 8 programs instead of ~128 (session 22, v5 + merge at B=1: 8K 19.7 ->
# 14.2 µs, 32K 28.4 -> 22.9, 1K 9.0 -> 9.1-9.9; decode step, two alternated runs each: B=1 x 8K
# 4.96 -> 4.60 ms, x 32K 5.51 -> 5.12, B=2 x 8K 6.21 -> 5.89, 1K a tie; bench/RESULTS.md session
# 22). The bf16 caches' v1 + merge shares it. The reduction's shapes (SC, and the lse tile
# MERGE_UV_LSE_BLOCK = mla_decode.MAX_SPLITS) do not follow the launch's split count, which
# follows the batch size: a sequence whose split ranges are the same at B=1..4 (<= S x
# MIN_SPLIT tokens) gets the same bits. (Not batch invariance in general: the ranges change
# with S above that length, the separate merge of B > 4 shapes its tiles by S, and the dense
# layers switch kernels by row count.)
MERGE_UV_CONFIG = (32, 4)
MERGE_UV_LSE_BLOCK = 128


@triton.jit
def _split_len(seq_len, num_splits, BLOCK_N: tl.constexpr, MIN_SPLIT: tl.constexpr):
    n = tl.cdiv(seq_len, num_splits)
    n = tl.cdiv(n, BLOCK_N) * BLOCK_N
    return tl.maximum(n, MIN_SPLIT)


@triton.jit
def _split_range(LENS, b, s, num_splits, BLOCK_N: tl.constexpr, MIN_SPLIT: tl.constexpr):
    """Program (b, split s): (n_act active splits of sequence b, its token range [start, end),
    direct = the sequence has <= 1 active split (then split 0 writes the output itself; length 0:
    zeros), run = this program has work)."""
    seq_len = tl.load(LENS + b)
    split = _split_len(seq_len, num_splits, BLOCK_N, MIN_SPLIT)
    n_act = tl.cdiv(seq_len, split)
    start = s * split
    end = tl.minimum(start + split, seq_len)
    direct = n_act <= 1
    if direct:
        run = s == 0
    else:
        run = s < n_act
    return n_act, start, end, direct, run


@triton.jit
def _merge_if_last(CNT, OPART, LSE, OUT, b, hg, heads, hmask, n_act, stride_pb, stride_ph,
                   stride_ps, stride_lb, stride_lh, stride_ob, stride_oh, R: tl.constexpr,
                   BLOCK_S: tl.constexpr, MC: tl.constexpr):
    """The fused merge (MERGE == 1, module docstring): after this program's partial stores, the
    last arriving split of (b, head group) merges the n_act partials and resets the counter."""
    tl.debug_barrier()  # every warp's partial stores precede the (one-thread, release) atomic
    cnt_ptr = CNT + b * tl.num_programs(0) + hg
    if tl.atomic_add(cnt_ptr, 1, sem="acq_rel") == n_act - 1:
        _merge_fused(OPART + b * stride_pb, LSE + b * stride_lb, OUT + b * stride_ob, heads,
                     hmask, n_act, stride_ph, stride_ps, stride_lh, stride_oh, R, BLOCK_S, MC)
        tl.store(cnt_ptr, 0)  # ready for the next launch / replay


@triton.jit
def _load_tile(KV, bt_row, n0, end, offs_c, offs_p, R: tl.constexpr, DR: tl.constexpr,
               CH: tl.constexpr, NC: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Raw cache rows n0..n0+BLOCK_N (masked at `end`, 0 beyond): (k_pe, c chunks 0..3); chunks
    past NC repeat chunk 0 and are never used."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    nm = (offs_n < end)[:, None]
    page = tl.load(bt_row + offs_n // PAGE, mask=offs_n < end, other=0)
    row = KV + ((page.to(tl.int64) * PAGE + offs_n % PAGE) * (R + DR))[:, None]
    kp = tl.load(row + R + offs_p[None, :], mask=nm, other=0.0)
    c0 = tl.load(row + offs_c[None, :], mask=nm, other=0.0)
    c1 = c0
    c2 = c0
    c3 = c0
    if NC > 1:
        c1 = tl.load(row + CH + offs_c[None, :], mask=nm, other=0.0)
    if NC > 2:
        c2 = tl.load(row + 2 * CH + offs_c[None, :], mask=nm, other=0.0)
        c3 = tl.load(row + 3 * CH + offs_c[None, :], mask=nm, other=0.0)
    return kp, c0, c1, c2, c3


@triton.jit
def _cvt(x, one, cdt: tl.constexpr, F16: tl.constexpr, FP8_PATH: tl.constexpr):
    """Cache tile -> dot dtype. fp8 + cp.async path: cast times a run-time 1.0 (a bare cast lets
    Triton sink it behind the shared-memory load, where the transposed 8-bit operand breaks the
    pipeline; see bench/notes_mla_decode.md). Otherwise a plain cast."""
    if F16 and FP8_PATH == 0:
        return x.to(cdt) * tl.cast(one, cdt)
    return x.to(cdt)


@triton.jit
def _attend(q_ptr, q_pe, hm, kp, c0, c1, c2, c3, nmask, m_i, l_i, acc0, acc1, acc2, acc3,
            qk_scale, one, cdt: tl.constexpr, CH: tl.constexpr, NC: tl.constexpr,
            F16: tl.constexpr, FP8_PATH: tl.constexpr):
    """One tile of online softmax; the converted c chunks serve both QK^T and PV."""
    kp = _cvt(kp, one, cdt, F16, FP8_PATH)
    c0 = _cvt(c0, one, cdt, F16, FP8_PATH)
    qk = tl.dot(q_pe, tl.trans(kp))
    qk = tl.dot(tl.load(q_ptr, mask=hm, other=0.0).to(cdt), tl.trans(c0), qk)
    if NC > 1:
        c1 = _cvt(c1, one, cdt, F16, FP8_PATH)
        qk = tl.dot(tl.load(q_ptr + CH, mask=hm, other=0.0).to(cdt), tl.trans(c1), qk)
    if NC > 2:
        c2 = _cvt(c2, one, cdt, F16, FP8_PATH)
        qk = tl.dot(tl.load(q_ptr + 2 * CH, mask=hm, other=0.0).to(cdt), tl.trans(c2), qk)
        c3 = _cvt(c3, one, cdt, F16, FP8_PATH)
        qk = tl.dot(tl.load(q_ptr + 3 * CH, mask=hm, other=0.0).to(cdt), tl.trans(c3), qk)
    qk = tl.where(nmask[None, :], qk * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    pc = p.to(cdt)
    acc0 = tl.dot(pc, c0, acc0 * alpha[:, None])
    if NC > 1:
        acc1 = tl.dot(pc, c1, acc1 * alpha[:, None])
    if NC > 2:
        acc2 = tl.dot(pc, c2, acc2 * alpha[:, None])
        acc3 = tl.dot(pc, c3, acc3 * alpha[:, None])
    return m_new, l_i, acc0, acc1, acc2, acc3


@triton.jit
def _store_o(dst, acc0, acc1, acc2, acc3, norm, hm, CH: tl.constexpr, NC: tl.constexpr):
    odt = dst.dtype.element_ty
    tl.store(dst, (acc0 * norm[:, None]).to(odt), mask=hm)
    if NC > 1:
        tl.store(dst + CH, (acc1 * norm[:, None]).to(odt), mask=hm)
    if NC > 2:
        tl.store(dst + 2 * CH, (acc2 * norm[:, None]).to(odt), mask=hm)
        tl.store(dst + 3 * CH, (acc3 * norm[:, None]).to(odt), mask=hm)


@triton.jit
def _merge_fused(part_row, lse_row, out_row, heads, hmask, n_act, stride_ph, stride_ps,
                 stride_lh, stride_oh, R: tl.constexpr, BLOCK_S: tl.constexpr, MC: tl.constexpr):
    """out[heads] = sum_s w_s * partial_s (w from the lse values), R / MC column blocks of
    [BLOCK_S, BLOCK_H, MC], unrolled so the loads of all blocks can be in flight together (.cg:
    the partials were written by other CTAs of this launch)."""
    offs_s = tl.arange(0, BLOCK_S)
    m2 = (offs_s < n_act)[:, None] & hmask[None, :]
    lse = tl.load(lse_row + heads[None, :] * stride_lh + offs_s[:, None], mask=m2,
                  other=float("-inf"), cache_modifier=".cg")
    mx = tl.max(lse, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.where(m2, tl.exp2(lse - mx[None, :]), 0.0)
    den = tl.sum(w, 0)
    w3 = (w / tl.where(den > 0, den, 1.0)[None, :])[:, :, None]
    m3 = m2[:, :, None]
    offs_r = tl.arange(0, MC)
    src = (part_row + heads[None, :, None] * stride_ph + offs_s[:, None, None] * stride_ps
           + offs_r[None, None, :])
    dst = out_row + heads[:, None] * stride_oh + offs_r[None, :]
    for j in tl.static_range(R // MC):
        parts = tl.load(src + j * MC, mask=m3, other=0.0, cache_modifier=".cg")
        o = tl.sum(parts * w3, 0)
        tl.store(dst + j * MC, o.to(out_row.dtype.element_ty), mask=hmask[:, None])


# the split count, the workspace strides (multiples of it) and the block-table row stride (an
# eager step's table is as wide as its longest sequence) vary with the batch: no
# per-divisibility variants, or an eager step at a new batch size compiles on a request's path
# (~1 s: bench/RESULTS.md session 9's serving run)
_SPLIT_ARGS = ["num_splits", "stride_pb", "stride_ph", "stride_ps", "stride_lb", "stride_lh"]
_TABLE_ARGS = [*_SPLIT_ARGS, "stride_bt_b"]  # the attention kernel (merges take no table)


@triton.jit(do_not_specialize=_TABLE_ARGS)
def _mla_decode_v3(
    QN, QP, KV, BT, LENS, OPART, LSE, CNT, OUT,
    qk_scale, one, out_scale, num_splits, H,
    stride_qn_b, stride_qn_h, stride_qp_b, stride_qp_h, stride_bt_b,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
    R: tl.constexpr, DR: tl.constexpr, CH: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, MIN_SPLIT: tl.constexpr,
    MERGE: tl.constexpr, F16: tl.constexpr, FP8_PATH: tl.constexpr, BLOCK_S: tl.constexpr,
    MC: tl.constexpr,
):
    NC: tl.constexpr = R // CH
    hg = tl.program_id(0)
    b = tl.program_id(1)
    s = tl.program_id(2)
    n_act, start, end, direct, run = _split_range(LENS, b, s, num_splits, BLOCK_N, MIN_SPLIT)
    if run:
        heads = hg * BLOCK_H + tl.arange(0, BLOCK_H)
        hmask = heads < H
        hm = hmask[:, None]
        offs_c = tl.arange(0, CH)
        offs_p = tl.arange(0, DR)
        cdt: tl.constexpr = tl.float16 if F16 else QN.dtype.element_ty
        q_ptr = QN + b * stride_qn_b + heads[:, None] * stride_qn_h + offs_c[None, :]
        q_pe = tl.load(QP + b * stride_qp_b + heads[:, None] * stride_qp_h + offs_p[None, :],
                       mask=hm, other=0.0).to(cdt)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc0 = tl.zeros([BLOCK_H, CH], tl.float32)
        acc1 = acc0
        acc2 = acc0
        acc3 = acc0
        bt_row = BT + b * stride_bt_b
        if F16 and FP8_PATH == 1:
            # register double buffer: the next tile's loads are in flight during this tile's math
            kp_n, c0_n, c1_n, c2_n, c3_n = _load_tile(KV, bt_row, start, end, offs_c, offs_p,
                                                      R, DR, CH, NC, PAGE, BLOCK_N)
            for n0 in range(start, end, BLOCK_N):
                kp, c0, c1, c2, c3 = kp_n, c0_n, c1_n, c2_n, c3_n
                kp_n, c0_n, c1_n, c2_n, c3_n = _load_tile(KV, bt_row, n0 + BLOCK_N, end, offs_c,
                                                          offs_p, R, DR, CH, NC, PAGE, BLOCK_N)
                nmask = n0 + tl.arange(0, BLOCK_N) < end
                m_i, l_i, acc0, acc1, acc2, acc3 = _attend(
                    q_ptr, q_pe, hm, kp, c0, c1, c2, c3, nmask, m_i, l_i, acc0, acc1, acc2, acc3,
                    qk_scale, one, cdt, CH, NC, F16, FP8_PATH)
        else:
            for n0 in range(start, end, BLOCK_N):
                kp, c0, c1, c2, c3 = _load_tile(KV, bt_row, n0, end, offs_c, offs_p,
                                                R, DR, CH, NC, PAGE, BLOCK_N)
                nmask = n0 + tl.arange(0, BLOCK_N) < end
                m_i, l_i, acc0, acc1, acc2, acc3 = _attend(
                    q_ptr, q_pe, hm, kp, c0, c1, c2, c3, nmask, m_i, l_i, acc0, acc1, acc2, acc3,
                    qk_scale, one, cdt, CH, NC, F16, FP8_PATH)
        if direct:
            norm = out_scale / tl.where(l_i > 0, l_i, 1.0)
            _store_o(OUT + b * stride_ob + heads[:, None] * stride_oh + offs_c[None, :],
                     acc0, acc1, acc2, acc3, norm, hm, CH, NC)
        else:
            tl.store(LSE + b * stride_lb + heads * stride_lh + s, m_i + tl.log2(l_i), mask=hmask)
            _store_o(OPART + b * stride_pb + heads[:, None] * stride_ph + s * stride_ps
                     + offs_c[None, :], acc0, acc1, acc2, acc3, out_scale / l_i, hm, CH, NC)
            if MERGE:
                _merge_if_last(CNT, OPART, LSE, OUT, b, hg, heads, hmask, n_act, stride_pb,
                               stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
                               R, BLOCK_S, MC)


@triton.jit(do_not_specialize=_SPLIT_ARGS)
def _mla_merge_v3(
    OPART, LSE, LENS, OUT, num_splits,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
    BLOCK_N: tl.constexpr, MIN_SPLIT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """MERGE == 0: grid (H, B, R / BLOCK_R); sequences with one active split were written by the
    attention kernel."""
    h = tl.program_id(0)
    b = tl.program_id(1)
    rc = tl.program_id(2)
    # lse and partials are issued with the length, masked by the launch's split count (an
    # inactive split's stale values are dropped by where(), never multiplied)
    seq_len = tl.load(LENS + b)
    offs_s = tl.arange(0, BLOCK_S)
    offs_r = rc * BLOCK_R + tl.arange(0, BLOCK_R)
    launched = offs_s < num_splits
    lse_all = tl.load(LSE + b * stride_lb + h * stride_lh + offs_s, mask=launched,
                      other=float("-inf"))
    parts = tl.load(OPART + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps
                    + offs_r[None, :], mask=launched[:, None], other=0.0)
    split = _split_len(seq_len, num_splits, BLOCK_N, MIN_SPLIT)
    n_act = tl.cdiv(seq_len, split)
    if n_act > 1:
        smask = offs_s < n_act
        lse = tl.where(smask, lse_all, float("-inf"))
        m = tl.max(lse, 0)
        w = tl.where(smask, tl.exp2(lse - m), 0.0)
        w = w / tl.sum(w, 0)
        o = tl.sum(tl.where(smask[:, None], parts * w[:, None], 0.0), 0)
        tl.store(OUT + b * stride_ob + h * stride_oh + offs_r, o.to(OUT.dtype.element_ty))


@triton.jit
def _mla_merge_uv(
    OPART, LSE, LENS, OLAT, WUV, Y, num_splits,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
    stride_wh, stride_wv, stride_yb, stride_yh, V,
    R: tl.constexpr, BLOCK_V: tl.constexpr, VC: tl.constexpr, SC: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, MIN_SPLIT: tl.constexpr, SPLIT: tl.constexpr,
    MIN_PARTS: tl.constexpr,
):
    """The merge with W_UV folded in: grid (B, H, cdiv(V, BLOCK_V)). Program (b, h, vb) forms
    o_lat[b, h] [R] once: the lse-weighted sum of the active splits' partials, walked SC splits
    at a time over the whole R (one L2 round trip per SC splits: one at short contexts), or the
    attention kernel's direct output in OLAT when SPLIT is 0 or the sequence has fewer than
    MIN_PARTS active splits (2 after v3 / v5, which write those directly; 0 after v1, which
    writes partials for every sequence and none for an empty one: o_lat = 0 as v1's merge
    makes it); rounded to OLAT's dtype as the merge kernel stores it. Then
    Y[b, h, v] = sum_r o_lat[r] * W_UV[h, v, r] for its BLOCK_V columns, VC rows of W_UV at a
    time (fp32 sums, Y's dtype)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    v0 = tl.program_id(2) * BLOCK_V
    offs_r = tl.arange(0, R)
    odt = OLAT.dtype.element_ty
    o_direct = OLAT + b * stride_ob + h * stride_oh + offs_r
    w_rows = WUV + h * stride_wh + offs_r[None, :]
    # the first W_UV rows are requested before the merge so their (DRAM) latency overlaps it
    # (H200, attention + merge_uv, two alternated runs: B=1 11.26 / 11.22 -> 10.86 / 10.98 µs,
    # B=2 11.18 / 11.25 -> 10.78 / 11.17, B=4 11.85 / 11.84 -> 12.02 / 12.05; RESULTS s16)
    offs_v0 = v0 + tl.arange(0, VC)
    w_first = tl.load(w_rows + offs_v0[:, None] * stride_wv, mask=(offs_v0 < V)[:, None],
                      other=0.0)
    if SPLIT:
        # every load that does not need the active split count is issued with the length's: the
        # first SC splits' lse and partials (masked by the launch's split count; an inactive
        # split's stale values are dropped by where(), never multiplied) and the direct o_lat
        lse_row = LSE + b * stride_lb + h * stride_lh
        part_row = OPART + b * stride_pb + h * stride_ph
        seq_len = tl.load(LENS + b)
        offs_s = tl.arange(0, BLOCK_S)
        lse_all = tl.load(lse_row + offs_s, mask=offs_s < num_splits, other=float("-inf"))
        offs0 = tl.arange(0, SC)
        lse0 = tl.load(lse_row + offs0, mask=offs0 < num_splits, other=float("-inf"))
        parts0 = tl.load(part_row + offs0[:, None] * stride_ps + offs_r[None, :],
                         mask=(offs0 < num_splits)[:, None], other=0.0)
        o_dir = tl.load(o_direct).to(tl.float32)
        n_act = tl.cdiv(seq_len, _split_len(seq_len, num_splits, BLOCK_N, MIN_SPLIT))
        if n_act >= MIN_PARTS:
            lse = tl.where(offs_s < n_act, lse_all, float("-inf"))
            mx = tl.max(lse, 0)
            mx = tl.where(mx == float("-inf"), 0.0, mx)
            den = tl.sum(tl.exp2(lse - mx), 0)
            den = tl.where(den > 0, den, 1.0)
            sm0 = offs0 < n_act
            wt0 = tl.where(sm0, tl.exp2(lse0 - mx) / den, 0.0)
            acc = tl.sum(tl.where(sm0[:, None], parts0 * wt0[:, None], 0.0), 0)
            for s0 in range(SC, n_act, SC):
                offs = s0 + tl.arange(0, SC)
                sm = offs < n_act
                wt = tl.exp2(tl.load(lse_row + offs, mask=sm, other=float("-inf")) - mx) / den
                parts = tl.load(part_row + offs[:, None] * stride_ps + offs_r[None, :],
                                mask=sm[:, None], other=0.0)
                acc += tl.sum(parts * wt[:, None], 0)
            o = acc.to(odt).to(tl.float32)
        else:
            o = o_dir
    else:
        o = tl.load(o_direct).to(tl.float32)
    for vc in tl.static_range(BLOCK_V // VC):
        offs_v = v0 + vc * VC + tl.arange(0, VC)
        vmask = offs_v < V
        if vc == 0:
            w = w_first
        else:
            w = tl.load(w_rows + offs_v[:, None] * stride_wv, mask=vmask[:, None], other=0.0)
        y = tl.sum(w.to(tl.float32) * o[None, :], 1)
        tl.store(Y + b * stride_yb + h * stride_yh + offs_v, y.to(Y.dtype.element_ty),
                 mask=vmask)


def launch_merge_uv(opart, lse, seq_lens, out, S, strides, block_n, min_split, w_uv, y,
                    v1=False, block_v=None, config=None):
    """After an attention launch with the merge deferred: y [B, H, V] = merge(o_lat) @ W_UV^T
    per head (w_uv [H, V, R], last dim contiguous; y's last dim contiguous), one launch
    (_mla_merge_uv). `out` [B, H, R] holds the direct sequences' o_lat (and is left as the
    attention kernel wrote it: the merged o_lat is never stored). v1: after mla_decode's v1
    (partials for every sequence when S > 1), else after v3 / v5. block_v: W_UV rows per
    program (default: ~128 programs in all, each (b, h) merge done by V / block_v programs).
    config (splits, warps): each program walks the partials `splits` at a time with `warps`
    warps (default MERGE_UV_CONFIG)."""
    B, H, R = out.shape
    V = w_uv.shape[1]
    assert w_uv.shape == (H, V, R) and w_uv.stride(-1) == 1 and y.stride(-1) == 1
    assert y.shape == (B, H, V) and R & (R - 1) == 0
    sc, warps = config or MERGE_UV_CONFIG  # [SC, R] fp32 partials per step
    vc = min(16, triton.next_power_of_2(V))
    if block_v is None:
        per_head = max(1, min(triton.cdiv(V, vc), 128 // (B * H)))
        block_v = triton.next_power_of_2(triton.cdiv(V, per_head))
    block_v = max(vc, block_v)
    _mla_merge_uv[(B, H, triton.cdiv(V, block_v))](
        opart, lse, seq_lens, out, w_uv, y, S, *strides, out.stride(0), out.stride(1),
        w_uv.stride(0), w_uv.stride(1), y.stride(0), y.stride(1), V,
        R=R, BLOCK_V=block_v, VC=vc, SC=sc,
        BLOCK_S=max(MERGE_UV_LSE_BLOCK, triton.next_power_of_2(S)),
        BLOCK_N=block_n, MIN_SPLIT=min_split, SPLIT=S > 1, MIN_PARTS=0 if v1 else 2,
        num_warps=warps,
    )
    return y


def alloc_v3_workspace(batch: int, num_heads: int, kv_lora_rank: int, num_splits: int,
                       block_h: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(opart [B, H, S, R] fp32, lse [B, H, S] fp32, counters [B * head_groups] int32 zeros)."""
    return (torch.empty(batch, num_heads, num_splits, kv_lora_rank, dtype=torch.float32,
                        device=device),
            torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=device),
            torch.zeros(batch * triton.cdiv(num_heads, block_h), dtype=torch.int32,
                        device=device))


def split_workspace(out, seq_lens, workspace, B, H, S, R, block_h):
    """(opart, lse, counters, their 5 strides) for a launch over S splits: with S == 1 none is
    touched (every sequence is direct; placeholders of the right kinds)."""
    if S == 1:
        return out, out, seq_lens, (0, 0, 0, 0, 0)
    opart, lse, cnt = workspace
    assert opart.shape == (B, H, S, R) and lse.shape == (B, H, S)
    assert cnt.numel() >= B * triton.cdiv(H, block_h) and cnt.dtype == torch.int32
    return opart, lse, cnt, (opart.stride(0), opart.stride(1), opart.stride(2), lse.stride(0),
                             lse.stride(1))


def fused_merge_tiles(S: int, merge: bool, R: int, block_h: int) -> tuple[int, int]:
    """(BLOCK_S, MC) of the fused merge's [BLOCK_S, block_h, MC] tile, ~2K fp32 values; BLOCK_S
    4 or >= 16 (fewer compiles); (1, .) when not merging in-kernel."""
    bs = (4 if S <= 4 else max(16, triton.next_power_of_2(S))) if merge else 1
    return bs, max(16, min(R, 2048 // (bs * block_h)))


def launch_merge(opart, lse, seq_lens, out, S, strides, block_n, min_split):
    """The separate merge kernel (MERGE == 0) over S > 1 splits of a split-per-sequence launch."""
    R = out.shape[-1]
    block_s = triton.next_power_of_2(S)
    block_r = min(R, max(16, 4096 // block_s))
    _mla_merge_v3[(out.shape[1], out.shape[0], R // block_r)](
        opart, lse, seq_lens, out, S, *strides, out.stride(0), out.stride(1),
        BLOCK_N=block_n, MIN_SPLIT=min_split, BLOCK_S=block_s, BLOCK_R=block_r, num_warps=4,
    )


def launch_v3(q_nope, q_pe, kv_cache, block_tables, seq_lens, out, qk_scale, out_scale,
              num_splits, workspace, *, f16, fp8_path, merge, block_h, block_n, warps, stages,
              chunk, min_split, maxnreg=None, defer_merge=False):
    """Launch the v3 kernel(s); scales already folded by the caller (see the module docstring).
    maxnreg: cap on registers per thread for the attention kernel (NVIDIA only; None = none).
    defer_merge: no merge at all (the caller launches launch_merge_uv next)."""
    B, H, R = q_nope.shape
    DR = q_pe.shape[-1]
    page = kv_cache.shape[1]
    S = num_splits
    opart, lse, cnt, strides = split_workspace(out, seq_lens, workspace, B, H, S, R, block_h)
    merge = bool(merge) and S > 1 and not defer_merge
    bs, mc = fused_merge_tiles(S, merge, R, block_h)
    if f16 and fp8_path == 1:
        stages = 1  # the register double buffer replaces the cp.async pipeline
    _mla_decode_v3[(triton.cdiv(H, block_h), B, S)](
        q_nope, q_pe, kv_cache, block_tables, seq_lens, opart, lse, cnt, out,
        qk_scale, 1.0, out_scale, S, H,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1), block_tables.stride(0),
        *strides, out.stride(0), out.stride(1),
        R=R, DR=DR, CH=chunk, PAGE=page, BLOCK_H=block_h, BLOCK_N=block_n, MIN_SPLIT=min_split,
        MERGE=int(merge), F16=f16, FP8_PATH=fp8_path, BLOCK_S=bs, MC=mc,
        num_warps=warps, num_stages=stages,
        **({"maxnreg": maxnreg} if maxnreg and not INTERPRET else {}),
    )
    if S > 1 and not merge and not defer_merge:
        launch_merge(opart, lse, seq_lens, out, S, strides, block_n, min_split)
    return out
