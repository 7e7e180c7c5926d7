"""Sampler timing: B=256 rows over the full Kimi/DeepSeek vocab (V=163840, sampled after the TP
gather), all-greedy and mixed parameters, float32 and bfloat16 logits.

    python bench/sampler.py [--device cpu|cuda] [--batch 256] [--vocab 163840] [--iters 5]

"peaked" logits look like an LLM's (a few tokens far above a N(0, 2) floor: the kept top-p set is
small); "flat" logits are N(0, 1) everywhere, the worst case for top-p (the kept set is ~half the
vocab, so the candidate policy falls back to a full sort). Prints the median wall time in µs of
SamplingMetadata.from_sequences and of Sampler.__call__ (synchronized on accelerators).
`--penalized-out 200,2000` adds rows where every row has presence / frequency / repetition
penalties and outputs of that length, each step one token longer (the steady state of a
decode: the penalties' token sets are kept per sequence, layers/penalty_tokens.py), and the
first step's cost (the sets built from the whole prompt + output).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from atom_stream.engine.sequence import Sequence
from atom_stream.layers.sampler import Sampler, SamplingMetadata
from atom_stream.sampling_params import SamplingParams

MIXED = [
    dict(temperature=0.0),
    dict(temperature=0.7, top_p=0.9),
    dict(temperature=1.0, top_k=50),
    dict(temperature=0.8, min_p=0.05),
    dict(temperature=1.0),
    dict(temperature=0.6, top_k=40, top_p=0.95, seed=1234),
    dict(temperature=0.7, top_p=0.9, repetition_penalty=1.1, presence_penalty=0.5),
    dict(temperature=0.0, logprobs=5),
]


def make_seqs(B: int, V: int, mixed: bool, prompt_len: int = 1000, out_len: int = 200):
    rng = random.Random(0)
    seqs = []
    for i in range(B):
        params = SamplingParams(**(MIXED[i % len(MIXED)] if mixed else dict(temperature=0.0)))
        s = Sequence(str(i), [rng.randrange(V) for _ in range(prompt_len)], params, 10**6)
        s.token_ids.extend(rng.randrange(V) for _ in range(out_len))
        seqs.append(s)
    return seqs


def make_logits(B: int, V: int, kind: str, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if kind == "flat":
        return torch.randn(B, V, generator=g).to(device)
    x = torch.randn(B, V, generator=g) * 2
    top = torch.randint(0, V, (B, 5), generator=g)
    x.scatter_(1, top, torch.tensor([16.0, 14.0, 13.0, 12.0, 11.0]).expand(B, 5))
    return x.to(device)


def timed(fn, iters: int, device: str) -> tuple[float, float]:
    """Median (wall µs, process CPU µs: all threads, robust to other load on a shared host)."""
    fn()
    wall, cpu = [], []
    for _ in range(iters):
        if device != "cpu":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if device != "cpu":
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall) * 1e6, statistics.median(cpu) * 1e6


def penalized_metadata(B: int, V: int, out_len: int, iters: int, dev: str) -> tuple[float, float]:
    """(first step µs, median later step µs) of from_sequences over B penalized rows."""
    p = SamplingParams(temperature=0.7, presence_penalty=0.5, frequency_penalty=0.2,
                       repetition_penalty=1.1)
    seqs = make_seqs(B, V, False, out_len=out_len)
    for s in seqs:
        s.params = p
    rng = random.Random(1)
    t0 = time.perf_counter()
    SamplingMetadata.from_sequences(seqs, V, torch.device(dev))
    first = (time.perf_counter() - t0) * 1e6
    times = []
    for _ in range(iters):
        for s in seqs:
            s.token_ids.append(rng.randrange(V))
        t0 = time.perf_counter()
        SamplingMetadata.from_sequences(seqs, V, torch.device(dev))
        times.append((time.perf_counter() - t0) * 1e6)
    return first, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=163840)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--penalized-out", default="", help="comma list of output lengths")
    a = ap.parse_args()
    B, V, dev = a.batch, a.vocab, a.device
    print(f"device={dev} B={B} V={V} torch threads={torch.get_num_threads()}")
    for n in (int(x) for x in a.penalized_out.split(",") if x):
        first, step = penalized_metadata(B, V, n, a.iters, dev)
        print(f"penalized  metadata (prompt 1000 + output {n} tokens/row): first step "
              f"{first:10.0f} us, then {step:10.0f} us per step")
    for mixed in (False, True):
        seqs = make_seqs(B, V, mixed)
        md_us, _ = timed(lambda: SamplingMetadata.from_sequences(seqs, V, torch.device(dev)),
                      a.iters, dev)
        md = SamplingMetadata.from_sequences(seqs, V, torch.device(dev))
        name = "mixed" if mixed else "all-greedy"
        print(f"{name:10s} metadata (prompt 1000 + output 200 tokens/row): {md_us:10.0f} us")
        for kind in ("peaked", "flat") if mixed else ("peaked",):
            for dtype in (torch.float32, torch.bfloat16):
                logits = make_logits(B, V, kind, dev).to(dtype)
                # the other policy too (on the CPU only for float32: its full sort is slow)
                other = None if dev == "cpu" else 1024
                pols = ["auto", other] if dtype == torch.float32 else ["auto"]
                for pol in pols:
                    sampler = Sampler(seed=0, candidates=pol)
                    us, cpu = timed(lambda: sampler(logits, md), a.iters, dev)
                    print(f"{name:10s} {kind:6s} {str(dtype)[6:]:8s} candidates={pol!s:5s} "
                          f"sampler: {us:10.0f} us wall {cpu:10.0f} us cpu")


if __name__ == "__main__":
    main()
