"""Reasoning parsers (vLLM's --reasoning-parser deepseek_r1 | kimi_k2): `<think>...</think>` split
into reasoning and content, whole and streamed in any pieces, Kimi's thinking switch and its
"(no content)" placeholder; the combined per-choice parser (reasoning, then tool calls) and the
non-streamed message. The HTTP side is in test_tool_calls.py."""

from __future__ import annotations

import pytest

from atom_stream.server.chat_parsing import ChatParsing, OutputParser
from atom_stream.server.reasoning_parsers import (
    REASONING_PARSERS,
    Scrub,
    ThinkStream,
    extract_reasoning,
)
from atom_stream.server.tool_parsers import KIMI_K2

R1, KIMI = REASONING_PARSERS["deepseek_r1"], REASONING_PARSERS["kimi_k2"]


def streamed(fmt, text: str, step: int, thinking: bool = True) -> tuple[str, str]:
    s = ThinkStream(fmt, thinking)
    r, c = [], []
    for k in range(0, len(text), step):
        a, b = s.feed(text[k:k + step])
        r.append(a)
        c.append(b)
    a, b = s.finish()
    return "".join(r) + a, "".join(c) + b


@pytest.mark.parametrize("step", [1, 3, 8, 10_000])
@pytest.mark.parametrize("text, want", [
    ("plan it</think>The answer.", ("plan it", "The answer.")),
    ("<think>plan it</think>\n\nThe answer.", ("plan it", "\n\nThe answer.")),
    ("still thinking", ("still thinking", "")),  # no end tag: reasoning only
    ("</think>", ("", "")),
    ("a < b <th x</think>c</think>", ("a < b <th x", "c</think>")),  # only the first end tag
])
def test_think_split_whole_and_streamed(step, text, want):
    assert streamed(R1, text, step) == want
    reasoning, content = extract_reasoning(R1, text)
    assert (reasoning, content or "") == want and (content is None) == (want[1] == "")


def test_kimi_thinking_switch_and_placeholder():
    assert KIMI.thinks(None) and KIMI.thinks({"thinking": True}) and R1.thinks({"thinking": False})
    assert not KIMI.thinks({"thinking": False}) and not KIMI.thinks({"enable_thinking": False})
    # instant mode: everything is content (vLLM's IdentityReasoningParser), reasoning null
    assert extract_reasoning(KIMI, "no tags</think>x", thinking=False) == (
        None, "no tags</think>x")
    assert streamed(KIMI, "no tags</think>x", 2, thinking=False) == ("", "no tags</think>x")
    assert extract_reasoning(KIMI, "r</think>(no content)") == ("r", None)
    assert extract_reasoning(KIMI, "r</think>  (no content) ok") == ("r", "   ok")
    s = Scrub("(no content)")
    got = "".join(s.feed(p) for p in ["a(", "no con", "tent)b(n", "x"]) + s.finish()
    assert got == "ab(nx"


@pytest.mark.parametrize("step", [1, 4, 10_000])
def test_output_parser_reasoning_then_tools(step):
    text = ("weigh options</think>(no content)<|tool_calls_section_begin|><|tool_call_begin|>"
            "functions.f:0<|tool_call_argument_begin|>{}<|tool_call_end|>"
            "<|tool_calls_section_end|>")
    p = OutputParser(KIMI, True, KIMI_K2)
    deltas = [p.feed(text[k:k + step]) for k in range(0, len(text), step)]
    deltas.append(p.finish(""))
    deltas = [d for d in deltas if d is not None]

    def joined(field):
        return "".join(v for d in deltas if isinstance(v := getattr(d, field), str))

    assert joined("reasoning_content") == "weigh options" and joined("content") == ""
    calls = [t for d in deltas if isinstance(d.tool_calls, list) for t in d.tool_calls]
    assert calls[0].id == "functions.f:0" and calls[0].function.name == "f"
    assert "".join(t.function.arguments for t in calls
                   if isinstance(t.function.arguments, str)) == "{}"
    assert p.finish_reason("stop") == "tool_calls" and p.finish_reason("length") == "length"
    # tool markers inside the reasoning are not parsed (vLLM: tools only after </think>)
    q = OutputParser(R1, True, KIMI_K2)
    d = q.finish("<|tool_calls_section_begin|>x")
    assert d.reasoning_content == "<|tool_calls_section_begin|>x" and not q.called_tools


def test_message_shapes():
    plan = ChatParsing(reasoning_parser="deepseek_r1").plan(False, None, None)
    msg, finish = plan.message("assistant", "", "think</think>answer", "stop")
    assert (msg.reasoning_content, msg.content, msg.tool_calls, finish) == (
        "think", "answer", [], "stop")
    msg, _ = plan.message("assistant", "Q: ", "only thinking", "length")
    assert (msg.reasoning_content, msg.content) == ("only thinking", "Q: ")  # echo prepended
    tools = ChatParsing(True, "kimi_k2").plan(True, None, None)
    msg, finish = tools.message("assistant", "", "just text", "stop")
    assert (msg.reasoning_content, msg.content, msg.tool_calls, finish) == (
        None, "just text", [], "stop")


@pytest.mark.parametrize("step", [1, 5, 10_000])
def test_kimi_tool_section_ends_reasoning_without_think_end(step):
    # vLLM's KimiK2ReasoningParser: `<|tool_calls_section_begin|>` ends the reasoning too
    # (is_reasoning_end / extract_reasoning); the section is content, the tool parser's input
    section = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0"
               "<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>")
    assert streamed(KIMI, "weigh" + section, step) == ("weigh", section)
    assert extract_reasoning(KIMI, "weigh" + section) == ("weigh", section)
    assert streamed(R1, "weigh" + section, step) == ("weigh" + section, "")  # R1: no such end
    plan = ChatParsing(True, "kimi_k2", "kimi_k2").plan(True, None, None)
    msg, finish = plan.message("assistant", "", "weigh" + section, "stop")
    assert (msg.reasoning_content, msg.content, finish) == ("weigh", None, "tool_calls")
    assert [(c.id, c.function.name, c.function.arguments) for c in msg.tool_calls] == [
        ("functions.f:0", "f", "{}")]
    p = OutputParser(KIMI, True, KIMI_K2)
    text = "weigh" + section
    deltas = [p.feed(text[k:k + step]) for k in range(0, len(text), step)] + [p.finish("")]
    deltas = [d for d in deltas if d is not None]
    assert "".join(d.reasoning_content for d in deltas
                   if isinstance(d.reasoning_content, str)) == "weigh"
    assert p.called_tools and p.finish_reason("stop") == "tool_calls"


@pytest.mark.parametrize("step", [1, 7, 10_000])
def test_kimi_placeholder_is_not_removed_from_tool_arguments(step):
    # the "(no content)" placeholder is scrubbed from the content only: a tool call's arguments
    # are the model's text as written (vLLM's tool parsers never touch them)
    args = '{"text": "(no content)"}'
    text = ("r</think>(no content)<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0"
            f"<|tool_call_argument_begin|>{args}<|tool_call_end|><|tool_calls_section_end|>")
    plan = ChatParsing(True, "kimi_k2", "kimi_k2").plan(True, None, None)
    msg, _ = plan.message("assistant", "", text, "stop")
    assert (msg.content, msg.tool_calls[0].function.arguments) == (None, args)
    p = OutputParser(KIMI, True, KIMI_K2)
    deltas = [p.feed(text[k:k + step]) for k in range(0, len(text), step)] + [p.finish("")]
    deltas = [d for d in deltas if d is not None]
    assert "".join(t.function.arguments for d in deltas if isinstance(d.tool_calls, list)
                   for t in d.tool_calls if isinstance(t.function.arguments, str)) == args
    assert not any(isinstance(d.content, str) for d in deltas)
