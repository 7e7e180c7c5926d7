"""Review of session 25's engine changes (c8160f6..b911f3c): each test pins one gap found there.

- A one-token prompt asked for prompt logprobs came back with `prompt_logprobs` None (no
  position has any, so the engine list was never started); vLLM gives `[None]` (its
  LogprobsProcessor starts every such request at `[None]`), and None means "not asked for".
- Every output of a DELTA stream (the default, what the HTTP and WebSocket servers read) went
  through the output-kind shaper, a method call per token for a feature the servers never use.
"""

from __future__ import annotations

import pytest

from atom_stream import AsyncEngine, EngineConfig, SamplingParams
from atom_stream.engine import async_engine

KW = {"model": "demo", "device": "cpu", "dtype": "float32", "num_kv_blocks": 32,
      "block_size": 4, "max_model_len": 64}


def _params(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, **kw)


def test_one_token_prompt_has_vllm_prompt_logprobs(llm):
    (one,) = llm.generate(prompt_token_ids=[[37]], sampling_params=_params(prompt_logprobs=2))
    assert one.prompt_logprobs == [None]  # asked for: the first position has none
    (two,) = llm.generate(prompt_token_ids=[[37, 8]], sampling_params=_params(prompt_logprobs=2))
    assert two.prompt_logprobs[0] is None and 37 not in two.prompt_logprobs[1]
    assert next(iter(two.prompt_logprobs[1])) == 8
    (plain,) = llm.generate(prompt_token_ids=[[37]], sampling_params=_params())
    assert plain.prompt_logprobs is None  # not asked for


async def test_one_token_prompt_first_delta_carries_prompt_logprobs():
    async with AsyncEngine(EngineConfig(**KW)) as engine:
        outs = [o async for o in engine.generate([52], _params(prompt_logprobs=1))]
        assert outs[0].prompt_logprobs == [None]
        assert all(o.prompt_logprobs is None for o in outs[1:])  # the first delta only
        # max_tokens 1: the first output is also the final one
        (final,) = [o async for o in engine.generate(
            [52], SamplingParams(max_tokens=1, prompt_logprobs=0))]
        assert final.prompt_logprobs == [None] and final.finish_reason == "length"


async def test_delta_streams_do_not_go_through_the_output_shaper(monkeypatch):
    class NoShaper:
        def __init__(self, kind):
            raise AssertionError(f"a {kind!r} stream built an output shaper")

    async with AsyncEngine(EngineConfig(**KW)) as engine:
        monkeypatch.setattr(async_engine, "OutputShaper", NoShaper)
        outs = [o async for o in engine.generate([5, 6, 7], _params())]
        assert [len(o.token_ids) for o in outs] == [1, 1, 1]
        assert outs[-1].finish_reason == "length"
        with pytest.raises(AssertionError, match="output shaper"):
            async for _ in engine.generate([5, 6, 7], _params(output_kind=2)):
                pass
