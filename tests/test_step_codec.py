"""The step broadcast codec (engine/step_codec.py): decoders rebuild byte-identical StepInputs,
whose tables also equal the sequences' block tables flattened from scratch, over fresh-random
churn (appends, finishes, BlockManager-style free + re-allocation, new lists, rows leaving and
rejoining the batch, reordering, duplicates, prefill chunks, sweeps, table growth, gathers
that are never broadcast, encoder resets, whole-table messages); a decoder that missed a message refuses every delta until a
snapshot instead of building a wrong table; the debug checks catch writes the codec was not
told about and tables changed outside the BlockTableRows contract; steady decode sends only the
changed cells; and a real LLMEngine workload (preemption, prefix hits, chunked prefill) through
ModelRunner.build_inputs round-trips at every step."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
from engine_fakes import FakeKVRunner

from atom_stream.config import EngineConfig
from atom_stream.engine.block_rows import BlockTableRows
from atom_stream.engine.llm_engine import LLMEngine
from atom_stream.engine.model_runner import ModelRunner, StepInputs
from atom_stream.engine.step_codec import CodecError, StepDecoder, StepEncoder
from atom_stream.sampling_params import SamplingParams

SEED = random.SystemRandom().randrange(2**32)  # fresh every run; in every assertion message
PAD = 10_000


class _Seq:
    """What BlockTableRows reads of an engine Sequence (keyed by identity)."""

    __slots__ = ("block_table", "is_finished", "table_epoch")

    def __init__(self, blocks: list[int]):
        self.block_table, self.table_epoch, self.is_finished = blocks, 0, False


def _blocks(rng: random.Random, lo: int, hi: int) -> list[int]:
    return [rng.randrange(PAD) for _ in range(rng.randint(lo, hi))]


def _reference(batch: list[_Seq]) -> tuple[bytes, int]:
    """The tables flattened from scratch (what build_inputs_ref would send) and max_blocks."""
    M = max([len(s.block_table) for s in batch] + [1])
    t = np.full((len(batch), M), PAD, dtype=np.int32)
    for i, s in enumerate(batch):
        t[i, :len(s.block_table)] = s.block_table
    return t.tobytes(), M


def _inputs(rows: BlockTableRows, batch: list[_Seq], rng: random.Random,
            decode: float = 0.6) -> StepInputs:
    """StepInputs as build_inputs makes them: decode-only (iota lists; probability `decode`) or
    with prefill chunks."""
    tables, M = rows.gather(batch)
    S = len(batch)
    news = [1] * S if rng.random() < decode else [rng.randint(1, 5) for _ in range(S)]
    qsl = [0]
    for n in news:
        qsl.append(qsl[-1] + n)
    T = qsl[-1]
    sample = [n == 1 or rng.random() < 0.5 for n in news]
    return StepInputs(
        ids=np.array([rng.randrange(320) for _ in range(T)], np.int64).tobytes(),
        positions=np.arange(T, dtype=np.int64).tobytes(),
        slots=np.array([rng.randrange(1 << 20) for _ in range(T)], np.int64).tobytes(),
        qsl=qsl, seq_lens=[16 * len(s.block_table) for s in batch],
        num_decodes=sum(n == 1 for n in news), tables=tables.tobytes(), max_blocks=M,
        logit_rows=[qsl[i + 1] - 1 for i in range(S) if sample[i]],
        prompt_ranges=[(0, 0, 1)] if S and news[0] > 1 and rng.random() < 0.3 else [],
        use_graph=rng.random() < 0.5)


def _churn(batch: list[_Seq], waiting: list[_Seq], rng: random.Random, max_rows: int) -> list:
    """One scheduler step's worth of table changes, rare events made frequent."""
    out = []
    for s in batch:
        r = rng.random()
        if r < 0.04:
            s.is_finished = True  # finished: leaves for good (the sweep frees its row)
            continue
        if r < 0.08:  # preempted: BlockManager.free clears the same list, bumps the epoch
            s.block_table.clear()
            s.table_epoch += 1
            waiting.append(s)
            continue
        if r < 0.10:
            s.block_table = _blocks(rng, 0, 30)  # a new list (tests and tools do this)
        elif r < 0.35:
            s.block_table += _blocks(rng, 1, 3)  # decode boundary or a prefill chunk
        elif r < 0.37:  # off the batch for a while without a free (budget), comes back
            waiting.append(s)
            continue
        out.append(s)
    for s in list(waiting):  # re-admitted: re-allocated, maybe longer, other ids
        if rng.random() < 0.3:
            waiting.remove(s)
            s.block_table += _blocks(rng, 0, 40)
            out.insert(rng.randint(0, len(out)), s)
    while len(out) < max_rows and rng.random() < 0.3:
        out.append(_Seq(_blocks(rng, 1, 50)))
    if rng.random() < 0.05:
        rng.shuffle(out)
    if out and rng.random() < 0.02:
        out.append(rng.choice(out))  # a row listed twice
    if rng.random() < 0.02:
        waiting.extend(s for s in out if s not in waiting)
        out = []
    return out


def _run(seed: int, steps: int = 60, max_rows: int = 48) -> dict:
    """Encode a random step stream; two decoders must rebuild every step exactly (equal to the
    from-scratch tables too), a lossy third one must raise or be exact."""
    rng = random.Random(seed)
    rows = BlockTableRows(PAD, rows=rng.randint(1, 4), width=rng.randint(1, 4))
    rows.SWEEP = rng.choice([1, 3, 32])
    enc = StepEncoder(min_delta_cells=rng.choice([0, 0, 64]), check=rng.random() < 0.5)
    decs, lossy = [StepDecoder(), StepDecoder()], StepDecoder()
    lossy_ok, stats = True, {"delta": 0, "refused": 0, "resync": 0}
    batch, waiting = [_Seq(_blocks(rng, 1, 50)) for _ in range(rng.randint(0, max_rows))], []
    for step in range(steps):
        what = f"seed {seed} step {step} (SEED={SEED})"
        inp = _inputs(rows, batch, rng)
        assert (inp.tables, inp.max_blocks) == _reference(batch), what
        if rng.random() < 0.03:
            enc.reset()
        n_delta = enc.num_delta
        data = enc.encode(inp, None if rng.random() < 0.04 else rows)
        is_delta = enc.num_delta > n_delta
        stats["delta"] += is_delta
        for dec in decs:
            got = dec.decode(data)
            assert got == inp and type(got.tables) is bytes, what
        if rng.random() < 0.05:
            lossy_ok = False  # this message never reaches the lossy decoder
        elif not lossy_ok and is_delta:
            with pytest.raises(CodecError):
                lossy.decode(data)
            stats["refused"] += 1
        else:
            assert lossy.decode(data) == inp, what
            stats["resync"] += not lossy_ok
            lossy_ok = True
        batch = _churn(batch, waiting, rng, max_rows)
        while rng.random() < 0.15:  # a gather whose step is never broadcast (a failed launch)
            rows.gather(batch)
            batch = _churn(batch, waiting, rng, max_rows)
    for dec in decs:
        assert dec.decode(enc.encode_shutdown()) is None
    return stats


def test_random_churn_round_trips_and_lost_messages_are_refused():
    totals: dict[str, int] = {}
    for i in range(40):  # ~1 s
        for k, v in _run(SEED + i).items():
            totals[k] = totals.get(k, 0) + v
    for k in ("delta", "refused", "resync"):  # every path was exercised
        assert totals[k] > 0, (k, totals, SEED)


def test_steady_decode_sends_only_the_changed_cells():
    """64 decodes at ~64 blocks: a row gains a block every ~16 steps, one finishes and a new one
    joins every ~8 steps. Every message after the first is a delta of the changed cells plus
    the rest of StepInputs (~2.5 KB: ids, positions, slots, seq_lens, batch rows), not the
    16 KB table, and decodes exactly."""
    rng = random.Random(SEED)
    rows = BlockTableRows(PAD)
    batch = [_Seq(_blocks(rng, 60, 64)) for _ in range(64)]
    enc, dec = StepEncoder(), StepDecoder()
    sizes = []
    for step in range(80):
        inp = _inputs(rows, batch, rng, decode=1.0)
        data = enc.encode(inp, rows)
        assert dec.decode(data) == inp, SEED
        sizes.append(len(data))
        for s in batch:
            if rng.random() < 1 / 16:
                s.block_table.append(rng.randrange(PAD))
        if step % 8 == 7:
            batch.pop(rng.randrange(len(batch))).is_finished = True
            batch.append(_Seq(_blocks(rng, 60, 64)))
    assert enc.num_delta == 79 and enc.num_full == 1
    assert max(sizes[1:]) < 2_600 + 64 * 4 + 16 * 4 < len(inp.tables) / 4, (sizes, SEED)


def test_decoder_that_missed_a_message_raises_until_a_snapshot():
    rng = random.Random(SEED)
    rows = BlockTableRows(PAD)
    batch = [_Seq(_blocks(rng, 10, 20)) for _ in range(8)]
    enc, dec, fresh = StepEncoder(), StepDecoder(), StepDecoder()
    dec.decode(enc.encode(_inputs(rows, batch, rng), rows))
    enc.encode(_inputs(rows, batch, rng), rows)  # lost on the way
    batch[0].block_table.append(5)
    for _ in range(2):
        data = enc.encode(_inputs(rows, batch, rng), rows)
        with pytest.raises(CodecError, match="epoch"):
            dec.decode(data)
        with pytest.raises(CodecError, match="none"):  # a decoder with no mirror at all
            fresh.decode(data)
    enc.reset()  # after a reset the next message is a snapshot and resynchronizes everyone
    inp = _inputs(rows, batch, rng)
    data = enc.encode(inp, rows)
    assert dec.decode(data) == inp and fresh.decode(data) == inp


def test_patch_of_a_row_that_grew_and_shrank_between_messages():
    """The decoder patches its last tables in place while the batch rows and max_blocks repeat;
    a row that grew past max_blocks in a gather that was never broadcast, then was freed and
    re-allocated shorter, has changed cells past max_blocks that must not land in its
    neighbour's row."""
    rows = BlockTableRows(PAD)
    a, b = _Seq([1, 2, 3, 4, 5]), _Seq([6, 7, 8, 9, 10])
    rng = random.Random(SEED)
    enc, dec = StepEncoder(), StepDecoder()
    dec.decode(enc.encode(_inputs(rows, [a, b], rng, decode=1.0), rows))
    a.block_table += [11, 12, 13, 14, 15]
    rows.gather([a, b])  # never broadcast
    a.block_table.clear()
    a.table_epoch += 1
    a.block_table += [21, 22, 23, 24, 25]
    inp = _inputs(rows, [a, b], rng, decode=1.0)
    assert inp.max_blocks == 5
    assert dec.decode(enc.encode(inp, rows)) == inp


def test_snapshot_after_a_lost_message_rebuilds_the_tables():
    """A decoder that missed a message in which a row shrank (freed, re-allocated shorter) may
    hold stale cells past the row's new end; the snapshot after the encoder's reset lists only
    live prefixes, so the decoder must rebuild its tables, not patch its old ones."""
    rows = BlockTableRows(PAD)
    a, b = _Seq(list(range(10))), _Seq(list(range(20, 30)))
    rng = random.Random(SEED)
    enc, dec = StepEncoder(), StepDecoder()
    dec.decode(enc.encode(_inputs(rows, [a, b], rng, decode=1.0), rows))
    a.block_table.clear()
    a.table_epoch += 1
    a.block_table += [40, 41, 42]
    enc.encode(_inputs(rows, [a, b], rng, decode=1.0), rows)  # lost on the way
    enc.reset()
    inp = _inputs(rows, [a, b], rng, decode=1.0)
    assert dec.decode(enc.encode(inp, rows)) == inp


def test_a_replaced_dirty_dict_forces_a_snapshot():
    """The encoder trusts only the dirty dict it installed: if something else takes or replaces
    it (a second encoder on the same source), the next message is a snapshot, never a delta
    with the changes missing."""
    rng = random.Random(SEED)
    rows = BlockTableRows(PAD)
    batch = [_Seq(_blocks(rng, 4, 8)) for _ in range(6)]
    enc, other, dec = StepEncoder(), StepEncoder(), StepDecoder()
    dec.decode(enc.encode(_inputs(rows, batch, rng), rows))
    batch[3].block_table.append(1)
    other.encode(_inputs(rows, batch, rng), rows)  # takes the write to row 3
    batch[4].block_table.append(2)
    inp = _inputs(rows, batch, rng)
    assert dec.decode(enc.encode(inp, rows)) == inp
    assert (enc.num_delta, enc.num_full) == (0, 2)


def test_check_mode_catches_writes_the_codec_was_not_told_about():
    """The codec relies on BlockTableRows recording every write to its table. With the debug
    check on, a write behind its back (here: directly into the table) is a CodecError on the
    decoder; without the check the decoder would hand out rank 0's old cell."""
    rng = random.Random(SEED)
    for check in (True, False):
        rows = BlockTableRows(PAD)
        batch = [_Seq(_blocks(rng, 4, 8)) for _ in range(4)]
        enc, dec = StepEncoder(check=check), StepDecoder()
        dec.decode(enc.encode(_inputs(rows, batch, rng), rows))
        rows.table[rows.last_idx[2], 1] = 77  # not recorded in rows.dirty
        batch[2].block_table[1] = 77
        inp = _inputs(rows, batch, rng)
        data = enc.encode(inp, rows)
        if check:
            with pytest.raises(CodecError, match="CRC"):
                dec.decode(data)
        else:
            assert dec.decode(data).tables != inp.tables


def test_block_rows_check_catches_tables_changed_in_place():
    """A block replaced in place without BlockManager.free's epoch bump breaks the contract
    the incremental tables (and so the codec) rely on: the debug check raises."""
    rows = BlockTableRows(PAD)
    rows.check = True
    s = _Seq([1, 2, 3])
    rows.gather([s])
    s.block_table.append(4)
    rows.gather([s])  # an append: fine
    s.block_table[1] = 9
    with pytest.raises(AssertionError, match="changed other than by append"):
        rows.gather([s])


def test_malformed_sync_is_refused():
    rng = random.Random(SEED)
    rows = BlockTableRows(PAD)
    batch = [_Seq(_blocks(rng, 4, 8)) for _ in range(4)]
    enc, dec = StepEncoder(), StepDecoder()
    dec.decode(enc.encode(_inputs(rows, batch, rng), rows))
    batch[1].block_table.append(3)
    inp = _inputs(rows, batch, rng)
    rows.last_idx = rows.last_idx[::-1].copy() + 100  # rows the mirror does not have
    with pytest.raises(CodecError, match="malformed"):
        dec.decode(enc.encode(inp, rows))
    with pytest.raises(CodecError, match="source gathered"):
        enc.encode(_inputs(rows, batch, rng), BlockTableRows(PAD))  # not the source: 0 rows


class _CodecRunner(FakeKVRunner):
    """FakeKVRunner that, at every launch, builds the real step inputs (ModelRunner.build_inputs
    over a persistent BlockTableRows), encodes them and checks two decoders."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.prep = SimpleNamespace(block_size=self.block_size, graphs=None,
                                    scratch_block=self.num_kv_blocks)
        self.enc, self.decs, self.errors = StepEncoder(), [StepDecoder(), StepDecoder()], []

    def launch(self, batch, prev=None):
        inp = ModelRunner.build_inputs(self.prep, batch)
        data = self.enc.encode(inp, self.prep._block_rows)
        for dec in self.decs:
            if dec.decode(data) != inp:
                self.errors.append(f"step {self.steps} (SEED={SEED})")
        return super().launch(batch, prev)


def test_engine_workload_round_trips_through_build_inputs():
    rng = random.Random(SEED)
    totals = {"steps": 0, "delta": 0, "preemptions": 0}
    for i in range(6):
        bs = rng.choice([2, 4, 8])
        blocks = rng.randint(80, 160) // bs + 2  # tiny pool: preemption is frequent
        runner = _CodecRunner(blocks, bs, eos_every=rng.choice([0, 13]),
                              pipelined=rng.random() < 0.5)
        # drawn in the old order; max_num_seqs capped by the step budget (EngineConfig
        # refuses more, as vLLM)
        seqs, budget = rng.randint(3, 12), rng.choice([8, 16, 40])
        cfg = EngineConfig(model="demo", block_size=bs, num_kv_blocks=blocks,
                           max_num_seqs=min(seqs, budget), max_model_len=80,
                           max_num_batched_tokens=budget)
        engine = LLMEngine(cfg, runner=runner, skip_tokenizer_init=True)
        prefix = [rng.randrange(256) for _ in range(24)]
        for j in range(20):
            ids = (prefix if j % 2 else []) + [rng.randrange(256) for _ in range(rng.randint(1, 30))]
            engine.add_request(f"q{i}-{j}", ids, SamplingParams(max_tokens=rng.randint(1, 30)))
        while engine.has_unfinished_requests():
            assert all(o.error is None for o in engine.step()), (runner.errors, SEED)
        assert not runner.errors, runner.errors[:3]
        totals["steps"] += runner.enc.epoch
        totals["delta"] += runner.enc.num_delta
        totals["preemptions"] += engine.scheduler.num_preemptions
    assert totals["delta"] >= totals["steps"] - 6 and totals["preemptions"] > 0, (totals, SEED)
