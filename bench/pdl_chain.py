"""What programmatic dependent launch (PDL) saves between dependent kernels in a CUDA graph.

    python3 bench/pdl_chain.py [--kernels 40] [--out pdl-chain.json]

A chain of N dependent Triton kernels (each reads the previous one's output, y = x * a + b over
`size` bf16 elements), captured in one CUDA graph, replayed; µs per kernel with every launch
plain, with the PDL launch attribute (each kernel waits on griddepcontrol.wait before its first
load), and with PDL plus an early trigger (griddepcontrol.launch_dependents at the start, so
the next kernel's programs may become resident while this one runs). Sizes from one CTA's worth
to a few MB (the decode step's projections and norms). Prints a table, writes JSON. NVIDIA
sm_90+ only (the attribute and the instructions); elsewhere it says so and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import time_calls

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # old Triton
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def _axpb(X, Y, n, a, b, BLOCK: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr):
    if EARLY:
        gdc_launch_dependents()
    if PDL:
        gdc_wait()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(X + offs, mask=m).to(tl.float32)
    tl.store(Y + offs, (x * a + b).to(Y.dtype.element_ty), mask=m)


def chain(bufs, n_kernels: int, mode: str, block: int) -> None:
    n = bufs[0].numel()
    grid = (triton.cdiv(n, block),)
    for i in range(n_kernels):
        x, y = bufs[i % 2], bufs[(i + 1) % 2]
        kw = {"launch_pdl": True} if mode != "plain" else {}
        _axpb[grid](x, y, n, 0.999, 0.001, BLOCK=block, PDL=mode != "plain",
                    EARLY=mode == "early", num_warps=4, **kw)


def time_mode(size: int, n_kernels: int, mode: str) -> float:
    """Median µs per kernel of the chain, replayed as a CUDA graph (bench/kernels.time_calls)."""
    bufs = [torch.randn(size, device="cuda").bfloat16() for _ in range(2)]
    t = time_calls([lambda: chain(bufs, n_kernels, mode, 2048)]) / n_kernels
    # the chain contracts towards b / (1 - a) = 1: the output stays finite
    assert torch.isfinite(bufs[0].float()).all()
    return t


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernels", type=int, default=40)
    ap.add_argument("--sizes", default="2048,262144,1048576,4194304")
    ap.add_argument("--out", default="pdl-chain.json")
    args = ap.parse_args(argv)
    if (gdc_wait is None or not torch.cuda.is_available() or torch.version.hip
            or torch.cuda.get_device_capability()[0] < 9):
        print("PDL needs an NVIDIA sm_90+ GPU and Triton's griddepcontrol ops: nothing to time")
        return
    rows = []
    print(f"{'elements':>10}{'MB':>7}{'plain_us':>10}{'pdl_us':>9}{'early_us':>10}")
    for size in (int(v) for v in args.sizes.split(",")):
        t = {m: time_mode(size, args.kernels, m) for m in ("plain", "pdl", "early", "plain2")}
        rows.append({"elements": size, "MB_read": size * 2 / 1e6, "kernels": args.kernels,
                     "us_per_kernel": {k: round(v, 3) for k, v in t.items()}})
        print(f"{size:>10}{size * 2 / 1e6:>7.2f}{t['plain']:>10.2f}{t['pdl']:>9.2f}"
              f"{t['early']:>10.2f}  (plain again {t['plain2']:.2f})")
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
