"""Test doubles for the engine core tests (scheduler, engine core, AsyncEngine, bench).

`FakeKVRunner` keeps the ModelRunner contract and a fake KV pool: every step writes each fed
token (with its position) into the slot its block table names, and a sampled token is a function
of the context READ BACK from the pool through the block table. So a wrong block table, a bad
prefix-cache hit or a block reused too early changes the output, exactly as it would with a real
model; `corruptions` counts read-backs that disagree with the sequence's tokens. `reference()`
computes what a request must produce alone. Seeded non-greedy requests draw from (seed, output
index, context), like the real sampler.

`ScriptedRunner` emits fixed per-request token scripts (stop strings, UTF-8 tests).

`FakeKVRunner(pipelined=True)` also offers the async-scheduling split (`supports_async`,
`launch(batch, prev)` / `collect(handle)`, see model_runner.py): a decode input that is still a
PLACEHOLDER is taken from `prev`'s sampled ids (a missing or wrong `prev` raises), like the
device gather of the real runner. `execute` is `collect(launch(batch))` in both modes.
"""

from __future__ import annotations

import dataclasses
import threading
import time

from atom_stream.config import ModelConfig
from atom_stream.engine.sequence import PLACEHOLDER, ScheduledBatch, StepOutput
from atom_stream.models.demo import DEMO_CONFIG

DEMO_MODEL_CONFIG = ModelConfig.from_dict(DEMO_CONFIG)
EOS = 257
_M = (1 << 61) - 1


def _mix(*vals: int) -> int:
    h = 0x9E3779B97F4A7C15
    for v in vals:
        h = ((h ^ (v & 0xFFFFFFFFFFFF)) * 0x100000001B3 + 0x632BE59BD9B4E019) % _M
    return h


def next_token(context: list[int], seed: int | None, out_index: int, eos_every: int) -> int:
    h = 0
    for p, t in enumerate(context):
        h = (h * 1000003 + t * 31 + p) % _M
    if seed is not None:
        h = _mix(h, seed, out_index)
    if eos_every and h % eos_every == 0:
        return EOS
    return h % 250  # plain byte ids, never a special token by accident


class FakeHandle:
    """A launched fake step: the sampled ids (`rows`: Sequence -> index) and logprobs."""

    def __init__(self, token_ids: list[int], rows: dict, logprobs: list | None):
        self.token_ids = token_ids
        self.rows = rows
        self.logprobs = logprobs


class FakeKVRunner:
    def __init__(self, num_kv_blocks: int = 64, block_size: int = 16, *, eos_every: int = 0,
                 delay: float = 0.0, max_position: int = 4096, pipelined: bool = False):
        self.model_config = dataclasses.replace(DEMO_MODEL_CONFIG,
                                                max_position_embeddings=max_position)
        self.num_kv_blocks = num_kv_blocks
        self.block_size = block_size
        self.kv: list[tuple[int, int] | None] = [None] * (num_kv_blocks * block_size)
        self.eos_every = eos_every
        self.delay = delay
        self.corruptions = 0
        self.steps = 0
        self.fail_next = 0  # raise in the next N execute() calls
        self.fail_if = None  # callable(batch) -> bool: raise for this batch (in launch)
        self.fail_collect_if = None  # callable(handle) -> bool: raise in collect
        self.supports_async = pipelined
        self.pending_inputs = 0  # decode inputs taken from the previous handle (pipelined)
        self.threads: set[str] = set()
        self.shut = False

    def _seed(self, seq) -> int | None:
        p = seq.params
        if p.temperature < 1e-5:
            return None
        return p.seed if p.seed is not None else 12345

    def execute(self, batch: ScheduledBatch) -> StepOutput:
        return self.collect(self.launch(batch))

    def collect(self, handle: FakeHandle) -> StepOutput:
        self.threads.add(threading.current_thread().name)
        if self.fail_collect_if is not None and self.fail_collect_if(handle):
            raise RuntimeError("injected collect failure")
        return StepOutput(token_ids=list(handle.token_ids), logprobs=handle.logprobs)

    def launch(self, batch: ScheduledBatch, prev: FakeHandle | None = None) -> FakeHandle:
        self.threads.add(threading.current_thread().name)
        self.steps += 1
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("injected step failure")
        if self.fail_if is not None and self.fail_if(batch):
            raise RuntimeError("injected step failure")
        if self.delay:
            time.sleep(self.delay)
        bs = self.block_size
        kv = self.kv
        out = []
        rows = {}
        logprobs = []
        any_lp = False
        for i, (seq, n, sample) in enumerate(zip(batch.seqs, batch.num_new_tokens,
                                                 batch.sample)):
            start = seq.num_computed_tokens
            table = seq.block_table
            assert len(table) * bs >= start + n, "block table too short"
            known = seq.token_ids[:start + n]
            if PLACEHOLDER in known[start:]:  # the previous step's token, "on the device"
                assert i < batch.num_decodes and n == 1, "placeholder outside a decode"
                assert prev is not None, "pending input without the previous handle"
                known[start] = prev.token_ids[prev.rows[seq]]
                self.pending_inputs += 1
            assert PLACEHOLDER not in known, "placeholder in the context"
            for p in range(start, start + n):
                kv[table[p // bs] * bs + p % bs] = (known[p], p)
            if not sample:
                continue
            ctx = [kv[table[p // bs] * bs + p % bs] for p in range(start + n)]
            toks = []
            for p, e in enumerate(ctx):
                if e is None or e[1] != p or e[0] != known[p]:
                    self.corruptions += 1
                toks.append(-1 if e is None else e[0])
            rows[seq] = len(out)
            out.append(next_token(toks, self._seed(seq), seq.num_output_tokens, self.eos_every))
            k = seq.params.logprobs
            if k is not None:
                any_lp = True
                logprobs.append((-0.5, [(out[-1], -0.5)] * k))
            else:
                logprobs.append(None)
        return FakeHandle(out, rows, logprobs if any_lp else None)

    def reference(self, prompt: list[int], max_tokens: int, seed: int | None = None,
                  ignore_eos: bool = False) -> list[int]:
        """The tokens a request produces alone (no engine)."""
        toks = list(prompt)
        outs: list[int] = []
        while len(outs) < max_tokens:
            t = next_token(toks, seed, len(outs), self.eos_every)
            toks.append(t)
            outs.append(t)
            if t == EOS and not ignore_eos:
                break
        return outs

    def shutdown(self) -> None:
        self.shut = True


class ScriptedRunner:
    """Emits `scripts[request_id][k]` as the k-th output token (then EOS)."""

    def __init__(self, scripts: dict[str, list[int]], num_kv_blocks: int = 64,
                 block_size: int = 16):
        self.model_config = DEMO_MODEL_CONFIG
        self.num_kv_blocks = num_kv_blocks
        self.scripts = scripts

    def execute(self, batch: ScheduledBatch) -> StepOutput:
        out = []
        for seq, sample in zip(batch.seqs, batch.sample):
            if sample:
                script = self.scripts[seq.request_id]
                k = seq.num_output_tokens
                out.append(script[k] if k < len(script) else EOS)
        return StepOutput(token_ids=out)

    def shutdown(self) -> None:
        pass


def slow_chat_renders(tok, delay: float) -> list[int]:
    """Make `tok.encode_chat` take `delay` seconds more (a slow chat render, as a big template
    is; the engine renders off the loop); returns a list that gets one entry per render."""
    calls: list[int] = []
    lock, encode_chat = threading.Lock(), tok.encode_chat

    def slow(*a, **kw):
        with lock:
            calls.append(1)
        time.sleep(delay)
        return encode_chat(*a, **kw)

    tok.encode_chat = slow
    return calls
