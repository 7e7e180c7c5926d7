"""Paged MLA decode measurement ladder (bench/mla_decode_ladder.py, bench/notes_mla_decode_ladder.md).

Not used by the model. Every rung is a split-KV decode kernel with v1's structure (grid
(head_groups, B, S); program (g, b, s) walks tokens [s * split, min((s + 1) * split, len)) of
sequence b through its block table in BLOCK_N-row tiles, split = v1's _split_len) that adds ONE
piece of the real work to the previous rung, so the µs each piece costs can be read off a table:

  level 0 (R0) read       the tiles through the block table as int32 WORDS (the cache viewed as
                          int32: same rows, same bytes), integer sum -> val int32 [G, B, S]
  level 1 (R1) convert    + tiles in the cache dtype converted to the dot dtype (fp8 -> fp16; a
                          16-bit cache: no-op), chunk sum in that dtype, fp32 accumulation
                          -> val fp32 [G, B, S] (sum of the converted values)
  level 2 (R2) QK^T       + the score dots against q (BLOCK_H = 16 head rows, padded as the real
                          kernel: 8 heads use half the MMA tile), R latent + DR rope dims
                          -> val fp32 [G, B, S] = sum of valid scores x qk_scale (log2 units)
  level 3 (R3) softmax    + online softmax (running max / sum, exp2)
                          -> val fp32 [G, B, S] = sum over the group's heads of lse (base 2)
  level 4 (R4) PV         + p @ c accumulated, partial o / lse written: the real split kernel
                          (v3's _attend on the tiles) -> opart fp32 [B, H, S, R], lse [B, H, S]
  level 5 (R5)            R4 + v1's merge kernel (_mla_decode_stage2): the whole decode
                          -> out [B, H, R] in q's dtype
(G = cdiv(H, BLOCK_H) head groups: each group's programs read the tiles again, as the real one.)
Programs with an empty range write nothing (val / opart / lse slots stay as they were).

Tile paths (`path`), as in the real kernels:
  "v1"      v1's loop (loads pipelined by num_stages: cp.async where Triton pipelines them) and
            v1's fp8 dequant (x.fp32 * k_scale -> fp16)
  "regs"    v3's register double buffer (the next tile's loads issued before this tile's math,
            num_stages forced to 1) and v3's plain fp8 -> fp16 cast (k_scale folded into the
            score / output scales)
  "cpasync" v1's loop with v3's cast x.fp16 * 1.0 (run-time 1.0: keeps the cast in registers)
  "f8"      no conversion at all: fp8 MMAs on the raw cache tiles (v1's loop). q is scaled per
            head (max |q| -> 224, inside e4m3fn's 448 and e4m3fnuz's 240) and split once per
            program into q1 = fp8(q) + q2 = fp8(q - q1) (two fp8 dots per chunk: ~2^-8 relative
            error, about bf16's); p likewise p1 + p2 for PV. "f8p1": p1 only (one PV dot per
            chunk, ~2^-4 per weight); "f8qk": fp8 QK^T, PV on the tile converted to fp16
            (cpasync's cast); "f8r": "f8" on the regs loop (register double buffer).
16-bit caches run every path's loop with no conversion (the real kernels: v1's "v1" path).
The rungs call the real kernels' jit helpers (mla_decode._load_tile / _split_len /
_mla_decode_stage2, mla_decode_v3._cvt / _attend), so they run the same instructions.

Inputs as kernels/mla_decode.mla_decode: q_nope [B, H, R], q_pe [B, H, DR] (last dim
contiguous), kv_cache [num_blocks, PAGE, R + DR] contiguous (fp8 of any e4m3 flavour: detected
from the tensor, 1-byte float; or a 16/32-bit float), block_tables [B, W] int32, seq_lens [B]
int32. R, DR powers of two, R / chunk in (1, 2, 4); level 0 needs chunk and DR bytes % 4 == 0.
ladder_reference() gives each level's float64/float32 torch result (R4 / R5 via
mla_decode.mla_decode_ref) and the mask of the (b, s) programs that ran.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .mla_decode import (
    _load_tile,
    _mla_decode_stage2,
    _split_len,
    mla_decode_ref,
    split_len_host,
)
from .mla_decode_v3 import _attend, _cvt

__all__ = ["LEVELS", "PATHS", "is_fp8", "ladder_launch", "ladder_reference", "split_bounds"]

LEVELS = {0: "read", 1: "convert", 2: "qk", 3: "softmax", 4: "pv", 5: "merge"}
# path -> (LOOP, CVT, F8DOT); F8DOT: 0 fp16/bf16 dots on converted tiles, 1 fp8 QK^T (q split)
# + fp8 PV with p1 only, 2 fp8 QK^T + fp8 PV (p split), 3 fp8 QK^T + PV on the converted tile
PATHS = {"v1": (0, 0, 0), "regs": (1, 1, 0), "cpasync": (0, 2, 0), "f8": (0, 1, 2),
         "f8p1": (0, 1, 1), "f8qk": (0, 2, 3), "f8r": (1, 1, 2)}
_Q8_MAX = 224.0  # per-head |q| maximum after scaling: fits e4m3fn (448) and e4m3fnuz (240)
_LOG2E = 1.4426950408889634


def is_fp8(dtype: torch.dtype) -> bool:
    """1-byte float cache (e4m3fn, e4m3fnuz, ...): taken from the tensor, not a fixed dtype."""
    return dtype.is_floating_point and torch.empty(0, dtype=dtype).element_size() == 1


@triton.jit
def _conv(x, k_scale, one, cdt: tl.constexpr, F16: tl.constexpr, CVT: tl.constexpr):
    """Cache tile -> dot dtype: CVT 0 = v1 (fp8: fp32 x k_scale -> fp16), 1 = v3 regs (plain
    cast), 2 = v3 cpasync (cast x run-time 1.0); 16-bit caches: a plain cast (no-op)."""
    if F16 and CVT == 0:
        return (x.to(tl.float32) * k_scale).to(cdt)
    if CVT == 2:
        return _cvt(x, one, cdt, F16, 0)
    return _cvt(x, one, cdt, F16, 1)


@triton.jit
def _split8(x, fdt: tl.constexpr):
    """fp32 x -> (x1, x2) in fp8 with x ~ x1 + x2 (x2 = the rounding residual of x1)."""
    x1 = x.to(fdt)
    return x1, (x - x1.to(tl.float32)).to(fdt)


@triton.jit
def _q_split(QP, q_ptr, qp_off, hm, CH: tl.constexpr, NC: tl.constexpr, fdt: tl.constexpr):
    """q of one head group scaled to max |q| = _Q8_MAX per head and split into fp8 pairs, once
    per program: (qs [BLOCK_H] fp32 = the scale to multiply scores by, pe1, pe2, c0_1, c0_2, ...,
    c3_1, c3_2); chunks past NC repeat chunk 0 and are never used."""
    qpe = tl.load(QP + qp_off, mask=hm, other=0.0).to(tl.float32)
    q0 = tl.load(q_ptr, mask=hm, other=0.0).to(tl.float32)
    q1 = q0
    q2 = q0
    q3 = q0
    amax = tl.maximum(tl.max(tl.abs(qpe), 1), tl.max(tl.abs(q0), 1))
    if NC > 1:
        q1 = tl.load(q_ptr + CH, mask=hm, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(q1), 1))
    if NC > 2:
        q2 = tl.load(q_ptr + 2 * CH, mask=hm, other=0.0).to(tl.float32)
        q3 = tl.load(q_ptr + 3 * CH, mask=hm, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.maximum(tl.max(tl.abs(q2), 1), tl.max(tl.abs(q3), 1)))
    qs = tl.where(amax > 0, amax / 224.0, 1.0)
    inv = (1.0 / qs)[:, None]
    pe1, pe2 = _split8(qpe * inv, fdt)
    a1, a2 = _split8(q0 * inv, fdt)
    b1, b2 = _split8(q1 * inv, fdt)
    c1, c2 = _split8(q2 * inv, fdt)
    d1, d2 = _split8(q3 * inv, fdt)
    return qs, pe1, pe2, a1, a2, b1, b2, c1, c2, d1, d2


@triton.jit
def _qk_f8(pe1, pe2, a1, a2, b1, b2, c1, c2, d1, d2, kp, t0, t1, t2, t3, NC: tl.constexpr):
    """Unscaled scores [BLOCK_H, BLOCK_N] fp32 from raw fp8 tiles: sum over chunks of
    (q1 + q2) @ tile^T, two fp8 MMAs per chunk into one fp32 accumulator."""
    kt = tl.trans(kp)
    qk = tl.dot(pe1, kt)
    qk = tl.dot(pe2, kt, qk)
    kt = tl.trans(t0)
    qk = tl.dot(a1, kt, qk)
    qk = tl.dot(a2, kt, qk)
    if NC > 1:
        kt = tl.trans(t1)
        qk = tl.dot(b1, kt, qk)
        qk = tl.dot(b2, kt, qk)
    if NC > 2:
        kt = tl.trans(t2)
        qk = tl.dot(c1, kt, qk)
        qk = tl.dot(c2, kt, qk)
        kt = tl.trans(t3)
        qk = tl.dot(d1, kt, qk)
        qk = tl.dot(d2, kt, qk)
    return qk


@triton.jit
def _softmax_step(qk, nmask, m_i, l_i):
    """One online-softmax step on scaled scores (log2 units): (p, alpha, m_new, l_new)."""
    qk = tl.where(nmask[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _pv_f8(p, t, acc, alpha, one, F8DOT: tl.constexpr):
    """acc * alpha + p @ t for one chunk: F8DOT 1 fp8(p) @ raw tile; 2 (p1 + p2) @ raw tile;
    3 fp16(p) @ fp16(tile) (cpasync's cast)."""
    acc = acc * alpha[:, None]
    if F8DOT == 3:
        return tl.dot(p.to(tl.float16), _cvt(t, one, tl.float16, True, 0), acc)
    fdt: tl.constexpr = t.dtype
    p1 = p.to(fdt)
    acc = tl.dot(p1, t, acc)
    if F8DOT == 2:
        acc = tl.dot((p - p1.to(tl.float32)).to(fdt), t, acc)
    return acc


@triton.jit
def _ladder_kernel(
    QN, QP, KV, BT, LENS, VAL, OPART, LSE,
    qk_scale, k_scale, one, out_scale, num_splits, H,
    stride_qn_b, stride_qn_h, stride_qp_b, stride_qp_h, stride_bt_b,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
    R: tl.constexpr, DR: tl.constexpr, CH: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, MIN_SPLIT: tl.constexpr,
    LEVEL: tl.constexpr, LOOP: tl.constexpr, CVT: tl.constexpr, F16: tl.constexpr,
    AF16: tl.constexpr, APATH: tl.constexpr, F8DOT: tl.constexpr,
):
    """Levels 0-4 of the module docstring. LEVEL 0: KV is the int32 view of the cache and R, DR,
    CH are counted in int32 words. AF16 / APATH: v3 _attend's F16 / FP8_PATH (it converts raw
    tiles itself; for v1's dequant (CVT 0) the tiles are converted first and AF16 is False).
    F8DOT > 0 (fp8 caches, LEVEL >= 2): the fp8-MMA paths of PATHS, q split once up front."""
    NC: tl.constexpr = R // CH
    hg = tl.program_id(0)
    b = tl.program_id(1)
    s = tl.program_id(2)
    seq_len = tl.load(LENS + b)
    split = _split_len(seq_len, num_splits, BLOCK_N, MIN_SPLIT)
    start = s * split
    end = tl.minimum(start + split, seq_len)
    if start < end:
        heads = hg * BLOCK_H + tl.arange(0, BLOCK_H)
        hmask = heads < H
        hm = hmask[:, None]
        offs_c = tl.arange(0, CH)
        offs_p = tl.arange(0, DR)
        cdt: tl.constexpr = tl.float16 if F16 else QN.dtype.element_ty
        q_ptr = QN + b * stride_qn_b + heads[:, None] * stride_qn_h + offs_c[None, :]
        vidx = (hg * tl.num_programs(1) + b) * num_splits + s
        qp_off = b * stride_qp_b + heads[:, None] * stride_qp_h + offs_p[None, :]
        if LEVEL >= 2 and F8DOT == 0:
            q_pe = tl.load(QP + qp_off, mask=hm, other=0.0).to(cdt)
        if LEVEL >= 2 and F8DOT > 0:
            qs, pe1, pe2, qa1, qa2, qb1, qb2, qc1, qc2, qd1, qd2 = _q_split(
                QP, q_ptr, qp_off, hm, CH, NC, KV.dtype.element_ty)
            qsc = qs * qk_scale
        if LEVEL == 0:
            acc = tl.zeros([BLOCK_N, CH], tl.int32)
            accp = tl.zeros([BLOCK_N, DR], tl.int32)
        if LEVEL == 1:
            acc = tl.zeros([BLOCK_N, CH], tl.float32)
            accp = tl.zeros([BLOCK_N, DR], tl.float32)
        if LEVEL == 2:
            sacc = tl.zeros([BLOCK_H, BLOCK_N], tl.float32)
        if LEVEL >= 3:
            m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_H], tl.float32)
        if LEVEL == 4:
            acc0 = tl.zeros([BLOCK_H, CH], tl.float32)
            acc1 = acc0
            acc2 = acc0
            acc3 = acc0
        bt_row = BT + b * stride_bt_b
        if LOOP == 1:  # v3 "regs": register double buffer
            kp_n, c0_n, c1_n, c2_n, c3_n = _load_tile(KV, bt_row, start, end, offs_c, offs_p,
                                                      R, DR, CH, NC, PAGE, BLOCK_N)
        for n0 in range(start, end, BLOCK_N):
            if LOOP == 1:
                kp, c0, c1, c2, c3 = kp_n, c0_n, c1_n, c2_n, c3_n
                kp_n, c0_n, c1_n, c2_n, c3_n = _load_tile(KV, bt_row, n0 + BLOCK_N, end, offs_c,
                                                          offs_p, R, DR, CH, NC, PAGE, BLOCK_N)
            else:
                kp, c0, c1, c2, c3 = _load_tile(KV, bt_row, n0, end, offs_c, offs_p,
                                                R, DR, CH, NC, PAGE, BLOCK_N)
            nmask = n0 + tl.arange(0, BLOCK_N) < end
            if LEVEL == 0:
                t = c0
                if NC > 1:
                    t += c1
                if NC > 2:
                    t += c2 + c3
                acc += t
                accp += kp
            elif F8DOT > 0 and LEVEL >= 2:  # levels 2-4 on the fp8-MMA paths
                qk = _qk_f8(pe1, pe2, qa1, qa2, qb1, qb2, qc1, qc2, qd1, qd2, kp, c0, c1, c2, c3,
                            NC) * qsc[:, None]
                if LEVEL == 2:
                    sacc += tl.where(nmask[None, :], qk, 0.0)
                else:
                    p, alpha, m_i, l_i = _softmax_step(qk, nmask, m_i, l_i)
                    if LEVEL == 4:
                        acc0 = _pv_f8(p, c0, acc0, alpha, one, F8DOT)
                        if NC > 1:
                            acc1 = _pv_f8(p, c1, acc1, alpha, one, F8DOT)
                        if NC > 2:
                            acc2 = _pv_f8(p, c2, acc2, alpha, one, F8DOT)
                            acc3 = _pv_f8(p, c3, acc3, alpha, one, F8DOT)
            elif LEVEL == 4:
                if CVT == 0:
                    kp = _conv(kp, k_scale, one, cdt, F16, CVT)
                    c0 = _conv(c0, k_scale, one, cdt, F16, CVT)
                    c1 = _conv(c1, k_scale, one, cdt, F16, CVT)
                    c2 = _conv(c2, k_scale, one, cdt, F16, CVT)
                    c3 = _conv(c3, k_scale, one, cdt, F16, CVT)
                m_i, l_i, acc0, acc1, acc2, acc3 = _attend(
                    q_ptr, q_pe, hm, kp, c0, c1, c2, c3, nmask, m_i, l_i, acc0, acc1, acc2, acc3,
                    qk_scale, one, cdt, CH, NC, AF16, APATH)
            else:
                kp = _conv(kp, k_scale, one, cdt, F16, CVT)
                c0 = _conv(c0, k_scale, one, cdt, F16, CVT)
                if NC > 1:
                    c1 = _conv(c1, k_scale, one, cdt, F16, CVT)
                if NC > 2:
                    c2 = _conv(c2, k_scale, one, cdt, F16, CVT)
                    c3 = _conv(c3, k_scale, one, cdt, F16, CVT)
                if LEVEL == 1:
                    t = c0
                    if NC > 1:
                        t += c1
                    if NC > 2:
                        t += c2 + c3
                    acc += t.to(tl.float32)
                    accp += kp.to(tl.float32)
                else:  # the first half of v3's _attend, line by line
                    qk = tl.dot(q_pe, tl.trans(kp))
                    qk = tl.dot(tl.load(q_ptr, mask=hm, other=0.0).to(cdt), tl.trans(c0), qk)
                    if NC > 1:
                        qk = tl.dot(tl.load(q_ptr + CH, mask=hm, other=0.0).to(cdt),
                                    tl.trans(c1), qk)
                    if NC > 2:
                        qk = tl.dot(tl.load(q_ptr + 2 * CH, mask=hm, other=0.0).to(cdt),
                                    tl.trans(c2), qk)
                        qk = tl.dot(tl.load(q_ptr + 3 * CH, mask=hm, other=0.0).to(cdt),
                                    tl.trans(c3), qk)
                    if LEVEL == 2:
                        sacc += tl.where(nmask[None, :], qk * qk_scale, 0.0)
                    else:
                        p, alpha, m_i, l_i = _softmax_step(qk * qk_scale, nmask, m_i, l_i)
        if LEVEL <= 1:
            tl.store(VAL + vidx, tl.sum(tl.sum(acc, 1), 0) + tl.sum(tl.sum(accp, 1), 0))
        if LEVEL == 2:
            tl.store(VAL + vidx, tl.sum(tl.sum(sacc, 1), 0))
        if LEVEL == 3:
            tl.store(VAL + vidx, tl.sum(tl.where(hmask, m_i + tl.log2(l_i), 0.0), 0))
        if LEVEL == 4:  # v3's non-direct store (o normalized, lse base 2)
            tl.store(LSE + b * stride_lb + heads * stride_lh + s, m_i + tl.log2(l_i), mask=hmask)
            norm = out_scale / l_i
            dst = OPART + b * stride_pb + heads[:, None] * stride_ph + s * stride_ps \
                + offs_c[None, :]
            tl.store(dst, acc0 * norm[:, None], mask=hm)
            if NC > 1:
                tl.store(dst + CH, acc1 * norm[:, None], mask=hm)
            if NC > 2:
                tl.store(dst + 2 * CH, acc2 * norm[:, None], mask=hm)
                tl.store(dst + 3 * CH, acc3 * norm[:, None], mask=hm)


def _scales(fp8: bool, cvt: int, scale: float, k_scale: float) -> tuple[float, float, float]:
    """(qk_scale, k_scale applied to the tile, out_scale) as the real kernels: v1's fp8 dequant
    scales the tile; otherwise k_scale is folded into the scores and the output."""
    if fp8 and cvt == 0:
        return scale * _LOG2E, k_scale, 1.0
    return scale * _LOG2E * k_scale, 1.0, k_scale


def ladder_launch(level: int, q_nope, q_pe, kv_cache, block_tables, seq_lens, scale: float,
                  k_scale: float, num_splits: int, *, path: str = "v1",
                  config: tuple[int, int, int] = (64, 8, 2), val=None, workspace=None, out=None,
                  chunk: int = 128, block_h: int = 16, min_split: int = 64):
    """Launch rung `level` (0-5, module docstring). config = (BLOCK_N, num_warps, num_stages)
    ("regs": stages 1). Outputs (allocated when None; graph capture: pass them):
    level 0-3 -> val [G, B, S] (int32 at level 0, else fp32); level 4 -> workspace
    (opart [B, H, S, R] fp32, lse [B, H, S] fp32); level 5 -> out [B, H, R] (q's dtype), using
    workspace as scratch. Returns that output."""
    assert level in LEVELS and path in PATHS, (level, path)
    loop, cvt, f8dot = PATHS[path]
    B, H, R = q_nope.shape
    DR = q_pe.shape[-1]
    _, page, D = kv_cache.shape
    assert D == R + DR and kv_cache.is_contiguous()
    assert q_nope.stride(-1) == 1 and q_pe.stride(-1) == 1
    assert block_tables.dtype == torch.int32 and seq_lens.dtype == torch.int32
    chunk = min(chunk, R)
    assert R // chunk in (1, 2, 4)
    fp8 = is_fp8(kv_cache.dtype)
    assert fp8 or not f8dot, f"path {path!r} needs an fp8 cache"
    block_n, warps, stages = config
    if loop == 1:
        stages = 1  # the register double buffer replaces the cp.async pipeline
    G, S, dev = triton.cdiv(H, block_h), num_splits, q_nope.device
    qk_scale, tile_scale, out_scale = _scales(fp8, cvt, float(scale), float(k_scale))
    kv, r_, dr_, ch_ = kv_cache, R, DR, chunk
    if level == 0:  # the same rows as int32 words
        elem = kv_cache.element_size()
        assert (chunk * elem) % 4 == 0 and (DR * elem) % 4 == 0
        kv = kv_cache.view(torch.int32)
        r_, dr_, ch_ = R * elem // 4, DR * elem // 4, chunk * elem // 4
    if level <= 3:
        if val is None:
            val = torch.empty(G, B, S, dtype=torch.int32 if level == 0 else torch.float32,
                              device=dev)
        opart = lse = val
        pstr = (0, 0, 0, 0, 0)
    else:
        if workspace is None:
            workspace = (torch.empty(B, H, S, R, dtype=torch.float32, device=dev),
                         torch.empty(B, H, S, dtype=torch.float32, device=dev))
        opart, lse = workspace
        assert opart.shape == (B, H, S, R) and lse.shape == (B, H, S)
        pstr = (opart.stride(0), opart.stride(1), opart.stride(2), lse.stride(0), lse.stride(1))
        val = opart
    _ladder_kernel[(G, B, S)](
        q_nope, q_pe, kv, block_tables, seq_lens, val, opart, lse,
        qk_scale, tile_scale, 1.0, out_scale, S, H,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1),
        block_tables.stride(0), *pstr,
        R=r_, DR=dr_, CH=ch_, PAGE=page, BLOCK_H=block_h, BLOCK_N=block_n, MIN_SPLIT=min_split,
        LEVEL=min(level, 4), LOOP=loop, CVT=cvt, F16=fp8, AF16=fp8 and cvt != 0,
        APATH=1 if cvt == 1 else 0, F8DOT=f8dot if level >= 2 else 0, num_warps=warps,
        num_stages=stages,
    )
    if level <= 3:
        return val
    if level == 4:
        return workspace
    if out is None:
        out = torch.empty(B, H, R, dtype=q_nope.dtype, device=dev)
    block_s = triton.next_power_of_2(S)
    block_r = min(R, max(16, 4096 // block_s))
    _mla_decode_stage2[(H, B, R // block_r)](
        opart, lse, seq_lens, out, S, *pstr, out.stride(0), out.stride(1),
        BLOCK_N=block_n, MIN_SPLIT=min_split, BLOCK_S=block_s, BLOCK_R=block_r, num_warps=4)
    return out


def split_bounds(n: int, num_splits: int, block_n: int, min_split: int) -> list[tuple[int, int]]:
    """[(start, end)] of the S programs of a sequence of n tokens (v1's _split_len, i.e.
    mla_decode.split_len_host; empty ranges where start >= end)."""
    split = split_len_host(n, num_splits, block_n, min_split)
    return [(s * split, min(s * split + split, n)) for s in range(num_splits)]


def ladder_reference(level: int, q_nope, q_pe, kv_cache, block_tables, seq_lens, scale: float,
                     k_scale: float, num_splits: int, *, path: str = "v1", block_n: int = 64,
                     block_h: int = 16, min_split: int = 64):
    """Torch result of rung `level` -> (ref, ran): ref shaped as ladder_launch's output (level 0:
    int64 holding the wrapped int32 sums; 1-3: float64 [G, B, S]; 4: (opart [B, H, S, R],
    lse [B, H, S]) float32; 5: mla_decode_ref's [B, H, R]) and ran bool [B, S], the programs
    that write (rows of programs that did not run are 0 in ref and must not be compared)."""
    B, H, R = q_nope.shape
    S, G = num_splits, -(-H // block_h)
    page = kv_cache.shape[1]
    if level == 5:
        return mla_decode_ref(q_nope, q_pe, kv_cache, block_tables, seq_lens, scale,
                              k_scale), torch.ones(B, S, dtype=torch.bool)
    fp8 = is_fp8(kv_cache.dtype)
    tile_k = k_scale if fp8 and PATHS[path][1] == 0 else 1.0  # what R1 sums
    flat = kv_cache.reshape(-1, kv_cache.shape[-1])
    words = kv_cache.view(torch.int32).reshape(flat.shape[0], -1) if level == 0 else None
    ran = torch.zeros(B, S, dtype=torch.bool)
    if level == 4:
        ref = (torch.zeros(B, H, S, R), torch.zeros(B, H, S))
    else:
        ref = torch.zeros(G, B, S, dtype=torch.int64 if level == 0 else torch.float64)
    lens = seq_lens.tolist()
    for b in range(B):
        for s, (a, e) in enumerate(split_bounds(lens[b], S, block_n, min_split)):
            if a >= e:
                continue
            ran[b, s] = True
            pos = torch.arange(a, e, device=kv_cache.device)
            rows = block_tables[b, pos // page].long() * page + pos % page
            if level == 0:
                w = int(words[rows].long().sum().item()) & 0xFFFFFFFF
                ref[:, b, s] = w - (1 << 32) if w >= 1 << 31 else w
                continue
            x = flat[rows].double()
            if level == 1:
                ref[:, b, s] = float((x * tile_k).sum())
                continue
            if level == 4:  # the split's rows as a one-sequence cache with one row per page
                sub = flat[rows].reshape(e - a, 1, -1)
                bt = torch.arange(e - a, dtype=torch.int32, device=sub.device)[None]
                ln = torch.tensor([e - a], dtype=torch.int32, device=sub.device)
                o = mla_decode_ref(q_nope[b:b + 1].float(), q_pe[b:b + 1].float(), sub, bt, ln,
                                   scale, k_scale)
                ref[0][b, :, s] = o[0].cpu()
            x = x * k_scale
            sc = (q_nope[b].double() @ x[:, :R].T + q_pe[b].double() @ x[:, R:].T) * scale
            if level == 4:
                ref[1][b, :, s] = (torch.logsumexp(sc, 1) * _LOG2E).float().cpu()
                continue
            for g in range(G):
                hs = sc[g * block_h:(g + 1) * block_h]
                if level == 2:
                    ref[g, b, s] = float(hs.sum()) * _LOG2E
                else:
                    ref[g, b, s] = float((torch.logsumexp(hs, 1) * _LOG2E).sum())
    return ref, ran
