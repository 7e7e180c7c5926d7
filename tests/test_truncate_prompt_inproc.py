"""vLLM's SamplingParams.truncate_prompt_tokens in-process (LLM, AsyncEngine; the WebSocket's
params too): the request runs the LAST k prompt tokens (-1: max_model_len - max_tokens of
them); prompt_token_ids and usage show the truncated prompt; k = 0 or < -1 is a
SamplingParamsError, k > max_model_len the engine's InvalidRequestError (vLLM's message). It
was a TypeError (no such field)."""

from __future__ import annotations

import pytest

from atom_stream import LLM, AsyncEngine, EngineConfig, SamplingParams
from atom_stream.errors import InvalidRequestError
from atom_stream.sampling_params import SamplingParamsError

KW = {"model": "demo", "device": "cpu", "dtype": "float32", "num_kv_blocks": 64,
      "block_size": 4, "max_model_len": 64}
PROMPT = [(7 * i + 3) % 200 + 1 for i in range(40)]


def _greedy(**kw) -> SamplingParams:
    return SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def llm():
    with LLM(**KW) as engine:
        yield engine


def test_llm_runs_the_last_k_tokens(llm):
    (cut,) = llm.generate(prompt_token_ids=[PROMPT], sampling_params=_greedy(
        truncate_prompt_tokens=10))
    (tail,) = llm.generate(prompt_token_ids=[PROMPT[-10:]], sampling_params=_greedy())
    assert cut.prompt_token_ids == PROMPT[-10:] and cut.usage.prompt_tokens == 10
    assert cut.token_ids == tail.token_ids
    (whole,) = llm.generate(prompt_token_ids=[PROMPT[:5]], sampling_params=_greedy(
        truncate_prompt_tokens=10))  # shorter than k: unchanged
    assert whole.prompt_token_ids == PROMPT[:5]


def test_minus_one_keeps_room_for_max_tokens(llm):
    long = PROMPT * 2  # 80 tokens > max_model_len 64
    (out,) = llm.generate(prompt_token_ids=[long], sampling_params=_greedy(
        truncate_prompt_tokens=-1))
    assert out.prompt_token_ids == long[-60:] and len(out.token_ids) == 4


@pytest.mark.parametrize("k", [0, -2, 1.5, True, "3"])
def test_bad_values_are_sampling_params_errors(k):
    with pytest.raises(SamplingParamsError, match="truncate_prompt_tokens"):
        SamplingParams(truncate_prompt_tokens=k)


def test_above_max_model_len_is_refused_naming_the_field(llm):
    with pytest.raises(InvalidRequestError, match="greater than max_model_len") as e:
        llm.generate(prompt_token_ids=[PROMPT], sampling_params=_greedy(
            truncate_prompt_tokens=65))
    assert e.value.param == "truncate_prompt_tokens"


async def test_async_engine_truncates_a_prompt_longer_than_the_context():
    async with AsyncEngine(EngineConfig(**KW)) as engine:
        long = PROMPT * 3  # 120 tokens: refused without truncation
        outs = [o async for o in engine.generate(long, _greedy(truncate_prompt_tokens=12))]
        assert outs[0].prompt_token_ids == long[-12:]
        assert outs[-1].usage.prompt_tokens == 12 and outs[-1].usage.completion_tokens == 4
        n2 = [o async for o in engine.generate(long, SamplingParams(
            n=2, temperature=0.7, seed=1, max_tokens=2, truncate_prompt_tokens=12))]
        assert n2[-1].usage.prompt_tokens == 12 and n2[-1].usage.completion_tokens == 4
