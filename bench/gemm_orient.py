"""Decode-size dense GEMMs on cuBLAS in both orientations: y = x @ W^T as F.linear (what the
model runs; cuBLAS picks split-K tiles such as nvjet 64x16 + a splitKreduce kernel at M=16) vs
y^T = W @ x^T (torch.mm(w, x.t()): the weights as the GEMM's M side, a different heuristic
choice), the latter also with the transpose copied back (.t().contiguous(), what a consumer
needing row-major y would pay). One Kimi-K2.5 TP8 rank's shapes, bf16, median of CUDA-graph
replays over 4 weight copies (no L2 reuse); ratio = weight bytes / time / copy bandwidth.

    python3 bench/gemm_orient.py --m 8,16,32,64 --out $OUT/gemm-orient-h200.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dense_gemv import SHAPES as GEMV_SHAPES
from dense_gemv import write_rows

from kernels import copy_bandwidth, time_calls

# dense_gemv's decode projections (bf16 weights [N, K]) but the lm_head shard
SHAPES = {name: (N, K) for name, (N, K, _) in GEMV_SHAPES.items() if name != "lm_head"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default="8,16,32,64")
    ap.add_argument("--out", default="bench/results/gemm-orient.json")
    args = ap.parse_args(argv)
    copy = copy_bandwidth(warm_s=1.0)
    rows = []
    print(f"copy {copy:.0f} GB/s")
    print(f"{'shape':<14}{'M':>4}{'x@W^T':>9}{'W@x^T':>9}{'+copy':>9}{'ratio':>7}{'ratio T':>8}")
    for name, (N, K) in SHAPES.items():
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(4)]
        for M in [int(m) for m in args.m.split(",")]:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x, ws[0])
            got = torch.mm(ws[0], x.t()).t()
            assert torch.allclose(ref.float(), got.float(), atol=2e-2, rtol=2e-2)
            t_lin = time_calls([lambda w=w, x=x: F.linear(x, w) for w in ws])
            t_t = time_calls([lambda w=w, x=x: torch.mm(w, x.t()) for w in ws])
            t_tc = time_calls([lambda w=w, x=x: torch.mm(w, x.t()).t().contiguous() for w in ws])
            nbytes = N * K * 2
            r = {"shape": name, "N": N, "K": K, "m": M, "linear_us": round(t_lin, 3),
                 "mm_t_us": round(t_t, 3), "mm_t_copy_us": round(t_tc, 3), "bytes": nbytes,
                 "copy_GBps": round(copy, 1),
                 "ratio_linear": round(nbytes / (t_lin * 1e-6) / (copy * 1e9), 4),
                 "ratio_mm_t": round(nbytes / (t_t * 1e-6) / (copy * 1e9), 4)}
            rows.append(r)
            print(f"{name:<14}{M:>4}{t_lin:>9.2f}{t_t:>9.2f}{t_tc:>9.2f}"
                  f"{r['ratio_linear']:>7.2f}{r['ratio_mm_t']:>8.2f}")
    write_rows(args.out, copy, rows)


if __name__ == "__main__":
    main()
