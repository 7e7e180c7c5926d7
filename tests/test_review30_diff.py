"""Review of session 30's diff (Anthropic /v1/messages, OpenAI /v1/responses, the chat route's
open_chat refactor, x-api-key auth): regressions and bugs found by reading the code, each
checked over the scripted engine (test_tool_calls.ScriptedChat)."""
# ruff: noqa: F811 - the `on` / `off` fixtures imported from test_tool_calls are test arguments

from __future__ import annotations

import json

from test_tool_calls import KIMI_OUT, TOOLS, chunks, off, on  # noqa: F401 - fixtures

R_TOOLS = [{"type": "function", "name": t["function"]["name"], "parameters": {"type": "object"}}
           for t in TOOLS]


def _capture_prompts(engine):
    """Record every prompt the scripted engine renders; returns (list, undo)."""
    seen: list = []
    original = engine.tokenize_prompt

    async def tokenize_prompt(prompt, chat_template_kwargs=None, **kwargs):
        seen.append(prompt)
        return await original(prompt, chat_template_kwargs, **kwargs)

    engine.tokenize_prompt = tokenize_prompt

    def undo():
        del engine.tokenize_prompt
    return seen, undo


def test_stored_conversation_keeps_text_split_by_tool_calls(on):
    """A streamed answer whose text goes on after its tool calls has two message items; the
    stored conversation (previous_response_id) carries all of its text, as the non-streamed
    answer's one message item does."""
    c, engine = on
    engine.script = ["Need", " tools.", "</think>", *chunks(KIMI_OUT + " Done.", 7)]
    got = []
    for stream in (False, True):
        r = c.post("/v1/responses", json={"input": "Weather?", "tools": R_TOOLS,
                                          "stream": stream})
        assert r.status_code == 200, r.text
        if stream:
            rid = json.loads(r.text.rstrip().split("\n")[-1].removeprefix("data: "))[
                "response"]["id"]
        else:
            rid = r.json()["id"]
        seen, undo = _capture_prompts(engine)
        try:
            engine.script = ["</think>", "ok"]
            r = c.post("/v1/responses", json={"input": "More?", "previous_response_id": rid})
            assert r.status_code == 200, r.text
        finally:
            undo()
            engine.script = ["Need", " tools.", "</think>", *chunks(KIMI_OUT + " Done.", 7)]
        (messages,) = seen
        got.append(messages[1])
    for asst in got:
        assert asst["role"] == "assistant"
        assert asst["content"] == "Let me check. Done."
        assert asst["reasoning_content"] == "Need tools."
        assert [t["function"]["name"] for t in asst["tool_calls"]] == ["get_weather",
                                                                       "get_time"]


def test_response_store_is_bounded_in_bytes(monkeypatch):
    """The store is bounded by the bytes it holds, not only by its count: large stored bodies
    (here 16 KiB of metadata each, OpenAI's field, echoed and stored) push the oldest out."""
    from test_tool_calls import ScriptedChat, _client

    from atom_stream.server import responses_api

    monkeypatch.setattr(responses_api, "STORE_BYTES", 64 << 10)
    engine = ScriptedChat()
    with _client(engine) as c:
        ids = []
        for k in range(10):
            r = c.post("/v1/responses", json={"input": f"x{k}",
                                              "metadata": {"k": "v" * (16 << 10)}})
            assert r.status_code == 200, r.text
            ids.append(r.json()["id"])
        assert c.get(f"/v1/responses/{ids[0]}").status_code == 404
        last = c.get(f"/v1/responses/{ids[-1]}")
        assert last.status_code == 200 and last.json()["metadata"]["k"] == "v" * (16 << 10)
        engine.script = ["ok"]
        assert c.post("/v1/responses", json={"input": "more", "previous_response_id": ids[-1]}
                      ).status_code == 200


def test_response_store_accounting():
    from atom_stream.protocol import ChatMessage
    from atom_stream.server.responses_api import ResponseStore

    store = ResponseStore(size=8, max_bytes=200)
    store.put("a", {"t": "x" * 50}, [ChatMessage(role="user", content="hi")])
    store.put("a", {"t": "x" * 50}, [])  # replaced, not counted twice
    assert list(store._items) == ["a"] and 50 < store.nbytes < 100
    store.put("b", {"t": "y" * 150}, [])  # over 200 in all: a goes
    assert store.get("a") is None and store.get("b") is not None
    store.put("big", {"t": "z" * 300}, [])  # larger than the whole budget: not kept
    assert store.get("big") is None and store.get("b") is not None  # b stays
    assert store.pop("b") and store.nbytes == 0


def _split_after_last_arguments() -> list[str]:
    """Kimi output whose last piece holds a call's last arguments, its end markers and the
    text after them: one parser delta with arguments and content."""
    text = KIMI_OUT + " Done."
    cut = text.index("{}<|tool_call_end|>")
    return ["Need.", "</think>", text[:cut], text[cut:]]


def test_streamed_arguments_before_text_in_one_delta_anthropic(on):
    """Anthropic stream: arguments that end a call and text after it, parsed from one engine
    delta, both reach the client (the arguments in the open tool_use block, then a text
    block), as the non-streamed answer has them."""
    c, engine = on
    engine.script = _split_after_last_arguments()
    tools = [{"name": t["function"]["name"], "input_schema": {"type": "object"}}
             for t in TOOLS]
    body = {"model": "demo", "max_tokens": 64, "tools": tools,
            "messages": [{"role": "user", "content": "Weather?"}]}
    whole = c.post("/v1/messages", json=body).json()
    r = c.post("/v1/messages", json={**body, "stream": True})
    blocks: dict[int, dict] = {}
    for record in filter(None, r.text.split("\n\n")):
        data = json.loads(record.split("\n")[1].removeprefix("data: "))
        if data["type"] == "content_block_start":
            blocks[data["index"]] = dict(data["content_block"], partial="")
        elif data["type"] == "content_block_delta":
            d, b = data["delta"], blocks[data["index"]]
            b["partial"] += d.get("partial_json", "")
            for key in ("text", "thinking"):
                b[key] = b.get(key, "") + d.get(key, "")
    calls = [(b["name"], json.loads(b["partial"] or "{}")) for b in blocks.values()
             if b["type"] == "tool_use"]
    assert calls == [(b["name"], b["input"]) for b in whole["content"]
                     if b["type"] == "tool_use"]
    assert calls[-1] == ("get_time", {}) and blocks[3]["partial"] == "{}"
    texts = "".join(b["text"] for b in blocks.values() if b["type"] == "text")
    assert texts == "Let me check. Done." == "".join(
        b["text"] for b in whole["content"] if b["type"] == "text")


def test_streamed_arguments_before_text_in_one_delta_responses(on):
    c, engine = on
    engine.script = _split_after_last_arguments()
    r = c.post("/v1/responses", json={"input": "Weather?", "tools": R_TOOLS, "stream": True})
    events = [json.loads(rec.split("\n")[1].removeprefix("data: "))
              for rec in filter(None, r.text.split("\n\n"))]
    args: dict[str, str] = {}
    for e in events:
        if e["type"] == "response.function_call_arguments.delta":
            args[e["item_id"]] = args.get(e["item_id"], "") + e["delta"]
    final = events[-1]["response"]
    calls = [o for o in final["output"] if o["type"] == "function_call"]
    assert [(o["name"], o["arguments"]) for o in calls] == [
        ("get_weather", '{"city": "Paris"}'), ("get_time", "{}")]
    assert [args.get(o["id"], "") for o in calls] == ['{"city": "Paris"}', "{}"]
    texts = [p["text"] for o in final["output"] if o["type"] == "message" for p in o["content"]]
    assert "".join(texts) == "Let me check. Done."
