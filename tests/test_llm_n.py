"""LLM.generate with SamplingParams(n > 1), as vLLM's LLM: one output per prompt (input order)
whose `.outputs` are the n choices (index 0..n-1), each the child request vLLM's ParentRequest
makes (n = 1, seed + index); top-level token_ids / text / finish_reason are choice 0's. n == 1
outputs are unchanged; greedy n > 1 is refused (AsyncEngine's n > 1: test_async_n.py)."""

from __future__ import annotations

import msgspec
import pytest
from engine_fakes import EOS, FakeKVRunner, ScriptedRunner

from atom_stream import LLM, EngineConfig, SamplingParams
from atom_stream.engine.llm_engine import LLMEngine
from atom_stream.engine.outputs import (
    CompletionOutput,
    MultiChoiceOutput,
    RequestOutput,
    Usage,
)
from atom_stream.errors import InvalidRequestError, PromptTooLongError
from atom_stream.sampling_params import SamplingParamsError
from atom_stream.tokenizer import load_tokenizer

KW = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 64}


def sp(**kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 6, "temperature": 1.0, "ignore_eos": True, **kw})


def alone(llm: LLM, prompt, params: SamplingParams) -> RequestOutput:
    (out,) = llm.generate([prompt], params)
    assert type(out) is RequestOutput
    return out


def close_logprobs(got: list | None, want: list | None) -> None:
    """Equal ids, values within 1e-4: logprobs differ in the last bits between batch shapes
    (CPU matmuls); the sampled tokens (seeded) do not."""
    assert (got is None) == (want is None)
    assert len(got or ()) == len(want or ())
    for g, w in zip(got or (), want or ()):
        assert (g is None) == (w is None)
        if g is not None:  # vLLM's dicts: {token_id: Logprob}, in the same order
            assert list(g) == list(w)
            assert [(x.rank, x.decoded_token) for x in g.values()] == [
                (x.rank, x.decoded_token) for x in w.values()]
            assert [x.logprob for x in g.values()] == pytest.approx(
                [x.logprob for x in w.values()], abs=1e-4)


def same_choice(choice: RequestOutput, ref: RequestOutput) -> None:
    assert choice.token_ids == ref.token_ids
    assert choice.text == ref.text
    assert (choice.finish_reason, choice.stop_reason) == (ref.finish_reason, ref.stop_reason)
    close_logprobs(choice.logprobs, ref.logprobs)
    assert choice.usage.completion_tokens == ref.usage.completion_tokens


def test_seeded_choices_equal_seed_plus_index_alone_and_top_level_is_choice_0(llm):
    prompts = ["ab", [5, 6, 7], {"prompt_token_ids": [9, 8]}]
    p = sp(n=3, seed=7, logprobs=2)
    outs = llm.generate(prompts, p)
    assert len(outs) == 3
    for prompt, out in zip(prompts, outs):
        assert isinstance(out, MultiChoiceOutput) and isinstance(out, RequestOutput)
        assert [c.index for c in out.outputs] == [0, 1, 2]
        assert all(type(c) is CompletionOutput for c in out.outputs)
        assert [c.request_id for c in out.outputs] == [f"{i}_{out.request_id}" for i in range(3)]
        for i, c in enumerate(out.outputs):
            same_choice(c, alone(llm, prompt, sp(seed=7 + i, logprobs=2)))
            assert len(c.logprobs) == len(c.token_ids) == 6
        c0 = out.outputs[0]
        assert (out.token_ids, out.text, out.finish_reason, out.stop_reason, out.logprobs,
                out.error) == (c0.token_ids, c0.text, c0.finish_reason, c0.stop_reason,
                               c0.logprobs, c0.error)
        assert out.finished and out.prompt_token_ids == c0.prompt_token_ids
        plen = len(out.prompt_token_ids)
        assert out.usage == Usage(plen, 18, plen + 18, out.usage.cached_tokens)
        assert len({tuple(c.token_ids) for c in out.outputs}) == 3  # seeds 7, 8, 9 differ
    # prompts map to outputs in input order
    assert outs[1].prompt_token_ids == [5, 6, 7] and outs[2].prompt_token_ids == [9, 8]


def test_mixed_n_batch_keeps_n1_outputs_and_batch_invariance(llm):
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    params = [sp(seed=3), sp(n=2, seed=11, max_tokens=4), sp(n=4, max_tokens=5)]
    a, b, c = llm.generate(prompts, params)
    # n == 1: exactly today's plain RequestOutput, its own only choice
    assert type(a) is RequestOutput and a.outputs == [a] and a.outputs[0] is a
    assert a.outputs[0].index == 0
    same_choice(a, alone(llm, prompts[0], sp(seed=3)))
    assert isinstance(b, MultiChoiceOutput) and len(b.outputs) == 2
    for i, ch in enumerate(b.outputs):
        same_choice(ch, alone(llm, prompts[1], sp(seed=11 + i, max_tokens=4)))
    # unseeded children are independent samples
    assert len(c.outputs) == 4 and all(len(ch.token_ids) == 5 for ch in c.outputs)
    assert len({tuple(ch.token_ids) for ch in c.outputs}) > 1
    assert not llm.engine.has_unfinished_requests()


def test_children_fed_through_a_small_waiting_queue():
    # 2 prompts x n=5 = 10 engine requests through a waiting queue of 2 and 3 running slots;
    # seed -5: choice 4's seed is -1, still a seed for a child (SamplingParams.child)
    llm = LLM("demo", max_num_seqs=3, max_waiting_requests=2, **KW)
    try:
        p = sp(n=5, seed=-5, max_tokens=3)
        outs = llm.generate([[1, 2], [3, 4, 5]], p)
        for prompt, out in zip([[1, 2], [3, 4, 5]], outs):
            assert [ch.index for ch in out.outputs] == list(range(5))
            for i, ch in enumerate(out.outputs):
                same_choice(ch, alone(llm, prompt, p.child(i)))
    finally:
        llm.shutdown()


def test_prompt_logprobs_with_n_are_the_prompts_once_on_top(llm):
    # vLLM: every child computes them (its params keep prompt_logprobs); the aggregated
    # RequestOutput carries those of the child that finished last: equal for every child
    p = sp(n=2, seed=1, prompt_logprobs=1, max_tokens=3)
    (out,) = llm.generate([[10, 11, 12, 13]], p)
    ref = alone(llm, [10, 11, 12, 13], sp(seed=1, prompt_logprobs=1, max_tokens=3))
    assert ref.prompt_logprobs is not None
    close_logprobs(out.prompt_logprobs, ref.prompt_logprobs)
    for ch in out.outputs:
        close_logprobs(ch.prompt_logprobs, ref.prompt_logprobs)
    assert any(out.engine_prompt_logprobs is ch.engine_prompt_logprobs for ch in out.outputs)


def test_greedy_n_is_refused_as_vllm(llm):
    with pytest.raises(SamplingParamsError, match="n"):
        SamplingParams(n=2, temperature=0)
    p = sp(n=2)
    p.temperature = 0.0  # mutated after construction: children (n = 1) would all be greedy
    with pytest.raises(InvalidRequestError) as e:
        llm.generate([[1, 2]], p)
    assert e.value.param == "n"
    with pytest.raises(InvalidRequestError) as e:
        llm.generate([[1, 2]], {"n": 2, "temperature": 0})
    assert e.value.param == "n"
    for bad in ({"n": 0}, {"n": "2"}, {"n": 129, "temperature": 1.0}):
        with pytest.raises(InvalidRequestError):
            llm.generate([[1, 2]], bad)
    assert not llm.engine.has_unfinished_requests()


def test_dict_params_and_chat_take_n(llm):
    (out,) = llm.generate([[1, 2]], {"n": 2, "seed": 4, "max_tokens": 3, "ignore_eos": True})
    assert [len(ch.token_ids) for ch in out.outputs] == [3, 3]
    same_choice(out.outputs[1], alone(llm, [1, 2], sp(seed=5, max_tokens=3)))
    msgs = [{"role": "user", "content": "hi"}]
    (chat,) = llm.chat(msgs, sp(n=2, seed=4, max_tokens=3))
    ids = llm.tokenizer.encode_chat(msgs, add_generation_prompt=True)
    (ref,) = llm.generate([ids], sp(n=2, seed=4, max_tokens=3))
    assert chat.prompt_token_ids == ids and len(chat.outputs) == 2
    for a, b in zip(chat.outputs, ref.outputs):
        same_choice(a, b)


def test_error_midway_aborts_every_child(llm):
    too_long = list(range(1, 250)) * 5  # over max_model_len (lowered to what the pool holds)
    with pytest.raises(PromptTooLongError):
        llm.generate([[1, 2], too_long], sp(n=3))
    assert not llm.engine.has_unfinished_requests()
    assert len(llm.generate([[1, 2]], sp(n=2))[0].outputs) == 2  # still serving


def test_choices_keep_their_own_finish_reasons_and_usage_sums():
    tok = load_tokenizer(None)
    scripts = {"0_llm-0": [65, 66], "1_llm-0": [67, 68, 69, 70], "2_llm-0": [71]}
    eng = LLMEngine(EngineConfig(model="demo"), runner=ScriptedRunner(scripts), tokenizer=tok)
    llm = LLM.from_engine(eng)
    (out,) = llm.generate([[1, 2, 3]], SamplingParams(n=3, max_tokens=3, temperature=1.0))
    got = [(ch.token_ids, ch.finish_reason, ch.text) for ch in out.outputs]
    assert got == [([65, 66, EOS], "stop", "AB"), ([67, 68, 69], "length", "CDE"),
                   ([71, EOS], "stop", "G")]
    assert (out.token_ids, out.finish_reason, out.text) == ([65, 66, EOS], "stop", "AB")
    assert out.usage.prompt_tokens == 3 and out.usage.completion_tokens == 3 + 3 + 2
    assert out.usage.total_tokens == 11
    assert [ch.usage.completion_tokens for ch in out.outputs] == [3, 3, 2]


def test_a_failed_choice_is_reported_on_that_choice():
    runner = FakeKVRunner(64)
    tok = load_tokenizer(None)
    eng = LLMEngine(EngineConfig(model="demo", max_num_seqs=1), runner=runner, tokenizer=tok)
    llm = LLM.from_engine(eng)
    runner.fail_next = 1  # the first step (choice 0 alone) fails
    (out,) = llm.generate([[1, 2, 3]], SamplingParams(n=2, max_tokens=4, ignore_eos=True))
    assert [ch.finish_reason for ch in out.outputs] == ["error", "length"]
    assert out.finish_reason == "error" and "injected step failure" in out.error
    assert out.outputs[1].error is None and len(out.outputs[1].token_ids) == 4


def test_request_output_layout_is_unchanged_and_composites_do_not_merge():
    # n > 1 adds no field to the stream delta (index is a property, choices only on the gather)
    # (the engine-form logprobs are attributes engine_*: `logprobs` / `prompt_logprobs` are
    # vLLM's dicts, properties; encoded, the fields keep their names)
    assert RequestOutput.__struct_encode_fields__ == (
        "request_id", "token_ids", "text", "finish_reason", "stop_reason", "usage", "logprobs",
        "error", "prompt_token_ids", "prompt_logprobs", "prompt_logprob_ranks",
        "cumulative_logprob", "logprob_ranks")
    assert RequestOutput.__struct_fields__[6] == "engine_logprobs"
    wire = msgspec.json.decode(msgspec.json.encode(RequestOutput("r", [1], "x")))
    assert "index" not in wire and "choices" not in wire
    multi = MultiChoiceOutput.gather("p", [RequestOutput("0_p", [1]), RequestOutput("1_p", [2])],
                                     1)
    with pytest.raises(TypeError, match="gathered whole"):
        multi.merge(RequestOutput("p", [3]))
