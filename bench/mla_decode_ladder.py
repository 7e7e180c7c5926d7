"""MLA decode measurement ladder: where the fp8-cache decode time goes (issue 6).

    python3 bench/mla_decode_ladder.py --out $OUT/mla-decode-ladder-h200.json [--budget-s 100]

Measured (bench/RESULTS.md, session 3, H200): the bf16 cache decodes at 0.77-1.00 of the copy
bandwidth at B x ctx >= 512K, the fp8 cache at 0.20-0.27 everywhere (B=64@8K: fp8 329-362 µs,
bf16 189 µs for half the bytes). The rungs of kernels/mla_decode_ladder.py add ONE piece of the
real split-KV kernel at a time on v1's program shape (R0 read through the block table, R1 +
fp8 -> fp16 conversion, R2 + QK^T, R3 + online softmax, R4 + PV = the real split kernel, R5 +
the merge kernel = the whole decode), per tile path (fp8: "v1" dequant + num_stages pipeline,
"regs" v3 register double buffer + plain cast, "cpasync" v1 loop + v3 cast; bf16: "v1"); the
row "real" is kernels/mla_decode.mla_decode itself (v1, or v3 with the merge kernel) at the same
splits and config, so real - R5 says whether the ladder's R5 is the real kernel.
"µs added" = this rung - the previous one at the same (cache, path, config, shape); read
bench/notes_mla_decode_ladder.md for what each rung isolates and which fix a large step means.

Shapes: Kimi-K2.5 TP8 rank, H=8, latent 512 + rope 64, page 64, B x ctx in {1 x 8K, 64 x 8K,
256 x 1K}, splits = decode_num_splits(variant="v1"), k_scale 0.5 (fp8). Inputs and timing are
bench/kernels_attention.DecodeSetup's (>= 256 MB of distinct pages rotated per replay so the
cache is not served from L2; CUDA-graph replays, median; ratio = decode bytes / time / the copy
bandwidth measured at the start; the same bytes for every rung). Every kernel is compiled first
in --jobs spawned processes (Triton's disk cache); each rung is checked once against
ladder_reference (the first shape: every rung; the other shapes: R5 and real against
mla_decode_ref), then timed. After --budget-s nothing new is timed; the table and the JSON rows
{"rung", "cache", "path", "B", "ctx", "BLOCK_N", "warps", "stages", "splits", "time_us",
"bytes", "copy_GBps", "ratio", "added_us", "check"} are written in any case.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from kernels import copy_bandwidth, time_calls  # noqa: I001 (first: atom_stream.kernels)
from kernels_attention import FP8, R, SCALE, DecodeSetup

from atom_stream.kernels import mla_decode as dec
from atom_stream.kernels.mla_decode_ladder import PATHS, ladder_launch, ladder_reference

H = 8
SHAPES = [(1, 8192), (64, 8192), (256, 1024)]
# (cache, path, (BLOCK_N, warps, stages)) in timing priority: the real defaults first; the
# first DEFAULT_GROUPS are timed unless --groups says otherwise (15 compile tasks: one round)
DEFAULT_GROUPS = 5
GROUPS = [("fp8", "v1", (64, 8, 2)), ("fp8", "regs", (64, 8, 1)), ("bf16", "v1", (32, 4, 2)),
          ("fp8", "cpasync", (32, 4, 2)), ("fp8", "regs", (32, 8, 1)), ("fp8", "v1", (32, 4, 2)),
          ("bf16", "v1", (64, 8, 2)),
          # fp8 MMAs on the raw tiles (no conversion; q / p split in fp8 pairs): groups 7-11
          ("fp8", "f8", (64, 8, 2)), ("fp8", "f8", (32, 4, 2)), ("fp8", "f8qk", (64, 8, 2)),
          ("fp8", "f8r", (64, 8, 1)), ("fp8", "f8p1", (64, 8, 2))]
RUNGS = ["R0", "R1", "R2", "R3", "R4", "R5", "real"]
REAL = {"v1": {"variant": "v1"}, "regs": {"variant": "v3", "merge": "kernel", "fp8_path": "regs"},
        "cpasync": {"variant": "v3", "merge": "kernel", "fp8_path": "cpasync"}}
TOL = {"R1": 2e-2, "R2": 1e-3, "R3": 1e-3, "R4": 2e-2, "R5": 2e-2, "real": 2e-2}
# fp8-MMA paths: q (and p) carried as fp8 pairs, ~2^-8 relative per score term; f8p1's single
# fp8 p is coarser (interpreter: R5 rel 2-3e-2 vs 3-5e-3 for the split p)
TOL_F8 = {"R1": 2e-2, "R2": 3e-2, "R3": 5e-3, "R4": 3e-2, "R5": 3e-2}
LSE_TOL = {False: 1e-2, True: 5e-2}
DTYPES = {"fp8": FP8, "bf16": torch.bfloat16}


def rungs_of(path: str) -> list:
    """The ladder's rungs plus "real" where a production kernel runs this tile path."""
    return RUNGS if path in REAL else RUNGS[:-1]


def splits(B: int, ctx: int, rung: str, path: str) -> int:
    variant = REAL[path]["variant"] if rung == "real" else "v1"
    return dec.decode_num_splits(B, H, ctx, "cuda", variant=variant)


def make_bufs(setup, rung, path, S) -> dict:
    B, dev = setup.B, setup.q.device
    if rung == "real":
        return {"ws": dec.alloc_decode_workspace(B, H, R, S, dev, variant=REAL[path]["variant"])}
    if rung in ("R4", "R5"):
        return {"ws": (torch.empty(B, H, S, R, device=dev), torch.empty(B, H, S, device=dev))}
    return {"val": torch.empty(1, B, S, device=dev,
                               dtype=torch.int32 if rung == "R0" else torch.float32)}


def make_calls(setup, rung, path, cfg, S, bufs) -> list:
    """One zero-argument launcher per rotated block-table set."""
    qn, qp = setup.q[..., :R], setup.q[..., R:]
    a = (qn, qp, setup.pool)
    b = (setup.seq_lens, SCALE, setup.k_scale, S)
    if rung == "real":
        return [lambda bt=bt: dec.mla_decode(*a, bt, *b[:3], out=setup.out, num_splits=S,
                                             workspace=bufs["ws"], config=cfg, **REAL[path])
                for bt in setup.tables]
    kw = {"path": path, "config": cfg, "val": bufs.get("val"), "workspace": bufs.get("ws"),
              "out": setup.out}
    return [lambda bt=bt: ladder_launch(int(rung[1]), *a, bt, *b, **kw) for bt in setup.tables]


def check(setup, rung, path, cfg, S, bufs, call) -> str:
    """Run once on table set 0 with poisoned outputs; compare with the torch reference."""
    qn, qp = setup.q[..., :R], setup.q[..., R:]
    bt = setup.tables[0]
    args = (qn, qp, setup.pool, bt, setup.seq_lens, SCALE, setup.k_scale)
    refs = setup.__dict__.setdefault("ladder_refs", {})  # per (rung, path, BLOCK_N)
    if rung in ("R5", "real"):
        if "R5" not in refs:
            refs["R5"] = dec.mla_decode_ref(qn.float(), qp.float(), *args[2:])
        ref = refs["R5"]
        setup.out.fill_(float("nan"))
        call()
        got = setup.out
    else:
        level = int(rung[1])
        key = (rung, path if level == 1 else None, cfg[0])
        if key not in refs:
            refs[key] = ladder_reference(level, *args, S, path=path, block_n=cfg[0])
        ref, ran = refs[key]
        for t in bufs.get("ws", ()) if level == 4 else (bufs["val"],):
            t.fill_(-123456789 if level == 0 else float("nan"))
        call()
        if level == 0:
            got = bufs["val"].cpu()[0][ran].long()
            return "ok" if torch.equal(got, ref[0][ran]) else "FAIL word sums"
        if level == 4:
            m = ran[:, None, :].expand(setup.B, H, S)
            lse_err = float((bufs["ws"][1].cpu()[m] - ref[1][m]).abs().max())
            if not lse_err < LSE_TOL[path.startswith("f8")]:
                return f"FAIL lse {lse_err:.1e}"
            got, ref = bufs["ws"][0].cpu()[m], ref[0][m]
        else:
            got, ref = bufs["val"].cpu()[0][ran], ref[0][ran]
    got, ref = got.double().cpu(), ref.double().cpu()
    if not torch.isfinite(got).all():
        return "FAIL non-finite"
    err = float((got - ref).norm() / ref.norm().clamp(min=1e-30))
    tol = (TOL_F8 if path.startswith("f8") else TOL)[rung]
    return "ok" if err < tol else f"FAIL rel {err:.1e}"


def tasks(groups) -> list:
    return [(g, shape) for g in groups for shape in SHAPES]


def _warm(task) -> str:
    """Spawned worker: compile every rung of one (group, shape) by running it once on the same
    shapes (same arguments: the same specializations as the timing process)."""
    try:
        (name, path, cfg), (B, ctx) = task
        setup = DecodeSetup(DTYPES[name], [ctx] * B, H)
        for rung in rungs_of(path):
            S = splits(B, ctx, rung, path)
            make_calls(setup, rung, path, cfg, S, make_bufs(setup, rung, path, S))[0]()
        torch.cuda.synchronize()
        return "ok"
    except Exception as e:  # noqa: BLE001 -- reported; the timing process compiles again
        return f"{task}: {type(e).__name__}: {str(e)[:200]}"


def precompile(todo: list, jobs: int) -> list:
    import concurrent.futures as cf
    import multiprocessing as mp
    try:
        with cf.ProcessPoolExecutor(min(jobs, len(todo)),
                                    mp_context=mp.get_context("spawn")) as ex:
            return list(ex.map(_warm, todo))
    except Exception as e:  # noqa: BLE001 -- a dead worker: the timing process compiles
        return [f"pool: {type(e).__name__}: {str(e)[:200]}"]


def fmt_row(r) -> str:
    add = "" if r["added_us"] is None else f"{r['added_us']:+9.1f}"
    cfg = f"{r['path']} {r['BLOCK_N']},{r['warps']},{r['stages']} S{r['splits']}"
    return (f"{r['rung']:<6}{r['cache']:<6}{r['B']:>5}{r['ctx']:>6}  {cfg:<22}{r['time_us']:>9.1f}"
            f"{r['ratio']:>7.3f}{add:>9}  {r['check']}")


HEADER = (f"{'rung':<6}{'cache':<6}{'B':>5}{'ctx':>6}  {'config':<22}{'us':>9}{'ratio':>7}"
          f"{'+us':>9}  check")


def main(argv=None) -> None:
    t0 = time.time()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "mla-decode-ladder-h200.json"))
    ap.add_argument("--budget-s", type=float, default=100.0, help="no new timing after this")
    ap.add_argument("--jobs", type=int, default=15, help="compile processes (0: none)")
    ap.add_argument("--groups", default=None,
                    help="'all' or comma-separated indices into GROUPS (default: the first "
                         f"{DEFAULT_GROUPS}, in priority order)")
    args = ap.parse_args(argv)
    if args.groups is None:
        groups = GROUPS[:DEFAULT_GROUPS]
    elif args.groups == "all":
        groups = GROUPS
    else:
        groups = [GROUPS[int(i)] for i in args.groups.split(",")]
    todo = tasks(groups)
    if args.jobs > 0:
        res = precompile(todo, args.jobs)
        bad = [r for r in res if r != "ok"]
        print(f"precompiled {len(todo)} (group, shape) tasks in {time.time() - t0:.0f} s"
              + (f"; worker errors: {bad}" if bad else ""), flush=True)
    copy = copy_bandwidth(warm_s=0.5)
    print(f"device: {torch.cuda.get_device_name()}  copy {copy:.0f} GB/s", flush=True)
    deadline = t0 + args.budget_s
    rows, skipped, setups = [], 0, {}
    print(HEADER, flush=True)
    for (name, path, cfg), (B, ctx) in todo:
        if time.time() > deadline:
            skipped += len(rungs_of(path))
            continue
        key = (name, B, ctx)
        if key not in setups:  # kept: <= 6 pools of 0.26-0.6 GB
            setups[key] = DecodeSetup(DTYPES[name], [ctx] * B, H)
        setup, prev = setups[key], None
        for rung in rungs_of(path):
            if time.time() > deadline:
                skipped += 1
                continue
            S = splits(B, ctx, rung, path)
            bufs = make_bufs(setup, rung, path, S)
            calls = make_calls(setup, rung, path, cfg, S, bufs)
            try:
                chk = "-"
                if (B, ctx) == SHAPES[0] or rung in ("R5", "real"):
                    chk = check(setup, rung, path, cfg, S, bufs, calls[0])
                t = time_calls(calls)
            except Exception as e:  # noqa: BLE001 -- reported; the next rung still runs
                print(f"{rung} {name} {path} {cfg} B={B} ctx={ctx}: {type(e).__name__}: "
                      f"{str(e)[:300]}", flush=True)
                prev = None
                continue
            stages = 1 if PATHS[path][0] == 1 else cfg[2]  # register double buffer
            r = {"rung": rung, "cache": name, "path": path, "B": B, "ctx": ctx,
                 "BLOCK_N": cfg[0], "warps": cfg[1], "stages": stages, "splits": S,
                 "time_us": round(t, 2), "bytes": setup.bytes, "copy_GBps": round(copy),
                 "ratio": round(setup.bytes / t / 1e3 / copy, 4),
                 "added_us": None if prev is None else round(t - prev, 2), "check": chk}
            prev = t
            rows.append(r)
            print(fmt_row(r), flush=True)
    if skipped:
        print(f"budget: {skipped} rung/shape points not timed", flush=True)
    print(f"\n{HEADER}")  # the whole table again, grouped by shape (easier to compare paths)
    for B, ctx in SHAPES:
        for r in rows:
            if (r["B"], r["ctx"]) == (B, ctx):
                print(fmt_row(r))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {len(rows)} rows to {args.out} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
