"""M=1 MoE GEMV measurement ladder: which piece of the gate_up / down work costs the µs (issue 6).

    python3 bench/moe_gemv_ladder.py --out $OUT/moe-gemv-ladder-h200.json [--budget-s 95]

The read probe (bench/moe_read_probe.py) reads the 8 experts' gate_up bytes in ~5.5 µs, the
small-M gate_up kernel takes ~15.4 µs for them. The rungs of kernels/moe_gemv_ladder.py add ONE
piece of the real work at a time (L0 read, L1 + int4 magic-number unpack, L2 + group scales,
L3 + dot with x, L4 + gate/up pairing and silu; L4m = L4 on MXFP4; down: D0 read, D4 the real
down, D4m MXFP4), each timed at a few (R rows per program, SK split-K, CH 128-K chunks per step,
warps) points, so "µs added" by a rung at a fixed config is that piece's cost
(bench/notes_moe_gemv_ladder.md says which fix each rung's cost points to).

Shapes: Kimi-K2.5 TP8 rank (H 7168, I 256, E 384, top-8), random kernel-layout words (every
pattern is a valid int4 / MXFP4 code), bf16 / e8m0 scales. Timing exactly as the read probe:
bench/kernels_moe.time_calls (median of CUDA-graph replays) over ROT = 8 rotated routings (117 MB
of distinct weights per pass: past the 50 MB L2); ratio = bytes read / time / the copy bandwidth
measured at the start (bytes: weights; + scales from L2 / D4; x and act are < 0.1 MB). The
probe's own best points (gate_up and down, experts mode) are re-timed first in the same run.
Every kernel is compiled first in --jobs spawned processes (Triton's disk cache), then each rung
and config is checked once against kernels/moe_gemv_ladder's float64 reference ("check": "ok"
or "FAIL ...") and timed. After --budget-s nothing new is timed; the table and the JSON rows
{"rung", "part", "fmt", "R", "SK", "CH", "BN", "warps", "time_us", "bytes", "GBps",
"copy_GBps", "ratio", "added_us", "check"} are written in any case.
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
sys.path.insert(0, os.path.dirname(HERE))

H, I, E, TOPK, ROT = 7168, 256, 384, 8, 8
# gate_up configs (R rows per program, SK, warps), in priority order (the budget may stop early)
GU_CONFIGS = [
    (16, 7, 4),  # the small-M kernel's M=1 tile: 8 gate + 8 up rows x 1024 K, one 8 KB step
    (4, 1, 4),  # 14 KB per program over 7 double-buffered 2 KB steps (probe-like bytes)
    (32, 7, 8),  # one 16 KB step per program (the probe's best chunk)
    (8, 7, 4),  # one 4 KB step per program
    (8, 1, 8),  # 28 KB per program over 7 steps of 4 KB
]
GU_RUNGS = [("L0", 0, "int4"), ("L1", 1, "int4"), ("L2", 2, "int4"), ("L3", 3, "int4"),
            ("L4", 4, "int4"), ("L4m", 4, "mxfp4")]
DOWN_CONFIGS = [(16, 4), (32, 4), (64, 8)]  # (BN output rows per program, warps)
DOWN_RUNGS = [("D0", 0, "int4"), ("D4", 4, "int4"), ("D4m", 4, "mxfp4")]
PREV = {"L1": "L0", "L2": "L1", "L3": "L2", "L4": "L3", "L4m": "L4", "D4": "D0", "D4m": "D4"}
PROBE = {"gate_up": (16384, 8), "down": (16384, 8)}  # (chunk, warps): the probe's best points


def make_weights(dev, n_experts: int = E, seed: int = 0) -> dict:
    g = torch.Generator(device=dev).manual_seed(seed)

    def words(*s):
        return torch.randint(-2**31, 2**31 - 1, s, generator=g, device=dev, dtype=torch.int32)

    def u8(lo, hi, *s):
        return torch.randint(lo, hi, s, generator=g, device=dev, dtype=torch.int32).to(torch.uint8)

    e = n_experts
    return {"w13": words(e, 2 * I, H // 128, 16), "w2": words(e, H, I // 128, 16),
            "s13": {"int4": ((torch.rand(e, 2 * I, H // 32, generator=g, device=dev) + 0.5)
                             / (4 * H ** 0.5)).bfloat16(),
                    "mxfp4": u8(112, 124, e, 2 * I, H // 32)},
            "s2": {"int4": ((torch.rand(e, H, I // 32, generator=g, device=dev) + 0.5)
                            / (4 * I ** 0.5)).bfloat16(),
                   "mxfp4": u8(116, 126, e, H, I // 32)}}


def make_sets(dev, n_experts: int = E, rot: int = ROT, seed: int = 1) -> list:
    """rot routings: (ids int32 [TOPK] distinct, tw fp32 [TOPK], x bf16 [H])."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randperm(n_experts, generator=g)[:TOPK].int().to(dev),
             (torch.rand(TOPK, generator=g) + 0.1).to(dev),
             torch.randn(H, generator=g).bfloat16().to(dev)) for _ in range(rot)]


def make_call(kind, level, fmt, cfg, w, s, bufs):
    """A no-argument launcher of one rung on routing s, writing into bufs."""
    from atom_stream.kernels.moe_gemv_ladder import down_rung, gate_up_rung
    ids, tw, x = s
    if kind == "gate_up":
        R, SK, warps = cfg
        out = bufs["act"] if level == 4 else bufs[("gu", level == 0, SK)]
        part = bufs[("gu", False, SK)] if level == 4 and SK > 1 else None
        return lambda: gate_up_rung(level, x, w["w13"], w["s13"][fmt], ids, out, fmt=fmt, R=R,
                                    SK=SK, warps=warps, part=part)
    BN, warps = cfg
    y = bufs[("y", level == 0)]
    return lambda: down_rung(level, bufs["act_in"], w["w2"], w["s2"][fmt], ids, tw, y, fmt=fmt,
                             BN=BN, warps=warps)


def make_bufs(dev) -> dict:
    b = {"act": torch.empty(TOPK, I, device=dev), "act_in": torch.randn(TOPK, I, device=dev),
         ("y", True): torch.empty(H, dtype=torch.int32, device=dev),
         ("y", False): torch.empty(H, device=dev)}
    for sk in {c[1] for c in GU_CONFIGS}:
        b[("gu", True, sk)] = torch.empty(sk, TOPK, 2 * I, dtype=torch.int32, device=dev)
        b[("gu", False, sk)] = torch.empty(sk, TOPK, 2 * I, device=dev)
    return b


def tasks() -> list:
    """(rung, kind, level, fmt, cfg) in timing order."""
    t = [(n, "gate_up", lv, f, c) for c in GU_CONFIGS for n, lv, f in GU_RUNGS]
    return t + [(n, "down", lv, f, c) for c in DOWN_CONFIGS for n, lv, f in DOWN_RUNGS]


def _warm(chunk) -> str:
    """Spawned worker: compile the tasks of chunk by running each once on 8-expert weights
    (same strides' divisibility as the real ones: the same specialization)."""
    try:
        w = make_weights("cuda", TOPK)
        s = make_sets("cuda", TOPK, 1)[0]
        bufs = make_bufs("cuda")
        for t in chunk:
            if t[0] == "probe":
                from moe_read_probe import PARTS, _read_kernel
                chunk_b, warps = PROBE[t[1]]
                wt = torch.zeros(TOPK, PARTS[t[1]] // 4, dtype=torch.int32, device="cuda")
                cpe = PARTS[t[1]] // chunk_b
                out = torch.empty(TOPK * cpe, dtype=torch.int32, device="cuda")
                _read_kernel[(TOPK * cpe,)](wt, s[0], out, *range(8), PARTS[t[1]], cpe,
                                            CHUNK=chunk_b, MODE=1, num_warps=warps)
            else:
                make_call(t[1], t[2], t[3], t[4], w, s, bufs)()
        torch.cuda.synchronize()
        return "ok"
    except Exception as e:  # noqa: BLE001 -- reported; the timing process compiles again
        return f"{type(e).__name__}: {str(e)[:200]}"


def precompile(todo: list, jobs: int) -> list:
    import concurrent.futures as cf
    import multiprocessing as mp
    chunks = [todo[i::jobs] for i in range(jobs) if todo[i::jobs]]
    try:
        with cf.ProcessPoolExecutor(len(chunks), mp_context=mp.get_context("spawn")) as ex:
            return list(ex.map(_warm, chunks))
    except Exception as e:  # noqa: BLE001 -- a dead worker: the timing process compiles
        return [f"pool: {type(e).__name__}: {str(e)[:200]}"]


def check(kind, level, fmt, cfg, w, s, bufs, call) -> str:
    """Run once (outputs poisoned first) and compare with the float64 reference."""
    from atom_stream.kernels import moe_gemv_ladder as L
    ids, tw, x = s
    if kind == "gate_up":
        SK = cfg[1]
        out = bufs["act"] if level == 4 else bufs[("gu", level == 0, SK)]
        ref = L.gate_up_reference(level, x, w["w13"], w["s13"][fmt], ids, fmt=fmt, SK=SK)
    else:
        out = bufs[("y", level == 0)]
        ref = L.down_reference(level, bufs["act_in"], w["w2"], w["s2"][fmt], ids, tw, fmt=fmt)
    out.fill_(-123456789 if level == 0 else float("nan"))
    call()
    torch.cuda.synchronize()
    if level == 0:
        return "ok" if torch.equal(out, ref) else "FAIL int sum"
    got = (L.act_natural(out) if kind == "gate_up" and level == 4 else out).double()
    if not torch.isfinite(got).all():
        return "FAIL non-finite"
    err = float((got - ref).norm() / ref.norm())
    return "ok" if err < 1e-5 else f"FAIL rel {err:.2e}"


def nbytes(kind, level, fmt) -> int:
    per = (2 * I * H if kind == "gate_up" else H * I) // 2  # int4 / e2m1 weight bytes
    if (kind == "gate_up" and level >= 2) or (kind == "down" and level == 4):
        per += (2 * I * H if kind == "gate_up" else H * I) // 32 * (2 if fmt == "int4" else 1)
    return TOPK * per


def time_probe(part, w, sets) -> float:
    from kernels_moe import time_calls
    from moe_read_probe import PARTS, _read_kernel
    chunk_b, warps = PROBE[part]
    per = PARTS[part]
    src = (w["w13"] if part == "gate_up" else w["w2"]).view(E, -1)
    cpe = per // chunk_b
    out = torch.empty(TOPK * cpe, dtype=torch.int32, device="cuda")
    calls = [lambda ids=s[0]: _read_kernel[(TOPK * cpe,)](
        src, ids, out, *range(8), per, cpe, CHUNK=chunk_b, MODE=1, num_warps=warps)
        for s in sets]
    return time_calls(calls)


def fmt_cfg(kind, cfg) -> str:
    if kind == "gate_up":
        from atom_stream.kernels.moe_gemv_ladder import default_ch
        return f"R{cfg[0]} SK{cfg[1]} CH{default_ch(H, cfg[1])} W{cfg[2]}"
    if kind == "down":
        return f"BN{cfg[0]} W{cfg[1]}"
    return f"chunk{cfg[0]} W{cfg[1]}"


def main(argv=None) -> None:
    t0 = time.time()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "moe-gemv-ladder-h200.json"))
    ap.add_argument("--budget-s", type=float, default=95.0, help="no new timing after this")
    ap.add_argument("--jobs", type=int, default=12, help="compile processes (0: none)")
    args = ap.parse_args(argv)
    from atom_stream.kernels.moe_gemv_ladder import default_ch
    from kernels_moe import copy_bandwidth, time_calls
    todo = tasks()
    if args.jobs > 0:
        res = precompile([("probe", "gate_up"), ("probe", "down")] + todo, args.jobs)
        bad = [r for r in res if r != "ok"]
        print(f"precompiled {len(todo) + 2} kernels in {time.time() - t0:.0f} s"
              + (f"; worker errors: {bad}" if bad else ""), flush=True)
    copy = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}  copy {copy:.0f} GB/s", flush=True)
    w = make_weights("cuda")
    sets = make_sets("cuda")
    bufs = make_bufs("cuda")
    deadline = t0 + args.budget_s
    rows, times = [], {}

    def add(rung, part, fmt, cfg, t, nb, chk, prev_key):
        gbps = nb / t / 1e3
        prev = times.get(prev_key)
        r = {"rung": rung, "part": part, "fmt": fmt, "R": None, "SK": None, "CH": None,
             "BN": None, "warps": cfg[-1], "time_us": round(t, 2), "bytes": nb,
             "GBps": round(gbps), "copy_GBps": round(copy), "ratio": round(gbps / copy, 3),
             "added_us": None if prev is None else round(t - prev, 2), "check": chk,
             "config": fmt_cfg(part if rung not in ("P", "Pd") else "probe", cfg)}
        if part == "gate_up" and rung not in ("P",):
            r.update(R=cfg[0], SK=cfg[1], CH=default_ch(H, cfg[1]))
        elif part == "down" and rung != "Pd":
            r["BN"] = cfg[0]
        rows.append(r)
        add_s = "" if r["added_us"] is None else f"{r['added_us']:+8.2f}"
        print(f"{rung:<5}{part:<8}{fmt:<6}{r['config']:<22}{t:>8.2f}{gbps:>7.0f}"
              f"{gbps / copy:>7.3f}{add_s:>9}  {chk}", flush=True)

    print(f"{'rung':<5}{'part':<8}{'fmt':<6}{'config':<22}{'us':>8}{'GB/s':>7}{'ratio':>7}"
          f"{'+us':>9}  check")
    for part, rung in (("gate_up", "P"), ("down", "Pd")):
        t = time_probe(part, w, sets)
        times[(rung, part)] = t
        add(rung, part, "int4", PROBE[part], t, TOPK * (2 * I * H if part == "gate_up" else H * I)
            // 2, "-", None)
    skipped = 0
    for rung, kind, level, fmt, cfg in todo:
        if time.time() > deadline:
            skipped += 1
            continue
        calls = [make_call(kind, level, fmt, cfg, w, s, bufs) for s in sets]
        chk = check(kind, level, fmt, cfg, w, sets[0], bufs, calls[0])
        t = time_calls(calls)
        times[(rung, cfg)] = t
        prev = (PREV[rung], cfg) if rung in PREV else (("P", "gate_up") if rung == "L0"
                                                       else ("Pd", "down"))
        add(rung, kind, fmt, cfg, t, nbytes(kind, level, fmt), chk, prev)
    if skipped:
        print(f"budget: {skipped} of {len(todo)} rung/config points not timed")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {len(rows)} rows to {args.out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
