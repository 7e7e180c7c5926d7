"""Decode-size dense projections: kernels/skinny_gemm.py against torch (cuBLAS) in the same run.

Shapes: one Kimi-K2.5 TP8 rank (hidden 7168): fused q_a+kv_a 2112x7168, q_a 1536x7168, kv_a
576x7168, q_b 1536x1536, o_proj 7168x1024, shared gate_up 512x7168, shared down 7168x256,
lm_head shard 20480x7168; M = 1, 4, 16. bf16. Time: median of CUDA-graph replays over 4 weight
copies (no L2 reuse); bytes = W + x + y; ratio against the copy bandwidth measured in this run.
For each shape the skinny kernel's default config and a few alternatives are timed.

    python3 bench/skinny_gemm.py --out $OUT/skinny-gemm-h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import copy_bandwidth, make_row, print_table, time_calls  # noqa: E402  (bench/)

from atom_stream.kernels import skinny_gemm as sg  # noqa: E402

SHAPES = {"qa_kva": (2112, 7168), "q_a": (1536, 7168), "kv_a": (576, 7168),
          "q_b": (1536, 1536), "o_proj": (7168, 1024), "shared_gate_up": (512, 7168),
          "shared_down": (7168, 256), "lm_head": (20480, 7168)}
ALTERNATIVES = [{"BLOCK_N": 16}, {"BLOCK_N": 64}, {"BLOCK_K": 128}, {"num_stages": 4},
                {"num_warps": 8}]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default="1,4,16")
    ap.add_argument("--out", default="bench/results/skinny-gemm.json")
    args = ap.parse_args(argv)
    copy = copy_bandwidth(warm_s=1.0)
    rows = []
    for name, (N, K) in SHAPES.items():
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K ** -0.5
              for _ in range(4)]
        for M in (int(m) for m in args.m.split(",")):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            nbytes = 2 * (N * K + M * K + M * N)
            t_torch = time_calls([lambda w=w: torch.nn.functional.linear(x, w) for w in ws])
            rows.append(make_row(f"{name}_torch", M, 0, N, t_torch, nbytes, copy))
            best = (float("inf"), None)
            for alt in [None] + ALTERNATIVES:
                try:
                    t = time_calls([lambda w=w, a=alt: sg.skinny_linear(x, w, a) for w in ws])
                except Exception as e:  # noqa: BLE001 - a config the compiler refuses
                    print(f"{name} M={M} {alt}: {type(e).__name__}: {e}"[:200])
                    continue
                if alt is None:
                    rows.append(make_row(f"{name}_skinny", M, 0, N, t, nbytes, copy))
                if t < best[0]:
                    best = (t, alt)
            rows.append(dict(make_row(f"{name}_skinny_best", M, 0, N, best[0], nbytes, copy),
                             config=best[1]))
            print(f"{name:16s} M={M:3d} torch {t_torch:8.2f} us  skinny(default) "
                  f"{rows[-2]['time_us']:8.2f}  best {best[0]:8.2f} {best[1]}", flush=True)
        del ws
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print_table(rows)


if __name__ == "__main__":
    main()
