"""Review 27, the in-process API against vLLM's RequestOutput as its users read it:
an n > 1 AsyncEngine stream carries `prompt_token_ids`, `num_cached_tokens` (and, given one, the
text `prompt`) on every output, as vLLM's does; RequestOutput has vLLM's `metrics`,
`lora_request`, `encoder_prompt(_token_ids)`, `kv_transfer_params` (None); LLM.generate keeps the
text of a vLLM TokensPrompt ({"prompt_token_ids", "prompt"}) as `output.prompt`, and a prompt
that is neither a prompt nor an iterable of them is an InvalidRequestError."""

from __future__ import annotations

import pytest
from test_review25_engine import collect, fake_engine

from atom_stream import SamplingParams
from atom_stream.engine.parallel_sampling import fan_out
from atom_stream.errors import InvalidRequestError
from atom_stream.sampling_params import RequestOutputKind


def _hot(n: int, tokens: int, **kw) -> SamplingParams:
    return SamplingParams(n=n, temperature=1.0, max_tokens=tokens, ignore_eos=True, seed=5, **kw)


# ---------------------------------------------------------------- n > 1 stream fields
async def test_n_stream_has_prompt_ids_and_cached_count_on_every_output():
    """Before: only each child's first delta had prompt_token_ids, and an output ending a
    choice other than the last had num_cached_tokens None (the child's count was in its
    usage, which the parent's streamed output drops)."""
    prompt = list(range(140, 181))  # 41 tokens: two full blocks of 16 reusable
    async with fake_engine() as engine:
        await collect(engine.generate(prompt, _hot(1, 2)))  # the prefix is cached now
        outs = await collect(engine.generate(prompt, _hot(3, 3), request_id="n3"))
        cum = await collect(engine.generate(
            prompt, _hot(2, 2, output_kind=RequestOutputKind.CUMULATIVE), request_id="c2"))
    assert len(outs) == 9 and [o.finished for o in outs] == [False] * 8 + [True]
    for o in outs + cum:
        assert o.prompt_token_ids == prompt
        assert o.num_cached_tokens == 32
    ended = [o for o in outs if o.outputs[0].finish_reason is not None]
    assert [o.outputs[0].index for o in ended] == [0, 1, 2]


async def test_n_stream_carries_the_text_prompt_given_to_fan_out():
    ids = [60, 61, 62, 63]
    async with fake_engine() as engine:
        outs = await collect(fan_out(engine, ids, _hot(2, 2), "fp", False, prompt="abcd"))
        final = await collect(fan_out(
            engine, ids, _hot(2, 2, output_kind=RequestOutputKind.FINAL_ONLY), "ff", False,
            prompt="abcd"))
        bare = await collect(fan_out(engine, ids, _hot(2, 1), "fb", False))
    assert len(outs) == 4 and all(o.prompt == "abcd" for o in outs + final)
    assert len(final) == 1 and len(final[0].outputs) == 2
    assert all(o.prompt is None for o in bare)


# ---------------------------------------------------------------- RequestOutput fields
def test_request_output_has_vllm_optional_fields(llm):
    one, multi = llm.generate(["ab", [5, 6, 7]], [SamplingParams(max_tokens=2), _hot(2, 2)])
    names = ("metrics", "lora_request", "encoder_prompt", "encoder_prompt_token_ids",
             "kv_transfer_params")
    for out in (one, multi):
        for name in names:
            assert getattr(out, name) is None, name
        for choice in out.outputs:
            assert choice.lora_request is None


# ---------------------------------------------------------------- LLM.generate prompts
def test_tokens_prompt_text_is_the_output_prompt(llm):
    """vLLM's TokensPrompt may carry its text ("prompt") beside the ids: output.prompt is it
    (before: None); the ids are what runs."""
    outs = llm.generate([{"prompt_token_ids": [40, 41, 42], "prompt": "()*"},
                         {"prompt_token_ids": [43, 44]}, {"prompt": "xy"}],
                        SamplingParams(max_tokens=2, temperature=0))
    assert [o.prompt for o in outs] == ["()*", None, "xy"]
    assert outs[0].prompt_token_ids == [40, 41, 42]


@pytest.mark.parametrize("bad", [5, 2.5, object()])
def test_a_prompt_of_no_prompt_type_is_invalid_request(llm, bad):
    with pytest.raises(InvalidRequestError, match="prompts"):
        llm.generate(bad, SamplingParams(max_tokens=2))


def test_default_sampling_params_are_a_fresh_copy(llm):
    """vLLM builds a new SamplingParams each call; before, every call returned the LLM's one
    cached object, so a caller's `sp.max_tokens = 2` changed what generate() ran by default."""
    mine = llm.get_default_sampling_params()
    default_max = mine.max_tokens
    mine.max_tokens = 2
    mine.stop.append("zz")
    again = llm.get_default_sampling_params()
    assert again is not mine and again.max_tokens == default_max and "zz" not in again.stop
