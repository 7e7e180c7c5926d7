"""What one persistent kernel with grid barriers would buy the B=1 decode layer (issue 7).

The B=1 step is ~14 launches per layer of 2-12 µs each for ~22 µs of bytes (bench/RESULTS.md
session 17); a kernel's ramp, not the launch gap, is where time goes. This bench times a chain of
four dependent GEMVs at Kimi-K2.5 TP8 rank shapes, M = 1, bf16 weights, L layers of distinct
weights (cold in L2), CUDA-graph replayed, µs per layer:
    P0 qkv     y0 = W0 x        W0 [2112, 7168]   30.3 MB   (q_a + kv_a)
    P1 q_b     y1 = W1 y0[:1536]  [1536, 1536]     4.7 MB
    P2 o_proj  y2 = W2 y1[:1024]  [7168, 1024]    14.7 MB
    P3 router  y3 = W3 y2          [896, 7168]    12.8 MB   (router + shared gate/up)
Variants:
    cublas     four F.linear launches
    gemv       four kernels/gemv.py launches (its default tiles)
    split      the persistent phase code, one launch per phase (G programs each)
    chain      ONE launch of G programs: the four phases separated by grid barriers (an arrive
               counter + an acquire spin; every program co-resident: G <= SMs), each program
               owning rows pid, pid + G, ... of every phase
    chain_pf   as chain, each program loading its first weight chunk of the next phase BEFORE
               the barrier (weights do not depend on the previous phase's output)
    barriers   the chain with empty phases: the cost of launch + 3 barriers
plus the bytes' floor at the copy bandwidth measured in the same run. A correctness check
compares chain's and split's y3 with torch (fp32) before timing. `--per-phase G:chunk:warps;...`
times each GEMV alone instead: cuBLAS, kernels/gemv.py (default tiles and the phase kernel's
tile) and the phase kernel. Session 18 (bench/RESULTS.md): the barriers bought nothing over
launches; the phase code's form (strided rows, every K step's loads in flight) went into
kernels/gemv.py as its STRIDED / UNROLL configs.

    python3 bench/persistent_chain.py --out $OUT/persistent-chain.json
    python3 bench/persistent_chain.py --per-phase "528:16384:8;264:16384:8" --out ...
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
from atom_stream.kernels.gemv import gemv

from kernels import copy_bandwidth, time_calls

SHAPES = ((2112, 7168), (1536, 1536), (7168, 1024), (896, 7168))  # (N, K) of P0..P3


@triton.jit
def _grid_barrier(BAR, target):
    """All programs of the grid meet here: one arrive per program (scalar atomic: one thread),
    then spin until the counter reaches target. Release / acquire at GPU scope order this
    program's earlier stores before the arrive, and the others' stores before later loads."""
    tl.debug_barrier()
    tl.atomic_add(BAR, 1, sem="release", scope="gpu")
    cnt = tl.atomic_add(BAR, 0, sem="acquire", scope="gpu")
    while cnt < target:
        cnt = tl.atomic_add(BAR, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _chunk(W, pid, G, k, N: tl.constexpr, K: tl.constexpr, R: tl.constexpr,
           BK: tl.constexpr):
    """Weight rows pid + G * j (j < R) of W [N, K], columns k .. k + BK (fp32)."""
    rows = pid + tl.arange(0, R) * G
    cols = k + tl.arange(0, BK)
    ptr = W + rows[:, None].to(tl.int64) * K + cols[None, :]
    return tl.load(ptr, mask=(rows[:, None] < N) & (cols[None, :] < K), other=0.0)


@triton.jit
def _phase(X, W, Y, pid, G, w0, N: tl.constexpr, K: tl.constexpr, R: tl.constexpr,
           BK: tl.constexpr):
    """Y[rows] = W[rows] @ X[:K] for this program's rows (pid + G * j); w0: its first weight
    chunk (columns 0 .. BK), already loaded by the caller."""
    rows = pid + tl.arange(0, R) * G
    cols = tl.arange(0, BK)
    x = tl.load(X + cols, mask=cols < K, other=0.0, cache_modifier=".cg")
    acc = tl.sum(w0.to(tl.float32) * x.to(tl.float32)[None, :], 1)
    for k in range(BK, K, BK):
        w = _chunk(W, pid, G, k, N, K, R, BK)
        x = tl.load(X + k + cols, mask=k + cols < K, other=0.0, cache_modifier=".cg")
        acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], 1)
    tl.store(Y + rows, acc.to(Y.dtype.element_ty), mask=rows < N)


@triton.jit
def _one_phase_kernel(X, W, Y, N: tl.constexpr, K: tl.constexpr, R: tl.constexpr,
                      BK: tl.constexpr):
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    _phase(X, W, Y, pid, G, _chunk(W, pid, G, 0, N, K, R, BK), N, K, R, BK)


@triton.jit
def _barrier_chunk(BAR, target, W, pid, G, N: tl.constexpr, K: tl.constexpr, R: tl.constexpr,
                   BK: tl.constexpr, PF: tl.constexpr):
    """The grid barrier, then this program's first weight chunk of the next phase; PF: the
    chunk's loads issued before the barrier (they do not depend on the previous phase)."""
    if PF:
        w = _chunk(W, pid, G, 0, N, K, R, BK)
        _grid_barrier(BAR, target)
    else:
        _grid_barrier(BAR, target)
        w = _chunk(W, pid, G, 0, N, K, R, BK)
    return w


@triton.jit
def _chain_kernel(X, W0, Y0, W1, Y1, W2, Y2, W3, Y3, BAR,
                  N0: tl.constexpr, K0: tl.constexpr, R0: tl.constexpr, B0: tl.constexpr,
                  N1: tl.constexpr, K1: tl.constexpr, R1: tl.constexpr, B1: tl.constexpr,
                  N2: tl.constexpr, K2: tl.constexpr, R2: tl.constexpr, B2: tl.constexpr,
                  N3: tl.constexpr, K3: tl.constexpr, R3: tl.constexpr, B3: tl.constexpr,
                  PF: tl.constexpr, EMPTY: tl.constexpr):
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    if EMPTY:  # launch + barriers only
        _grid_barrier(BAR, G)
        _grid_barrier(BAR, 2 * G)
        _grid_barrier(BAR, 3 * G)
    else:
        _phase(X, W0, Y0, pid, G, _chunk(W0, pid, G, 0, N0, K0, R0, B0), N0, K0, R0, B0)
        w1 = _barrier_chunk(BAR, G, W1, pid, G, N1, K1, R1, B1, PF)
        _phase(Y0, W1, Y1, pid, G, w1, N1, K1, R1, B1)
        w2 = _barrier_chunk(BAR, 2 * G, W2, pid, G, N2, K2, R2, B2, PF)
        _phase(Y1, W2, Y2, pid, G, w2, N2, K2, R2, B2)
        w3 = _barrier_chunk(BAR, 3 * G, W3, pid, G, N3, K3, R3, B3, PF)
        _phase(Y2, W3, Y3, pid, G, w3, N3, K3, R3, B3)
    # the last program to arrive resets the counter for the next launch (every program has
    # left every spin by then)
    old = tl.atomic_add(BAR, 1, sem="acq_rel", scope="gpu")
    if old == 4 * G - 1:
        tl.atomic_xchg(BAR, 0, sem="relaxed", scope="gpu")


def _meta(G: int, chunk: int) -> dict:
    """Per phase: rows per program R (a power of two >= N / G) and the K step B, so that one
    weight chunk is at most `chunk` elements (the register budget of a program)."""
    kw = {}
    for i, (n, k) in enumerate(SHAPES):
        r = triton.next_power_of_2(triton.cdiv(n, G))
        kw.update({f"N{i}": n, f"K{i}": k, f"R{i}": r,
                   f"B{i}": max(16, min(triton.next_power_of_2(k), chunk // r))})
    return kw


def chain(x, ws, ys, bar, G: int, chunk, pf: bool, empty: bool = False, warps: int = 8,
          warmup: bool = False):
    fn = _chain_kernel.warmup if warmup else _chain_kernel.__getitem__((G,))
    kw = {"grid": (G,)} if warmup else {}
    return fn(x, ws[0], ys[0], ws[1], ys[1], ws[2], ys[2], ws[3], ys[3], bar, PF=pf,
              EMPTY=empty, num_warps=warps, **_meta(G, chunk), **kw)


def co_resident(kernel, warps: int, sms: int) -> int:
    """Programs of `kernel` (compiled, not launched) that fit on the GPU at once: registers
    (256-register warp granules of 64K per SM), shared memory (227 KB + 1 KB per CTA), 64
    warps and 32 CTAs per SM. A grid above it could deadlock at the first barrier."""
    kernel._init_handles()
    regs = max(1, kernel.n_regs)
    by_regs = 65536 // (triton.cdiv(regs * 32, 256) * 256 * warps)
    by_smem = 233472 // (kernel.metadata.shared + 1024)
    return sms * min(by_regs, by_smem, 64 // warps, 32)


def split(x, ws, ys, G: int, chunk, warps: int = 8):
    m = _meta(G, chunk)
    ins = (x, ys[0], ys[1], ys[2])
    for i in range(4):
        _one_phase_kernel[(G,)](ins[i], ws[i], ys[i], N=m[f"N{i}"], K=m[f"K{i}"],
                                R=m[f"R{i}"], BK=m[f"B{i}"], num_warps=warps)


def reference(x, ws):
    y = x.float()
    for (n, k), w in zip(SHAPES, ws):
        y = (w.float() @ y[:k]).to(w.dtype).float()
    return y


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--grids", default="132,264")
    ap.add_argument("--chunks", default="8192,16384")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--per-phase", default="",
                    help="G:chunk:warps;... : time each phase alone (cuBLAS, gemv default, gemv at "
                         "the same tile, the phase kernel) at these settings; skip the chain")
    ap.add_argument("--out", default="bench/results/persistent-chain.json")
    args = ap.parse_args(argv)
    dev, dt, L = "cuda", torch.bfloat16, args.layers
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    nbytes = sum(n * k * 2 for n, k in SHAPES)
    copy = copy_bandwidth()
    floor_us = nbytes / (copy * 1e3)
    sets = []
    for _ in range(L):
        ws = [torch.randn(n, k, device=dev, dtype=dt) / k ** 0.5 for n, k in SHAPES]
        ys = [torch.empty(n, device=dev, dtype=dt) for n, _ in SHAPES]
        sets.append((torch.randn(SHAPES[0][1], device=dev, dtype=dt), ws, ys))
    bar = torch.zeros(1, device=dev, dtype=torch.int32)
    x2 = [s[0].view(1, -1) for s in sets]
    res = {"gpu": torch.cuda.get_device_name(), "sms": sms, "copy_GBps": round(copy, 1),
           "bytes": nbytes, "floor_us": round(floor_us, 2), "rows": []}

    def add(name, fn, **kw):
        t = time_calls([lambda s=s, i=i: fn(s, i) for i, s in enumerate(sets)])
        r = dict(variant=name, us=round(t, 2), ratio=round(floor_us / t, 3), **kw)
        res["rows"].append(r)
        print(json.dumps(r), flush=True)

    def lin(s, i):
        y = x2[i]
        for (n, k), w in zip(SHAPES, s[1]):
            y = F.linear(y[:, :k], w)

    def gv(s, i):
        y = x2[i]
        for (n, k), w in zip(SHAPES, s[1]):
            y = gemv(y[:, :k], w)
    if args.per_phase:
        per_phase(sets, args.per_phase, floor_us, res)
    else:
        add("cublas", lin)
        add("gemv", gv)
        chain_rows(args, sets, bar, sms, add)
    print(f"floor {floor_us:.2f} us ({nbytes / 1e6:.1f} MB at {copy:.0f} GB/s)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


def per_phase(sets, spec: str, floor_us: float, res: dict) -> None:
    """Each phase alone over the rotated weight sets: µs of cuBLAS, gemv (default tiles), gemv
    at the phase kernel's tile (BLOCK_N = R, BLOCK_K = B, its warps) and the phase kernel."""
    copy = res["copy_GBps"]
    for i, (n, k) in enumerate(SHAPES):
        xs = [torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _ in sets]
        ws = [s[1][i] for s in sets]
        ys = [s[2][i] for s in sets]
        r = {"phase": i, "N": n, "K": k,
             "cublas": time_calls([lambda x=x, w=w: F.linear(x, w) for x, w in zip(xs, ws)]),
             "gemv": time_calls([lambda x=x, w=w: gemv(x, w) for x, w in zip(xs, ws)])}
        for item in spec.split(";"):
            G, chunk, warps = (int(v) for v in item.split(":"))
            m = _meta(G, chunk)
            R, B = m[f"R{i}"], m[f"B{i}"]
            r[f"gemv_{R}x{B}w{warps}"] = time_calls(_gemv_calls(xs, ws, R, B, warps))
            r[f"phase_G{G}_{R}x{B}w{warps}"] = time_calls(
                _phase_calls(xs, ws, ys, G, n, k, R, B, warps))
        r = {kk: round(v, 2) if isinstance(v, float) else v for kk, v in r.items()}
        r["floor_us"] = round(n * k * 2 / (copy * 1e3), 2)
        res["rows"].append(r)
        print(json.dumps(r), flush=True)


def _gemv_calls(xs, ws, R, B, warps):
    cfg = {"BLOCK_N": R, "BLOCK_K": B, "num_warps": warps}
    return [lambda x=x, w=w: gemv(x, w, config=cfg) for x, w in zip(xs, ws)]


def _phase_calls(xs, ws, ys, G, n, k, R, B, warps):
    return [lambda x=x, w=w, y=y: _one_phase_kernel[(G,)](x, w, y, N=n, K=k, R=R, BK=B,
                                                          num_warps=warps)
            for x, w, y in zip(xs, ws, ys)]


def chain_rows(args, sets, bar, sms, add) -> None:
    for G in [int(g) for g in args.grids.split(",") if int(g) <= sms * 2]:
        for chunk in [int(c) for c in args.chunks.split(",")]:
            for warps in [int(w) for w in args.warps.split(",")]:
                x, ws, ys = sets[0]
                ys[3].fill_(float("nan"))
                fit = min(co_resident(chain(x, ws, ys, bar, G, chunk, pf, warps=warps,
                                            warmup=True), warps, sms) for pf in (False, True))
                if G > fit:
                    print(f"skip G={G} chunk={chunk} warps={warps}: {fit} co-resident")
                    continue
                chain(x, ws, ys, bar, G, chunk, pf=True, warps=warps)
                torch.cuda.synchronize()
                err = (ys[3].float() - reference(x, ws)).abs().max().item()
                assert bar.item() == 0, f"barrier counter not reset: {bar.item()}"
                kw = {"G": G, "chunk": chunk, "warps": warps}
                ys[3].fill_(float("nan"))
                split(x, ws, ys, G, chunk, warps)
                err_split = (ys[3].float() - reference(x, ws)).abs().max().item()
                add("split", lambda s, i, kw=kw: split(s[0], s[1], s[2], kw["G"], kw["chunk"],
                                                       kw["warps"]),
                    **kw, max_err=round(err_split, 4))
                for name, pf in (("chain", False), ("chain_pf", True)):
                    add(name, lambda s, i, kw=kw, pf=pf: chain(s[0], s[1], s[2], bar, kw["G"],
                                                               kw["chunk"], pf,
                                                               warps=kw["warps"]),
                        **kw, **({} if pf else {"max_err": round(err, 4)}))
        if G <= co_resident(chain(*sets[0], bar, G, 8192, False, empty=True,
                                  warmup=True), 8, sms):
            add("barriers", lambda s, i, G=G: chain(s[0], s[1], s[2], bar, G, 8192, False,
                                                    empty=True), G=G)


if __name__ == "__main__":
    main()
