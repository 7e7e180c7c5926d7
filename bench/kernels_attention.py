"""Attention-half kernel benchmarks (called by bench/kernels.py; see its docstring for the rows).

MLA decode at Kimi-K2.5 TP8 shapes (H=8 heads per rank, D = 512 + 64, block size 64), B in
{1, 16, 64, 256}, ctx in {1K, 8K}, bf16 and fp8 cache; H=16 and 128 at two points; one
variable-length batch. bytes = the KV rows read + q read + o written + block tables. Each call
reads a different set of cache blocks (>= 256 MB rotated per graph replay) so nothing is served
from the 60 MB L2. Decode rows use m = heads per rank. Prefill rows (m = new tokens per
sequence, ctx = keys per sequence) compare the Triton kernel with torch SDPA; their ratio is
nominal (compute-bound), TFLOP/s is printed. Also kv_store, add+RMSNorm, RoPE, fp8 group quant.
tune_configs() picks the decode launch config per cache dtype (checked against the reference,
lowest geometric-mean time over the H=8 grid) before the rows; split_sweep() then times split
counts for information.
"""

from __future__ import annotations

import json
import math
import time

import torch
from atom_stream.kernels import mla_decode as dec
from atom_stream.kernels.kv_store import kv_store
from atom_stream.kernels.mla_prefill import mla_prefill_sdpa, mla_prefill_triton
from atom_stream.kernels.norm_rope import (
    fused_add_rmsnorm,
    per_token_group_quant_fp8,
    rope_interleaved_,
)

from kernels import make_row, time_calls  # (bench/kernels.py runs first: it imports this module)

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

    def time(self, splits=None, config=None):
        S = splits or dec.decode_num_splits(self.B, self.H, max(self.lens), "cuda")
        ws = dec.alloc_decode_workspace(self.B, self.H, R, S, "cuda") if S > 1 else None
        q, out = self.q, self.out

        def call(bt):
            return lambda: dec.mla_decode(q[..., :R], q[..., R:], self.pool, bt, self.seq_lens,
                                          SCALE, self.k_scale, out=out, num_splits=S,
                                          workspace=ws, config=config)
        return time_calls([call(bt) for bt in self.tables]), S

    def check(self, splits=None, config=None) -> float:
        bt = self.tables[0]
        S = splits or dec.decode_num_splits(self.B, self.H, max(self.lens), "cuda")
        self.out.fill_(float("nan"))
        dec.mla_decode(self.q[..., :R], self.q[..., R:], self.pool, bt, self.seq_lens, SCALE,
                       self.k_scale, out=self.out, num_splits=S, config=config)
        ref = dec.mla_decode_ref(self.q[..., :R].float(), self.q[..., R:].float(), self.pool,
                                 bt, self.seq_lens, SCALE, self.k_scale)
        return float((self.out.double() - ref.double()).norm() / ref.double().norm())


def _dt_name(kv_dtype):
    return "fp8" if kv_dtype == FP8 else "bf16"


GRID = [(B, ctx) for B in (1, 16, 64, 256) for ctx in (1024, 8192)]
EXTRA = [(B, 8192, H) for H in (16, 128) for B in (1, 64)]  # (B, ctx, H)
VARLEN = (64, 16384)  # B sequences of 1..max tokens
PREFILL_SHAPES = [([4096], [4096]), ([2048], [8192]), ([1024] * 4, [1024] * 4)]  # (lq, lk)
SMALL_T = ((256, 8192), (256, 4096))  # tokens for kv_store; for norm / quant / rope
CHOSEN: dict[str, tuple[int, int, int]] = {}  # filled by tune_configs (else the code default)


def tune_configs(copy_gbps, log=None):
    """Per cache dtype: check each SWEEP_CFGS entry against the reference, time it on the H=8
    grid at the heuristic split count, keep the lowest geometric-mean time."""
    for dt in (torch.bfloat16, FP8):
        name = _dt_name(dt)
        small = DecodeSetup(dt, [1000, 2047, 77, 0], 8)
        ok = []
        for cfg in SWEEP_CFGS[name]:
            err = max(small.check(s, cfg) for s in (1, 5))
            print(f"  tune check {name} {cfg}: rel err {err:.1e}", flush=True)
            if err < 2e-2:
                ok.append(cfg)
        del small
        if not ok:
            print(f"  tune {name}: no config passed the check; using the code default", flush=True)
            continue
        logt = {cfg: 0.0 for cfg in ok}
        for B, ctx in GRID:
            setup = DecodeSetup(dt, [ctx] * B, 8)
            line = []
            for cfg in ok:
                t, S = setup.time(config=cfg)
                logt[cfg] += math.log(t)
                line.append(f"{cfg}:{t:.1f}")
                if log is not None:
                    log.append({**make_row(f"tune_{name}", B, ctx, 8, t, setup.bytes, copy_gbps),
                                "cfg": list(cfg), "splits": S})
            print(f"  tune {name} B={B} ctx={ctx} splits={S}: " + " ".join(line), flush=True)
            del setup
        CHOSEN[name] = min(logt, key=logt.get)
        print(f"  tune {name}: chosen {CHOSEN[name]}", flush=True)


def decode_rows(copy_gbps):
    rows = []
    cases = [(dt, B, ctx, 8) for dt in (torch.bfloat16, FP8) for B, ctx in GRID]
    cases += [(dt, B, ctx, H) for dt in (torch.bfloat16, FP8) for B, ctx, H in EXTRA]
    for dt, B, ctx, H in cases:
        setup = DecodeSetup(dt, [ctx] * B, H)
        cfg = CHOSEN.get(_dt_name(dt))
        t, S = setup.time(config=cfg)
        name = f"mla_decode_{_dt_name(dt)}" + (f"_h{H}" if H != 8 else "")
        rows.append(make_row(name, B, ctx, H, t, setup.bytes, copy_gbps))
        print(f"  {name} B={B} ctx={ctx} H={H} splits={S} cfg={cfg}: {t:.2f} us "
              f"ratio {rows[-1]['ratio']:.3f}", flush=True)
        del setup
    gen = torch.Generator().manual_seed(0)
    lens = torch.randint(1, VARLEN[1] + 1, (VARLEN[0],), generator=gen).tolist()
    for dt in (torch.bfloat16, FP8):
        setup = DecodeSetup(dt, lens, 8)
        cfg = CHOSEN.get(_dt_name(dt))
        t, S = setup.time(config=cfg)
        err = setup.check(config=cfg)
        name = f"mla_decode_{_dt_name(dt)}_varlen"
        rows.append(make_row(name, len(lens), sum(lens) // len(lens), 8, t, setup.bytes,
                             copy_gbps))
        print(f"  {name} (lens 1..{VARLEN[1]}) splits={S}: {t:.2f} us ratio {rows[-1]['ratio']:.3f} "
              f"rel err {err:.2e}", flush=True)
        del setup
    return rows


def split_sweep(copy_gbps, out_path=None, log=None, budget_s=100.0):
    """Informational: the chosen config at split counts 1, 2, 4, ... on the H=8 grid."""
    t0 = time.time()
    log = log if log is not None else []
    for dt in (torch.bfloat16, FP8):
        name = _dt_name(dt)
        cfg = CHOSEN.get(name)
        for B, ctx in GRID:
            if time.time() - t0 > budget_s:
                print("  split sweep: budget exhausted", flush=True)
                break
            setup = DecodeSetup(dt, [ctx] * B, 8)
            heur = dec.decode_num_splits(B, 8, ctx, "cuda")
            cands = sorted({s for s in (1, 2, 4, 8, 16, 32, 64, 128)
                            if s <= max(1, ctx // dec.MIN_SPLIT) and B * s <= 2048} | {heur})
            line = []
            for s in cands:
                t, _ = setup.time(splits=s, config=cfg)
                line.append(f"{s}:{t:.1f}")
                log.append({**make_row(f"splits_{name}", B, ctx, 8, t, setup.bytes, copy_gbps),
                            "cfg": list(cfg) if cfg else None, "splits": s})
            print(f"  splits {name} B={B} ctx={ctx} (heuristic {heur}): " + " ".join(line),
                  flush=True)
            del setup
            if out_path:
                with open(out_path, "w") as f:
                    json.dump(log, f, indent=1)


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


def attention_rows(copy_gbps, tune=True, log=None):
    """All attention rows; a section that fails is reported and skipped (the others still
    count: one bad launch must not cost a whole device run)."""
    t0 = time.time()
    rows = []
    sections = ([lambda c: tune_configs(c, log) or []] if tune else []) + [
        decode_rows, prefill_rows, small_rows]
    for section in sections:
        try:
            rows += section(copy_gbps)
        except Exception as e:  # noqa: BLE001
            print(f"SECTION FAILED: {type(e).__name__}: {e}", flush=True)
        print(f"  ... {time.time() - t0:.0f} s", flush=True)
    return rows
