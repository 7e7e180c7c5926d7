"""Session 24 API review: vLLM's SamplingParams / LLM surface as vLLM users write it.

- `SamplingParams(stop=None, stop_token_ids=None)`: None is vLLM's default for both (no stop
  strings / ids); it was refused as "must be a string or a list of strings".
- `spaces_between_special_tokens` (vLLM's field) is accepted and checked as a boolean; it was
  an unknown keyword (TypeError) in SamplingParams, in a params dict and in a WebSocket frame.
- `SamplingParams.clone()` (vLLM's deep copy) exists; `repr` lists the public fields only (the
  engine's `_bad_words_token_ids` slot was printed).
- `LLM.get_tokenizer()` (vLLM's) returns the engine's tokenizer; `use_tqdm` may be a tqdm-like
  callable, as in vLLM (it was ignored for tqdm.auto).
- A dict prompt's `cache_salt` (vLLM's TextPrompt / TokensPrompt key) salts that prompt's
  prefix-cache blocks (it was ignored: the prompt shared blocks with unsalted requests); its
  `multi_modal_data` is refused (it was ignored: the text was answered without the image).
"""

from __future__ import annotations

import pytest

from atom_stream import AsyncEngine, EngineConfig, SamplingParams
from atom_stream.errors import InvalidRequestError
from atom_stream.sampling_params import SamplingParamsError

GREEDY = {"max_tokens": 5, "temperature": 0, "ignore_eos": True}


def test_none_stop_and_stop_token_ids_mean_none(llm):
    p = SamplingParams(stop=None, stop_token_ids=None, bad_words=None, **GREEDY)
    assert (p.stop, p.stop_token_ids, p.bad_words) == ([], [], [])
    want = llm.generate([[7, 8, 9]], SamplingParams(**GREEDY))[0].token_ids
    (out,) = llm.generate([[7, 8, 9]], p)
    assert out.token_ids == want and out.finish_reason == "length"
    # a dict of params (the SGLang form) reads None the same way
    (out,) = llm.generate([[7, 8, 9]], {"stop": None, "stop_token_ids": None, **GREEDY})
    assert out.token_ids == want
    for bad in ({"stop": 5}, {"stop_token_ids": "7"}):
        with pytest.raises(SamplingParamsError) as e:
            SamplingParams(**bad)
        assert e.value.param == next(iter(bad))


@pytest.mark.parametrize("value", [True, False])
def test_spaces_between_special_tokens_is_accepted(llm, value):
    p = SamplingParams(spaces_between_special_tokens=value, skip_special_tokens=False, **GREEDY)
    assert p.spaces_between_special_tokens is value
    assert SamplingParams().spaces_between_special_tokens is True  # vLLM's default
    want = llm.generate([[7, 8, 9]], SamplingParams(skip_special_tokens=False, **GREEDY))[0]
    (out,) = llm.generate([[7, 8, 9]], p)
    assert (out.token_ids, out.text) == (want.token_ids, want.text)
    (out,) = llm.generate([[7, 8, 9]], {"spaces_between_special_tokens": value, **GREEDY})
    assert out.token_ids == want.token_ids


@pytest.mark.parametrize("value", ["false", 0, None])
def test_spaces_between_special_tokens_must_be_a_boolean(value):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(spaces_between_special_tokens=value)
    assert e.value.param == "spaces_between_special_tokens"


def test_clone_is_a_deep_copy_and_repr_shows_public_fields():
    p = SamplingParams(stop=["x"], stop_token_ids=[3], logit_bias={5: 1.0}, seed=4,
                       bad_words=["w"], temperature=0.5)
    q = p.clone()
    assert q == p and q is not p and type(q) is SamplingParams
    q.stop.append("y")
    q.stop_token_ids.append(4)
    q.logit_bias[6] = 2.0
    q.bad_words.append("v")
    assert (p.stop, p.stop_token_ids, p.logit_bias, p.bad_words) == (
        ["x"], [3], {5: 1.0}, ["w"])
    r = repr(p)
    assert r.startswith("SamplingParams(n=1, ") and "temperature=0.5" in r
    assert "stop=['x']" in r and "seed=4" in r and "_bad_words" not in r


def test_get_tokenizer_is_the_engines(llm):
    tok = llm.get_tokenizer()
    assert tok is llm.engine.tokenizer
    ids = tok.encode("hello")
    (out,) = llm.generate("hello", SamplingParams(**GREEDY))
    assert out.prompt_token_ids == ids


def test_use_tqdm_takes_a_callable(llm):
    made = []

    class Bar:
        def __init__(self, **kw):
            made.append(kw)
            self.n = 0

        def update(self, k):
            self.n += k

        def close(self):
            made.append(self.n)

    outs = llm.generate(["a", "b", "c"], SamplingParams(**GREEDY), use_tqdm=Bar)
    assert len(outs) == 3 and made[0]["total"] == 3 and made[-1] == 3
    made.clear()
    llm.chat([{"role": "user", "content": "hi"}], SamplingParams(**GREEDY), use_tqdm=Bar)
    assert made[0]["total"] == 1 and made[-1] == 1


async def test_async_engine_takes_the_new_params_dict_forms():
    kw = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 32}
    async with AsyncEngine(EngineConfig(model="demo", **kw)) as eng:
        params = {"stop": None, "stop_token_ids": None, "spaces_between_special_tokens": False,
                  **GREEDY}
        outs = [o async for o in eng.generate([5, 6, 7], params)]
        assert sum(len(o.token_ids) for o in outs) == 5 and outs[-1].finish_reason == "length"
        with pytest.raises(InvalidRequestError) as e:
            async for _ in eng.generate([5, 6], {"spaces_between_special_tokens": "no"}):
                pass
        assert e.value.param == "spaces_between_special_tokens"


def test_dict_prompt_cache_salt_salts_that_prompt(llm):
    ids = [200 + (7 * i) % 53 for i in range(40)]  # two full blocks of 16, fresh
    g = SamplingParams(max_tokens=2, temperature=0)

    def cached(prompt, params=g) -> int:
        return llm.generate([prompt], params)[0].usage.cached_tokens

    assert cached(ids) == 0 and cached(ids) == 32
    salted = {"prompt_token_ids": ids, "cache_salt": "tenant-a"}
    assert cached(salted) == 0 and cached(salted) == 32
    assert cached({"prompt_token_ids": ids, "cache_salt": "tenant-b"}, [g]) == 0
    assert cached({**salted, "prompt": "ignored"}, {"max_tokens": 2}) == 32
    assert cached(ids) == 32  # the unsalted blocks are still there
    # a batch: only the salted prompt is salted
    outs = llm.generate([ids, {"prompt_token_ids": ids, "cache_salt": "tenant-c"}], g)
    assert [o.usage.cached_tokens for o in outs] == [32, 0]
    with pytest.raises(InvalidRequestError) as e:
        llm.generate({"prompt_token_ids": ids, "cache_salt": ""}, g)
    assert e.value.param == "cache_salt"


def test_dict_prompt_multi_modal_data_is_refused(llm):
    g = SamplingParams(**GREEDY)
    with pytest.raises(InvalidRequestError) as e:
        llm.generate({"prompt": "describe", "multi_modal_data": {"image": object()}}, g)
    assert e.value.param == "multi_modal_data"
    assert not llm.engine.has_unfinished_requests()
    (out,) = llm.generate({"prompt": "describe", "multi_modal_data": None}, g)
    assert out.finish_reason == "length"
