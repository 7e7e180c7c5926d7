"""Structured outputs (vLLM's guided decoding) end to end on the demo model (CPU): the
in-process API (SamplingParams.structured_outputs / guided_decoding), the OpenAI routes
(response_format, guided_*, structured_outputs) and the WebSocket `params`. The demo's random
weights would almost never write these texts unguided, so every check that the text obeys its
constraint is a check of the mask."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from websockets.asyncio.client import connect

from atom_stream import (
    AsyncEngine,
    EngineConfig,
    GuidedDecodingParams,
    SamplingParams,
    StructuredOutputsParams,
)
from atom_stream.errors import InvalidRequestError
from atom_stream.structured.dfa import DEAD, JsonDFA

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pet": {"enum": ["cat", "dog", None]}}, "required": ["name", "age", "pet"]}
CHOICES = ["red apple", "green", "blue (x)", "é?"]
PRICE = r"-?[1-9][0-9]{0,3}\.[0-9]{2}"


def _check_person(text: str) -> None:
    v = json.loads(text)
    assert set(v) == {"name", "age", "pet"}, text
    assert isinstance(v["name"], str) and len(v["name"]) <= 6
    assert type(v["age"]) is int and 0 <= v["age"] <= 120 and v["pet"] in ("cat", "dog", None)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_llm_texts_obey_choice_regex_and_schema(llm, seed):
    def params(**so):
        return SamplingParams(temperature=1.0, seed=seed, max_tokens=120,
                              structured_outputs=so)

    outs = llm.generate(["Pick", "Price", "Person"],
                        [params(choice=CHOICES), params(regex=PRICE), params(json=PERSON)])
    texts = [o.outputs[0].text for o in outs]
    assert [o.outputs[0].finish_reason for o in outs] == ["stop"] * 3, texts
    assert texts[0] in CHOICES
    assert re.fullmatch(PRICE, texts[1])
    _check_person(texts[2])


def test_json_object_is_json_or_a_valid_prefix_when_cut(llm):
    dfa = JsonDFA()
    for seed, ws in ((4, False), (5, True)):
        out = llm.generate("JSON", SamplingParams(
            temperature=1.0, seed=seed, max_tokens=40,
            guided_decoding=GuidedDecodingParams(json_object=True,
                                                 disable_any_whitespace=ws)))[0].outputs[0]
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), (dict, list))
        else:
            assert dfa.walk(dfa.start, out.text.encode()) != DEAD, out.text
        if ws:
            assert not any(c in out.text for c in " \n\t") or '"' in out.text


def test_unguided_rows_are_unchanged_by_guided_neighbours(llm):
    plain = SamplingParams(temperature=1.0, seed=9, max_tokens=12, ignore_eos=True)
    alone = llm.generate([[7, 8, 9]], plain)[0].outputs[0].token_ids
    mixed = llm.generate([[7, 8, 9], [1, 2], [3]], [
        plain, SamplingParams(seed=1, max_tokens=12, structured_outputs={"regex": PRICE}),
        SamplingParams(temperature=0.0, max_tokens=12, structured_outputs={"choice": CHOICES})])
    assert mixed[0].outputs[0].token_ids == alone
    assert re.fullmatch(PRICE, mixed[1].outputs[0].text)
    assert mixed[2].outputs[0].text in CHOICES


def test_n_choices_each_obey_and_logprobs_see_the_mask(llm):
    out = llm.generate("Pick", SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=20,
                                              logprobs=3,
                                              structured_outputs={"choice": CHOICES}))[0]
    assert len(out.outputs) == 3
    for c in out.outputs:
        assert c.text in CHOICES and c.finish_reason == "stop"
        # the first token's top-3 alternatives are only tokens some choice starts with
        first = {bytes([t]) for t in c.logprobs[0] if t < 256}
        assert first <= {s.encode()[:1] for s in CHOICES}


def test_bad_specs_are_errors_naming_the_field(llm):
    for so in ({"regex": "(?<=a)b"}, {"grammar": "root ::= 'x'"}, {"json": {"type": "tuple"}},
               {"json": "{not json"}, {"choice": []}, {"regex": "a", "choice": ["a"]}):
        with pytest.raises((InvalidRequestError, ValueError)) as e:
            llm.generate("x", SamplingParams(max_tokens=2, structured_outputs=so))
        assert "structured_outputs" in str(e.value) or getattr(e.value, "param", None) == \
            "structured_outputs", so
    with pytest.raises(ValueError):
        StructuredOutputsParams(regex="a", json_object=True)


async def test_async_bad_spec_leaves_nothing_and_others_finish():
    async with AsyncEngine(EngineConfig(model="demo", device="cpu", dtype="float32",
                                        num_kv_blocks=32)) as eng:
        free = eng.core.block_manager.num_free_blocks

        async def run(params):
            return "".join([o.text async for o in eng.generate("hello", params)])

        good = asyncio.ensure_future(run(SamplingParams(
            seed=3, max_tokens=30, structured_outputs={"regex": PRICE})))
        with pytest.raises(InvalidRequestError) as e:
            await run(SamplingParams(max_tokens=5, structured_outputs={"regex": "a{2,1}"}))
        assert e.value.param == "structured_outputs"
        assert re.fullmatch(PRICE, await good)
        assert not eng.core.requests
        assert eng.core.block_manager.num_free_blocks == free


def test_openai_response_format_and_guided_fields(http):
    chat = [{"role": "user", "content": "Give me a person"}]
    r = http.post("/v1/chat/completions", json={
        "messages": chat, "max_tokens": 120, "seed": 5, "response_format": {
            "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}})
    assert r.status_code == 200, r.text
    _check_person(r.json()["choices"][0]["message"]["content"])
    r = http.post("/v1/completions", json={"prompt": "Pick", "max_tokens": 20, "n": 2,
                                           "seed": 6, "guided_choice": CHOICES})
    assert r.status_code == 200, r.text
    assert all(c["text"] in CHOICES for c in r.json()["choices"])
    with http.stream("POST", "/v1/chat/completions", json={
            "messages": chat, "max_tokens": 40, "seed": 7, "stream": True,
            "guided_regex": PRICE}) as s:
        parts = [json.loads(line[6:]) for line in s.iter_lines()
                 if line.startswith("data: {")]
    text = "".join(p["choices"][0]["delta"].get("content") or "" for p in parts if p["choices"])
    assert re.fullmatch(PRICE, text), text
    r = http.post("/v1/chat/completions", json={"messages": chat, "max_tokens": 5,
                                                "guided_json": {"type": "object",
                                                                "multipleOf": 3}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "structured_outputs"
    r = http.post("/v1/chat/completions", json={"messages": chat, "max_tokens": 5,
                                                "response_format": {"type": "json_schema"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"


async def test_websocket_params_structured_outputs(srv):
    async with connect(srv.ws_url, subprotocols=["atom-stream.v1.json"]) as ws:
        await ws.send(json.dumps({"type": "generate", "id": "a", "prompt": "Pick", "params": {
            "max_tokens": 20, "seed": 2, "structured_outputs": {"choice": CHOICES}}}))
        await ws.send(json.dumps({"type": "generate", "id": "b", "prompt": "Pick", "params": {
            "max_tokens": 20, "structured_outputs": {"regex": "(?!x)"}}}))
        text, done = {"a": "", "b": ""}, {}
        while len(done) < 2:
            f = json.loads(await ws.recv())
            if f["type"] == "delta":
                text[f["id"]] += f["text"]
            elif f["type"] in ("done", "error"):
                done[f["id"]] = f
    assert done["a"]["type"] == "done" and text["a"] in CHOICES
    assert done["b"]["type"] == "error" and "structured_outputs" in done["b"]["message"]


def test_a_complete_grammar_wins_over_min_tokens(llm):
    """min_tokens bans the stop ids; once the grammar allows nothing else (the choice is
    written), the row would have no token left: the grammar's stop ids stay allowed."""
    out = llm.generate("Pick", SamplingParams(seed=3, max_tokens=20, min_tokens=15,
                                              structured_outputs={"choice": ["ab", "cd"]}))
    c = out[0].outputs[0]
    assert c.text in ("ab", "cd") and c.finish_reason == "stop"
