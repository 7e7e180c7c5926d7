"""Is the M=16 int4 gate_up bound by its one-wave grid? (issue 6 / 7 probe)

Session 29's answer (bench/RESULTS.md): no; its time hardly moves with D (67.5 us at 66
experts, 70.3 at 132): each program's serial K loop sets it up to D ~ 132. A split-K gate_up
(K parts per program, the last to arrive summing the fp32 partials) was built and timed then
(results/moe-gate-up-splitk*-s29-h200.json): -3 to -6 % on the kernel at D = 88..110, +5-25 %
at D = 132, a tie in the decode step; removed again.

At decode B=16 the tensor-core direct-mode gate_up runs (P=128 blocks) x (I / BN1) programs;
only a block that is its expert's first pair works, so D distinct experts give D * I / BN1
working programs over the GPU's SMs (D ~ 110 at random routing: 440 at BN1 64 on 132 SMs, 3.3
per SM). If the kernel is bound by the most loaded SMs, its time steps up where D * I / BN1
crosses a multiple of the SM count instead of growing with the bytes.

Times the gate_up alone (fused_moe stop_after="gate_up") and the whole MoE at M=16 on Kimi-K2.5
TP8 per-rank shapes (int4, w13 row-tiled 16 as loaded), with routings of exactly D distinct
experts (ROT of them rotated so L2 does not serve repeats), for each D and gate_up tile config.

    python bench/moe_gate_up_waves.py [--m 16] [--ds 66,88,99,100,110,121,132]
                                      [--configs a,b] [--json out.json]

`--m` sets the tokens (4 and 8: session 30's probe of the direct mode's tiles below 16 rows;
D <= 8 M there).
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

from kernels_moe import (
    TOPK,
    E,
    H,
    I,
    copy_bandwidth,
    expert_bytes,
    make_weights,
    time_calls,
)

CONFIGS = {"default": {}, "bn32w4": {"BN1": 32, "W1": 4}, "bn32w2": {"BN1": 32, "W1": 2},
           "bn128w4": {"BN1": 128, "W1": 4}, "bn64w8": {"BN1": 64, "W1": 8},
           "s4": {"S1": 4}, "s5": {"S1": 5}, "bk256": {"BK1": 256},
           "bn128bk256": {"BN1": 128, "W1": 4, "BK1": 256},
           "bk256s2": {"BK1": 256, "S1": 2}, "bk512": {"BK1": 512},
           "bn32bk256": {"BN1": 32, "BK1": 256}, "bk256s4": {"BK1": 256, "S1": 4},
           "bk512s2": {"BK1": 512, "S1": 2}, "bn256w4": {"BN1": 256, "W1": 4},
           "bn256w8": {"BN1": 256, "W1": 8}}


def routing(M: int, D: int, gen: torch.Generator) -> torch.Tensor:
    """[M, TOPK] int32 expert ids using exactly D distinct experts (D >= TOPK), each token's
    TOPK distinct."""
    experts = torch.randperm(E, generator=gen)[:D]
    ids = torch.empty(M, TOPK, dtype=torch.int64)
    k = 0
    for m in range(M):
        for j in range(TOPK):
            ids[m, j] = experts[k % D]
            k += 1
    return ids.int().cuda()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--ds", default="66,88,99,100,110,121,132")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--rot", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from atom_stream.kernels.fused_moe import fused_moe, tile_w13
    copy = copy_bandwidth()
    w = make_weights("int4", "cuda")
    eb = expert_bytes(w)
    gu_bytes = eb * 2 // 3  # w13 is 2/3 of an expert's words and scales (2I of 3I rows)
    w["w13"], w["w13_scale"] = tile_w13(w["w13"], w["w13_scale"], 16)
    kw = {k: v for k, v in w.items() if k not in ("w13", "w2")}
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator().manual_seed(0)
    M = args.m
    rows = []
    print(f"copy {copy:.0f} GB/s, {sms} SMs; gate_up bytes per expert {gu_bytes}")
    print(f"{'cfg':<10} {'D':>4} {'progs/SM':>8} {'gate_up us':>10} {'ratio':>6} {'MoE us':>8} "
          f"{'rel err':>8}")
    for name in args.configs.split(","):
        cfg = CONFIGS[name]
        bn1 = cfg.get("BN1", 64)
        for D in (int(d) for d in args.ds.split(",")):
            sets = []
            for _ in range(args.rot):
                x = torch.randn(M, H, device="cuda").bfloat16()
                sets.append((x, torch.rand(M, TOPK, device="cuda"), routing(M, D, gen),
                             torch.empty(M, H, device="cuda", dtype=torch.bfloat16)))
            # each config's whole MoE checked against the default config's on the first set
            ref = fused_moe(sets[0][0], w["w13"], w["w2"], sets[0][1], sets[0][2],
                            config={}, **kw).float()
            got = fused_moe(sets[0][0], w["w13"], w["w2"], sets[0][1], sets[0][2],
                            config=dict(cfg), **kw).float()
            err = ((got - ref).norm() / ref.norm()).item()
            t = {}
            for part, extra in (("gate_up", {"stop_after": "gate_up"}), ("moe", {})):
                calls = [lambda s=s, c=dict(cfg, **extra): fused_moe(
                    s[0], w["w13"], w["w2"], s[1], s[2], out=s[3], config=c, **kw)
                    for s in sets]
                t[part] = time_calls(calls)
            ratio = D * gu_bytes / (t["gate_up"] * 1e-6) / (copy * 1e9)
            r = {"cfg": name, "m": M, "D": D, "programs_per_sm": D * I / bn1 / sms,
                 "gate_up_us": round(t["gate_up"], 2), "gate_up_ratio": round(ratio, 3),
                 "moe_us": round(t["moe"], 2), "copy_GBps": round(copy, 1),
                 "rel_err_vs_default": err}
            rows.append(r)
            print(f"{name:<10} {D:>4} {r['programs_per_sm']:>8.2f} {t['gate_up']:>10.2f} "
                  f"{ratio:>6.3f} {t['moe']:>8.2f} {err:>8.1e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
