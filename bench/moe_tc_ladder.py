"""Tensor-core 4-bit MoE gate_up ladder: where the M >= 16 gate_up's time goes (issue 6).

    python3 bench/moe_tc_ladder.py --out $OUT/moe-tc-ladder-h200.json [--ms 64,256] [--budget-s 120]

At M = 64 / 256 the production gate_up (kernels/fused_moe_tc.py, sorted mode) streams the
touched experts' int4 weights at ~0.45 of copy (bench/RESULTS.md, session 3), the down kernel
likewise. The rungs of bench/moe_tc_ladder_kernels.py keep its grid and per-program tiles and
add one piece of its work at a time (G0 weight words, G1 + scale and activation loads, G2 +
dequantization, G3 the whole gate_up), each also on a row-tiled copy of the weights ("t":
contiguous R x 64-byte blocks per chunk; "wN" / "sN": words / scales in tiles of N consecutive
rows, the layout every kernel could share) and with a persistent grid ("p": k x SMs programs
looping over the tiles). PROD is the production `_gate_up_kernel` itself on the same tables.

Shapes: Kimi-K2.5 TP8 rank (H 7168, I 256, E 384, top-8), random int4 words and bf16 scales,
uniform random routing (8 rotated sets: past the 50 MB L2), align tables computed once per set
(not timed). Timing: bench/kernels_moe.time_calls (median of CUDA-graph replays). Ratio = bytes
the rung reads (distinct experts x (G0: words; G1+: words + scales)) / time / copy bandwidth in
the same run. Check (G3, PROD): four real slots against torch on the dequantized expert. After
--budget-s nothing new is timed; the table and JSON rows {"m", "rung", "BN", "warps", "stages",
"tiled", "nprog", "wt", "st", "time_us", "bytes", "ratio", "copy_GBps", "check"} are written in any case.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

H, I, E, TOPK, ROT, BM = 7168, 256, 384, 8, 8, 16
DEV = "cuda"
# (BN, warps, stages): M=64/256 int4 production tiles first, then the M<=16 / MXFP4 ones
CONFIGS = [(64, 4, 3), (32, 2, 3), (16, 2, 3)]
# (name, rung, pair-tiled, persistent programs per SM (0: one per tile), word tile rows, scale
# tile rows): "t" = `tile_weights` (a program's 2 BN rows as one block per chunk), "wN" / "sN" =
# kernels/moe_ref.tile_rows copies of the words / scales with N consecutive rows per tile
RUNGS = [("PROD", None, False, 0, 0, 0), ("G0", 0, False, 0, 0, 0), ("G0w16", 0, False, 0, 16, 0),
         ("G1", 1, False, 0, 0, 0), ("G1t", 1, True, 0, 0, 0), ("G1w16s16", 1, False, 0, 16, 16),
         ("G3", 3, False, 0, 0, 0), ("G3t", 3, True, 0, 0, 0), ("G3w16", 3, False, 0, 16, 0),
         ("G3w32", 3, False, 0, 32, 0), ("G3w16s16", 3, False, 0, 16, 16),
         ("G3w32s32", 3, False, 0, 32, 32), ("G3w64s64", 3, False, 0, 64, 64),
         ("G3w16s64", 3, False, 0, 16, 64), ("G3w16s16p3", 3, False, 3, 16, 16)]


def make_data(dev, M: int):
    """(w13, s13: the same random experts for every M (seed 0), ROT sets (x, ids, sorted,
    block_expert), mean distinct experts per set)."""
    from atom_stream.kernels.moe_align import moe_align
    g = torch.Generator(device=dev).manual_seed(0)
    w13 = torch.randint(-2**31, 2**31 - 1, (E, 2 * I, H // 128, 16), generator=g, device=dev,
                        dtype=torch.int32)
    s13 = (torch.rand(E, 2 * I, H // 32, generator=g, device=dev) * 0.004 + 0.002).bfloat16()
    sets = []
    for _ in range(ROT):
        ids = torch.rand(M, E, device=dev).topk(TOPK, dim=-1).indices.int()
        x = torch.randn(M, H, device=dev).bfloat16()
        sp, be = moe_align(ids, E, BM)
        sets.append((x, ids, sp, be))
    distinct = statistics.mean(s[1].unique().numel() for s in sets)
    return w13, s13, sets, distinct


def prod_call(x, w13, s13, ids, sp, be, act, BN, warps, stages):
    from atom_stream.kernels.fused_moe_common import BF16, INT4
    from atom_stream.kernels.fused_moe_tc import _gate_up_kernel
    M = x.shape[0]
    return lambda: _gate_up_kernel[(be.numel(), I // BN)](
        x, x, w13, s13, ids, sp, be, act, act, act, M, M * TOPK, x.stride(0), 0, ids.stride(0),
        w13.stride(0), s13.stride(0), I=I, H=H, TOPK=TOPK, KP=TOPK, KPP=TOPK, N_ROUTED=E,
        W_ROW=(H // 128) * 16, S_ROW=H // 32, NBI=I // 128, BM=BM, BN=BN, BK=128, FMT=INT4,
        ACT_Q=0, MDT=BF16, DIRECT=False, ACT_OUT=0, OFFS=1, ASTATIC=False, DQ=1, XM=0,
        num_warps=warps, num_stages=stages)


def check_act(act, x, w13, s13, sp, be, M: int) -> str:
    """Four real slots of act against torch on their dequantized expert."""
    from atom_stream.kernels import moe_ref as R
    torch.cuda.synchronize()
    spc, bec = sp.cpu().tolist(), be.cpu().tolist()
    real = [s for s, p in enumerate(spc) if p < M * TOPK]
    errs = []
    for slot in real[:: max(1, len(real) // 4)][:4]:
        e, tok = bec[slot // BM], spc[slot] // TOPK
        d = R.dequant_int4(R.unrepack_int4(w13[e]), s13[e]).bfloat16().double()
        y = d @ x[tok].double()
        ref = y[:I] / (1 + torch.exp(-y[:I])) * y[I:]
        got = act[slot].double()
        if not torch.isfinite(got).all():
            return f"FAIL slot {slot} unwritten"
        errs.append(float((got - ref).norm() / ref.norm()))
    return "ok" if max(errs) < 1e-2 else f"FAIL rel {max(errs):.2e}"


def main(argv=None) -> None:
    t0 = time.time()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "moe-tc-ladder-h200.json"))
    ap.add_argument("--ms", default="64,256")
    ap.add_argument("--budget-s", type=float, default=120.0, help="no new timing after this")
    ap.add_argument("--configs", default="", help="indices into CONFIGS, e.g. 0,1 (all)")
    args = ap.parse_args(argv)
    import moe_tc_ladder_kernels as L
    from atom_stream.kernels import moe_ref as R
    from kernels_moe import copy_bandwidth
    from ladder_common import rung_row, time_rung, write_rows
    copy = copy_bandwidth()
    nsm = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"device: {torch.cuda.get_device_name()}  copy {copy:.0f} GB/s  SMs {nsm}", flush=True)
    cfgs = [CONFIGS[int(i)] for i in args.configs.split(",")] if args.configs else CONFIGS
    rows = []
    ms = [int(m) for m in args.ms.split(",")]
    w13, s13, sets_of, distinct_of = None, None, {}, {}
    for M in ms:
        w13, s13, sets_of[M], distinct_of[M] = make_data(DEV, M)  # same weights (seed 0)
    tiled = {}
    s13v = s13.view(E, 2 * I, H // 128, 4)
    for T in sorted({r[4] for r in RUNGS if r[4]} | {r[5] for r in RUNGS if r[5]}):
        tiled["w", T] = R.tile_rows(w13, T)
        tiled["s", T] = R.tile_rows(s13v, T)
    print(f"{'M':>4} {'rung':<11}{'BN':>4}{'W':>3}{'S':>3}{'us':>9}{'ratio':>7}{'vs PROD':>8}  check")
    for BN, warps, stages in cfgs:
        if BN not in tiled:
            tiled[BN] = L.tile_weights(w13, BN)
        for M in ms:
            sets, distinct = sets_of[M], distinct_of[M]
            nbytes = {0: int(distinct * w13[0].numel() * 4)}
            nbytes[1] = nbytes[0] + int(distinct * s13[0].numel() * 2)
            nblk = max(s[3].numel() for s in sets)
            out = torch.empty(nblk * (I // BN), device=DEV)
            act = torch.empty(nblk * BM, I, device=DEV, dtype=torch.bfloat16)
            prod_t = None
            for name, rung, til, k, wt, st in RUNGS:
                if time.time() - t0 > args.budget_s:
                    print(f"budget: skipped M={M} {name} BN{BN}", flush=True)
                    continue
                w = tiled[BN] if til else (tiled["w", wt] if wt else w13)
                sc = tiled["s", st] if st else s13
                if rung is None:
                    calls = [prod_call(x, w13, s13, ids, sp, be, act, BN, warps, stages)
                             for x, ids, sp, be in sets]
                else:
                    kw = {"top_k": TOPK, "BN": BN, "warps": warps, "stages": stages,
                          "tiled": til, "nprog": k * nsm, "wt": wt, "st": st}
                    calls = [lambda x=x, sp=sp, be=be, r=rung, w=w, sc=sc, o=out, a=act, kw=kw:
                             L.gate_up_rung(r, x, w, sc, sp, be, o, a, **kw)
                             for x, _ids, sp, be in sets]
                check = None
                if rung is None or rung == 3:
                    def check(c=calls[0], s=sets[0], a=act, M=M):
                        a.fill_(float("nan"))
                        c()
                        return check_act(a, s[0], w13, s13, s[2], s[3], M)
                got = time_rung(calls, check, tag=f"{M:>4} {name:<6} BN{BN}")
                if got is None:
                    continue
                t, chk = got
                if rung is None:
                    prod_t = t
                rows.append(rung_row(f"{M:>4} {name:<11}{BN:>4}{warps:>3}{stages:>3}", t,
                                     nbytes[0 if rung == 0 else 1], copy, prod_t, chk, m=M,
                                     rung=name, BN=BN, warps=warps, stages=stages, tiled=til,
                                     nprog=k * nsm, wt=wt, st=st, distinct=distinct))
    write_rows(args.out, rows, t0)


if __name__ == "__main__":
    main()
