"""The absorbed MLA's small launches, fused vs unfused, at Kimi-K2.5 TP8 rank shapes (8 heads,
nope 128, latent 512, rope 64, v 128, fp8 cache at 1K context), plus the routing kernel's warps.

Rows (µs per call, CUDA-graph replays over 4 rotated input sets so weights come from DRAM):
- q_bmm_rope: torch.bmm(q_nope, W_UK) + rope_interleaved_(q_pe)   (the unfused kernel path)
- q_absorb:   kernels/mla_q_absorb.mla_q_absorb                    (one launch)
- attn_bmm:   mla_decode (+ its merge launch) + torch.bmm(o_lat, W_UV^T)
- attn_uv:    mla_decode(uv=...): W_UV folded into the merge launch
- routing_wN: kernels/moe_routing at N warps (384 experts, top-8, + the shared SiLU*mul, I 256)
- q_absorb_rN (--block-r): q_absorb at latent tile N instead of 64
at decode batch B = 1 .. 256.

    python3 bench/mla_absorb.py --out $OUT/mla-absorb-h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from atom_stream.kernels import moe_routing as routing
from atom_stream.kernels.mla_decode import alloc_decode_workspace, mla_decode
from atom_stream.kernels.mla_q_absorb import mla_q_absorb
from atom_stream.kernels.norm_rope import rope_interleaved_

from kernels import time_calls

H, NOPE, R, PE, V, PAGE = 8, 128, 512, 64, 128, 64
SETS = 4


def q_side(B, dev, dt, block_r=64):
    sets = []
    for _ in range(SETS):
        q = torch.randn(B, H, NOPE + PE, device=dev, dtype=dt)
        w = torch.randn(H, NOPE, R, device=dev, dtype=dt) * 0.05
        sets.append((q, w))
    ang = torch.rand(4096, PE // 2, device=dev)
    cos, sin = ang.cos(), ang.sin()
    pos = torch.randint(0, 4096, (B,), device=dev)

    def unfused(q, w):
        torch.bmm(q[..., :NOPE].transpose(0, 1), w).transpose(0, 1)
        rope_interleaved_(q[..., NOPE:], None, cos, sin, pos)

    def fused(q, w):
        mla_q_absorb(q, w, cos, sin, pos, block_r=block_r)
    return ([lambda s=s: unfused(*s) for s in sets], [lambda s=s: fused(*s) for s in sets])


def attn_side(B, ctx, dev, dt):
    fp8 = torch.float8_e4m3fn
    blocks = B * (ctx // PAGE)
    sets = []
    for _ in range(SETS):
        cache = (torch.randn(blocks, PAGE, R + PE, device=dev) * 0.5).to(fp8)
        bt = torch.randperm(blocks, device=dev, dtype=torch.int32).view(B, ctx // PAGE)
        q = torch.randn(B, H, R + PE, device=dev, dtype=dt) * 0.1
        w = torch.randn(H, V, R, device=dev, dtype=dt) * 0.05
        sets.append((cache, bt, q, w))
    lens = torch.full((B,), ctx, device=dev, dtype=torch.int32)
    from atom_stream.kernels.mla_decode import decode_num_splits, resolve_variant
    variant = resolve_variant("auto", fp8)[0]
    S = decode_num_splits(B, H, None, torch.device(dev), variant)
    ws = alloc_decode_workspace(B, H, R, S, dev, kv_dtype=fp8)
    o = torch.empty(B, H, R, device=dev, dtype=dt)
    y = torch.empty(B, H, V, device=dev, dtype=dt)

    def unfused(cache, bt, q, w):
        mla_decode(q[..., :R], q[..., R:], cache, bt, lens, 0.1, 1.0, out=o, num_splits=S,
                   workspace=ws)
        torch.bmm(o.transpose(0, 1), w.transpose(1, 2), out=y.transpose(0, 1))

    def fused(cache, bt, q, w):
        mla_decode(q[..., :R], q[..., R:], cache, bt, lens, 0.1, 1.0, out=o, num_splits=S,
                   workspace=ws, uv=(w, y))
    return ([lambda s=s: unfused(*s) for s in sets], [lambda s=s: fused(*s) for s in sets], S)


def routing_calls(M, dev, dt):
    E, inter = 384, 256
    sets = [torch.randn(M, E + 2 * inter, device=dev) for _ in range(SETS)]
    bias = torch.randn(E, device=dev) * 0.1
    act = torch.empty(M, inter, device=dev, dtype=dt)
    return [lambda s=s: routing.moe_routing(s[:, :E], bias, top_k=8, routed_scaling_factor=2.8,
                                            act=(s[:, E:], act)) for s in sets]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--out", default="bench/results/mla-absorb.json")
    ap.add_argument("--block-r", default="",
                    help="also time q_absorb at these latent tiles (e.g. 16,32,128; default 64)")
    args = ap.parse_args(argv)
    dev, dt = "cuda", torch.bfloat16
    rows = []
    print(f"{'B':>4} {'q_bmm_rope':>11} {'q_absorb':>9} {'attn_bmm':>9} {'attn_uv':>8} {'S':>3} "
          f"{'rt_w1':>6} {'rt_w2':>6} {'rt_w4':>6}")
    for B in [int(b) for b in args.batches.split(",")]:
        qa, qb = q_side(B, dev, dt)
        aa, ab, S = attn_side(B, args.ctx, dev, dt)
        r = {"batch": B, "ctx": args.ctx, "splits": S,
             "q_bmm_rope_us": time_calls(qa), "q_absorb_us": time_calls(qb),
             "attn_bmm_us": time_calls(aa), "attn_uv_us": time_calls(ab)}
        for br in [int(v) for v in args.block_r.split(",") if v]:
            r[f"q_absorb_r{br}_us"] = time_calls(q_side(B, dev, dt, br)[1])
            print(f"     q_absorb block_r {br}: {r[f'q_absorb_r{br}_us']:.2f}")
        saved = routing.NUM_WARPS
        try:
            for w in (1, 2, 4):
                routing.NUM_WARPS = w
                r[f"routing_w{w}_us"] = time_calls(routing_calls(B, dev, dt))
        finally:
            routing.NUM_WARPS = saved
        rows.append({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})
        print(f"{B:>4} {r['q_bmm_rope_us']:>11.2f} {r['q_absorb_us']:>9.2f} "
              f"{r['attn_bmm_us']:>9.2f} {r['attn_uv_us']:>8.2f} {S:>3} "
              f"{r['routing_w1_us']:>6.2f} {r['routing_w2_us']:>6.2f} {r['routing_w4_us']:>6.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
