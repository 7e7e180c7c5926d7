"""Hardware counters of the decode step's heavy kernels, under Nsight Compute (issue 6 / 7).

    ncu --clock-control none --profile-from-start off --csv --page details \
        --section SpeedOfLight --section WarpStateStats ... python3 bench/ncu_probe.py --what moe

Runs the kernels once to compile and warm up, then once more between cudaProfilerStart / Stop,
so `--profile-from-start off` captures exactly one launch of each: `moe` = the int4 fused MoE
(Kimi-K2.5 TP8 rank, row-tiled w13, uniform routing) at each M of --ms (align, gate_up, down,
reduce); `mla` = the paged MLA decode (fp8 and bf16 latent cache, 8 heads) at --mla-shapes.
bench/gpu_session.sh section `ncu` runs it and keeps ncu's CSV. Prints nothing of its own but
the shapes it ran: the numbers are ncu's.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)  # first: bench/kernels.py, not the kernels/ package
import kernels  # noqa: F401  (bench/kernels.py: cached before kernels_moe puts the root first)


def moe_calls(ms: list[int]) -> list:
    from atom_stream.kernels.fused_moe import fused_moe, tile_w13
    from kernels_moe import make_sets, make_weights
    w = make_weights("int4", "cuda")
    w["w13"], w["w13_scale"] = tile_w13(w["w13"], w["w13_scale"], 16)
    kw = {k: v for k, v in w.items() if k not in ("w13", "w2")}
    calls = []
    for M in ms:
        sets, _ = make_sets(M, 1, "cuda")
        x, tw, ids, out = sets[0]
        calls.append((f"moe int4 M={M}", lambda x=x, tw=tw, ids=ids, out=out: fused_moe(
            x, w["w13"], w["w2"], tw, ids, out=out, **kw)))
    return calls


def mla_calls(shapes: list[tuple[int, int]]) -> list:
    """Each cache's default decode kernel ("auto": v5 + merge kernel for fp8, v1 for bf16)."""
    from atom_stream.kernels import mla_decode as dec
    from kernels_attention import FP8, DecodeSetup
    calls = []
    for B, ctx in shapes:
        for dt, name in ((FP8, "fp8"), (torch.bfloat16, "bf16")):
            s = DecodeSetup(dt, [ctx] * B, 8)
            variant = dec.resolve_variant("auto", dt)[0]
            S = s.splits(variant)
            ws = (dec.alloc_decode_workspace(s.B, s.H, 512, S, "cuda", variant=variant,
                                             kv_dtype=dt) if S > 1 else None)
            calls.append((f"mla {name} {variant} B={B} ctx={ctx} S={S}",
                          s._call(s.tables[0], S, None, ws, variant=variant)))
    return calls


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--what", default="moe,mla")
    ap.add_argument("--ms", default="64,256")
    ap.add_argument("--mla-shapes", default="64x8192")
    args = ap.parse_args(argv)
    assert torch.cuda.is_available(), "bench/ncu_probe.py needs a GPU"
    calls = []
    if "moe" in args.what:
        calls += moe_calls([int(m) for m in args.ms.split(",")])
    if "mla" in args.what:
        calls += mla_calls([tuple(int(v) for v in s.split("x")) for s in
                            args.mla_shapes.split(",")])
    for _, fn in calls:  # compile + warm up, outside the profiled range
        fn()
        fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for name, fn in calls:
        torch.cuda.nvtx.range_push(name)
        fn()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
        print("ran", name, flush=True)
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
