"""Review of the chat parsers against vLLM's source (session 23): each test pins one difference
found and fixed, with the vLLM code it follows.

- A Kimi tool-call header without `:IDX` is malformed: vLLM's KimiK2ToolParser drops the call
  (vllm/tool_parsers/kimi_k2_tool_parser.py: `tool_call_regex` needs `[^<]+:\\d+` for the id,
  the streaming `stream_tool_call_name_regex` `.+:\\d+`), whole or streamed; we used to invent
  the id `functions.NAME:<position>`.
- `include_reasoning: false` (vLLM's ChatCompletionRequest field, default true): the reasoning
  is split off and not sent (vllm/entrypoints/openai/chat_completion/serving.py: full generator
  `if not request.include_reasoning: reasoning = None`; stream `delta_message.reasoning = None`,
  the delta dropped when nothing else is left).
"""

from __future__ import annotations

import pytest

from atom_stream.server.chat_parsing import ChatParsing
from atom_stream.server.tool_parsers import KIMI_K2, ToolCallStream, extract_tool_calls

SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, AB, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"


def _streamed(text: str, step: int) -> dict[int, list]:
    s = ToolCallStream(KIMI_K2)
    calls: dict[int, list] = {}
    deltas = []
    for k in range(0, len(text), step):
        deltas += s.feed(text[k:k + step])[1]
    deltas += s.finish()[1]
    for d in deltas:
        e = calls.setdefault(d.index, [None, "", ""])
        if isinstance(d.id, str):
            e[0] = d.id
        if isinstance(d.function.name, str):
            e[1] += d.function.name
        if isinstance(d.function.arguments, str):
            e[2] += d.function.arguments
    return calls


@pytest.mark.parametrize("header", ["functions.get_weather", "get_weather", "functions.f:x",
                                    "functions.f:0 trailing"])
@pytest.mark.parametrize("step", [1, 3, 10_000])
def test_kimi_header_without_index_drops_the_call(header, step):
    text = f"Hi{SB}{CB}{header}{AB}{{\"a\": 1}}{CE}{CB}functions.g:1{AB}{{}}{CE}{SE}"
    content, calls = extract_tool_calls(KIMI_K2, text)
    assert content == "Hi"
    # the malformed call is gone; the next one is index 0 with the model's own id
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [
        ("functions.g:1", "g", "{}")]
    assert _streamed(text, step) == {0: ["functions.g:1", "g", "{}"]}


def test_kimi_header_with_index_keeps_the_model_id():
    _, calls = extract_tool_calls(KIMI_K2, f"{SB}{CB} get_weather:7 {AB}{{}}{CE}{SE}")
    assert [(c.id, c.function.name) for c in calls] == [("get_weather:7", "get_weather")]


def _plan(include_reasoning: bool):
    return ChatParsing(True, "kimi_k2", "kimi_k2").plan(
        True, {}, None, include_reasoning=include_reasoning)


OUT = f"think hard</think>Sure.{SB}{CB}functions.f:0{AB}{{}}{CE}{SE}"


def test_include_reasoning_false_non_streamed():
    msg, finish = _plan(False).message("assistant", "", OUT, "stop")
    assert msg.reasoning_content is None and msg.content == "Sure."
    assert [c.id for c in msg.tool_calls] == ["functions.f:0"] and finish == "tool_calls"
    msg, _ = _plan(True).message("assistant", "", OUT, "stop")
    assert msg.reasoning_content == "think hard"


@pytest.mark.parametrize("step", [1, 4, 10_000])
def test_include_reasoning_false_streamed(step):
    p = _plan(False).parser()
    pieces = [OUT[k:k + step] for k in range(0, len(OUT), step)]
    deltas = [p.feed(t) for t in pieces[:-1]] + [p.finish(pieces[-1])]
    sent = [d for d in deltas if d is not None]
    assert all(not isinstance(d.reasoning_content, str) for d in sent)
    assert "".join(d.content for d in sent if isinstance(d.content, str)) == "Sure."
    assert any(isinstance(d.tool_calls, list) for d in sent)
    # a step that was reasoning only sends nothing
    assert _plan(False).parser().feed("think") is None
    assert _plan(True).parser().feed("think").reasoning_content == "think"
