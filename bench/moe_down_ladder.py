"""4-bit MoE down-kernel ladder: where the M >= 64 down kernel's time goes (issue 6 / 7).

    python3 bench/moe_down_ladder.py --out $OUT/moe-down-ladder-h200.json [--ms 64,256]
                                     [--budget-s 120]

After session 7 the int4 MoE at M = 64 / 256 spends ~116 / ~165 µs in down + reduce for a third
of the expert bytes (~0.58 of copy) against the gate_up's ~0.72 (bench/RESULTS.md). The rungs
of bench/moe_down_ladder_kernels.py keep the production down kernel's grid and per-program
tiles and add one piece of its work at a time (D0 weight words, D1 + scales and the block's
activation rows, D2 the whole K loop, D3 + the y store), each also on a row-tiled copy of w2
("t16": one 128-K chunk of 16 consecutive rows contiguous, as w13 since session 5). PROD is the
production `_down_block_kernel` itself at the int4 M > 16 defaults on the same tables.

Shapes: Kimi-K2.5 TP8 rank (H 7168, I 256, E 384, top-8), random int4 words and bf16 scales,
uniform random routing (8 rotated sets: past the 50 MB L2), align tables and activations made
once per set (not timed). Timing: bench/kernels_moe.time_calls (median of CUDA-graph replays).
Ratio = bytes the rung reads (distinct experts x (D0: w2 words; D1+: words + scales)) / time /
copy bandwidth in the same run. Check (D3, PROD): four real pairs' y rows against torch on the
dequantized expert. After --budget-s nothing new is timed; the table and JSON rows {"m", "rung",
"BN", "warps", "stages", "wt", "time_us", "bytes", "ratio", "copy_GBps", "check"} are written.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

H, I, E, TOPK, ROT, BM = 7168, 256, 384, 8, 8, 16
CONFIGS = [(128, 4, 3), (64, 4, 3)]  # (BN rows, warps, stages): the int4 default first
# (name, rung (None: PROD), w2 rows per tile (1: row-major))
RUNGS = [("PROD", None, 1), ("D0", 0, 1), ("D1", 1, 1), ("D2", 2, 1), ("D3", 3, 1),
         ("D0t16", 0, 16), ("D1t16", 1, 16), ("D2t16", 2, 16), ("D3t16", 3, 16)]


def make_sets(M: int):
    """ROT sets (ids, sorted_pairs, block_expert, act, y) and the mean distinct experts."""
    from atom_stream.kernels.moe_align import moe_align
    sets = []
    for _ in range(ROT):
        ids = torch.rand(M, E, device="cuda").topk(TOPK, dim=-1).indices.int()
        sp, be = moe_align(ids, E, BM)
        act = torch.randn(be.numel() * BM, I, device="cuda").bfloat16()
        sets.append((ids, sp, be, act, torch.empty(M * TOPK, H, device="cuda",
                                                   dtype=torch.bfloat16)))
    return sets, statistics.mean(s[0].unique().numel() for s in sets)


def check_y(y, act, w2, s2, sp, be, P: int) -> str:
    """Four real pairs' y rows against torch on their dequantized expert."""
    from atom_stream.kernels import moe_ref as R
    torch.cuda.synchronize()
    spc, bec = sp.cpu().tolist(), be.cpu().tolist()
    real = [(s, p) for s, p in enumerate(spc) if p < P]
    errs = []
    for s, p in real[:: max(1, len(real) // 4)][:4]:
        e = bec[s // BM]
        d = R.dequant_int4(R.unrepack_int4(w2[e].cpu()), s2[e].cpu()).bfloat16().double()
        ref = d @ act[s].double().cpu()
        got = y[p].double().cpu()
        if not torch.isfinite(got).all():
            return f"FAIL pair {p} unwritten"
        errs.append(float((got - ref).norm() / ref.norm()))
    return "ok" if max(errs) < 1e-2 else f"FAIL rel {max(errs):.2e}"


def main(argv=None) -> None:
    t0 = time.time()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "moe-down-ladder-h200.json"))
    ap.add_argument("--ms", default="64,256")
    ap.add_argument("--budget-s", type=float, default=120.0, help="no new timing after this")
    args = ap.parse_args(argv)
    assert torch.cuda.is_available(), "bench/moe_down_ladder.py needs a GPU"
    import moe_down_ladder_kernels as L
    from kernels_moe import copy_bandwidth
    from ladder_common import rung_row, time_rung, write_rows
    copy = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}  copy {copy:.0f} GB/s", flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    w2 = torch.randint(-2**31, 2**31 - 1, (E, H, I // 128, 16), generator=g, device="cuda",
                       dtype=torch.int32)
    s2 = (torch.rand(E, H, I // 32, generator=g, device="cuda") * 0.004 + 0.002).bfloat16()
    tiled = {1: (w2, s2), 16: L.tile_w2(w2, s2, 16)}
    rows = []
    print(f"{'M':>4} {'rung':<7}{'BN':>4}{'W':>3}{'S':>3}{'us':>9}{'ratio':>7}{'vs PROD':>8}  check")
    for M in (int(m) for m in args.ms.split(",")):
        sets, distinct = make_sets(M)
        P = M * TOPK
        nbytes = {0: int(distinct * w2[0].numel() * 4)}
        nbytes[1] = nbytes[0] + int(distinct * s2[0].numel() * 2)
        nblk = max(s[2].numel() for s in sets)
        for BN, warps, stages in CONFIGS:
            out = torch.empty(nblk * (H // BN), device="cuda")
            prod_t = None
            for name, rung, wt in RUNGS:
                if time.time() - t0 > args.budget_s:
                    print(f"budget: skipped M={M} {name} BN{BN}", flush=True)
                    continue
                w, s = tiled[wt]
                if rung is None:
                    calls = [L.prod_down(act, w2, s2, ids, sp, be, y, num_pairs=P, BN=BN,
                                         warps=warps, stages=stages)
                             for ids, sp, be, act, y in sets]
                else:
                    calls = [functools.partial(L.down_rung, rung, act, w, s, sp, be, y, out,
                                               num_pairs=P, BN=BN, warps=warps, stages=stages,
                                               wt=wt)
                             for _ids, sp, be, act, y in sets]
                check = None
                if rung is None or rung == 3:
                    def check(c=calls[0], s=sets[0], P=P):
                        s[4].fill_(float("nan"))
                        c()
                        return check_y(s[4], s[3], w2, s2, s[1], s[2], P)
                got = time_rung(calls, check, tag=f"{M:>4} {name:<7} BN{BN}")
                if got is None:
                    continue
                t, chk = got
                if rung is None:
                    prod_t = t
                rows.append(rung_row(f"{M:>4} {name:<7}{BN:>4}{warps:>3}{stages:>3}", t,
                                     nbytes[0 if rung == 0 else 1], copy, prod_t, chk, m=M,
                                     rung=name, BN=BN, warps=warps, stages=stages, wt=wt,
                                     distinct=distinct))
        del sets
    write_rows(args.out, rows, t0)


if __name__ == "__main__":
    main()
