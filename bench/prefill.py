"""Prefill step time on one GPU: where time-to-first-token goes (issue 7).

    python3 bench/prefill.py [--preset k25-tp8-rank] [--lens 930,931,1017,4096,8192]
                             [--profile 1024] [--out prefill.json]

Builds the runner from a preset with dummy weights (fp8 KV, eager: prefill never replays a
graph) and runs ONE sequence's prompt of each length as one chunk from position 0, the way the
scheduler feeds a new request (lengths above --max-num-batched-tokens, 8192 by default, would be
split by the scheduler; give them as separate lengths). Per length: the first call (cold: any
kernel compiled or autotuned for a new shape shows up here; lengths of the serving benchmark's
random range, 820-1024, are distinct shapes) and the median of --iters warm calls, CUDA events.
tokens/s = length / warm time. weights_floor_ms = every weight byte of the rank read once / copy
bandwidth (a memory floor only; at these lengths the MoE and attention are compute-bound).
--profile N: torch.profiler kernel totals of one warm prefill of N tokens.
Triton kernels compiled by each first call are listed (new entries of the Triton cache; the run
uses a fresh empty cache directory unless --keep-cache), so a cold first call names its cause.
JSON rows {"len", "first_ms", "warm_ms", "tok_per_s", "weights_floor_ms", "compiled"}.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from decode import copy_bandwidth, profile_step, weight_bytes
from report import print_table, save_rows

from atom_stream.config import EngineConfig
from atom_stream.engine.model_runner import ModelRunner
from atom_stream.engine.sequence import ScheduledBatch, Sequence
from atom_stream.sampling_params import SamplingParams


def triton_cache_dir() -> str:
    return os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton",
                                                              "cache")


def compiled_kernels() -> set[str]:
    """'<hash dir>/<kernel name>' of every compiled kernel in the Triton cache."""
    root, found = triton_cache_dir(), set()
    if os.path.isdir(root):
        for d in os.listdir(root):
            for f in os.listdir(os.path.join(root, d)):
                if f.endswith(".json") and not f.startswith("__grp__"):
                    found.add(f"{d}/{f[:-5]}")
    return found


def prefill_batch(n: int, block_size: int, vocab: int, seed: int) -> ScheduledBatch:
    """One new sequence of n prompt tokens, all in this step, sampling its first token."""
    g = torch.Generator().manual_seed(seed)
    s = Sequence(f"p{n}-{seed}", torch.randint(0, vocab, (n,), generator=g).tolist(),
                 SamplingParams(temperature=0), max_tokens=1)
    s.num_computed_tokens = 0
    s.block_table = list(range(math.ceil(n / block_size)))
    return ScheduledBatch(seqs=[s], num_new_tokens=[n], sample=[True], num_decodes=0)


def timed(runner: ModelRunner, inp) -> float:
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    runner.run_inputs(inp)
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


@torch.inference_mode()
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="k25-tp8-rank")
    ap.add_argument("--lens", default="930,931,1017,4096,8192")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--profile", type=int, default=0)
    ap.add_argument("--keep-cache", action="store_true",
                    help="use the usual Triton cache (default: a fresh empty one)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "prefill-h200.json"))
    args = ap.parse_args(argv)
    assert torch.cuda.is_available(), "bench/prefill.py needs a GPU"
    if not args.keep_cache:  # read when a kernel compiles: set before the first one
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-cache-")
    lens = [int(v) for v in args.lens.split(",")]
    longest = max(lens + [args.profile])
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    cfg = EngineConfig(model=args.preset, load_format="dummy", dtype="bfloat16", device="cuda",
                       kv_cache_dtype="fp8", block_size=args.block_size,
                       num_kv_blocks=math.ceil(longest / args.block_size) + 1, max_num_seqs=1,
                       max_model_len=longest + args.block_size, enforce_eager=True,
                       max_num_batched_tokens=max(8192, longest))
    t0 = time.perf_counter()
    runner = ModelRunner(cfg)
    print(f"runner ready in {time.perf_counter() - t0:.1f}s", flush=True)
    non_expert, _, expert_bytes = weight_bytes(runner.model)
    all_w = non_expert + sum(expert_bytes.values()) * runner.model_config.n_routed_experts
    floor = 1e3 * all_w / bw
    vocab = runner.model_config.vocab_size
    rows = []
    for i, n in enumerate(lens):
        inp = runner.build_inputs(prefill_batch(n, args.block_size, vocab, i))
        before = compiled_kernels()
        first = timed(runner, inp)
        new = collections.Counter(k.split("/", 1)[1] for k in compiled_kernels() - before)
        warm = sorted(timed(runner, inp) for _ in range(args.iters))[args.iters // 2]
        rows.append({"len": n, "first_ms": round(first, 3), "warm_ms": round(warm, 3),
                     "tok_per_s": round(n / warm * 1e3), "weights_floor_ms": round(floor, 3),
                     "compiled": dict(new)})
        print(json.dumps(rows[-1]), flush=True)
    if args.profile:  # one prefill step, as decode.py profiles a decode step
        profile_step(runner, runner.build_inputs(prefill_batch(args.profile, args.block_size,
                                                               vocab, 99)), 1, args.profile,
                     top=20)
    save_rows(args.out, rows)
    print(f"\ncopy bandwidth {bw / 1e9:.0f} GB/s; weights {all_w / 1e9:.2f} GB")
    print_table(rows, [("len", "len", 6, ""), ("first_ms", "first_ms", 10, ".2f"),
                       ("warm_ms", "warm_ms", 9, ".2f"), ("tok/s", "tok_per_s", 8, ""),
                       ("w_floor", "weights_floor_ms", 8, ".2f")])


if __name__ == "__main__":
    main()
