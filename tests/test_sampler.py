"""Sampler tests: every vectorized rule against a scalar per-row Python reference (float64).

Each test draws fresh random logits. Boundary-sensitive comparisons (top-p / min-p cuts) skip rows
whose reference cut lies within 1e-4 of the boundary, and assert that most rows are compared.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

from atom_stream.engine.sequence import Sequence
from atom_stream.layers.sampler import Sampler, SamplingMetadata, apply_penalties, seed_key
from atom_stream.sampling_params import SamplingParams

DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")])]
POLICIES = [None, 16, "auto"]  # sync-free / small candidate set (forces fallbacks) / default
EOS = (7, 9)


def seq(params: SamplingParams, prompt=(1, 2, 3), output=(), rid="r") -> Sequence:
    s = Sequence(rid, list(prompt), params, max_tokens=1000, eos_token_ids=EOS)
    s.token_ids.extend(output)
    return s


def meta(seqs, V, device="cpu") -> SamplingMetadata:
    return SamplingMetadata.from_sequences(seqs, V, torch.device(device))


# ---------------------------------------------------------------- scalar references (float64)

def ref_penalize(row: list[float], s: Sequence) -> list[float]:
    """vLLM's order (v1 Sampler.apply_logits_processors): allowed_token_ids, min_tokens bans
    (EOS even under ignore_eos: all_stop_token_ids), logit_bias, then repetition, frequency and
    presence penalties."""
    p, out = s.params, list(row)
    if p.allowed_token_ids:
        allowed = set(p.allowed_token_ids)
        out = [v if t in allowed else -math.inf for t, v in enumerate(out)]
    if s.num_output_tokens < p.min_tokens:
        for t in set(p.stop_token_ids) | set(EOS):
            out[t] = -math.inf
    for t, b in (p.logit_bias or {}).items():
        out[t] += b
    if p.repetition_penalty != 1.0:
        for t in set(s.token_ids):
            out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t, c in Counter(s.output_token_ids).items():
        out[t] -= p.frequency_penalty * c + p.presence_penalty
    return out


def ref_keep(row: list[float], p: SamplingParams) -> tuple[set[int], float]:
    """The tokens a sampling row may draw (vLLM's order: temperature, min-p, top-k, then top-p
    over what they kept), and how close the min-p/top-p cuts came to flipping."""
    x = [v / p.temperature for v in row]
    order = sorted(range(len(x)), key=lambda i: -x[i])
    kept = set(range(len(x)))
    margin = math.inf
    if p.min_p > 0.0:
        m = max(x)
        margin = min(margin, *(abs(x[i] - m - math.log(p.min_p)) for i in kept))
        kept = {i for i in kept if x[i] - m >= math.log(p.min_p)}
    if 0 < p.top_k < len(x):
        kth = x[order[p.top_k - 1]]
        kept = {i for i in kept if x[i] >= kth}
    if p.top_p < 1.0:
        m = max(x)
        w = {i: math.exp(x[i] - m) for i in kept}
        z = sum(w.values())
        cum, thr = 0.0, None
        for i in order:
            if i not in kept:
                continue
            margin = min(margin, abs(cum - p.top_p))
            if cum < p.top_p:
                thr = x[i]
            cum += w[i] / z
        kept = {i for i in kept if x[i] >= thr}
    return kept, margin


def ref_probs(row: list[float], p: SamplingParams) -> list[float]:
    kept, _ = ref_keep(row, p)
    m = max(row)
    w = [math.exp((v - m) / p.temperature) if i in kept else 0.0 for i, v in enumerate(row)]
    return [v / sum(w) for v in w]


def random_params(rng: random.Random, greedy_share=0.2, **kw) -> SamplingParams:
    if rng.random() < greedy_share:
        return SamplingParams(temperature=0.0, **kw)
    return SamplingParams(temperature=rng.choice([0.5, 0.7, 1.0, 1.3]),
                          top_k=rng.choice([0, -1, 1, 5, 20]),
                          top_p=rng.choice([1.0, 0.5, 0.9, 0.95]),
                          min_p=rng.choice([0.0, 0.0, 0.05, 0.2]), **kw)


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_argmax(device, dtype):
    B, V = 12, 5000
    logits = (torch.randn(B, V) * 3).to(device, dtype)
    md = meta([seq(SamplingParams(temperature=0.0)) for _ in range(B)], V, device)
    out = Sampler()(logits, md)
    assert out.logprobs is None and out.token_ids.dtype == torch.int64
    assert torch.equal(out.token_ids, logits.float().argmax(-1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("candidates", POLICIES)
def test_keep_masks_match_scalar_reference(device, candidates):
    rng = random.Random()
    B, V = 64, 300
    sizes: list[int] = []
    # fresh random batches until candidates=16 (K0 = 21 here) has seen kept sets both inside
    # and beyond its candidates (one batch of 64 usually does; every batch is checked)
    for _ in range(8):
        logits = torch.randn(B, V) * rng.choice([1.0, 2.0, 3.0])
        seqs = [seq(random_params(rng)) for _ in range(B)]
        mask = Sampler(candidates=candidates).keep_mask(logits.to(device),
                                                        meta(seqs, V, device)).cpu()
        compared, batch_sizes = 0, []
        for i, s in enumerate(seqs):
            row = logits[i].tolist()
            if s.params.greedy:
                assert mask[i].nonzero().flatten().tolist() == [
                    max(range(V), key=row.__getitem__)]
                continue
            kept, margin = ref_keep(row, s.params)
            batch_sizes.append(len(kept))
            if margin > 1e-4:
                assert set(mask[i].nonzero().flatten().tolist()) == kept, (i, s.params)
                compared += 1
        assert compared >= 0.6 * len(batch_sizes)
        sizes += batch_sizes
        if min(sizes) < 21 < max(sizes):
            break
    assert min(sizes) < 21 < max(sizes)


def _chi2_bound(df: int) -> float:
    return df + 8.0 * math.sqrt(2.0 * df) + 10.0  # p-value far below 1e-6


def _chi2(counts: list[int], probs: list[float]) -> float:
    n = sum(counts)
    return sum((c - n * q) ** 2 / (n * q) for c, q in zip(counts, probs) if q > 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("candidates", POLICIES)
@pytest.mark.parametrize("params", [
    dict(temperature=0.7, top_p=0.9), dict(top_k=5), dict(temperature=1.3, min_p=0.1),
    dict(), dict(temperature=0.8, top_k=10, top_p=0.8, min_p=0.05)])
def test_empirical_distribution_matches_filtered_softmax(device, candidates, params):
    N, V = 20000, 32
    row = (torch.randn(V) * 1.5).tolist()
    p = SamplingParams(**params)
    logits = torch.tensor([row] * N, device=device)
    tokens = Sampler(candidates=candidates)(logits, meta([seq(p)] * N, V, device)).token_ids
    counts = torch.bincount(tokens.cpu(), minlength=V).tolist()
    probs = ref_probs(row, p)
    assert all(c == 0 for c, q in zip(counts, probs) if q == 0)  # never a filtered token
    df = sum(q > 0 for q in probs) - 1
    assert _chi2(counts, probs) < _chi2_bound(df)
    # the same samples must be rejected as draws from the unfiltered softmax at temperature 1
    plain = ref_probs(row, SamplingParams())
    assert _chi2(counts, plain) > _chi2_bound(V - 1) or all(
        abs(a - b) < 1e-3 for a, b in zip(probs, plain))


def test_split_batch_compact_and_flat_rows():
    """Candidates policy with rows inside (top_k=3) and beyond (top_p=0.97) the candidate set."""
    N, V = 20000, 64
    row_a, row_b = (torch.randn(V) * 2).tolist(), (torch.randn(V) * 0.5).tolist()
    pa, pb = SamplingParams(top_k=3), SamplingParams(top_p=0.97)
    logits = torch.tensor([row_a, row_b] * N)
    tokens = Sampler(candidates=4)(logits, meta([seq(pa), seq(pb)] * N, V)).token_ids
    for j, (row, p) in enumerate(((row_a, pa), (row_b, pb))):
        counts = torch.bincount(tokens[j::2], minlength=V).tolist()
        probs = ref_probs(row, p)
        assert all(c == 0 for c, q in zip(counts, probs) if q == 0)
        assert _chi2(counts, probs) < _chi2_bound(sum(q > 0 for q in probs) - 1)


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_rows_are_batch_and_position_invariant(device):
    rng = random.Random()
    V = 2000
    for step in range(6):
        for target in (SamplingParams(seed=rng.randrange(2**63), top_p=0.9),
                       SamplingParams(seed=-rng.randrange(2**63), temperature=1.3),
                       SamplingParams(seed=7, top_k=40, min_p=0.01)):
            row = torch.randn(V) * 0.7
            out = [rng.randrange(V) for _ in range(step)]
            alone = Sampler()(row[None].to(device), meta([seq(target, output=out)], V, device))
            for candidates in POLICIES if device == "cpu" else ["auto"]:
                others = [seq(random_params(rng, seed=rng.choice([None, 1, 2]))) for _ in range(15)]
                pos = rng.randrange(16)
                seqs = others[:pos] + [seq(target, output=out)] + others[pos:]
                logits = torch.randn(16, V) * 0.7
                logits[pos] = row
                got = Sampler(candidates=candidates)(logits.to(device), meta(seqs, V, device))
                assert got.token_ids[pos] == alone.token_ids[0], (step, target, candidates)


def test_seeds_differ_and_recompute_repeats():
    V = 1000
    logits = torch.randn(1, V) * 0.3

    def run(seed: int, sampler: Sampler) -> list[int]:
        s = seq(SamplingParams(seed=seed))
        for _ in range(8):
            s.token_ids.append(int(sampler(logits, meta([s], V)).token_ids[0]))
        return s.output_token_ids

    a = run(1, Sampler(seed=0))
    assert run(1, Sampler(seed=99)) == a  # another engine seed, a preempted + recomputed request
    assert run(2, Sampler(seed=0)) != a
    keys = {seed_key(1, i) for i in range(1000)} | {seed_key(2, i) for i in range(1000)}
    assert len(keys) == 2000
    unseeded = Sampler()
    s = seq(SamplingParams())
    draws = {int(unseeded(logits, meta([s], V)).token_ids[0]) for _ in range(8)}
    assert len(draws) > 1  # unseeded rows advance the global generator


def test_penalties_match_scalar_reference():
    rng = random.Random()
    B, V = 10, 400
    logits = torch.randn(B, V) * 2
    seqs = []
    for i in range(B):
        prompt = [rng.randrange(V) for _ in range(rng.randrange(1, 30))]
        output = [rng.randrange(20) for _ in range(rng.randrange(0, 40))]  # repeats likely
        p = SamplingParams(
            temperature=rng.choice([0.0, 1.0]), repetition_penalty=rng.choice([1.0, 0.7, 1.3]),
            frequency_penalty=rng.choice([0.0, 0.5, -1.0]),
            presence_penalty=rng.choice([0.0, 1.5, -0.5]),
            min_tokens=rng.choice([0, 100]), max_tokens=200, stop_token_ids=[11],
            ignore_eos=i % 2 == 0,
            logit_bias=rng.choice([None, {str(rng.randrange(V)): rng.uniform(-100, 100)
                                          for _ in range(5)}]),
            allowed_token_ids=rng.choice([None, rng.sample(range(V), 7)]))
        seqs.append(seq(p, prompt, output, rid=str(i)))
    seqs[0].params.logit_bias = {3: 50.0, 4: -50.0}  # both kinds in every run
    seqs[1].params.allowed_token_ids = [5, 6, 7, 11]
    md = meta(seqs, V)
    assert not md.no_penalties
    x = logits.clone()
    apply_penalties(x, md)
    ref = torch.tensor([ref_penalize(logits[i].tolist(), s) for i, s in enumerate(seqs)])
    torch.testing.assert_close(x, ref.float(), rtol=1e-5, atol=1e-5)
    assert not torch.equal(x, logits)
    # greedy rows pick the argmax of the penalized logits; the input is left untouched
    before = logits.clone()
    out = Sampler()(logits, md)
    assert torch.equal(logits, before)
    for i, s in enumerate(seqs):
        if s.params.greedy:
            assert out.token_ids[i] == ref[i].argmax()
        else:
            assert math.isfinite(ref[i, out.token_ids[i]])  # never a banned stop token


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ks", [[None, 0, 5, 20, 3, None, 20, 1], [2, 20, 0, 7, 20, 1, 1, 3]])
def test_logprobs_are_raw_log_softmax(device, dtype, ks):
    rng = random.Random()
    B, V = len(ks), 3000
    logits = (torch.randn(B, V) * 3).to(dtype)
    seqs = [seq(SamplingParams(temperature=rng.choice([0.0, 0.8]), logprobs=k, top_k=50,
                               repetition_penalty=1.5, presence_penalty=1.0),
                prompt=[rng.randrange(V) for _ in range(20)], output=[5, 6, 5]) for k in ks]
    out = Sampler()(logits.to(device), meta(seqs, V, device))
    sampled, top_ids, top_lps, ranks = (t.cpu() for t in out.logprobs)
    assert top_ids.shape == top_lps.shape == (B, 20) and top_ids.dtype == torch.int64
    asked = torch.tensor([k is not None for k in ks])
    assert sampled[~asked].isnan().all() and (top_ids[~asked] == -1).all()
    sampled, top_ids, top_lps = sampled[asked], top_ids[asked], top_lps[asked]
    ref = torch.log_softmax(logits[asked].double(), dim=-1)  # raw: no penalties, temperature
    tok = out.token_ids.cpu()[asked]
    torch.testing.assert_close(sampled.double(), ref.gather(1, tok[:, None])[:, 0],
                               rtol=0, atol=2e-5)
    # the sampled token's rank in the raw distribution (ties count, as vLLM's)
    want = (logits[asked] >= logits[asked].gather(1, tok[:, None])).sum(-1)
    assert torch.equal(ranks[asked], want) and (ranks[asked] >= 1).all()
    ref_v, _ = ref.topk(20, dim=-1)
    torch.testing.assert_close(top_lps.double(), ref_v, rtol=0, atol=2e-5)
    torch.testing.assert_close(ref.gather(1, top_ids), ref_v, rtol=0, atol=2e-5)
    assert (top_lps[:, :-1] >= top_lps[:, 1:]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_greedy_and_sampled_batch(dtype):
    rng = random.Random()
    B, V = 40, 500
    logits = (torch.randn(B, V) * 2).to(dtype)
    seqs = [seq(random_params(rng, greedy_share=0.4, presence_penalty=rng.choice([0.0, 0.8])),
                output=[rng.randrange(V) for _ in range(5)], rid=str(i)) for i in range(B)]
    md = meta(seqs, V)
    assert not md.all_greedy and not md.all_random and md.random_rows is not None
    mask = Sampler().keep_mask(logits, md)
    out = Sampler()(logits, md).token_ids
    for i, s in enumerate(seqs):
        pen = ref_penalize(logits[i].float().tolist(), s)
        if s.params.greedy:
            assert out[i] == max(range(V), key=pen.__getitem__)
        else:
            assert mask[i, out[i]], (i, s.params)
            kept, margin = ref_keep(pen, s.params)
            assert margin < 1e-4 or int(out[i]) in kept


def test_metadata_flags():
    V = 100
    md = meta([seq(SamplingParams(temperature=0.0, top_k=5, logprobs=3)),
               seq(SamplingParams(top_k=200, top_p=1.0, seed=5), output=[1, 2]),
               seq(SamplingParams(top_k=7, top_p=0.5, logprobs=0))], V)
    assert md.top_k.tolist() == [5, 0, 7]  # k >= V is off
    assert md.max_top_k == 7 and not md.no_top_k and not md.no_top_p and md.no_min_p
    assert md.random_rows.tolist() == [1, 2] and md.seeded == [(0, seed_key(5, 2))]
    assert md.top_p_rows.tolist() == [1]  # index among the sampling rows
    assert md.max_logprobs == 3 and md.logprob_rows.tolist() == [0, 2]
    assert md.no_penalties and md.no_temperature
    assert md.temperature.tolist() == [1.0, 1.0, 1.0] and md.greedy.tolist() == [True, False, False]
