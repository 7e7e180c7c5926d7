"""FP8 block linear bench (issue 8): kernels/fp8_linear vs dequantize+matmul vs a bf16 matmul.

    python bench/fp8_linear.py [--out PATH] [--sweep] [--m 1,16,64,256]

Shapes (DeepSeek-V3 / Kimi-K2 at TP1, [N, K]): q_a 1536x7168, kv_a 576x7168, q_b 24576x1536,
o_proj 7168x16384; M (tokens) 1, 16, 64, 256; bf16 activations. Variants:
- fp8_w8a8:   fp8_block_linear(mode="w8a8"), activation group quant included (the production path);
- fp8_wonly:  fp8_block_linear(mode="weight_only");
- deq_mm:     the old path: dequantize the whole weight to bf16 (layers/quant/fp8_block
              .dequantize_fp8_block's ops) + torch matmul, every call;
- bf16_mm:    torch matmul on a resident bf16 weight (2 B/weight; the unquantized reference).
Timing: each variant is captured in a CUDA graph of R calls over R distinct weight/input copies
(>= 256 MiB of weights in rotation, so L2 never holds the next weight) and the graph replays are
timed with triton.testing.do_bench (median); time per call = replay / R. `bytes` = fp8 weight +
block scales + x + y (each once; the bf16 row counts its 2-byte weight), ratio = bytes / time /
the measured device copy bandwidth. Each fp8 row also reports rel. L2 error vs the float64
reference. --sweep tries a few tile configs per (shape, M) for the w8a8 kernel and reports the best.
Prints a table; writes {"meta", "rows"} JSON to --out (default bench/results/fp8_linear-h200.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from kernels import ensure_kernels_importable  # bench/kernels.py

ensure_kernels_importable()
import triton
import triton.testing

from atom_stream.kernels import fp8_linear as fl

SHAPES = {"q_a": (1536, 7168), "kv_a": (576, 7168), "q_b": (24576, 1536),
          "o_proj": (7168, 16384)}
ROTATE_BYTES = 256 << 20
SWEEP = [fl.Fp8LinearConfig(bm, bn, w, st, split_k=sk) for bm, bn, w, st, sk in (
    (16, 32, 4, 4, None), (16, 64, 4, 4, None), (16, 128, 4, 4, None), (16, 64, 4, 6, None),
    (16, 64, 4, 4, 1), (32, 64, 4, 4, None), (64, 64, 4, 3, None), (64, 128, 4, 3, None),
    (128, 128, 8, 3, None), (64, 128, 8, 4, None))]


def copy_bandwidth() -> float:
    """Device copy bandwidth in bytes/s (bytes read + written), 1 GiB, median."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200,
                                 return_mode="median")
    return 2 * (1 << 30) / (ms * 1e-3)


def dequant_bf16(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """layers/quant/fp8_block.dequantize_fp8_block's ops (128x128 blocks) -> bf16."""
    N, K = w.shape
    full = s.float().repeat_interleave(128, 0)[:N].repeat_interleave(128, 1)[:, :K]
    return (w.float() * full).to(torch.bfloat16)


def time_graph(fn, R: int) -> float:
    """Microseconds per call: fn(i) for i in range(R) captured once, replays timed."""
    for i in range(min(R, 3)):  # compile / autotune / allocate outside the capture
        fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(R):
            fn(i)
    ms = triton.testing.do_bench(g.replay, warmup=10, rep=100, return_mode="median")
    return ms * 1e3 / R


def _variants(xs, ws, ss, ys, wb, fp8_bytes: int, bf16_bytes: int) -> dict:
    """name -> (fn(i), calls per graph, bytes per call)."""
    R, Rb = len(ws), len(wb)
    return {
        "fp8_w8a8": (lambda i: fl.fp8_block_linear(xs[i], ws[i], ss[i], mode="w8a8", out=ys[i]),
                     R, fp8_bytes),
        "fp8_wonly": (lambda i: fl.fp8_block_linear(xs[i], ws[i], ss[i], mode="weight_only",
                                                    out=ys[i]), R, fp8_bytes),
        "deq_mm": (lambda i: torch.matmul(xs[i], dequant_bf16(ws[i], ss[i]).t(), out=ys[i]),
                   R, fp8_bytes),
        "bf16_mm": (lambda i: torch.matmul(xs[i % R], wb[i].t(), out=ys[i % R]), Rb,
                    bf16_bytes),
    }


def bench_shape(name: str, N: int, K: int, Ms, copy_bw: float, sweep: bool) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(N + K)
    wbytes = N * K
    R = max(2, min(64, -(-ROTATE_BYTES // wbytes)))
    ws = [(torch.randn(N, K, device="cuda", generator=gen) * 64).clamp(-440, 440)
          .to(torch.float8_e4m3fn) for _ in range(R)]
    nb, kb = -(-N // 128), -(-K // 128)
    ss = [torch.rand(nb, kb, device="cuda", generator=gen) / (64 * K ** 0.5) + 1e-6
          for _ in range(R)]
    Rb = max(2, min(64, -(-ROTATE_BYTES // (2 * wbytes))))
    wb = [dequant_bf16(ws[i % R], ss[i % R]) for i in range(Rb)]
    rows = []
    for M in Ms:
        xs = [torch.randn(M, K, device="cuda", generator=gen, dtype=torch.bfloat16)
              for _ in range(R)]
        ys = [torch.empty(M, N, device="cuda", dtype=torch.bfloat16) for _ in range(R)]
        io = 2 * M * K + 2 * M * N
        fp8_bytes = wbytes + 4 * nb * kb + io
        variants = _variants(xs, ws, ss, ys, wb, fp8_bytes, 2 * wbytes + io)
        base = None
        for var, (fn, reps, nbytes) in variants.items():
            us = time_graph(fn, reps)
            err = None
            if var.startswith("fp8"):
                mode = "w8a8" if var == "fp8_w8a8" else "weight_only"
                y = fl.fp8_block_linear(xs[0], ws[0], ss[0], mode=mode)
                ref = fl.fp8_block_linear_ref(xs[0], ws[0], ss[0], mode=mode)
                err = ((y.double() - ref).norm() / ref.norm()).item()
            if var == "deq_mm":
                base = us
            rows.append({"shape": name, "N": N, "K": K, "M": M, "variant": var,
                         "time_us": us, "bytes": nbytes, "GBps": nbytes / us * 1e-3,
                         "TFLOPs": 2 * M * N * K / us * 1e-6,
                         "ratio": nbytes / (us * 1e-6) / copy_bw, "rel_err": err,
                         "config": str(fl.default_config(M, N, K)) if var.startswith("fp8")
                         else None})
        for r in rows[-4:]:
            r["vs_deq_mm"] = base / r["time_us"] if base else None
        if sweep:
            best = None
            for cfg in SWEEP:
                try:
                    us = time_graph(lambda i, c=cfg, xs=xs, ys=ys: fl.fp8_block_linear(
                        xs[i], ws[i], ss[i], mode="w8a8", out=ys[i], config=c), R)
                except Exception as e:  # noqa: BLE001  (a config that does not compile / fit)
                    print(f"  sweep {name} M={M} {cfg}: {type(e).__name__}", file=sys.stderr)
                    continue
                if best is None or us < best[0]:
                    best = (us, cfg)
            if best is not None:
                rows.append({"shape": name, "N": N, "K": K, "M": M, "variant": "w8a8_best",
                             "time_us": best[0], "bytes": fp8_bytes,
                             "GBps": fp8_bytes / best[0] * 1e-3,
                             "TFLOPs": 2 * M * N * K / best[0] * 1e-6,
                             "ratio": fp8_bytes / (best[0] * 1e-6) / copy_bw, "rel_err": None,
                             "config": str(best[1]), "vs_deq_mm": base / best[0]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "fp8_linear-h200.json"))
    ap.add_argument("--m", default="1,16,64,256")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    Ms = [int(m) for m in args.m.split(",")]
    copy_bw = copy_bandwidth()
    rows = []
    for name in args.shapes.split(","):
        N, K = SHAPES[name]
        rows += bench_shape(name, N, K, Ms, copy_bw, args.sweep)
    meta = {"gpu": torch.cuda.get_device_name(), "copy_GBps": copy_bw / 1e9,
            "torch": torch.__version__, "triton": triton.__version__,
            "fp8_dot": fl.fp8_dot_supported(torch.device("cuda"))}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"{meta['gpu']}: copy {meta['copy_GBps']:.0f} GB/s")
    print(f"{'shape':7} {'M':>4} {'variant':10} {'us':>8} {'GB/s':>7} {'TFLOP/s':>8} "
          f"{'ratio':>6} {'x deq':>6} {'rel_err':>8}  config")
    for r in rows:
        err = f"{r['rel_err']:.1e}" if r["rel_err"] is not None else "-"
        print(f"{r['shape']:7} {r['M']:>4} {r['variant']:10} {r['time_us']:8.2f} "
              f"{r['GBps']:7.0f} {r['TFLOPs']:8.1f} {r['ratio']:6.2f} "
              f"{r['vs_deq_mm'] or 0:6.2f} {err:>8}  {r['config'] or ''}")


if __name__ == "__main__":
    main()
