"""The decode step's collectives alone, NCCL vs the one-shot symmetric-memory all-reduce
(layers/symm_allreduce.py), at TP = every visible GPU (issue 11).

One process per GPU. Per batch B: the collectives one Kimi-K2.5 decode step issues at TP
(2 all-reduces of [B, 7168] bf16 per layer x 61 layers + the lm_head all-gather of [B, V/tp]
fp32) captured in one CUDA graph and replayed (bench/decode_tp.time_collectives), once over
NCCL and once with the one-shot path taking the all-reduces. Prints ms per step and µs per
all-reduce; writes JSON rows {"tp", "batch", "impl", "step_comm_ms", "us_per_allreduce"}.

    python bench/allreduce_tp.py --batches 1,16,64 [--out bench/results/allreduce-tp2-h200.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import traceback

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from decode_tp import time_collectives
from report import print_table, save_rows

HIDDEN, LAYERS, VOCAB = 7168, 61, 163840


def _rank_main(rank: int, world: int, init: str, batches: list[int], out: str) -> None:
    from atom_stream.layers.parallel import TPInfo
    from atom_stream.layers.symm_allreduce import try_create

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    torch.distributed.init_process_group("nccl", init_method=init, rank=rank, world_size=world,
                                         device_id=dev)
    rows = []
    try:
        nccl = TPInfo(rank, world)
        sym = try_create(None, dev)
        impls = [("nccl", nccl)] + ([("symm", dataclasses.replace(nccl, fast_ar=sym))]
                                    if sym is not None else [])
        for B in batches:
            ops = [("all_reduce", (B, HIDDEN), torch.bfloat16)] * (2 * LAYERS)
            ops.append(("all_gather", (B, VOCAB // 8), torch.float32))
            for name, info in impls:
                ms = time_collectives(ops, info, dev)
                rows.append({"tp": world, "batch": B, "impl": name, "step_comm_ms": round(ms, 4),
                             "us_per_allreduce": round(1e3 * ms / len(ops), 2)})
                if rank == 0:
                    print(f"B={B:4d} {name:5s} {ms:7.3f} ms per step "
                          f"({rows[-1]['us_per_allreduce']:.1f} us per collective)", flush=True)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(rows, f, indent=1)
        torch.distributed.barrier()
        torch.cuda.synchronize(dev)
    except BaseException:  # noqa: BLE001 - reported, then this rank exits non-zero
        traceback.print_exc()
        os._exit(1)
    os._exit(0)  # no teardown wait: the rows are written


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    world = torch.cuda.device_count()
    if world < 2:
        raise SystemExit("needs 2 or more GPUs")
    tmp = tempfile.mkdtemp()
    part = os.path.join(tmp, "rows.json")
    mp.start_processes(_rank_main, args=(world, f"file://{tmp}/rendezvous",
                                         [int(b) for b in args.batches.split(",")], part),
                       nprocs=world, join=True, start_method="spawn")
    with open(part) as f:
        rows = json.load(f)
    out = args.out or f"bench/results/allreduce-tp{world}-h200.json"
    save_rows(out, rows)
    print_table(rows, [("B", "batch", 4, ""), ("impl", "impl", 5, ""),
                       ("comm ms/step", "step_comm_ms", 12, ".3f"),
                       ("us/collective", "us_per_allreduce", 13, ".2f")])


if __name__ == "__main__":
    main()
