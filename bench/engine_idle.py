"""GPU idle between consecutive decode steps of the real engine loop (issue 7 target: < 5% at B=64).

Drives `AsyncEngine` (the serving loop: schedule, launch, collect, postprocess, deliver) on a bench
preset with dummy weights: B streams with `ctx`-token random prompts and `ignore_eos`. Once every
stream decodes, it records a CUDA event pair around each decode-graph replay for `steps` steps:

    busy = sum(replay end - replay start)        wall = last replay end - first replay start
    idle = 1 - busy / wall

Everything on the GPU outside the replays (input copies, the sampler, D2H of sampled ids) and any
gap while the GPU waits for the CPU counts as idle, so this bounds the true idle from above.
Runs with async scheduling on and off when the engine has the switch. `--penalties` gives every
stream presence 0.5 / frequency 0.2 / repetition 1.1 (penalties over the previous step's token,
which async scheduling keeps on the device); `--guided N` gives the first N streams of each
batch a grammar (a regex of lowercase letters, as long as the stream), whose mask needs that
token on the host.

    python bench/engine_idle.py --preset k25-tp8-rank --batches 1,16,64 --ctx 1024 --steps 40

Prints a table; writes JSON rows {"batch","ctx","async","steps","step_ms","busy_ms","idle"}.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

import torch
from report import print_table, save_rows  # bench/report.py (the script's folder)

from atom_stream.config import EngineConfig
from atom_stream.engine import graphs as graphs_mod
from atom_stream.engine.async_engine import AsyncEngine
from atom_stream.sampling_params import SamplingParams


class ReplayMarks:
    """Wraps DecodeGraphRunner.replay to record CUDA events around every replay while on."""

    def __init__(self):
        self.on = False
        self.marks: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        orig = graphs_mod.DecodeGraphRunner.replay
        marks = self

        def replay(runner, B):
            if not marks.on:
                return orig(runner, B)
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            out = orig(runner, B)
            b.record()
            marks.marks.append((a, b))
            return out

        graphs_mod.DecodeGraphRunner.replay = replay

    def result(self) -> tuple[int, float, float]:
        torch.cuda.synchronize()
        m = self.marks
        busy = sum(a.elapsed_time(b) for a, b in m)
        wall = m[0][0].elapsed_time(m[-1][1])
        return len(m), busy, wall


PENALTIES = {"presence_penalty": 0.5, "frequency_penalty": 0.2, "repetition_penalty": 1.1}


async def run_batch(engine: AsyncEngine, B: int, ctx: int, steps: int, marks: ReplayMarks,
                    vocab: int, tag: str, penalties: bool = False, guided: int = 0) -> dict:
    warm = 8
    n_out = warm + steps + 8
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=n_out,
                            **(PENALTIES if penalties else {}))
    grammar = SamplingParams(temperature=0, ignore_eos=True, max_tokens=n_out,
                             structured_outputs={"regex": f"[a-z]{{{n_out}}}"})
    rng = random.Random(B)
    started = 0
    all_decoding = asyncio.Event()

    async def stream(i: int) -> None:
        nonlocal started
        prompt = [rng.randrange(320, vocab) for _ in range(ctx)]
        n = 0
        p = grammar if i < guided else params
        async for _ in engine.generate(prompt, p, request_id=f"{tag}-{B}-{i}"):
            n += 1
            if n == warm:
                started += 1
                if started == B:
                    all_decoding.set()

    tasks = [asyncio.create_task(stream(i)) for i in range(B)]
    await all_decoding.wait()
    marks.marks.clear()
    marks.on = True
    t0 = time.perf_counter()
    while len(marks.marks) < steps:
        await asyncio.sleep(0.001)
    host_s = time.perf_counter() - t0
    marks.on = False
    n, busy, wall = marks.result()
    await asyncio.gather(*tasks)
    return {"batch": B, "ctx": ctx, "async": getattr(engine.config, "async_scheduling", None),
            "penalties": penalties, "guided": min(guided, B), "steps": n,
            "step_ms": round(wall / n, 4), "busy_ms": round(busy / n, 4),
            "idle": round(1 - busy / wall, 4), "host_step_ms": round(1e3 * host_s / n, 4)}


async def run_mode(cfg: EngineConfig, batches: list[int], ctx: int, steps: int,
                   marks: ReplayMarks, vocab: int, tag: str, penalties=(False,),
                   guided=(0,)) -> list[dict]:
    rows = []
    async with AsyncEngine(cfg) as engine:
        for B in batches:
            for pen in penalties:
                for g in guided:
                    rows.append(await run_batch(engine, B, ctx, steps, marks, vocab,
                                                f"{tag}-{int(pen)}-{g}", pen, g))
                    print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="k25-tp8-rank")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--modes", default="async,sync", help="async scheduling on/off")
    ap.add_argument("--penalties", choices=("off", "on", "both"), default="off",
                    help="streams with presence / frequency / repetition penalties")
    ap.add_argument("--guided", default="0",
                    help="comma list: runs with that many grammar-guided streams per batch")
    ap.add_argument("--out", default="bench/results/engine-idle.json")
    args = ap.parse_args(argv)
    guided = [int(g) for g in args.guided.split(",")]
    pens = {"off": (False,), "on": (True,), "both": (False, True)}[args.penalties]
    from atom_stream.models.presets import PRESETS
    vocab = PRESETS[args.preset]["vocab_size"] if args.preset in PRESETS else 320
    marks = ReplayMarks()
    rows = []
    batches = [int(b) for b in args.batches.split(",")]
    for mode in args.modes.split(","):
        kw = {"model": args.preset, "load_format": "dummy", "device": "cuda",
              "dtype": "bfloat16", "kv_cache_dtype": "fp8", "block_size": 64,
              "max_num_seqs": max(batches), "cudagraph_capture_sizes": batches,
              "max_model_len": args.ctx + args.steps + 64, "enable_prefix_caching": False}
        if "async_scheduling" in EngineConfig.__dataclass_fields__:
            kw["async_scheduling"] = mode == "async"
        elif mode == "async":
            print("this engine has no async_scheduling switch; sync loop only")
            continue
        rows += asyncio.run(run_mode(EngineConfig(**kw), batches, args.ctx, args.steps, marks,
                                     vocab, mode, pens, guided))
        torch.cuda.empty_cache()
    save_rows(args.out, rows)
    print_table(rows, [("B", "batch", 4, ""), ("ctx", "ctx", 6, ""),
                       ("async", lambda r: str(r["async"]), 6, ""),
                       ("pen", lambda r: str(r["penalties"]), 6, ""),
                       ("guided", "guided", 7, ""),
                       ("step_ms", "step_ms", 9, ".3f"), ("busy_ms", "busy_ms", 9, ".3f"),
                       ("idle", lambda r: f"{100 * r['idle']:.1f}%", 7, "")])


if __name__ == "__main__":
    main()
