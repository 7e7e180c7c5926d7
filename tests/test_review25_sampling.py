"""Sampling semantics against vLLM's source (review 25). CPU only, no model except `llm`.

Compared with (vllm-project/vllm):
- vllm/sampling_params.py `SamplingParams.__post_init__`: `logprobs is True` -> 1 (and
  prompt_logprobs); stop_token_ids deduplicated (`list(dict.fromkeys(...))`). `_verify_args`:
  "stop cannot contain an empty string.", "top_p must be in (0, 1], got X.", "min_tokens must
  be less than or equal to max_tokens=M, got N.", ...
- vllm/v1/sample/sampler.py (`apply_logits_processors`, `sample`), ops/penalties.py,
  logits_processor/builtin.py (MinP / LogitBias / MinTokens), ops/topk_topp_sampler.py
  (`apply_top_k_top_p`: ascending sort, top-k `< k-th value` masked, top-p `cumsum <= 1 - p`
  masked with the last kept): ported literally in `vllm_probs` below as the reference of the
  empirical-distribution checks.
"""

from __future__ import annotations

import math

import pytest
import torch

from atom_stream.engine.sequence import Sequence
from atom_stream.layers.sampler import Sampler, SamplingMetadata
from atom_stream.sampling_params import SamplingParams, SamplingParamsError

EOS = (5, 6)


def _seq(params: SamplingParams, prompt=(1, 2, 3), output=(), rid="r") -> Sequence:
    s = Sequence(rid, list(prompt), params, max_tokens=1000, eos_token_ids=EOS)
    s.token_ids.extend(output)
    return s


def _meta(seqs, V) -> SamplingMetadata:
    return SamplingMetadata.from_sequences(seqs, V, torch.device("cpu"))


# ---------------------------------------------------------------- SamplingParams (vLLM parity)


def test_logprobs_true_is_read_as_one():
    p = SamplingParams(logprobs=True, prompt_logprobs=True)
    assert p.logprobs == 1 and p.prompt_logprobs == 1
    assert SamplingParams(logprobs=False).logprobs == 0  # vLLM: a bool is an int


def test_stop_token_ids_are_deduplicated_in_order():
    assert SamplingParams(stop_token_ids=[11, 4, 11, 4, 2]).stop_token_ids == [11, 4, 2]
    with pytest.raises(SamplingParamsError) as e:  # True == 1 must not slip in by dedup
        SamplingParams(stop_token_ids=[1, True])
    assert e.value.param == "stop_token_ids"


def test_greedy_validates_truncation_it_ignores():
    with pytest.raises(SamplingParamsError) as e:  # vLLM validates before its greedy reset
        SamplingParams(temperature=0.0, top_p=0.0)
    assert e.value.param == "top_p"
    row = torch.tensor([[0.1, 2.0, 1.9, -1.0]])
    p = SamplingParams(temperature=0.0, top_p=0.01, top_k=3, min_p=0.9)
    assert Sampler()(row, _meta([_seq(p)], 4)).token_ids.tolist() == [1]


@pytest.mark.parametrize("kw, param, text", [
    ({"stop": ["x", ""]}, "stop", "empty string"),
    ({"top_p": 1.5}, "top_p", "got 1.5"),
    ({"min_p": -0.25}, "min_p", "got -0.25"),
    ({"presence_penalty": 2.5}, "presence_penalty", "got 2.5"),
    ({"repetition_penalty": -1.0}, "repetition_penalty", "greater than zero"),
    ({"min_tokens": 9, "max_tokens": 3}, "min_tokens", "max_tokens=3, got 9"),
])
def test_range_errors_say_what_was_wrong(kw, param, text):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**kw)
    assert e.value.param == param and text in str(e.value)


# ---------------------------------------------------------------- vLLM's pipeline, ported


def vllm_probs(row: torch.Tensor, s: Sequence) -> torch.Tensor:
    """The distribution vLLM's v1 Sampler draws from for one row (float64), ported from
    apply_logits_processors (allowed ids, min_tokens, logit_bias, then apply_penalties),
    apply_temperature, MinPLogitsProcessor.apply and apply_top_k_top_p."""
    p, V = s.params, row.numel()
    x = row.double().clone()
    if p.allowed_token_ids:
        mask = torch.ones(V, dtype=torch.bool)
        mask[p.allowed_token_ids] = False
        x[mask] = -math.inf
    if s.num_output_tokens < p.min_tokens:
        x[list(set(EOS) | set(p.stop_token_ids))] = -math.inf
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    out = torch.tensor(s.output_token_ids, dtype=torch.long)
    counts = torch.bincount(out, minlength=V).double()
    seen = torch.zeros(V, dtype=torch.bool)
    seen[torch.tensor(s.token_ids)] = True
    rep = torch.where(seen, torch.tensor(p.repetition_penalty, dtype=torch.double), 1.0)
    x = torch.where(x > 0, x / rep, x * rep)
    x = x - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).double()
    x = x / p.temperature
    if p.min_p > 0:
        probs = x.softmax(-1)
        x[probs < probs.max() * p.min_p] = -math.inf
    srt, idx = x.sort(descending=False)
    if 0 < p.top_k < V:
        srt[srt < srt[V - p.top_k]] = -math.inf
    if p.top_p < 1.0:
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum <= 1 - p.top_p
        drop[-1] = False
        srt[drop] = -math.inf
    x = torch.empty_like(srt).scatter_(0, idx, srt)
    return x.softmax(-1)


def _chi2_ok(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    n = counts.sum().item()
    keep = probs > 0
    chi2 = (((counts - n * probs) ** 2)[keep] / (n * probs[keep])).sum().item()
    df = int(keep.sum()) - 1
    return chi2 < df + 8.0 * math.sqrt(2.0 * max(df, 1)) + 10.0  # p-value far below 1e-6


CASES = [
    {"temperature": 0.6, "top_k": 6, "repetition_penalty": 1.7, "logit_bias": {0: 1.5}},
    {"temperature": 1.4, "min_p": 0.08, "top_p": 0.85, "frequency_penalty": 0.9,
     "presence_penalty": 0.4},
    {"temperature": 1.6, "top_p": 0.9, "allowed_token_ids": list(range(4, 20)), "min_tokens": 12,
     "stop_token_ids": [11], "repetition_penalty": 0.5},
    {"temperature": 2.0, "top_k": 12, "top_p": 0.6, "min_p": 0.02, "presence_penalty": -1.5},
]


@pytest.mark.parametrize("candidates", [None, 5, "auto"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_empirical_distribution_matches_vllm_pipeline(case, candidates):
    """Penalties, bias, bans, temperature, min-p, top-k, top-p in vLLM's order: 20000 draws of
    one row (unseeded rows, one batched call) against the ported vLLM distribution."""
    g = torch.Generator().manual_seed(2500 + case)
    N, V = 20000, 24
    row = torch.randn(V, generator=g) * 1.8
    s = _seq(SamplingParams(**CASES[case]), prompt=(0, 3, 7, 8),
             output=(3, 3, 9, 12, 8, 3, 15, 4))
    want = vllm_probs(row, s)
    tokens = Sampler(seed=case, candidates=candidates)(row.repeat(N, 1), _meta([s] * N, V))
    counts = torch.bincount(tokens.token_ids, minlength=V).double()
    assert counts[want == 0].sum() == 0, "a token vLLM filters out was drawn"
    assert _chi2_ok(counts, want)
    # the test can fail: the unpenalized softmax is rejected on the same draws
    assert not _chi2_ok(counts, (row.double() / s.params.temperature).softmax(-1))


def test_seeded_requests_draw_from_the_same_distribution():
    """One draw each from 4000 requests with distinct seeds (their own generators) follows the
    filtered distribution, and n > 1 children (seed + index) differ from each other."""
    g = torch.Generator().manual_seed(77)
    N, V = 4000, 16
    row = torch.randn(V, generator=g) * 1.2
    parent = SamplingParams(temperature=0.8, top_p=0.9, seed=123456, n=2)
    seqs = [_seq(parent.child(i), rid=str(i)) for i in range(N)]
    tokens = Sampler(seed=0)(row.repeat(N, 1), _meta(seqs, V)).token_ids
    assert _chi2_ok(torch.bincount(tokens, minlength=V).double(), vllm_probs(row, seqs[0]))
    again = Sampler(seed=99)(row.repeat(N, 1), _meta(seqs, V)).token_ids
    assert torch.equal(tokens, again)  # the engine seed plays no part in seeded rows


# ---------------------------------------------------------------- through the public LLM


def test_llm_logprobs_true_returns_one_top_logprob(llm):
    out = llm.generate(["sampling review"], SamplingParams(
        max_tokens=3, temperature=0.0, logprobs=True, stop_token_ids=[300, 300]))[0]
    assert len(out.token_ids) == 3 and len(out.logprobs) == 3
    for tid, entry in zip(out.token_ids, out.logprobs):
        assert tid in entry and 1 <= len(entry) <= 2  # the sampled token plus the top 1


def test_chat_min_tokens_error_names_max_completion_tokens():
    """A chat request's min_tokens above its max_completion_tokens: the 400 names the field the
    client sent (param and the quoted value), not the engine's max_tokens."""
    import msgspec

    from atom_stream.protocol import ChatCompletionRequest
    from atom_stream.server.openai_params import build_sampling_params
    from atom_stream.server.responses import HTTPError

    req = msgspec.json.decode(
        b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], '
        b'"max_completion_tokens": 2, "min_tokens": 5}', type=ChatCompletionRequest)
    with pytest.raises(HTTPError) as e:
        build_sampling_params(req, chat=True)
    text = str(e.value.message if hasattr(e.value, "message") else e.value)
    assert "max_completion_tokens=2" in text and "max_tokens=" not in text, text
