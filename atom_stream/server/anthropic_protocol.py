"""Anthropic Messages API request bodies (msgspec) and their conversion into a chat request.

The /v1/messages route (anthropic.py) runs an Anthropic request as the chat completion it
converts into, as vLLM's and ATOM's Anthropic endpoints do, so templates, tool and reasoning
parsers, structured outputs and every check are the chat route's. `to_chat_request`:

- `system` (a string or text blocks, joined with "\n"; Claude Code's per-request
  `x-anthropic-billing-header` block is dropped, as vLLM does, so the prefix cache still hits)
  and any `role: "system"` entry of `messages` become one leading system message.
- Text blocks become text parts of their message; `thinking` blocks of an assistant turn its
  `reasoning_content` (the history the K2.5 template renders); `redacted_thinking` is skipped.
- `tool_use` blocks (assistant) become its `tool_calls` (input serialized as JSON arguments);
  `tool_result` blocks (user) become `tool` messages, before the rest of that user turn.
  `tool_reference` items (Claude Code's tool search) in a tool_result are the referenced
  tool's name, one line each (the tools are all in `tools`); a top-level one is skipped, as
  vLLM does.
- A final assistant message with text is a prefill (Anthropic's contract): the prompt ends
  in that text (continue_final_message, no generation prompt) and the answer continues it,
  unless `chat_template_kwargs` sets either option itself.
- `tools` (custom tools: name, description, input_schema) become functions; server tools
  (a `type` such as `web_search_20250305`, which run at Anthropic) are a 400.
- `tool_choice` auto / any / tool / none -> "auto" / "required" / the named function /
  "none"; `disable_parallel_tool_use` -> parallel_tool_calls false.
- `thinking` {type: enabled | adaptive | disabled} -> the chat template's `thinking` kwarg
  (unless `chat_template_kwargs` sets it); `budget_tokens` is accepted, not enforced.
- `output_config.format` (json_schema) -> response_format json_schema (structured outputs);
  `output_config.effort` -> the chat template's `reasoning_effort`, as vLLM maps it.
- `max_tokens`, `stop_sequences`, `temperature`, `top_p`, `top_k`, `stream` map one to one;
  so do vLLM's extras `ignore_eos` and `seed` (not Anthropic's fields).
- Images, documents and other non-text blocks are 400s naming the block: the server serves
  text-only models. Unknown fields are ignored, as vLLM's pydantic models do.
"""

from __future__ import annotations

import json
from typing import Any

from msgspec import Struct

from atom_stream.protocol import (
    THINKING_TYPES,
    ChatCompletionRequest,
    ChatMessage,
    ContentPart,
)
from atom_stream.server.responses import HTTPError

# Claude Code's attribution block: a per-request hash at the head of the system prompt
BILLING_HEADER = "x-anthropic-billing-header"
# roles newer Claude Code versions send outside Anthropic's spec (vLLM maps them the same way)
ROLE_ALIASES = {"ctx": "user", "msg": "user"}
_TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


class Block(Struct, kw_only=True):
    """A content block of any type (text, thinking, redacted_thinking, tool_use, tool_result;
    the rest are refused): every type's fields, each optional."""

    type: str
    text: str | None = None
    thinking: str | None = None
    signature: str | None = None
    data: str | None = None
    id: str | None = None
    name: str | None = None
    input: Any = None
    tool_use_id: str | None = None
    content: str | list[dict[str, Any]] | None = None
    is_error: bool | None = None


class Message(Struct, kw_only=True):
    role: str
    content: str | list[Block]


class Tool(Struct, kw_only=True):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None  # "custom" or absent; server tools name their own types


class ToolChoice(Struct, kw_only=True):
    type: str
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(Struct, kw_only=True):
    type: str
    budget_tokens: int | None = None


class OutputFormat(Struct, kw_only=True):
    type: str
    schema: dict[str, Any] | None = None


class OutputConfig(Struct, kw_only=True):
    format: OutputFormat | None = None
    effort: str | None = None


class CountTokensRequest(Struct, kw_only=True):
    """POST /v1/messages/count_tokens."""

    model: str
    messages: list[Message]
    system: str | list[Block] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's extra field


class MessagesRequest(CountTokensRequest, kw_only=True):
    """POST /v1/messages (`max_tokens` is required, as Anthropic's API has it)."""

    max_tokens: int
    stop_sequences: list[str] | None = None
    stream: bool | None = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    metadata: dict[str, Any] | None = None
    output_config: OutputConfig | None = None
    # vLLM's sampling extras (not Anthropic's; `extra_body` in the SDK): benchmarks' ignore_eos
    ignore_eos: bool = False
    seed: int | None = None


def _unsupported(kind: str, param: str) -> HTTPError:
    return HTTPError(400, f"content block type {kind!r} is not supported: this server serves "
                     "text-only models", param)


def _system_text(req: CountTokensRequest) -> str:
    parts: list[str] = []
    system = req.system
    if isinstance(system, str):
        parts.append(system)
    elif system:
        for k, b in enumerate(system):
            if b.type != "text":
                raise _unsupported(b.type, f"system[{k}]")
            if b.text and not b.text.startswith(BILLING_HEADER):
                parts.append(b.text)
    for i, m in enumerate(req.messages):
        if m.role != "system":
            continue
        if isinstance(m.content, str):
            parts.append(m.content)
            continue
        for j, b in enumerate(m.content):
            if b.type != "text":
                raise _unsupported(b.type, f"messages[{i}].content[{j}]")
            if b.text and not b.text.startswith(BILLING_HEADER):
                parts.append(b.text)
    return "\n".join(parts)


def _tool_result_text(b: Block, param: str) -> str:
    """A tool_result's content as the text of a `tool` message (text blocks and the names of
    tool_reference items joined by "\n"); any other block in it is a 400."""
    if b.content is None or isinstance(b.content, str):
        return b.content or ""
    texts = []
    for k, item in enumerate(b.content):
        kind = item.get("type")
        if kind == "text":
            text = item.get("text")
        elif kind == "tool_reference":
            text = item.get("tool_name") or item.get("name")
        else:
            raise _unsupported(str(kind), f"{param}.content[{k}]")
        texts.append(text if isinstance(text, str) else "")
    return "\n".join(texts)


def _turn(i: int, role: str, blocks: list[Block], out: list[ChatMessage]) -> None:
    """One message's blocks -> chat messages appended to `out` (its tool results first)."""
    parts: list[ContentPart] = []
    calls: list[dict[str, Any]] = []
    reasoning: list[str] = []
    for j, b in enumerate(blocks):
        param = f"messages[{i}].content[{j}]"
        kind = b.type
        if kind == "text":
            if b.text is None:
                raise HTTPError(400, "a text block needs a 'text' string", param)
            parts.append(ContentPart(type="text", text=b.text))
        elif kind == "thinking":
            reasoning.append(b.thinking or "")
        elif kind in ("redacted_thinking", "tool_reference"):
            continue  # opaque / a tool search's pointer: nothing a template could render
        elif kind == "tool_use":
            if role != "assistant" or not b.name:
                raise HTTPError(400, "a tool_use block belongs to an assistant message and "
                                "needs a 'name'", param)
            calls.append({"id": b.id or f"toolu_{i}_{j}", "type": "function",
                          "function": {"name": b.name,
                                       "arguments": json.dumps(b.input or {},
                                                               ensure_ascii=False)}})
        elif kind == "tool_result":
            if role != "user":
                raise HTTPError(400, "a tool_result block belongs to a user message", param)
            out.append(ChatMessage(role="tool", tool_call_id=b.tool_use_id or "",
                                   content=_tool_result_text(b, param)))
        else:
            raise _unsupported(kind, param)
    if role == "assistant" and (parts or calls or reasoning):
        out.append(ChatMessage(role=role, content=parts or None, tool_calls=calls or None,
                               reasoning_content="".join(reasoning) or None))
    elif role == "user" and parts:
        out.append(ChatMessage(role=role, content=parts))


def _tools(req: CountTokensRequest) -> list[dict[str, Any]] | None:
    if not req.tools:
        return None
    out = []
    for k, t in enumerate(req.tools):
        if t.type not in (None, "custom") or t.input_schema is None:
            raise HTTPError(400, f"tool {t.name!r}: only custom tools with an input_schema are "
                            f"served (type {t.type!r} is a server tool run by Anthropic)",
                            f"tools[{k}]")
        schema = dict(t.input_schema)
        schema.setdefault("type", "object")
        fn: dict[str, Any] = {"name": t.name, "parameters": schema}
        if t.description is not None:
            fn["description"] = t.description
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: ToolChoice | None) -> str | dict[str, Any] | None:
    if choice is None:
        return None
    if choice.type == "tool":
        if not choice.name:
            raise HTTPError(400, "tool_choice of type 'tool' needs a 'name'", "tool_choice")
        return {"type": "function", "function": {"name": choice.name}}
    mapped = _TOOL_CHOICES.get(choice.type)
    if mapped is None:
        raise HTTPError(400, f"tool_choice.type must be one of auto, any, tool, none; got "
                        f"{choice.type!r}", "tool_choice")
    return mapped


def _template_kwargs(req: CountTokensRequest) -> dict[str, Any] | None:
    kwargs = dict(req.chat_template_kwargs or {})
    if req.thinking is not None:
        on = THINKING_TYPES.get(req.thinking.type)
        if on is None:
            raise HTTPError(400, "thinking.type must be one of enabled, adaptive, disabled; "
                            f"got {req.thinking.type!r}", "thinking")
        kwargs.setdefault("thinking", on)
    return kwargs or None


def _is_prefill(req: CountTokensRequest, chat: ChatCompletionRequest) -> bool:
    """Whether the request ends in an assistant prefill: its last message is the assistant's
    and converts into text without tool calls, and `chat_template_kwargs` sets neither chat
    option itself."""
    if not (req.messages and chat.messages) or req.messages[-1].role != "assistant" or any(
            k in (chat.chat_template_kwargs or {})
            for k in ("add_generation_prompt", "continue_final_message")):
        return False
    last = chat.messages[-1]
    if last.role != "assistant" or last.tool_calls:
        return False
    content = last.content
    if isinstance(content, list):
        return any(p.text for p in content)
    return bool(content)


def to_chat_request(req: CountTokensRequest) -> ChatCompletionRequest:
    """An Anthropic request -> the chat completion request it runs as (module docstring)."""
    messages: list[ChatMessage] = []
    system = _system_text(req)
    if system:
        messages.append(ChatMessage(role="system", content=system))
    for i, m in enumerate(req.messages):
        role = ROLE_ALIASES.get(m.role, m.role)
        if role == "system":
            continue
        if role not in ("user", "assistant"):
            raise HTTPError(400, f"messages[{i}].role must be 'user' or 'assistant', got "
                            f"{m.role!r}", f"messages[{i}].role")
        if isinstance(m.content, str):
            messages.append(ChatMessage(role=role, content=m.content))
        else:
            _turn(i, role, m.content, messages)
    choice = _tool_choice(req.tool_choice)
    chat = ChatCompletionRequest(
        model=req.model, messages=messages, tools=_tools(req), tool_choice=choice,
        chat_template_kwargs=_template_kwargs(req))
    if _is_prefill(req, chat):
        chat.add_generation_prompt, chat.continue_final_message = False, True
    if req.tool_choice is not None and req.tool_choice.disable_parallel_tool_use:
        chat.parallel_tool_calls = False
    if isinstance(req, MessagesRequest):
        if req.max_tokens < 1:
            raise HTTPError(400, f"max_tokens must be at least 1, got {req.max_tokens}",
                            "max_tokens")
        chat.max_tokens = req.max_tokens
        chat.stop = req.stop_sequences
        chat.temperature, chat.top_p, chat.top_k = req.temperature, req.top_p, req.top_k
        chat.stream = bool(req.stream)
        chat.ignore_eos, chat.seed = req.ignore_eos, req.seed
        if req.output_config is not None and req.output_config.effort is not None:
            chat.reasoning_effort = req.output_config.effort  # vLLM maps it the same way
        fmt = req.output_config.format if req.output_config is not None else None
        if fmt is not None:
            if fmt.type != "json_schema" or fmt.schema is None:
                raise HTTPError(400, "output_config.format must be {type: json_schema, schema}",
                                "output_config.format")
            chat.response_format = {"type": "json_schema",
                                    "json_schema": {"name": "output", "schema": fmt.schema}}
    return chat
