"""Incremental block tables in ModelRunner.build_inputs (BlockTableRows) give StepInputs
byte-identical to the from-scratch reference `build_inputs_ref` (the old code, kept here; the
engine-overhead bench times both) at every step of random engine runs: a tiny pool (preemption,
re-admission with a longer table), aborts, prefix-cache hits, chunked prefill, async scheduling
on and off, several block sizes; plus targeted BlockTableRows cases (a reset that regrows longer
before the next gather, a reassigned table list, row/width growth, the sweep) and the real demo
ModelRunner with prompt logprobs."""

from __future__ import annotations

import random
from itertools import chain
from types import SimpleNamespace

import msgspec
import numpy as np
import pytest
from engine_fakes import FakeKVRunner

from atom_stream.config import EngineConfig
from atom_stream.engine.block_manager import BlockManager
from atom_stream.engine.llm_engine import LLMEngine
from atom_stream.engine.model_runner import BlockTableRows, ModelRunner, StepInputs
from atom_stream.engine.sequence import ScheduledBatch, Sequence, SequenceStatus
from atom_stream.sampling_params import SamplingParams


def build_inputs_ref(self, batch: ScheduledBatch) -> StepInputs:
    """The from-scratch build_inputs (before BlockTableRows), verbatim: every block table is
    flattened again each step. `self`: a ModelRunner or a namespace with block_size,
    scratch_block and graphs. The reference the incremental build_inputs must equal."""
    bs = self.block_size
    seqs = batch.seqs
    S = len(seqs)
    news = np.asarray(batch.num_new_tokens, dtype=np.int64)
    starts = np.fromiter((s.num_computed_tokens for s in seqs), np.int64, S)
    ends = starts + news
    qsl_arr = np.zeros(S + 1, dtype=np.int64)
    np.cumsum(news, out=qsl_arr[1:])
    T = int(qsl_arr[-1])
    if batch.num_decodes == S:  # decode-only: one token per sequence
        ids_arr = np.fromiter((s.token_ids[s.num_computed_tokens] for s in seqs), np.int64, S)
    else:
        ids_arr = np.fromiter(chain.from_iterable(
            s.token_ids[a:a + n] for s, a, n in zip(seqs, starts.tolist(), batch.num_new_tokens)),
            np.int64, T)
    lens = np.fromiter((len(s.block_table) for s in seqs), np.int64, S)
    max_blocks = int(lens.max()) if S else 1
    max_blocks = max(max_blocks, 1)
    flat = np.fromiter(chain.from_iterable(s.block_table for s in seqs), np.int32,
                       int(lens.sum()))
    tables = np.full((S, max_blocks), self.scratch_block, dtype=np.int32)
    row = np.repeat(np.arange(S), lens)
    col = np.arange(flat.shape[0]) - np.repeat(np.cumsum(lens) - lens, lens)
    tables[row, col] = flat
    seq_of_tok = np.repeat(np.arange(S), news)
    positions_arr = np.arange(T, dtype=np.int64) - np.repeat(qsl_arr[:-1], news) + \
        np.repeat(starts, news)
    slots_arr = tables[seq_of_tok, positions_arr // bs].astype(np.int64) * bs + positions_arr % bs
    qsl = qsl_arr.tolist()
    seq_lens = ends.tolist()
    rows = [qsl[i + 1] - 1 for i, s in enumerate(batch.sample) if s]
    prompt_ranges = []
    for i, seq in enumerate(batch.seqs):
        if seq.params.prompt_logprobs is None or i < batch.num_decodes:
            continue
        n = min(batch.num_new_tokens[i], seq.num_prompt_tokens - 1 - seq.num_computed_tokens)
        if n > 0:
            prompt_ranges.append((i, qsl[i], n))
    use_graph = (self.graphs is not None and batch.num_decodes == len(batch.seqs)
                 and len(batch.seqs) <= self.graphs.max_batch and not prompt_ranges)
    return StepInputs(
        ids=ids_arr.tobytes(), positions=positions_arr.tobytes(), slots=slots_arr.tobytes(),
        qsl=qsl, seq_lens=seq_lens,
        num_decodes=batch.num_decodes, tables=tables.tobytes(), max_blocks=max_blocks,
        logit_rows=rows, prompt_ranges=prompt_ranges, use_graph=use_graph)


SEED = random.SystemRandom().randrange(2**32)  # fresh every run; printed on failure
ENC = msgspec.msgpack.Encoder()


def check_same(prep, batch: ScheduledBatch, what: str) -> StepInputs:
    """build_inputs (incremental) and build_inputs_ref on the same state: byte-identical."""
    got = ModelRunner.build_inputs(prep, batch)
    want = build_inputs_ref(prep, batch)
    for f in StepInputs.__struct_fields__:
        assert getattr(got, f) == getattr(want, f), f"{what}: field {f} differs (SEED={SEED})"
    assert ENC.encode(got) == ENC.encode(want), f"{what} (SEED={SEED})"
    return got


class CheckingRunner(FakeKVRunner):
    """FakeKVRunner that, whenever it reads the sequences (launch), builds the step inputs both
    ways and asserts they agree; counts resets whose table regrew past the synced copy."""

    def __init__(self, *args, sweep: int = 32, **kw):
        super().__init__(*args, **kw)
        self.prep = SimpleNamespace(block_size=self.block_size, graphs=None,
                                    scratch_block=self.num_kv_blocks)
        self.prep._block_rows = BlockTableRows(self.num_kv_blocks)
        self.prep._block_rows.SWEEP = sweep
        self.checked = 0
        self.errors: list[AssertionError] = []
        self.regrown = 0  # resets (epoch) whose table regrew past the stale copy, ids changed

    def launch(self, batch: ScheduledBatch, prev=None):
        rows = self.prep._block_rows
        for s in batch.seqs:
            e = rows.entries.get(s)
            if (e is not None and e.epoch != s.table_epoch and len(s.block_table) > e.synced
                    and rows.table[e.row, :e.synced].tolist() != s.block_table[:e.synced]):
                self.regrown += 1  # without the epoch this row would come out wrong
        try:
            check_same(self.prep, batch, f"step {self.steps}")
        except AssertionError as e:  # the engine turns a runner error into failed requests
            self.errors.append(e)
            raise
        self.checked += 1
        return super().launch(batch, prev)


def random_run(seed: int, pipelined: bool) -> dict:
    """One random workload through a real LLMEngine on the checking fake runner."""
    rng = random.Random(seed)
    bs = rng.choice([2, 4, 8, 16])
    blocks = rng.randint(80, 160) // bs + 2  # tiny pool: preemption is frequent
    runner = CheckingRunner(blocks, bs, eos_every=rng.choice([0, 13]), pipelined=pipelined,
                            sweep=rng.choice([1, 3, 32, 32]))
    # drawn in the old order; max_num_seqs capped by the step budget (EngineConfig
    # refuses more, as vLLM)
    seqs, budget = rng.randint(3, 12), rng.choice([8, 16, 40])
    cfg = EngineConfig(model="demo", block_size=bs, num_kv_blocks=blocks,
                       max_num_seqs=min(seqs, budget), max_model_len=80,
                       max_num_batched_tokens=budget)
    engine = LLMEngine(cfg, runner=runner, skip_tokenizer_init=True)
    prefixes = [[rng.randrange(256) for _ in range(rng.randint(8, 40))] for _ in range(3)]
    todo, aborts, steps = 30, 0, 0
    while todo or engine.has_unfinished_requests():
        for _ in range(min(todo, rng.choice([0, 0, 1, 2]))):
            todo -= 1
            head = rng.choice(prefixes) if rng.random() < 0.6 else []
            ids = head + [rng.randrange(256) for _ in range(rng.randint(1, 30))]
            p = SamplingParams(temperature=rng.choice([0.0, 0.8]), seed=rng.randrange(99),
                               max_tokens=rng.randint(1, 30))
            engine.add_request(f"q{todo}", ids, p)
        if engine.requests and rng.random() < 0.08:
            engine.abort(rng.choice(list(engine.requests)))
            aborts += 1
        outs = engine.pipeline.step() if pipelined else engine.step()
        assert all(o.error is None for o in outs), (runner.errors or outs, SEED)
        steps += 1
        assert steps < 5000
    assert not runner.errors, runner.errors[0]
    assert runner.corruptions == 0
    rows = runner.prep._block_rows
    for _ in range(rows.SWEEP):  # idle gathers: the sweep drops every finished sequence
        rows.gather([])
    assert not rows.entries and len(rows.free_rows) == rows.table.shape[0]
    assert (rows.table == blocks).all(), "a freed row kept stale block ids"
    return {"checked": runner.checked, "regrown": runner.regrown, "aborts": aborts,
            "preemptions": engine.scheduler.num_preemptions,
            "prefix_hits": engine.block_manager.prefix_hits,
            "pending": runner.pending_inputs}


@pytest.mark.parametrize("pipelined", [False, True])
def test_random_engine_runs_match_reference(pipelined):
    totals: dict[str, int] = {}
    for i in range(16):  # ~0.5 s; P(no regrown reset in 16 runs) < 1e-6
        for k, v in random_run(SEED + i, pipelined).items():
            totals[k] = totals.get(k, 0) + v
    # the workloads really exercised every path (else the equality above proves little)
    for k in ("checked", "regrown", "aborts", "preemptions", "prefix_hits"):
        assert totals[k] > 0, (k, totals, SEED)
    assert (totals["pending"] > 0) == pipelined, totals


def _batch(seqs: list[Sequence], bs: int = 4) -> ScheduledBatch:
    """A prefill-only batch: each sequence feeds what its table covers past computed tokens."""
    news = [max(1, min(len(s.token_ids), len(s.block_table) * bs) - s.num_computed_tokens)
            for s in seqs]
    return ScheduledBatch(seqs=list(seqs), num_new_tokens=news, sample=[True] * len(seqs))


def _tables(inp: StepInputs) -> list[list[int]]:
    S = len(inp.seq_lens)
    return np.frombuffer(inp.tables, np.int32).reshape(S, inp.max_blocks).tolist()


def test_reset_that_regrows_longer_before_the_next_gather():
    bm = BlockManager(16, 4)
    prep = SimpleNamespace(block_size=4, scratch_block=16, graphs=None)
    a = Sequence("a", list(range(40)), SamplingParams(), 8)
    b = Sequence("b", list(range(40)), SamplingParams(), 8)
    assert bm.allocate(a, 8)
    assert _tables(check_same(prep, _batch([a]), "first"))[0] == [0, 1]
    bm.free(a)  # preempted: the same list object is cleared...
    assert bm.allocate(b, 8)  # ...b takes a's old blocks...
    assert bm.allocate(a, 12)  # ...and a regrows LONGER with other ids before the next gather
    assert a.table_epoch == 1
    inp = check_same(prep, _batch([b, a]), "regrown")
    assert _tables(inp) == [[0, 1, 16], [2, 3, 4]]  # padded with the scratch block


def test_reassigned_or_cleared_tables_and_growth():
    """Tests and tools assign `seq.block_table = [...]`; free clears the list (epoch bump) and it
    regrows to any length. Rows and width grow from a 1x1 start with random appends in random
    batch orders."""
    rng = random.Random(SEED)
    prep = SimpleNamespace(block_size=2, scratch_block=999, graphs=None)
    prep._block_rows = BlockTableRows(999, rows=1, width=1)
    seqs = [Sequence(f"s{i}", list(range(300)), SamplingParams(), 8) for i in range(20)]
    for s in seqs:
        s.block_table = [rng.randrange(999)]
    for step in range(60):
        for s in rng.sample(seqs, 5):
            r = rng.random()
            if r < 0.1:
                s.block_table = [rng.randrange(999) for _ in range(rng.randint(1, 60))]
            elif r < 0.2:  # BlockManager.free, then a new allocation of any length
                s.block_table.clear()
                s.table_epoch += 1
                s.block_table += [rng.randrange(999) for _ in range(rng.randint(0, 40))]
            else:
                s.block_table += [rng.randrange(999) for _ in range(rng.randint(0, 3))]
        check_same(prep, _batch(rng.sample(seqs, rng.randint(1, 20)), 2), f"step {step}")
    shape = prep._block_rows.table.shape
    assert shape[0] >= 20 and shape[1] >= max(len(s.block_table) for s in seqs)


def test_sweep_frees_absent_and_finished_rows_and_reuses_them():
    prep = SimpleNamespace(block_size=4, scratch_block=50, graphs=None)
    rows = prep._block_rows = BlockTableRows(50, rows=2, width=4)
    rows.SWEEP = 2
    a, b, c = (Sequence(n, list(range(20)), SamplingParams(), 8) for n in "abc")
    a.block_table, b.block_table, c.block_table = [1, 2, 3], [4, 5], [6]
    check_same(prep, _batch([a, b]), "ab")
    b.status = SequenceStatus.FINISHED
    check_same(prep, _batch([a]), "a")  # gather 2 sweeps: b finished, its row is free
    assert set(rows.entries) == {a}
    check_same(prep, _batch([c]), "c")  # c reuses b's row: no stale 5 behind its 6
    check_same(prep, _batch([c]), "c again")
    check_same(prep, _batch([c]), "c, sweep")  # a was absent for SWEEP gathers: swept
    assert set(rows.entries) == {c} and rows.table.shape == (2, 4)
    a.block_table.append(7)
    assert _tables(check_same(prep, _batch([a, c]), "a back"))[0] == [1, 2, 3, 7]
    del a.block_table[1:]  # shrunk in place (outside the engine's contract): still detected
    assert _tables(check_same(prep, _batch([c, a]), "a shrunk")) == [[6], [1]]


def test_demo_model_runner_matches_reference_with_prompt_logprobs():
    """The real ModelRunner (demo model, CPU): every build_inputs call inside launch equals
    the reference, sync and async, with chunked prefill and prompt logprobs."""
    rng = random.Random(SEED)
    for pipelined in (False, True):
        engine = LLMEngine(EngineConfig(model="demo", device="cpu", dtype="float32",
                                        async_scheduling=pipelined, block_size=4,
                                        num_kv_blocks=40, max_num_batched_tokens=24),
                           skip_tokenizer_init=True)
        runner = engine.runner
        calls, errors = [], []

        def checked(batch, runner=runner, calls=calls, errors=errors):
            calls.append(1)
            try:
                return check_same(runner, batch, f"demo call {len(calls)}")
            except AssertionError as e:  # the engine would turn it into failed requests
                errors.append(e)
                raise

        runner.build_inputs = checked
        for i in range(6):
            p = SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 12),
                               prompt_logprobs=1 if i % 3 == 0 else None)
            engine.add_request(f"d{i}", [rng.randrange(256) for _ in range(rng.randint(2, 40))],
                               p)
        while engine.has_unfinished_requests():
            outs = engine.pipeline.step() if pipelined else engine.step()
            assert not errors, errors[0]
            assert all(o.error is None for o in outs)
        assert len(calls) > 5
