"""Does asking L2 for the next dense weights while the MoE runs shorten a decode layer?

A stand-in layer chain at Kimi-K2.5 TP8 rank shapes, L layers with distinct weights (so nothing
stays in L2 between replays), CUDA-graph replayed; µs per layer:
    moe(l)            the real fused_moe (int4 experts, M rows, top-8 random routing)
    qkv(l)            F.linear(x, W_qkv[l])    [M, 7168] x [2112, 7168]^T   (q_a + kv_a, 30 MB)
    o(l)              F.linear(y, W_o[l])      [M, 1024] x [7168, 1024]^T   (o_proj, 14.7 MB)
    router(l)         F.linear(x, W_r[l])      [M, 7168] x [896, 7168]^T    (router + shared gate/up)
Variants:
    base      the chain as is (every dense weight comes from DRAM)
    pf<P>     the moe(l) launch forks a side stream that reads W_qkv[l], W_o[l], W_r[l] with P
              programs (Triton loads, evict_last) while moe(l) runs; joined before qkv(l)
    fork      the fork/join alone (the side kernel reads nothing): its cost in the graph
    hot       every layer uses the same dense weights (an L2-resident bound, not reachable)
Also per kernel alone: each dense GEMM cold (rotated) vs hot (one weight).

    python3 bench/l2_prefetch.py --ms 1,16 --out $OUT/l2-prefetch.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels_moe import make_sets, make_weights

from kernels import time_calls

H, QKV, O_IN, ROUTER = 7168, 1536 + 576, 1024, 384 + 512


@triton.jit
def _l2_read_kernel(p, n, sink, BLOCK: tl.constexpr):
    """Reads int32 words p[0:n] (programs stride over BLOCK-word chunks) with evict_last, and
    stores one sum per program to sink so that the loads are not removed."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(pid * BLOCK, n, nprog * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(p + offs, mask=offs < n, other=0, eviction_policy="evict_last")
    tl.store(sink + pid, tl.sum(acc, axis=0))


def l2_read(tensors, programs: int, sink: torch.Tensor, block: int = 2048) -> None:
    for t in tensors:
        w = t.view(torch.int32).view(-1)
        n = w.numel() if programs else 0
        _l2_read_kernel[(max(programs, 1),)](w, n, sink, BLOCK=block, num_warps=4)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--programs", default="16,32,66,132")
    ap.add_argument("--out", default="bench/results/l2-prefetch.json")
    args = ap.parse_args(argv)
    from atom_stream.kernels.fused_moe import fused_moe
    dev, dt, L = "cuda", torch.bfloat16, args.layers
    w = make_weights("int4", dev)
    kw = {k: v for k, v in w.items() if k not in ("w13", "w2")}
    wq = [torch.randn(QKV, H, device=dev, dtype=dt) * 0.02 for _ in range(L)]
    wo = [torch.randn(H, O_IN, device=dev, dtype=dt) * 0.02 for _ in range(L)]
    wr = [torch.randn(ROUTER, H, device=dev, dtype=dt) * 0.02 for _ in range(L)]
    sink = torch.empty(1024, device=dev, dtype=torch.int32)
    side = torch.cuda.Stream()
    rows = []
    for M in [int(m) for m in args.ms.split(",")]:
        sets, _ = make_sets(M, L, dev)
        y = torch.randn(M, O_IN, device=dev, dtype=dt)

        def chain(pf: int | None, hot: bool = False, sets=sets, y=y):
            for li, (x, tw, ids, out) in enumerate(sets):
                j = 0 if hot else li
                if pf is not None:
                    main_s = torch.cuda.current_stream()
                    side.wait_stream(main_s)
                    with torch.cuda.stream(side):
                        l2_read((wq[j], wo[j], wr[j]), pf, sink)
                fused_moe(x, w["w13"], w["w2"], tw, ids, out=out, **kw)
                if pf is not None:
                    torch.cuda.current_stream().wait_stream(side)
                F.linear(out, wq[j])
                F.linear(y, wo[j])
                F.linear(out, wr[j])

        r = {"m": M, "layers": L}
        variants = [("base", None, False), ("fork", 0, False), ("hot", None, True)]
        variants += [(f"pf{p}", int(p), False) for p in args.programs.split(",")]
        for name, pf, hot in variants:
            r[f"{name}_us"] = round(time_calls([lambda pf=pf, hot=hot: chain(pf, hot)],
                                               min_replay_us=3000) / L, 2)
        for name, ws, x in (("qkv", wq, sets[0][3]), ("o", wo, y), ("router", wr, sets[0][3])):
            r[f"{name}_cold_us"] = round(time_calls([lambda t=t, x=x: F.linear(x, t)
                                                     for t in ws]), 2)
            r[f"{name}_hot_us"] = round(time_calls([lambda t=ws[0], x=x: F.linear(x, t)]), 2)
        r["moe_us"] = round(time_calls(
            [lambda s=s: fused_moe(s[0], w["w13"], w["w2"], s[1], s[2], out=s[3], **kw)
             for s in sets]), 2)
        rows.append(r)
        print(" ".join(f"{k}={v}" for k, v in r.items()), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
