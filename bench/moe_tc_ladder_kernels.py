"""Rungs of the tensor-core 4-bit MoE gate_up ladder (bench/moe_tc_ladder.py; issue 6).

Every rung runs the production gate_up's grid (kernels/fused_moe_tc.py, sorted mode: tile
t = b * (I / BN) + jt for block b of moe_align's tables and column tile jt; blocks of expert -1
return at once) and its per-program work: R = 2 BN weight rows (BN gate + BN up rows) x the whole
K = H in 128-K chunks, in a loop the Triton pipeliner multi-buffers (num_stages). Each rung adds
ONE piece of the real work:

    G0  the weight words only (xor-folded, one int32 per tile)
    G1  + the [R, 4] scale loads and the [32, BM] activation loads of every scale group
    G2  + the int4 dequantization to bf16 (`_dq16`), summed instead of multiplied
    G3  the whole K loop (`_step4s`, DQ=1) and the production epilogue (SiLU(g) * u -> act)

Options (any rung): TILED=1 reads a row-tiled copy of the weights ([E, I / BN, H / 128, R, 16]
words: each chunk of a tile is one contiguous R x 64-byte block instead of R rows 3584 bytes
apart); PERSIST=1 launches NPROG programs that loop over the tiles (t = pid, pid + NPROG, ...)
instead of one program per tile. int4 (group-32 bf16 scales) only.

Outputs: G0-G2 write one fp32 per tile (G0: the int32 xor, bitcast), G3 writes act [slots, I]
(slot = b * BM + row) like the production gate_up. `ref_*` below are the torch references the
tests and the bench's check compare against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from atom_stream.kernels.fused_moe_common import _dq16, _step4s


@triton.jit
def _xor(a, b):
    return a ^ b


@triton.jit
def _gu_tile(X, W, S, SORTED, BLKEXP, OUT, ACT, tile, num_pairs, stride_xm, stride_we,
             stride_se, H: tl.constexpr, I: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr,
             BN: tl.constexpr, RUNG: tl.constexpr, TILED: tl.constexpr, MDT: tl.constexpr,
             WT: tl.constexpr, ST: tl.constexpr):
    NJ: tl.constexpr = I // BN
    R: tl.constexpr = 2 * BN
    NCH: tl.constexpr = H // 128
    b = tile // NJ
    jt = tile % NJ
    e = tl.load(BLKEXP + b)
    if e >= 0:
        mr = tl.arange(0, BM)
        pair = tl.load(SORTED + b * BM + mr)
        x_ok = pair < num_pairs
        tok = pair // KP
        r = tl.arange(0, R)
        up = r >= BN
        n = jt * BN + tl.where(up, r - BN, r)
        rows = tl.where(up, I + n, n).to(tl.int64)
        if ST:
            row_s = ((rows // ST) * (NCH * ST) + rows % ST) * 4
            SCS: tl.constexpr = ST * 4
        else:
            row_s = rows * (H // 32)
            SCS: tl.constexpr = 4
        e64 = e.to(tl.int64)
        Wp = W + e64 * stride_we
        Sp = S + e64 * stride_se
        if TILED:
            row_w = (jt * NCH * R + r).to(tl.int64) * 16
            CS: tl.constexpr = R * 16
        elif WT:
            row_w = ((rows // WT) * (NCH * WT) + rows % WT) * 16
            CS: tl.constexpr = WT * 16
        else:
            row_w = rows * (NCH * 16)
            CS: tl.constexpr = 16
        x_row = tok.to(tl.int64) * stride_xm
        t = tl.arange(0, 16)
        if RUNG == 3:
            acc = tl.zeros((R, BM), tl.float32)
            for c in range(NCH):
                acc = _step4s(acc, c * 128, Wp, Sp, row_w, row_s, r >= 0, X, x_row, x_ok, R, BM,
                              128, 2, MDT, 1, CS, SCS)
            g, u = tl.split(tl.permute(tl.reshape(acc, (2, BN, BM)), (1, 2, 0)))
            a = g / (1.0 + tl.exp(-g)) * u
            slot = (b * BM + mr).to(tl.int64)
            cols = jt * BN + tl.arange(0, BN)
            tl.store(ACT + slot[None, :] * I + cols[:, None], a.to(ACT.dtype.element_ty),
                     mask=x_ok[None, :])
        elif RUNG == 0:
            acc = tl.zeros((R, 16), tl.int32)
            for c in range(NCH):
                acc ^= tl.load(Wp + row_w[:, None] + c * CS + t[None, :])
            v = tl.reduce(tl.reduce(acc, 1, _xor), 0, _xor)
            tl.store(OUT + tile, v.to(tl.float32, bitcast=True))
        else:
            accx = tl.zeros((32, BM), tl.float32)
            accs = tl.zeros((R, 4), tl.float32)
            accw = tl.zeros((R, 32), tl.float32)
            accb = tl.zeros((R, 16), tl.float32)
            for c in range(NCH):
                w = tl.load(Wp + row_w[:, None] + c * CS + t[None, :])
                s4 = tl.load(Sp + row_s[:, None] + c * SCS + tl.arange(0, 4)[None, :])
                accs += s4.to(tl.float32)
                s02, s13 = tl.split(tl.reshape(s4, (R, 2, 2)))
                s0, s2 = tl.split(s02)
                s1, s3 = tl.split(s13)
                if RUNG == 1:  # keeps the words live: one AND per word (G2's unpack replaces it)
                    accb += (w & 1).to(tl.float32)
                for j in tl.static_range(4):
                    kx = c * 128 + 32 * j + tl.arange(0, 32)
                    accx += tl.load(X + x_row[None, :] + kx[:, None], mask=x_ok[None, :],
                                    other=0.0).to(tl.float32)
                    if RUNG == 2:
                        if j == 0:
                            sj = s0
                        elif j == 1:
                            sj = s1
                        elif j == 2:
                            sj = s2
                        else:
                            sj = s3
                        accw += _dq16(w, j, sj, R, 2, MDT).to(tl.float32)
            v = tl.sum(tl.sum(accx, 1), 0) + tl.sum(tl.sum(accs, 1), 0)
            v += tl.sum(tl.sum(accw, 1), 0) + tl.sum(tl.sum(accb, 1), 0)
            tl.store(OUT + tile, v)


@triton.jit
def _gu_ladder_kernel(X, W, S, SORTED, BLKEXP, OUT, ACT, num_pairs, ntiles, stride_xm,
                      stride_we, stride_se, H: tl.constexpr, I: tl.constexpr, KP: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, RUNG: tl.constexpr,
                      TILED: tl.constexpr, PERSIST: tl.constexpr, NPROG: tl.constexpr,
                      MDT: tl.constexpr, WT: tl.constexpr, ST: tl.constexpr):
    pid = tl.program_id(0)
    if PERSIST:
        for tile in range(pid, ntiles, NPROG):
            _gu_tile(X, W, S, SORTED, BLKEXP, OUT, ACT, tile, num_pairs, stride_xm, stride_we,
                     stride_se, H, I, KP, BM, BN, RUNG, TILED, MDT, WT, ST)
    else:
        _gu_tile(X, W, S, SORTED, BLKEXP, OUT, ACT, pid, num_pairs, stride_xm, stride_we,
                 stride_se, H, I, KP, BM, BN, RUNG, TILED, MDT, WT, ST)


def tile_weights(w13: torch.Tensor, BN: int) -> torch.Tensor:
    """[E, 2I, H/128, 16] int32 -> the row-tiled copy [E, I/BN, H/128, 2BN, 16]: tile jt holds
    gate rows jt*BN.. then up rows I + jt*BN.., chunk-major (see the module docstring)."""
    E, two_i, nch, _ = w13.shape
    i = two_i // 2
    g = w13[:, :i].reshape(E, i // BN, BN, nch, 16)
    u = w13[:, i:].reshape(E, i // BN, BN, nch, 16)
    return torch.cat([g, u], dim=2).permute(0, 1, 3, 2, 4).contiguous()


def gate_up_rung(rung: int, x, w13, s13, sorted_pairs, block_expert, out, act, *, top_k: int,
                 BN: int, BM: int = 16, warps: int = 4, stages: int = 3, tiled: bool = False,
                 nprog: int = 0, mdt: int = 0, wt: int = 0, st: int = 0):
    """Launch one rung. x [M, H] bf16; w13 [E, 2I, H/128, 16] int32 (or its `tile_weights`
    copy when tiled); s13 [E, 2I, H/32] bf16; out fp32 [ntiles] (G0-G2); act [slots, I] (G3);
    nprog > 0: persistent with that many programs; mdt 0: bf16 dequantized weights and MMAs
    (production), 1: fp16 (the interpreter's tests: it mishandles bf16 dots); wt / st > 0: w13
    / s13 are kernels/moe_ref.tile_rows copies with that many rows per tile (tiled must be
    False)."""
    M, H = x.shape
    I = s13[0].numel() // (H // 32) // 2  # s13 may be a tiled copy
    ntiles = block_expert.numel() * (I // BN)
    grid = min(nprog, ntiles) if nprog else ntiles
    _gu_ladder_kernel[(grid,)](
        x, w13, s13, sorted_pairs, block_expert, out, act, M * top_k, ntiles, x.stride(0),
        w13.stride(0), s13.stride(0), H=H, I=I, KP=top_k, BM=BM, BN=BN, RUNG=rung,
        TILED=tiled, PERSIST=nprog > 0, NPROG=max(nprog, 1), MDT=mdt, WT=wt, ST=st,
        num_warps=warps, num_stages=stages)


def _block_rows(sorted_pairs, block_expert, P: int, top_k: int, BM: int):
    """(slot, expert, token) of every real pair of the sorted tables."""
    sp, be = sorted_pairs.cpu().tolist(), block_expert.cpu().tolist()
    return [(slot, be[slot // BM], p // top_k) for slot, p in enumerate(sp) if p < P]


def ref_gate_up(x, d13, sorted_pairs, block_expert, *, top_k: int, BM: int = 16):
    """fp64 act [slots, I]: silu(g) * u for each real pair's slot (other slots NaN); d13 the
    dequantized weights [E, 2I, H]."""
    I = d13.shape[1] // 2
    out = torch.full((block_expert.numel() * BM, I), float("nan"), dtype=torch.float64)
    xd = x.double().cpu()
    for slot, e, tok in _block_rows(sorted_pairs, block_expert, x.shape[0] * top_k, top_k, BM):
        y = d13[e].double() @ xd[tok]
        out[slot] = y[:I] / (1 + torch.exp(-y[:I])) * y[I:]
    return out


def ref_rung_sums(rung: int, x, w13, s13, d13, sorted_pairs, block_expert, *, top_k: int,
                  BN: int, BM: int = 16, mdt: int = 0) -> dict:
    """{tile: what G0-G2 write} for the tiles of real blocks: G0 the int32 xor of the tile's
    words (python int), G1 sum(scales) + sum(x rows of its pairs) + #words with bit 0 set,
    G2 the same with sum(bf16 or fp16 (q * s)) instead of the word count (fp64)."""
    I = w13.shape[1] // 2
    nj = I // BN
    be = block_expert.cpu().tolist()
    rows_of = _block_rows(sorted_pairs, block_expert, x.shape[0] * top_k, top_k, BM)
    res = {}
    for tile in range(len(be) * nj):
        b, jt = divmod(tile, nj)
        e = be[b]
        if e < 0:
            continue
        n = torch.arange(jt * BN, jt * BN + BN)
        rows = torch.cat([n, I + n])
        w = w13[e].cpu()[rows]
        if rung == 0:
            v = 0
            for word in w.reshape(-1).tolist():
                v ^= word
            res[tile] = v
            continue
        v = float(s13[e].cpu()[rows].double().sum())
        v += sum(float(x[tok].double().sum()) for slot, _, tok in rows_of if slot // BM == b)
        if rung == 2:  # q * s rounded to the 16-bit type once, as `_dq16`
            v += float(d13[e][rows].to(torch.float16 if mdt else torch.bfloat16).double().sum())
        else:
            v += float((w & 1).sum())
        res[tile] = v
    return res
