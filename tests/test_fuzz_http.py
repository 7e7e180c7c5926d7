"""Property-based fuzzing of the HTTP request bodies (issue 10, "bad input").

One live server (demo model, CPU) per module and ONE persistent HTTP/1.1 client (httpx) keep every
case cheap: most bodies fail msgspec validation in microseconds; valid-looking ones carry
max_tokens 1-2. Bodies are written as raw JSON text so that NaN, Infinity, 1e999, lone surrogates
(escaped and as invalid UTF-8), huge integers, deep nesting and random bytes reach the server
exactly as an attacker would send them.

Routes: /v1/chat/completions and /v1/completions with every request field of
reference/serving_api.md (OpenAI's, vLLM's extras, tools / tool_choice, response_format and the
guided_* fields, stream_options, logit_bias, prompt_logprobs, echo, suffix, n / best_of, seed edge
values, truncate_prompt_tokens, allowed_token_ids, bad_words, cache_salt, vllm_xargs,
chat_template_kwargs, add_generation_prompt, continue_final_message, ...), each field drawn either
from plausible values (type-correct edge values, so that bodies get past validation into the
engine) or from wild JSON; the same bodies again with `stream: true` forced; chat bodies against a
second server running vLLM's tool-call and reasoning parsers; /tokenize and /detokenize bodies;
random bytes and random JSON on every route.

Oracles, for every case: the status is 200 or a clear 4xx (never 5xx); a 4xx body is the OpenAI
error object (message, type, param, code = status); no body holds a Python traceback; a 200 body
is well-formed (JSON with choices / tokens / prompt; an SSE stream of `data: <json>` events closed
by exactly one `data: [DONE]`); an SSE `data: {"error": ...}` event inside a 200 stream is a
failure (`LATE_FAILURES` lists the requests that may legitimately fail after the 200: none
today); and the server log holds no traceback, "Exception in ASGI application" or ERROR record
(`ServerLog`, checked after every case). After each batch of cases a plain request still succeeds
and the engine is idle again (no running request, no live stream, zero KV blocks in use). The
number of cases is counted and printed (`CASES`).

Run length: `ATOM_STREAM_FUZZ_SCALE` multiplies every example count (1 = CI, about 5,000 cases in
about 25 s on 2 cores; 0.1 for a quick look; 40: about 200,000 cases in 20 minutes). Cases are
random on each local run and fixed under CI (Hypothesis' "ci" profile derandomizes, when it sees
a CI environment variable such as CI=true), so a CI failure reproduces.
"""

from __future__ import annotations

import collections
import gc
import json
import logging
import math
import os
from typing import Self

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving_helpers import running_server

CASES = {"n": 0}
STATUSES: collections.Counter = collections.Counter()  # (route, status) -> cases, printed
# ATOM_STREAM_FUZZ_SCALE=0.1 for a quick local run; CI runs the full count (>= 9,000 with ws)
SCALE = float(os.environ.get("ATOM_STREAM_FUZZ_SCALE", "1"))
OK_STATUSES = {200, 400, 404, 413, 422, 429}
# derandomize is Hypothesis' profile's: random locally, derandomized (the same cases every run)
# where Hypothesis detects CI (its "ci" profile), so CI stays deterministic; as test_fuzz_ws
SETTINGS = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))
# the second server: vLLM's parsers, request-id headers and prompt-token details on
PARSERS = {"enable_auto_tool_choice": True, "tool_call_parser": "kimi_k2",
           "reasoning_parser": "kimi_k2", "enable_request_id_headers": True,
           "enable_prompt_tokens_details": True}


class Raw(str):
    """A JSON token written verbatim (NaN, Infinity, 1e999, an escaped lone surrogate...)."""


def enc(v: object) -> str:
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "Infinity" if v > 0 else "-Infinity"
        return repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, dict):
        return "{" + ",".join(json.dumps(str(k)) + ":" + enc(x) for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(enc(x) for x in v) + "]"
    raise TypeError(type(v))


def to_body(v: object) -> bytes:
    # lone surrogates become invalid UTF-8 on the wire (on purpose)
    return enc(v).encode("utf-8", "surrogatepass")


RAW_NUMBERS = st.sampled_from([Raw(t) for t in (
    "NaN", "-NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1e-999", "-0", "0.0",
    "123456789012345678901234567890", "-99999999999999999999", "1E+2", "01", "1.", ".5",
    '"\\ud800"', '"\\udfff\\ud800"', '"\\u0000"', "true", "null", "[]", "{}")])
ODD_TEXT = st.text(alphabet=st.characters(codec=None, categories=None), max_size=40)
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5),
    st.sampled_from([-(2**63), 2**63, 2**64, 10**30, 2**31, -(2**31), 2**63 - 1]),
    st.floats(allow_nan=True, allow_infinity=True), RAW_NUMBERS, ODD_TEXT)
WILD = st.recursive(SCALARS, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(ODD_TEXT, kids, max_size=4)), max_leaves=12)

# ------------------------------------------------------------------ plausible field values
WORDS = st.sampled_from(["hi", "a", "\n", " ", "the", "é", "\U0001f600", "<|im_end|>", "x" * 60])
TOKEN_IDS = st.lists(st.integers(-1, 330), max_size=6)
SMALL_INTS = st.sampled_from([-1, 0, 1, 2, 3, 20, 21, 255, 256, 257])
SEEDS = st.sampled_from([-1, 0, 1, 2**31, 2**32, 2**63 - 1, -(2**63), 2**63, 2**64 - 1, 2**64])
FLOATS = st.sampled_from([0, 0.0, 1e-9, 0.5, 1, 1.0, 2, 2.0001, -0.1, -2, 100, 1e308])
SCHEMA = st.sampled_from([{}, {"type": "object"}, {"type": "object", "properties": {
    "x": {"type": "string"}}, "required": ["x"]}, {"type": "array", "items": {}}])
TOOL = st.fixed_dictionaries(
    {"type": st.sampled_from(["function", "function", "code_interpreter"]),
     "function": st.fixed_dictionaries(
         {"name": st.sampled_from(["f", "get_weather", "", "a.b-c"])},
         optional={"description": WORDS, "parameters": SCHEMA, "strict": st.booleans()})})
TOOLS = st.one_of(st.lists(TOOL, max_size=3), st.lists(WILD, max_size=2))
TOOL_CHOICE = st.one_of(
    st.sampled_from(["none", "auto", "required", "any", ""]),
    st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
        {"name": st.sampled_from(["f", "nope"])})}))
RESPONSE_FORMAT = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(
        ["text", "json_object", "json_schema", "structural_tag", "xml"])},
        optional={"json_schema": st.fixed_dictionaries({"name": st.just("s")},
                                                       optional={"schema": SCHEMA})}),
    st.just({}))
TEMPLATE_KWARGS = st.dictionaries(st.sampled_from(
    ["enable_thinking", "thinking", "add_generation_prompt", "continue_final_message", "tools",
     "documents", "chat_template", "tokenize", "messages", "custom", "reasoning_effort",
     "add_special_tokens"]),
    st.one_of(st.booleans(), WORDS, st.lists(TOOL, max_size=1), st.none()), max_size=3)
STREAM_OPTIONS = st.fixed_dictionaries({}, optional={
    "include_usage": st.one_of(st.booleans(), st.none()),
    "continuous_usage_stats": st.one_of(st.booleans(), st.none())})
LOGIT_BIAS = st.dictionaries(st.one_of(st.integers(-1, 330).map(str), WORDS),
                             st.one_of(FLOATS, st.integers(-100, 100)), max_size=3)
MESSAGE = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["user", "assistant", "system", "tool", "developer"]),
                       ODD_TEXT, SCALARS)},
    optional={"content": st.one_of(ODD_TEXT, st.lists(st.fixed_dictionaries(
        {"type": st.one_of(st.sampled_from(["text", "image_url", "thinking"]), ODD_TEXT),
         "text": st.one_of(ODD_TEXT, SCALARS)}), max_size=3), WILD),
        "name": st.one_of(ODD_TEXT, SCALARS), "tool_call_id": st.one_of(WORDS, SCALARS),
        "tool_calls": st.one_of(WILD, st.lists(st.fixed_dictionaries(
            {"id": st.just("c1"), "type": st.just("function"), "function": st.fixed_dictionaries(
                {"name": st.just("f"), "arguments": st.sampled_from(['{"x": 1}', "{", ""])})}),
            max_size=2)),
        "reasoning_content": st.one_of(ODD_TEXT, SCALARS)})
PROMPT = st.one_of(ODD_TEXT, st.lists(st.integers(-3, 400), min_size=0, max_size=8),
                   st.lists(ODD_TEXT, max_size=3), st.lists(st.lists(st.integers(-2, 330),
                                                                    max_size=4), max_size=3),
                   WILD)
B = st.booleans()
PLAUSIBLE: dict[str, st.SearchStrategy] = {
    "model": st.sampled_from(["demo", "", "other", "DEMO"]),
    "n": st.sampled_from([1, 2, 3, 0, -1, 129]), "best_of": st.sampled_from([None, 1, 2, 3, 0]),
    "temperature": FLOATS, "top_p": FLOATS, "min_p": FLOATS, "presence_penalty": FLOATS,
    "frequency_penalty": FLOATS, "repetition_penalty": FLOATS,
    "top_k": st.sampled_from([-2, -1, 0, 1, 5, 319, 320, 10**9]), "seed": SEEDS,
    "stop": st.one_of(WORDS, st.lists(WORDS, max_size=5), st.just([""])),
    "bad_words": st.one_of(st.lists(WORDS, max_size=3), st.just([""])),
    "stop_token_ids": TOKEN_IDS, "ignore_eos": B, "min_tokens": SMALL_INTS,
    "skip_special_tokens": B, "spaces_between_special_tokens": B,
    "include_stop_str_in_output": B, "stream": B, "stream_options": STREAM_OPTIONS,
    "logit_bias": LOGIT_BIAS, "user": WORDS, "truncate_prompt_tokens": SMALL_INTS,
    "prompt_logprobs": SMALL_INTS, "allowed_token_ids": TOKEN_IDS,
    "priority": st.sampled_from([0, 1, -1]),
    "request_id": st.one_of(WORDS, st.just("r" * 1025)),
    "logits_processors": st.sampled_from([[], ["m.f"], [{"qualname": "m.f"}]]),
    "return_tokens_as_token_ids": B, "return_token_ids": B,
    "cache_salt": st.sampled_from(["", "salt", "s" * 300]),
    "vllm_xargs": st.dictionaries(WORDS, st.one_of(st.integers(), WORDS, st.lists(
        st.integers(), max_size=2)), max_size=2),
    "use_beam_search": B, "response_format": RESPONSE_FORMAT,
    "guided_json": st.one_of(SCHEMA, WORDS), "guided_regex": WORDS,
    "guided_choice": st.lists(WORDS, max_size=2), "guided_grammar": WORDS,
    "guided_decoding_backend": WORDS,
    "structured_outputs": st.dictionaries(st.sampled_from(
        ["json", "regex", "choice", "backend", "disable_fallback"]), WORDS, max_size=2),
    "length_penalty": FLOATS, "add_special_tokens": B, "kv_transfer_params": st.just({}),
    # chat
    "messages": st.lists(MESSAGE, max_size=3), "max_completion_tokens": SMALL_INTS,
    "top_logprobs": SMALL_INTS, "add_generation_prompt": B, "continue_final_message": B,
    "chat_template_kwargs": TEMPLATE_KWARGS, "chat_template": st.just("{{ messages }}"),
    "tools": TOOLS, "tool_choice": TOOL_CHOICE, "parallel_tool_calls": B,
    "reasoning_effort": st.sampled_from(["low", "medium", "high", "x"]),
    "include_reasoning": B, "documents": st.lists(st.fixed_dictionaries({"text": WORDS}),
                                                  max_size=1),
    "mm_processor_kwargs": st.just({}), "echo": B,
    # completions
    "prompt": st.one_of(WORDS, st.lists(WORDS, min_size=1, max_size=3),
                        st.lists(st.integers(0, 319), min_size=1, max_size=6),
                        st.lists(st.lists(st.integers(0, 319), min_size=1, max_size=3),
                                 min_size=1, max_size=2)),
    "suffix": st.sampled_from(["", "x", None]), "prompt_embeds": WORDS,
    "max_tokens": st.sampled_from([0, 1, 2, -1, 256, 10**9]),
    # tokenize / detokenize
    "return_token_strs": B, "tokens": TOKEN_IDS,
}
CHAT_ONLY = {"logprobs": B}
COMPLETIONS_ONLY = {"logprobs": SMALL_INTS}

SHARED = ["model", "n", "best_of", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
          "stop_token_ids", "presence_penalty", "frequency_penalty", "repetition_penalty",
          "ignore_eos", "min_tokens", "skip_special_tokens", "spaces_between_special_tokens",
          "include_stop_str_in_output", "stream", "stream_options", "logit_bias", "user",
          "truncate_prompt_tokens", "prompt_logprobs", "allowed_token_ids", "priority",
          "request_id", "logits_processors", "return_tokens_as_token_ids", "return_token_ids",
          "cache_salt", "vllm_xargs", "use_beam_search", "response_format", "guided_json",
          "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
          "structured_outputs", "length_penalty", "logprobs", "max_tokens", "echo",
          "kv_transfer_params"]
FIELDS = {
    "chat": SHARED + ["messages", "max_completion_tokens", "top_logprobs",
                      "add_generation_prompt", "continue_final_message", "chat_template_kwargs",
                      "chat_template", "tools", "tool_choice", "parallel_tool_calls",
                      "reasoning_effort", "include_reasoning", "documents", "bad_words",
                      "mm_processor_kwargs"],
    "completions": SHARED + ["prompt", "suffix", "add_special_tokens", "bad_words",
                             "prompt_embeds"],
    "tokenize": ["prompt", "messages", "model", "add_special_tokens", "add_generation_prompt",
                 "continue_final_message", "return_token_strs", "chat_template_kwargs",
                 "tools", "chat_template"],
    "detokenize": ["tokens", "model"],
}
BASE = {
    "chat": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    "completions": {"prompt": "hi", "max_tokens": 1},
    "tokenize": {"prompt": "hi"},
    "detokenize": {"tokens": [104, 105]},
}
ROUTES = {"chat": "/v1/chat/completions", "completions": "/v1/completions",
          "tokenize": "/tokenize", "detokenize": "/detokenize"}
# requests that may fail after their 200 (an SSE error event is their answer); none today:
# every check this server makes runs before the first byte is sent
LATE_FAILURES: list = []

# pre-rendered (Raw): encoding 100k-element lists in Python per case would dominate the run time
HUGE = st.one_of(
    st.integers(5_000, 300_000).map(lambda k: Raw('"' + "x" * k + '"')),
    st.integers(5_000, 100_000).map(lambda k: Raw("[" + "7," * (k - 1) + "7]")),
    st.integers(100, 50_000).map(lambda k: Raw("[" * k + "]" * k)),
    st.integers(100, 50_000).map(lambda k: Raw('{"a":' * k + "1" + "}" * k)))


def value_for(kind: str, field: str) -> st.SearchStrategy:
    """Plausible values twice as often as wild ones; huge ones for the text-like fields."""
    own = (CHAT_ONLY if kind == "chat" else COMPLETIONS_ONLY).get(field)
    plausible = own if own is not None else PLAUSIBLE.get(field, WILD)
    wild = [WILD]
    if field == "messages":
        wild = [WILD, HUGE]
    elif field == "prompt":
        wild = [PROMPT, HUGE]
    elif field in ("stop", "request_id", "user", "tokens"):
        wild = [WILD, HUGE]
    return st.one_of(plausible, plausible, *wild)


def number(v: object) -> float | None:
    """The number a lax decoder reads from v (an int, a float, a numeric string), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            x = float(v.strip())
        except ValueError:
            return None
        return x if math.isfinite(x) else None
    return None


def tame(body: dict, kind: str) -> None:
    """Keep valid bodies cheap: token counts that would run many decode steps (a lax "1E+2"
    included) of 7 or more become 4, fan-outs of 5 or more a refused 10**9, and a body that leaves
    its length to the context gets max_tokens 1."""
    for key in ("max_tokens", "max_completion_tokens", "min_tokens"):
        x = number(body.get(key))
        if x is not None and 7 <= x < 10**6:
            body[key] = 4
    for key in ("n", "best_of"):
        x = number(body.get(key))
        if x is not None and 5 <= x < 10**6:
            body[key] = 10**9
    if kind == "chat" and body.get("max_tokens") is None and body.get(
            "max_completion_tokens") is None:
        body["max_completion_tokens"] = 1
    if kind == "completions" and body.get("max_tokens") is None:
        body["max_tokens"] = 1


@st.composite
def mutated(draw: st.DrawFn, kind: str, stream: bool = False) -> bytes:
    """A valid body with 1-6 fields replaced, removed or added (tame() keeps the work small);
    `stream`: stream true forced on top."""
    body = dict(BASE[kind])
    for _ in range(draw(st.integers(1, 6))):
        # mostly known fields: an unknown key is ignored (valid body -> a slower engine case)
        field = draw(st.sampled_from(FIELDS[kind])) if draw(st.integers(0, 11)) else draw(
            ODD_TEXT)
        if draw(st.integers(0, 9)) == 0:
            body.pop(field, None)
        else:
            body[field] = draw(value_for(kind, field))
    if kind in ("chat", "completions"):
        tame(body, kind)
    if stream:
        body["stream"] = True
    return to_body(body)


# what clients put in Content-Type (vLLM: anything but application/json is a 400)
CONTENT_TYPES = st.one_of(st.sampled_from(
    ["application/json", "application/json", "application/json; charset=utf-8",
     "Application/JSON", "text/plain", "", "application/x-www-form-urlencoded",
     "multipart/form-data; boundary=x", "application/json;;;", "*/*"]),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30).map(
        str.strip))  # the client refuses a value with outer whitespace
# X-Request-Id (vLLM: the header names the response; any latin-1 bytes a client may send)
HEADERS = st.one_of(st.just({}), st.just({}), st.fixed_dictionaries({"x-request-id": st.one_of(
    st.binary(max_size=40).map(lambda b: bytes(c for c in b if c > 31 and c != 127).strip()),
    st.integers(1000, 1100).map(lambda k: b"h" * k), st.sampled_from([b"", b"same-id"]))}))
GARBAGE = st.one_of(st.binary(max_size=200), WILD.map(to_body),
                    ODD_TEXT.map(lambda s: s.encode("utf-8", "surrogatepass")))


class ServerLog(logging.Handler):
    """Collects what the server thread logs that a healthy server never does: records with a
    traceback, ERROR and above, and uvicorn's "Exception in ASGI application"."""

    NAMES = ("", "uvicorn", "uvicorn.error", "asyncio")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bad: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if (record.exc_info or record.levelno >= logging.ERROR or "Traceback" in text
                or "Exception in ASGI application" in text):
            self.bad.append(f"{record.name} {record.levelname}: {text}\n"
                            f"{logging.Formatter().formatException(record.exc_info)}"
                            if record.exc_info else f"{record.name}: {text}")

    def take(self) -> list[str]:
        """The records collected since the last take (each failure is reported once)."""
        bad, self.bad = self.bad, []
        return bad

    def __enter__(self) -> Self:
        for name in self.NAMES:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for name in self.NAMES:
            logging.getLogger(name).removeHandler(self)


@pytest.fixture(scope="module")
def log():
    gc.collect()  # earlier modules' leftover tasks log "destroyed but pending" when collected
    with ServerLog() as handler:
        yield handler


@pytest.fixture(scope="module")
def srv(log):
    with running_server({"max_model_len": 256}) as s:
        yield s


@pytest.fixture(scope="module")
def http(srv):
    with httpx.Client(base_url=srv.url, timeout=60, http2=False) as c:
        yield c


@pytest.fixture(scope="module")
def parsed(log):
    """A second server with vLLM's --enable-auto-tool-choice, tool-call and reasoning parsers,
    and its client."""
    with running_server({"max_model_len": 256}, **PARSERS) as s, httpx.Client(
            base_url=s.url, timeout=60) as c:
        yield s, c


def check_sse(text: str, what: bytes) -> None:
    """A 200 stream: `data: <json>` events (comments allowed), exactly one `data: [DONE]`, last;
    no error event unless the request is one of LATE_FAILURES."""
    events = [e for e in text.split("\n\n") if e]
    assert events and events[-1] == "data: [DONE]", (text[-300:], what[:300])
    for e in events[:-1]:
        if e.startswith(":"):
            continue
        assert e.startswith("data: ") and e != "data: [DONE]", (e[:300], what[:300])
        obj = json.loads(e[6:])
        if "error" in obj:
            assert any(late(what) for late in LATE_FAILURES), (obj, what[:500])
            continue
        assert obj["object"] in ("chat.completion.chunk", "text_completion"), obj
        assert isinstance(obj["choices"], list), obj


def check_json(route: str, obj: dict, what: bytes) -> None:
    """A 200 JSON body has the route's shape."""
    if route == "/tokenize":
        assert obj["count"] == len(obj["tokens"]), obj
    elif route == "/detokenize":
        assert isinstance(obj["prompt"], str), obj
    else:
        assert obj["choices"] and obj["usage"]["total_tokens"] >= 1, (obj, what[:300])


def check(resp: httpx.Response, what: bytes, route: str = "", log: ServerLog | None = None
          ) -> None:
    CASES["n"] += 1
    STATUSES[route, resp.status_code] += 1
    text = resp.text
    assert resp.status_code in OK_STATUSES, (resp.status_code, text[:500], what[:300])
    assert "Traceback" not in text and 'File "' not in text, text[:500]
    if resp.status_code != 200:
        err = resp.json()["error"]
        assert err["message"] and isinstance(err["message"], str), err
        assert err["code"] == resp.status_code and isinstance(err["type"], str), err
        assert "param" in err, err
    elif resp.headers.get("content-type", "").startswith("text/event-stream"):
        check_sse(text, what)
    elif route:
        check_json(route, resp.json(), what)
    if log is not None:
        bad = log.take()
        assert not bad, ("server log", bad[:3], what[:300])


def post(http: httpx.Client, route: str, body: bytes, log: ServerLog | None = None,
         content_type: str = "application/json", headers: dict | None = None) -> None:
    check(http.post(route, content=body, headers={"content-type": content_type,
                                                  **(headers or {})}), body, route, log)


def assert_healthy(http: httpx.Client, srv, log: ServerLog) -> None:
    """After a batch: a plain request succeeds, the engine is idle, the log is clean."""
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                "max_tokens": 2})
    assert r.status_code == 200, r.text[:500]
    message = r.json()["choices"][0]["message"]  # a reasoning parser may take all the text
    assert message["content"] is not None or message.get("reasoning_content") is not None
    s = srv.wait_idle()
    assert s["used_blocks"] == 0 and s["num_streams"] == 0 and not s["is_dead"], s
    assert s["num_running"] == 0 and s["num_waiting"] == 0, s
    bad = log.take()
    assert not bad, bad[:3]


def fuzz_route(http: httpx.Client, route: str, strategy: st.SearchStrategy, n: int,
               log: ServerLog) -> None:
    @settings(SETTINGS, max_examples=max(1, n))
    @given(strategy, HEADERS)
    def run(body: bytes, headers: dict) -> None:
        post(http, route, body, log, headers=headers)

    run()


@pytest.mark.parametrize("kind", ["chat", "completions", "tokenize", "detokenize"])
def test_fuzz_mutated_bodies(http, srv, log, kind):
    n = int(SCALE * {"chat": 600, "completions": 600, "tokenize": 500, "detokenize": 300}[kind])
    fuzz_route(http, ROUTES[kind], mutated(kind), n, log)
    assert_healthy(http, srv, log)


@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_fuzz_streamed_bodies(http, srv, log, kind):
    """The same bodies with stream true forced: every field through the SSE path."""
    fuzz_route(http, ROUTES[kind], mutated(kind, stream=True), int(SCALE * 375), log)
    assert_healthy(http, srv, log)


@pytest.mark.parametrize("stream", [False, True])
def test_fuzz_chat_with_parsers(parsed, log, stream):
    """Chat bodies (tools, tool_choice, thinking switches...) through the tool-call and
    reasoning parsers."""
    psrv, client = parsed
    fuzz_route(client, ROUTES["chat"], mutated("chat", stream=stream), int(SCALE * 125), log)
    assert_healthy(client, psrv, log)


def test_fuzz_garbage_bodies(http, srv, log):
    @settings(SETTINGS, max_examples=int(SCALE * 2000))
    @given(route=st.sampled_from(sorted(ROUTES.values())), body=GARBAGE,
           content_type=CONTENT_TYPES)
    def run(route, body, content_type):
        post(http, route, body, log, content_type)

    run()
    assert_healthy(http, srv, log)


def test_ten_megabyte_and_deep_bodies(http, srv, log):
    big = b'{"prompt":"' + b"a" * (10 << 20) + b'","max_tokens":1}'
    for route in ROUTES.values():
        resp = http.post(route, content=big)
        check(resp, b"10MB")
        assert resp.status_code == 413
        deep = b'{"prompt":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
        post(http, route, deep, log)
    # the same over chunked transfer-encoding (no content-length to reject up front)
    resp = http.post("/v1/completions", content=iter([big[i:i + (1 << 20)]
                                                      for i in range(0, len(big), 1 << 20)]))
    check(resp, b"10MB chunked")
    assert resp.status_code == 413


def test_server_still_serves_and_nothing_leaked(http, srv, log):
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": True})
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    assert_healthy(http, srv, log)


def test_case_count(capsys):
    with capsys.disabled():
        print(f"\n[fuzz-http] cases tried: {CASES['n']}; by route and status: "
              f"{sorted(STATUSES.items())}")
    assert CASES["n"] >= int(SCALE * 5_000), CASES
