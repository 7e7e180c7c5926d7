"""One MLA layer's prefill of a chunk after a long cached prefix: one pass (the whole prefix
expanded through kv_b_proj at once) vs prefix pieces (models/mla_prefix.py), time and peak
memory, at one Kimi-K2.5 TP8 rank's widths (8 heads, r 512, rope 64, nope 128, v 128; bf16
weights, fp8 cache, page 64) on one GPU.

    python3 bench/mla_prefix.py [--prefix 8192,32768,131072] [--q 1024,8192]
                                [--chunk-mib 256,64] [--out bench/results/mla-prefix-h200.json]
                                [--device cuda]

Each case calls models/mla.MLA._prefill_one itself (the model's code path; a namespace with
the layer's attributes as `self`) with mla_prefix.PREFIX_CHUNK_BYTES set per row: "one pass"
= a bound above the prefix (the path before session 22), "pieces N MiB" = that bound. Pieces
are checked against the one pass first (rel err printed; > 2e-2 gives no row). Time: median
of --iters calls, CUDA events; peak: max_memory_allocated over one call minus what was
allocated before it (--device cpu: a smoke run of the reference paths, wall time, no peak).
JSON rows {"prefix", "q", "path", "chunk_tokens", "ms", "peak_mib", "rel_err"}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from types import SimpleNamespace

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from report import print_table, save_rows

from atom_stream.layers.linear import Linear
from atom_stream.models import mla_prefix
from atom_stream.models.mla import MLA

H, R, ROPE, NOPE, VD, PAGE = 8, 512, 64, 128, 128, 64
ONE_PASS = 1 << 50  # a PREFIX_CHUNK_BYTES no prefix reaches


def make_layer(device) -> SimpleNamespace:
    """The attributes MLA._prefill_one reads, random bf16 kv_b_proj."""
    kv_b = Linear(R, H * (NOPE + VD), dtype=torch.bfloat16, device=device)
    kv_b.weight.copy_(torch.randn(kv_b.weight.shape, device=device) * R ** -0.5)
    return SimpleNamespace(r=R, rope=ROPE, nope=NOPE, v_dim=VD, num_heads=H, scale=0.1,
                           k_scale=0.5, kv_b_proj=kv_b)


class Case:
    """One prefill chunk of q_len tokens after `prefix` cached ones (a fresh scattered fp8
    cache); run(chunk_bytes) calls the model's path with that PREFIX_CHUNK_BYTES."""

    def __init__(self, layer, prefix: int, q_len: int, device):
        self.layer, self.n = layer, prefix + q_len
        blocks = -(-self.n // PAGE) + 2
        self.cache = (torch.randn(blocks, PAGE, R + ROPE, device=device) * 2).to(
            torch.float8_e4m3fn)
        self.table = torch.randperm(blocks, device=device)[: -(-self.n // PAGE)].to(torch.int32)
        self.q_nope = torch.randn(q_len, H, NOPE, device=device, dtype=torch.bfloat16)
        self.q_pe = torch.randn(q_len, H, ROPE, device=device, dtype=torch.bfloat16)
        self.c_new = torch.randn(q_len, R, device=device, dtype=torch.bfloat16)
        self.k_pe = torch.randn(q_len, ROPE, device=device, dtype=torch.bfloat16)

    def run(self, chunk_bytes: int) -> torch.Tensor:
        mla_prefix.PREFIX_CHUNK_BYTES = chunk_bytes
        return MLA._prefill_one(self.layer, self.q_nope, self.q_pe, self.c_new, self.k_pe,
                                self.cache, self.table, self.n, kernels=True)


def measure(fn, iters: int, device) -> tuple[float, float]:
    """(median ms, peak MiB above the allocation before the call; 0 on the CPU)."""
    if device.type != "cuda":
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return sorted(times)[len(times) // 2], 0.0
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2], peak


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefix", default="8192,32768,131072")
    ap.add_argument("--q", default="1024,8192")
    ap.add_argument("--chunk-mib", default="256,64", help="piece bounds, MiB (floats)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "mla-prefix-h200.json"))
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    layer = make_layer(dev)
    keep = mla_prefix.PREFIX_CHUNK_BYTES
    rows = []
    try:
        for prefix in map(int, args.prefix.split(",")):
            for q_len in map(int, args.q.split(",")):
                case = Case(layer, prefix, q_len, dev)
                want = case.run(ONE_PASS).float()
                cases = [("one pass", ONE_PASS)] + [(f"pieces {m:g} MiB", int(m * 2**20))
                                                   for m in map(float, args.chunk_mib.split(","))]
                for name, nbytes in cases:
                    def fn(nbytes=nbytes, case=case):
                        return case.run(nbytes)
                    err = float((fn().float() - want).norm() / want.norm())
                    if not err < 2e-2:
                        print(f"prefix {prefix} q {q_len} {name}: CHECK FAILED ({err:.2e})")
                        continue
                    ms, peak = measure(fn, args.iters, dev)
                    tokens = mla_prefix.prefix_chunk_tokens(layer, torch.bfloat16, nbytes)
                    rows.append({"prefix": prefix, "q": q_len, "path": name,
                                 "chunk_tokens": min(tokens, prefix), "ms": round(ms, 3),
                                 "peak_mib": round(peak, 1), "rel_err": err})
                    print(f"prefix {prefix} q {q_len} {name}: {ms:.3f} ms, peak {peak:.0f} MiB, "
                          f"rel err {err:.1e}", flush=True)
    finally:
        mla_prefix.PREFIX_CHUNK_BYTES = keep
    print_table(rows, [("prefix", "prefix", 7, "d"), ("q", "q", 5, "d"), ("path", "path", 15, ""),
                       ("chunk", "chunk_tokens", 7, "d"), ("ms", "ms", 9, ".3f"),
                       ("peak_MiB", "peak_mib", 9, ".0f")])
    save_rows(args.out, rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
