"""Decode-batch dense projections (M = 4..64 rows): kernels/gemm_splitk.py against cuBLAS (with its
own split-K reduce) in the same run, at one Kimi-K2.5 TP8 rank's shapes, bf16 weights: q_a+kv_a
2112x7168, router + shared gate/up 896x7168 (fp32 out), o_proj 7168x1024, the folded q_b
4608x1536, shared down 7168x256 (added into the routed output), lm_head shard 20480x7168 (fp32).
Time: median of CUDA-graph replays over 4 weight copies (no L2 reuse). At the sweep's M every
config of the grid is checked against the torch reference, then timed; at the other M the best
few of the sweep. Ratio: weight bytes / time / copy bandwidth measured in this run.

    python3 bench/splitk_gemm.py --out $OUT/splitk-gemm-h200.json [--budget-s 200]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from triton.runtime.errors import OutOfResources

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from atom_stream.kernels.gemm_splitk import gemm_splitk, gemm_splitk_ref
from dense_gemv import write_rows

from kernels import copy_bandwidth, time_calls

SHAPES = {"qa_kva": (2112, 7168, "bf16"), "router_shared": (896, 7168, "fp32"),
          "o_proj": (7168, 1024, "bf16"), "q_b_folded": (4608, 1536, "bf16"),
          "shared_down": (7168, 256, "add"), "lm_head": (20480, 7168, "fp32")}


def grid() -> list[dict]:
    """The sweep's configs: orientation x tile x K step x split x stages."""
    out = []
    for wm, bn, bk, sp, st, nw in itertools.product((True, False), (32, 64, 128), (64, 128, 256),
                                                    (2, 4, 8, 16), (3, 4, 6), (4, 8)):
        if bn * bk > 128 * 128 or (nw == 8 and bn < 128) or (st == 6 and bk > 128):
            continue
        out.append({"W_AS_M": wm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": sp, "num_warps": nw,
                    "num_stages": st})
    return out


def calls(kind, x, add, ws, cfg):
    """One zero-argument call per weight copy: cuBLAS (cfg None) or gemm_splitk."""
    if cfg is None:
        if kind == "fp32":
            return [lambda w=w: torch.mm(x, w.t(), out_dtype=torch.float32) for w in ws]
        if kind == "add":
            return [lambda w=w: add.addmm_(x, w.t()) for w in ws]
        return [lambda w=w: F.linear(x, w) for w in ws]
    od = torch.float32 if kind == "fp32" else None
    if kind == "add":
        return [lambda w=w: gemm_splitk(x, w, add=add, out=add, config=cfg) for w in ws]
    return [lambda w=w: gemm_splitk(x, w, out_dtype=od, config=cfg) for w in ws]


def check(kind, x, w, cfg) -> bool:
    """The config against the torch reference on this shape (fresh add, output poisoned)."""
    od = torch.float32 if kind == "fp32" else x.dtype
    add = torch.randn(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype) \
        if kind == "add" else None
    out = torch.full((x.shape[0], w.shape[0]), float("nan"), device=x.device, dtype=od)
    y = gemm_splitk(x, w, add=add, out=out, out_dtype=od, config=cfg)
    ref = gemm_splitk_ref(x, w, add=add, out_dtype=od)
    return bool(torch.allclose(y.float(), ref.float(), atol=3e-2, rtol=3e-2))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default="4,8,16,32,64")
    ap.add_argument("--sweep-m", type=int, default=16)
    ap.add_argument("--top", type=int, default=4)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--budget-s", type=float, default=400.0)
    ap.add_argument("--out", default="bench/results/splitk-gemm.json")
    args = ap.parse_args(argv)
    t_end = time.time() + args.budget_s
    copy = copy_bandwidth(warm_s=1.0)
    dt, rows = torch.bfloat16, []
    print(f"copy {copy:.0f} GB/s")
    print(f"{'shape':<14}{'M':>3}{'cuBLAS':>9}{'splitk':>9}{'ratio':>7}  best config")
    ms = [int(m) for m in args.m.split(",")]
    ms = [args.sweep_m] + [m for m in ms if m != args.sweep_m]
    for name in args.shapes.split(","):
        N, K, kind = SHAPES[name]
        ws = [torch.randn(N, K, device="cuda", dtype=dt) * K ** -0.5 for _ in range(4)]
        ranked: list[dict] = []
        for M in ms:
            if time.time() > t_end:
                break
            x = torch.randn(M, K, device="cuda", dtype=dt)
            add = torch.randn(M, N, device="cuda", dtype=dt)
            t_ref = time_calls(calls(kind, x, add, ws, None))
            cfgs = grid() if M == args.sweep_m else ranked[:args.top]
            timed = []
            for cfg in cfgs:
                if time.time() > t_end:
                    break
                try:
                    if not check(kind, x, ws[0], cfg):
                        timed.append((float("inf"), cfg, "FAIL"))
                        continue
                    timed.append((time_calls(calls(kind, x, add, ws, cfg)), cfg, "ok"))
                except OutOfResources:  # shared memory at BLOCK_M 64 x deep stages
                    timed.append((float("inf"), cfg, "oor"))
            timed.sort(key=lambda r: r[0])
            if M == args.sweep_m:
                ranked = [c for t, c, ok in timed if ok == "ok"]
            timed = [r for r in timed if r[2] != "oor"]
            best_t, best_cfg = (timed[0][0], timed[0][1]) if timed else (float("nan"), None)
            nbytes = N * K * 2
            rows.append({"shape": name, "N": N, "K": K, "m": M, "cublas_us": round(t_ref, 3),
                         "splitk_best_us": round(best_t, 3), "best": best_cfg,
                         "fails": sum(1 for r in timed if r[2] != "ok"),
                         "top": [(round(t, 3), c) for t, c, _ in timed[:8]],
                         "bytes": nbytes, "copy_GBps": round(copy, 1),
                         "ratio_cublas": round(nbytes / (t_ref * 1e-6) / (copy * 1e9), 4),
                         "ratio_splitk": round(nbytes / (best_t * 1e-6) / (copy * 1e9), 4)})
            print(f"{name:<14}{M:>3}{t_ref:>9.2f}{best_t:>9.2f}"
                  f"{rows[-1]['ratio_splitk']:>7.3f}  {json.dumps(best_cfg)} "
                  f"(fails {rows[-1]['fails']})", flush=True)
    write_rows(args.out, copy, rows)


if __name__ == "__main__":
    main()
