"""Sampling semantics against vLLM's source, one test per difference found (CPU, no model).

References (vllm-project/vllm, main as of the v0.24 line):
- vllm/sampling_params.py `SamplingParams.__post_init__` / `_verify_args`: temperatures in
  (0, _MAX_TEMP=1e-2) are raised to 1e-2; `temperature < _SAMPLING_EPS` (1e-5) is greedy; greedy
  with n > 1 is refused; temperature must be in [0, 2] (PR #44965); seed == -1 means no seed.
- vllm/sampling_params.py `SamplingParams.from_optional` (what the OpenAI server builds):
  logit_bias values are clamped to [-100, 100], not refused.
- vllm/v1/sample/sampler.py `Sampler` (its docstring and `apply_logits_processors`): raw
  logprobs first; then allowed_token_ids, bad words, the non-argmax-invariant processors
  (min_tokens, logit_bias), THEN the penalties (repetition, frequency, presence); greedy = argmax
  of that; then temperature, the argmax-invariant processors (min_p), THEN top-k/top-p.
- vllm/v1/sample/logits_processor/builtin.py `MinTokensLogitsProcessor.add_request`: bans
  `params.all_stop_token_ids`, which holds the EOS ids whatever `ignore_eos` says
  (`update_from_generation_config` adds them outside its `if not self.ignore_eos`).
"""

from __future__ import annotations

import math

import pytest
import torch

from atom_stream.engine.sequence import Sequence
from atom_stream.layers.sampler import Sampler, SamplingMetadata, apply_penalties
from atom_stream.sampling_params import SamplingParams, SamplingParamsError

POLICIES = [None, 4, "auto"]
EOS = (7, 9)


def seq(params: SamplingParams, prompt=(1, 2, 3), output=()) -> Sequence:
    s = Sequence("r", list(prompt), params, max_tokens=1000, eos_token_ids=EOS)
    s.token_ids.extend(output)
    return s


def meta(seqs, V) -> SamplingMetadata:
    return SamplingMetadata.from_sequences(seqs, V, torch.device("cpu"))


# ---------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize("t", [1e-6, 1e-5, 5e-3, 0.00999])
def test_tiny_positive_temperature_is_raised_to_1e_2_not_greedy(t):
    # vLLM: `if 0 < self.temperature < _MAX_TEMP: self.temperature = max(.., _MAX_TEMP)`, so
    # 1e-6 samples at 0.01 (it was greedy here: our threshold 1e-5 came first)
    p = SamplingParams(temperature=t)
    assert p.temperature == 0.01 and not p.greedy


def test_zero_temperature_is_greedy_and_refuses_n_above_1():
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=0.0, n=1).n == 1
    # vLLM `_verify_greedy_sampling`: "n must be 1 when using greedy sampling, got 3."
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(temperature=0.0, n=3)
    assert e.value.param == "n" and "greedy" in str(e.value)
    assert SamplingParams(temperature=0.5, n=3).n == 3


def test_temperature_above_2_is_refused():
    # vLLM `_verify_args` (PR #44965): "temperature must be in [0, 2], got 3.0."
    assert SamplingParams(temperature=2.0).temperature == 2.0
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(temperature=2.01)
    assert e.value.param == "temperature"


def test_seed_minus_one_means_unseeded():
    # vLLM `__post_init__`: `if self.seed == -1: self.seed = None`
    assert SamplingParams(seed=-1).seed is None
    assert SamplingParams(seed=-2).seed == -2


@pytest.mark.parametrize("bias, want", [(150.0, 100.0), (-1e9, -100.0), (math.inf, 100.0),
                                        (-math.inf, -100.0), (42.5, 42.5)])
def test_logit_bias_values_are_clamped_to_100(bias, want):
    # vLLM `from_optional`: `int(token): min(100.0, max(-100.0, bias))`
    assert SamplingParams(logit_bias={"5": bias}).logit_bias == {5: want}


@pytest.mark.parametrize("bad", [{"x": 1.0}, {"5": "1"}, {"5": math.nan}, {"-1": 1.0}])
def test_logit_bias_still_refuses_non_numbers_and_negative_ids(bad):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(logit_bias=bad)
    assert e.value.param == "logit_bias"


# ---------------------------------------------------------------- sampler


def test_logit_bias_is_applied_before_the_repetition_penalty():
    """vLLM: logit_bias is a non-argmax-invariant logits processor, run before
    `apply_penalties`; the repetition penalty then scales the biased logit."""
    V = 16
    logits = torch.zeros(1, V)
    logits[0, 5], logits[0, 6], logits[0, 8] = 1.0, 2.5, 1.0
    p = SamplingParams(temperature=0.0, repetition_penalty=2.0, logit_bias={5: 3.0, 8: -3.0})
    s = seq(p, prompt=(5, 8, 1))  # 5 and 8 are seen: penalized
    x = logits.clone()
    apply_penalties(x, meta([s], V))
    assert x[0, 5].item() == pytest.approx((1.0 + 3.0) / 2.0)  # not 1/2 + 3 = 3.5
    assert x[0, 8].item() == pytest.approx((1.0 - 3.0) * 2.0)  # not 1/2 - 3 = -2.5
    assert x[0, 6].item() == 2.5
    assert int(Sampler()(logits, meta([s], V)).token_ids[0]) == 6  # greedy: 2.5 > 2.0


def test_min_tokens_bans_eos_even_with_ignore_eos():
    """vLLM bans `all_stop_token_ids` (EOS included whatever ignore_eos says) below
    min_tokens. The sampler bans `seq.eos_token_ids`: the engine must put the model's EOS ids
    there for ignore_eos requests too (see the report)."""
    V = 16
    logits = torch.zeros(1, V)
    logits[0, 7] = 10.0  # EOS is the argmax
    for ignore_eos in (False, True):
        p = SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=ignore_eos,
                           stop_token_ids=[11])
        x = logits.clone()
        apply_penalties(x, meta([seq(p)], V))
        assert x[0, [7, 9, 11]].tolist() == [-math.inf] * 3, ignore_eos
        assert int(Sampler()(logits, meta([seq(p)], V)).token_ids[0]) != 7
        done = seq(p, output=(1, 2))  # min_tokens reached: no ban
        assert int(Sampler()(logits, meta([done], V)).token_ids[0]) == 7


def _row(probs: list[float], V: int) -> torch.Tensor:
    row = torch.full((V,), -60.0)
    row[: len(probs)] = torch.tensor(probs).log()
    return row


@pytest.mark.parametrize("candidates", POLICIES)
def test_min_p_is_applied_before_top_p(candidates):
    """vLLM runs min_p (an argmax-invariant logits processor) after temperature and before
    top-k/top-p, so top-p's mass is over the tokens min_p kept.

    probs [.4, .3, .2, .05, .05], min_p .2 (cut at .08: the .05s go), top_p .75:
    vLLM renormalizes to [.444, .333, .222]; rank 2's preceding mass .778 >= .75, so {0, 1}.
    Cutting top-p on the full distribution (preceding mass .7 < .75) would keep token 2."""
    V = 64
    row = _row([0.4, 0.3, 0.2, 0.05, 0.05], V)
    p = SamplingParams(min_p=0.2, top_p=0.75)
    sampler = Sampler(candidates=candidates)
    mask = sampler.keep_mask(row[None], meta([seq(p)], V))
    assert mask[0].nonzero().flatten().tolist() == [0, 1]
    N = 4000
    tokens = sampler(row.expand(N, V).contiguous(), meta([seq(p)] * N, V)).token_ids
    assert set(tokens.tolist()) == {0, 1}
    share = (tokens == 0).float().mean().item()  # 0.4 / 0.7
    assert abs(share - 4 / 7) < 0.05


@pytest.mark.parametrize("candidates", POLICIES)
def test_min_p_before_top_p_with_top_k_and_temperature(candidates):
    """Same order with top-k and a temperature: T=0.5 squares the probabilities' ratios first
    (min_p and top-p both act on the scaled distribution)."""
    V = 64
    # T = 0.5: weights ~ p^2: [.16, .09, .04, .0025 x2, .0001] -> normalized over the row
    row = _row([0.4, 0.3, 0.2, 0.05, 0.05, 0.01], V)
    p = SamplingParams(temperature=0.5, min_p=0.2, top_k=5, top_p=0.8)
    # min_p: keep w >= .2 * .16 = .032 -> {0, 1, 2}; top-k 5 keeps them; top-p over
    # [.16, .09, .04] / .29 = [.552, .310, .138]: rank 2's preceding mass .862 >= .8 -> {0, 1}
    # (over the full row the preceding mass is .25 / .2951 = .847 >= .8 too; so use .86)
    p2 = SamplingParams(temperature=0.5, min_p=0.2, top_k=5, top_p=0.86)
    mask = Sampler(candidates=candidates).keep_mask(torch.stack([row, row]),
                                                    meta([seq(p), seq(p2)], V))
    assert mask[0].nonzero().flatten().tolist() == [0, 1]
    # p2: vLLM .862 >= .86 -> {0, 1}; the full-row cut (.847 < .86) would keep token 2
    assert mask[1].nonzero().flatten().tolist() == [0, 1]


def test_child_params_seed_plus_index_like_parent_request():
    """vLLM's ParentRequest._get_child_sampling_params: n = 1 and seed + index, assigned on a
    copy (so -1 stays a seed there). A replace() re-runs __post_init__, which reads -1 as "no
    seed": an n > 1 request seeded -2 would get an unseeded second choice."""
    p = SamplingParams(seed=-2, n=3, temperature=0.7, top_k=5)
    kids = [p.child(i) for i in range(3)]
    assert [k.seed for k in kids] == [-2, -1, 0]
    assert all(k.n == 1 and k.temperature == 0.7 and k.top_k == 5 for k in kids)
    for k in kids:
        k.validate()  # what the engine does on add_request
    top = SamplingParams(seed=2**63 - 1, n=2).child(1)
    assert top.seed == -(2**63)  # wraps in int64 (the same 64-bit generator seed)
    top.validate()
    assert SamplingParams(n=2).child(1).seed is None
