"""Kernel benchmarks (issue 6): one entry point for the attention and the fused-MoE halves.

    python bench/kernels.py [--only all|attention|moe] [--sweep] [--out PATH]

Measures the device-to-device copy bandwidth first (bytes read + written / time, 2 GiB copy,
median of CUDA-graph replays), then runs bench/kernels_attention.attention_rows() and, if
bench/kernels_moe.py exists, its moe_rows(). Every row is
    {"kernel", "batch", "ctx", "m", "time_us", "bytes", "copy_GBps", "ratio"}
with ratio = bytes / time / copy bandwidth (bytes = what must move: each input read once, each
output written once). Prints the table and writes the rows to --out (default
bench/results/kernels-h200.json); rows of kernels not run this time are kept from the old file.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import statistics
import sys
import time
import types

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def ensure_kernels_importable() -> None:
    """Make `atom_stream.kernels` importable on a bare GPU box (torch + triton only): if the
    package's __init__ cannot be imported (it pulls in the engine's dependencies), register
    a bare `atom_stream` namespace and load kernels/ under it."""
    try:
        import atom_stream.kernels  # noqa: F401
        return
    except ImportError:
        pass
    for name in [m for m in sys.modules if m == "atom_stream" or m.startswith("atom_stream.")]:
        del sys.modules[name]
    root = os.path.dirname(HERE)
    pkg = types.ModuleType("atom_stream")
    pkg.__path__ = []
    sys.modules["atom_stream"] = pkg
    spec = importlib.util.spec_from_file_location(
        "atom_stream.kernels", os.path.join(root, "kernels", "__init__.py"),
        submodule_search_locations=[os.path.join(root, "kernels")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["atom_stream.kernels"] = mod
    spec.loader.exec_module(mod)
    pkg.kernels = mod


ensure_kernels_importable()

KEYS = ("kernel", "batch", "ctx", "m", "time_us", "bytes", "copy_GBps", "ratio")


def time_calls(calls, min_replay_us: float = 400.0, replays: int = 7) -> float:
    """Median µs per call, from CUDA-graph replays of `calls` (a list of zero-arg callables,
    typically one per rotated input set so repeated calls don't read from L2)."""
    for c in calls:  # compile / warm up outside the capture
        c()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for c in calls:
        c()
    e1.record()
    e1.synchronize()
    est = max(e0.elapsed_time(e1) * 1e3 / len(calls), 1.0)
    repeat = max(1, min(int(min_replay_us / (est * len(calls))) + 1, max(1, 512 // len(calls))))
    seq = calls * repeat
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in seq:
            c()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3 / len(seq))
    del g
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 2 << 30, warm_s: float = 0.0) -> float:
    """GB/s of a large device-to-device copy, counting bytes read plus bytes written: the best
    of an eager `copy_` and an elementwise copy kernel, each the median of 10 event-timed runs.
    (Not graph-captured: on H200 a captured copy_ measured 2768 GB/s, below what the decode
    kernel itself reads, 4150 GB/s, so that path is not the SM copy ceiling.)
    warm_s: run copies this long first (an idle GPU starts at low clocks)."""
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    t_end = time.time() + warm_s
    while time.time() < t_end:
        for _ in range(20):
            dst.copy_(src)
        torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for fn in (lambda: dst.copy_(src), lambda: torch.mul(src, 1.0, out=dst)):
        fn()
        times = []
        for _ in range(10):
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) * 1e-3)
        best = min(best, statistics.median(times))
    return 2 * nbytes / best / 1e9


def _int_or_none(v):
    return None if v is None else int(v)


def make_row(kernel, batch, ctx, m, time_us, nbytes, copy_gbps) -> dict:
    """One JSON row; batch / ctx / m are None where they do not apply (MoE rows: m only)."""
    return {"kernel": kernel, "batch": _int_or_none(batch), "ctx": _int_or_none(ctx),
            "m": _int_or_none(m),
            "time_us": round(float(time_us), 3), "bytes": int(nbytes),
            "copy_GBps": round(float(copy_gbps), 1),
            "ratio": round(float(nbytes) / (time_us * 1e-6) / (copy_gbps * 1e9), 4)}


def print_table(rows) -> None:
    print(f"{'kernel':<26}{'batch':>6}{'ctx':>7}{'m':>6}{'time_us':>11}{'MB':>10}"
          f"{'GB/s':>9}{'copy':>8}{'ratio':>7}")
    for r in rows:
        gbs = r["bytes"] / (r["time_us"] * 1e-6) / 1e9
        print(f"{r['kernel']:<26}{str(r['batch']):>6}{str(r['ctx']):>7}{str(r['m']):>6}"
              f"{r['time_us']:>11.2f}"
              f"{r['bytes'] / 1e6:>10.2f}{gbs:>9.0f}{r['copy_GBps']:>8.0f}{r['ratio']:>7.3f}")


def _call_moe(copy_gbps):
    """MoE rows at the shipped defaults: the 4-bit formats with their gate_up weights row-tiled
    as the loader stores them (ATOM_STREAM_MOE_W13_TILE, default 16), the others row-major."""
    try:
        import kernels_moe
    except ImportError:
        return []
    fn = getattr(kernels_moe, "moe_rows", None)
    if fn is None:
        return []
    if "cset" not in inspect.signature(fn).parameters:
        return list(fn(copy_gbps))
    from atom_stream.layers.quant.common import w13_tile_rows
    tile = w13_tile_rows()
    return (list(fn(copy_gbps, formats=("int4", "mxfp4", "mxfp4_w4a4"), cset="default",
                    w13_tiles=(tile,)))
            + list(fn(copy_gbps, formats=("bf16", "fp8", "w4a8"), cset="default")))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("all", "attention", "moe"), default="all")
    ap.add_argument("--no-tune", action="store_true",
                    help="decode: time v1, the production path and the v2 default only (no "
                    "variant sweep; the whole run then fits one device call with the MoE rows)")
    ap.add_argument("--sweep", action="store_true", help="finally, time decode split counts")
    ap.add_argument("--sweep-out", default=None, help="JSON file for tuning/sweep timings")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "kernels-h200.json"))
    args = ap.parse_args(argv)
    assert torch.cuda.is_available(), "bench/kernels.py needs a GPU"
    ensure_kernels_importable()
    import triton
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"triton {triton.__version__}", flush=True)
    copy_gbps = copy_bandwidth(warm_s=1.0)
    print(f"copy bandwidth (read + write): {copy_gbps:.0f} GB/s", flush=True)
    rows = []
    if args.only in ("all", "attention"):
        import kernels_attention
        log = []
        rows += kernels_attention.attention_rows(copy_gbps, tune=not args.no_tune, log=log)
    if args.only in ("all", "moe"):
        rows += _call_moe(copy_gbps)
    # measured again at the end; ratios use the higher (stricter) of the two
    copy_end = copy_bandwidth()
    print(f"copy bandwidth at the end: {copy_end:.0f} GB/s", flush=True)
    copy_gbps = max(copy_gbps, copy_end)
    rows = [{**r, **make_row(r["kernel"], r["batch"], r["ctx"], r["m"], r["time_us"], r["bytes"],
                             copy_gbps)} for r in rows]  # extra keys (decode "variant") kept
    done = {r["kernel"] for r in rows}  # decode: a best-v1 and a best-v2 row per case
    old = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            old = [r for r in json.load(f) if r.get("kernel") not in done]
    print_table(rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(old + rows, f, indent=1)
    print(f"wrote {len(old + rows)} rows to {args.out}", flush=True)
    if args.only in ("all", "attention"):
        print(f"decode configs used: {kernels_attention.CHOSEN or 'code defaults'}", flush=True)
        if args.sweep_out:
            with open(args.sweep_out, "w") as f:
                json.dump(log, f, indent=1)
        if args.sweep:  # last, so that a time limit cannot cost the rows above
            kernels_attention.split_sweep(copy_gbps, args.sweep_out, log)


if __name__ == "__main__":
    main()
