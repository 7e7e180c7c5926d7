"""Tool calls and reasoning in chat answers: vLLM's `--enable-auto-tool-choice`,
`--tool-call-parser NAME` and `--reasoning-parser NAME` (tool_parsers.py, reasoning_parsers.py).

`ChatParsing` is the server's setting; per request:

- `tool_choice(req)` checks `tool_choice` as vLLM's ChatCompletionRequest validators and
  serving_chat do, and says whether the output is parsed for tool calls:
  - absent: with tools, "auto" (vLLM's check_tool_usage default), so without the flags a 400
    as vLLM's (a client gets told, not answered with the model's raw tool-call markup).
  - "none": tools rendered, nothing parsed (vLLM's default without
    --exclude-tools-when-tool-choice-none).
  - "auto": parsed; without --enable-auto-tool-choice and --tool-call-parser a 400 with vLLM's
    message. Without `tools`: a 400, as vLLM ("When using `tool_choice`, `tools` must be set.").
  - "required" / a named function: after vLLM's checks (tools set, the named function among
    them) not parsed by the tool parser: forced_tools.py forces the calls with structured
    outputs (a JSON schema of the tools), and the plan's `forced` turns the content into them.
- `plan(parse_tools, template_kwargs, tokenizer, ..., continued=None)` -> a `ParsePlan` (None
  when nothing is parsed): the per-choice `OutputParser` factory, the non-streamed
  `message(...)`, and `keep_specials`: the markers the parsers read are special tokens that
  decoding would skip (vLLM's tool parsers' adjust_request sets skip_special_tokens=False for
  them), so the request runs with skip_special_tokens false; the other special tokens a model
  writes then show too, as in vLLM. With the markers ordinary text (a tokenizer that does not
  mark them special) nothing changes. `continued`: with continue_final_message, the text of
  the message the output continues (`continued_text`): the output goes on with that message's
  content, so it is content, not reasoning, unless that text leaves a `<think>` open (a
  prefilled reasoning): the state the rendered prompt ends in (vLLM's streaming path asks the
  reasoning parser's is_reasoning_end about the prompt; K2.5's template writes
  `<think></think>` before a continued assistant message).

Answers (non-streamed, vLLM's ChatMessage, every field whether a parser runs or not):
`reasoning_content` is null and `tool_calls` [] when none; content is null when the parsers
leave nothing. Streamed deltas carry `reasoning_content`, `content` and
`tool_calls[{id, type, index, function{name}}]` / `[{index, function{arguments}}]`.
`include_reasoning: false` (vLLM's request field, default true) still splits the reasoning off
but drops it: non-streamed `reasoning_content` null, streamed no `reasoning_content` (a step left
with nothing else sends no chunk), as vLLM's chat_completion/serving.py.
`parallel_tool_calls: false` keeps the first tool call only (vLLM's
maybe_filter_parallel_tool_calls): non-streamed, `tool_calls[:1]`; streamed, only the deltas of
call index 0 (a step left with nothing else to say sends no chunk, where vLLM sends
`"tool_calls": []`); the content is what it would be otherwise. true or absent: every call.

`finish_reason` is "tool_calls" when the answer made tool calls and ended on a stop token or
string; an answer cut by max_tokens (or any other reason) keeps its own reason, "length", so a
client can tell a truncated call from a complete one. Streamed, that is current vLLM's
serving_chat (the `tool_calls` rewrite is gated on the engine's "stop"); non-streamed, vLLM says
"tool_calls" whenever its parser extracted a call (complete calls before the cut; its
parsers drop the cut one), which it tracks as a bug (vllm#58228): we keep "length" on both paths.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from msgspec import UNSET

from atom_stream.errors import ServerShuttingDownError
from atom_stream.protocol import (
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    ResponseMessage,
)
from atom_stream.server.choices import Choice, iterate
from atom_stream.server.forced_tools import ForcedTools, ForcedToolStream
from atom_stream.server.reasoning_parsers import (
    REASONING_PARSERS,
    ReasoningFormat,
    Scrub,
    ThinkStream,
    extract_reasoning,
    scrub_placeholder,
)
from atom_stream.server.responses import HTTPError
from atom_stream.server.tool_parsers import (
    TOOL_PARSERS,
    ToolCallStream,
    ToolFormat,
    extract_tool_calls,
)

AUTO_TOOLS_MESSAGE = ('"auto" tool choice requires --enable-auto-tool-choice and '
                      "--tool-call-parser to be set")  # vLLM's serving_chat, verbatim


def check_parser_names(tool_call_parser: str | None, reasoning_parser: str | None,
                       enable_auto_tool_choice: bool) -> None:
    """Start-up check of the flags (ValueError naming the known parsers)."""
    if tool_call_parser is not None and tool_call_parser not in TOOL_PARSERS:
        raise ValueError(f"tool_call_parser: unknown parser {tool_call_parser!r}; known: "
                         f"{', '.join(sorted(TOOL_PARSERS))}")
    if reasoning_parser is not None and reasoning_parser not in REASONING_PARSERS:
        raise ValueError(f"reasoning_parser: unknown parser {reasoning_parser!r}; known: "
                         f"{', '.join(sorted(REASONING_PARSERS))}")
    if enable_auto_tool_choice and tool_call_parser is None:
        # vLLM's validate_parsed_serve_args
        raise ValueError("--enable-auto-tool-choice requires --tool-call-parser")


def continued_text(messages: list[dict], continue_final_message: bool) -> str | None:
    """The text the output of a continue_final_message request continues (the final message's
    content: a string, or its text parts joined), None without the option."""
    if not continue_final_message or not messages or not isinstance(messages[-1], dict):
        return None
    content = messages[-1].get("content")
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _opens_reasoning(fmt: ReasoningFormat, text: str) -> bool:
    """Whether `text` leaves a reasoning block open (its last start tag not closed after)."""
    k = text.rfind(fmt.start)
    return k != -1 and fmt.end not in text[k:]


def _function_name(choice: dict) -> str:
    fn = choice.get("function")
    usage = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise HTTPError(400, f"Invalid value for `function` in `tool_choice`! {usage}",
                        "tool_choice")
    return fn["name"]


class OutputParser:
    """One choice's parsers in vLLM's order: reasoning first, then tool calls in the content
    (then the reasoning format's placeholder removed from what is left as content).
    `feed(text)` -> the DeltaMessage for this step's text (None: nothing to send yet);
    `finish(text)` -> the last one (the text of the final step, then whatever is held).
    `first_call_only` (parallel_tool_calls false): deltas of tool calls after the first are
    dropped; `include_reasoning` false: the reasoning is split off and not sent."""

    __slots__ = ("_first_only", "_forced", "_include", "_scrub", "_think", "_tools")

    def __init__(self, reasoning: ReasoningFormat | None, thinking: bool,
                 tools: ToolFormat | None, first_call_only: bool = False,
                 include_reasoning: bool = True, forced: ForcedTools | None = None):
        self._think = ThinkStream(reasoning, thinking) if reasoning is not None else None
        self._scrub = Scrub(reasoning.placeholder) if reasoning and reasoning.placeholder else None
        self._tools: ToolCallStream | ForcedToolStream | None = (
            ForcedToolStream(forced) if forced is not None
            else ToolCallStream(tools) if tools is not None else None)
        self._forced = forced
        self._first_only = first_call_only
        self._include = include_reasoning

    @property
    def called_tools(self) -> bool:
        return bool(self._tools is not None and self._tools.calls)

    def feed(self, text: str) -> DeltaMessage | None:
        return self._run(text, False)

    def finish(self, text: str) -> DeltaMessage | None:
        return self._run(text, True)

    def finish_reason(self, reason: str) -> str:
        if self._forced is not None:
            return self._forced.finish_reason(reason, self.called_tools)
        return "tool_calls" if reason == "stop" and self.called_tools else reason

    def _run(self, text: str, final: bool) -> DeltaMessage | None:
        reasoning, content = "", text
        if self._think is not None:
            reasoning, content = self._think.feed(text)
            if final:
                r, c = self._think.finish()
                reasoning, content = reasoning + r, content + c
        calls: list[DeltaToolCall] = []
        if self._tools is not None:
            content, calls = self._tools.feed(content)
            if final:
                c, more = self._tools.finish()
                content += c
                calls = _merge(calls, more)
            if self._first_only:  # vLLM keeps the deltas of index 0
                calls = [d for d in calls if d.index == 0]
        if self._scrub is not None:  # the content only: tool-call arguments stay as written
            content = self._scrub.feed(content) + (self._scrub.finish() if final else "")
        if not self._include:
            reasoning = ""
        if not (reasoning or content or calls):
            return None
        return DeltaMessage(content=content or UNSET, reasoning_content=reasoning or UNSET,
                            tool_calls=calls or UNSET)


def _merge(calls: list[DeltaToolCall], more: list[DeltaToolCall]) -> list[DeltaToolCall]:
    """Deltas of one step: arguments of the same call in one entry."""
    for d in more:  # finish() adds arguments only, never a new call
        last = calls[-1] if calls else None
        fn = d.function
        if (last is not None and last.index == d.index and isinstance(fn, DeltaFunctionCall)
                and isinstance(last.function, DeltaFunctionCall)
                and isinstance(fn.arguments, str)):
            prev = last.function.arguments
            last.function.arguments = (prev if isinstance(prev, str) else "") + fn.arguments
        else:
            calls.append(d)
    return calls


async def parsed_stream(choice: Choice, plan: ParsePlan | None
                        ) -> AsyncIterator[tuple[DeltaMessage | None, Any, str | None]]:
    """One choice's engine outputs with text, parsed: (the delta to send or None, the
    RequestOutput, None), and last (the final delta, the final output, its finish reason after
    the parsers: "tool_calls" where they found calls). A request the server aborts
    (shutdown) raises ServerShuttingDownError. Closing it closes the choice's stream (an
    unfinished request is aborted and its blocks freed)."""
    parser = plan.parser() if plan is not None else None
    async with contextlib.aclosing(iterate([choice])) as stream:
        async for _, out in stream:
            if out.finish_reason is None:
                if out.text:
                    yield (parser.feed(out.text) if parser is not None
                           else DeltaMessage(content=out.text)), out, None
                continue
            if out.finish_reason == "abort":
                raise ServerShuttingDownError()
            if parser is None:
                yield DeltaMessage(content=out.text), out, out.finish_reason
            else:
                yield parser.finish(out.text), out, parser.finish_reason(out.finish_reason)
            return


def delta_pieces(delta: DeltaMessage | None) -> list[tuple[str, str, str]]:
    """A parsed delta as the pieces other wire formats stream (Anthropic's blocks, the
    Responses API's items), in the order the text had them: ("reasoning", text, ""); the
    ("arguments", text, "") that continue the call already open (tool-call deltas without an
    id, before the first with one: its end may be followed by text in the same delta);
    ("content", text, ""); then per later tool-call delta ("call", id, name) where a call
    starts and ("arguments", text, "")."""
    if delta is None:
        return []
    out = []
    if isinstance(delta.reasoning_content, str) and delta.reasoning_content:
        out.append(("reasoning", delta.reasoning_content, ""))
    calls = delta.tool_calls if isinstance(delta.tool_calls, list) else []
    first_new = next((k for k, c in enumerate(calls) if isinstance(c.id, str)), len(calls))
    out += _call_pieces(calls[:first_new])
    if isinstance(delta.content, str) and delta.content:
        out.append(("content", delta.content, ""))
    return out + _call_pieces(calls[first_new:])


def _call_pieces(calls: list[DeltaToolCall]) -> list[tuple[str, str, str]]:
    out = []
    for call in calls:
        fn = call.function if isinstance(call.function, DeltaFunctionCall) else None
        if isinstance(call.id, str):  # a new call: its id and name come first
            out.append(("call", call.id, fn.name if fn and isinstance(fn.name, str) else ""))
        if fn is not None and isinstance(fn.arguments, str) and fn.arguments:
            out.append(("arguments", fn.arguments, ""))
    return out


class ParsePlan:
    """How one request's output is parsed (see the module docstring)."""

    __slots__ = ("first_call_only", "forced", "include_reasoning", "keep_specials",
                 "reasoning", "thinking", "tools")

    def __init__(self, reasoning: ReasoningFormat | None, thinking: bool,
                 tools: ToolFormat | None, keep_specials: bool, first_call_only: bool = False,
                 include_reasoning: bool = True, forced: ForcedTools | None = None):
        self.forced = forced  # tool_choice "required" / named: the content is the calls
        self.reasoning = reasoning
        self.thinking = thinking
        self.tools = tools
        self.keep_specials = keep_specials
        self.first_call_only = first_call_only  # parallel_tool_calls false
        self.include_reasoning = include_reasoning  # false: reasoning split off, not sent

    def parser(self) -> OutputParser:
        return OutputParser(self.reasoning, self.thinking, self.tools, self.first_call_only,
                            self.include_reasoning, self.forced)

    def message(self, role: str, echo: str, text: str, finish_reason: str | None
                ) -> tuple[ResponseMessage, str | None]:
        """A whole answer -> (vLLM's ChatMessage, the choice's finish_reason)."""
        reasoning: str | None = None
        content: str | None = text
        if self.reasoning is not None:
            reasoning, content = extract_reasoning(self.reasoning, text, self.thinking,
                                                   scrub=False)
        calls = []
        if self.forced is not None:
            calls = self.forced.calls(content or "")
            if calls:  # vLLM's answer to a forced call: content "", the calls
                content = ""
            finish_reason = self.forced.finish_reason(finish_reason, bool(calls))
        elif self.tools is not None and content is not None:
            content, calls = extract_tool_calls(self.tools, content)
            if self.first_call_only:
                calls = calls[:1]
        if self.reasoning is not None and content is not None and self.forced is None:
            # the placeholder is removed from the content only (not from tool arguments)
            content = scrub_placeholder(self.reasoning, content)
        if not self.include_reasoning:
            reasoning = None
        if echo:
            content = echo + (content or "")
        if calls and finish_reason == "stop" and self.forced is None:
            finish_reason = "tool_calls"
        return ResponseMessage(role=role, reasoning_content=reasoning, content=content,
                               tool_calls=calls), finish_reason


class ChatParsing:
    """The server's parser flags (ServerConfig: enable_auto_tool_choice, tool_call_parser,
    reasoning_parser; names checked at start-up by check_parser_names)."""

    def __init__(self, enable_auto_tool_choice: bool = False,
                 tool_call_parser: str | None = None, reasoning_parser: str | None = None):
        fmt = TOOL_PARSERS.get(tool_call_parser) if tool_call_parser else None
        self.tools: ToolFormat | None = fmt if enable_auto_tool_choice else None
        self.reasoning: ReasoningFormat | None = (REASONING_PARSERS.get(reasoning_parser)
                                                  if reasoning_parser else None)
        self._special: dict[str, bool] = {}  # marker -> decodes as a skipped special token

    @classmethod
    def from_config(cls, config: Any) -> ChatParsing:
        return cls(bool(getattr(config, "enable_auto_tool_choice", False)),
                   getattr(config, "tool_call_parser", None),
                   getattr(config, "reasoning_parser", None))

    def tool_choice(self, req: Any) -> bool:
        """Check the request's tool_choice; True when its output is parsed for tool calls."""
        choice, tools = req.tool_choice, req.tools
        if choice is None:
            if not tools:
                return False
            choice = "auto"  # vLLM's check_tool_usage: tools without tool_choice mean "auto"
        if choice == "none":
            return False
        if isinstance(choice, str) and choice not in ("auto", "required"):
            raise HTTPError(400, f"Invalid value for `tool_choice`: {choice}! Only named "
                            'tools, "none", "auto" or "required" are supported.', "tool_choice")
        if not tools:
            raise HTTPError(400, "When using `tool_choice`, `tools` must be set.",
                            "tool_choice")
        if choice == "auto":
            if self.tools is None:
                raise HTTPError(400, AUTO_TOOLS_MESSAGE, "tool_choice")
            return True
        if isinstance(choice, dict):
            name = _function_name(choice)
            names = {(t.get("function") or {}).get("name") for t in tools if isinstance(t, dict)}
            if name not in names:
                raise HTTPError(400, "The tool specified in `tool_choice` does not match any "
                                "of the specified `tools`", "tool_choice")
        return False  # forced (forced_tools.py), not parsed

    def plan(self, parse_tools: bool, template_kwargs: dict | None, tokenizer: Any,
             parallel_tool_calls: bool | None = None, include_reasoning: bool = True,
             continued: str | None = None, forced: ForcedTools | None = None
             ) -> ParsePlan | None:
        """How a request's output is parsed (None: not at all). `parallel_tool_calls`: the
        request's field; only False (not None, vLLM's default being true) keeps one call.
        `include_reasoning`: the request's field (vLLM's, default true); false drops the
        reasoning from the answer. `continued`: `continued_text(...)` of a continue_final_message
        request (see the module docstring). `forced`: forced_tools(req), the content then being
        the forced calls (never parsed by the tool parser)."""
        tools = self.tools if parse_tools and forced is None else None
        reasoning = self.reasoning
        if tools is None and reasoning is None and forced is None:
            return None
        thinking = reasoning.thinks(template_kwargs) if reasoning is not None else False
        if reasoning is not None and continued is not None:
            thinking = thinking and _opens_reasoning(reasoning, continued)
        markers: tuple[str, ...] = tools.markers if tools is not None else ()
        if reasoning is not None and thinking:
            markers += (reasoning.start, reasoning.end, *reasoning.implicit_end)
        keep = any(self._is_special(tokenizer, m) for m in markers)
        return ParsePlan(reasoning, thinking, tools, keep, parallel_tool_calls is False,
                         include_reasoning, forced)

    def _is_special(self, tokenizer: Any, marker: str) -> bool:
        hit = self._special.get(marker)
        if hit is None:
            hit = False
            try:
                ids = tokenizer.encode(marker)
                is_special = getattr(tokenizer, "is_special", None)
                hit = len(ids) == 1 and bool(is_special and is_special(ids[0]))
            except Exception:  # noqa: BLE001 - a tokenizer that cannot say: keep them
                hit = True
            self._special[marker] = hit
        return hit
