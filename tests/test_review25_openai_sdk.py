"""The official `openai` SDK (in the [test] extra) against a live demo server, as an
application developer uses it: the responses parse into the SDK's models, errors map onto its
exception classes, and a client that gives up on a queued request frees its place at once."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from serving_helpers import running_server

MSGS = [{"role": "user", "content": "review 25 sdk"}]
LONG = {"max_completion_tokens": 3000, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def srv():
    # one running slot: a second request waits in the queue while the first one decodes
    with running_server({"max_num_seqs": 1, "max_waiting_requests": 2}) as s:
        yield s


def _client(srv, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="k", max_retries=0,
                         http_client=httpx.Client(trust_env=False), **kw)


def _wait(srv, pred, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = srv.stats()
        if pred(s) or time.monotonic() > deadline:
            return s
        time.sleep(0.05)


@pytest.mark.parametrize("stream", [False, True])
def test_queued_request_freed_when_client_leaves(srv, stream):
    """vLLM's with_cancellation: a client that disconnects while its request is still queued
    (no first token yet) aborts it then, not when the scheduler finally admits it."""
    c = _client(srv)
    with c.chat.completions.create(model="demo", messages=MSGS, stream=True, **LONG) as hog:
        next(iter(hog))  # running, and stays so for thousands of tokens
        assert _wait(srv, lambda s: s["num_running"] == 1, 10)["num_running"] == 1
        impatient = _client(srv, timeout=0.6)
        with pytest.raises(openai.APITimeoutError):
            r = impatient.chat.completions.create(model="demo", messages=MSGS, stream=stream,
                                                  max_completion_tokens=4)
            list(r) if stream else None
        s = _wait(srv, lambda s: s["num_waiting"] == 0, 3)
        assert s["num_waiting"] == 0 and s["num_running"] == 1, s
    assert srv.wait_idle()["num_running"] == 0


async def test_models_retrieve(srv):
    """client.models.retrieve (GET /v1/models/{model}): the served name's card (as
    models.list gives it); another name is openai.NotFoundError with vLLM's body."""
    c = openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key="k", max_retries=0)
    listed = (await c.models.list()).data[0]
    card = await c.models.retrieve(listed.id)
    assert card.model_dump() == listed.model_dump()
    assert card.id == "demo" and card.object == "model"
    with pytest.raises(openai.NotFoundError) as e:
        await c.models.retrieve("review25/unknown")
    assert e.value.param == "model" and "review25/unknown" in e.value.message
    await c.close()


def _extras(obj, path: str = "", out: dict | None = None) -> dict:
    """model_extra keys of an SDK object tree, by dotted path (lists as [])."""
    from pydantic import BaseModel

    out = {} if out is None else out
    if isinstance(obj, BaseModel):
        if obj.model_extra:
            out.setdefault(path or "$", set()).update(obj.model_extra)
        for k in type(obj).model_fields:
            _extras(getattr(obj, k), f"{path}.{k}", out)
    elif isinstance(obj, list):
        for v in obj:
            _extras(v, f"{path}[]", out)
    return out


def test_sdk_models_round_trip(srv):
    """Chat (n=2, logprobs, stream with usage) and completions parse into the SDK's models and
    validate again from model_dump(); the only keys the SDK does not know are vLLM's extras."""
    c = _client(srv)
    r = c.chat.completions.create(model="demo", messages=MSGS, n=2, logprobs=True,
                                  top_logprobs=2, max_completion_tokens=3, seed=3)
    type(r).model_validate(r.model_dump())
    assert len(r.choices) == 2 and len(r.choices[0].logprobs.content[0].top_logprobs) == 2
    allowed = {"prompt_logprobs", "prompt_token_ids", "stop_reason", "token_ids",
               "reasoning_content", "service_tier", "kv_transfer_params"}
    assert set().union(*_extras(r).values()) <= allowed
    chunks = list(c.chat.completions.create(  # ignore_eos: random sampling can end early
        model="demo", messages=MSGS, n=2, max_completion_tokens=3, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    for ch in chunks:
        type(ch).model_validate(ch.model_dump())
        assert set().union(set(), *_extras(ch).values()) <= allowed
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    cmpl = c.completions.create(model="demo", prompt=["a b", "c d"], max_tokens=2,
                                extra_body={"return_token_ids": True, "top_k": 3})
    type(cmpl).model_validate(cmpl.model_dump())
    assert len(cmpl.choices) == 2 and set().union(*_extras(cmpl).values()) <= allowed
