"""Fused-MoE kernel benchmark at Kimi-K2.5 TP8 per-rank shapes (issue 6, MoE half).

    python bench/kernels_moe.py [--formats int4,mxfp4,mxfp4_w4a4,bf16,fp8,w4a8] [--ms 1,16,64,256]
                                [--budget-s S]

The lead's comparison run (split-K GEMV variant vs the default at M=1; W4A8 fp8 rows; < 4 min):
    python bench/kernels_moe.py --formats w4a8,int4,mxfp4 --budget-s 120
Issue 6, tensor-core paths old vs new (TC_CANDIDATES; bench/notes_fused_moe_tc.md; < 4 min):
    python bench/kernels_moe.py --formats int4,mxfp4 --ms 16,64,256 --set tc --budget-s 170
(bench/notes_fused_moe.md has the predictions.) "w4a8" = fused_moe's "fp8_tensor" format (W4A8
after its load-time conversion: fp8 e4m3 weights, one scale per expert and tensor, fp8
activations with dynamic per-token scales).

Shapes: hidden 7168, 384 experts, expert intermediate 256 per rank (w13 [384, 512, 7168],
w2 [384, 7168, 256]), top-8 with uniform random routing, M = 1, 16, 64, 256 tokens.
Timing: CUDA-graph replays of fused_moe over ROT different routings/inputs (so repeated calls
don't hit L2), median of several replays; routing itself is not timed (kernels/moe_routing.py).
bytes = the touched experts' weights + scales (distinct experts of each routing, averaged) +
activations in and out; ratio = bytes / time / copy bandwidth (a 2 GiB device copy, bytes read +
written, measured in the same run). moe_rows() is what bench/kernels.py calls. For int4 and MXFP4
it times the CANDIDATES tile/path configs and reports the fastest (fused_moe's defaults were then
set to those winners), plus the first GEMM alone; every timing goes to --sweep-out
(bench/results/kernels-moe-sweep-h200.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

H, E, I, TOPK = 7168, 384, 256, 8
MS = (1, 16, 64, 256)
KEYS = ("kernel", "batch", "ctx", "m", "time_us", "bytes", "copy_GBps", "ratio")


def time_calls(calls, min_replay_us: float = 2000.0, replays: int = 9) -> float:
    """Median µs per call from CUDA-graph replays of `calls` (one per rotated input set)."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for c in calls:
        c()
    e1.record()
    e1.synchronize()
    est = max(e0.elapsed_time(e1) * 1e3 / len(calls), 1.0)
    repeat = max(1, min(int(min_replay_us / (est * len(calls))) + 1, max(1, 256 // len(calls))))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(repeat):
            for c in calls:
                c()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3 / (repeat * len(calls)))
    del g
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """GB/s (bytes read + written) of a 2 GiB device copy: the faster of an eager copy_ and a
    graph-replayed elementwise copy kernel. (A graph-captured copy_ is a memcpy node on the copy
    engine: 2765 GB/s on the H200 on 2026-11-29, below what kernels stream.)"""
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    t_kernel = time_calls([lambda: torch.mul(src, 1.0, out=dst)], min_replay_us=5000.0)
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    eager = []
    for _ in range(7):
        e0.record()
        dst.copy_(src)
        e1.record()
        e1.synchronize()
        eager.append(e0.elapsed_time(e1) * 1e3)
    t = min(t_kernel, statistics.median(eager))
    return 2 * nbytes / (t * 1e-6) / 1e9


def make_weights(fmt: str, dev) -> dict:
    """Random expert weights of the real per-rank sizes, already in the kernel layout."""
    g = torch.Generator(device=dev).manual_seed(0)

    def words(*s):
        return torch.randint(-2**31, 2**31 - 1, s, generator=g, device=dev, dtype=torch.int32)

    def u8(lo, hi, *s):
        return torch.randint(lo, hi, s, generator=g, device=dev, dtype=torch.int32).to(torch.uint8)

    if fmt == "bf16":
        return {"w13": (torch.randn(E, 2 * I, H, generator=g, device=dev) * 0.02).bfloat16(),
                    "w2": (torch.randn(E, H, I, generator=g, device=dev) * 0.05).bfloat16()}
    if fmt == "fp8":
        return {"w13": torch.randn(E, 2 * I, H, generator=g, device=dev).to(torch.float8_e4m3fn),
                    "w2": torch.randn(E, H, I, generator=g, device=dev).to(torch.float8_e4m3fn),
                    "w13_scale": torch.full((E, 2 * I // 128, H // 128), 0.01, device=dev),
                    "w2_scale": torch.full((E, H // 128, I // 128), 0.03, device=dev),
                    "quant": "fp8_block"}
    if fmt == "w4a8":
        return {"w13": torch.randn(E, 2 * I, H, generator=g, device=dev).to(torch.float8_e4m3fn),
                "w2": torch.randn(E, H, I, generator=g, device=dev).to(torch.float8_e4m3fn),
                "w13_scale": torch.full((E,), 0.002, device=dev),
                "w2_scale": torch.full((E,), 0.004, device=dev), "quant": "fp8_tensor"}
    if fmt == "int4":
        return {"w13": words(E, 2 * I, H // 128, 16), "w2": words(E, H, I // 128, 16),
                    "w13_scale": (torch.rand(E, 2 * I, H // 32, generator=g, device=dev) * 0.004
                               + 0.002).bfloat16(),
                    "w2_scale": (torch.rand(E, H, I // 32, generator=g, device=dev) * 0.01
                              + 0.005).bfloat16(), "quant": "int4_g32"}
    if fmt == "mxfp4":
        return {"w13": words(E, 2 * I, H // 128, 16), "w2": words(E, H, I // 128, 16),
                    "w13_scale": u8(117, 121, E, 2 * I, H // 32), "w2_scale": u8(119, 123, E, H, I // 32),
                    "quant": "mxfp4"}
    raise ValueError(fmt)


def expert_bytes(w: dict) -> int:
    tot = 0
    for k in ("w13", "w2", "w13_scale", "w2_scale"):
        if k in w:
            t = w[k]
            tot += t[0].numel() * t.element_size()
    return tot


def make_sets(M: int, rot: int, dev):
    sets = []
    for _ in range(rot):
        ids = torch.rand(M, E, device=dev).topk(TOPK, dim=-1).indices.int()
        tw = torch.rand(M, TOPK, device=dev)
        x = torch.randn(M, H, device=dev).bfloat16()
        sets.append((x, tw, ids, torch.empty(M, H, device=dev, dtype=torch.bfloat16)))
    distinct = statistics.mean(s[2].unique().numel() for s in sets)
    return sets, distinct


def bench_one(w: dict, M: int, rot: int, config=None, act=None) -> tuple[float, float]:
    """(µs per fused_moe call, mean distinct experts touched)."""
    from atom_stream.kernels.fused_moe import fused_moe
    sets, distinct = make_sets(M, rot, "cuda")
    kw = {k: v for k, v in w.items() if k not in ("w13", "w2")}
    calls = [lambda s=s: fused_moe(s[0], w["w13"], w["w2"], s[1], s[2], out=s[3], config=config,
                                   activation_quant=act, **kw) for s in sets]
    return time_calls(calls), distinct


def row(kernel, M, t_us, distinct, ebytes, copy_gbps) -> dict:
    nbytes = int(distinct * ebytes + 2 * M * H * 2)
    return {"kernel": kernel, "batch": None, "ctx": None, "m": M, "time_us": round(t_us, 3),
            "bytes": nbytes, "copy_GBps": round(copy_gbps, 1),
            "ratio": round(nbytes / (t_us * 1e-6) / (copy_gbps * 1e9), 4)}


FORMATS = {"int4": "moe_int4", "mxfp4": "moe_mxfp4", "mxfp4_w4a4": "moe_mxfp4_w4a4",
           "bf16": "moe_bf16", "fp8": "moe_fp8", "w4a8": "moe_w4a8_fp8"}
# Candidate configs per M for the 4-bit formats, as overrides of fused_moe's defaults ({} = the
# defaults); moe_rows reports the fastest, the sweep file keeps every candidate's time.
# gemv_max picks the path. (The 2026-11-29 sweep ran against the defaults before they were set to
# its winners; bench/RESULTS.md lists the effective config of each row.)
# M=1: the small-M kernel (the default since session 3), the split-K GEMV gate_up variants (SK
# must divide H / (128 GC) = 7 / 14 / 28 here; small_m_max 0 so the GEMV path runs) and the
# tensor cores.
_GEMV = {"small_m_max": 0}
CANDIDATES = {
    1: [{}, _GEMV, {**_GEMV, "SK": 7}, {**_GEMV, "GC": 4, "SK": 2}, {**_GEMV, "GC": 2, "SK": 4},
        {**_GEMV, "G1": 16, "GC": 4}, {**_GEMV, "G2": 16}, {**_GEMV, "gemv_max": 0}],
    16: [{}, {"G1": 16, "GC": 4}, {"G2": 64, "GW2": 8}, {"gemv_max": 0}],
    64: [{}, {"gemv_max": 64}, {"BN1": 128, "W1": 8}, {"BN1": 32, "BK1": 256}],
    256: [{}, {"BN1": 128, "W1": 8}, {"BN1": 128, "W1": 8, "BN2": 128, "W2": 8},
          {"S1": 4, "BN2": 128}, {"OFFS": 0}],
}
# Issue 6 (tensor-core paths at M = 16 / 64 / 256, bench/notes_fused_moe_tc.md): the DQ variants
# of the K loop (group scales folded into the 16-bit weight operand; DQ=2 one MMA per 128-K
# chunk) and 2-warp programs (Triton then emits mma.sync instead of wgmma on Hopper: no
# warpgroup waits and fences per scale group); XM=1: direct mode (M=16) loads only the routed
# tokens' activation rows; DU=0: the down kernel's K loop pipelined instead of unrolled (its
# loads then all issue up front instead of one scale group at a time). `--set tc` runs old ({} =
# the defaults) then the new candidates in order of predicted gain; `--set all` CANDIDATES.
_PIPE = {"DU": 0, "BK2": 128, "S2": 3}  # the down kernel's K loop pipelined (2 iterations)
_NEW = dict(_PIPE, DQ=1, W1=2, W2=2)
TC_CANDIDATES = {
    16: [{}, dict(_NEW, BN1=32, XM=1), dict(_NEW, BN1=16, XM=1),
         dict(_NEW, BN1=32, BN2=32, XM=1), dict(_PIPE, DQ=1, XM=1), dict(_PIPE)],
    64: [{}, dict(_NEW, BN1=32), dict(_NEW, BN1=16), dict(_NEW, BN1=32, BN2=32),
         dict(_PIPE, DQ=1), dict(_PIPE), {}],  # {} twice: the run-to-run spread
}
TC_CANDIDATES[256] = TC_CANDIDATES[64]
# --set tile (session 5: the row-tiled gate_up layout, --w13-tiles): the per-pair / M=1 gate_up's
# rows per program (MR: MR/2 gate + MR/2 up rows, i.e. MR/2 x 64 contiguous bytes per chunk of a
# tile) and CH; the tensor-core tiles (MXFP4 defaults to BN1 32 on 2 warps; int4 64 on 4)
_SM = [{"small_m": {"MR": mr}} for mr in (8, 16, 32)] + [{"small_m": {"MR": 16, "CH": 4}}]
_TCT = [{"BN1": 64, "W1": 4}, {"BN1": 32, "W1": 2}, {"BN1": 16, "W1": 2}, {"S1": 4}]
TILE_CANDIDATES = {1: [{}] + _SM, 4: [{}] + _SM, 8: [{}] + _SM, 16: [{}] + _TCT,
                   64: [{}] + _TCT, 256: [{}] + _TCT}
# --set down (session 7): round 1 timed the sorted path's align in its one-launch form (AP) and
# the down kernel's tiles (BN2 rows x BK2 K per program, W2 warps, S2 stages, DU unrolled) over
# the then defaults (DOWN_R1; AP and int4 BN2 128 won and are the defaults since); round 2
# (DOWN_CANDIDATES) times what is left around the new defaults, for int4 and MXFP4.
# "stop_after": align + gate_up alone, so down + reduce = the whole minus that.
_AP = {"AP": True}
DOWN_R1 = [{}, _AP, dict(_AP, stop_after="gate_up"), {"stop_after": "gate_up"},
           dict(_AP, BN2=128), dict(_AP, BN2=128, W2=8), dict(_AP, BN2=256, W2=8),
           dict(_AP, BN2=32), dict(_AP, BK2=256, DU=1), dict(_AP, BK2=256, DU=0, S2=2),
           dict(_AP, BN2=128, BK2=256, DU=1, W2=8), dict(_AP, S2=4), dict(_AP, W2=2),
           dict(_AP, BN2=128, S2=4), {}]  # {} twice: the run-to-run spread
_DOWN = [{}, {"stop_after": "gate_up"}, {"W2": 2}, {"W2": 2, "BN2": 128}, {"W2": 2, "BN2": 64},
         {"W2": 4, "BN2": 128}, {"W2": 2, "BN2": 128, "S2": 4}, {"BN2": 256, "W2": 4},
         {"AP": False}, {}]
DOWN_CANDIDATES = {16: [{}, {"BN2": 128}, {"BN2": 32}, {"BK2": 256, "DU": 1}, {"W2": 4}],
                   64: _DOWN, 256: _DOWN}
# --set nt (session 20): the down kernel running NT2 consecutive n-tiles per program in a loop
# the pipeliner multi-buffers (S2 stages), K unrolled inside: more weight bytes in flight per
# program than one 64 / 128-row tile, fewer programs
_NT16 = [{}, {"stop_after": "gate_up"}, {"NT2": 2}, {"NT2": 4}, {"NT2": 8}, {"NT2": 4, "S2": 2},
         {"NT2": 4, "S2": 4}, {"NT2": 4, "W2": 4}, {"NT2": 8, "S2": 4},
         # the sorted mode's int4 tiles (128 rows, 4 warps) in the direct mode
         {"BN2": 128, "W2": 4}, {"BN2": 128, "W2": 4, "NT2": 7}, {"BN2": 128, "W2": 4, "NT2": 4},
         {"BN2": 128, "NT2": 7}, {}]
_NTS = [{}, {"stop_after": "gate_up"}, {"NT2": 2}, {"NT2": 4}, {"NT2": 4, "S2": 4}, {"NT2": 7},
        {}]
NT_CANDIDATES = {16: _NT16, 64: _NTS, 256: _NTS}
# --set occ (session 23): ncu at M=16 (bench/RESULTS.md session 23) has the direct-mode down at
# 3 CTAs per SM by shared memory (64.5 KB at S2 3; registers would allow 5) over ~2.2 waves of
# working programs, and the gate_up at ~3.3 CTAs per SM by its grid (4 KB per stage in
# flight): fewer down stages (more CTAs per SM), wider / deeper gate_up K steps
_OCC = [{}, {"stop_after": "gate_up"}, {"S2": 2}, {"S2": 2, "NT2": 4}, {"S2": 4}, {"NT2": 4},
        {"S1": 4}, {"S1": 2}, {"BK1": 256, "S1": 2}, {"BK1": 256}, {}]
OCC_CANDIDATES = {16: _OCC, 64: _OCC}
# its follow-up (the gate_up's stages won 3.6 % at M=64 in that sweep): stages and K step at
# the sorted-mode sizes, both 4-bit formats
_S1 = [{}, {"S1": 3}, {"S1": 4}, {"S1": 5}, {"BK1": 256}, {"S1": 4, "BK1": 256},
       {"stop_after": "gate_up"}, {"S1": 4, "stop_after": "gate_up"}, {}]
OCC_CANDIDATES.update({32: _S1, 48: _S1, 128: _S1, 256: _S1})
# --set bh (session 23): the top-k reduce's columns per program (BH 1024: 7 programs per token,
# 112 at M=16 on 132 SMs; ncu: 3.9 us, 6 % occupancy, long-scoreboard bound)
_BH = [{}, {"BH": 512}, {"BH": 256}, {"BH": 128}, {}]
BH_CANDIDATES = {16: _BH, 64: _BH, 256: _BH}
# --set prefill (session 7): prefill-sized M, where every expert holds many pairs and sorted
# mode's BM-row blocks re-read each expert's weights ceil(pairs / BM) times: BM (tokens per
# block, the MMA's N side) and the wider tiles a larger BM can feed
_PF = [{}, {"stop_after": "gate_up"}, {"BM": 32}, {"BM": 64}, {"BM": 64, "stop_after": "gate_up"},
       {"BM": 64, "W1": 8, "W2": 8}, {"BM": 64, "BN1": 128, "W1": 8}, {"BM": 128, "W1": 8, "W2": 8},
       {"BM": 64, "BN2": 64}, {"BM": 64, "S1": 2, "S2": 2}]
PREFILL_CANDIDATES = {1024: _PF, 4096: _PF, 8192: _PF}
# --set aw (session 11): the parallel align's warps per program (AW; default par_warps)
_AW = [{}, {"AW": 4}, {"AW": 16}, {"AW": 32}, {"stop_after": "gate_up"},
       {"AW": 4, "stop_after": "gate_up"}, {"AW": 32, "stop_after": "gate_up"}, {}]
AW_CANDIDATES = {64: _AW, 256: _AW, 1024: _AW}
# --set dq (session 13): the 4-bit unpack in inline PTX (DQ 3) against the portable one (DQ 1),
# whole MoE and gate_up alone, each twice (the repeat shows the run's noise). Session 14 ran
# it with DQ 3 / 4 (4: today's int4 DQ 3, the nibble as a bf16 subnormal; bench/RESULTS.md)
_DQ3 = [{"DQ": 1}, {"DQ": 3}, {"DQ": 1, "stop_after": "gate_up"},
        {"DQ": 3, "stop_after": "gate_up"}, {"DQ": 1}, {"DQ": 3}]
DQ_CANDIDATES = {16: _DQ3, 64: _DQ3, 256: _DQ3, 1024: _DQ3}
# --set smtc (session 14): M <= 8 on the tensor-core direct mode (the M=16 path, DQ 3) instead
# of the small-M CUDA-core kernels (per-pair gate_up, M=1 gate_up, small-M down), twice each
_TCD = {"small_m_max": 0, "gemv_max": 0}
_SMTC = [{}, _TCD, dict(_TCD, BN1=32), dict(_TCD, BN2=32), {}, _TCD]
SMTC_CANDIDATES = {m: _SMTC for m in (1, 2, 4, 8)}
# M = 3 (session 15): the default (tensor cores from TC_FROM_M = 3) against the small-M kernels
_SM3 = {"small_m_max": 3, "gemv_max": 3}
SMTC_CANDIDATES[3] = [{}, _SM3, {}, _SM3]
# --set m1f (session 15): M <= 2 on the small-M kernels: the down's tile / warps (BN2 16 at 4
# warps: 187 registers, 2 CTAs per SM, 448 programs in 1.7 waves; BN2 32 or 2 warps: 64), twice
# each. Round 1 of that session also timed two removed experiments (bench/RESULTS.md session 15,
# commits f29e242 / d627f52): the gate_up asking L2 for the down weights, and gate_up + down in
# one launch with a device-counter wait; both slower
_SMK = "small_m"
_M1F = [{}, {_SMK: {"W2": 2}}, {_SMK: {"BN2": 32}}, {_SMK: {"BN2": 32, "W2": 8}},
        {_SMK: {"BN2": 8, "W2": 2}}, {_SMK: {"W2": 4}}, {}, {_SMK: {"W2": 2}},
        {_SMK: {"BN2": 8, "W2": 2}}, {_SMK: {"W2": 4}}]
M1F_CANDIDATES = {m: _M1F for m in (1, 2)}
# --set tcx: TC_CANDIDATES then these (what isolates each change; a second run, same budget)
TC_EXTRA = {
    16: [{"DQ": 1, "W1": 2, "W2": 2, "BN1": 32, "XM": 1}, dict(_NEW, BN1=32),
         dict(_NEW, BN1=32, S1=4, XM=1), {"DQ": 2, "XM": 1}, {"DQ": 1}],
    64: [{"DQ": 1, "W1": 2, "W2": 2, "BN1": 32}, dict(_NEW, BN1=32, S1=4),
         dict(_PIPE, DQ=2), {"DQ": 1}, dict(_NEW, BN1=64)],
}
TC_EXTRA[256] = TC_EXTRA[64]
OLDNEW: list = []  # cset "tc"/"tcx": the default's row and the fastest other one's, per fmt and M
# W4A8 (fp8_tensor): GEMV (default up to M=8) vs tensor-core direct, GEMV tiles; sorted tiles.
CANDIDATES_FP8C = {
    1: [{}, {"FG1": 4}, {"FG1": 16, "FBK1": 256}, {"FBK1": 1024}, {"FG2": 16}, {"gemv_max": 0}],
    16: [{}, {"gemv_max": 16}, {"BN1": 32}],
    64: [{}, {"BN1": 64, "W1": 8}],
    256: [{}, {"BN1": 64, "W1": 8}, {"BN2": 128}],
}


def _measure(w, M, cfg, act, fmt, eb, copy_gbps, log, **extra):
    t0 = time.time()
    try:
        t, d = bench_one(w, M, rot=32 if M <= 16 else 8, config=cfg, act=act)
    except Exception as e:  # noqa: BLE001 -- a failing candidate must not stop the others
        rec = {"kernel": FORMATS[fmt], "m": M, "config": cfg,
               "error": f"{type(e).__name__}: {str(e)[:400]}"}
        t = d = None
    else:
        rec = dict(row(FORMATS[fmt], M, t, d, eb, copy_gbps), config=cfg, **extra)
    rec["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(rec), flush=True)
    if log is not None:
        log.append(rec)
    return t, d


def _candidates(fmt: str, M: int, cset: str = "all") -> list:
    if cset == "default":
        return [{}]
    if cset == "tile":
        return TILE_CANDIDATES.get(M, [{}])
    if cset == "down":
        return DOWN_CANDIDATES.get(M, [{}])
    if cset == "prefill":
        return PREFILL_CANDIDATES.get(M, [{}])
    if cset == "nt":
        return NT_CANDIDATES.get(M, [{}])
    if cset == "occ":
        return OCC_CANDIDATES.get(M, [{}])
    if cset == "bh":
        return BH_CANDIDATES.get(M, [{}])
    if cset == "aw":
        return AW_CANDIDATES.get(M, [{}])
    if cset == "dq":
        return DQ_CANDIDATES.get(M, [{}])
    if cset == "smtc":
        return SMTC_CANDIDATES.get(M, [{}])
    if cset == "m1f":
        return M1F_CANDIDATES.get(M, [{}])
    if fmt in ("int4", "mxfp4"):
        if cset in ("tc", "tcx") and M in TC_CANDIDATES:
            return TC_CANDIDATES[M] + (TC_EXTRA[M] if cset == "tcx" else [])
        return CANDIDATES[M]
    if fmt == "w4a8":
        return CANDIDATES_FP8C[M]
    return [{}]


def moe_rows(arg=None, *, formats=("int4", "mxfp4", "mxfp4_w4a4", "bf16", "fp8"),
             copy_gbps=None, budget_s: float = float("inf"), log: list | None = None,
             ms=MS, cset: str = "all", w13_tiles=(1,)) -> list:
    """Rows for bench/kernels.py. `arg`: the copy bandwidth in GB/s (bench/kernels.py passes it)
    or a device; measured here when not given. int4/MXFP4 try CANDIDATES (cset "all") or
    TC_CANDIDATES (cset "tc", at the M it lists; "tcx" adds TC_EXTRA), until budget_s has
    passed, and report the fastest; every timing is appended to `log`. cset "tc"/"tcx" also
    prints "OLDNEW" lines: the default config ({}) against the fastest other candidate; cset
    "default" times {} only. w13_tiles: each int4/MXFP4 format is timed with its gate_up
    weights row-major (1) and/or row-tiled with that many rows (kernels/fused_moe.tile_w13);
    rows and log records carry "w13_tile"."""
    if isinstance(arg, (int, float)):
        copy_gbps = float(arg)
    if copy_gbps is None:
        copy_gbps = copy_bandwidth()
    deadline = time.time() + budget_s
    rows = []
    from atom_stream.kernels.fused_moe import tile_w13
    four_bit = ("int4", "mxfp4", "mxfp4_w4a4")
    for fmt, tile in [(f, t) for f in formats for t in w13_tiles if t == 1 or f in four_bit]:
        act = "mxfp4" if fmt == "mxfp4_w4a4" else None
        w = make_weights("mxfp4" if act else fmt, "cuda")
        eb = expert_bytes(w)
        if tile > 1:
            w["w13"], w["w13_scale"] = tile_w13(w["w13"], w["w13_scale"], tile)
        for M in ms:
            best = best_old = best_new = None
            for i, cfg in enumerate(_candidates(fmt, M, cset)):
                if i and time.time() > deadline:
                    break
                t, d = _measure(w, M, cfg, act, fmt, eb, copy_gbps, log, w13_tile=tile)
                if cfg.get("stop_after"):  # a part of the MoE, never the fastest whole
                    continue
                if t is not None and (best is None or t < best[0]):
                    best = (t, d, cfg)
                if t is not None and cfg == {} and (best_old is None or t < best_old[0]):
                    best_old = (t, d, cfg)
                if t is not None and cfg and (best_new is None or t < best_new[0]):
                    best_new = (t, d, cfg)
            if best is None:
                continue
            for tag, b in (("old", best_old), ("new", best_new)):
                if (cset in ("tc", "tcx", "down", "prefill", "aw", "dq", "smtc", "m1f", "nt", "occ", "bh")
                        and b is not None):
                    r = dict(row(FORMATS[fmt] + "@" + tag, M, b[0], b[1], eb, copy_gbps),
                             config=b[2])
                    OLDNEW.append(r)
                    print("OLDNEW", json.dumps(r), flush=True)
            rows.append(dict(row(FORMATS[fmt], M, best[0], best[1], eb, copy_gbps),
                             w13_tile=tile))
            print("ROW", json.dumps(dict(rows[-1], config=best[2])), flush=True)
            if time.time() < deadline:  # where the time goes: the first GEMM alone
                _measure(w, M, dict(best[2], stop_after="gate_up"), act, fmt, eb, copy_gbps, log,
                         part="gate_up only (bytes: whole MoE)", w13_tile=tile)
        del w
        torch.cuda.empty_cache()
    return rows


def print_table(rows) -> None:
    print(f"{'kernel':<16}{'m':>5}{'tile':>5}{'time_us':>10}{'MB':>9}{'GB/s':>8}{'copy':>7}"
          f"{'ratio':>7}")
    for r in rows:
        gbs = r["bytes"] / (r["time_us"] * 1e-6) / 1e9
        print(f"{r['kernel']:<16}{r['m']:>5}{r.get('w13_tile', 1):>5}{r['time_us']:>10.2f}"
              f"{r['bytes'] / 1e6:>9.2f}{gbs:>8.0f}{r['copy_GBps']:>7.0f}{r['ratio']:>7.3f}")


def print_sweep(log) -> None:
    """Every candidate's time next to its format's default ({}) at the same M."""
    base = {(r["kernel"], r["m"], r.get("w13_tile")): r["time_us"] for r in log
            if r.get("config") == {} and "time_us" in r}
    print(f"{'kernel':<16}{'m':>5}{'time_us':>10}{'vs {}':>8}  config")
    for r in log:
        t = r.get("time_us")
        b = base.get((r["kernel"], r["m"], r.get("w13_tile")))
        rel = f"{t / b:8.2f}" if t and b else f"{'-':>8}"
        tt = f"{t:10.2f}" if t else f"{'ERROR':>10}"
        print(f"{r['kernel']:<16}{r['m']:>5}{tt}{rel}  {json.dumps(r.get('config'))}"
              f"{'  ' + r['part'] if 'part' in r else ''}")


def print_oldnew(rows) -> None:
    """Old (default config) vs new (fastest other candidate) per format and M; the issue-6 targets
    are ratio >= 0.5 at M = 16 / 64 and >= 0.7 at M = 256."""
    old = {(r["kernel"].split("@")[0], r["m"]): r for r in rows if r["kernel"].endswith("@old")}
    print(f"{'kernel':<12}{'m':>5}{'old_us':>9}{'new_us':>9}{'speedup':>8}{'ratio':>7}{'new':>7}"
          "  new config")
    for r in rows:
        if not r["kernel"].endswith("@new"):
            continue
        k = r["kernel"].split("@")[0]
        o = old.get((k, r["m"]))
        ot, orat = (o["time_us"], o["ratio"]) if o else (float("nan"), float("nan"))
        print(f"{k:<12}{r['m']:>5}{ot:>9.1f}{r['time_us']:>9.1f}{ot / r['time_us']:>8.2f}"
              f"{orat:>7.3f}{r['ratio']:>7.3f}  {json.dumps(r['config'])}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="int4,mxfp4,mxfp4_w4a4,bf16,fp8,w4a8")
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="token counts M")
    ap.add_argument("--budget-s", type=float, default=float("inf"),
                    help="stop trying alternative configs after this many seconds")
    ap.add_argument("--set", default="all",
                    choices=("all", "tc", "tcx", "default", "tile", "down", "prefill", "aw", "dq",
                             "smtc", "m1f", "nt", "occ", "bh"),
                    help="int4/mxfp4 candidates: all = CANDIDATES, tc = TC_CANDIDATES (issue 6), "
                    "tcx = TC_CANDIDATES + TC_EXTRA, default = the default config only, tile = "
                    "TILE_CANDIDATES, down = DOWN_CANDIDATES, prefill = PREFILL_CANDIDATES, "
                    "aw = AW_CANDIDATES, dq = DQ_CANDIDATES, smtc = SMTC_CANDIDATES, m1f = "
                    "M1F_CANDIDATES")
    ap.add_argument("--w13-tiles", default="1",
                    help="gate_up weight layouts to time: 1 = row-major, T = tile_w13 rows")
    ap.add_argument("--sweep-out", default=os.path.join(HERE, "results",
                                                        "kernels-moe-sweep-h200.json"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "kernels-moe-h200.json"))
    args = ap.parse_args(argv)
    assert torch.cuda.is_available(), "bench/kernels_moe.py needs a GPU"
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    copy_gbps = copy_bandwidth()
    print(f"copy bandwidth (read + write): {copy_gbps:.0f} GB/s", flush=True)
    log: list = []
    try:
        rows = moe_rows(copy_gbps, formats=tuple(args.formats.split(",")),
                        budget_s=args.budget_s, log=log,
                        ms=tuple(int(v) for v in args.ms.split(",")), cset=args.set,
                        w13_tiles=tuple(int(v) for v in args.w13_tiles.split(",")))
    finally:
        os.makedirs(os.path.dirname(os.path.abspath(args.sweep_out)), exist_ok=True)
        with open(args.sweep_out, "w") as f:
            json.dump(log, f, indent=1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump([{k: r[k] for k in KEYS} for r in rows], f, indent=1)
    print_sweep(log)
    print_table(rows)
    if OLDNEW:
        print_oldnew(OLDNEW)


if __name__ == "__main__":
    main()
