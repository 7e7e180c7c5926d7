"""OpenAI Responses API request bodies (msgspec) and their conversion into a chat request.

POST /v1/responses (responses_api.py) runs a request as the chat completion it converts into,
as vLLM does for models without the harmony format, so templates, tool-call and reasoning
parsers, structured outputs and every check are the chat route's. `to_chat_request`:

- `instructions` -> a leading system message; `input` a string -> one user message.
- `input` items: messages (`type` "message" or absent; roles user / assistant / system /
  developer, developer read as system; content a string or parts `input_text` /
  `output_text` / `text` / `refusal`), `function_call` (-> the assistant message's
  `tool_calls`, consecutive calls in one message), `function_call_output` (-> a `tool`
  message), `reasoning` (its `reasoning_text` content -> the next assistant message's
  `reasoning_content`). Images, files and other item types are 400s naming the item.
- `previous_response_id` (the store, responses_api.py): the stored conversation of that
  response, its output included, comes before `input`; `instructions` are not carried over.
- `tools`: function tools (`{"type": "function", "name", "description", "parameters"}`);
  hosted tools (web_search, file_search, code_interpreter, mcp, ...) are 400s.
- `tool_choice` "auto" / "none" / "required" / `{"type": "function", "name"}` map to the chat
  forms; `parallel_tool_calls` as on the chat route.
- `text.format` json_schema (its `schema` an object) / json_object -> response_format
  (structured outputs).
- Malformed items, parts, tools or formats, and an input with no message, are 400s naming
  the field (`param`), never a Python error message.
- `max_output_tokens` -> max_tokens; `temperature`, `top_p` and vLLM's extra `top_k`, `min_p`,
  `seed`, `repetition_penalty`, `stop`, `ignore_eos` as on the chat route. `background` true
  and `top_logprobs` > 0 are 400s (not served); `reasoning.effort` is the chat template's
  `reasoning_effort` (vLLM's chat field); `include`, `truncation`, `user`, `metadata` (echoed
  back), `service_tier` and unknown fields are accepted and have no effect.
"""

from __future__ import annotations

from typing import Any

from msgspec import Struct, structs

from atom_stream.protocol import ChatCompletionRequest, ChatMessage, ContentPart
from atom_stream.server.responses import HTTPError

TEXT_PARTS = ("input_text", "output_text", "text", "refusal")
ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


class ResponsesRequest(Struct, kw_only=True):
    """POST /v1/responses (OpenAI's fields, plus vLLM's sampling extras)."""

    input: str | list[dict[str, Any]]
    model: str | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    stream: bool | None = False
    store: bool | None = True
    previous_response_id: str | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None
    truncation: str | None = None
    background: bool | None = False
    include: list[str] | None = None
    top_logprobs: int | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    request_id: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.store is None:  # null is the default (stored), as when the field is omitted
            self.store = True


def _bad(message: str, param: str) -> HTTPError:
    return HTTPError(400, message, param)


def _content(item: dict[str, Any], param: str) -> str | list[ContentPart]:
    content = item.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad("a message item needs `content`: a string or a list of parts", param)
    parts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS:
            raise _bad(f"content part type {kind!r} is not supported: this server serves "
                       "text-only models", f"{param}.content[{k}]")
        text = part.get("refusal" if kind == "refusal" else "text")
        if not isinstance(text, str):
            raise _bad(f"a {kind} part needs a string", f"{param}.content[{k}]")
        parts.append(ContentPart(type="text", text=text))
    return parts


def _part_texts(parts: Any, param: str) -> str:
    """The joined `text` of a list of parts (reasoning content / summary, tool output parts);
    parts without a text add nothing; anything but a list of objects with string texts is a
    400 naming the part."""
    if not isinstance(parts, list):
        raise _bad("expected a list of parts", param)
    texts = []
    for k, part in enumerate(parts):
        text = part.get("text") if isinstance(part, dict) else None
        if text is not None and not isinstance(text, str):
            raise _bad("a part's `text` must be a string", f"{param}[{k}]")
        texts.append(text or "")
    return "".join(texts)


def _reasoning_text(item: dict[str, Any], param: str) -> str:
    """A reasoning item's text: its reasoning_text content, else its summary texts."""
    if item.get("content"):
        return _part_texts(item["content"], f"{param}.content")
    return _part_texts(item.get("summary") or [], f"{param}.summary")


class _History:
    """Chat messages built item by item: function calls join the assistant message before
    them; a reasoning item waits for the next assistant message."""

    def __init__(self, messages: list[ChatMessage]):
        self.messages = messages
        self.reasoning: str | None = None

    def _assistant(self) -> ChatMessage:
        last = self.messages[-1] if self.messages else None
        if last is None or last.role != "assistant":
            last = ChatMessage(role="assistant", content=None)
            self.messages.append(last)
        if self.reasoning is not None:
            last.reasoning_content = (last.reasoning_content or "") + self.reasoning
            self.reasoning = None
        return last

    def add(self, item: Any, param: str) -> None:
        if not isinstance(item, dict):
            raise _bad("an input item must be an object", param)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            role = ROLES.get(role) if isinstance(role, str) else None
            if role is None:
                raise _bad(f"message role must be one of user, assistant, system, developer; "
                           f"got {item.get('role')!r}", f"{param}.role")
            if role == "assistant":
                msg = ChatMessage(role=role, content=_content(item, param))
                self.messages.append(msg)
                self._assistant()  # a pending reasoning item joins it
            else:
                self.messages.append(ChatMessage(role=role, content=_content(item, param)))
        elif kind == "function_call":
            name, args = item.get("name"), item.get("arguments")
            if not isinstance(name, str) or not isinstance(args, str):
                raise _bad("a function_call item needs `name` and `arguments` strings", param)
            call_id = item.get("call_id") or item.get("id") or f"call_{len(self.messages)}"
            msg = self._assistant()
            msg.tool_calls = (msg.tool_calls or []) + [{
                "id": call_id, "type": "function", "function": {"name": name,
                                                                "arguments": args}}]
        elif kind == "function_call_output":
            output = item.get("output")
            if isinstance(output, list):  # output parts: their texts
                output = _part_texts(output, f"{param}.output")
            if not isinstance(output, str):
                raise _bad("a function_call_output item needs an `output` string", param)
            self.messages.append(ChatMessage(role="tool", content=output,
                                             tool_call_id=str(item.get("call_id") or "")))
        elif kind == "reasoning":
            self.reasoning = (self.reasoning or "") + _reasoning_text(item, param)
        else:
            raise _bad(f"input item type {kind!r} is not supported", param)


def _tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Function tools -> the chat form; `parameters` an object or null (no parameters: any
    object), `description` a string or null; other tool types are 400s naming the tool."""
    if not tools:
        return None
    out = []
    for k, t in enumerate(tools):
        if t.get("type") != "function" or not isinstance(t.get("name"), str):
            raise _bad(f"tool type {t.get('type')!r} is not supported: only function tools "
                       "(type, name, parameters) are served", f"tools[{k}]")
        params, description = t.get("parameters"), t.get("description")
        if params is not None and not isinstance(params, dict):
            raise _bad("a function tool's `parameters` must be a JSON schema object",
                       f"tools[{k}].parameters")
        if description is not None and not isinstance(description, str):
            raise _bad("a function tool's `description` must be a string",
                       f"tools[{k}].description")
        fn = {"name": t["name"], "parameters": params or {"type": "object"}}
        if description is not None:
            fn["description"] = description
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise _bad("tool_choice must be auto, none, required or {type: function, name}",
                       "tool_choice")
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """text.format -> the chat response_format: text (or none) -> None; json_object; and
    json_schema, whose `schema` must be an object (OpenAI's required field)."""
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise _bad("text.format must be an object with a `type`", "text.format")
    if fmt.get("type") in (None, "text"):
        return None
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    if fmt["type"] == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise _bad("a json_schema text.format needs `schema`: a JSON schema object",
                       "text.format.schema")
        schema = {"name": fmt.get("name") or "output", "schema": fmt["schema"]}
        if fmt.get("strict") is not None:
            schema["strict"] = fmt["strict"]
        return {"type": "json_schema", "json_schema": schema}
    raise _bad(f"text.format type {fmt['type']!r} is not supported", "text.format")


def _effort(reasoning: dict[str, Any] | None) -> str | None:
    """`reasoning.effort` -> the chat template's `reasoning_effort` (vLLM's chat field)."""
    effort = (reasoning or {}).get("effort")
    if effort is not None and not isinstance(effort, str):
        raise _bad("reasoning.effort must be a string", "reasoning.effort")
    return effort


def input_messages(req: ResponsesRequest, history: list[ChatMessage]
                   ) -> tuple[list[ChatMessage], list[ChatMessage]]:
    """(the chat messages of a request: its instructions, `history` (a previous response's
    stored conversation), then its input; the conversation to store: the same without the
    instructions, which previous_response_id does not carry over)."""
    convo = [structs.replace(m) for m in history]  # copies: the store's messages stay as they are
    built = _History(convo)
    if isinstance(req.input, str):
        convo.append(ChatMessage(role="user", content=req.input))
    else:
        for k, item in enumerate(req.input):
            built.add(item, f"input[{k}]")
    if not req.instructions:
        return convo, convo
    return [ChatMessage(role="system", content=req.instructions), *convo], convo


def to_chat_request(req: ResponsesRequest, messages: list[ChatMessage]
                    ) -> ChatCompletionRequest:
    """A Responses request and its chat messages (input_messages) -> the chat request it runs
    as (module docstring)."""
    if req.background:
        raise _bad("background responses are not supported", "background")
    if req.top_logprobs:
        raise _bad("top_logprobs is not supported on /v1/responses", "top_logprobs")
    if not messages:
        raise _bad("input must hold at least one message (or give instructions)", "input")
    if req.max_output_tokens is not None and req.max_output_tokens < 1:
        raise _bad(f"max_output_tokens must be at least 1, got {req.max_output_tokens}",
                   "max_output_tokens")
    chat = ChatCompletionRequest(
        model=req.model, messages=messages, tools=_tools(req.tools),
        tool_choice=_tool_choice(req.tool_choice), parallel_tool_calls=req.parallel_tool_calls,
        max_tokens=req.max_output_tokens, temperature=req.temperature, top_p=req.top_p,
        top_k=req.top_k, min_p=req.min_p, seed=req.seed,
        repetition_penalty=req.repetition_penalty, stop=req.stop, stream=bool(req.stream),
        ignore_eos=req.ignore_eos,
        request_id=req.request_id, chat_template_kwargs=req.chat_template_kwargs,
        reasoning_effort=_effort(req.reasoning),
        response_format=_response_format(req.text))
    return chat
