"""Decode-step time at tensor parallel > 1 on one host's GPUs, against the per-rank roofline
plus the step's collectives (issue 11).

One process per GPU (NCCL), each building the preset's ModelRunner over its shard, as the TP
executor's ranks do; every rank builds the same batch (same seed) and runs the same steps, so the
collectives inside the step pair up. `--preset k25-tp4-rank --tp 2` puts exactly one Kimi-K2.5
TP8 rank's shapes on each GPU (ranks 0-1 of a TP8 group); `--preset k25 --tp 8` is the whole
model on 8 GPUs.

Per row, from rank 0 (the collectives keep the ranks in step):
- floor_rank_ms: the bytes one rank must read (touched experts of this rank's shard from the
  step's real routing + every non-expert weight of the shard + B embedding rows + the latent KV,
  which every rank holds whole) over the copy bandwidth measured in the same run;
- comm_ms: the step's collectives alone (the all-reduces and the lm_head all-gather recorded
  from one eager step, same shapes, same order), captured in one CUDA graph and replayed;
- floor_ms = floor_rank_ms + comm_ms; ratio = floor_ms / step_ms.

    python bench/decode_tp.py --preset k25-tp4-rank --tp 2 --batches 1,16,64 --ctx 1024,8192

With ATOM_STREAM_SYMM_ALLREDUCE=1 the model's (and comm_ms's) all-reduces go one-shot over
symmetric memory (layers/symm_allreduce.py) instead of NCCL; rows say which ("symm_allreduce").

Prints a table; writes bench/results/decode-tp<N>-<preset>-<gpu>.json rows {"tp","batch","ctx",
"experts_dtype","graphs","step_ms","floor_ms","floor_rank_ms","comm_ms","ratio","ratio_rank"}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from decode import (
    copy_bandwidth,
    describe_model,
    fill_kv_random,
    plan_runs,
    step_inputs,
    time_step,
    touched_expert_bytes,
)


class CollectiveRecorder:
    """Records (op, shape, dtype) of every all-reduce / all-gather issued while active: the
    process group's (layers/parallel.py calls them through the torch.distributed module) and the
    one-shot symmetric-memory all-reduce's (SymmAllReduce.sum_)."""

    def __init__(self):
        self.ops: list[tuple[str, tuple, torch.dtype]] = []

    def __enter__(self):
        from atom_stream.layers.symm_allreduce import SymmAllReduce

        dist = torch.distributed
        self._saved = dist.all_reduce, dist.all_gather, SymmAllReduce.sum_
        ar, ag, sym = self._saved

        def all_reduce(t, *a, **k):
            self.ops.append(("all_reduce", tuple(t.shape), t.dtype))
            return ar(t, *a, **k)

        def all_gather(parts, t, *a, **k):
            self.ops.append(("all_gather", tuple(t.shape), t.dtype))
            return ag(parts, t, *a, **k)

        def sum_(obj, t):
            self.ops.append(("all_reduce", tuple(t.shape), t.dtype))
            return sym(obj, t)

        dist.all_reduce, dist.all_gather, SymmAllReduce.sum_ = all_reduce, all_gather, sum_
        return self

    def __exit__(self, *exc):
        from atom_stream.layers.symm_allreduce import SymmAllReduce
        torch.distributed.all_reduce, torch.distributed.all_gather, SymmAllReduce.sum_ = \
            self._saved


def time_collectives(ops, info, device, iters: int = 20) -> float:
    """ms of one replay of a CUDA graph issuing `ops` (same shapes, dtypes and order), the
    all-reduces through layers/parallel.all_reduce(t, info) as the model issues them (the
    one-shot path where info.fast_ar takes the tensor)."""
    from atom_stream.layers.parallel import all_reduce

    bufs = []
    for op, shape, dtype in ops:
        t = torch.randn(shape, device=device).to(dtype)
        parts = [torch.empty_like(t) for _ in range(info.size)] if op == "all_gather" else None
        bufs.append((op, t, parts))

    def issue():
        for op, t, parts in bufs:
            if op == "all_reduce":
                all_reduce(t, info)
            else:
                torch.distributed.all_gather(parts, t, group=info.group)

    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        issue()  # eager warm-up outside the capture
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            issue()
    torch.cuda.current_stream(device).wait_stream(stream)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def _rank_main(rank: int, world: int, init: str, args, out: str) -> None:
    from atom_stream.config import EngineConfig
    from atom_stream.engine.model_runner import ModelRunner
    from atom_stream.layers.parallel import TPInfo

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    torch.distributed.init_process_group("nccl", init_method=init, rank=rank, world_size=world,
                                         device_id=dev)
    lead = rank == 0
    try:
        bw = copy_bandwidth(dev)
        batches = [int(x) for x in args.batches.split(",")]
        ctxs = [int(x) for x in args.ctx.split(",")]
        per_tok, _, fits, max_tokens = plan_runs(args.preset, args.kv_cache_dtype, batches,
                                                 ctxs, args.max_kv_gib, args.block_size)
        cfg = EngineConfig(model=args.preset, load_format="dummy", dtype="bfloat16",
                           device=f"cuda:{rank}", tensor_parallel_size=world,
                           kv_cache_dtype=args.kv_cache_dtype, block_size=args.block_size,
                           num_kv_blocks=max_tokens // args.block_size,
                           max_num_seqs=max(batches), max_model_len=max(ctxs) + args.block_size,
                           cudagraph_capture_sizes=sorted({B for B, _ in fits}))
        t0 = time.perf_counter()
        runner = ModelRunner(cfg, TPInfo(rank, world))
        if lead:
            print(f"TP={world}: rank 0 ready in {time.perf_counter() - t0:.1f}s; "
                  f"graphs={runner.graphs is not None}", flush=True)
        fill_kv_random(runner)
        non_expert, embed_row, expert_bytes, moes, experts_dtype = describe_model(runner)
        rows = []
        for B, ctx in fits:
            torch.manual_seed(1000 * B + ctx)  # every rank: the same batch
            inp, eager = step_inputs(runner, B, ctx, args.block_size)
            with CollectiveRecorder() as rec:
                touched = touched_expert_bytes(runner, eager, moes, expert_bytes)
            comm_ms = time_collectives(rec.ops, runner.tp_info, dev)
            kv = B * ctx * per_tok
            floor_rank = 1e3 * (touched + non_expert + B * embed_row + kv) / bw
            for graphs, step_inp in [(True, inp), (False, eager)]:
                if graphs and not inp.use_graph:
                    continue
                if not graphs and B != 1 and inp.use_graph:
                    continue  # eager only at B=1 (the graph speed-up) or where no graph
                torch.distributed.barrier()
                ms = time_step(runner, step_inp, args.iters if graphs else max(3, args.iters // 4))
                floor = floor_rank + comm_ms
                rows.append({"tp": world, "symm_allreduce": runner.tp_info.fast_ar is not None,
                             "batch": B, "ctx": ctx, "experts_dtype": experts_dtype,
                             "graphs": graphs, "step_ms": round(ms, 4), "floor_ms": round(floor, 4),
                             "floor_rank_ms": round(floor_rank, 4), "comm_ms": round(comm_ms, 4),
                             "ratio": round(floor / ms, 4), "ratio_rank": round(floor_rank / ms, 4),
                             "collectives": len(rec.ops),
                             "bytes": {"experts": touched, "weights": non_expert, "kv": kv},
                             "copy_GBps": round(bw / 1e9, 1)})
                if lead:
                    r = rows[-1]
                    print(f"B={B:4d} ctx={ctx:5d} graphs={graphs!s:5} step={ms:8.3f} ms "
                          f"floor={floor:7.3f} (rank {floor_rank:.3f} + comm {comm_ms:.3f}) "
                          f"ratio={r['ratio']:.3f}", flush=True)
        if lead:
            with open(out, "w") as f:
                json.dump(rows, f, indent=1)
        torch.distributed.barrier()
    except BaseException:  # noqa: BLE001 - reported, then this rank exits non-zero
        traceback.print_exc()
        os._exit(1)  # a peer left waiting in a collective is ended by the parent's join
    from atom_stream.engine.tp_workers import _close_group
    t0 = time.perf_counter()
    _close_group(None, timeout=20.0, runner=runner)
    if lead:
        print(f"TP teardown: {time.perf_counter() - t0:.1f}s", flush=True)
    os._exit(0)  # rows are written; never wait on a teardown that overran


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="k25-tp4-rank")
    ap.add_argument("--tp", type=int, default=0, help="ranks (default: every visible GPU)")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--ctx", default="1024,8192")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--kv-cache-dtype", default="fp8")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--max-kv-gib", type=float, default=30.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    world = args.tp or torch.cuda.device_count()
    if world < 2 or world > torch.cuda.device_count():
        raise SystemExit(f"--tp {world}: needs 2..{torch.cuda.device_count()} GPUs")
    tmp = tempfile.mkdtemp()
    part = os.path.join(tmp, "rows.json")
    mp.start_processes(_rank_main, args=(world, f"file://{tmp}/rendezvous", args, part),
                       nprocs=world, join=True, start_method="spawn")
    with open(part) as f:
        rows = json.load(f)
    gpu = torch.cuda.get_device_name().split()[-1].lower()
    out = args.out or f"bench/results/decode-tp{world}-{args.preset}-{gpu}.json"
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)
    symm = bool(rows and rows[0]["symm_allreduce"])
    kind = "one-shot symmetric memory" if symm else "NCCL"
    print(f"\nTP={world} {args.preset}, all-reduce: {kind}; copy bandwidth "
          f"{rows[0]['copy_GBps'] if rows else '?'} GB/s per GPU; wrote {out}")
    print(f"{'B':>4} {'ctx':>6} {'graphs':>6} {'step_ms':>9} {'floor_ms':>9} {'rank_ms':>8} "
          f"{'comm_ms':>8} {'ratio':>6} {'r_rank':>6}")
    for r in rows:
        print(f"{r['batch']:>4} {r['ctx']:>6} {r['graphs']!s:>6} {r['step_ms']:>9.3f} "
              f"{r['floor_ms']:>9.3f} {r['floor_rank_ms']:>8.3f} {r['comm_ms']:>8.3f} "
              f"{r['ratio']:>6.3f} {r['ratio_rank']:>6.3f}")


if __name__ == "__main__":
    main()
