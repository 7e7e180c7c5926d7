"""How fast can the M=1 MoE weight bytes be read at all? A read-only probe (issue 6).

The small-M MoE gate_up kernel reads 8 experts' gate/up weights (8 x 1.835 MB, int4 at the Kimi
TP8 rank shapes) in ~15 µs whatever its tiles (bench/RESULTS.md, session 3): ~1.05 TB/s. This
probe times plain Triton read kernels (load + sum, one int32 out per program) over the same
bytes, so the gap splits into "the memory system at this size and pattern" and "the kernel":

  contiguous  N bytes of one buffer (N = the 8 experts' bytes)
  experts     the 8 experts' slices of a [384, bytes/expert] weight, ids read on the device
              (a dependent load before the first weight load, as in the MoE kernels)
  experts_c   the same with the ids as kernel arguments (no dependent load)

for the gate_up (w13: 1.835 MB per expert) and down (w2: 0.917 MB) slices, over CHUNK bytes per
program and num_warps. Timing: CUDA-graph replays over ROT rotated id sets (117 MB of distinct
weights per pass: past the 50 MB L2). Prints one table, writes JSON rows
{"probe", "part", "chunk", "warps", "time_us", "bytes", "GBps", "copy_GBps", "ratio"}.
    python3 bench/moe_read_probe.py --out bench/results/moe-read-probe-h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels_moe import copy_bandwidth, time_calls

E, TOPK, ROT = 384, 8, 8
PARTS = {"gate_up": 7168 * 512 // 2, "down": 7168 * 256 // 2}  # int4 bytes per expert


@triton.jit
def _read_kernel(W, IDS, OUT, e0, e1, e2, e3, e4, e5, e6, e7, per_expert, chunks_per_expert,
                 CHUNK: tl.constexpr, MODE: tl.constexpr):
    """MODE 0: contiguous; 1: expert ids from IDS; 2: expert ids from the arguments."""
    p = tl.program_id(0)
    k = p // chunks_per_expert
    c = p % chunks_per_expert
    if MODE == 0:
        base = p.to(tl.int64) * CHUNK
    else:
        if MODE == 1:
            e = tl.load(IDS + k).to(tl.int64)
        else:
            e = tl.where(k == 0, e0, tl.where(k == 1, e1, tl.where(k == 2, e2, tl.where(
                k == 3, e3, tl.where(k == 4, e4, tl.where(k == 5, e5, tl.where(
                    k == 6, e6, e7))))))).to(tl.int64)
        base = e * per_expert + c.to(tl.int64) * CHUNK
    offs = tl.arange(0, CHUNK // 4)
    v = tl.load(W + base // 4 + offs)
    tl.store(OUT + p, tl.sum(v, 0))


def probe(part: str, mode: int, chunk: int, warps: int, w: torch.Tensor, ids: list) -> float:
    per_expert = PARTS[part]
    cpe = per_expert // chunk
    grid = (TOPK * cpe,)
    out = torch.empty(grid[0], dtype=torch.int32, device="cuda")
    calls = []
    for r in range(ROT):
        idt = ids[r]
        es = idt.tolist()
        src = w if mode else w.view(-1)[r * TOPK * per_expert // 4:]

        def call(idt=idt, es=es, src=src):
            _read_kernel[grid](src, idt, out, *es, per_expert, cpe, CHUNK=chunk, MODE=mode,
                               num_warps=warps)
        calls.append(call)
    return time_calls(calls)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "moe-read-probe-h200.json"))
    args = ap.parse_args(argv)
    copy = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}  copy {copy:.0f} GB/s", flush=True)
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    print(f"{'part':<8}{'probe':<12}{'chunk':>7}{'warps':>6}{'us':>9}{'GB/s':>8}{'ratio':>7}")
    for part, per_expert in PARTS.items():
        w = torch.randint(-2**31, 2**31 - 1, (E, per_expert // 4), dtype=torch.int32,
                          generator=gen).cuda()
        ids = [torch.randperm(E, generator=gen)[:TOPK].to(torch.int32).cuda() for _ in range(ROT)]
        nbytes = TOPK * per_expert
        for name, mode in (("contiguous", 0), ("experts", 1), ("experts_c", 2)):
            for chunk in (4096, 16384, 65536):
                for warps in (4, 8):
                    t = probe(part, mode, chunk, warps, w, ids)
                    gbps = nbytes / t / 1e3
                    rows.append({"probe": name, "part": part, "chunk": chunk, "warps": warps,
                                 "time_us": round(t, 2), "bytes": nbytes,
                                 "GBps": round(gbps), "copy_GBps": round(copy),
                                 "ratio": round(gbps / copy, 3)})
                    print(f"{part:<8}{name:<12}{chunk:>7}{warps:>6}{t:>9.2f}{gbps:>8.0f}"
                          f"{gbps / copy:>7.3f}", flush=True)
        del w
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
