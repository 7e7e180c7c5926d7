"""Small-M 4-bit fused MoE: kernels/moe_small_m.py against kernels/fused_moe.py, same run.

    python3 bench/moe_small_m.py --out $OUT/moe-small-m-h200.json [--budget-s 100]

Shapes: Kimi-K2.5 TP8 rank (H=7168, I=256, E=384, top-8, uniform random routing), repacked
int4 g32 and MXFP4 experts (bench/kernels_moe.make_weights), M = 1, 4, 16, 64, 256 tokens.
Timing: bench/kernels.time_calls (median of CUDA-graph replays) over ROT different routings and
inputs (32 for M <= 16, else 8) so the experts' weights miss L2; routing not timed. bytes = the
touched experts' weights + scales (distinct experts per routing, averaged) + x in + y out;
ratio = bytes / time / the copy bandwidth measured at the start of this run.
For each M: fused_moe without its small-M path (small_m_max 0), then moe_small_m's default and
a few candidate configs (CANDIDATES, until --budget-s), then the best candidate's gate_up kernel
alone. Before timing, every (format, M) checks moe_small_m against fused_moe on one routing,
and at M = 1 and 16 against moe_small_m_ref (float64); a failed check marks the row
("check": "FAIL ...").
Prints every timing as it goes and a table at the end; --out gets the rows (JSON).

    python3 bench/moe_small_m.py --sweep --budget-s 110 --out $OUT/moe-small-m-sweep-h200.json

--sweep: M = 1 and 4, int4 and mxfp4, the configs of SWEEP (the new knobs VT / DW / PDL and
the tile knobs around them; predictions in bench/notes_moe_small_m.md). Every config is first
compiled in --jobs spawned processes (Triton's disk cache; the timing process then only loads
the cubins), checked against the default config's output on one routing (rel < 1e-3: both are
fp32 sums of the same products), timed, and its gate_up alone timed once per distinct gate_up
variant (down = total - gate_up). After --budget-s no new config is timed; the table (config,
us, ratio, gate_up-only us) and the JSON are written in any case.

    python3 bench/moe_small_m.py --m1-kernel --budget-s 110 --out $OUT/moe-m1-gate-up-h200.json

--m1-kernel: the --sweep machinery at M = 1 over M1_SWEEP: the old small-M gate_up ({"M1": 0})
and the M=1 gate_up of kernels/moe_m1_gate_up.py ({"M1": 1}, env ATOM_STREAM_MOE_M1_KERNEL)
at its default MR 4 and neighbours, each with the same down kernel: total and gate_up-only us
side by side; first, each path is checked against fused_moe (GEMV) and the float64 reference.

    python3 bench/moe_small_m.py --pair-m --budget-s 100 --jobs 12 --out $OUT/moe-pair-m-h200.json

--pair-m: at M = 1, 2, 4, 8, 16, 32 (--ms), int4 and MXFP4, two paths through fused_moe side by
side: "default" = fused_moe's dispatch with ATOM_STREAM_MOE_PAIR_M_MAX=1 (today's: small-M up
to SMALL_M_MAX (4), GEMV up to gemv_max (8), tensor cores above; pinned by config whatever the
environment says) and "pair" = the per-pair gate_up of kernels/moe_m1_gate_up.py + the small-M
down (what PAIR_M_MAX >= M selects), plus pair's gate_up alone. Same bytes for both (the
DISTINCT touched experts: pair's repeated reads of an expert count against it), same rotated
routings (random distinct top-8 per token, uniform over the 384 experts). Every (format, M)
first checks both paths against the float64 reference and each other on one routing (NaN-
poisoned intermediates). All configs are precompiled in --jobs processes; then the main rows
(M outer) until --budget-s, then the PAIR_VARIANTS rows while the budget lasts. Table + JSON.
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
# bench/kernels.py first: it makes atom_stream.kernels importable on a bare GPU box
from kernels import copy_bandwidth, make_row, print_table, time_calls  # noqa: I001
from kernels_moe import TOPK, E, H, I, expert_bytes, make_sets, make_weights
from atom_stream.kernels.fused_moe import SMALL_M_MAX, fused_moe
from atom_stream.kernels.fused_moe import default_config as fused_default_config
from atom_stream.kernels.fused_moe_common import INT4, MXFP4
from atom_stream.kernels.moe_small_m import (
    M1_KERNEL,
    default_config,
    moe_small_m,
    moe_small_m_ref,
)

MS = (1, 4, 16, 64, 256)
# overrides of moe_small_m.default_config ({} = the default); predictions in
# bench/notes_moe_small_m.md
CANDIDATES = {  # kept short: every config is a fresh Triton compile (~2-4 s each)
    1: [{}, {"SK": 1}, {"BN": 4}, {"BN2": 16}],
    4: [{}, {"SK": 7}, {"BN": 8}],
    16: [{}, {"BT": 2}, {"BN": 8}],
    64: [{}, {"BT": 1}, {"BN": 8}],
    256: [{}, {"BN": 8}],
}


# --sweep (M -> overrides); the first is the current default. VT: vector-id epilogue / split-K
# tail, DW: all-pairs down kernel, PDL: down as a programmatic dependent launch
_DW = {"VT": 1, "DW": 1}
SWEEP = {
    1: [{}, {"BN2": 16}, {"PDL": 1}, {"VT": 1}, dict(_DW, BN2=8), dict(_DW, BN2=16),
        dict(_DW, BN2=32, W2=8), dict(_DW, BN2=16, W2=8), dict(_DW, BN2=8, PDL=1),
        dict(_DW, BN2=16, PDL=1), dict(_DW, BN2=16, PDL=1, SK=1), dict(_DW, BN2=16, PDL=1, BN=4),
        dict(_DW, BN2=16, PDL=1, CH=4, SK=14), dict(_DW, BN2=16, PDL=1, CH=4, SK=7),
        dict(_DW, BN2=16, PDL=1, W1=2)],
    4: [{}, {"BN": 8}, {"VT": 1}, dict(_DW, BN2=8), dict(_DW, BN2=16), dict(_DW, BN2=16, PDL=1),
        dict(_DW, BN2=16, PDL=1, BN=8), dict(_DW, BN2=32, W2=8, PDL=1), dict(_DW, BN2=16, SK=7)],
}
# --m1-kernel (M = 1 only): old gate_up vs the M=1 kernel (MR rows per program, full K)
_M1 = {"M1": 1}
M1_SWEEP = {1: [{"M1": 0}, _M1, dict(_M1, MR=2), dict(_M1, MR=8), dict(_M1, W1=2),
                dict(_M1, W1=8), dict(_M1, MR=8, W1=8), dict(_M1, CH=4), dict(_M1, S1=2),
                dict(_M1, PDL=1), {"M1": 0, "PDL": 1}]}
# --pair-m: M values, and per-pair configs timed after the main rows while the budget lasts
PAIR_MS = (1, 2, 4, 8, 16, 32)
PAIR_VARIANTS = [{"MR": 8}, {"MR": 16}, {"MR": 8, "W1": 8}, {"PDL": 1}]
# what the gate_up kernels depend on
_GU_KEYS = ("M1", "MR", "BN", "CH", "SK", "BT", "W1", "S1", "VT")
_WARM: dict = {}


def _warm(task) -> str:
    """Spawned worker: compile one (fmt, M, config) by running it once (fills Triton's disk
    cache for the timing process)."""
    fmt, M, cfg = task
    try:
        if fmt not in _WARM:
            _WARM[fmt] = make_weights(fmt, "cuda")
        w = _WARM[fmt]
        x, tw, ids, out = make_sets(M, 1, "cuda")[0][0]
        if cfg is None or "fused" in cfg:  # the GEMV baseline, or fused_moe with a config
            kw = {k: v for k, v in w.items() if k not in ("w13", "w2")}
            fc = cfg["fused"] if cfg else {"small_m_max": 0}
            for c in (fc, dict(fc, stop_after="gate_up")):  # (only small-M reads stop_after)
                fused_moe(x, w["w13"], w["w2"], tw, ids, out=out, config=c, **kw)
            torch.cuda.synchronize()
            return "ok"
        for c in (cfg, dict(cfg, stop_after="gate_up")):
            moe_small_m(x, w["w13"], w["w2"], w["w13_scale"], w["w2_scale"], tw, ids, fmt, c,
                        out=out)
        torch.cuda.synchronize()
        return "ok"
    except Exception as e:  # noqa: BLE001 -- reported, the timing run then skips it
        return f"{type(e).__name__}: {str(e)[:200]}"


def precompile(tasks, jobs: int) -> dict:
    import concurrent.futures as cf
    import multiprocessing as mp
    with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as ex:
        return dict(zip(map(repr, tasks), ex.map(_warm, tasks)))


def sweep(args, copy, t_start, table=None) -> list:
    """--sweep / --m1-kernel: rows of every (fmt, M, config) of table (M -> configs) timed
    before the deadline."""
    table = table or SWEEP
    fmts, ms = args.formats.split(","), sorted(table)
    tasks = [(f, M, c) for M in ms for f in fmts for c in [None] + table[M]]
    warm = precompile(tasks, args.jobs) if args.jobs > 0 else {}
    print(f"precompiled {len(tasks)} configs in {time.time() - t_start:.0f} s", flush=True)
    deadline = t_start + args.budget_s
    rows = []
    for M in ms:
        for fmt in fmts:
            w = make_weights(fmt, "cuda")
            new = sweep_one(fmt, M, w, copy, warm, deadline, table[M])
            if table is M1_SWEEP:  # each path against GEMV and float64 (rows: "ref_check")
                for m1 in (0, 1):
                    try:
                        status = check(fmt, w, M, {"M1": m1})
                    except Exception as e:  # noqa: BLE001 -- reported, not fatal
                        status = f"FAIL {type(e).__name__}: {str(e)[:200]}"
                    print(f"{fmt} M={M} M1={m1} check: {status}", flush=True)
                    for r in new:
                        if r["config"] is not None and int(r["config"].get("M1", -1)) == m1:
                            r["ref_check"] = status
            rows += new
    return rows


def sweep_one(fmt, M, w, copy, warm, deadline, configs) -> list:
    kw = {k: v for k, v in w.items() if k not in ("w13", "w2")}
    w13, w2, s13, s2 = w["w13"], w["w2"], w["w13_scale"], w["w2_scale"]
    sets, distinct = make_sets(M, 32, "cuda")
    nbytes = int(distinct * expert_bytes(w) + 2 * M * H * 2)
    rows = []

    def run(cfg, s):
        return moe_small_m(s[0], w13, w2, s13, s2, s[1], s[2], fmt, cfg, out=s[3])

    def row(name, t, cfg, **extra):
        r = dict(make_row(f"{name}_{fmt}", 0, 0, M, t, nbytes, copy), config=cfg, **extra)
        print(json.dumps(r), flush=True)
        rows.append(r)

    t = time_calls(calls_for(lambda s: fused_moe(s[0], w13, w2, s[1], s[2], out=s[3],
                                                 config={"small_m_max": 0}, **kw), sets))
    row("fused_moe_gemv", t, None)
    base = run({}, sets[0]).clone()
    gu_done = {}
    for cfg in configs:
        if time.time() > deadline:
            print(f"budget: skipped {fmt} M={M} {cfg}", flush=True)
            continue
        why = warm.get(repr((fmt, M, cfg)), "ok")
        if why != "ok":
            print(f"{fmt} M={M} {cfg}: precompile failed: {why}", flush=True)
            continue
        try:
            err = rel_err(run(cfg, sets[0]), base)
            t = time_calls(calls_for(lambda s, c=cfg: run(c, s), sets))
            key = tuple(cfg.get(k) for k in _GU_KEYS)
            if key not in gu_done:
                gu_done[key] = time_calls(calls_for(
                    lambda s, c=dict(cfg, stop_after="gate_up"): run(c, s), sets))
        except Exception as e:  # noqa: BLE001 -- one failing config must not stop the rest
            print(f"{fmt} M={M} {cfg}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        row("small_m", t, cfg, gate_up_us=round(gu_done[key], 3),
            check=("ok" if err < 1e-3 else "FAIL") + f" vs default {err:.1e}")
    return rows


def print_sweep(rows) -> None:
    print(f"{'kernel':<22}{'M':>3} {'config':<58}{'us':>8}{'ratio':>7}{'gate_up':>9}  check")
    for r in rows:
        cfg = json.dumps(r["config"]).replace('"', "") if r["config"] is not None else "-"
        print(f"{r['kernel']:<22}{r['m']:>3} {cfg:<58}{r['time_us']:>8.1f}{r['ratio']:>7.3f}"
              f"{r.get('gate_up_us', float('nan')):>9.1f}  {r.get('check', '')}")


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm())


def check(fmt, w, M, cfg=None) -> str:
    """moe_small_m (config cfg) vs fused_moe (and vs the float64 reference at M = 1, 16) on
    one routing."""
    x, tw, ids, _ = make_sets(M, 1, "cuda")[0][0]
    kw = {k: v for k, v in w.items() if k not in ("w13", "w2")}
    y_old = fused_moe(x, w["w13"], w["w2"], tw, ids, config={"small_m_max": 0}, **kw)
    y_new = torch.full_like(y_old, float("nan"))
    moe_small_m(x, w["w13"], w["w2"], w["w13_scale"], w["w2_scale"], tw, ids, fmt,
                dict(cfg or {}, poison=True), out=y_new)
    msgs = [f"vs fused_moe {rel_err(y_new, y_old):.2e}"]
    ok = rel_err(y_new, y_old) < 2e-2
    if M in (1, 16):
        ref = moe_small_m_ref(x, w["w13"], w["w2"], w["w13_scale"], w["w2_scale"], tw, ids, fmt)
        err = rel_err(y_new, ref)
        msgs.append(f"vs float64 ref {err:.2e} (fused_moe {rel_err(y_old, ref):.2e})")
        ok = ok and err < 1e-2
    return ("ok " if ok else "FAIL ") + ", ".join(msgs)


def calls_for(fn, sets):
    return [lambda s=s: fn(s) for s in sets]


def run_m(fmt, w, M, copy, deadline, t_start, log) -> list:
    """Rows of one (format, M): fused_moe, moe_small_m default, best candidate."""
    kw = {k: v for k, v in w.items() if k not in ("w13", "w2")}
    w13, w2, s13, s2 = w["w13"], w["w2"], w["w13_scale"], w["w2_scale"]
    status = check(fmt, w, M)
    print(f"{fmt} M={M} check: {status}", flush=True)
    sets, distinct = make_sets(M, 32 if M <= 16 else 8, "cuda")
    nbytes = int(distinct * expert_bytes(w) + 2 * M * H * 2)
    rows = []

    def rec(name, t, cfg=None, part=None):
        r = dict(make_row(f"{name}_{fmt}", 0, 0, M, t, nbytes, copy), check=status)
        if cfg is not None:
            r["config"] = cfg
        if part:
            r["part"] = part
        log.append(r)
        print(json.dumps(r), flush=True)
        return r

    def new(cfg):
        return calls_for(lambda s: moe_small_m(s[0], w13, w2, s13, s2, s[1], s[2], fmt, cfg,
                                               out=s[3]), sets)

    old = time_calls(calls_for(lambda s: fused_moe(s[0], w13, w2, s[1], s[2], out=s[3],
                                                   config={"small_m_max": 0}, **kw), sets))
    rows.append(rec("fused_moe", old))
    best = default = None
    for i, cfg in enumerate(CANDIDATES.get(M, [{}])):
        if i and time.time() > deadline:
            break
        try:
            t = time_calls(new(cfg))
        except Exception as e:  # noqa: BLE001 -- a failing candidate must not stop the rest
            print(f"{fmt} M={M} {cfg}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        r = rec("small_m", t, dict(default_config(M, H, I, TOPK), **cfg))
        if i == 0:
            rows.append(r)
            default = t
        if best is None or t < best[0]:
            best = (t, cfg)
    if best is None:
        return rows
    rows.append(rec("small_m_best", best[0], dict(default_config(M, H, I, TOPK), **best[1])))
    if time.time() < deadline:  # where the time goes: gate_up alone
        t = time_calls(new(dict(best[1], stop_after="gate_up")))
        rec("small_m_gate_up_only", t, best[1], part="gate_up only (bytes: whole MoE)")
    print(f"== {fmt} M={M}: fused_moe {old:.1f} us, moe_small_m default {default} us, best "
          f"{best[0]:.1f} us {best[1]}  [{time.time() - t_start:.0f} s]", flush=True)
    return rows


def fused_cfg(M: int, pair: dict | None = None) -> dict:
    """fused_moe config of --pair-m: pair None = the default dispatch as with PAIR_M_MAX 1
    (whatever the environment says), else the per-pair path with moe_small_m overrides pair."""
    if pair is None:
        return {"small_m_max": SMALL_M_MAX, "small_m": {"M1": int(M == 1 and M1_KERNEL)}}
    return {"small_m_max": M, "small_m": dict(pair, M1=1)}


def default_path(fmt: str, M: int) -> str:
    """The path fused_moe's default dispatch (PAIR_M_MAX 1) takes at M."""
    if M <= SMALL_M_MAX:
        return "small_m/M1" if M == 1 and M1_KERNEL else "small_m"
    cfg = fused_default_config(INT4 if fmt == "int4" else MXFP4, M, M * TOPK, E, H, I)
    return "gemv" if M <= cfg["gemv_max"] else "tc"


def check_pair(fmt, w, M) -> dict:
    """{"default": status, "pair": status}: each path (NaN-poisoned intermediates) against the
    float64 reference on one routing, pair also against default."""
    x, tw, ids, _ = make_sets(M, 1, "cuda")[0][0]
    kw = {k: v for k, v in w.items() if k not in ("w13", "w2")}
    try:
        ref = moe_small_m_ref(x, w["w13"], w["w2"], w["w13_scale"], w["w2_scale"], tw, ids, fmt)
        ys = [fused_moe(x, w["w13"], w["w2"], tw, ids, config=dict(fused_cfg(M, p), poison=True),
                        **kw) for p in (None, {})]
    except Exception as e:  # noqa: BLE001 -- reported in the rows, not fatal
        return dict.fromkeys(("default", "pair"), f"FAIL {type(e).__name__}: {str(e)[:200]}")
    e_def, e_pair, e_both = rel_err(ys[0], ref), rel_err(ys[1], ref), rel_err(ys[1], ys[0])
    return {"default": ("ok" if e_def < 2e-2 else "FAIL") + f" vs ref {e_def:.1e}",
            "pair": ("ok" if e_pair < 1e-2 and e_both < 2e-2 else "FAIL")
            + f" vs ref {e_pair:.1e}, vs default {e_both:.1e}"}


def pair_row(fmt, M, w, sd, copy, warm, name, pair, check_status) -> dict | None:
    """One --pair-m timing row: fused_moe with fused_cfg(M, pair) over the rotated sets sd;
    the per-pair path also gets its gate_up alone timed."""
    sets, distinct = sd
    fc = fused_cfg(M, pair)
    why = warm.get(repr((fmt, M, {"fused": fc})), "ok")
    if why != "ok":
        print(f"{fmt} M={M} {fc}: precompile failed: {why}", flush=True)
        return None
    kw = {k: v for k, v in w.items() if k not in ("w13", "w2")}

    def calls(c):
        return calls_for(lambda s: fused_moe(s[0], w["w13"], w["w2"], s[1], s[2], out=s[3],
                                             config=c, **kw), sets)

    try:
        t = time_calls(calls(fc))
        gu = time_calls(calls(dict(fc, stop_after="gate_up"))) if pair is not None else None
    except Exception as e:  # noqa: BLE001 -- one failing config must not stop the rest
        print(f"{fmt} M={M} {fc}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return None
    nbytes = int(distinct * expert_bytes(w) + 2 * M * H * 2)
    r = dict(make_row(f"{name}_{fmt}", 0, 0, M, t, nbytes, copy), config=fc,
             path=default_path(fmt, M) if pair is None else "pair", distinct=round(distinct, 1),
             check=check_status)
    if gu is not None:
        r["gate_up_us"] = round(gu, 3)
    print(json.dumps(r), flush=True)
    return r


def pair_m(args, copy, t_start) -> list:
    """--pair-m rows (module docstring): default vs pair at every (M, format), M outer, until
    the deadline; then PAIR_VARIANTS while it lasts."""
    fmts = args.formats.split(",")
    ms = [int(m) for m in (args.ms or ",".join(map(str, PAIR_MS))).split(",")]
    main_tasks = [(f, M, {"fused": fused_cfg(M, p)}) for M in ms for f in fmts for p in (None, {})]
    # a per-pair config compiles the same kernels at every M > 1 (M is no constexpr; the down
    # kernel's BN2 is 16 at M = 1, 32 above): its variants are precompiled at the end Ms only
    extra = [(f, M, {"fused": fused_cfg(M, v)}) for M in (ms[0], ms[-1]) for f in fmts
             for v in PAIR_VARIANTS]
    warm = precompile(main_tasks + extra, args.jobs) if args.jobs > 0 else {}
    print(f"precompiled {len(main_tasks + extra)} configs in {time.time() - t_start:.0f} s",
          flush=True)
    deadline = t_start + args.budget_s
    weights = {f: make_weights(f, "cuda") for f in fmts}
    sets = {M: make_sets(M, 32 if M <= 16 else 8, "cuda") for M in ms}  # same for both formats
    rows = []
    for M in ms:
        for fmt in fmts:
            if time.time() > deadline:
                print(f"budget: skipped {fmt} M={M}", flush=True)
                continue
            st = check_pair(fmt, weights[fmt], M)
            print(f"{fmt} M={M} check: {st}", flush=True)
            for name, pair in (("default", None), ("pair", {})):
                rows.append(pair_row(fmt, M, weights[fmt], sets[M], copy, warm, name, pair,
                                     st[name]))
    for v in PAIR_VARIANTS:
        for M in ms:
            for fmt in fmts:
                if time.time() > deadline:
                    continue
                rows.append(pair_row(fmt, M, weights[fmt], sets[M], copy, warm, "pair", v, ""))
    return [r for r in rows if r is not None]


def print_pair(rows) -> None:
    """Per (format, M): the default path, the per-pair default and its best variant."""
    print(f"{'fmt':<6}{'M':>3}{'distinct':>9} {'default path':<12}{'us':>8}{'ratio':>7}"
          f"{'pair us':>9}{'ratio':>7}{'gate_up':>8}{'best pair (config)':>30}{'x':>7}  check")
    keys = sorted({(r["kernel"].split("_", 1)[1], r["m"]) for r in rows})
    for fmt, M in keys:
        mine = [r for r in rows if r["m"] == M and r["kernel"].endswith(fmt)]
        d = next((r for r in mine if r["path"] != "pair"), None)
        p = next((r for r in mine if r["path"] == "pair" and r["check"]), None)
        if d is None or p is None:
            continue
        b = min((r for r in mine if r["path"] == "pair"), key=lambda r: r["time_us"])
        best = json.dumps({k: v for k, v in b["config"]["small_m"].items() if k != "M1"})
        print(f"{fmt:<6}{M:>3}{d['distinct']:>9} {d['path']:<12}{d['time_us']:>8.1f}"
              f"{d['ratio']:>7.3f}{p['time_us']:>9.1f}{p['ratio']:>7.3f}{p['gate_up_us']:>8.1f}"
              f"{b['time_us']:>9.1f} {best:<20}{d['time_us'] / b['time_us']:>7.2f}  "
              f"{d['check'][:18]} | {p['check']}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="int4,mxfp4")
    ap.add_argument("--ms", default=None, help=f"default {MS}; --pair-m: {PAIR_MS}")
    ap.add_argument("--budget-s", type=float, default=100.0,
                    help="stop trying non-default candidates after this many seconds")
    ap.add_argument("--out", default=None,
                    help="default bench/results/moe-small-m-h200.json (--pair-m: moe-pair-m-h200)")
    ap.add_argument("--sweep", action="store_true", help="the SWEEP configs at M = 1, 4")
    ap.add_argument("--m1-kernel", action="store_true",
                    help="M = 1: old gate_up vs kernels/moe_m1_gate_up.py (M1_SWEEP)")
    ap.add_argument("--pair-m", action="store_true",
                    help="M = 1..32: fused_moe's default dispatch vs the per-pair gate_up path")
    ap.add_argument("--jobs", type=int, default=8,
                    help="--sweep / --m1-kernel / --pair-m: compile processes (0: none)")
    args = ap.parse_args(argv)
    args.out = args.out or os.path.join(
        HERE, "results", "moe-pair-m-h200.json" if args.pair_m else "moe-small-m-h200.json")
    assert torch.cuda.is_available(), "bench/moe_small_m.py needs a GPU"
    t_start = time.time()
    deadline = t_start + args.budget_s
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    copy = copy_bandwidth(warm_s=1.0)
    print(f"copy bandwidth (read + write): {copy:.0f} GB/s", flush=True)
    if args.pair_m:
        rows = pair_m(args, copy, t_start)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"copy_GBps": copy, "E": E, "H": H, "I": I, "top_k": TOPK,
                       "pair_variants": PAIR_VARIANTS, "rows": rows}, f, indent=1)
        print(f"total {time.time() - t_start:.0f} s; x = default us / best pair us; ratio vs "
              "the in-run copy (bytes: distinct experts)")
        print_pair(rows)
        return
    if args.sweep or args.m1_kernel:
        table = M1_SWEEP if args.m1_kernel else SWEEP
        rows = sweep(args, copy, t_start, table)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"copy_GBps": copy, "E": E, "H": H, "I": I, "top_k": TOPK, "sweep": table,
                       "rows": rows}, f, indent=1, default=str)
        print(f"total {time.time() - t_start:.0f} s; ratio vs the in-run copy bandwidth:")
        print_sweep(rows)
        return
    rows, log = [], []
    fmts = args.formats.split(",")
    weights = {fmt: make_weights(fmt, "cuda") for fmt in fmts}  # ~1.2 GB each
    ms = args.ms or ",".join(map(str, MS))
    for M in (int(m) for m in ms.split(",")):  # M outer: the budget cuts both formats alike
        for fmt in fmts:
            rows += run_m(fmt, weights[fmt], M, copy, deadline, t_start, log)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"copy_GBps": copy, "E": E, "H": H, "I": I, "top_k": TOPK, "rows": rows,
                   "log": log}, f, indent=1)
    print(f"total {time.time() - t_start:.0f} s; table (ratio vs the in-run copy):")
    print_table(rows)


if __name__ == "__main__":
    main()
