"""Engine-core CPU overhead per step at 256 running requests (issue 3 target: < 1 ms per step,
so that on a GPU it hides under the step itself).

A no-op runner stands in for the model: it returns one token per sampled row and costs nothing.
Per decode step we time, on one thread:
  schedule     Scheduler.schedule() (block allocation included) via LLMEngine.schedule()
  prepare      ModelRunner.build_inputs(batch): the host-side flattening of the real runner,
               without the model (what the runner does before launching the step); block tables
               from the persistent incremental copy (BlockTableRows)
  prepare old  the from-scratch reference (`build_inputs_ref` in
               tests/test_build_inputs_incremental.py: every block table flattened each step),
               timed on the same batches; both outputs are checked byte-identical (untimed)
  postprocess  LLMEngine.postprocess(): advance sequences, prefix-cache registration, stop
               checks, incremental detokenization (+ stop strings in that scenario), deltas,
               metrics
Scenarios: token ids only (no tokenizer), detokenization (demo byte-level tokenizer), and
detokenization + two stop strings, with 128-token prompts; and token ids only at 8K context
(8192-token prompts: ~520 blocks per table). 256 requests all decoding, block size 16. The
prefill step is not measured (in a real run its build_inputs calls fill the persistent rows; here
one untimed gather does). Prints a table; writes bench/results/engine_overhead.json.

    python bench/engine_overhead.py [--steps 400] [--batch 256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from types import SimpleNamespace

from atom_stream.config import EngineConfig, ModelConfig
from atom_stream.engine.llm_engine import LLMEngine
from atom_stream.engine.model_runner import BlockTableRows, ModelRunner
from atom_stream.engine.sequence import ScheduledBatch, StepOutput
from atom_stream.models.demo import DEMO_CONFIG
from atom_stream.sampling_params import SamplingParams

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
from test_build_inputs_incremental import build_inputs_ref  # the old (from-scratch) code


class NoopRunner:
    """The ModelRunner contract with no model: printable byte tokens, never EOS."""

    def __init__(self, num_kv_blocks: int, max_position: int):
        self.model_config = ModelConfig.from_dict(
            {**DEMO_CONFIG, "max_position_embeddings": max_position})
        self.num_kv_blocks = num_kv_blocks
        self.k = 0

    def execute(self, batch: ScheduledBatch) -> StepOutput:
        self.k += 1
        n = sum(batch.sample)
        return StepOutput(token_ids=[97 + (self.k + i) % 26 for i in range(n)])

    def shutdown(self) -> None:
        pass


def load_tokenizer():
    try:
        import atom_stream.detokenizer  # noqa: F401
        from atom_stream.tokenizer import load_tokenizer as load
    except ImportError:
        return None
    return load(None)


def run_scenario(name: str, tokenizer, stop: list[str], batch: int, steps: int,
                 block_size: int = 16, prompt_len: int = 128) -> dict:
    tokens_per_seq = prompt_len + steps + 8
    blocks = batch * (-(-tokens_per_seq // block_size)) + 16
    cfg = EngineConfig(model="demo", block_size=block_size, max_num_seqs=batch,
                       max_num_batched_tokens=max(8192, batch * prompt_len),
                       num_kv_blocks=blocks, max_model_len=max(4096, tokens_per_seq))
    engine = LLMEngine(cfg, runner=NoopRunner(blocks, cfg.max_model_len), tokenizer=tokenizer,
                       skip_tokenizer_init=tokenizer is None)
    prep = SimpleNamespace(block_size=block_size, scratch_block=blocks, graphs=None)
    params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True, stop=stop)
    for i in range(batch):
        engine.add_request(f"r{i}", [(i * 31 + j) % 250 for j in range(prompt_len)], params)
    engine.step()  # the prefill step (not measured): every request now decodes
    assert engine.scheduler.num_running == batch
    prep._block_rows = BlockTableRows(blocks)
    prep._block_rows.gather(engine.scheduler.running)  # what the prefill's build_inputs did
    t_sched, t_prep, t_old, t_post = [], [], [], []
    pc = time.perf_counter_ns
    cpu0 = time.thread_time_ns()
    cpu_ref = 0
    for _ in range(steps):
        t0 = pc()
        b = engine.schedule()
        t1 = pc()
        new = ModelRunner.build_inputs(prep, b)
        t2 = pc()
        t_prep.append((t2 - t1) / 1e3)
        c0 = time.thread_time_ns()  # the old prepare and the check stay out of the step's cost
        old = build_inputs_ref(prep, b)
        t_old.append((pc() - t2) / 1e3)
        assert new == old, "incremental build_inputs differs from the reference"
        cpu_ref += time.thread_time_ns() - c0
        out = engine.execute(b)
        t3 = pc()
        engine.postprocess(b, out)
        t4 = pc()
        assert len(b.seqs) == batch and b.num_decodes == batch
        t_sched.append((t1 - t0) / 1e3)
        t_post.append((t4 - t3) / 1e3)
    cpu_us = (time.thread_time_ns() - cpu0 - cpu_ref) / 1e3 / steps
    totals = [a + b + c for a, b, c in zip(t_sched, t_prep, t_post)]

    def summary(xs: list[float]) -> dict:
        xs = sorted(xs)
        return {"mean": statistics.fmean(xs), "p50": xs[len(xs) // 2],
                "p99": xs[min(len(xs) - 1, int(len(xs) * 0.99))]}

    return {"scenario": name, "batch": batch, "steps": steps,
            "prompt_len": prompt_len, "block_size": block_size,
            "schedule_us": summary(t_sched), "prepare_us": summary(t_prep),
            "prepare_old_us": summary(t_old),
            "postprocess_us": summary(t_post), "total_us": summary(totals),
            "thread_cpu_us_per_step": cpu_us}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    tok = load_tokenizer()
    scenarios = [("token ids only", None, [])]
    if tok is not None:
        scenarios += [("detokenize", tok, []), ("detokenize + 2 stop strings", tok,
                                                ["\n\n", "</answer>"])]
    results = [run_scenario(n, t, s, args.batch, args.steps) for n, t, s in scenarios]
    results.append(run_scenario("8K context, token ids only", None, [], args.batch, args.steps,
                                prompt_len=8192))
    print(f"engine overhead per decode step, {args.batch} running requests "
          f"(µs, mean / p50 / p99)")
    keys = ("schedule_us", "prepare_us", "postprocess_us", "total_us", "prepare_old_us")
    hdr = f"{'scenario':30s} {'schedule':>18s} {'prepare':>18s} {'postprocess':>18s} " \
          f"{'total':>18s} {'prepare (old)':>18s}"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        cells = [r[k] for k in keys]
        print(f"{r['scenario']:30s} " + " ".join(
            f"{c['mean']:6.0f}/{c['p50']:5.0f}/{c['p99']:5.0f}" for c in cells))
    if tok is None:
        print("(atom_stream.tokenizer/detokenizer not importable: text scenarios skipped)")
    out = {"target_us": 1000, "python": platform.python_version(),
           "machine": platform.machine(), "cpu_count": os.cpu_count(), "results": results}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", "engine_overhead.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
