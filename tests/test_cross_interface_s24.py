"""Session 24: one request, every public interface, one answer (demo model, CPU).

The same prompt (text, token ids, chat messages) and sampling parameters go through
`LLM.generate` / `LLM.chat`, `AsyncEngine.generate` (the server's engine), `/v1/completions` and
`/v1/chat/completions` (non-streamed, and streamed with the SSE chunks concatenated) and `/v1/ws`
(json and msgpack subprotocols). Token ids, text, finish_reason, stop_reason, usage and logprobs
must agree, each in its interface's documented shape: HTTP logprobs are vLLM's (completions: the
sampled token first, then the top k without it; chat: the first k of that order), HTTP token ids
come from `return_token_ids`, logprob tokens from `return_tokens_as_token_ids`. usage.prompt_tokens
is the prompt's token count everywhere (chat: the rendered template's ids), and /tokenize and
/detokenize agree with the in-process tokenizer.

Matrix: greedy and seeded sampling (temperature + seed, top_k, top_p, min_p), stop strings (one
spanning tokens, one multi-byte character, include_stop_str_in_output), stop_token_ids (with
min_tokens past them), EOS (ignore_eos, min_tokens), max_tokens 1 and at the context limit,
logprobs (values and top-k order; prompt-logprob ranks), penalties, logit_bias,
skip_special_tokens false, chat with add_generation_prompt and continue_final_message, and all of
it submitted at once through every interface (batched) against the requests run alone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from typing import Any

import msgspec
import pytest
from serving_helpers import running_server
from websockets.asyncio.client import connect

from atom_stream import LLM, SamplingParams

MAX_LEN = 96
ENGINE = {"max_model_len": MAX_LEN, "num_kv_blocks": 128, "max_num_seqs": 16,
          "dtype": "float32"}
JSON, MSGPACK = "atom-stream.v1.json", "atom-stream.v1.msgpack"
PROMPT = "Hello world"
IDS = [72, 101, 108, 108, 111, 44, 32, 98, 111, 98]
SYS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
CONT = [*SYS, {"role": "assistant", "content": "Sure, the"}]
FIELDS = ("ids", "text", "finish", "stop", "usage")


@pytest.fixture(scope="module")
def srv():
    with running_server(ENGINE) as s:
        yield s


@pytest.fixture(scope="module")
def llm():
    with LLM("demo", device="cpu", **ENGINE) as engine:
        yield engine


@pytest.fixture(scope="module")
def greedy(llm):
    """The greedy continuation of PROMPT (stop strings and stop ids are picked from it)."""
    (out,) = llm.generate([PROMPT], SamplingParams(max_tokens=48, temperature=0,
                                                    ignore_eos=True))
    return out


# ------------------------------------------------------------------------------- interfaces
def result(ids, text, finish, stop, usage, lps) -> dict[str, Any]:
    return {"ids": list(ids), "text": text, "finish": finish, "stop": stop,
            "usage": tuple(usage), "lps": lps}


def engine_usage(u) -> tuple[int, int, int]:
    return u.prompt_tokens, u.completion_tokens, u.total_tokens


def via_llm(llm, prompt, p: dict, chat: dict | None) -> dict:
    if chat is None:
        (o,) = llm.generate([prompt], SamplingParams(**p))
    else:
        (o,) = llm.chat(prompt, SamplingParams(**p), **chat)
    out = result(o.token_ids, o.text, o.finish_reason, o.stop_reason, engine_usage(o.usage),
                 o.engine_logprobs)  # the engine form (the WebSocket's); .logprobs: vLLM's
    out["prompt_ids"] = o.prompt_token_ids
    return out


def via_async(srv, prompt, p: dict, chat: dict | None) -> dict:
    async def run() -> dict:
        merged = None
        async for o in srv.engine.generate(prompt, SamplingParams(**p), **(chat or {})):
            merged = o if merged is None else merged.merge(o)
        return result(merged.token_ids, merged.text, merged.finish_reason, merged.stop_reason,
                      engine_usage(merged.usage), merged.engine_logprobs)
    return srv.call(run())


def http_body(prompt, p: dict, chat: dict | None, ids: bool = True) -> tuple[str, dict]:
    """The route and body; `ids`: ask for token ids (vLLM's return_token_ids) and logprob
    tokens as ids; without, the plain request (the SSE fast path)."""
    body = {**p, "return_token_ids": True} if ids else dict(p)
    if "logprobs" in p and ids:
        body["return_tokens_as_token_ids"] = True
    if chat is None:
        return "/v1/completions", {**body, "prompt": prompt}
    if "logprobs" in p:
        body.update(logprobs=True, top_logprobs=p["logprobs"])
    return "/v1/chat/completions", {**body, "messages": prompt, **chat}


def tid(token: str) -> int:
    assert token.startswith("token_id:"), token
    return int(token[len("token_id:"):])


def completion_lps(lp: dict | None) -> list | None:
    if lp is None:
        return None
    return [(tid(t), s, [(tid(k), v) for k, v in top.items()])
            for t, s, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"],
                                 strict=True)]


def chat_lps(lp: dict | None) -> list | None:
    if lp is None:
        return None
    return [(tid(e["token"]), e["logprob"], [(tid(x["token"]), x["logprob"])
                                             for x in e["top_logprobs"]])
            for e in lp["content"]]


def via_http(http, prompt, p: dict, chat: dict | None) -> dict:
    path, body = http_body(prompt, p, chat)
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    c = data["choices"][0]
    u = data["usage"]
    usage = (u["prompt_tokens"], u["completion_tokens"], u["total_tokens"])
    if chat is None:
        out = result(c["token_ids"], c["text"], c["finish_reason"], c["stop_reason"], usage,
                     completion_lps(c["logprobs"]))
        out["prompt_ids"] = c["prompt_token_ids"]
    else:
        assert c["message"]["role"] == ("assistant" if chat["add_generation_prompt"]
                                        else prompt[-1]["role"])
        out = result(c["token_ids"], c["message"]["content"], c["finish_reason"],
                     c["stop_reason"], usage, chat_lps(c["logprobs"]))
        out["prompt_ids"] = data["prompt_token_ids"]
    return out


def via_sse(http, prompt, p: dict, chat: dict | None, ids: bool = True) -> dict:
    """The streamed answer, every chunk's text / token ids / logprobs concatenated (`ids`:
    http_body's)."""
    path, body = http_body(prompt, p, chat, ids)
    body.update(stream=True, stream_options={"include_usage": True})
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    chunks = [json.loads(e[6:]) for e in raw.split("\n\n") if e.startswith("data: {")]
    assert all("error" not in c for c in chunks), chunks[-1]
    tokens: list[int] = []
    text, finish, stop, lps, prompt_ids = "", [], None, None, None
    for ch in chunks[:-1]:
        prompt_ids = prompt_ids or ch.get("prompt_token_ids")
        (c,) = ch["choices"]
        prompt_ids = prompt_ids or c.get("prompt_token_ids")
        tokens += c.get("token_ids") or []
        text += c["text"] if chat is None else c["delta"].get("content") or ""
        finish.append(c["finish_reason"])
        if c["finish_reason"] is not None:
            stop = c["stop_reason"]
        if ids and c.get("logprobs") is not None:
            part = (completion_lps if chat is None else chat_lps)(c["logprobs"])
            lps = (lps or []) + part
    assert finish[-1] is not None and not any(finish[:-1])  # one finish, on the last chunk
    u = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    out = result(tokens, text, finish[-1], stop,
                 (u["prompt_tokens"], u["completion_tokens"], u["total_tokens"]), lps)
    out["prompt_ids"] = prompt_ids
    return out


async def ws_run(url: str, proto: str, prompt, p: dict, chat: dict | None) -> dict:
    binary = proto == MSGPACK
    frame: dict[str, Any] = {"type": "generate", "id": "x", "params": p}
    if chat is not None:
        frame.update(messages=prompt, chat_template_kwargs=chat)
    else:
        frame["prompt" if isinstance(prompt, str) else "prompt_token_ids"] = prompt
    async with connect(url, subprotocols=[proto]) as ws:
        await ws.send(msgspec.msgpack.encode(frame) if binary
                      else msgspec.json.encode(frame).decode())
        ids: list[int] = []
        text, lps = "", None
        while True:
            raw = await asyncio.wait_for(ws.recv(), 60)
            f = msgspec.msgpack.decode(raw) if binary else msgspec.json.decode(raw)
            assert f["type"] != "error", f
            if f["type"] == "delta":
                ids += f["token_ids"]
                text += f["text"]
                if "logprobs" in f:
                    assert len(f["logprobs"]) == len(f["token_ids"])
                    lps = (lps or []) + [(s, [tuple(x) for x in top])
                                         for s, top in f["logprobs"]]
            else:
                u = f["usage"]
                return result(ids, text, f["finish_reason"], f.get("stop_reason"),
                              (u["prompt_tokens"], u["completion_tokens"],
                               u["total_tokens"]), lps)


def via_ws(srv, proto: str, prompt, p: dict, chat: dict | None) -> dict:
    return asyncio.run(ws_run(srv.ws_url, proto, prompt, p, chat))


# ------------------------------------------------------------------------------- comparing
def http_shape(ids: list[int], lps: list | None, k: int, chat: bool) -> list | None:
    """Engine logprobs -> what the HTTP routes show (vLLM): completions the sampled token
    first, then the top k without it; chat the first k entries of that order."""
    if lps is None:
        return None
    out = []
    for t, (s, tops) in zip(ids, lps, strict=True):
        order = [(t, s)] + [(x, v) for x, v in tops[:k] if x != t]
        out.append((t, s, order[:k] if chat else order))
    return out


def check_all(srv, llm, http, prompt, p: dict, chat: dict | None = None) -> dict:
    """Run (prompt, p) through every interface and assert they agree; returns LLM's result."""
    want = via_llm(llm, prompt, p, chat)
    tok = llm.tokenizer
    if chat is None:
        n_prompt = len(prompt) if isinstance(prompt, list) else len(
            tok.encode(prompt, add_special_tokens=True))
    else:
        rendered = tok.encode_chat(prompt, **chat)
        assert want["prompt_ids"] == rendered
        n_prompt = len(rendered)
    n_out = len(want["ids"])
    assert want["usage"] == (n_prompt, n_out, n_prompt + n_out)
    k = p.get("logprobs")
    if k is not None:
        assert want["lps"] is not None and len(want["lps"]) == n_out
        assert all(len(tops) == k and s <= 0 for s, tops in want["lps"])
    got = {"async": via_async(srv, prompt, p, chat), "http": via_http(http, prompt, p, chat),
           "sse": via_sse(http, prompt, p, chat),
           "sse-plain": via_sse(http, prompt, p, chat, ids=False),
           "ws-json": via_ws(srv, JSON, prompt, p, chat),
           "ws-msgpack": via_ws(srv, MSGPACK, prompt, p, chat)}
    for name, r in got.items():
        for f in FIELDS:
            if f != "ids" or name != "sse-plain":
                assert r[f] == want[f], (name, f, r[f], want[f])
        if name == "sse-plain":
            continue
        lps = want["lps"]
        if name in ("http", "sse"):
            lps = http_shape(want["ids"], lps, k or 0, chat is not None)
            assert r["prompt_ids"] == want["prompt_ids"], name
        assert r["lps"] == lps, (name, r["lps"], lps)
    return want


# ------------------------------------------------------------------------------- the matrix
SAMPLING = [
    pytest.param({"max_tokens": 8, "temperature": 0}, id="greedy"),
    pytest.param({"max_tokens": 8, "temperature": 0.8, "seed": 7}, id="seed"),
    pytest.param({"max_tokens": 8, "temperature": 0.8, "seed": 7, "top_k": 5, "top_p": 0.9,
                  "min_p": 0.05, "logprobs": 3}, id="topk-topp-minp-logprobs"),
    pytest.param({"max_tokens": 6, "temperature": 1.0, "seed": 3, "logprobs": 0},
                 id="logprobs0"),
    pytest.param({"max_tokens": 1, "temperature": 0}, id="max_tokens1"),
    pytest.param({"max_tokens": 12, "temperature": 0, "repetition_penalty": 1.3,
                  "presence_penalty": 0.5, "frequency_penalty": 0.7}, id="penalties"),
    pytest.param({"max_tokens": 5, "temperature": 0, "logit_bias": {"65": 100},
                  "logprobs": 2}, id="logit_bias"),
    pytest.param({"max_tokens": 8, "temperature": 0, "ignore_eos": True,
                  "skip_special_tokens": False}, id="keep-specials"),
]


@pytest.mark.parametrize("prompt", [PROMPT, IDS], ids=["text", "ids"])
@pytest.mark.parametrize("p", SAMPLING)
def test_sampling_parameters_agree_everywhere(srv, llm, http, prompt, p):
    check_all(srv, llm, http, prompt, p)


def test_stop_strings_agree_everywhere(srv, llm, http, greedy):
    text, ids = greedy.text, greedy.token_ids
    tok = llm.tokenizer
    # an ASCII stop string of three tokens, and a multi-byte character (one token per byte)
    at = next(i for i in range(2, len(text) - 3)
              if text[i:i + 3].isalnum() and text.index(text[i:i + 3]) == i)
    ascii_stop = text[at:at + 3]
    wide = next(c for c in text if ord(c) > 127 and c != "\ufffd")
    for stop in (ascii_stop, wide):
        assert len(tok.encode(stop)) >= 2  # spans tokens
        base = {"max_tokens": 48, "temperature": 0, "ignore_eos": True}
        cut = check_all(srv, llm, http, PROMPT, {**base, "stop": [stop, "never!"]})
        assert cut["finish"] == "stop" and cut["stop"] == stop
        assert cut["text"] == text[:text.index(stop)]
        # the token that completes the match is the last one kept (vLLM)
        assert tok.decode(cut["ids"]).endswith(stop)
        kept = check_all(srv, llm, http, PROMPT, {**base, "stop": stop,
                                                  "include_stop_str_in_output": True})
        assert kept["text"] == cut["text"] + stop and kept["ids"] == cut["ids"]
    # a stop string's prefix held back mid-stream, then released at max_tokens
    n = text.index(ascii_stop) + 2
    held = check_all(srv, llm, http, PROMPT, {"max_tokens": n, "temperature": 0,
                                              "ignore_eos": True, "stop": [ascii_stop]})
    assert held["finish"] == "length" and held["ids"] == ids[:n]


def test_stop_token_ids_and_min_tokens_agree_everywhere(srv, llm, http, greedy):
    ids = greedy.token_ids
    pos = next(i for i in range(3, 20) if 32 < ids[i] < 127 and ids[i] not in ids[:i])
    stop_id = ids[pos]
    base = {"max_tokens": 40, "temperature": 0, "ignore_eos": True, "stop_token_ids": [stop_id]}
    r = check_all(srv, llm, http, PROMPT, base)
    assert r["ids"] == ids[:pos + 1] and (r["finish"], r["stop"]) == ("stop", stop_id)
    assert chr(stop_id) not in r["text"]  # vLLM: the stop token's text is not shown
    kept = check_all(srv, llm, http, PROMPT, {**base, "include_stop_str_in_output": True})
    assert kept["ids"] == r["ids"] and kept["text"].endswith(chr(stop_id))
    late = check_all(srv, llm, http, PROMPT, {**base, "min_tokens": pos + 2})
    assert stop_id not in late["ids"][:pos + 2]


def test_eos_ignore_eos_and_min_tokens_agree_everywhere(srv, llm, http):
    eos = llm.tokenizer.eos_token_ids[0]
    bias = {"temperature": 0, "logit_bias": {str(eos): 100}}
    r = check_all(srv, llm, http, PROMPT, {**bias, "max_tokens": 6})
    assert (r["ids"], r["text"], r["finish"], r["stop"]) == ([eos], "", "stop", None)
    r = check_all(srv, llm, http, PROMPT, {**bias, "max_tokens": 6, "min_tokens": 3,
                                           "logprobs": 1})
    assert len(r["ids"]) == 4 and r["ids"][-1] == eos and r["finish"] == "stop"
    r = check_all(srv, llm, http, IDS, {**bias, "max_tokens": 3, "ignore_eos": True,
                                        "skip_special_tokens": False})
    assert r["ids"] == [eos] * 3 and r["finish"] == "length"
    assert r["text"] == llm.tokenizer.decode([eos] * 3, skip_special_tokens=False)


def test_max_tokens_at_the_context_limit_agrees_everywhere(srv, llm, http):
    n = len(llm.tokenizer.encode(PROMPT, add_special_tokens=True))
    r = check_all(srv, llm, http, PROMPT, {"max_tokens": MAX_LEN - n, "temperature": 0,
                                           "ignore_eos": True})
    assert r["usage"] == (n, MAX_LEN - n, MAX_LEN) and r["finish"] == "length"
    edge = check_all(srv, llm, http, [7] * (MAX_LEN - 1), {"max_tokens": 1, "temperature": 0})
    assert edge["usage"] == (MAX_LEN - 1, 1, MAX_LEN)


CHATS = [
    pytest.param(SYS, {"add_generation_prompt": True, "continue_final_message": False},
                 id="generation-prompt"),
    pytest.param(SYS, {"add_generation_prompt": False, "continue_final_message": False},
                 id="no-generation-prompt"),
    pytest.param(CONT, {"add_generation_prompt": False, "continue_final_message": True},
                 id="continue-final-message"),
]


@pytest.mark.parametrize("msgs,opts", CHATS)
@pytest.mark.parametrize("p", [
    pytest.param({"max_tokens": 6, "temperature": 0}, id="greedy"),
    pytest.param({"max_tokens": 6, "temperature": 0.8, "seed": 11, "top_k": 8, "logprobs": 2},
                 id="seed-logprobs"),
])
def test_chat_agrees_everywhere(srv, llm, http, msgs, opts, p):
    check_all(srv, llm, http, msgs, p, opts)


def test_chat_stops_specials_and_context_limit_agree_everywhere(srv, llm, http):
    opts = {"add_generation_prompt": True, "continue_final_message": False}
    user = [{"role": "user", "content": "Tell me"}]
    full = check_all(srv, llm, http, user, {"max_tokens": 30, "temperature": 0,
                                            "ignore_eos": True, "skip_special_tokens": False},
                     opts)
    assert "<|" in full["text"]  # specials kept in the text, everywhere alike
    n = len(full["prompt_ids"])
    r = check_all(srv, llm, http, user, {"max_tokens": MAX_LEN - n, "temperature": 0,
                                         "ignore_eos": True}, opts)
    assert r["usage"] == (n, MAX_LEN - n, MAX_LEN)
    # chat without max_tokens fills the context (vLLM); the in-process default is 16
    body = {"messages": user, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    filled = http.post("/v1/chat/completions", json=body).json()
    assert filled["choices"][0]["token_ids"] == r["ids"]
    assert filled["usage"]["total_tokens"] == MAX_LEN


def test_prompt_logprob_ranks_agree_between_llm_and_http(llm, http):
    (o,) = llm.generate([IDS], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2))
    for path, body, where in (
            ("/v1/completions", {"prompt": IDS}, lambda d: d["choices"][0]),
            ("/v1/completions", {"prompt": llm.tokenizer.decode(IDS)},
             lambda d: d["choices"][0])):
        d = http.post(path, json={**body, "max_tokens": 2, "temperature": 0,
                                  "prompt_logprobs": 2}).json()
        plp = where(d)["prompt_logprobs"]
        assert plp[0] is None and len(plp) == len(IDS)
        got = [(e[str(t)]["logprob"], e[str(t)]["rank"]) for e, t in zip(plp[1:], IDS[1:])]
        assert got == [(lp, rank) for (lp, _), rank in zip(o.engine_prompt_logprobs,
                                                           o.prompt_logprob_ranks)]
        tops = [[(int(t), v["logprob"]) for t, v in e.items() if v["rank"] <= 2]
                for e in plp[1:]]
        assert [sorted(t, key=lambda x: -x[1]) for t in tops] == [
            sorted(tp, key=lambda x: -x[1]) for _, tp in o.engine_prompt_logprobs]
    (oc,) = llm.chat(SYS, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))
    d = http.post("/v1/chat/completions", json={"messages": SYS, "max_tokens": 1,
                                                "temperature": 0, "prompt_logprobs": 1}).json()
    pids = oc.prompt_token_ids
    assert len(d["prompt_logprobs"]) == len(pids)
    assert [e[str(t)]["rank"] for e, t in zip(d["prompt_logprobs"][1:], pids[1:])] == (
        oc.prompt_logprob_ranks)


def test_tokenize_and_detokenize_agree_with_the_tokenizer(srv, llm, http):
    tok = llm.tokenizer
    for text in (PROMPT, "Hi<|im_user|>x<|eos|> é퀟 😀", "  spaced\ttext\n"):
        r = http.post("/tokenize", json={"prompt": text, "return_token_strs": True}).json()
        ids = tok.encode(text, add_special_tokens=True)
        assert r["tokens"] == ids and r["count"] == len(ids)
        assert r["max_model_len"] == MAX_LEN
        assert r["token_strs"] == [tok.id_to_str(t) for t in ids]
        assert http.post("/detokenize", json={"tokens": ids}).json()["prompt"] == (
            tok.decode(ids, skip_special_tokens=False))
        # usage.prompt_tokens of the same text prompt, every interface: the /tokenize count
        p = {"max_tokens": 1, "temperature": 0}
        assert via_http(http, text, p, None)["usage"][0] == len(ids)
        assert via_ws(srv, JSON, text, p, None)["usage"][0] == len(ids)
    odd = [72, 257, 0xE9, 105, 259, 0xF0, 0x9F]  # specials, a cut UTF-8 sequence
    assert http.post("/detokenize", json={"tokens": odd}).json()["prompt"] == (
        tok.decode(odd, skip_special_tokens=False))
    for msgs, opts in ((SYS, {}), (SYS, {"add_generation_prompt": False}),
                       (CONT, {"add_generation_prompt": False,
                               "continue_final_message": True})):
        r = http.post("/tokenize", json={"messages": msgs, **opts}).json()
        assert r["tokens"] == tok.encode_chat(msgs, **opts)
        assert http.post("/tokenize", json={"messages": msgs, "chat_template_kwargs": opts}
                         ).json()["tokens"] == r["tokens"]


def test_every_interface_at_once_matches_each_request_alone(srv, llm, http):
    """Requests of all interfaces batched together: each answer is the one it gets alone."""
    cases = [(PROMPT, {"max_tokens": 16, "temperature": 0, "ignore_eos": True}),
             ("Another prompt", {"max_tokens": 16, "temperature": 0.8, "seed": 5, "top_p": 0.9,
                                 "ignore_eos": True}),
             (IDS, {"max_tokens": 16, "temperature": 1.0, "seed": 9, "top_k": 10,
                    "ignore_eos": True, "logprobs": 2}),
             ("xyz" * 8, {"max_tokens": 16, "temperature": 0, "repetition_penalty": 1.2,
                          "ignore_eos": True})]
    alone = [via_llm(llm, p, k, None) for p, k in cases]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        futures = []
        for (prompt, p), want in zip(cases, alone):
            for fn, args in ((via_http, (http,)), (via_sse, (http,)), (via_ws, (srv, JSON)),
                             (via_ws, (srv, MSGPACK)), (via_async, (srv,))):
                futures.append((want, pool.submit(fn, *args, prompt, p, None)))
        for want, fut in futures:
            got = fut.result(timeout=120)
            assert (got["ids"], got["text"], got["usage"]) == (
                want["ids"], want["text"], want["usage"])
    assert srv.wait_idle()["used_blocks"] == 0


def test_websocket_chat_options_at_the_top_level_are_honoured(srv, llm):
    """HTTP takes add_generation_prompt / continue_final_message next to messages; a WebSocket
    frame with them at the top level must render the same prompt (not silently the default)."""
    opts = {"add_generation_prompt": False, "continue_final_message": True}

    async def run() -> dict:
        async with connect(srv.ws_url, subprotocols=[JSON]) as ws:
            await ws.send(json.dumps({"type": "generate", "id": "c", "messages": CONT,
                                      "params": {"max_tokens": 1, "temperature": 0}, **opts}))
            while True:
                f = json.loads(await asyncio.wait_for(ws.recv(), 60))
                if f["type"] != "delta":
                    return f
    done = asyncio.run(run())
    assert done["type"] == "done", done
    assert done["usage"]["prompt_tokens"] == len(llm.tokenizer.encode_chat(CONT, **opts))


def test_content_parts_render_the_same_prompt_everywhere(srv, llm, http):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"},
                                          {"type": "text", "text": "there"}]}]
    opts = {"add_generation_prompt": True, "continue_final_message": False}
    p = {"max_tokens": 1, "temperature": 0}
    want = http.post("/tokenize", json={"messages": parts}).json()["tokens"]
    assert via_http(http, parts, p, opts)["prompt_ids"] == want
    assert via_ws(srv, JSON, parts, p, opts)["usage"][0] == len(want)
    assert via_llm(llm, parts, p, opts)["prompt_ids"] == want
    assert via_async(srv, parts, p, opts)["usage"][0] == len(want)
