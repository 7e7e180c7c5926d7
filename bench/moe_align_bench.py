"""MoE sort/align by expert: the one-program kernel vs the one-launch parallel form (issue 6/7).

    python3 bench/moe_align_bench.py [--ms 16,64,256,1024,4096,8192] [--out align.json]

Kimi-K2.5 rank shapes: 384 routed experts + 1 shared column (top-8 + 1 = 9 pairs per token),
BLOCK_M 16, uniform random routing (8 rotated id sets). M up to 455 is a decode batch (one
scan of the ids per program); larger M are prefill chunks (the parallel form's programs then
loop over the ids, kernels/moe_align.PAR_SCAN at a time). Timing: bench/kernels_moe.time_calls
(median of CUDA-graph replays). Checks that both forms give identical tables first. Prints a
table; JSON rows {"m", "pairs", "one_program_us", "parallel_us", "speedup"}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

E, TOPK, SHARED, BM, ROT = 384, 8, 1, 16, 8


def main(argv=None) -> None:
    from atom_stream.kernels.moe_align import max_blocks, moe_align
    from kernels_moe import time_calls
    from report import print_table, save_rows

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", default="16,64,256,1024,4096,8192")
    ap.add_argument("--warps", default="4",
                    help="the parallel form's warps per program, each timed (comma list)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "moe-align-h200.json"))
    args = ap.parse_args(argv)
    assert torch.cuda.is_available(), "bench/moe_align_bench.py needs a GPU"
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for M in (int(v) for v in args.ms.split(",")):
        P = M * (TOPK + SHARED)
        nblk = max_blocks(P, E + SHARED, BM)
        sets = []
        for _ in range(ROT):
            ids = torch.argsort(torch.rand(M, E, generator=g, device="cuda"), dim=1)[:, :TOPK]
            bufs = [(torch.empty(nblk * BM, dtype=torch.int32, device="cuda"),
                     torch.empty(nblk, dtype=torch.int32, device="cuda")) for _ in range(2)]
            sets.append((ids.int().contiguous(), bufs))
        ids, bufs = sets[0]
        for par, buf in zip((False, True), bufs):
            moe_align(ids, E + SHARED, BM, n_shared=SHARED, out=buf, parallel=par)
        same = all(torch.equal(a, b) for a, b in zip(bufs[0], bufs[1]))
        for w in (int(v) for v in args.warps.split(",")):
            moe_align(ids, E + SHARED, BM, n_shared=SHARED, out=bufs[1], parallel=True, warps=w)
            same = same and all(torch.equal(a, b) for a, b in zip(bufs[0], bufs[1]))
        t = {}
        for i, par in enumerate((False, True)):
            t[par] = time_calls([lambda s=s, par=par, i=i: moe_align(
                s[0], E + SHARED, BM, n_shared=SHARED, out=s[1][i], parallel=par)
                for s in sets])
        tw = {w: time_calls([lambda s=s, w=w: moe_align(
            s[0], E + SHARED, BM, n_shared=SHARED, out=s[1][1], parallel=True, warps=w)
            for s in sets]) for w in (int(v) for v in args.warps.split(","))}
        rows.append({"m": M, "pairs": P, "one_program_us": round(t[False], 2),
                     "parallel_us": round(t[True], 2), "speedup": round(t[False] / t[True], 2),
                     "parallel_us_by_warps": {w: round(v, 2) for w, v in tw.items()},
                     "identical": same})
        print(json.dumps(rows[-1]), flush=True)
    save_rows(args.out, rows)
    print_table(rows, [("M", "m", 6, ""), ("pairs", "pairs", 8, ""),
                       ("one-prog us", "one_program_us", 13, ".2f"),
                       ("parallel us", "parallel_us", 13, ".2f"),
                       ("speedup", "speedup", 9, ".2f"),
                       ("same", lambda r: str(r["identical"]), 6, "")], sep="")
    if not all(r["identical"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
