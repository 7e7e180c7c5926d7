"""Tool calls (vLLM's --enable-auto-tool-choice --tool-call-parser kimi_k2 | deepseek_v3) and, end
to end, reasoning (--reasoning-parser): the parsers on whole and chunked texts, tool_choice rules,
skip_special_tokens for special-token markers, the CLI flags, and /v1/chat/completions (streamed
and not) over a scripted engine (`ScriptedChat`: the app's real handlers, a fake engine that
yields fixed text pieces, so the model's output is known)."""

from __future__ import annotations

import json
import shlex
from types import SimpleNamespace

import pytest
from starlette.testclient import TestClient
from tokenizer_fixtures import write_kimi_tokenizer

from atom_stream import cli
from atom_stream.config import EngineConfig
from atom_stream.engine.outputs import RequestOutput, Usage
from atom_stream.server.app import ServerConfig, build_app
from atom_stream.server.chat_parsing import AUTO_TOOLS_MESSAGE, ChatParsing
from atom_stream.server.responses import HTTPError
from atom_stream.server.tool_parsers import (
    DEEPSEEK_V3,
    KIMI_K2,
    ToolCallStream,
    extract_tool_calls,
    held_suffix,
)
from atom_stream.tokenizer import DemoTokenizer, load_tokenizer

SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, AB, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
KIMI_OUT = (f"Let me check.{SB}{CB}functions.get_weather:0{AB} {{\"city\": \"Paris\"}} {CE}"
            f"{CB}functions.get_time:1{AB}{{}}{CE}{SE}")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {}}}]
CHAT = [{"role": "user", "content": "Weather in Paris?"}]
# the OpenAI fields of vLLM's ChatMessage that it always dumps as null
MESSAGE_NULLS = {"refusal": None, "annotations": None, "audio": None, "function_call": None}


def chunks(text: str, size: int) -> list[str]:
    return [text[k:k + size] for k in range(0, len(text), size)]


def stream_parse(text: str, step: int, fmt=KIMI_K2):
    """Feed `text` in pieces of `step` characters: (content, {index: [id, name, args]})."""
    s = ToolCallStream(fmt)
    content, calls = [], {}

    def take(c, deltas):
        content.append(c)
        for d in deltas:
            e = calls.setdefault(d.index, [None, "", ""])
            if isinstance(d.id, str):
                assert e[0] is None and d.type == "function"
                e[0] = d.id
            if isinstance(d.function.name, str):
                e[1] += d.function.name
            if isinstance(d.function.arguments, str):
                e[2] += d.function.arguments

    for k in range(0, len(text), step):
        take(*s.feed(text[k:k + step]))
    take(*s.finish())
    return "".join(content), calls


# ------------------------------------------------------------------------------ parsers
def test_kimi_whole_output():
    content, calls = extract_tool_calls(KIMI_K2, KIMI_OUT)
    assert content == "Let me check."
    assert [(c.id, c.type, c.function.name, c.function.arguments) for c in calls] == [
        ("functions.get_weather:0", "function", "get_weather", '{"city": "Paris"}'),
        ("functions.get_time:1", "function", "get_time", "{}")]
    assert extract_tool_calls(KIMI_K2, "plain answer") == ("plain answer", [])
    assert extract_tool_calls(KIMI_K2, f"{SB}{CB}functions.f:0{AB}{{}}{CE}{SE}")[0] is None


@pytest.mark.parametrize("step", [1, 2, 5, 13, 10_000])
def test_kimi_streamed_in_any_pieces_equals_whole(step):
    content, calls = stream_parse(KIMI_OUT + "Done.", step)
    assert content == "Let me check.Done."  # text after the section is content again
    assert calls == {0: ["functions.get_weather:0", "get_weather", '{"city": "Paris"}'],
                     1: ["functions.get_time:1", "get_time", "{}"]}


def test_kimi_stream_deltas_by_token():
    s = ToolCallStream(KIMI_K2)
    got = [s.feed(t) for t in ["Hi", SB, CB, "functions.f:0", AB, '{"a":', " 1}", "\n", CE, SE]]
    assert [c for c, _ in got] == ["Hi"] + [""] * 9
    first = got[4][1][0]
    assert (first.id, first.type, first.index, first.function.name) == (
        "functions.f:0", "function", 0, "f")
    assert [d[0].function.arguments for _, d in got[5:7]] == ['{"a":', " 1}"]
    assert got[7][1] == [] and got[8][1] == []  # trailing whitespace held, then dropped


def test_kimi_edge_cases():
    # singular section variant, header without "functions.", truncated arguments kept
    content, calls = stream_parse(f"<|tool_call_section_begin|>{CB}f:3{AB}{{\"x\": 1", 4)
    assert content == "" and calls == {0: ["f:3", "f", '{"x": 1']}
    # an empty name or a call without an argument marker is dropped; noise between calls too
    _, calls = stream_parse(f"{SB}{CB}functions.:0{AB}{{}}{CE}junk{CB}g:1{CE}{CB}h:2{AB}1{CE}{SE}",
                            3)
    assert calls == {0: ["h:2", "h", "1"]}
    # a header cut off by the end is dropped; text that only looks like a marker is content
    assert stream_parse(f"a{SB}{CB}functions.f", 2) == ("a", {})
    assert stream_parse("x <|tool_calls_sec y", 1) == ("x <|tool_calls_sec y", {})
    assert held_suffix("abc<|tool_c", KIMI_K2.section_begin) == 8
    assert held_suffix("abc", KIMI_K2.section_begin) == 0


@pytest.mark.parametrize("step", [1, 7, 10_000])
def test_deepseek_v3_format(step):
    text = ("Hi<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
            '```json\n{"location": "Tokyo"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function'
            "<｜tool▁sep｜>f2\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>")
    content, calls = stream_parse(text, step, DEEPSEEK_V3)
    assert content == "Hi"
    assert [v[1:] for v in calls.values()] == [["get_weather", '{"location": "Tokyo"}'],
                                                 ["f2", "{}"]]
    assert all(v[0].startswith("chatcmpl-tool-") for v in calls.values())
    whole, tc = extract_tool_calls(DEEPSEEK_V3, text)
    assert whole == "Hi" and [c.function.name for c in tc] == ["get_weather", "f2"]


# ------------------------------------------------------------------------------ tool_choice
def _req(tool_choice=None, tools=TOOLS):
    return SimpleNamespace(tool_choice=tool_choice, tools=tools)


def test_tool_choice_rules():
    off, on = ChatParsing(), ChatParsing(True, "kimi_k2")
    assert on.tool_choice(_req())  # absent with tools: "auto" (vLLM's check_tool_usage)
    with pytest.raises(HTTPError) as e:  # ... which needs the flags
        off.tool_choice(_req())
    assert e.value.message == AUTO_TOOLS_MESSAGE
    assert not on.tool_choice(_req(tools=None)) and not on.tool_choice(_req("none"))
    assert on.tool_choice(_req("auto"))
    with pytest.raises(HTTPError) as e:
        off.tool_choice(_req("auto"))
    assert e.value.message == AUTO_TOOLS_MESSAGE and e.value.param == "tool_choice"
    # --tool-call-parser without --enable-auto-tool-choice does not parse (vLLM)
    with pytest.raises(HTTPError):
        ChatParsing(False, "kimi_k2").tool_choice(_req("auto"))
    for bad, words in ((_req("auto", None), "`tools` must be set"),
                       (_req("sometimes"), "Invalid value for `tool_choice`"),
                       (_req({"type": "function", "function": {"name": "nope"}}), "does not match"),
                       (_req({"type": "function"}), "Correct usage")):
        for parsing in (off, on):
            with pytest.raises(HTTPError) as e:
                parsing.tool_choice(bad)
            assert e.value.status == 400 and words in e.value.message
    for forced in (_req("required"), _req({"type": "function", "function": {"name": "get_time"}})):
        for parsing in (off, on):  # forced by structured outputs (forced_tools.py), not parsed
            assert parsing.tool_choice(forced) is False


def test_markers_that_are_special_tokens_keep_specials(tmp_path):
    demo = ChatParsing(True, "kimi_k2", "kimi_k2").plan(True, None, DemoTokenizer())
    assert demo is not None and not demo.keep_specials  # plain text in the demo tokenizer
    kimi = load_tokenizer(write_kimi_tokenizer(str(tmp_path / "a")))
    assert ChatParsing(True, "kimi_k2").plan(True, None, kimi).keep_specials
    assert ChatParsing(True, "kimi_k2").plan(False, None, kimi) is None  # nothing parsed
    flags = {m: False for m in (SB, SE, CB, AB, CE)}
    plain = load_tokenizer(write_kimi_tokenizer(str(tmp_path / "b"), special_flags=flags))
    assert not ChatParsing(True, "kimi_k2").plan(True, None, plain).keep_specials
    # reasoning: <think> tags special -> kept; instant mode (thinking false) reads no tags
    assert ChatParsing(reasoning_parser="kimi_k2").plan(False, None, plain).keep_specials
    assert not ChatParsing(reasoning_parser="kimi_k2").plan(
        False, {"thinking": False}, plain).keep_specials


# ------------------------------------------------------------------------------ flags
def _server(argv: str) -> ServerConfig:
    return cli.server_config_from_args(cli.serve_parser().parse_args(shlex.split(argv)))


def test_cli_flags_and_startup_errors():
    s = _server("--enable-auto-tool-choice --tool-call-parser kimi_k2 --reasoning_parser kimi_k2")
    assert (s.enable_auto_tool_choice, s.tool_call_parser, s.reasoning_parser) == (
        True, "kimi_k2", "kimi_k2")
    s = _server("")
    assert (s.enable_auto_tool_choice, s.tool_call_parser, s.reasoning_parser) == (
        False, None, None)
    assert _server("--tool-call-parser deepseek_v3 --reasoning-parser deepseek_r1")
    for bad, words in (("--tool-call-parser hermes", "known: deepseek_v3, deepseek_v31, kimi_k2"),
                       ("--reasoning-parser qwen3", "known: deepseek_r1, deepseek_v3, kimi_k2"),
                       ("--enable-auto-tool-choice", "requires --tool-call-parser")):
        with pytest.raises(ValueError, match=words):
            _server(bad)


# ------------------------------------------------------------------------------ HTTP
class ScriptedChat:
    """Just enough engine for the chat route: each request yields `script` (text pieces, one
    token each, the last one ending it with `finish`); `seen` records (params, kwargs) of
    generate, `rendered` (chat_template_kwargs, kwargs) of tokenize_prompt (the server renders
    and checks every prompt before it submits one)."""

    max_model_len = 4096
    max_live_requests = None
    is_dead = False

    def __init__(self):
        self.tokenizer = DemoTokenizer()
        self.script: list[str] = ["hi"]
        self.finish = "stop"
        self.seen: list = []
        self.rendered: list = []

    def stats(self) -> dict:
        return {}

    async def tokenize_prompt(self, prompt, chat_template_kwargs=None, **kwargs):
        self.rendered.append((chat_template_kwargs, kwargs))
        return [1, 2, 3]

    async def generate(self, prompt, params, request_id=None, **kwargs):
        self.seen.append((params, kwargs))
        n = len(self.script)
        for k, text in enumerate(self.script):
            last = k == n - 1
            out = RequestOutput(request_id, [65], text, self.finish if last else None,
                                usage=Usage(3, n, 3 + n) if last else None,
                                engine_logprobs=[(-0.5, [(65, -0.5)])] if params.logprobs else None)
            if k == 0:
                out.prompt_token_ids = [1, 2, 3]
            yield out


def _client(engine: ScriptedChat, **server) -> TestClient:
    app = build_app(EngineConfig(model="demo", device="cpu"), ServerConfig(**server),
                    engine=engine)
    return TestClient(app)


@pytest.fixture(scope="module")
def on():
    engine = ScriptedChat()
    with _client(engine, enable_auto_tool_choice=True, tool_call_parser="kimi_k2",
                 reasoning_parser="kimi_k2") as c:
        yield c, engine


@pytest.fixture(scope="module")
def off():
    engine = ScriptedChat()
    with _client(engine) as c:
        yield c, engine


def events(body: str) -> list[dict]:
    assert body.endswith("data: [DONE]\n\n")
    return [json.loads(p[len("data: "):]) for p in body.split("\n\n")[:-2]]


def test_http_tool_calls_and_reasoning_non_streamed(on):
    c, engine = on
    engine.script = ["Weather", " needed.", "</think>", *chunks(KIMI_OUT, 5)]
    body = {"messages": CHAT, "tools": TOOLS}
    r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    msg = choice["message"]
    assert list(msg) == ["role", "content", "refusal", "annotations", "audio", "function_call",
                         "tool_calls", "reasoning_content"]  # vLLM's ChatMessage, model_dump
    assert msg["reasoning_content"] == "Weather needed." and msg["content"] == "Let me check."
    assert msg["tool_calls"] == [
        {"id": "functions.get_weather:0", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "functions.get_time:1", "type": "function",
         "function": {"name": "get_time", "arguments": "{}"}}]
    assert engine.rendered[-1][0]["tools"] == TOOLS
    # tool_choice none: tools rendered, nothing parsed; no tools: plain content, same shape
    for extra in ({"tool_choice": "none"}, {"tools": None}):
        r = c.post("/v1/chat/completions", json={**body, **extra})
        msg = r.json()["choices"][0]["message"]
        assert msg["tool_calls"] == [] and msg["content"] == KIMI_OUT
        assert r.json()["choices"][0]["finish_reason"] == "stop"
    # instant mode: no reasoning, the think tag stays content
    engine.script = ["Plain", " answer"]
    r = c.post("/v1/chat/completions", json={**body, "chat_template_kwargs": {"thinking": False}})
    msg = r.json()["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": "Plain answer", **MESSAGE_NULLS,
                   "tool_calls": [], "reasoning_content": None}
    # cut by max_tokens inside a call: the call as far as it went, finish_reason stays length
    engine.script, engine.finish = ["</think>", SB, CB, "functions.f:0", AB, '{"a"'], "length"
    try:
        choice = c.post("/v1/chat/completions", json=body).json()["choices"][0]
    finally:
        engine.finish = "stop"
    assert choice["finish_reason"] == "length"
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"a"'}
    assert choice["message"]["content"] is None and choice["message"]["reasoning_content"] == ""


def test_http_include_reasoning_false(on):
    """vLLM's include_reasoning false: the reasoning is split off and not sent (null in the
    message, no reasoning delta); content and tool calls as with it."""
    c, engine = on
    body = {"messages": CHAT, "tools": TOOLS, "include_reasoning": False}
    engine.script = ["Weather", " needed.", "</think>", *chunks(KIMI_OUT, 5)]
    choice = c.post("/v1/chat/completions", json=body).json()["choices"][0]
    msg = choice["message"]
    assert msg["reasoning_content"] is None and msg["content"] == "Let me check."
    assert [t["function"]["name"] for t in msg["tool_calls"]] == ["get_weather", "get_time"]
    engine.script = ["Weather", " needed.", "</think>", *chunks(KIMI_OUT, 5)]
    r = c.post("/v1/chat/completions", json={**body, "stream": True})
    deltas = [ch["delta"] for e in events(r.text) for ch in e["choices"]]
    assert not any(d.get("reasoning_content") for d in deltas)
    assert "".join(d.get("content") or "" for d in deltas) == "Let me check."


def test_http_tool_calls_and_reasoning_streamed(on):
    c, engine = on
    engine.script = ["Hmm", "</think>", "Sure.", SB, CB, "functions.get_time:0", AB, '{"tz":',
                     ' "CET"}', CE, SE]
    r = c.post("/v1/chat/completions", json={"messages": CHAT, "tools": TOOLS, "stream": True,
                                             "tool_choice": "auto"})
    ev = events(r.text)
    deltas = [e["choices"][0]["delta"] for e in ev]
    assert deltas == [
        {"role": "assistant", "content": ""},
        {"reasoning_content": "Hmm"},
        {"content": "Sure."},
        {"tool_calls": [{"id": "functions.get_time:0", "type": "function", "index": 0,
                         "function": {"name": "get_time"}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"tz":'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": ' "CET"}'}}]},
        {}]
    assert [e["choices"][0]["finish_reason"] for e in ev] == [None] * 6 + ["tool_calls"]
    # with logprobs, a step the parsers swallow still sends its logprobs (an empty delta)
    engine.script = ["a", "</think>", "b"]
    ev = events(c.post("/v1/chat/completions", json={
        "messages": CHAT, "stream": True, "logprobs": True}).text)
    assert [e["choices"][0]["delta"] for e in ev] == [
        {"role": "assistant", "content": ""}, {"reasoning_content": "a"}, {}, {"content": "b"}]
    assert all(e["choices"][0]["logprobs"] for e in ev[1:])


def test_http_special_tokens_kept_for_special_markers(tmp_path):
    engine = ScriptedChat()
    engine.tokenizer = load_tokenizer(write_kimi_tokenizer(str(tmp_path)))
    with _client(engine, enable_auto_tool_choice=True, tool_call_parser="kimi_k2") as c:
        assert c.post("/v1/chat/completions", json={"messages": CHAT}).status_code == 200
        assert engine.seen[-1][0].skip_special_tokens  # no tools: nothing parsed
        assert c.post("/v1/chat/completions", json={"messages": CHAT,
                                                    "tools": TOOLS}).status_code == 200
        assert not engine.seen[-1][0].skip_special_tokens


def test_http_without_flags_unchanged(off):
    c, engine = off
    engine.script = ["<think>x</think>", KIMI_OUT]
    r = c.post("/v1/chat/completions", json={"messages": CHAT, "tools": TOOLS,
                                             "tool_choice": "none"})
    assert r.json()["choices"][0]["message"] == {
        "role": "assistant", "content": "<think>x</think>" + KIMI_OUT, **MESSAGE_NULLS,
        "tool_calls": [], "reasoning_content": None}  # vLLM's every-field shape, no parser
    assert engine.seen[-1][0].skip_special_tokens
    ev = events(c.post("/v1/chat/completions", json={"messages": CHAT, "stream": True}).text)
    assert [e["choices"][0]["delta"] for e in ev][1:] == [{"content": "<think>x</think>"},
                                                          {"content": KIMI_OUT}]
    for choice in ({"tool_choice": "auto"}, {}):  # absent with tools = "auto" (vLLM)
        r = c.post("/v1/chat/completions", json={"messages": CHAT, "tools": TOOLS, **choice})
        assert r.status_code == 400 and r.json()["error"]["message"] == AUTO_TOOLS_MESSAGE
    r = c.post("/v1/chat/completions", json={"messages": CHAT, "tools": TOOLS,
                                             "tool_choice": "required"})
    assert r.status_code == 200  # forced by structured outputs, without the parser flags
    assert engine.seen[-1][0].structured_outputs.json["minItems"] == 1


# ------------------------------------------------------------------ parallel_tool_calls false
TWO_CALLS = ["Sure.", SB, CB, "functions.get_weather:0", AB, '{"city": "Paris"}',
             f"{CE}{CB}functions.get_time:1{AB}{{}}", CE, SE]


def test_parallel_tool_calls_false_keeps_the_first_call_non_streamed(on):
    """vLLM's maybe_filter_parallel_tool_calls: message.tool_calls[:1]; true / absent: all."""
    c, engine = on
    engine.script = ["</think>", *TWO_CALLS]
    body = {"messages": CHAT, "tools": TOOLS}
    first = {"id": "functions.get_weather:0", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    for flag, want in ((False, [first]), (True, 2), (None, 2)):
        extra = {} if flag is None else {"parallel_tool_calls": flag}
        choice = c.post("/v1/chat/completions", json={**body, **extra}).json()["choices"][0]
        calls = choice["message"]["tool_calls"]
        assert calls == want if isinstance(want, list) else len(calls) == want, (flag, calls)
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] == "Sure."


def test_parallel_tool_calls_false_keeps_the_first_call_streamed(on):
    """Streamed: only the deltas of call index 0 go out (vLLM filters each chunk's delta to
    index 0); a step that had only the second call's deltas sends no chunk; the finish chunk
    still says tool_calls."""
    c, engine = on
    engine.script = ["</think>", *TWO_CALLS]
    body = {"messages": CHAT, "tools": TOOLS, "stream": True}

    def run(extra):
        ev = events(c.post("/v1/chat/completions", json={**body, **extra}).text)
        return ([e["choices"][0]["delta"] for e in ev],
                [e["choices"][0]["finish_reason"] for e in ev])

    deltas, finish = run({"parallel_tool_calls": False})
    assert deltas == [
        {"role": "assistant", "content": ""},
        {"content": "Sure."},
        {"tool_calls": [{"id": "functions.get_weather:0", "type": "function", "index": 0,
                         "function": {"name": "get_weather"}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Paris"}'}}]},
        {}]
    assert finish == [None] * 4 + ["tool_calls"]
    deltas, _ = run({"parallel_tool_calls": True})
    assert {d["index"] for x in deltas for d in x.get("tool_calls", [])} == {0, 1}


# ------------------------------------------------------------------ a call cut by max_tokens
@pytest.mark.parametrize("script", [
    ["</think>", SB, CB, "functions.get_time:0", AB, '{"tz":'],  # the only call, cut
    ["</think>", *TWO_CALLS[:5], '{"city": "Paris"}', CE, CB, "functions.get_time:1", AB, "{"],
])
def test_streamed_tool_call_cut_by_max_tokens_finishes_with_length(on, script):
    """vLLM's serving_chat streaming: "tool_calls" only when the engine stopped on its own
    (finish_reason "stop"); a call cut by max_tokens keeps "length" (vllm#46303 / #53270), also
    after a complete first call. Non-streamed we answer "length" too (see chat_parsing.py)."""
    c, engine = on
    engine.script, engine.finish = script, "length"
    try:
        body = {"messages": CHAT, "tools": TOOLS}
        ev = events(c.post("/v1/chat/completions", json={**body, "stream": True}).text)
        whole = c.post("/v1/chat/completions", json=body).json()["choices"][0]
    finally:
        engine.finish = "stop"
    assert [e["choices"][0]["finish_reason"] for e in ev][-1] == "length"
    assert all(e["choices"][0]["finish_reason"] is None for e in ev[:-1])
    assert any("tool_calls" in e["choices"][0]["delta"] for e in ev)  # calls were streamed
    assert whole["finish_reason"] == "length" and whole["message"]["tool_calls"]
