"""Attention-half kernel benchmarks (called by bench/kernels.py; see its docstring for the rows).

MLA decode at Kimi-K2.5 TP8 shapes (H=8 heads per rank, D = 512 + 64, block size 64), B in
{1, 16, 64, 256}, ctx in {1K, 8K}, bf16 and fp8 cache; H=16 and 128 at two points; one
variable-length batch. bytes = the KV rows read + q read + o written + block tables. Each call
reads a different set of cache blocks (>= 256 MB rotated per graph replay) so nothing is served
from the 60 MB L2. Decode rows use m = heads per rank. Prefill rows (m = new tokens per
sequence, ctx = keys per sequence) compare the Triton kernel with torch SDPA; their ratio is
nominal (compute-bound), TFLOP/s is printed. Also kv_store, add+RMSNorm, RoPE, fp8 group quant.
Decode (decode_rows): every variant of decode_variants() (v1; v2 fused / kernel merge, 4 launch
configs, fp8 modes 0-3, P = 1x / 2x / 4x SMs) is first checked against the reference on a mixed
batch (failures are not timed), then timed on every case; the rows are the best v1, the
production path ("production": mla_decode's variant="auto", v5 + merge kernel on e4m3fn
caches) and the best v2 per case (field "variant": label and split/item count S), and a
v1-vs-v2 table is printed.
Standalone (decode only, ~3 min on H200):
    python3 bench/kernels_attention.py --out $OUT/decode.json --sweep-out $OUT/decode_sweep.json
v1 vs v3 (kernels/mla_decode_v3.py) and the alternatives (fp8: v5) at 7 H=8 shapes, ~3 min:
    python3 bench/kernels_attention.py --set variants --budget-s 120 --out $OUT/decode_v3.json
split_sweep() times v1 split counts for information (bench/kernels.py --sweep).
"""

from __future__ import annotations

import argparse  # noqa: I001 (bench/kernels.py must load before atom_stream.kernels)
import json
import math
import os
import time

import torch
from kernels import copy_bandwidth, make_row, time_calls  # first: makes atom_stream.kernels load

from atom_stream.kernels import mla_decode as dec
from atom_stream.kernels.kv_store import kv_store
from atom_stream.kernels.mla_prefill import mla_prefill_sdpa, mla_prefill_triton
from atom_stream.kernels.norm_rope import (
    fused_add_rmsnorm,
    per_token_group_quant_fp8,
    rope_interleaved_,
)

PAGE = 64
R, DR = 512, 64
SCALE = 0.14467963
ROTATE_BYTES = 256 << 20
FP8 = torch.float8_e4m3fn
SWEEP_CFGS = {  # (BLOCK_N, num_warps, num_stages); the first is the default
    "bf16": [(32, 4, 2), (16, 4, 2), (64, 8, 2), (32, 8, 2)],
    "fp8": [(64, 8, 2), (16, 4, 2), (32, 4, 2), (32, 8, 2)],
}


def _fill(shape, dtype):
    x = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    return x.to(dtype) if dtype != torch.bfloat16 else x


class DecodeSetup:
    """Rotated input sets for one (dtype, B, lens, H) decode case."""

    def __init__(self, kv_dtype, lens, H):
        self.kv_dtype, self.lens, self.H, self.B = kv_dtype, lens, H, len(lens)
        elem = torch.empty(0, dtype=kv_dtype).element_size()
        nbs = [math.ceil(n / PAGE) for n in lens]
        width = max(nbs)
        kv_bytes = sum(lens) * (R + DR) * elem
        self.n_sets = max(1, min(64, math.ceil(ROTATE_BYTES / kv_bytes)))
        total = self.n_sets * sum(nbs)
        self.pool = _fill((total, PAGE, R + DR), kv_dtype)
        perm = torch.randperm(total).to(torch.int32)  # pages scattered over the whole pool
        self.tables, k = [], 0
        for _ in range(self.n_sets):
            bt = torch.zeros(self.B, width, dtype=torch.int32)
            for b, nb in enumerate(nbs):
                bt[b, :nb] = perm[k:k + nb]
                k += nb
            self.tables.append(bt.cuda())
        self.q = torch.randn(self.B, H, R + DR, dtype=torch.bfloat16, device="cuda")
        self.out = torch.empty(self.B, H, R, dtype=torch.bfloat16, device="cuda")
        self.seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
        self.k_scale = 0.5 if kv_dtype == FP8 else 1.0
        self.bytes = (kv_bytes + self.q.numel() * 2 + self.out.numel() * 2
                      + self.B * width * 4 + self.B * 4)

    def splits(self, variant="v2"):
        return dec.decode_num_splits(self.B, self.H, None if variant == "v2" else max(self.lens),
                                     "cuda", variant=variant, kv_dtype=self.kv_dtype)

    def _call(self, bt, S, config, ws, **kw):
        q, out = self.q, self.out
        return lambda: dec.mla_decode(q[..., :R], q[..., R:], self.pool, bt, self.seq_lens, SCALE,
                                      self.k_scale, out=out, num_splits=S, workspace=ws,
                                      config=config, **kw)

    def time(self, splits=None, config=None, **kw):
        """Median us per call (CUDA-graph replays over the rotated tables); kw: variant, merge,
        fp8_mode. Returns (time, splits)."""
        variant = kw.get("variant", "v2")
        S = splits or self.splits(variant)
        ws = (dec.alloc_decode_workspace(self.B, self.H, R, S, "cuda", variant=variant,
                                         kv_dtype=self.kv_dtype) if S > 1 else None)
        return time_calls([self._call(bt, S, config, ws, **kw) for bt in self.tables]), S

    def check(self, splits=None, config=None, **kw) -> float:
        """rel err vs the reference on the first table set (output poisoned first; twice, so a
        fused merge's counters are exercised across launches)."""
        variant = kw.get("variant", "v2")
        bt = self.tables[0]
        S = splits or self.splits(variant)
        ws = (dec.alloc_decode_workspace(self.B, self.H, R, S, "cuda", variant=variant,
                                         kv_dtype=self.kv_dtype) if S > 1 else None)
        ref = dec.mla_decode_ref(self.q[..., :R].float(), self.q[..., R:].float(), self.pool,
                                 bt, self.seq_lens, SCALE, self.k_scale).double()
        err = 0.0
        for _ in range(2):
            self.out.fill_(float("nan"))
            self._call(bt, S, config, ws, **kw)()
            o = self.out.double()
            e = float((o - ref).norm() / ref.norm())
            err = max(err, float("inf") if math.isnan(e) else e)
        return err


def _dt_name(kv_dtype):
    return "fp8" if kv_dtype == FP8 else "bf16"


GRID = [(B, ctx) for B in (1, 16, 64, 256) for ctx in (1024, 8192)]
EXTRA = [(B, 8192, H) for H in (16, 128) for B in (1, 64)]  # (B, ctx, H)
VARLEN = (64, 16384)  # B sequences of 1..max tokens
PREFILL_SHAPES = [([4096], [4096]), ([2048], [8192]), ([1024] * 4, [1024] * 4)]  # (lq, lk)
SMALL_T = ((256, 8192), (256, 4096))  # tokens for kv_store; for norm / quant / rope
CHOSEN: dict[str, str] = {}  # dtype -> label of the v2 variant that won most rows
DECODE_BUDGET_S = 170.0  # past this, rows time only v1 and the v2 default


def decode_variants(name, B, H):
    """[(label, kwargs for DecodeSetup.time)]: v1 as before, then v2 launch configs, merges,
    fp8 modes and work-item counts P (splits) around the defaults; the first v2 entry is what
    mla_decode() does by default."""
    cfg0 = dec._launch_cfg(FP8 if name == "fp8" else torch.bfloat16, H)
    P = dec.decode_num_splits(B, H, None, "cuda", variant="v2")  # what variant="v2" picks
    auto = "fused" if 2 * P <= dec.FUSED_MAX_S * B else "kernel"
    other = "kernel" if auto == "fused" else "fused"
    v = [("v1", dict(variant="v1", config=cfg0)),
         ("production", dict(variant="auto")),  # what the model runs (v5 on e4m3fn caches)
         (f"v2 {auto} {cfg0}", dict(variant="v2", config=cfg0)),
         (f"v2 {other} {cfg0}", dict(variant="v2", config=cfg0, merge=other))]
    cfgs = [(32, 4, 2), (64, 8, 2), (16, 4, 2), (32, 4, 3)]
    v += [(f"v2 {auto} {c}", dict(variant="v2", config=c)) for c in cfgs if c != cfg0]
    if name == "fp8":
        v += [(f"v2 {auto} {cfg0} fp8_mode={m}", dict(variant="v2", config=cfg0, fp8_mode=m))
              for m in (0, 2, 3)]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    groups = -(-H // dec.BLOCK_H)
    for mult in (1, 4):
        p = max(1, -(-mult * sms // groups))
        m = "fused" if 2 * p <= dec.FUSED_MAX_S * B else "kernel"
        v.append((f"v2 {m} {cfg0} P={p}", dict(variant="v2", config=cfg0, splits=p)))
    return v


def check_variants(log=None, limit: int | None = None):
    """Every variant (the first `limit`) of each dtype against the reference on a small
    mixed-length batch (and an H=128 one); returns the labels that failed (not timed)."""
    bad = set()
    for dt in (torch.bfloat16, FP8):
        name = _dt_name(dt)
        for H, lens in ((8, [1000, 2047, 77, 0, 5000, 1, 333]), (128, [700, 0, 3000])):
            setup = DecodeSetup(dt, lens, H)
            for label, kw in decode_variants(name, len(lens), H)[:limit]:
                kw = dict(kw)
                S = kw.pop("splits", None)
                if not check_variant(setup, S, kw, f"{name} H={H} {label}"):
                    bad.add((name, label.split(" P=")[0]))
            del setup
    return bad


def check_variant(setup, S, kw, tag: str) -> bool:
    """setup.check(S, **kw) against the reference (rel err < 2e-2), printed; an exception is
    reported and counts as a failure (the variant is then not timed)."""
    try:
        err = setup.check(S, **kw)
    except Exception as e:  # noqa: BLE001 (reported; the variant is skipped)
        print(f"  check {tag}: {type(e).__name__}: {e}", flush=True)
        err = float("inf")
    ok = err < 2e-2
    print(f"  check {tag}: rel err {err:.1e}{'' if ok else '  FAILED'}", flush=True)
    return ok


def decode_rows(copy_gbps, log=None, quick: bool = False):
    """Every decode case x every variant that passed the check; rows: the best v1, the
    production path ("auto": v5 on e4m3fn caches, else v1) and the best v2 variant per case
    (JSON field "variant"); `log` gets every timing. quick: v1, production and the v2 default
    only (no sweep)."""
    t0 = time.time()
    log = log if log is not None else []
    bad = check_variants(limit=3 if quick else None)
    print(f"  checks done ({time.time() - t0:.0f} s)", flush=True)
    rows, table, wins = [], [], {}
    cases = [(dt, [ctx] * B, 8) for dt in (torch.bfloat16, FP8) for B, ctx in GRID]
    cases += [(dt, [ctx] * B, H) for dt in (torch.bfloat16, FP8) for B, ctx, H in EXTRA]
    gen = torch.Generator().manual_seed(0)
    vlens = torch.randint(1, VARLEN[1] + 1, (VARLEN[0],), generator=gen).tolist()
    cases += [(dt, vlens, 8) for dt in (torch.bfloat16, FP8)]
    for dt, lens, H in cases:
        name, B = _dt_name(dt), len(lens)
        varlen = len(set(lens)) > 1
        kname = f"mla_decode_{name}" + (f"_h{H}" if H != 8 else "") + ("_varlen" if varlen else "")
        ctx = sum(lens) // B
        setup = DecodeSetup(dt, lens, H)
        best = {}
        variants = decode_variants(name, B, H)
        if quick or time.time() - t0 > DECODE_BUDGET_S:
            variants = variants[:3]  # v1, production, the v2 default
        for label, kw in variants:
            if (name, label.split(" P=")[0]) in bad:
                continue
            kw = dict(kw)
            S = kw.pop("splits", None)
            try:
                t, S = setup.time(S, **kw)
            except Exception as e:  # noqa: BLE001
                print(f"  {kname} B={B} {label}: {type(e).__name__}: {e}", flush=True)
                continue
            row = {**make_row(kname, B, ctx, H, t, setup.bytes, copy_gbps),
                   "variant": f"{label} S={S}"}
            log.append(row)
            v = kw["variant"]
            if v not in best or t < best[v]["time_us"]:
                best[v] = row
        line = " | ".join(f"{r['variant']}: {r['time_us']:.1f} us ({r['ratio']:.2f})"
                          for r in best.values())
        print(f"  {kname} B={B} ctx={ctx} H={H}: {line}", flush=True)
        rows += list(best.values())
        if "v1" in best and "v2" in best:
            table.append((kname, B, ctx, H, best["v1"], best["v2"]))
            key = best["v2"]["variant"].rsplit(" S=", 1)[0]
            wins.setdefault(name, {}).setdefault(key, 0)
            wins[name][key] += 1
        del setup
    for name, w in wins.items():
        CHOSEN[name] = max(w, key=w.get)
    print(f"\n{'kernel':<26}{'B':>5}{'ctx':>7}{'H':>5}{'v1 us':>10}{'v2 us':>10}{'v1 ratio':>10}"
          f"{'v2 ratio':>10}{'speedup':>9}  best v2 variant")
    for kname, B, ctx, H, r1, r2 in table:
        print(f"{kname:<26}{B:>5}{ctx:>7}{H:>5}{r1['time_us']:>10.1f}{r2['time_us']:>10.1f}"
              f"{r1['ratio']:>10.3f}{r2['ratio']:>10.3f}{r1['time_us'] / r2['time_us']:>9.2f}  "
              f"{r2['variant']}")
    print(f"  decode section: {time.time() - t0:.0f} s; v2 variants winning most rows: {CHOSEN}",
          flush=True)
    return rows


def split_sweep(copy_gbps, out_path=None, log=None, budget_s=100.0, dtypes=("bf16", "fp8")):
    """Split counts of each cache's default kernel on the H=8 grid (bf16: v1, fp8: v5 + merge
    kernel): 1, 2, 3, 4, 6, 8, ... up to the context's MIN_SPLIT limit and B x S <= 4096, plus
    the heuristic's pick; prints one line per case with the fastest count."""
    t0 = time.time()
    log = log if log is not None else []
    for name in dtypes:
        dt, variant = (torch.bfloat16, "v1") if name == "bf16" else (FP8, "v5")
        for B, ctx in GRID:
            if time.time() - t0 > budget_s:
                print("  split sweep: budget exhausted", flush=True)
                break
            setup = DecodeSetup(dt, [ctx] * B, 8)
            heur = dec.decode_num_splits(B, 8, ctx, "cuda", variant=variant)
            cands = sorted({s for s in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
                            if s <= max(1, ctx // dec.MIN_SPLIT) and B * s <= 4096} | {heur})
            line, best = [], None
            for s in cands:
                t, _ = setup.time(splits=s, variant=variant)
                line.append(f"{s}:{t:.1f}")
                best = (t, s) if best is None or t < best[0] else best
                log.append({**make_row(f"splits_{name}", B, ctx, 8, t, setup.bytes, copy_gbps),
                            "variant": variant, "splits": s, "heuristic": heur})
            print(f"  splits {name} {variant} B={B} ctx={ctx} (heuristic {heur}, best {best[1]} "
                  f"{best[0]:.1f} us): " + " ".join(line), flush=True)
            del setup
            if out_path:
                with open(out_path, "w") as f:
                    json.dump(log, f, indent=1)
    return log


def prefill_rows(copy_gbps):
    rows = []
    H = 8
    shapes = PREFILL_SHAPES
    cfgs = [(64, 64, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2)]
    for lq, lk in shapes:
        cq = torch.tensor([0] + lq, device="cuda").cumsum(0).to(torch.int32)
        ck = torch.tensor([0] + lk, device="cuda").cumsum(0).to(torch.int32)
        q = torch.randn(sum(lq), H, 192, dtype=torch.bfloat16, device="cuda")
        kv = torch.randn(sum(lk), H, 320, dtype=torch.bfloat16, device="cuda")
        k, v = kv[..., :192], kv[..., 192:]
        out = torch.empty(sum(lq), H, 128, dtype=torch.bfloat16, device="cuda")
        pairs = sum(sum(b - a + i + 1 for i in range(a)) for a, b in zip(lq, lk))
        flops = pairs * H * (192 + 128) * 2
        nbytes = (q.numel() + kv.numel() + out.numel()) * 2
        ref = mla_prefill_sdpa(q, k, v, cq, ck, max(lq), SCALE)
        best = None
        args = (q, k, v, cq, ck, max(lq), SCALE)
        for bm, bn, w, st in cfgs:
            def fn(bm=bm, bn=bn, w=w, st=st, args=args, out=out):
                mla_prefill_triton(*args, out=out, block_m=bm, block_n=bn, num_warps=w,
                                   num_stages=st)
            try:
                t = time_calls([fn], replays=5)
            except Exception as e:  # noqa: BLE001 (a config that does not fit is skipped)
                print(f"  prefill cfg {(bm, bn, w, st)} failed: {type(e).__name__}", flush=True)
                continue
            err = float((out.double() - ref.double()).norm() / ref.double().norm())
            print(f"  prefill triton lq={lq} lk={lk} cfg={(bm, bn, w, st)}: {t:.1f} us "
                  f"{flops / t / 1e6:.0f} TFLOP/s (rel err vs sdpa {err:.1e})", flush=True)
            if best is None or t < best[0]:
                best = (t, (bm, bn, w, st))

        def sdpa(args=args, out=out):
            mla_prefill_sdpa(*args, out=out)
        # SDPA reads cu_seqlens on the host (a sync), so time it eagerly with events
        sdpa()
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ts = []
        for _ in range(7):
            e0.record()
            sdpa()
            e1.record()
            e1.synchronize()
            ts.append(e0.elapsed_time(e1) * 1e3)
        t_sdpa = sorted(ts)[len(ts) // 2]
        print(f"  prefill sdpa lq={lq} lk={lk}: {t_sdpa:.1f} us {flops / t_sdpa / 1e6:.0f} "
              f"TFLOP/s | triton best {best[0]:.1f} us cfg={best[1]}", flush=True)
        rows.append(make_row("mla_prefill_triton", len(lq), lk[0], lq[0], best[0], nbytes,
                             copy_gbps))
        rows.append(make_row("mla_prefill_sdpa", len(lq), lk[0], lq[0], t_sdpa, nbytes,
                             copy_gbps))
    return rows


def _rotated(make, nbytes_each):
    n = max(1, min(64, math.ceil(ROTATE_BYTES / max(nbytes_each, 1))))
    return [make() for _ in range(n)]


def small_rows(copy_gbps):
    rows = []
    for T in SMALL_T[0]:
        for dt in (torch.bfloat16, FP8):
            elem = 1 if dt == FP8 else 2
            nb = math.ceil(T / PAGE) + 1

            def make(dt=dt, nb=nb, T=T):
                cache = _fill((nb, PAGE, R + DR), dt)
                ent = torch.randn(T, R + DR, dtype=torch.bfloat16, device="cuda")
                slots = torch.randperm(nb * PAGE, device="cuda")[:T]
                return lambda: kv_store(cache, slots, ent[:, :R], ent[:, R:], 0.5)
            nbytes = T * (R + DR) * (2 + elem) + T * 8
            t = time_calls(_rotated(make, nbytes))
            rows.append(make_row(f"kv_store_{_dt_name(dt)}", T, 0, R + DR, t, nbytes, copy_gbps))
    N = 7168
    for T in SMALL_T[1]:
        nbytes = T * N * 2 * 4 + N * 2

        def make_norm(T=T):
            x, r = (torch.randn(T, N, dtype=torch.bfloat16, device="cuda") for _ in range(2))
            w = torch.randn(N, dtype=torch.bfloat16, device="cuda")
            return lambda: fused_add_rmsnorm(x, r, w, 1e-5)
        rows.append(make_row("add_rmsnorm", T, 0, N, time_calls(_rotated(make_norm, nbytes)),
                             nbytes, copy_gbps))
        nbytes = T * N * 3 + T * (N // 128) * 4

        def make_quant(T=T):
            x = torch.randn(T, N, dtype=torch.bfloat16, device="cuda")
            return lambda: per_token_group_quant_fp8(x, 128)
        rows.append(make_row("fp8_group_quant", T, 0, N, time_calls(_rotated(make_quant, nbytes)),
                             nbytes, copy_gbps))
        H = 8
        nbytes = T * (H + 1) * 64 * 2 * 2 + T * 64 * 4 * 2
        ang = torch.rand(65536, 32, device="cuda")
        cos, sin = ang.cos(), ang.sin()

        def make_rope(T=T, H=H, cos=cos, sin=sin):
            q = torch.randn(T, H, 192, dtype=torch.bfloat16, device="cuda")
            kv = torch.randn(T, 576, dtype=torch.bfloat16, device="cuda")
            pos = torch.randint(0, 65536, (T,), device="cuda")
            return lambda: rope_interleaved_(q[..., 128:], kv[:, 512:], cos, sin, pos)
        rows.append(make_row("rope_q8_k", T, 0, H, time_calls(_rotated(make_rope, nbytes)),
                             nbytes, copy_gbps))
    return rows


UV_CTX = (1024, 8192, 32768)
V_DIM = 128  # Kimi / DeepSeek v_head_dim


# _mla_merge_uv's (splits per step, warps) candidates timed by uv_rows; the default first
UV_CONFIGS = (dec._v3.MERGE_UV_CONFIG,
              *[c for c in ((32, 4), (16, 4), (32, 8), (64, 8)) if c != dec._v3.MERGE_UV_CONFIG])


def uv_rows(copy_gbps):
    """The small-batch production path of the decode step (models/mla.MERGE_UV_MAX_B rows):
    the fp8 cache's v5 attention with W_UV folded into the merge launch (mla_decode uv=), B=1
    at UV_CTX, for each of UV_CONFIGS as mla_decode_v3.MERGE_UV_CONFIG (set on the module
    here). Rows "mla_decode_fp8_uv" (bytes: the decode's plus W_UV and y), field "variant"
    "merge V/W S=..". Each is checked against the reference times W_UV first (relative error
    printed)."""
    rows = []
    keep = dec._v3.MERGE_UV_CONFIG
    try:
        for ctx in UV_CTX:
            try:
                rows += _uv_ctx_rows(ctx, copy_gbps)
            except Exception as e:  # noqa: BLE001 (one length failing keeps the others)
                print(f"  mla_decode_fp8_uv 1 x {ctx}: FAILED {type(e).__name__}: {e}", flush=True)
    finally:
        dec._v3.MERGE_UV_CONFIG = keep
    return rows


def _uv_ctx_rows(ctx, copy_gbps):
    """uv_rows at one context: each merge config checked (rel err < 2e-2) before it is timed;
    a failed check is reported and gives no row."""
    rows = []
    setup = DecodeSetup(FP8, [ctx], 8)
    w_uv = torch.randn(8, V_DIM, R, dtype=torch.bfloat16, device="cuda") * 0.05
    y = torch.empty(1, 8, V_DIM, dtype=torch.bfloat16, device="cuda")
    nbytes = setup.bytes + (w_uv.numel() + y.numel()) * 2
    ref = dec.mla_decode_ref(setup.q[..., :R].float(), setup.q[..., R:].float(),
                             setup.pool, setup.tables[0], setup.seq_lens, SCALE,
                             setup.k_scale)
    y_ref = torch.einsum("bhr,hvr->bhv", ref.bfloat16().float(), w_uv.float())
    # as the decode step launches it: the split count from the batch alone
    S = dec.decode_num_splits(1, 8, None, "cuda", "auto", FP8)
    ws = dec.alloc_decode_workspace(1, 8, R, S, "cuda", variant="auto",
                                    kv_dtype=FP8) if S > 1 else None
    for cfg in UV_CONFIGS:
        dec._v3.MERGE_UV_CONFIG = cfg
        name = "merge " + "/".join(map(str, cfg))
        y.fill_(float("nan"))
        setup._call(setup.tables[0], S, None, ws, variant="auto", uv=(w_uv, y))()
        err = float((y.float() - y_ref).norm() / y_ref.norm())
        if not err < 2e-2:  # NaN included
            print(f"  mla_decode_fp8_uv 1 x {ctx} {name}: CHECK FAILED "
                  f"(rel err {err:.2e}), not timed", flush=True)
            continue
        t, s = setup.time(S, variant="auto", uv=(w_uv, y))
        rows.append({**make_row("mla_decode_fp8_uv", 1, ctx, 8, t, nbytes, copy_gbps),
                     "variant": f"{name} S={s}"})
        print(f"  mla_decode_fp8_uv 1 x {ctx} {name}: {t:.2f} us "
              f"(ratio {rows[-1]['ratio']:.3f}), rel err {err:.2e}", flush=True)
    return rows


def attention_rows(copy_gbps, tune=True, log=None):
    """All attention rows; a section that fails is reported and skipped (the others still
    count: one bad launch must not cost a whole device run). tune=False (bench/kernels.py
    --no-tune): the decode section times v1, the production path and the v2 default only."""
    t0 = time.time()
    rows = []
    sections = [lambda c: decode_rows(c, log, quick=not tune), uv_rows, prefill_rows,
                small_rows]
    for section in sections:
        try:
            rows += section(copy_gbps)
        except Exception as e:  # noqa: BLE001
            print(f"SECTION FAILED: {type(e).__name__}: {e}", flush=True)
        print(f"  ... {time.time() - t0:.0f} s", flush=True)
    return rows


def main(argv=None) -> None:
    """Decode only: python bench/kernels_attention.py --out PATH [--sweep-out PATH]."""
    ap = argparse.ArgumentParser(description="MLA decode: v1 vs v2 variants (one table)")
    ap.add_argument("--out", required=True, help="JSON rows (best v1 and best v2 per case)")
    ap.add_argument("--sweep-out", default=None, help="JSON of every timing")
    ap.add_argument("--set", default="all", choices=["all", "variants", "splits"],
                    help="variants: v1 vs v3 (+ v3 alternatives) at 7 shapes x bf16/fp8 only")
    ap.add_argument("--budget-s", type=float, default=120.0,
                    help="--set variants: past this many seconds rows time only v1 and v3")
    ap.add_argument("--dtypes", default="bf16,fp8", help="--set variants: caches to time")
    ap.add_argument("--merge-kernel", action="store_true",
                    help="--set variants: every v3 alternative with the separate merge kernel")
    args = ap.parse_args(argv)
    import triton
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"triton {triton.__version__}", flush=True)
    copy_gbps = copy_bandwidth(warm_s=1.0)
    print(f"copy bandwidth (read + write): {copy_gbps:.0f} GB/s", flush=True)
    log = []
    if args.set == "variants":
        from attn_variants import variants_set  # bench/attn_variants.py

        rows = variants_set(copy_gbps, args.budget_s, args.dtypes.split(","), args.merge_kernel)
        log = rows
    elif args.set == "splits":
        rows = log = split_sweep(copy_gbps, None, None, args.budget_s, args.dtypes.split(","))
    else:
        rows = decode_rows(copy_gbps, log)
    copy_end = copy_bandwidth()
    print(f"copy bandwidth at the end: {copy_end:.0f} GB/s (ratios use the start value)",
          flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    if args.sweep_out:
        with open(args.sweep_out, "w") as f:
            json.dump(log, f, indent=1)
    print(f"wrote {len(rows)} rows to {args.out}", flush=True)


if __name__ == "__main__":
    main()
