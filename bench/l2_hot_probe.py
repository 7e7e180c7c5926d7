"""How much of a decode kernel's time is its weights' trip from HBM? Cold vs L2-hot (issue 7).

Before building any "request the next kernel's weights into L2 early" scheme (e.g. the M=1 MoE's
down weights asked for by spare programs of its gate_up launch), measure what an L2-hot read
would buy: each kernel of one Kimi-K2.5 TP8 rank's decode layer is timed twice,

  cold  CUDA-graph replays over ROT rotated weight copies / routings (past the 50 MB L2),
  hot   the same single call replayed (its weights stay in L2 between calls),

so cold - hot is the most any L2 prefetch could save for that kernel. Kernels: the 4-bit MoE at
M = 1 (fused_moe's dispatch on int4 g32 experts, w13 row-tiled as the model loads them: whole
MoE, and the gate_up alone), the dense GEMV (kernels/gemv.py at the model's configs) at M = 1 and
cuBLAS at M = 16 for
q_a+kv_a (2112 x 7168), o_proj (7168 x 1024), router + shared gate/up (896 x 7168).

    python3 bench/l2_hot_probe.py --out $OUT/l2-hot-probe-h200.json

Prints a table (kernel, M, cold µs, hot µs, cold - hot, MB read) and writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from kernels_moe import TOPK, E, H, I, expert_bytes, make_sets, make_weights, time_calls

# (N, K, the model's M=1 GEMV config name, output dtype)
DENSE = {"qa_kva": (2112, 7168, "mla.QKV_GEMV_CONFIG", torch.bfloat16),
         "o_proj": (7168, 1024, "mla.O_PROJ_GEMV_CONFIG", torch.bfloat16),
         "router_shared": (896, 7168, "deepseek_v3.ROUTER_GEMV_CONFIG", torch.float32)}
ROT = 8


def _cold_hot(fn, items) -> tuple[float, float]:
    """(µs per call over every item in turn, µs per call of items[0] alone)."""
    return (time_calls([lambda it=it: fn(it) for it in items]),
            time_calls([lambda: fn(items[0])]))


def _moe_rows(dev) -> list:
    from atom_stream.kernels.fused_moe import fused_moe, tile_w13
    from atom_stream.kernels.moe_small_m import moe_small_m
    w = make_weights("int4", dev)
    w13, s13 = tile_w13(w["w13"], w["w13_scale"], 16)
    w2, s2 = w["w2"], w["w2_scale"]
    sets, distinct = make_sets(1, 32, dev)
    mb = distinct * expert_bytes(w) / 1e6

    def whole(s):
        return fused_moe(s[0], w13, w2, s[1], s[2], out=s[3], w13_scale=s13, w2_scale=s2,
                         quant="int4_g32")

    def gate_up(s):
        return moe_small_m(s[0], w13, w2, s13, s2, s[1], s[2], "int4",
                           {"stop_after": "gate_up"}, out=s[3])

    rows = []
    for name, fn in (("moe_int4_whole", whole), ("moe_int4_gate_up", gate_up)):
        cold, hot = _cold_hot(fn, sets)
        rows.append({"kernel": name, "m": 1, "cold_us": cold, "hot_us": hot, "mb": mb})
    return rows


def _dense_rows(dev) -> list:
    from atom_stream.kernels import gemv as gv

    from atom_stream.models import deepseek_v3, mla
    rows = []
    for name, (n, k, cfg_name, out_dtype) in DENSE.items():
        mod, attr = cfg_name.split(".")
        cfg = getattr({"mla": mla, "deepseek_v3": deepseek_v3}[mod], attr)
        ws = [torch.randn(n, k, device=dev).bfloat16() * 0.02 for _ in range(ROT)]
        for m, label in ((1, "gemv"), (16, "cublas")):
            x = torch.randn(m, k, device=dev).bfloat16()
            fn = (functools.partial(gv.gemv, x, out_dtype=out_dtype, config=cfg) if m == 1
                  else functools.partial(F.linear, x))
            cold, hot = _cold_hot(fn, ws)
            rows.append({"kernel": f"{name}_{label}", "m": m, "cold_us": cold, "hot_us": hot,
                         "mb": n * k * 2 / 1e6})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="l2-hot-probe.json")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    assert (E, H, I, TOPK) == (384, 7168, 256, 8)
    rows = _moe_rows(dev) + _dense_rows(dev)
    print(f"{'kernel':>22} {'M':>3} {'cold_us':>8} {'hot_us':>8} {'saved':>7} {'MB':>7}")
    for r in rows:
        r["saved_us"] = r["cold_us"] - r["hot_us"]
        print(f"{r['kernel']:>22} {r['m']:>3} {r['cold_us']:8.2f} {r['hot_us']:8.2f} "
              f"{r['saved_us']:7.2f} {r['mb']:7.1f}")
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
