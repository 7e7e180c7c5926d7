"""Review of tool calls and reasoning as vLLM users of Kimi-K2 / K2.5 and DeepSeek-V3 / R1 run them
(`--enable-auto-tool-choice --tool-call-parser kimi_k2 | deepseek_v3 --reasoning-parser kimi_k2 |
deepseek_r1`), session 24.

Found and fixed:
- A call whose end marker is missing swallowed the markers after it: the next call's begin
  (and that whole call) or the section's end (and the content after it) became text of its
  `function.arguments`. Now the next call's begin and the section's end also end such a call
  (tool_parsers.ToolFormat.interrupts): the next call is parsed, the content after the section
  is content, no marker is argument text. The cut call keeps its arguments, as one cut by the
  end of the output does (vLLM's non-streamed regex drops it; its streaming parser has sent
  it, and so have we).

End to end through the real engine (the other tests of the parsers feed text to the route; these
run a scripted token runner, the real detokenizer and a Kimi tokenizer whose markers are special
tokens): streamed deltas, reasoning then tool calls, n > 1 parsed per choice, a call cut by
max_tokens, usage.
"""

from __future__ import annotations

import json

import pytest
from engine_fakes import DEMO_MODEL_CONFIG
from starlette.testclient import TestClient
from tokenizer_fixtures import write_kimi_tokenizer

from atom_stream.config import EngineConfig
from atom_stream.engine import dp
from atom_stream.engine.async_engine import AsyncEngine
from atom_stream.engine.sequence import StepOutput
from atom_stream.server.app import ServerConfig, build_app
from atom_stream.server.tool_parsers import DEEPSEEK_V3, KIMI_K2, ToolCallStream, extract_tool_calls
from atom_stream.tokenizer import load_tokenizer

SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, AB, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
D_SB, D_SE = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
D_CB, D_SEP, D_CE = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"
ALL_MARKERS = (*KIMI_K2.markers, *DEEPSEEK_V3.markers, D_SEP)


def streamed(fmt, text: str, step: int) -> tuple[str, list[list]]:
    """`text` fed in pieces of `step` characters: (content, [[id, name, arguments]])."""
    s = ToolCallStream(fmt)
    content, deltas = [], []
    for k in range(0, len(text), step):
        c, d = s.feed(text[k:k + step])
        content.append(c)
        deltas += d
    c, d = s.finish()
    calls: list[list] = []
    for t in deltas + d:
        if isinstance(t.id, str):
            assert t.index == len(calls)
            calls.append([t.id, t.function.name, ""])
        if isinstance(t.function.arguments, str):
            calls[t.index][2] += t.function.arguments
    return "".join(content) + c, calls


# ------------------------------------------------------------------ a call without its end
DS_TWO_CALLS_FIRST_UNENDED = (
    f'{D_SB}{D_CB}function{D_SEP}f\n```json\n{{"a": 1}}\n{D_CB}function{D_SEP}g'
    f"\n```json\n{{}}\n```{D_CE}{D_SE}ok")


@pytest.mark.parametrize("step", [1, 3, 10_000])
@pytest.mark.parametrize("fmt, text, want_content, want_calls", [
    # the next call begins before the first one ended
    (KIMI_K2, f'Hi{SB}{CB}functions.a:0{AB}{{"x": 1{CB}functions.b:1{AB}{{}}{CE}{SE}after',
     "Hiafter", [("a", '{"x": 1'), ("b", "{}")]),
    # the section ends before the call did: the text after it is content again
    (KIMI_K2, f'{SB}{CB}functions.a:0{AB}{{"x": 1}}{SE}Done.', "Done.", [("a", '{"x": 1}')]),
    # a header the section's end cuts short: no call
    (KIMI_K2, f"{SB}{CB}functions.a:0{SE}Done.", "Done.", []),
    (KIMI_K2, f"{SB}{CB}functions.a:0{CB}functions.b:1{AB}[]{CE}{SE}", None, [("b", "[]")]),
    (DEEPSEEK_V3, DS_TWO_CALLS_FIRST_UNENDED, "ok", [("f", '{"a": 1}'), ("g", "{}")]),
])
def test_a_call_without_its_end_marker_ends_at_the_next_marker(fmt, text, want_content,
                                                                want_calls, step):
    content, calls = extract_tool_calls(fmt, text)
    assert content == want_content
    assert [(c.function.name, c.function.arguments) for c in calls] == want_calls
    s_content, s_calls = streamed(fmt, text, step)
    assert s_content == (want_content or "")
    assert [tuple(c[1:]) for c in s_calls] == want_calls
    for _, _, args in s_calls:
        assert not any(m in args for m in ALL_MARKERS), args


# ------------------------------------------------------------------ end to end, real engine
class TextRunner:
    """A model runner that writes fixed texts: choice i of a request (its engine id's index for
    n > 1, else 0) emits the token ids of `scripts[i]`, then the tokenizer's EOS."""

    def __init__(self, tokenizer):
        self.model_config = DEMO_MODEL_CONFIG
        self.num_kv_blocks = 64
        self.tok = tokenizer
        self.scripts: list[list[int]] = []

    def set(self, *scripts: list[str]) -> None:
        self.scripts = [[t for piece in s for t in self.tok.encode(piece)] for s in scripts]

    def execute(self, batch) -> StepOutput:
        out = []
        for seq, sample in zip(batch.seqs, batch.sample):
            if sample:
                parts = seq.request_id.split("-")  # chatcmpl-<id>[-<index>]-<random>
                ids = self.scripts[int(parts[-2]) if len(parts) > 3 else 0]
                k = seq.num_output_tokens
                out.append(ids[k] if k < len(ids) else self.tok.eos_token_ids[0])
        return StepOutput(token_ids=out)

    def shutdown(self) -> None:
        pass


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    tok = load_tokenizer(write_kimi_tokenizer(str(tmp_path_factory.mktemp("kimi"))))
    runner = TextRunner(tok)
    server = ServerConfig(enable_auto_tool_choice=True, tool_call_parser="kimi_k2",
                          reasoning_parser="kimi_k2")
    app = build_app(EngineConfig(model="demo", device="cpu"), server)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dp, "make_async_engine",
                   lambda cfg: AsyncEngine(cfg, runner=runner, tokenizer=tok))
        with TestClient(app) as client:
            yield client, runner


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "get_time"}}]  # no parameters
CHAT = [{"role": "user", "content": "Weather and time in Paris?"}]
TWO_CALLS = ["Let", " me", " check", "</think>", "On it.", SB, CB, "functions.get_weather:0", AB,
             '{"city":', ' "Paris"}', CE, CB, "functions.get_time:1", AB, "{}", CE, SE]


def sse(body: str) -> list[dict]:
    assert body.endswith("data: [DONE]\n\n")
    return [json.loads(p[len("data: "):]) for p in body.split("\n\n")[:-2]]


def gather(events: list[dict], index: int = 0) -> dict:
    """One choice's stream put together, checking the shape of each tool-call delta."""
    out = {"reasoning": "", "content": "", "calls": [], "finish": None}
    for e in events:
        for ch in e["choices"]:
            if ch["index"] != index:
                continue
            d = ch["delta"]
            out["reasoning"] += d.get("reasoning_content") or ""
            out["content"] += d.get("content") or ""
            for t in d.get("tool_calls", []):
                if "id" in t:  # a call's first delta: id, type, name; then arguments only
                    assert t["type"] == "function" and t["index"] == len(out["calls"])
                    out["calls"].append([t["id"], t["function"]["name"], ""])
                else:
                    assert set(t) == {"index", "function"} and set(t["function"]) == {
                        "arguments"}
                out["calls"][t["index"]][2] += t["function"].get("arguments", "")
            if ch["finish_reason"] is not None:
                out["finish"] = ch["finish_reason"]
    return out


def test_real_engine_stream_reasoning_then_two_calls(kimi):
    client, runner = kimi
    runner.set(TWO_CALLS)
    r = client.post("/v1/chat/completions", json={
        "messages": CHAT, "tools": TOOLS, "stream": True,
        "stream_options": {"include_usage": True}})
    events = sse(r.text)
    got = gather(events)
    assert got["reasoning"] == "Let me check" and got["content"] == "On it."
    assert got["calls"] == [["functions.get_weather:0", "get_weather", '{"city": "Paris"}'],
                            ["functions.get_time:1", "get_time", "{}"]]
    assert all(json.loads(c[2]) is not None for c in got["calls"])
    assert got["finish"] == "tool_calls"
    assert "<|" not in got["content"] + got["reasoning"]  # no marker (nor EOS) leaks
    usage = events[-1]["usage"]
    assert events[-1]["choices"] == [] and usage["completion_tokens"] == sum(
        len(runner.tok.encode(p)) for p in TWO_CALLS) + 1  # + the EOS
    whole = client.post("/v1/chat/completions", json={"messages": CHAT, "tools": TOOLS})
    msg = whole.json()["choices"][0]["message"]
    assert (msg["reasoning_content"], msg["content"]) == ("Let me check", "On it.")
    assert [[t["id"], t["function"]["name"], t["function"]["arguments"]]
            for t in msg["tool_calls"]] == got["calls"]


def test_real_engine_n2_parses_each_choice_and_a_cut_call(kimi):
    client, runner = kimi
    runner.set(["</think>", "Just text."], TWO_CALLS)
    body = {"messages": CHAT, "tools": TOOLS, "n": 2}
    choices = client.post("/v1/chat/completions", json=body).json()["choices"]
    assert [(c["message"]["content"], len(c["message"]["tool_calls"]), c["finish_reason"])
            for c in choices] == [("Just text.", 0, "stop"), ("On it.", 2, "tool_calls")]
    events = sse(client.post("/v1/chat/completions", json={**body, "stream": True}).text)
    assert [gather(events, i)["finish"] for i in (0, 1)] == ["stop", "tool_calls"]
    assert gather(events, 0)["calls"] == [] and len(gather(events, 1)["calls"]) == 2
    # cut by max_tokens inside the second call's arguments: "length", the first call whole
    runner.set(["</think>", SB, CB, "functions.get_weather:0", AB, '{"city": "Paris"}', CE,
                CB, "functions.get_time:1", AB, '{"tz": "CET"}'])
    n = len(runner.scripts[0]) - 3
    got = gather(sse(client.post("/v1/chat/completions", json={
        "messages": CHAT, "tools": TOOLS, "stream": True, "max_tokens": n}).text))
    assert got["finish"] == "length" and got["calls"][0][2] == '{"city": "Paris"}'
    assert got["calls"][1][1] == "get_time"


def test_real_engine_unterminated_call_never_leaks_markers(kimi):
    client, runner = kimi
    runner.set(["</think>", SB, CB, "functions.get_weather:0", AB, '{"city": "Paris"}', SE,
                "Done."])
    for stream in (False, True):
        r = client.post("/v1/chat/completions", json={"messages": CHAT, "tools": TOOLS,
                                                      "stream": stream})
        if stream:
            got = gather(sse(r.text))
            content, calls = got["content"], [c[1:] for c in got["calls"]]
        else:
            msg = r.json()["choices"][0]["message"]
            content = msg["content"]
            calls = [[t["function"]["name"], t["function"]["arguments"]]
                     for t in msg["tool_calls"]]
        assert content == "Done." and calls == [["get_weather", '{"city": "Paris"}']]
