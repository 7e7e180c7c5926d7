"""OpenAI-compatible HTTP API against a real uvicorn server (demo model, CPU, free port).

Covers: the official `openai` package streaming chat and completions with include_usage; streamed
and non-streamed greedy text agree; SSE bytes framed exactly as vLLM frames them; n, logprobs,
echo, stop, seed, continuous usage; every error status (400 naming the param, prompt too long,
404, 413 while reading, 503 + Retry-After on overload, 503 health when dead, an error event then
[DONE] after the stream began) with the server serving normally afterwards; a client disconnect
aborts the request (KV blocks back to zero); /tokenize, /detokenize, /v1/models, /version,
/metrics.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time

import httpx
import openai
import pytest
from serving_helpers import running_server

CHAT = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def tiny():
    with running_server({"max_num_seqs": 1, "max_waiting_requests": 1}) as s:
        yield s


@pytest.fixture(scope="module")
def oai(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


def sse_events(raw: bytes) -> list[bytes]:
    """Split an SSE body into event payloads, asserting vLLM's exact framing."""
    assert raw.endswith(b"data: [DONE]\n\n")
    parts = raw.split(b"\n\n")
    assert parts[-1] == b""
    events = []
    for p in parts[:-1]:
        assert p.startswith(b"data: "), p
        assert b"\n" not in p
        events.append(p[len(b"data: "):])
    return events


def assert_error(resp: httpx.Response, status: int, param: str | None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status and err["param"] == param and err["message"]
    return err


# ------------------------------------------------------------------------------- openai SDK
def test_openai_sdk_chat_stream_with_usage_matches_non_stream(oai):
    stream = oai.chat.completions.create(model="demo", messages=CHAT, max_tokens=8,
                                         temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "length" and all(f is None for f in finish[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 8
    full = oai.chat.completions.create(model="demo", messages=CHAT, max_tokens=8, temperature=0)
    assert full.choices[0].message.content == text
    assert full.choices[0].message.role == "assistant"
    assert full.usage.completion_tokens == 8 and full.choices[0].finish_reason == "length"
    assert full.id.startswith("chatcmpl-") and full.object == "chat.completion"


def test_openai_sdk_completion_stream_with_usage_matches_non_stream(oai):
    stream = oai.completions.create(model="demo", prompt="Once upon a time", max_tokens=8,
                                    temperature=0, stream=True,
                                    stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == len("Once upon a time")  # byte-level tokenizer
    full = oai.completions.create(model="demo", prompt="Once upon a time", max_tokens=8,
                                  temperature=0)
    assert full.choices[0].text == text and full.usage.completion_tokens == 8


# ------------------------------------------------------------------------------- SSE bytes
def test_chat_sse_bytes_match_vllm(http):
    body = {"model": "demo", "messages": CHAT, "max_tokens": 6, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read()
    events = sse_events(raw)
    assert events[-1] == b"[DONE]"
    first = json.loads(events[0])
    rid, created = first["id"], first["created"]
    head = (b'{"id":"%s","object":"chat.completion.chunk","created":%d,"model":"demo",'
            b'"choices":[' % (rid.encode(), created))
    assert events[0] == head + (b'{"index":0,"delta":{"role":"assistant","content":""},'
                                b'"logprobs":null,"finish_reason":null}]}')
    text = ""
    for ev in events[1:-3]:
        m = re.fullmatch(re.escape(head) + rb'\{"index":0,"delta":\{"content":(".*")\},'
                         rb'"logprobs":null,"finish_reason":null\}\]\}', ev)
        assert m, ev
        text += json.loads(m.group(1))
    m = re.fullmatch(re.escape(head) + rb'\{"index":0,"delta":\{"content":(".*")\},'
                     rb'"logprobs":null,"finish_reason":"length","stop_reason":null\}\]\}',
                     events[-3])
    assert m, events[-3]
    text += json.loads(m.group(1))
    usage = json.loads(events[-2])["usage"]
    assert events[-2] == head[:-len(b'"choices":[')] + (
        b'"choices":[],"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":6}}'
        % (usage["prompt_tokens"], usage["prompt_tokens"] + 6))
    full = http.post("/v1/chat/completions", json={**body, "stream": False,
                                                   "stream_options": None}).json()
    assert full["choices"][0]["message"]["content"] == text


def test_completion_sse_bytes_match_vllm(http):
    body = {"model": "demo", "prompt": "abc", "max_tokens": 4, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        raw = r.read()
    events = sse_events(raw)
    first = json.loads(events[0])
    head = (b'{"id":"%s","object":"text_completion","created":%d,"model":"demo","choices":'
            % (first["id"].encode(), first["created"]))
    for ev in events[:-2]:
        assert re.fullmatch(re.escape(head) + rb'\[\{"index":0,"text":".*","logprobs":null,'
                            rb'"finish_reason":null,"stop_reason":null\}\],"usage":null\}', ev), ev
    assert re.fullmatch(re.escape(head) + rb'\[\{"index":0,"text":".*","logprobs":null,'
                        rb'"finish_reason":"length","stop_reason":null\}\],"usage":null\}',
                        events[-2]), events[-2]
    assert events[-1] == b"[DONE]"  # no include_usage: no usage chunk


def test_continuous_usage_and_n(http):
    body = {"messages": CHAT, "max_tokens": 3, "n": 2, "temperature": 1.0, "seed": 7,
            "stream": True, "stream_options": {"include_usage": True,
                                               "continuous_usage_stats": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        events = sse_events(r.read())
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["choices"][0]["index"] for c in chunks if c["choices"]} == {0, 1}
    assert all("usage" in c for c in chunks)
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 2 and all(c["usage"]["completion_tokens"] == 3 for c in finals)
    assert chunks[-1]["usage"]["completion_tokens"] == 6
    full = http.post("/v1/chat/completions", json={**body, "stream": False,
                                                   "stream_options": None}).json()
    assert [c["index"] for c in full["choices"]] == [0, 1]
    assert full["usage"]["completion_tokens"] == 6


# ------------------------------------------------------------------------------- features
def test_logprobs_echo_stop_seed(http, oai, srv):
    r = oai.chat.completions.create(model="demo", messages=CHAT, max_tokens=3, temperature=0,
                                    logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob <= 0 and t.bytes == list(t.token.encode()) for t in content)
    c = http.post("/v1/completions", json={"prompt": "abcd", "max_tokens": 2, "temperature": 0,
                                           "logprobs": 1, "echo": True}).json()
    choice = c["choices"][0]
    assert choice["text"].startswith("abcd")
    lp = choice["logprobs"]
    assert lp["tokens"][:4] == ["a", "b", "c", "d"] and len(lp["tokens"]) == 6
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(x is not None for x in lp["token_logprobs"][1:])
    assert lp["text_offset"][:4] == [0, 1, 2, 3]
    # stop token id: whatever greedy produces first becomes a stop token
    tokens = http.post("/tokenize", json={"prompt": "xyz"}).json()["tokens"]
    assert tokens == [ord("x"), ord("y"), ord("z")]

    async def first_token() -> int:
        from atom_stream.sampling_params import SamplingParams

        async for out in srv.engine.generate(tokens, SamplingParams(max_tokens=1,
                                                                    temperature=0)):
            return out.token_ids[0]

    tok = srv.call(first_token())
    stopped = http.post("/v1/completions", json={
        "prompt": "xyz", "max_tokens": 4, "temperature": 0, "stop_token_ids": [tok],
        "ignore_eos": True}).json()
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["choices"][0]["stop_reason"] == tok
    assert stopped["usage"]["completion_tokens"] == 1
    # a stop string: cut where it first appears, reported as the stop_reason
    text = http.post("/v1/completions", json={"prompt": "xyz", "max_tokens": 12,
                                              "temperature": 0, "ignore_eos": True}).json()
    full = text["choices"][0]["text"]
    needle = next((full[k:k + 2] for k in range(2, len(full) - 1)
                   if full[k:k + 2].isprintable() and "\ufffd" not in full[k:k + 2]), None)
    assert needle is not None, full  # the demo model's greedy text is fixed (seeded weights)
    cut = http.post("/v1/completions", json={
        "prompt": "xyz", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
        "stop": [needle]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["stop_reason"] == needle
    assert cut["text"] == full[:full.index(needle)]
    # seeded sampling is reproducible; other sampling knobs are accepted
    body = {"prompt": "seed", "max_tokens": 5, "temperature": 1.0, "seed": 1234, "top_k": 20,
            "min_p": 0.01, "top_p": 0.9, "presence_penalty": 0.5, "frequency_penalty": 0.5,
            "repetition_penalty": 1.1, "ignore_eos": True}
    a = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    b = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert a == b
    chat = http.post("/v1/chat/completions", json={
        "messages": CHAT, "max_completion_tokens": 2, "max_tokens": 50, "temperature": 0,
        "chat_template_kwargs": {"thinking": False}}).json()
    assert chat["usage"]["completion_tokens"] == 2


def test_batched_completion_prompts(http):
    r = http.post("/v1/completions", json={"prompt": ["ab", "cde"], "max_tokens": 2,
                                           "temperature": 0}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1]
    assert r["usage"]["prompt_tokens"] == 5 and r["usage"]["completion_tokens"] == 4


def test_small_routes(http, srv):
    # vLLM's health(): Response(status_code=200), an empty body; /ping (SageMaker) calls it
    for r in (http.get("/health"), http.get("/ping"), http.post("/ping")):
        assert r.status_code == 200 and r.content == b"", r.content
        assert r.headers["content-length"] == "0" and "content-type" not in r.headers
    assert http.get("/load").json() == {"server_load": 0}
    assert "version" in http.get("/version").json()
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "demo"
    assert models["data"][0]["max_model_len"] == srv.engine.max_model_len
    (perm,) = models["data"][0]["permission"]  # vLLM's one model_permission object
    assert perm["object"] == "model_permission" and perm["allow_sampling"] is True
    assert perm["id"].startswith("modelperm-") and perm["organization"] == "*"
    t = http.post("/tokenize", json={"prompt": "hi", "return_token_strs": True}).json()
    assert t == {"count": 2, "max_model_len": srv.engine.max_model_len, "tokens": [104, 105],
                 "token_strs": ["h", "i"]}
    chat_ids = http.post("/tokenize", json={"messages": CHAT}).json()["tokens"]
    assert chat_ids == srv.engine.tokenizer.encode_chat(CHAT, add_generation_prompt=True)
    assert http.post("/detokenize", json={"tokens": [104, 105]}).json() == {"prompt": "hi"}
    metrics = http.get("/metrics").text
    for name in ("atom_stream:num_requests_running", "atom_stream:kv_cache_usage_perc",
                 "atom_stream:time_to_first_token_seconds_bucket",
                 "atom_stream:request_success_total", "atom_stream:http_requests_total"):
        assert name in metrics


# ------------------------------------------------------------------------------- errors
def test_errors_then_serves_normally(http, srv):
    url = "/v1/completions"
    assert_error(http.post(url, json={"prompt": "x", "temperature": "hot"}), 400, "temperature")
    assert_error(http.post(url, json={"prompt": "x", "temperature": -0.5}), 400, "temperature")
    assert_error(http.post(url, json={"prompt": "x", "top_p": 0}), 400, "top_p")
    assert_error(http.post(url, json={"prompt": "x", "logprobs": 99}), 400, "logprobs")
    assert_error(http.post(url, json={"prompt": "x", "stop": [1]}), 400, "stop[0]")
    assert_error(http.post(url, json={"prompt": [True]}), 400, "prompt")
    assert_error(http.post(url, json={"prompt": [5000]}), 400, "prompt")
    assert_error(http.post(url, json={"temperature": 0}), 400, None)  # prompt missing
    assert_error(http.post(url, content=b"{not json"), 400, None)
    # vLLM refuses a non-empty stream_options without stream (`{}` passes)
    assert_error(http.post(url, json={"prompt": "x", "stream_options": {"include_usage": True}}),
                 400, "stream_options")
    chat = "/v1/chat/completions"
    assert_error(http.post(chat, json={"messages": CHAT, "max_completion_tokens": 0}), 400,
                 "max_completion_tokens")
    assert_error(http.post(chat, json={"messages": CHAT, "top_logprobs": 2}), 400,
                 "top_logprobs")
    assert_error(http.post(chat, json={"messages": CHAT, "logprobs": True,
                                       "top_logprobs": 50}), 400, "top_logprobs")
    assert_error(http.post(chat, json={"messages": [{"role": 1}]}), 400, "messages[0].role")
    assert_error(http.post(chat, json={"messages": []}), 400, "messages")
    err = assert_error(http.post(url, json={"prompt": "x" * 5000}), 400, "input_tokens")
    assert "maximum context length is 4096" in err["message"]
    assert_error(http.post(chat, json={"model": "gpt-9", "messages": CHAT}), 404, "model")
    assert_error(http.get("/v1/nothing"), 404, None)
    # 413: declared too large, and (chunked, no Content-Length) cut off while reading
    limit = srv.config.max_body_bytes
    assert_error(http.post(url, content=b"x" * (limit + 1)), 413, None)

    def chunks():
        for _ in range(limit // 65536 + 2):
            yield b" " * 65536

    assert_error(http.post(url, content=chunks()), 413, None)
    ok = http.post(url, json={"prompt": "fine", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    assert srv.wait_idle()["used_blocks"] == 0


def test_error_after_stream_start_is_event_then_done(http, srv):
    body = {"prompt": "go", "max_tokens": 2000, "ignore_eos": True, "stream": True,
            "request_id": "abort-me"}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        it = r.iter_raw()
        next(it)
        # the engine's id: vLLM's "cmpl-" + request_id + "-" + 8 random characters
        rid = next(k for k in srv.engine._slots if k.startswith("cmpl-abort-me-"))
        srv.call(srv.engine.abort(rid))  # e.g. shutdown: the request ends under our feet
        raw = b"".join(it)
    events = sse_events(raw)
    err = json.loads(events[-2])
    # the server's shutdown abort: 503 ServiceUnavailableError (as the WebSocket's frame)
    assert set(err) == {"error"} and err["error"]["code"] == 503
    assert events[-1] == b"[DONE]"
    assert srv.wait_idle()["used_blocks"] == 0


def _read_some_then_drop(port: int, body: dict, stream: bool) -> None:
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
              b"content-length: %d\r\n\r\n" % len(data) + data)
    if stream:
        got = b""
        while got.count(b"data: ") < 3:
            got += s.recv(65536)
    else:
        time.sleep(0.3)
    s.close()


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts(srv, stream):
    before = srv.stats()["finished"]["abort"]
    body = {"prompt": "long", "max_tokens": 3000, "ignore_eos": True, "stream": stream}
    _read_some_then_drop(srv.port, body, stream)
    deadline = time.monotonic() + 20
    while srv.stats()["finished"]["abort"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    s = srv.wait_idle()
    assert s["finished"]["abort"] == before + 1
    assert s["used_blocks"] == 0 and s["kv_usage"] == 0.0 and s["num_running"] == 0
    metrics = httpx.get(srv.url + "/metrics").text
    assert re.search(r'atom_stream:client_disconnects_total\{[^}]*interface="http"[^}]*\} '
                     r'[1-9]', metrics)
    assert re.search(r'atom_stream:streams_open\{[^}]*interface="sse"[^}]*\} 0\.0', metrics)
    assert re.search(r'atom_stream:kv_cache_usage_perc\{[^}]*\} 0\.0', metrics)


def test_overload_503_retry_after_and_dead_health(tiny):
    srv = tiny
    body = {"prompt": "busy", "max_tokens": 400, "ignore_eos": True}

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
            first = asyncio.ensure_future(c.post("/v1/completions", json=body))
            await asyncio.sleep(0.5)  # let it start running
            rest = await asyncio.gather(*(c.post("/v1/completions",
                                                 json={**body, "max_tokens": 2})
                                          for _ in range(4)))
            return [await first, *rest]

    results = asyncio.run(flood())
    codes = sorted(r.status_code for r in results)
    assert codes.count(503) >= 2 and 200 in codes
    for r in results:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "ServiceUnavailableError"
    srv.wait_idle(60)
    ok = httpx.post(srv.url + "/v1/completions", json={"prompt": "ok", "max_tokens": 1})
    assert ok.status_code == 200

    # a dead engine: /health answers 503 (the engine's own flag, set as a crash would)
    async def kill(dead: BaseException | None) -> None:
        srv.engine._dead = dead

    srv.call(kill(RuntimeError("simulated crash")))
    try:
        for r in (httpx.get(srv.url + "/health"), httpx.post(srv.url + "/ping")):
            assert r.status_code == 503 and r.content == b""  # vLLM: Response(status_code=503)
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert r.status_code == 503
    finally:
        srv.call(kill(None))
    assert httpx.get(srv.url + "/health").status_code == 200


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_token_without_text_still_sends_a_chunk(http, route):
    """vLLM sends a chunk for every step that produced tokens, with "" when the text is held
    back (here: the first token's text could start the stop string) — never silently merged."""
    body = {"model": "demo", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    body.update({"prompt": "abc"} if route == "/v1/completions" else {"messages": CHAT})
    full = http.post(route, json=body).json()["choices"][0]
    text = full.get("text", full.get("message", {}).get("content"))
    assert text and text[0].isprintable()
    with http.stream("POST", route, json={**body, "stream": True,
                                          "stop": [text[0] + "\u0001"]}) as r:
        chunks = [json.loads(e) for e in sse_events(r.read())[:-1]]
    deltas = [c["choices"][0].get("text", c["choices"][0].get("delta", {}).get("content"))
              for c in chunks if c["choices"] and "role" not in c["choices"][0].get("delta", {})]
    assert deltas[0] == ""  # the held-back first token still made a chunk
    assert "".join(deltas) == text


# ------------------------------------------------------------- vLLM validation rules (review)
def test_max_tokens_past_the_context_is_a_400(http, srv):
    """vLLM refuses a max_tokens (or max_completion_tokens) that does not fit the context left
    after the prompt, with its message and param "max_tokens"; one that fits is served."""
    max_len = http.get("/v1/models").json()["data"][0]["max_model_len"]
    n_prompt = http.post("/tokenize", json={"prompt": "hello"}).json()["count"]
    too_big = max_len - n_prompt + 1
    err = assert_error(http.post("/v1/completions", json={"prompt": "hello",
                                                          "max_tokens": too_big}), 400,
                       "max_tokens")
    assert err["message"] == (
        f"'max_tokens' or 'max_completion_tokens' is too large: {too_big}. This model's maximum "
        f"context length is {max_len} tokens and your request has {n_prompt} input tokens "
        f"({too_big} > {max_len} - {n_prompt}).")
    chat = {"messages": CHAT, "max_completion_tokens": 10 ** 6}
    assert_error(http.post("/v1/chat/completions", json=chat), 400, "max_tokens")
    ok = http.post("/v1/completions", json={"prompt": "hello", "max_tokens": too_big - 1,
                                            "stop_token_ids": list(range(256))})
    assert ok.status_code == 200, ok.text
    assert srv.wait_idle()["used_blocks"] == 0


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", None])
def test_non_json_content_type_is_a_400(http, ctype):
    body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
    headers = {"content-type": ctype} if ctype else {}
    for route in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
        err = assert_error(http.post(route, content=body, headers=headers), 400, None)
        assert err["message"] == "Unsupported Media Type: Only 'application/json' is allowed"
        assert err["type"] == "Bad Request"
    ok = http.post("/v1/completions", content=body,
                   headers={"content-type": "Application/JSON; charset=utf-8"})
    assert ok.status_code == 200, ok.text


def _usage_frames(http, stream_options: dict) -> list:
    # ignore_eos: the demo model's random sampling can end on EOS within 3 tokens
    body = {"messages": CHAT, "max_tokens": 3, "stream": True, "stream_options": stream_options,
            "ignore_eos": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        events = sse_events(r.read())
    assert events[-1] == b"[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_stream_options_defaults_follow_vllm(http):
    """Usage only with include_usage true (current vLLM, PR #36379: `{}` gives none); per-chunk
    usage (continuous_usage_stats) only together with include_usage."""
    frames = _usage_frames(http, {})
    assert frames[-1]["choices"] and all("usage" not in f for f in frames)
    frames = _usage_frames(http, {"include_usage": True})
    assert frames[-1]["choices"] == [] and frames[-1]["usage"]["completion_tokens"] == 3
    assert all("usage" not in f for f in frames[:-1])
    frames = _usage_frames(http, {"continuous_usage_stats": True})
    assert all("usage" not in f for f in frames) and frames[-1]["choices"]
    frames = _usage_frames(http, {"include_usage": True, "continuous_usage_stats": True})
    assert frames[-1]["choices"] == [] and all("usage" in f for f in frames)
    frames = _usage_frames(http, {"include_usage": False, "continuous_usage_stats": True})
    assert all("usage" not in f for f in frames) and frames[-1]["choices"]


def test_prompt_logprobs_with_stream_is_a_400(http):
    for route, body in (("/v1/completions", {"prompt": "hi"}),
                        ("/v1/chat/completions", {"messages": CHAT})):
        err = assert_error(http.post(route, json={**body, "max_tokens": 2, "stream": True,
                                                  "prompt_logprobs": 1}), 400,
                           "prompt_logprobs")
        assert err["type"] == "Bad Request"


def test_request_id_is_prefixed_and_schema_errors_are_bad_request(http):
    r = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1,
                                                "request_id": "abc"})
    assert r.status_code == 200 and r.json()["id"] == "chatcmpl-abc"
    r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "request_id": "abc"})
    assert r.status_code == 200 and r.json()["id"] == "cmpl-abc"
    err = assert_error(http.post("/v1/chat/completions", json={"messages": "hi"}), 400,
                       "messages")
    assert err["type"] == "Bad Request"
    err = assert_error(http.post("/v1/completions", json={"prompt": "x", "temperature": -1}),
                       400, "temperature")
    assert err["type"] == "BadRequestError"  # a value out of range, not a schema error


def test_logit_bias_and_allowed_token_ids(http):
    """OpenAI's logit_bias (token id strings -> [-100, 100]) and vLLM's allowed_token_ids steer
    sampling; out-of-vocabulary ids are 400s naming the field, values past +-100 are clamped."""
    body = {"prompt": "hi", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    r = http.post("/v1/completions", json={**body, "logit_bias": {"65": 100}})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "AAAA", r.text
    r = http.post("/v1/completions", json={**body, "temperature": 1.0, "seed": 3,
                                           "allowed_token_ids": [66, 67]})
    assert r.status_code == 200 and set(r.json()["choices"][0]["text"]) <= {"B", "C"}, r.text
    vocab = 1 << 20
    assert_error(http.post("/v1/completions", json={**body, "logit_bias": {str(vocab): 1}}),
                 400, "logit_bias")
    # values past +-100 are clamped, as vLLM's SamplingParams.from_optional does
    r = http.post("/v1/completions", json={**body, "logit_bias": {"65": 101}})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "AAAA", r.text
    assert_error(http.post("/v1/chat/completions", json={
        "messages": CHAT, "max_tokens": 2, "allowed_token_ids": []}), 400, "allowed_token_ids")


def test_unservable_structured_output_and_tool_choice_are_clear_400s(http):
    base = {"messages": CHAT, "max_tokens": 2}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    for extra, param in (({"response_format": {"type": "structural_tag"}}, "response_format"),
                         ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice"),
                         ({"tools": tools, "tool_choice": "auto"}, "tool_choice"),
                         # tools without tool_choice mean "auto" (vLLM): the parser flags needed
                         ({"tools": tools}, "tool_choice"),
                         ({"tools": tools, "tool_choice": {"type": "function",
                                                           "function": {"name": "g"}}},
                          "tool_choice")):
        assert_error(http.post("/v1/chat/completions", json={**base, **extra}), 400, param)
    for extra in ({"response_format": {"type": "text"}}, {"tools": tools, "tool_choice": "none"}):
        r = http.post("/v1/chat/completions", json={**base, **extra})
        assert r.status_code == 200, (extra, r.text)
    assert_error(http.post("/v1/completions", json={
        "prompt": "x", "response_format": {"type": "json_schema"}}), 400, "response_format")


def test_echo_logprobs_text_offset_streamed_and_not(http):
    """vLLM's completion_stream_generator: the echo chunk (prompt + first token) has offsets from
    previous_text_lens = 0; every later chunk starts at previous_text_lens, which adds only
    len(output.text), never the echoed prompt. Non-streamed: from 0 over prompt and output."""
    body = {"prompt": "hello", "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "echo": True, "logprobs": 1}

    def running(toks: list[str], start: int) -> list[int]:
        offs = [start]
        for t in toks[:-1]:
            offs.append(offs[-1] + len(t))
        return offs[:len(toks)]

    raw = http.post("/v1/completions", json={**body, "stream": True}).content
    choices = [json.loads(e)["choices"][0] for e in sse_events(raw)[:-1]]
    assert choices[0]["text"].startswith("hello") and len(choices) >= 2
    assert choices[0]["logprobs"]["tokens"][:5] == list("hello")
    out_len = 0  # the output's text so far
    for k, c in enumerate(choices):
        lp = c["logprobs"]
        assert lp["text_offset"] == running(lp["tokens"], out_len), (k, lp)
        out_len += len(c["text"]) - (len("hello") if k == 0 else 0)
    assert sum(len(c["logprobs"]["tokens"]) for c in choices) == 5 + 6
    r = http.post("/v1/completions", json=body).json()["choices"][0]
    assert r["text"] == "".join(c["text"] for c in choices)
    lp = r["logprobs"]
    assert len(lp["tokens"]) == 11 and lp["text_offset"] == running(lp["tokens"], 0)


def test_logprob_tokens_are_decoded_text(http):
    """Logprob tokens are each token decoded on its own, as vLLM reports them (a space is " ",
    not the byte-level vocabulary's "Ġ"); text_offset then indexes the returned text."""
    r = http.post("/v1/completions", json={"prompt": "a b", "max_tokens": 3, "echo": True,
                                           "logprobs": 1, "temperature": 0})
    choice = r.json()["choices"][0]
    toks = choice["logprobs"]["tokens"]
    assert toks[:3] == ["a", " ", "b"], toks
    offs = choice["logprobs"]["text_offset"]
    assert offs[:3] == [0, 1, 2] and offs == sorted(offs)
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                "max_tokens": 4, "logprobs": True,
                                                "temperature": 0, "logit_bias": {"32": 100}})
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == [" "] * 4
    assert all(c["bytes"] == [32] for c in content)


def test_completions_and_tokenize_add_the_tokenizers_bos(tmp_path_factory):
    """vLLM's add_special_tokens (default true) on /v1/completions and /tokenize: a DeepSeek-style
    HF tokenizer's BOS is prepended to a text prompt unless the request says false; chat is
    unchanged (its template writes the BOS)."""
    from tokenizer_fixtures import write_hf_tokenizer
    path = write_hf_tokenizer(str(tmp_path_factory.mktemp("bos")), add_bos=True)
    with running_server({"tokenizer": path}) as s, httpx.Client(base_url=s.url,
                                                               timeout=60) as c:
        plain = c.post("/tokenize", json={"prompt": "hello world",
                                          "add_special_tokens": False}).json()["tokens"]
        with_bos = c.post("/tokenize", json={"prompt": "hello world"}).json()["tokens"]
        assert len(plain) == 2 and with_bos[1:] == plain and with_bos[0] not in plain
        for extra, n in (({}, 3), ({"add_special_tokens": False}, 2)):
            r = c.post("/v1/completions", json={"prompt": "hello world", "max_tokens": 2,
                                                "temperature": 0, **extra})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["prompt_tokens"] == n, extra
        chat = c.post("/tokenize", json={"messages": CHAT}).json()["tokens"]
        assert chat.count(with_bos[0]) == 1


def test_requests_that_can_never_fit_and_filled_max_tokens_are_400s(http, tiny):
    """A batch of more requests than the server holds at once (max_num_seqs +
    max_waiting_requests) is a 400 before any is queued (it used to crowd the queue until its
    own 503); min_tokens past the max_tokens filled from the context left is a 400 as vLLM's;
    a text content part without text says so."""
    with httpx.Client(base_url=tiny.url, timeout=60) as c:  # 1 slot + 1 waiting
        assert_error(c.post("/v1/completions", json={"prompt": ["a", "b", "c"],
                                                      "max_tokens": 1}), 400, "prompt")
        assert_error(c.post("/v1/completions", json={"prompt": "a", "n": 3,
                                                      "max_tokens": 1}), 400, "n")
        r = c.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 1})
        assert r.status_code == 200 and len(r.json()["choices"]) == 2
    err = assert_error(http.post("/v1/completions", json={
        "prompt": "x" * 4000, "min_tokens": 200, "max_tokens": None}), 400, "min_tokens")
    assert "context left" in err["message"]
    assert http.post("/v1/completions", json={"prompt": "x" * 4000, "min_tokens": 2,
                                              "max_tokens": None}).status_code == 200
    err = assert_error(http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": [{"type": "text"}]}]}), 400,
        "messages[0].content")
    assert "needs a 'text'" in err["message"]


def test_chat_template_errors_are_400s(tmp_path_factory):
    """A template's raise_exception (or an undefined name) is the request's fault: 400 as in
    vLLM, on chat and /tokenize; the server goes on."""
    tpl = tmp_path_factory.mktemp("tpl") / "t.jinja"
    tpl.write_text("{% for m in messages %}{% if loop.index0 % 2 == 1 and m['role'] == 'user' %}"
                   "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }}"
                   "{% endfor %}")
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with running_server({"chat_template": str(tpl)}) as s, httpx.Client(base_url=s.url,
                                                                  timeout=60) as c:
        err = assert_error(c.post("/v1/chat/completions", json={"messages": two_users,
                                                                "max_tokens": 2}), 400,
                           "messages")
        assert "roles must alternate" in err["message"]
        assert_error(c.post("/tokenize", json={"messages": two_users}), 400, None)
        r = c.post("/v1/chat/completions", json={"messages": two_users[:1], "max_tokens": 2})
        assert r.status_code == 200, r.text


def test_logprobs_put_the_sampled_token_first_as_vllm(http):
    """vLLM's sampler puts the sampled token first in each position's logprobs: completions'
    top_logprobs dicts start with it, chat's top_logprobs list is the first top_logprobs
    entries of that order (a sampled token outside the top k leads and displaces the k-th).
    allowed_token_ids makes the sampled tokens unlikely under the raw logprobs."""
    base = {"max_tokens": 3, "temperature": 1, "seed": 1, "allowed_token_ids": [97, 98, 99]}
    lp = http.post("/v1/completions", json={"prompt": "hi", "logprobs": 1, **base}
                   ).json()["choices"][0]["logprobs"]
    for tok, val, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert next(iter(top.items())) == (tok, val) and len(top) <= 2
    content = http.post("/v1/chat/completions", json={
        "messages": CHAT, "logprobs": True, "top_logprobs": 2, **base}
        ).json()["choices"][0]["logprobs"]["content"]
    assert any(c["top_logprobs"][0]["token"] == c["token"] for c in content)
    for c in content:
        assert len(c["top_logprobs"]) == 2
        assert c["top_logprobs"][0] == {"token": c["token"], "logprob": c["logprob"],
                                        "bytes": c["bytes"]}


def test_chat_stream_role_chunks_then_echo_chunks(http):
    """n > 1 with echo: vLLM sends every choice's role chunk, then every choice's echo."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "pre"}]
    raw = http.post("/v1/chat/completions", json={"messages": msgs, "echo": True, "n": 2,
                                                  "max_tokens": 2, "stream": True}).content
    head = [json.loads(e) for e in sse_events(raw)[:4]]
    got = [(e["choices"][0]["index"], e["choices"][0]["delta"]) for e in head]
    assert got == [(0, {"role": "assistant", "content": ""}),
                   (1, {"role": "assistant", "content": ""}),
                   (0, {"content": "pre"}), (1, {"content": "pre"})], got


def test_return_tokens_as_token_ids(http):
    """vLLM's return_tokens_as_token_ids: logprob tokens (and top_logprobs keys / tokens, their
    bytes) are "token_id:{id}"."""
    base = {"max_tokens": 3, "temperature": 0, "allowed_token_ids": [97, 98, 99],
            "return_tokens_as_token_ids": True}
    ch = http.post("/v1/completions", json={"prompt": "hi", "logprobs": 1, **base}
                   ).json()["choices"][0]
    assert all(t in ("token_id:97", "token_id:98", "token_id:99")
               for t in ch["logprobs"]["tokens"])
    assert all(k.startswith("token_id:") for top in ch["logprobs"]["top_logprobs"] for k in top)
    assert ch["text"] and not ch["text"].startswith("token_id")  # the text itself is text
    c = http.post("/v1/chat/completions", json={"messages": CHAT, "logprobs": True,
                                                "top_logprobs": 1, **base}
                  ).json()["choices"][0]["logprobs"]["content"][0]
    assert c["token"].startswith("token_id:") and c["bytes"] == list(c["token"].encode())


def details_server():
    """A server with --enable-prompt-tokens-details (vLLM's default is off: usage then has no
    prompt_tokens_details). Until ServerConfig has the field, it is set on the live config
    (the handlers read it per request with getattr)."""
    import dataclasses

    from atom_stream.server.app import ServerConfig

    has_field = any(f.name == "enable_prompt_tokens_details"
                    for f in dataclasses.fields(ServerConfig))
    kw = {"enable_prompt_tokens_details": True} if has_field else {}
    cm = running_server(**kw)
    s = cm.__enter__()
    if not has_field:
        s.state.config.enable_prompt_tokens_details = True
    return cm, s


def test_cache_salt_separates_prefix_cache_hits():
    """vLLM's cache_salt: the same long prompt hits the prefix cache only under the same salt
    (usage.prompt_tokens_details.cached_tokens, served with --enable-prompt-tokens-details);
    an empty salt is a 400 with vLLM's message."""
    body = {"prompt": "x" * 200, "max_tokens": 1, "temperature": 0}
    cm, s = details_server()
    try:
        with httpx.Client(base_url=s.url, timeout=60) as http:
            def cached(**kw):
                r = http.post("/v1/completions", json={**body, **kw})
                assert r.status_code == 200, r.text
                return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

            cached(cache_salt="alice")
            assert cached(cache_salt="alice") > 0
            assert cached(cache_salt="bob") == 0
            r = http.post("/v1/completions", json={**body, "cache_salt": ""})
            assert r.status_code == 400 and "cache_salt" in r.json()["error"]["message"], r.text
    finally:
        cm.__exit__(None, None, None)


def test_multi_choice_stream_merges_deltas_for_a_slow_reader():
    """n > 1 / batched prompts: while the consumer is not reading, each choice's deltas merge
    into one pending delta (no per-token queue), in order, and every choice still finishes."""
    import asyncio

    from atom_stream.engine.outputs import RequestOutput
    from atom_stream.server.choices import Choice, iterate

    N = 200

    async def gen(i: int):
        for k in range(1, N):
            yield RequestOutput(f"r{i}", [k], str(k % 10),
                                finish_reason="length" if k == N - 1 else None)
            await asyncio.sleep(0)

    async def main():
        choices = [Choice(i, RequestOutput(f"r{i}", [0], "0"), gen(i)) for i in range(3)]
        it = iterate(choices)
        got: dict[int, list] = {0: [], 1: [], 2: []}
        first = await it.__anext__()
        got[first[0]].append(first[1])
        await asyncio.sleep(0.05)  # a stalled reader: the pumps run to completion meanwhile
        async for i, out in it:
            got[i].append(out)
        return got

    got = asyncio.run(main())
    for i, outs in got.items():
        tokens = [t for o in outs for t in o.token_ids]
        assert tokens == list(range(N)), i
        assert "".join(o.text for o in outs) == "".join(str(k % 10) for k in range(N))
        assert outs[-1].finish_reason == "length"
        assert len(outs) <= 3, len(outs)  # merged, not one delta per token
