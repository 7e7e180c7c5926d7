"""Triton kernels of the small-M 4-bit fused MoE (kernels/moe_small_m.py is the entry point).

Formats (constexpr FMT): INT4 = 2 (repacked compressed-tensors int4 g32, bf16 scales), MXFP4 = 3
(repacked Quark MXFP4, e8m0 scales), both in the kernel layout int32 [E, N, K/128, 16] of
kernels/moe_ref.py: in chunk c (128 channels of K), word t holds element k = 128c + 32j + 2t + h
at nibble position j + 4h (int4: q + 8) or, for MXFP4, magnitude bits 3j..3j+2 / sign bit 12+j
of 16-bit half h. Group g = k // 32 = 4c + j: nibble j of every word of chunk c is one group.
Pointer conventions (no bf16 arithmetic in the kernels):
- X: hidden bf16 [M, H] viewed as int32 [M, H/2]: word i = (x[2i] low half, x[2i+1] high half);
  k = 128c + 32j + 2t + h lives in word 64c + 16j + t, half h (widened to fp32 by shift / mask).
- S: int4 bf16 scales [E, N, K/32] viewed as int16, or MXFP4 e8m0 uint8 [E, N, K/32]: the 4
  groups of chunk c are elements 4c .. 4c+3 of the row.
Tiles: weights [R, CH, 4 (tq), 4 (tr)] int32 with t = 4 tq + tr, so one thread's 16-byte vector
(tr) is 8 weights of one group per nibble j: their products are summed in-thread and scaled once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .fused_moe_common import _sel4, _split4, _wrow
from .moe_align import pair_expert

try:  # programmatic dependent launch (config "PDL"); absent from old Triton versions
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover
    gdc_launch_dependents = gdc_wait = None

INT4, MXFP4 = 2, 3
_SIGN = tl.constexpr(-2147450880)  # 0x80008000 as int32
_HI = tl.constexpr(-65536)  # 0xFFFF0000 as int32


@triton.jit
def _bf16_lo(w):
    """fp32 value of the bf16 in the low half of int32 w (exact)."""
    return (w << 16).to(tl.float32, bitcast=True)


@triton.jit
def _bf16_hi(w):
    """fp32 value of the bf16 in the high half of int32 w (exact)."""
    return (w & _HI).to(tl.float32, bitcast=True)


@triton.jit
def _pow2(biased):
    """2^(biased - 127) as fp32 for int32 biased in [1, 254]."""
    return (biased << 23).to(tl.float32, bitcast=True)


@triton.jit
def _prep(w, MAGIC, FMT: tl.constexpr):
    """Per-word preparation: int4 -> (w | MAGIC, (w >> 16) | MAGIC), MAGIC = 0x4B000000 (fp32
    2^23) passed at run time so that the compiler cannot fold the OR into every nibble mask of
    _dq (that costs a second LOP3 per weight); the magic's bits are kept by the masks, the
    other half's nibble bits are masked off. MXFP4 -> (w, w)."""
    if FMT == 2:
        return w | MAGIC, (w >> 16) | MAGIC
    else:
        return w, w


@triton.jit
def _dq(wl, wh, j: tl.constexpr, FMT: tl.constexpr):
    """Elements (j, h=0) and (j, h=1) of each word as fp32, UNSCALED: int4 (n - 8) * 16^j from
    the _prep'ed words (one AND gives the fp32 2^23 + n 16^j, one FADD: exact), MXFP4
    e2m1 * 2^-14 (fp16 bit patterns, e = 0 codes land on fp16 subnormals: exact). The caller's
    group scale carries 16^-j (int4) or 2^14 (MXFP4)."""
    if FMT == 2:
        keep = (15 << (4 * j)) | 0x4B000000
        off = 8388608.0 + 8.0 * (16 ** j)
        q0 = (wl & keep).to(tl.float32, bitcast=True) - off
        q1 = (wh & keep).to(tl.float32, bitcast=True) - off
    else:
        v = ((wl << (9 - 3 * j)) & 0x0E000E00) | ((wl << (3 - j)) & _SIGN)
        q0 = v.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        q1 = (v >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return q0, q1


@triton.jit
def _dot8(wl, wh, xw, j: tl.constexpr, FMT: tl.constexpr):
    """_dot8f with x as int32 words of bf16 pairs [1, CH, 4, 4] (widened exactly here)."""
    return _dot8f(wl, wh, _bf16_lo(xw), _bf16_hi(xw), j, FMT)


@triton.jit
def _dot8f(wl, wh, alo, ahi, j: tl.constexpr, FMT: tl.constexpr):
    """_dot8 with fp32 activations: alo / ahi [1, CH, 4, 4] = the h=0 / h=1 elements."""
    w0, w1, w2, w3 = _split4(wl)
    h0, h1, h2, h3 = _split4(wh)
    a0, a1, a2, a3 = _split4(alo)
    b0, b1, b2, b3 = _split4(ahi)
    q0, q1 = _dq(w0, h0, j, FMT)
    part = q0 * a0
    part += q1 * b0
    q0, q1 = _dq(w1, h1, j, FMT)
    part += q0 * a1
    part += q1 * b1
    q0, q1 = _dq(w2, h2, j, FMT)
    part += q0 * a2
    part += q1 * b2
    q0, q1 = _dq(w3, h3, j, FMT)
    part += q0 * a3
    part += q1 * b3
    return part


@triton.jit
def _scales(s, j: tl.constexpr, FMT: tl.constexpr):
    """Group-j multipliers [R, CH, 4] fp32 from the scale tile s [R, CH, 4, 4] of _scale_ptrs
    (tr = group j of the chunk): int4 bf16 bits (int16) -> scale * 16^-j; MXFP4 e8m0 (uint8)
    -> 2^(e - 127) * 2^14."""
    s0, s1, s2, s3 = _split4(s)
    v = _sel4(s0, s1, s2, s3, j).to(tl.int32)
    if FMT == 2:
        r = (v << 16).to(tl.float32, bitcast=True)
        if j > 0:
            r = r * (1.0 / (16 ** j))
    else:
        r = _pow2(tl.minimum((v & 0xFF) + 14, 254))
    return r


@triton.jit
def _scale_ptrs(Srow, R: tl.constexpr, CH: tl.constexpr, SCS: tl.constexpr = 4):
    """Scale pointers [R, CH, 4 (tq), 4 (tr = j)] for chunks 0..CH-1 of the rows at Srow [R]
    (bf16 viewed as int16, or e8m0 uint8; 4 groups of a chunk contiguous; SCS: a row's chunk
    stride, 4 row-major, WT * 4 row-tiled: fused_moe_common._wrow), broadcast over tq
    on purpose: the tile then has the weight tile's shape and contiguity, so the load gets its
    layout (no shared-memory conversion per step), and the repeated addresses inside a thread
    are merged into one load by the compiler."""
    c4 = tl.arange(0, CH)[None, :, None, None]
    tr = tl.arange(0, 4)[None, None, None, :]
    return tl.broadcast_to(Srow[:, None, None, None] + SCS * c4 + tr, (R, CH, 4, 4))


@triton.jit
def _bmask(idx, ok):
    """Scalar condition ok as a bool mask of idx's shape (idx >= 0, < 2^30): the interpreter
    rejects scalar / mixed-shape masks."""
    return idx < tl.where(ok, 1 << 30, -1)


@triton.jit
def _hits(IDS, stride_im, m, ok, e, TOPK: tl.constexpr, KP: tl.constexpr,
          N_ROUTED: tl.constexpr):
    """[len(m)] bool: token m routes to expert e in some column (ok: m is a valid token)."""
    h = m < 0
    for k in tl.static_range(KP):
        h = h | (pair_expert(IDS, stride_im, m * KP + k, ok, TOPK, KP, N_ROUTED) == e)
    return h & ok


@triton.jit
def _count(IDS, stride_im, e, M, TOPK: tl.constexpr, KP: tl.constexpr, N_ROUTED: tl.constexpr,
           MC: tl.constexpr):
    """Number of tokens routed to expert e (each token once)."""
    n = 0
    for m0 in range(0, M, MC):
        m = m0 + tl.arange(0, MC)
        n += tl.sum(_hits(IDS, stride_im, m, m < M, e, TOPK, KP, N_ROUTED).to(tl.int32), 0)
    return n


@triton.jit
def _slot_token(IDS, stride_im, e, slot, M, TOPK: tl.constexpr, KP: tl.constexpr,
                N_ROUTED: tl.constexpr, MC: tl.constexpr):
    """(token at position `slot` of the token-ordered list of tokens routed to e, slot < length)
    as int32 scalars: a prefix count over the ids, no host sync, no sort kernel."""
    tok = 0
    base = 0
    for m0 in range(0, M, MC):
        m = m0 + tl.arange(0, MC)
        hit = _hits(IDS, stride_im, m, m < M, e, TOPK, KP, N_ROUTED).to(tl.int32)
        cs = tl.cumsum(hit, 0) + base  # inclusive: token m sits at position cs - 1
        tok += tl.sum(tl.where((hit > 0) & (cs - 1 == slot), m, 0), 0)
        base += tl.sum(hit, 0)
    return tok, (base - slot) > 0


@triton.jit
def _first_pair(IDS, stride_im, tok, ok, e, TOPK: tl.constexpr, KP: tl.constexpr,
                N_ROUTED: tl.constexpr, KP2: tl.constexpr, VT: tl.constexpr):
    """Pair id tok * KP + (first column of token tok whose expert is e), int64 scalar."""
    if VT:
        k, hit = _col_hits(IDS, stride_im, tok, ok, e, TOPK, KP, N_ROUTED, KP2)
        return tok.to(tl.int64) * KP + tl.min(tl.where(hit, k, KP), 0)
    kf = KP
    for kk in tl.static_range(KP):
        k = KP - 1 - kk
        hit = pair_expert(IDS, stride_im, tok * KP + k, ok, TOPK, KP, N_ROUTED) == e
        kf = tl.where(hit, k, kf)
    return tok.to(tl.int64) * KP + kf


@triton.jit
def _store_act(ACT, IDS, stride_im, y, tok, ok, e, jt, I: tl.constexpr, TOPK: tl.constexpr,
               KP: tl.constexpr, N_ROUTED: tl.constexpr, BN: tl.constexpr, KP2: tl.constexpr,
               VT: tl.constexpr):
    """y [2BN] = (gate rows, up rows) sums of column tile jt of token tok -> silu(gate) * up in
    fp32, stored for EVERY pair p = (tok, k) whose expert is e into act row p, in the DOWN
    order: channel n = 128c + 32j + 2t + h at 128c + 32j + 16h + t (so the down kernel reads
    16-byte vectors of 4 consecutive t). VT=1: one vector id load, one [KP2, BN] store."""
    g, u = tl.split(tl.permute(tl.reshape(y, (2, BN)), (1, 0)))
    a = g / (1.0 + tl.exp(-g)) * u
    n = jt * BN + tl.arange(0, BN)
    pos = (n // 32) * 32 + (n % 2) * 16 + (n % 32) // 2
    if VT:
        k, hit = _col_hits(IDS, stride_im, tok, ok, e, TOPK, KP, N_ROUTED, KP2)
        p = tok.to(tl.int64) * KP + k
        tl.store(ACT + p[:, None] * I + pos[None, :], tl.broadcast_to(a[None, :], (KP2, BN)),
                 mask=hit[:, None] & (pos[None, :] >= 0))
    else:
        for k in tl.static_range(KP):
            p = tok * KP + k
            hit = (pair_expert(IDS, stride_im, p, ok, TOPK, KP, N_ROUTED) == e) & ok
            tl.store(ACT + p.to(tl.int64) * I + pos, a, mask=_bmask(pos, hit))


@triton.jit
def _col_hits(IDS, stride_im, tok, ok, e, TOPK: tl.constexpr, KP: tl.constexpr,
              N_ROUTED: tl.constexpr, KP2: tl.constexpr):
    """(k [KP2], hit [KP2]): the columns k < KP of token tok whose expert is e, from ONE
    vector load of the token's ids (VT=1: no chain of dependent scalar loads in the tail)."""
    k = tl.arange(0, KP2)
    valid = (k < KP) & _bmask(k, ok)
    hit = (pair_expert(IDS, stride_im, tok * KP + k, valid, TOPK, KP, N_ROUTED) == e) & valid
    return k, hit


@triton.jit
def _x4(X, xrow, it, R: tl.constexpr, CH: tl.constexpr):
    """int32 words of x (token row offset xrow) for step it, groups j = 0..3, each
    [1, CH, 4, 4] (word 64c + 16j + 4tq + tr). Unmasked on purpose (a mask that is not provably
    uniform over 4 words would split the 16-byte loads): an unused token slot reads token 0's
    row (its result is never stored) and the prefetch past the last step wraps to the first.
    Broadcast to [R, CH, 4, 4] (the weight tile's shape) so that the load takes the weight
    tile's layout; the per-row copies are the same addresses (merged by the compiler)."""
    c = it * CH + tl.arange(0, CH)[None, :, None, None]
    t = 4 * tl.arange(0, 4)[None, None, :, None] + tl.arange(0, 4)[None, None, None, :]
    base = tl.broadcast_to(X + xrow + c * 64 + t, (R, CH, 4, 4))
    return tl.load(base), tl.load(base + 16), tl.load(base + 32), tl.load(base + 48)


@triton.jit
def _gate_up_kernel(
    X, W, S, IDS, ACT, PART, SEM, M, MAGIC, stride_xm, stride_im, stride_we, stride_se,
    I: tl.constexpr, H: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr,
    N_ROUTED: tl.constexpr, BN: tl.constexpr, CH: tl.constexpr, SK: tl.constexpr,
    BT: tl.constexpr, MC: tl.constexpr, PC: tl.constexpr, FMT: tl.constexpr,
    EARLY: tl.constexpr, VT: tl.constexpr = 0, KP2: tl.constexpr = 1, PDL: tl.constexpr = 0,
    WT: tl.constexpr = 1,
):
    """Grid (P, I / BN, SK); BT (tokens per weight pass) is 1 or 2. See kernels/moe_small_m.py.
    VT=1: the epilogue / split-K tail read a token's KP ids as one vector (KP2 = next power of
    2 >= KP) instead of KP dependent scalar loads. PDL=1: let the down kernel launch now.
    WT: rows per tile of the w13 words / scales (1: row-major; fused_moe_common._wrow)."""
    if PDL:
        gdc_launch_dependents()
    b = tl.program_id(0)
    jt = tl.program_id(1)
    ks = tl.program_id(2)
    NIT: tl.constexpr = H // (128 * CH) // SK
    it0 = ks * NIT
    e = pair_expert(IDS, stride_im, b, b >= 0, TOPK, KP, N_ROUTED)
    e64 = e.to(tl.int64)
    r = tl.arange(0, 2 * BN)
    rows = tl.where(r >= BN, I + jt * BN + r - BN, jt * BN + r).to(tl.int64)
    c4 = tl.arange(0, CH)[None, :, None, None]
    t4 = 4 * tl.arange(0, 4)[None, None, :, None] + tl.arange(0, 4)[None, None, None, :]
    Wp = (W + e64 * stride_we + _wrow(rows, H // 128, WT, 16)[:, None, None, None]
          + c4 * (WT * 16) + t4)
    Sp = _scale_ptrs(S + e64 * stride_se + _wrow(rows, H // 128, WT, 4), 2 * BN, CH, WT * 4)
    if EARLY:  # M = 1 (BT = 1): the token is 0, so start streaming weights, scales and x
        # before the duplicate check (a duplicate is rare) and skip the token scans
        w_n = tl.load(Wp + it0 * (CH * WT * 16))
        s_n = tl.load(Sp + it0 * (CH * WT * 4))
        a0, a1, a2, a3 = _x4(X, 0, it0, 2 * BN, CH)
    # run only for the first pair of expert e (row-major over [M, KP])
    earlier = 0
    for f0 in range(0, b, PC):
        f = f0 + tl.arange(0, PC)
        ok = f < b
        earlier += tl.sum((pair_expert(IDS, stride_im, f, ok, TOPK, KP, N_ROUTED) == e)
                          & ok).to(tl.int32)
    if earlier > 0:
        return
    if EARLY:
        ntok = 1
    else:
        ntok = _count(IDS, stride_im, e, M, TOPK, KP, N_ROUTED, MC)
    P = M * KP
    for t0 in range(0, ntok, BT):
        if EARLY:
            tok0 = b * 0
            ok0 = b >= 0
            xr0 = 0
        else:
            tok0, ok0 = _slot_token(IDS, stride_im, e, t0, M, TOPK, KP, N_ROUTED, MC)
            xr0 = tok0.to(tl.int64) * stride_xm
            a0, a1, a2, a3 = _x4(X, xr0, it0, 2 * BN, CH)
        acc0 = tl.zeros((2 * BN, CH, 4), tl.float32)
        if BT == 2:
            tok1, ok1 = _slot_token(IDS, stride_im, e, t0 + 1, M, TOPK, KP, N_ROUTED, MC)
            xr1 = tok1.to(tl.int64) * stride_xm
            acc1 = tl.zeros((2 * BN, CH, 4), tl.float32)
            b0, b1, b2, b3 = _x4(X, xr1, it0, 2 * BN, CH)
        if not EARLY:  # (M = 1 has one token tile, loaded above)
            w_n = tl.load(Wp + it0 * (CH * WT * 16))
            s_n = tl.load(Sp + it0 * (CH * WT * 4))
        for it in range(it0, it0 + NIT):
            # explicit double buffering: step it+1's loads (predicated off after the last
            # step) are issued before step it's arithmetic
            more = (tl.zeros((1,), tl.int32) + it + 1) < it0 + NIT  # a tensor (interpreter)
            nxw = it0 + (it + 1 - it0) % NIT  # x prefetch index, wrapped
            w = w_n
            s = s_n
            xa0, xa1, xa2, xa3 = a0, a1, a2, a3
            w_n = tl.load(Wp + (it + 1) * (CH * WT * 16), mask=more, other=0)
            s_n = tl.load(Sp + (it + 1) * (CH * WT * 4), mask=more, other=0)
            a0, a1, a2, a3 = _x4(X, xr0, nxw, 2 * BN, CH)
            if BT == 2:
                xb0, xb1, xb2, xb3 = b0, b1, b2, b3
                b0, b1, b2, b3 = _x4(X, xr1, nxw, 2 * BN, CH)
            wl, wh = _prep(w, MAGIC, FMT)
            for j in tl.static_range(4):
                sj = _scales(s, j, FMT)
                acc0 += _dot8(wl, wh, _sel4(xa0, xa1, xa2, xa3, j), j, FMT) * sj
                if BT == 2:
                    acc1 += _dot8(wl, wh, _sel4(xb0, xb1, xb2, xb3, j), j, FMT) * sj
        y0 = tl.sum(tl.sum(acc0, axis=2), axis=1)  # [2BN]
        if SK == 1:
            _store_act(ACT, IDS, stride_im, y0, tok0, ok0, e, jt, I, TOPK, KP, N_ROUTED, BN, KP2,
                     VT)
        else:
            pp = _first_pair(IDS, stride_im, tok0, ok0, e, TOPK, KP, N_ROUTED, KP2, VT)
            tl.store(PART + (ks * P + pp) * (2 * I) + rows, y0, mask=_bmask(rows, ok0))
        if BT == 2:
            y1 = tl.sum(tl.sum(acc1, axis=2), axis=1)
            if SK == 1:
                _store_act(ACT, IDS, stride_im, y1, tok1, ok1, e, jt, I, TOPK, KP, N_ROUTED, BN,
                         KP2, VT)
            else:
                pp = _first_pair(IDS, stride_im, tok1, ok1, e, TOPK, KP, N_ROUTED, KP2, VT)
                tl.store(PART + (ks * P + pp) * (2 * I) + rows, y1, mask=_bmask(rows, ok1))
    if SK > 1:
        # split-K fix-up: the last of the SK programs of (b, jt) sums the partials (acq_rel
        # atomic after a CTA barrier: every thread's partial stores are ordered before it). The
        # semaphore is reset by that program, so it is all-zero again when the launch ends.
        tl.debug_barrier()
        sem = SEM + b * (I // BN) + jt
        cnt = tl.atomic_add(sem, 1, sem="acq_rel", scope="gpu")
        if cnt == SK - 1:
            tl.atomic_xchg(sem, 0, sem="relaxed", scope="gpu")
            for t in range(ntok):
                if EARLY:
                    tok = b * 0
                    ok = b >= 0
                else:
                    tok, ok = _slot_token(IDS, stride_im, e, t, M, TOPK, KP, N_ROUTED, MC)
                pp = _first_pair(IDS, stride_im, tok, ok, e, TOPK, KP, N_ROUTED, KP2, VT)
                y = tl.zeros((2 * BN,), tl.float32)
                for k2 in range(SK):
                    y += tl.load(PART + (k2 * P + pp) * (2 * I) + rows, volatile=True)
                _store_act(ACT, IDS, stride_im, y, tok, ok, e, jt, I, TOPK, KP, N_ROUTED, BN, KP2,
                         VT)


@triton.jit
def _down_kernel(
    ACT, W, S, IDS, TW, OUT, MAGIC, stride_im, stride_tm, stride_om, stride_we, stride_se,
    H: tl.constexpr, I: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr,
    N_ROUTED: tl.constexpr, BN: tl.constexpr, FMT: tl.constexpr, PDL: tl.constexpr = 0,
):
    """Grid (M, H / BN): out[m, tile] = sum over the KP pairs of token m of weight x
    down_e(act[pair]) in fp32 (act in the down order of _store_act), stored in OUT's dtype.
    PDL=1 (launched as a programmatic dependent of the gate_up): the first pair's weights are
    requested before griddepcontrol.wait, act only after it."""
    m = tl.program_id(0)
    jt = tl.program_id(1)
    CH: tl.constexpr = I // 128
    n = (jt * BN + tl.arange(0, BN)).to(tl.int64)
    c4 = tl.arange(0, CH)[None, :, None, None]
    t4 = 4 * tl.arange(0, 4)[None, None, :, None] + tl.arange(0, 4)[None, None, None, :]
    acc = tl.zeros((BN, CH, 4), tl.float32)
    p = m * KP
    e = pair_expert(IDS, stride_im, p, p >= 0, TOPK, KP, N_ROUTED).to(tl.int64)
    w_n = tl.load(W + e * stride_we + n[:, None, None, None] * (I // 8) + c4 * 16 + t4)
    s_n = tl.load(_scale_ptrs(S + e * stride_se + n * (I // 32), BN, CH))
    if PDL:
        gdc_wait()
    for k in tl.static_range(KP):
        p = m * KP + k
        w = w_n
        s = s_n
        if k + 1 < KP:  # prefetch the next pair's tile
            e = pair_expert(IDS, stride_im, p + 1, p >= 0, TOPK, KP, N_ROUTED).to(tl.int64)
            w_n = tl.load(W + e * stride_we + n[:, None, None, None] * (I // 8) + c4 * 16 + t4)
            s_n = tl.load(_scale_ptrs(S + e * stride_se + n * (I // 32), BN, CH))
        if k < TOPK:
            wt = tl.load(TW + m.to(tl.int64) * stride_tm + k).to(tl.float32)
        else:
            wt = 1.0
        wl, wh = _prep(w, MAGIC, FMT)
        Ap = tl.broadcast_to(ACT + p.to(tl.int64) * I + c4 * 128 + t4, (BN, CH, 4, 4))
        for j in tl.static_range(4):
            part = _dot8f(wl, wh, tl.load(Ap + 32 * j), tl.load(Ap + 32 * j + 16), j, FMT)
            acc += part * (_scales(s, j, FMT) * wt)
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    tl.store(OUT + m.to(tl.int64) * stride_om + n, y.to(OUT.dtype.element_ty))


@triton.jit
def _down_all_kernel(
    ACT, W, S, IDS, TW, OUT, MAGIC, stride_im, stride_tm, stride_om, stride_we, stride_se,
    H: tl.constexpr, I: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr,
    N_ROUTED: tl.constexpr, BN: tl.constexpr, FMT: tl.constexpr, KP2: tl.constexpr,
    PDL: tl.constexpr,
):
    """_down_kernel (config DW=1) with ALL KP pairs of the token in one [KP2, BN, CH, 4, 4]
    tile: one vector load of the ids, then every pair's weights, scales and routing weights
    requested at once (the loop version keeps one pair in flight: 8 dependent DRAM trips at
    M=1); act after griddepcontrol.wait when PDL. Columns k >= KP are masked (weight 0)."""
    m = tl.program_id(0)
    jt = tl.program_id(1)
    CH: tl.constexpr = I // 128
    k = tl.arange(0, KP2)
    kok = k < KP
    e = tl.where(kok, pair_expert(IDS, stride_im, m * KP + k, kok, TOPK, KP, N_ROUTED), 0)
    k5 = k[:, None, None, None, None]
    n = (jt * BN + tl.arange(0, BN)).to(tl.int64)
    c5 = tl.arange(0, CH)[None, None, :, None, None]
    t5 = (4 * tl.arange(0, 4)[None, None, None, :, None]
          + tl.arange(0, 4)[None, None, None, None, :])
    row = e.to(tl.int64)[:, None] * stride_we + n[None, :] * (I // 8)  # [KP2, BN]
    wmask = tl.broadcast_to(k5 < KP, (KP2, BN, CH, 4, 4))
    w = tl.load(W + row[:, :, None, None, None] + c5 * 16 + t5, mask=wmask, other=0)
    srow = e.to(tl.int64)[:, None] * stride_se + n[None, :] * (I // 32)
    s = tl.load(tl.broadcast_to(S + srow[:, :, None, None, None] + 4 * c5
                                + tl.arange(0, 4)[None, None, None, None, :],
                                (KP2, BN, CH, 4, 4)), mask=wmask, other=0)
    wt = tl.load(TW + m.to(tl.int64) * stride_tm + k, mask=k < TOPK, other=0.0).to(tl.float32)
    wt = tl.where(kok & (k >= TOPK), 1.0, wt)[:, None, None, None]
    if PDL:
        gdc_wait()
    p = (m * KP + tl.minimum(k, KP - 1)).to(tl.int64)  # k >= KP: any valid row, weight 0
    Ap = tl.broadcast_to(ACT + p[:, None, None, None, None] * I + c5 * 128 + t5,
                         (KP2, BN, CH, 4, 4))
    wl, wh = _prep(w, MAGIC, FMT)
    acc = tl.zeros((KP2, BN, CH, 4), tl.float32)
    for j in tl.static_range(4):
        part = _dot8f(wl, wh, tl.load(Ap + 32 * j), tl.load(Ap + 32 * j + 16), j, FMT)
        acc += part * (_scales(s, j, FMT) * wt)
    y = tl.sum(tl.sum(tl.sum(acc, axis=3), axis=2), axis=0)
    tl.store(OUT + m.to(tl.int64) * stride_om + n, y.to(OUT.dtype.element_ty))
