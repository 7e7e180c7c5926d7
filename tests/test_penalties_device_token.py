"""Penalties over a token still on the device (async scheduling, layers/sampling_metadata.py):
a penalized row whose last token is a PLACEHOLDER gets its value from the previous step's
sampled ids (`prev_ids[prev_rows[seq]]`) and must give BITWISE the logits of the same row with
that token known on the host (the synchronous path). Fresh random rows every run (the seed is
printed on failure); the grammar / multi-token bad-words rule that still needs the host stays
an error."""

from __future__ import annotations

import random

import pytest
import torch

from atom_stream.engine.sequence import PLACEHOLDER, Sequence
from atom_stream.layers.sampler import Sampler, SamplingMetadata, apply_penalties
from atom_stream.sampling_params import SamplingParams

V = 97
PENALTIES = (  # (presence, frequency, repetition): none, each alone, all, negative ones
    (0.0, 0.0, 1.0), (1.5, 0.0, 1.0), (0.0, 0.7, 1.0), (0.0, 0.0, 1.3), (0.9, 0.4, 1.2),
    (-0.5, -0.3, 0.8),
)


def _seq(rid: str, prompt: list[int], output: list[int], pen, **kw) -> Sequence:
    p = SamplingParams(presence_penalty=pen[0], frequency_penalty=pen[1],
                       repetition_penalty=pen[2], **kw)
    s = Sequence(rid, prompt, p, max_tokens=1000)
    s.token_ids.extend(output)
    return s


def _rows(rng: random.Random, n: int):
    """n (prompt, outputs, penalties) rows; the last output repeats an earlier one about half
    of the time (the presence penalty then must not apply twice)."""
    rows = []
    for i in range(n):
        prompt = [rng.randrange(V) for _ in range(rng.randint(1, 12))]
        out = [rng.randrange(8) for _ in range(rng.randint(1, 10))]  # few ids: repeats
        if rng.random() < 0.5 and len(out) > 1:
            out[-1] = rng.choice(out[:-1])
        rows.append((prompt, out, PENALTIES[i % len(PENALTIES)]))
    return rows


@pytest.mark.parametrize("trial", range(4))
def test_device_token_penalties_equal_host_ones_bitwise(trial):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    rows = _rows(rng, 18)
    host = [_seq(f"r{i}", p, o, pen, seed=i) for i, (p, o, pen) in enumerate(rows)]
    # the same rows one step behind: each penalized row's last token is still on the device,
    # at a random row of the previous step's sampled ids (unpenalized rows stay known)
    perm = list(range(len(rows) + 5))
    rng.shuffle(perm)
    prev_ids = torch.tensor([rng.randrange(V) for _ in perm], dtype=torch.int64)
    dev, prev_rows = [], {}
    for i, (p, o, pen) in enumerate(rows):
        s = _seq(f"r{i}", p, o[:-1] if pen != (0.0, 0.0, 1.0) else o, pen, seed=i)
        if pen != (0.0, 0.0, 1.0):
            s.token_ids.append(PLACEHOLDER)
            s.num_placeholders = 1
            prev_rows[s] = perm[i]
            prev_ids[perm[i]] = o[-1]
        dev.append(s)
    md_host = SamplingMetadata.from_sequences(host, V, "cpu")
    md_dev = SamplingMetadata.from_sequences(dev, V, "cpu", prev_ids=prev_ids,
                                             prev_rows=prev_rows)
    assert md_dev.ph_pos is not None and not md_dev.no_penalties
    logits = torch.randn(len(rows), V) * 4
    a, b = logits.clone(), logits.clone()
    apply_penalties(a, md_host)
    apply_penalties(b, md_dev)
    assert not torch.equal(a, logits), seed  # the penalties did something
    assert torch.equal(a, b), (seed, (a != b).nonzero()[:5])
    # and through the sampler: the same seeded picks
    sampler = Sampler(seed=0)
    oa = sampler(logits.clone(), md_host)
    ob = sampler(logits.clone(), md_dev)
    assert torch.equal(oa.token_ids, ob.token_ids), seed


def test_placeholder_without_its_previous_step_is_an_error():
    s = _seq("a", [1, 2], [3], (0.5, 0.0, 1.0))
    s.token_ids.append(PLACEHOLDER)
    s.num_placeholders = 1
    with pytest.raises(ValueError, match="no previous step sampled"):
        SamplingMetadata.from_sequences([s], V, "cpu")
    with pytest.raises(ValueError, match="no previous step sampled"):
        SamplingMetadata.from_sequences([s], V, "cpu", prev_ids=torch.zeros(2, dtype=torch.long),
                                        prev_rows={})



@pytest.mark.parametrize("last, banned", [(4, True), (3, False)])
def test_multi_token_bad_word_reads_the_device_token_on_the_host(last, banned):
    """A multi-token bad word needs the token's value on the host: prev_host() gives it
    (fetched once per step); without prev_host it is an error, never a silent -1."""
    def guarded():
        g = Sequence("g", [1, 2], SamplingParams(bad_words=["x"]), max_tokens=10)
        g.params._bad_words_token_ids = [[4, 5]]
        g.token_ids.extend([7, PLACEHOLDER])
        g.num_placeholders = 1
        return g

    g = guarded()
    with pytest.raises(ValueError, match="still on the device"):
        SamplingMetadata.from_sequences([g], V, "cpu", prev_ids=torch.zeros(1, dtype=torch.long),
                                        prev_rows={g: 0})
    calls = []
    g, h = guarded(), guarded()
    ids = torch.tensor([0, last, last])
    md = SamplingMetadata.from_sequences([g, h], V, "cpu", prev_ids=ids, prev_rows={g: 1, h: 2},
                                         prev_host=lambda: calls.append(1) or ids)
    assert calls == [1]
    want = [5, V + 5] if banned else None
    assert (md.bad_pos.tolist() if md.bad_pos is not None else None) == want
    assert g.token_ids[-1] == PLACEHOLDER  # the sequence itself is not changed


@pytest.mark.parametrize("trial", range(3))
def test_penalty_tokens_follow_the_sequence_incrementally(trial):
    """PenaltyTokens after any mix of one-token steps, bursts (rebuilds) and trailing
    placeholders equals np.unique of the host-known tokens (fresh random walk each run)."""
    import numpy as np

    from atom_stream.layers.penalty_tokens import REBUILD_AT, PenaltyTokens
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    prompt = [rng.randrange(50) for _ in range(rng.randint(1, 40))]
    tokens = list(prompt)
    st = PenaltyTokens()
    for _ in range(60):
        r = rng.random()
        k = rng.randint(REBUILD_AT + 1, 3 * REBUILD_AT) if r < 0.1 else (0 if r < 0.2 else 1)
        tokens.extend(rng.randrange(50) for _ in range(k))
        ph = rng.randint(0, 1)  # a trailing placeholder is not walked
        view = tokens + [PLACEHOLDER] * ph
        st.update(view, len(prompt), len(view) - ph)
        known = np.asarray(tokens)
        out, count = np.unique(known[len(prompt):], return_counts=True)
        assert np.array_equal(st.seen, np.unique(known)), seed
        assert np.array_equal(st.out, out) and np.array_equal(st.count, count), seed
        assert st.count.dtype == np.float32 and st.out.dtype == np.int64
