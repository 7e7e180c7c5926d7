"""The step broadcast codec (engine/step_codec.py): every decoder rebuilds byte-identical
StepInputs over random sequences of steps (rows appended, dropped, reordered, preempted, widths
changing, empty batches), deltas are actually used in steady decode, and a decoder that missed a
message refuses the next delta instead of building a wrong table."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atom_stream.engine.model_runner import StepInputs
from atom_stream.engine.step_codec import CodecError, StepDecoder, StepEncoder

SCRATCH = 10_000


class _Seq:
    """Stands in for engine Sequence objects: identity is what the encoder keys rows on."""

    def __init__(self, blocks: list[int]):
        self.table = blocks


def _inputs(seqs: list[_Seq], extra_cols: int, rng: np.random.Generator) -> StepInputs:
    S = len(seqs)
    M = max([len(s.table) for s in seqs] + [1]) + extra_cols
    tables = np.full((S, M), SCRATCH, dtype=np.int32)
    for i, s in enumerate(seqs):
        tables[i, :len(s.table)] = s.table
    return StepInputs(
        ids=rng.integers(0, 320, S, dtype=np.int64).tobytes(),
        positions=rng.integers(0, 1 << 16, S, dtype=np.int64).tobytes(),
        slots=rng.integers(0, 1 << 20, S, dtype=np.int64).tobytes(),
        qsl=list(range(S + 1)), seq_lens=[16 * len(s.table) for s in seqs], num_decodes=S,
        tables=tables.tobytes(), max_blocks=M, logit_rows=list(range(S)),
        prompt_ranges=[], use_graph=bool(rng.integers(2)))


def _evolve(seqs: list[_Seq], rng: np.random.Generator, max_rows: int) -> list[_Seq]:
    """One scheduler step's worth of change, with rare events made frequent."""
    out = []
    for s in seqs:
        r = rng.random()
        if r < 0.05:
            continue  # finished
        if r < 0.08:
            s.table = [int(b) for b in rng.integers(0, SCRATCH, rng.integers(1, 40))]  # preempted
        elif r < 0.25:
            s.table = s.table + [int(rng.integers(0, SCRATCH))]  # a new block
        elif r < 0.27 and s.table:
            s.table = s.table[:-1] + [int(rng.integers(0, SCRATCH))]  # a block replaced
        out.append(s)
    while len(out) < max_rows and rng.random() < 0.3:
        pos = int(rng.integers(0, len(out) + 1))
        out.insert(pos, _Seq([int(b) for b in rng.integers(0, SCRATCH, rng.integers(1, 60))]))
    if rng.random() < 0.05:
        rng.shuffle(out)
    if rng.random() < 0.03:
        out = []
    return out


def _run(seed: int, steps: int, max_rows: int, keyed: bool) -> tuple[int, int]:
    """Encode a random step sequence; two decoders must rebuild every step exactly. Returns
    (bytes sent, bytes a full-table encoding would have sent)."""
    rng = np.random.default_rng(seed)
    enc, full_enc = StepEncoder(), StepEncoder()
    decs = [StepDecoder(), StepDecoder()]
    seqs = [_Seq([int(b) for b in rng.integers(0, SCRATCH, rng.integers(1, 50))])
            for _ in range(int(rng.integers(0, max_rows)))]
    sent = full = 0
    for _ in range(steps):
        inp = _inputs(seqs, int(rng.integers(0, 3)) if rng.random() < 0.1 else 0, rng)
        data = enc.encode(inp, seqs if keyed else None)
        full_enc.reset()
        full += len(full_enc.encode(inp))
        sent += len(data)
        for dec in decs:
            got = dec.decode(data)
            assert got == inp
            assert got.tables == inp.tables and type(got.tables) is bytes
        seqs = _evolve(seqs, rng, max_rows)
    for dec in decs:
        assert dec.decode(enc.encode_shutdown()) is None
    return sent, full


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), keyed=st.booleans())
def test_random_step_sequences_round_trip(seed, keyed):
    _run(seed, steps=40, max_rows=64, keyed=keyed)


def test_steady_decode_sends_far_less_than_full_tables():
    """64 decodes at 64 blocks: a row gains a block every ~16 steps, one finishes and a new one
    arrives every ~8 steps. The deltas must be a small fraction of the tables."""
    rng = np.random.default_rng(7)
    seqs = [_Seq([int(b) for b in rng.integers(0, SCRATCH, 64)]) for _ in range(64)]
    enc, dec = StepEncoder(), StepDecoder()
    sent = full = 0
    for step in range(80):
        inp = _inputs(seqs, 0, rng)
        data = enc.encode(inp, seqs)
        assert dec.decode(data) == inp
        if step:
            sent += len(data)
            full += len(StepEncoder().encode(inp))
        for s in seqs:
            if rng.random() < 1 / 16:
                s.table = s.table + [int(rng.integers(0, SCRATCH))]
        if rng.random() < 1 / 8:
            del seqs[int(rng.integers(0, len(seqs)))]
            seqs.append(_Seq([int(b) for b in rng.integers(0, SCRATCH, 64)]))
    assert sent < full / 4, (sent, full)


def test_row_dropped_in_the_middle_is_matched_by_identity():
    """Without row identities the rows after a finished one look shifted (a near-full resend);
    with them only the new block is patched."""
    rng = np.random.default_rng(1)
    seqs = [_Seq(list(range(i * 100, i * 100 + 64))) for i in range(64)]
    first = _inputs(seqs, 0, rng)
    keyed, positional, dec = StepEncoder(), StepEncoder(), StepDecoder()
    dec.decode(keyed.encode(first, seqs))
    positional.encode(first)
    del seqs[3]
    seqs[10].table = seqs[10].table + [7]
    inp = _inputs(seqs, 0, rng)
    data = keyed.encode(inp, seqs)
    assert dec.decode(data) == inp
    assert len(data) < len(positional.encode(inp)) / 4


def test_decoder_that_missed_a_message_raises():
    rng = np.random.default_rng(2)
    seqs = [_Seq(list(range(i * 100, i * 100 + 64))) for i in range(32)]
    enc, dec = StepEncoder(), StepDecoder()
    dec.decode(enc.encode(_inputs(seqs, 0, rng), seqs))
    enc.encode(_inputs(seqs, 0, rng), seqs)  # lost on the way
    seqs[0].table = seqs[0].table + [5]
    with pytest.raises(CodecError):
        dec.decode(enc.encode(_inputs(seqs, 0, rng), seqs))
    enc.reset()  # after a reset the next message is whole and resynchronizes
    inp = _inputs(seqs, 0, rng)
    assert dec.decode(enc.encode(inp, seqs)) == inp
