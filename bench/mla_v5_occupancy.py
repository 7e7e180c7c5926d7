"""fp8 MLA decode (v5): more CTAs per SM through a register cap, with the split count to fill them.

Nsight Compute (bench/RESULTS.md session 23) shows the v5 kernel at B=64 x 8K at 255 registers
(Triton 3.6 on the H200), two 4-warp CTAs per SM (the register limit; shared memory would allow
four), 11.8 % achieved occupancy, 31 % issue-slot use and stalls on long_scoreboard / wait: a
latency-bound loop with few warps to hide it. This sweep times v5 (with the merge kernel) at
register caps that fit 3 (168) or 4 (128) CTAs of 4 warps per SM, each with the heuristic's
split count and the counts that fill 3 / 4 CTAs per SM, at Kimi-K2.5 TP8 shapes (8 heads, fp8
e4m3fn cache). Every config is checked against the reference first (rel err < 2e-2); the
compiled kernels' registers / spills are printed (a cap that spills is usually slower).

    python3 bench/mla_v5_occupancy.py --out $OUT/mla-v5-occupancy-h200.json [--budget-s 200]

Table: shape, config (BLOCK_N, warps, stages[, maxnreg]), splits, µs, ratio vs copy.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from kernels_attention import FP8, DecodeSetup, copy_bandwidth, dec, make_row

SHAPES = [(64, 8192), (16, 8192), (256, 1024), (64, 1024), (256, 8192), (1, 8192)]
CONFIGS = [(64, 4, 2), (64, 4, 2, 168), (64, 4, 2, 128), (64, 4, 1, 168), (32, 4, 2, 128),
           (64, 8, 2, 128)]


def ctas_per_sm(cfg) -> int:
    """CTAs per SM the register budget allows at a cap (None: the uncapped 2)."""
    warps = cfg[1]
    cap = cfg[3] if len(cfg) > 3 else None
    return 2 if cap is None else max(1, 65536 // (cap * 32 * warps))


def split_counts(B: int, ctx: int, cfg) -> list[int]:
    """The heuristic's count and the counts that fill ctas_per_sm(cfg) x SMs programs."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    heur = dec.decode_num_splits(B, 8, ctx, "cuda", variant="v5", kv_dtype=FP8)
    most = max(1, min(dec.MAX_SPLITS, ctx // dec.MIN_SPLIT))
    fill = max(1, min(most, (ctas_per_sm(cfg) * sms) // B))
    return sorted({heur, fill})


def compiled_info() -> list[str]:
    """(warps, stages, maxnreg) -> registers / spills of every compiled v5 kernel."""
    out = []
    try:
        for cache in dec._v5._mla_decode_v5.device_caches.values():
            for k in cache[0].values():
                md = k.metadata
                out.append(f"warps {md.num_warps} stages {md.num_stages} maxnreg "
                           f"{getattr(md, 'maxnreg', None)}: {k.n_regs} regs, {k.n_spills} "
                           f"spills")
    except Exception as e:  # noqa: BLE001 -- diagnostics only
        out.append(f"(no compile info: {type(e).__name__}: {e})")
    return sorted(set(out))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="mla-v5-occupancy.json")
    ap.add_argument("--budget-s", type=float, default=200.0)
    args = ap.parse_args(argv)
    t0 = time.time()
    copy = copy_bandwidth()
    ok = set()
    chk = DecodeSetup(FP8, [1000, 2047, 77, 0, 5000, 1, 333], 8)
    for cfg in CONFIGS:
        err = chk.check(splits=4, config=cfg, variant="v5")
        print(f"check {cfg}: rel err {err:.1e}", flush=True)
        if err < 2e-2:
            ok.add(cfg)
    del chk
    rows = []
    for B, ctx in SHAPES:
        setup = DecodeSetup(FP8, [ctx] * B, 8)
        for cfg in CONFIGS:
            if cfg not in ok or time.time() - t0 > args.budget_s:
                continue
            for s in split_counts(B, ctx, cfg):
                t, _ = setup.time(splits=s, config=cfg, variant="v5")
                r = dict(make_row("mla_decode_fp8_v5", B, ctx, 8, t, setup.bytes, copy),
                         config=list(cfg), splits=s)
                rows.append(r)
                print(f"B={B:>3} ctx={ctx:>5} cfg={cfg!s:<18} S={s:>3} {t:8.1f} us "
                      f"ratio {r['ratio']:.3f}", flush=True)
        del setup
        with open(args.out, "w") as f:
            json.dump({"copy_GBps": copy, "compiled": compiled_info(), "rows": rows}, f, indent=1)
    for line in compiled_info():
        print(line)
    best = {}
    for r in rows:
        key = (r["batch"], r["ctx"])
        if key not in best or r["time_us"] < best[key]["time_us"]:
            best[key] = r
    print("best per shape vs the default (64, 4, 2) at the heuristic's splits:")
    for (B, ctx), r in best.items():
        base = next(x for x in rows if x["batch"] == B and x["ctx"] == ctx
                    and x["config"] == [64, 4, 2])
        print(f"  B={B} ctx={ctx}: default {base['time_us']:.1f} us (S={base['splits']}), best "
              f"{r['time_us']:.1f} us {r['config']} S={r['splits']} ({r['ratio']:.3f})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
