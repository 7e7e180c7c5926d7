"""Rungs of the 4-bit MoE down-kernel ladder (bench/moe_down_ladder.py; issue 6 / 7).

Every rung runs the production down kernel's grid (kernels/fused_moe_tc.py `_down_block_kernel`,
sorted mode: program (b, jt) = block b of moe_align's tables x BN output rows of H; blocks of
expert -1 return at once) and its per-program work: BN rows of w2 x K = I in 128-K chunks, in a
loop the Triton pipeliner multi-buffers (num_stages). Each rung adds ONE piece of the real work:

    D0  the weight words only (xor-folded, one int32 per program)
    D1  + the [BN, 4] group scales and the block's [BM, 128] activation rows of every chunk
    D2  the whole K loop (the production `_mm`: int4 DQ=1, bf16 MMAs), summed, no store
    D3  D2 + the production store of y [pairs, H] (the production kernel's sorted-mode work)

WT > 1 (any rung): w2 and its scales are row-tiled copies (kernels/moe_ref.tile_rows: one
128-K chunk of WT consecutive rows is one contiguous block), the layout the gate_up weights
use since session 5. int4 (group-32 bf16 scales) only.

Outputs: D0-D2 write one fp32 per program (D0: the int32 xor, bitcast), D3 writes y rows of
the block's real pairs. `ref_*` below are the torch references the tests compare against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from atom_stream.kernels.fused_moe_common import INT4, _mm, _wrow

FMT_INT4: tl.constexpr = tl.constexpr(INT4)  # a jit function reads constexpr globals only


@triton.jit
def _xor(a, b):
    return a ^ b


@triton.jit
def _down_ladder_kernel(ACT, W, S, SORTED, BLKEXP, Y, OUT, num_pairs, stride_we, stride_se,
                        H: tl.constexpr, I: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        RUNG: tl.constexpr, MDT: tl.constexpr, WT: tl.constexpr):
    NCH: tl.constexpr = I // 128
    b = tl.program_id(0)
    jt = tl.program_id(1)
    e = tl.load(BLKEXP + b)
    if e >= 0:
        mr = tl.arange(0, BM)
        pair = tl.load(SORTED + b * BM + mr)
        ok = pair < num_pairs
        slot = (b * BM + mr).to(tl.int64)
        n = (jt * BN + tl.arange(0, BN)).to(tl.int64)
        row_w = _wrow(n, NCH, WT, 16)
        row_s = _wrow(n, NCH, WT, 4)
        e64 = e.to(tl.int64)
        Wp = W + e64 * stride_we
        Sp = S + e64 * stride_se
        prog = b * (H // BN) + jt
        t = tl.arange(0, 16)
        if RUNG == 0:
            accw = tl.zeros((BN, 16), tl.int32)
            for c in range(NCH):
                accw ^= tl.load(Wp + row_w[:, None] + c * (WT * 16) + t[None, :])
            v = tl.reduce(tl.reduce(accw, 1, _xor), 0, _xor)
            tl.store(OUT + prog, v.to(tl.float32, bitcast=True))
        elif RUNG == 1:
            accb = tl.zeros((BN, 16), tl.float32)
            accs = tl.zeros((BN, 4), tl.float32)
            accx = tl.zeros((BM, 128), tl.float32)
            k = tl.arange(0, 128)
            for c in range(NCH):
                w = tl.load(Wp + row_w[:, None] + c * (WT * 16) + t[None, :])
                accb += (w & 1).to(tl.float32)  # keeps the words live
                accs += tl.load(Sp + row_s[:, None] + c * (WT * 4)
                                + tl.arange(0, 4)[None, :]).to(tl.float32)
                accx += tl.load(ACT + slot[:, None] * I + c * 128 + k[None, :], mask=ok[:, None],
                                other=0.0).to(tl.float32)
            v = tl.sum(tl.sum(accb, 1), 0) + tl.sum(tl.sum(accs, 1), 0)
            tl.store(OUT + prog, v + tl.sum(tl.sum(accx, 1), 0))
        else:
            zero = tl.zeros((BM,), tl.float32)
            acc = _mm(tl.zeros((BN, BM), tl.float32), Wp, Sp, row_w, row_s, n >= 0, ACT,
                      slot * I, ok, ACT, slot * (I // 32), zero, I, BN, BM, 128, FMT_INT4, 0, MDT,
                      0, 1, 1, WT * 16, WT * 4)
            if RUNG == 2:
                tl.store(OUT + prog, tl.sum(tl.sum(tl.where(ok[None, :], acc, 0.0), 1), 0))
            else:
                tl.store(Y + pair[None, :].to(tl.int64) * H + n[:, None],
                         acc.to(Y.dtype.element_ty), mask=ok[None, :])


def down_rung(rung: int, act, w2, s2, sorted_pairs, block_expert, y, out, *, num_pairs: int,
              BN: int, BM: int = 16, warps: int = 4, stages: int = 3, wt: int = 1,
              mdt: int = 0) -> None:
    """Launch one rung. act [slots, I] bf16 (slot = b * BM + row); w2 int32 [E, H, I/128, 16]
    or its tile_rows(., wt) copy [E, H/wt, I/128, wt, 16]; s2 bf16 [E, H, I/32] or the tiled
    copy of its [E, H, I/128, 4] view; y [num_pairs, H] (D3); out fp32 [nblk * H / BN] (D0-D2);
    mdt 0: bf16 MMAs (production), 1: fp16 (the interpreter's tests)."""
    I = act.shape[1]
    H = y.shape[1]
    _down_ladder_kernel[(block_expert.numel(), H // BN)](
        act, w2, s2, sorted_pairs, block_expert, y, out, num_pairs, w2.stride(0), s2.stride(0),
        H=H, I=I, BM=BM, BN=BN, RUNG=rung, MDT=mdt, WT=wt, num_warps=warps, num_stages=stages)


def _real_slots(sorted_pairs, block_expert, num_pairs: int, BM: int):
    """(slot, expert, pair) of every real pair of the sorted tables."""
    sp, be = sorted_pairs.cpu().tolist(), block_expert.cpu().tolist()
    return [(s, be[s // BM], p) for s, p in enumerate(sp) if p < num_pairs]


def ref_down(act, d2, sorted_pairs, block_expert, num_pairs: int, BM: int = 16) -> dict:
    """{pair: fp64 y row} for every real pair: d2 [E, H, I] dequantized w2 @ act[slot]."""
    a = act.double().cpu()
    return {p: d2[e].double() @ a[s]
            for s, e, p in _real_slots(sorted_pairs, block_expert, num_pairs, BM)}


def ref_rung(rung: int, act, w2, s2, d2, sorted_pairs, block_expert, *, num_pairs: int,
             BN: int, BM: int = 16, mdt: int = 0) -> dict:
    """{program: what D0-D2 write} for programs of real blocks, on the row-major w2 / s2: D0
    the int32 xor of its words (python int), D1 sum(scales) + sum(its pairs' act rows) +
    #words with bit 0 set, D2 the sum of its y tile over real pairs (fp64)."""
    H = w2.shape[1]
    nj = H // BN
    be = block_expert.cpu().tolist()
    slots = _real_slots(sorted_pairs, block_expert, num_pairs, BM)
    res = {}
    for b, e in enumerate(be):
        if e < 0:
            continue
        mine = [(s, p) for s, _, p in slots if s // BM == b]
        for jt in range(nj):
            rows = slice(jt * BN, (jt + 1) * BN)
            if rung == 0:
                v = 0
                for word in w2[e, rows].reshape(-1).tolist():
                    v ^= word
            elif rung == 1:
                v = float(s2[e, rows].double().sum()) + float((w2[e, rows] & 1).sum())
                v += sum(float(act[s].double().sum()) for s, _ in mine)
            else:
                w = d2[e, rows].to(torch.float16 if mdt else torch.bfloat16).double()
                v = sum(float((w @ act[s].double()).sum()) for s, _ in mine)
            res[b * nj + jt] = v
    return res


def tile_w2(w2: torch.Tensor, s2: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-tiled copies of w2 [E, H, I/128, 16] and s2 [E, H, I/32] with T rows per tile."""
    from atom_stream.kernels.moe_ref import tile_rows
    E, H, nch, _ = w2.shape
    return tile_rows(w2, T), tile_rows(s2.view(E, H, nch, 4), T)


def prod_down(act, w2, s2, ids, sorted_pairs, block_expert, y, *, num_pairs: int, BN: int,
              BM: int = 16, warps: int = 4, stages: int = 3):
    """The production `_down_block_kernel` in sorted mode at the int4 defaults for M > 16
    (BK2 128 in a pipelined loop, DQ 1, OFFS 1, bf16 MMAs), as a zero-argument call."""
    from atom_stream.kernels.fused_moe_common import BF16
    from atom_stream.kernels.fused_moe_tc import _down_block_kernel
    I, H = act.shape[1], y.shape[1]
    top_k = ids.shape[1]
    return lambda: _down_block_kernel[(block_expert.numel(), H // BN)](
        # OKM (direct mode's row mask) is not read in sorted mode: block_expert stands in
        act, act, w2, s2, sorted_pairs, block_expert, block_expert, y, act, ids.shape[0],
        num_pairs, w2.stride(0), s2.stride(0), H=H, I=I, TOPK=top_k, KP=top_k,
        KPP=triton.next_power_of_2(top_k), N_ROUTED=w2.shape[0], W_ROW=I // 8, S_ROW=I // 32,
        A_ROW=I, BM=BM, BN=BN, BK=128, FMT=INT4, ACT_Q=0, MDT=BF16, DIRECT=False, OFFS=1,
        ASTATIC=False, DQ=1, UNROLL=0, num_warps=warps, num_stages=stages)
