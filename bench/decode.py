r"""Decode-step time against the memory roofline floor (issue 7).

Builds the model runner from a preset with dummy weights (`k25-tp8-rank`: one Kimi-K2.5 TP8
rank at full depth, INT4 experts, bf16 rest, fp8 KV), fills the latent cache with random data,
and times one decode step at B in {1, 16, 64, 256} and context {1K, 8K}, by graph replay and
eagerly. The floor is the bytes the step must read over the copy bandwidth measured in the same
run: the experts actually touched (from the step's real routing) + every non-expert weight
(attention, dense layer, shared experts, routers, norms, lm_head; B rows of the embedding) + the
latent KV of every sequence. ratio = floor / step.

    python bench/decode.py --preset k25-tp8-rank [--batches 1,16,64,256] [--ctx 1024,8192]
    python bench/decode.py --batches 1,2 --ctx 1024 \
        --ab atom_stream.models.kernel_path:NORM_GEMV=0,1

(--ab: an in-process A/B of a switch the forward reads at call time, graphs recaptured per
value, values alternated over --ab-rounds.)

Prints a table; writes bench/results/decode-<preset>-<gpu>.json rows
{"batch","ctx","experts_dtype","graphs","step_ms","floor_ms","ratio"}.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from report import print_table, save_rows  # bench/report.py (the script's folder)

from atom_stream.config import EngineConfig
from atom_stream.engine.model_runner import ModelRunner
from atom_stream.engine.sequence import ScheduledBatch, Sequence
from atom_stream.models.deepseek_v3 import MoE
from atom_stream.sampling_params import SamplingParams


def copy_bandwidth(device, nbytes: int = 4 << 30) -> float:
    """Device-to-device copy: (bytes read + written) / time, in bytes/s (median of 10)."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    t = sorted(times[2:])[len(times[2:]) // 2]
    del src, dst
    return nbytes / t


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def weight_bytes(model) -> tuple[int, int, dict[int, int]]:
    """(non-expert bytes read per step excluding the embedding, embedding row bytes,
    {moe layer index: bytes per routed expert})."""
    expert_bytes: dict[int, int] = {}
    non_expert = 0
    embed_row = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith(("rotary.cos", "rotary.sin")):
            continue
        if ".mlp.experts." in name:
            layer = int(name.split(".")[2])
            expert_bytes[layer] = expert_bytes.get(layer, 0) + tensor_bytes(t) // t.shape[0]
        elif name.endswith("embed_tokens.weight"):
            embed_row = t.shape[1] * t.element_size()
        else:
            non_expert += tensor_bytes(t)
    return non_expert, embed_row, expert_bytes


def fill_kv_random(runner: ModelRunner) -> None:
    """Random latent cache (never time attention on zeros)."""
    for cache in runner.kv_caches:
        for i in range(0, cache.shape[0], 256):
            chunk = cache[i:i + 256]
            chunk.copy_((torch.randn(chunk.shape, device=chunk.device) * 0.5).to(cache.dtype))


def kv_bytes_per_token(preset: dict, kv_cache_dtype: str) -> int:
    """Latent cache bytes per token over all layers (every TP rank holds the whole latent)."""
    elem = 1 if kv_cache_dtype == "fp8" else 2
    return (preset["kv_lora_rank"] + preset["qk_rope_head_dim"]) * preset["num_hidden_layers"] * elem


def touched_expert_bytes(runner: ModelRunner, eager_inp, moes, expert_bytes: dict[int, int]
                         ) -> int:
    """Run one eager step recording each MoE layer's routing; the bytes of the distinct experts
    it touched (per rank: `expert_bytes` are this rank's shards)."""
    for m in moes:
        m.record = []
    runner.run_inputs(eager_inp)
    touched = sum(int(torch.unique(m.record[0]).numel()) * expert_bytes[i]
                  for i, m in zip(sorted(expert_bytes), moes))
    for m in moes:
        m.record = None
    return touched


def plan_runs(preset: str, kv_cache_dtype: str, batches: list[int], ctxs: list[int],
              max_kv_gib: float, block_size: int) -> tuple[int, list, list, int]:
    """(KV bytes per token, every (B, ctx), those whose KV fits max_kv_gib, the pool's tokens:
    enough for the largest fitting B x ctx)."""
    from atom_stream.models.presets import PRESETS
    per_tok = kv_bytes_per_token(PRESETS[preset], kv_cache_dtype)
    budget_tokens = int(max_kv_gib * 2**30 / per_tok)
    runs = [(B, c) for c in ctxs for B in batches]
    fits = [(B, c) for B, c in runs if B * c <= budget_tokens]
    max_tokens = max(B * math.ceil(c / block_size) * block_size for B, c in fits)
    return per_tok, runs, fits, max_tokens


def describe_model(runner: ModelRunner):
    """(non-expert bytes, embedding row bytes, {layer: bytes per expert}, MoE modules, experts'
    format) of the runner's model (this rank's shard)."""
    non_expert, embed_row, expert_bytes = weight_bytes(runner.model)
    moes = [m for m in runner.model.modules() if isinstance(m, MoE)]
    return non_expert, embed_row, expert_bytes, moes, experts_format(moes)


def step_inputs(runner: ModelRunner, B: int, ctx: int, block_size: int):
    """(graph inputs, eager inputs) of one decode step of B sequences at context ctx."""
    batch = make_batch(B, ctx, block_size, 0, runner.model_config.vocab_size)
    inp = runner.build_inputs(batch)
    eager = runner.build_inputs(batch)
    eager.use_graph = False
    return inp, eager


def make_batch(B: int, ctx: int, block_size: int, first_block: int, vocab: int) -> ScheduledBatch:
    per = math.ceil(ctx / block_size)
    seqs = []
    for b in range(B):
        s = Sequence(f"b{b}", torch.randint(0, vocab, (ctx,)).tolist(),
                     SamplingParams(temperature=0), max_tokens=1)
        s.num_computed_tokens = ctx - 1
        s.block_table = list(range(first_block + b * per, first_block + (b + 1) * per))
        seqs.append(s)
    return ScheduledBatch(seqs=seqs, num_new_tokens=[1] * B, sample=[True] * B, num_decodes=B)


def time_step(runner: ModelRunner, inp, iters: int) -> float:
    for _ in range(3):
        runner.run_inputs(inp)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        runner.run_inputs(inp)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def experts_format(moes) -> str:
    """"int4" | "mxfp4" | "w4a8" | "fp8_block" | "bf16": the routed experts' weight format
    (from the experts' quant method class, e.g. Int4MoEMethod -> "int4")."""
    method = moes[0].experts.quant_method if moes else None
    if method is None:
        return "bf16"
    name = type(method).__name__.removesuffix("MoEMethod")
    return {"Fp8Block": "fp8_block"}.get(name, name.lower())


def profile_step(runner: ModelRunner, inp, B: int, ctx: int, top: int = 18, seq: int = 0
                 ) -> None:
    """Kernel time breakdown of one replayed step: where the step goes, and how much of it is
    GPU idle (step time minus summed kernel time); `seq` > 0 also lists that many kernels in
    launch order with their gaps."""
    from torch.profiler import ProfilerActivity, profile

    runner.run_inputs(inp)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner.run_inputs(inp)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events)
    print(f"--- B={B} ctx={ctx}: {total / 1e3:.3f} ms of kernels in one step")
    for e in events[:top]:
        print(f"{e.device_time_total / 1e3:9.3f} ms {e.count:6d}x  {e.key[:90]}")
    if seq:  # the first `seq` kernels in launch order: maps kernel names to the layer's ops
        kern = [e for e in prof.events() if e.device_type.name == "CUDA"
                and e.device_time_total > 0]
        kern.sort(key=lambda e: e.time_range.start)
        t0 = kern[0].time_range.start if kern else 0
        print(f"--- B={B}: the first {min(seq, len(kern))} kernels in order "
              "(start us from the first, duration us, gap to the previous end)")
        prev_end = t0
        for e in kern[:seq]:
            gap = e.time_range.start - prev_end
            print(f"{e.time_range.start - t0:9.1f} {e.device_time_total:7.1f} {gap:6.1f}  "
                  f"{e.name[:80]}")
            prev_end = e.time_range.end


def floor_ms(touched: int, non_expert: int, embed_row: int, per_tok: int, B: int, ctx: int,
             bw: float) -> float:
    """The step's roofline floor, ms: the touched experts + every non-expert weight + B
    embedding rows + the latent KV of B sequences of ctx tokens, over the copy bandwidth."""
    return 1e3 * (touched + non_expert + B * embed_row + B * ctx * per_tok) / bw


def run_ab(runner: ModelRunner, args, runs, fits, per_tok, bw, non_expert, embed_row,
           expert_bytes, moes) -> None:
    """--ab MODULE:ATTR=V0,V1: for each round, each value in turn: set the attribute (a switch
    the forward reads at call time, e.g. atom_stream.models.kernel_path:NORM_GEMV), recapture
    the decode graphs, time every (B, ctx) by graph replay. Same process, same copy bandwidth
    and KV contents for every value: alternated runs without a process start between them.
    Odd rounds take the values in reverse order (a b, b a, ...): session 31 saw the first
    value of a round run ~3 % slower at a B the switch does not touch, so a fixed order would
    bias the means. Prints each value's runs and their mean; rows carry {"ab": value,
    "round": r}."""
    import gc
    import importlib
    import json
    import statistics
    target, _, raw = args.ab.partition("=")
    mod_name, _, attr = target.partition(":")
    mod = importlib.import_module(mod_name)
    values = [json.loads(v) for v in raw.split(",")]
    old = getattr(mod, attr)
    floors = {}
    for B, ctx in runs:
        if (B, ctx) in fits:
            _, eager = step_inputs(runner, B, ctx, args.block_size)
            touched = touched_expert_bytes(runner, eager, moes, expert_bytes)
            floors[(B, ctx)] = floor_ms(touched, non_expert, embed_row, per_tok, B, ctx, bw)
    rows = []
    try:
        for r in range(args.ab_rounds):
            for v in (values if r % 2 == 0 else values[::-1]):
                setattr(mod, attr, v)
                runner.graphs = None
                gc.collect()
                torch.cuda.empty_cache()
                runner._capture_graphs()
                for (B, ctx), floor in floors.items():
                    inp, _ = step_inputs(runner, B, ctx, args.block_size)
                    ms = time_step(runner, inp, args.iters)
                    rows.append({"batch": B, "ctx": ctx, "ab": v, "round": r, "graphs": True,
                                 "step_ms": round(ms, 4), "floor_ms": round(floor, 4),
                                 "ratio": round(floor / ms, 4),
                                 "copy_GBps": round(bw / 1e9, 1)})
                    print(f"round {r} {attr}={v!r}: B={B:4d} ctx={ctx:5d} step={ms:8.3f} ms "
                          f"ratio={floor / ms:.3f}", flush=True)
    finally:
        setattr(mod, attr, old)
    print(f"\n{target}: mean step ms over {args.ab_rounds} rounds (copy {bw / 1e9:.0f} GB/s)")
    for (B, ctx) in floors:
        means = [statistics.mean(x["step_ms"] for x in rows
                                 if x["ab"] == v and (x["batch"], x["ctx"]) == (B, ctx))
                 for v in values]
        print(f"B={B:4d} ctx={ctx:5d} " + "  ".join(f"{v!r}: {m:.3f}"
                                                     for v, m in zip(values, means)))
    if args.out:
        save_rows(args.out, rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="k25-tp8-rank")
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--ctx", default="1024,8192")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--kv-cache-dtype", default="fp8")
    ap.add_argument("--eager", action="store_true", help="no graphs at all")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--max-kv-gib", type=float, default=40.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true",
                    help="also print the top GPU kernels of one graph-replayed step per B")
    ap.add_argument("--profile-seq", type=int, default=0,
                    help="with --profile: also list the first N kernels in launch order")
    ap.add_argument("--ab", default=None, metavar="MODULE:ATTR=V0,V1",
                    help="in-process A/B: set the module attribute to each JSON value in turn, "
                    "recapture the graphs and time every (B, ctx); --ab-rounds times over")
    ap.add_argument("--ab-rounds", type=int, default=3)
    args = ap.parse_args(argv)
    batches = [int(x) for x in args.batches.split(",")]
    ctxs = [int(x) for x in args.ctx.split(",")]
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)

    per_tok, runs, fits, max_tokens = plan_runs(args.preset, args.kv_cache_dtype, batches, ctxs,
                                                 args.max_kv_gib, args.block_size)
    cfg = EngineConfig(model=args.preset, load_format="dummy", dtype="bfloat16", device="cuda",
                       kv_cache_dtype=args.kv_cache_dtype, block_size=args.block_size,
                       num_kv_blocks=max_tokens // args.block_size, max_num_seqs=max(batches),
                       max_model_len=max(ctxs) + args.block_size, enforce_eager=args.eager,
                       cudagraph_capture_sizes=sorted({B for B, _ in fits}))
    t0 = time.perf_counter()
    runner = ModelRunner(cfg)
    print(f"runner ready in {time.perf_counter() - t0:.1f}s; graphs={runner.graphs is not None}")
    fill_kv_random(runner)
    non_expert, embed_row, expert_bytes, moes, experts_dtype = describe_model(runner)
    if args.ab:
        return run_ab(runner, args, runs, fits, per_tok, bw, non_expert, embed_row,
                      expert_bytes, moes)
    rows = []
    for B, ctx in runs:
        if (B, ctx) not in fits:
            print(f"skip B={B} ctx={ctx}: KV does not fit the {args.max_kv_gib} GiB budget")
            continue
        inp, eager = step_inputs(runner, B, ctx, args.block_size)
        touched = touched_expert_bytes(runner, eager, moes, expert_bytes)
        kv = B * ctx * per_tok
        floor = floor_ms(touched, non_expert, embed_row, per_tok, B, ctx, bw)
        variants = [(False, eager)]
        if inp.use_graph:
            variants.append((True, inp))
        for graphs, step_inp in variants:
            if not graphs and inp.use_graph and B != 1:
                continue  # eager only where there is no graph, or at B=1 for the speed-up
            ms = time_step(runner, step_inp, args.iters if graphs else max(3, args.iters // 4))
            rows.append({"batch": B, "ctx": ctx, "experts_dtype": experts_dtype,
                         "graphs": graphs, "step_ms": round(ms, 4), "floor_ms": round(floor, 4),
                         "ratio": round(floor / ms, 4),
                         "bytes": {"experts": touched, "weights": non_expert, "kv": kv},
                         "copy_GBps": round(bw / 1e9, 1)})
            r = rows[-1]
            print(f"B={B:4d} ctx={ctx:5d} graphs={graphs!s:5} step={ms:8.3f} ms "
                  f"floor={floor:7.3f} ms ratio={r['ratio']:.3f}", flush=True)
        if args.profile and inp.use_graph:
            profile_step(runner, inp, B, ctx, seq=args.profile_seq)
    gpu = torch.cuda.get_device_name().split()[-1].lower()
    out = args.out or f"bench/results/decode-{args.preset}-{gpu}.json"
    save_rows(out, rows)
    print(f"\ncopy bandwidth {bw / 1e9:.0f} GB/s; wrote {out}")
    print_table(rows, [("B", "batch", 4, ""), ("ctx", "ctx", 6, ""),
                       ("graphs", lambda r: str(r["graphs"]), 6, ""),
                       ("step_ms", "step_ms", 9, ".3f"), ("floor_ms", "floor_ms", 9, ".3f"),
                       ("ratio", "ratio", 6, ".3f")])


if __name__ == "__main__":
    main()
