"""Session 26 lead fixes: completions take `logprobs` / `prompt_logprobs` true / false as vLLM's
pydantic reads them (1 / 0); the `tokenize` chat template kwarg is vLLM's 400 on every path (the
in-process API and the WebSocket too, not only the HTTP chat route)."""

from __future__ import annotations

import random

import pytest

from atom_stream import AsyncEngine, SamplingParams
from atom_stream.config import EngineConfig
from atom_stream.errors import InvalidRequestError


def test_completion_logprobs_bools_are_read_as_vllm_reads_them(http):
    prompt = f"bool logprobs {random.Random().randrange(10**6)}"
    body = {"prompt": prompt, "max_tokens": 3, "temperature": 0}
    bodies = {}
    for value in (True, 1, False, 0):
        r = http.post("/v1/completions", json={**body, "logprobs": value})
        assert r.status_code == 200, r.text
        bodies[value] = r.json()["choices"][0]["logprobs"]
    assert bodies[True] == bodies[1] and len(bodies[True]["top_logprobs"][0]) == 1
    assert bodies[False] == bodies[0] and bodies[False]["token_logprobs"][0] is not None
    r = http.post("/v1/completions", json={**body, "prompt_logprobs": True, "max_tokens": 1})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["prompt_logprobs"][0] is None  # the first prompt token


async def test_tokenize_template_kwarg_is_refused_in_process():
    async with AsyncEngine(EngineConfig(num_kv_blocks=64)) as engine:
        with pytest.raises(InvalidRequestError, match="tokenize"):
            async for _ in engine.generate([{"role": "user", "content": "hi"}],
                                           SamplingParams(max_tokens=2),
                                           chat_template_kwargs={"tokenize": True}):
                pass
        out = [o async for o in engine.generate("still serving", SamplingParams(max_tokens=2))]
        assert out[-1].finish_reason is not None
