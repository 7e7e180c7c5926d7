"""Decode-size dense projections: kernels/gemv.py (one launch, no split-K) against cuBLAS in the
same run, at one Kimi-K2.5 TP8 rank's shapes (hidden 7168), M = 1, 2, 4 rows, bf16 weights:
q_a+kv_a 2112x7168, router+shared gate/up 896x7168 (fp32 out), o_proj 7168x1024, q_b 1536x1536,
shared down 7168x256 (added in place into the routed output), lm_head shard 20480x7168 (fp32
out). cuBLAS is what the model runs otherwise: F.linear, torch.mm(out_dtype=float32), addmm_.
Time: median of CUDA-graph replays over 4 weight copies (no L2 reuse); the gemv's default config
and a few alternatives. Ratio: bytes / time / copy bandwidth measured in this run.

    python3 bench/dense_gemv.py --out $OUT/dense-gemv-h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from atom_stream.kernels import gemv as gv

from kernels import copy_bandwidth, time_calls

SHAPES = {"qa_kva": (2112, 7168, "bf16"), "router_shared": (896, 7168, "fp32"),
          "o_proj": (7168, 1024, "bf16"), "q_b": (1536, 1536, "bf16"),
          "shared_down": (7168, 256, "add"), "lm_head": (20480, 7168, "fp32")}
ALTERNATIVES = [{"BLOCK_K": 512}, {"BLOCK_K": 1024}, {"num_warps": 8}, {"num_warps": 2},
                {"num_warps": 8, "BLOCK_K": 2048},
                # session 18 (bench/persistent_chain.py): rows p, p + G, ... per program
                # (STRIDED) and the K loop unrolled (UNROLL: every step's loads in flight)
                {"num_warps": 8, "BLOCK_K": 2048, "UNROLL": True},
                {"BLOCK_N": 4, "BLOCK_K": 4096, "num_warps": 8, "STRIDED": True},
                {"BLOCK_N": 4, "BLOCK_K": 4096, "num_warps": 8, "STRIDED": True, "UNROLL": True},
                {"BLOCK_N": 2, "BLOCK_K": 8192, "num_warps": 8, "STRIDED": True},
                {"BLOCK_N": 8, "BLOCK_K": 2048, "num_warps": 8, "STRIDED": True, "UNROLL": True},
                {"BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 8, "UNROLL": True},
                {"BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 8, "STRIDED": True, "UNROLL": True},
                {"BLOCK_N": 16, "BLOCK_K": 1024, "num_warps": 8, "STRIDED": True, "UNROLL": True},
                {"BLOCK_N": 8, "BLOCK_K": 1024, "num_warps": 4, "STRIDED": True, "UNROLL": True},
                {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 8, "STRIDED": True},
                {"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 8, "STRIDED": True}]


def make_calls(kind, x, add, ws, cfg, cublas=False):
    """One zero-argument call per weight copy: cuBLAS (the model's non-GEMV path) or the gemv."""
    if cublas:
        if kind == "fp32":
            return [lambda w=w: torch.mm(x, w.t(), out_dtype=torch.float32) for w in ws]
        if kind == "add":
            return [lambda w=w: add.addmm_(x, w.t()) for w in ws]
        return [lambda w=w: F.linear(x, w) for w in ws]
    if kind == "fp32":
        return [lambda w=w: gv.gemv(x, w, out_dtype=torch.float32, config=cfg) for w in ws]
    if kind == "add":
        return [lambda w=w: gv.gemv(x, w, add=add, out=add, config=cfg) for w in ws]
    return [lambda w=w: gv.gemv(x, w, config=cfg) for w in ws]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default="1,2,4")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="subset of " + ",".join(SHAPES))
    ap.add_argument("--out", default="bench/results/dense-gemv.json")
    args = ap.parse_args(argv)
    copy = copy_bandwidth(warm_s=1.0)
    dt, rows = torch.bfloat16, []
    print(f"copy {copy:.0f} GB/s")
    print(f"{'shape':<14}{'M':>3}{'cuBLAS':>9}{'gemv':>9}{'best':>9}  best config")
    for name in args.shapes.split(","):
        N, K, kind = SHAPES[name]
        ws = [torch.randn(N, K, device="cuda", dtype=dt) * 0.02 for _ in range(4)]
        for M in [int(m) for m in args.m.split(",")]:
            x = torch.randn(M, K, device="cuda", dtype=dt)
            add = torch.randn(M, N, device="cuda", dtype=dt)
            ref = make_calls(kind, x, add, ws, None, cublas=True)
            t_ref = time_calls(ref)
            t_def = time_calls(make_calls(kind, x, add, ws, None))
            best = (t_def, "default")
            alts = {}
            for alt in ALTERNATIVES:
                t = time_calls(make_calls(kind, x, add, ws, alt))
                alts[json.dumps(alt)] = round(t, 3)
                if t < best[0]:
                    best = (t, json.dumps(alt))
            nbytes = N * K * 2
            cfg = gv.default_config(M, N, K, x.device)
            rows.append({"shape": name, "N": N, "K": K, "m": M, "cublas_us": round(t_ref, 3),
                         "gemv_us": round(t_def, 3), "gemv_best_us": round(best[0], 3),
                         "best": best[1], "alternatives_us": alts, "default": cfg,
                         "bytes": nbytes,
                         "copy_GBps": round(copy, 1),
                         "ratio_cublas": round(nbytes / (t_ref * 1e-6) / (copy * 1e9), 4),
                         "ratio_gemv": round(nbytes / (t_def * 1e-6) / (copy * 1e9), 4)})
            print(f"{name:<14}{M:>3}{t_ref:>9.2f}{t_def:>9.2f}{best[0]:>9.2f}  {best[1]} "
                  f"(default {cfg['BLOCK_N']}x{cfg['BLOCK_K']})")
    write_rows(args.out, copy, rows)


def write_rows(path: str, copy: float, rows: list) -> None:
    """The bench's JSON: {"gpu", "copy_GBps", "rows"} at `path` (folders made)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "copy_GBps": copy, "rows": rows}, f,
                  indent=1)


if __name__ == "__main__":
    main()
