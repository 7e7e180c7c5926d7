"""Session 24 code review of 217e09c..HEAD: gaps found in the session's own changes.

- A --chat-template that transformers renders (loop controls `{% break %}` / `{% continue %}`,
  the `{% generation %}` tag) was refused at start-up: the new syntax check parsed it with a
  plain jinja2 Environment, not the environment that renders it.
- LLM.generate with no sampling_params and a dict prompt carrying `cache_salt`: the other
  prompts of the batch ran on SamplingParams() instead of the checkpoint's
  generation_config.json defaults (get_default_sampling_params), as they do without a salt.
- AsyncEngine.generate took vLLM's dict prompts but dropped their `cache_salt` (the request
  shared prefix-cache blocks with unsalted ones) and their `multi_modal_data` (the text was
  answered without the image), both of which LLM.generate honours / refuses.
- Over HTTP a flood past max_num_seqs + max_waiting_requests was still tokenized whole: the
  routes tokenize before generate, and AsyncEngine.check_room (called first) did not count the
  routes' own tokenizations in flight, so every concurrent request passed it (the 503s came
  after tokenizing). AsyncEngine.reserve now holds the places while a route tokenizes.
- The split-K GEMM warm-up compiled one launch per padded row count (16 / 32 / 64), but Triton
  also specializes the integer M (M == 1, M a multiple of 16): 16 and 32 rows were compiled on
  a request's path (eager steps, --enforce-eager).
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from engine_fakes import slow_chat_renders
from serving_helpers import running_server

from atom_stream import AsyncEngine, EngineConfig, SamplingParams
from atom_stream.errors import InvalidRequestError
from atom_stream.tokenizer import load_tokenizer, resolve_chat_template


@pytest.mark.parametrize("tag", ["{% break %}", "{% continue %}"])
def test_chat_template_with_loop_controls_loads_and_renders(tag):
    tpl = ("{% for m in messages %}{% if m['role'] == 'tool' %}" + tag + "{% endif %}"
           "{% generation %}[{{ m['content'] }}]{% endgeneration %}{% endfor %}")
    assert resolve_chat_template(tpl) == tpl
    tok = load_tokenizer("demo", chat_template=tpl)
    msgs = [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"},
            {"role": "user", "content": "c"}]
    want = "[a]" if tag == "{% break %}" else "[a][c]"
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == want
    with pytest.raises(ValueError, match="not a valid jinja template"):
        resolve_chat_template("{% for m in messages %}{% bogus %}{% endfor %}")


def test_salted_batch_keeps_the_checkpoint_defaults_for_every_prompt(llm, monkeypatch):
    defaults = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    monkeypatch.setitem(llm.__dict__, "_default_params", defaults)
    ids = [11, 12, 13, 14]
    plain, salted = llm.generate([ids, {"prompt_token_ids": ids, "cache_salt": "review"}])
    assert len(plain.token_ids) == len(salted.token_ids) == 20
    assert plain.token_ids == salted.token_ids  # both greedy from the defaults


async def test_async_engine_dict_prompt_salt_and_multi_modal_keys():
    kw = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 64}
    ids = [100 + (5 * i) % 47 for i in range(40)]  # two full blocks of 16, fresh
    g = SamplingParams(max_tokens=2, temperature=0)
    async with AsyncEngine(EngineConfig(model="demo", **kw)) as eng:
        async def cached(prompt, params=g) -> int:
            return [o async for o in eng.generate(prompt, params)][-1].usage.cached_tokens

        assert await cached(ids) == 0 and await cached(ids) == 32
        salted = {"prompt_token_ids": ids, "cache_salt": "tenant-a"}
        assert await cached(salted) == 0 and await cached(salted) == 32
        assert await cached({**salted, "cache_salt": "tenant-b"}, {"max_tokens": 2}) == 0
        assert await cached({**salted, "cache_salt": "tenant-c"}, None) == 0
        assert await cached(ids) == 32  # the unsalted blocks are still there
        for prompt, param in (({**salted, "cache_salt": ""}, "cache_salt"),
                              ({"prompt": "describe", "multi_modal_data": {"image": 1}},
                               "multi_modal_data")):
            with pytest.raises(InvalidRequestError) as e:
                await eng.generate(prompt, g).__anext__()
            assert e.value.param == param
        assert not eng.core.requests and not eng._tokenizing
        outs = [o async for o in eng.generate({"prompt": "describe", "multi_modal_data": None},
                                              g)]
        assert outs[-1].finish_reason == "length"


def test_http_flood_past_the_bound_is_refused_before_tokenizing():
    with running_server({"max_num_seqs": 2, "max_waiting_requests": 2,
                         "num_kv_blocks": 64}) as srv:
        calls = slow_chat_renders(srv.engine.tokenizer, 0.3)

        async def burst() -> list[int]:
            body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 3}
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                rs = await asyncio.gather(*(c.post("/v1/chat/completions", json=body)
                                            for _ in range(10)))
            return sorted(r.status_code for r in rs)

        for _ in range(2):  # the second burst: the places held while tokenizing came back
            calls.clear()
            codes = asyncio.run(burst())
            assert set(codes) == {200, 503} and codes.count(200) >= 4
            assert len(calls) == codes.count(200)  # only the admitted ones were rendered
            assert srv.wait_idle()["num_streams"] == 0 and srv.engine._reserved == 0


def test_splitk_warmup_rows_cover_every_launch_variant():
    specialize = pytest.importorskip("triton._C.libtriton").native_specialize_impl
    from atom_stream.kernels.gemm_splitk import MAX_M, block_m
    from triton.backends.compiler import BaseBackend

    from atom_stream.engine.kernel_warmup import splitk_warmup_rows

    def variant(m: int):  # what Triton compiles separately for the launch's M
        return block_m(m), specialize(BaseBackend, m, False, True, True)

    for lo, hi in ((2, 32), (3, 16), (1, MAX_M), (2, 2 * MAX_M)):
        rows = splitk_warmup_rows(lo, hi)
        assert all(lo <= m <= min(hi, MAX_M) for m in rows)
        warmed = {variant(m) for m in rows}
        missing = [m for m in range(lo, min(hi, MAX_M) + 1) if variant(m) not in warmed]
        assert not missing, f"{lo}..{hi}: rows {missing} compile on a request's path"
        assert len(warmed) == len(rows)  # one launch per variant
    assert splitk_warmup_rows(2, 0) == []  # 0 = cuBLAS: nothing to compile
