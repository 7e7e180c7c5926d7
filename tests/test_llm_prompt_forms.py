"""atom_stream.LLM.generate / AsyncEngine.generate take the prompt and parameter forms vLLM and
SGLang users write: token ids positionally, vLLM's {"prompt_token_ids"} / {"prompt"} dicts, a
plain dict of sampling parameters; anything else is a clear InvalidRequestError."""

from __future__ import annotations

import pytest

from atom_stream import LLM, SamplingParams
from atom_stream.config import EngineConfig
from atom_stream.engine.async_engine import AsyncEngine
from atom_stream.errors import InvalidRequestError

KW = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 64}
PARAMS = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}


def test_prompt_forms_give_the_same_tokens(llm):
    p = SamplingParams(**PARAMS)
    want = [o.token_ids for o in llm.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=p)]
    for prompts in ([[5, 6, 7]], [5, 6, 7], [{"prompt_token_ids": [5, 6, 7]}],
                    {"prompt_token_ids": [5, 6, 7]}):
        assert [o.token_ids for o in llm.generate(prompts, p)] == want, prompts
    assert [o.token_ids for o in llm.generate([5, 6, 7], dict(PARAMS))] == want
    text = [o.token_ids for o in llm.generate("abc", p)]
    assert [o.token_ids for o in llm.generate([{"prompt": "abc"}], p)] == text


def test_numpy_and_torch_integer_ids_are_token_ids(llm):
    """vLLM compares ids with the vocabulary only: numpy integers (and 1-d arrays of them) are
    ids; a bool and a float are not."""
    import numpy as np
    p = SamplingParams(**PARAMS)
    want = [o.token_ids for o in llm.generate([[5, 6, 7]], p)]
    for ids in ([np.int64(5), np.int32(6), 7], np.array([5, 6, 7]), [np.array([5, 6, 7])]):
        assert [o.token_ids for o in llm.generate(prompt_token_ids=ids, sampling_params=p)] \
            == want, ids
    assert [o.token_ids for o in llm.generate([np.array([5, 6, 7])], p)] == want
    assert [o.token_ids for o in llm.generate(list(np.array([5, 6, 7])), p)] == want
    for bad in ([5, True], [5, np.float32(6.0)], [5, 10**9]):
        with pytest.raises(InvalidRequestError, match="is not a token id"):
            llm.generate(prompt_token_ids=[bad], sampling_params=p)
    assert llm.llm_engine.block_manager.num_used == 0


@pytest.mark.parametrize("prompts", [[3.5], [{"text": "x"}], [None]])
def test_bad_prompt_forms_are_clear_errors(llm, prompts):
    with pytest.raises(InvalidRequestError, match="prompt"):
        llm.generate(prompts, SamplingParams(**PARAMS))
    assert not llm.engine.has_unfinished_requests()


async def test_async_engine_takes_a_params_dict():
    async with AsyncEngine(EngineConfig(model="demo", **KW)) as eng:
        outs = [o async for o in eng.generate([5, 6, 7], dict(PARAMS))]
        assert sum(len(o.token_ids) for o in outs) == 4 and outs[-1].finish_reason == "length"
        for bad in ({"bogus": 1}, {"max_tokens": "4"}, "max_tokens=4"):
            with pytest.raises(InvalidRequestError):
                async for _ in eng.generate([5, 6], bad):
                    pass
        assert eng.stats()["used_blocks"] == 0


async def test_text_prompts_get_the_tokenizers_own_prefix(tmp_path):
    # as vLLM: a text prompt is encoded with add_special_tokens=True, so a DeepSeek-style HF
    # tokenizer (BOS post-processor) gives it a BOS; AsyncEngine.generate(add_special_tokens=
    # False) and token-id prompts get none (the demo / Kimi tokenizers add none: test_tokenizer)
    from tokenizer_fixtures import write_hf_tokenizer
    path = write_hf_tokenizer(str(tmp_path / "tok"), add_bos=True)
    llm = LLM("demo", tokenizer=path, **KW)
    try:
        tok = llm.engine.tokenizer
        ids = tok.encode("hello world")
        (out,) = llm.generate("hello world", SamplingParams(**PARAMS))
        assert out.prompt_token_ids == [tok.bos_token_id, *ids]
        (out,) = llm.generate([ids], SamplingParams(**PARAMS))
        assert out.prompt_token_ids == ids
    finally:
        llm.engine.shutdown()
    async with AsyncEngine(EngineConfig(model="demo", tokenizer=path, **KW)) as eng:
        for add, want in ((True, [tok.bos_token_id, *ids]), (False, ids)):
            outs = [o async for o in eng.generate("hello world", dict(PARAMS),
                                                  add_special_tokens=add)]
            assert outs[0].prompt_token_ids == want, add


def test_llm_shutdown_is_idempotent_and_a_context_manager():
    with LLM("demo", **KW) as llm:
        (out,) = llm.generate([5, 6, 7], SamplingParams(**PARAMS))
        assert len(out.token_ids) == 4
    assert llm.engine.runner.kv_caches == []  # the KV pool was dropped
    llm.shutdown()  # again: nothing
