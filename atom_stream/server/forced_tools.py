"""tool_choice "required" / a named function: tool calls forced by structured outputs, as vLLM.

- `forced_tools(req)` -> `ForcedTools` (None for "auto" / "none" / no tools): the JSON schema
  the answer's content must follow (the engine's structured outputs enforce it):
  - a named function: that function's `parameters` (none: an object with no properties);
  - "required": vLLM's schema of the tools: an array of at least one (exactly one with
    `parallel_tool_calls: false`) `{"name": <one tool's name>, "parameters": <its
    parameters>}`, one anyOf branch per tool, their `$defs` / `definitions` merged at the
    top (a name with two schemas: 400), their other local refs ("#/properties/...", "#")
    rebased to where the parameters now are.
- `force_tool_schema(params, forced)`: the SamplingParams with that schema as their
  structured_outputs (a request with its own response_format / guided_* is a 400).
- `ForcedTools.calls(content)`: a whole answer's ToolCalls (named: one call, the content as its
  arguments; required: one per array element, arguments re-serialized with
  json.dumps(ensure_ascii=False) as vLLM). An array cut short (max_tokens) gives the calls
  it completed, as the stream does; content with none gives no calls: the caller keeps it
  as content.
- `ForcedToolStream`: the same, streamed, with ToolCallStream's interface (`feed(text)` ->
  (content, deltas), `finish()`, `calls`): named, the first delta carries the call's id, type,
  name and the arguments so far, later ones argument pieces; required, each call is one delta
  (id, type, name and all its arguments) when its array element is complete, and an answer
  where none completed (cut by max_tokens) ends with its text as content, as `calls` leaves
  it in the whole answer.
- `finish_reason(reason)`: "tool_calls" for "required" when the answer stopped, otherwise the
  engine's reason ("stop" for a named function, as OpenAI and vLLM answer a forced function).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import msgspec

from atom_stream.protocol import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall
from atom_stream.sampling_params import SamplingParams
from atom_stream.server.responses import HTTPError

_EMPTY_OBJECT = {"type": "object", "properties": {}}


def _tool_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"  # vLLM's make_tool_call_id


def _functions(tools: list) -> dict[str, dict]:
    out = {}
    for t in tools or ():
        fn = t.get("function") if isinstance(t, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            out[fn["name"]] = fn
    return out


@dataclass
class ForcedTools:
    kind: str  # "named" | "required"
    schema: dict
    name: str | None = None  # the named function

    def calls(self, content: str) -> list[ToolCall]:
        if self.kind == "named":
            return [ToolCall(id=_tool_id(), type="function",
                             function=FunctionCall(name=self.name, arguments=content))]
        try:
            items = json.loads(content)
        except ValueError:  # cut short (max_tokens): the calls it completed, as streamed
            return _decoded_calls(_ArrayScanner().feed(content))
        if not isinstance(items, list):
            return []
        return [_call(item) for item in items if _is_call(item)]

    def finish_reason(self, reason: str, called: bool) -> str:
        return "tool_calls" if self.kind == "required" and called and reason == "stop" \
            else reason


def _is_call(item: Any) -> bool:
    return isinstance(item, dict) and isinstance(item.get("name"), str)


def _decoded_calls(elements: list[str]) -> list[ToolCall]:
    """The calls among complete array elements' texts (one that does not decode, or is not
    a {"name": ...} object, is skipped)."""
    out = []
    for element in elements:
        try:
            item = json.loads(element)
        except ValueError:
            continue
        if _is_call(item):
            out.append(_call(item))
    return out


def _call(item: dict) -> ToolCall:
    args = json.dumps(item.get("parameters", {}), ensure_ascii=False)
    return ToolCall(id=_tool_id(), type="function",
                    function=FunctionCall(name=item["name"], arguments=args))


_DEFS = ("$defs", "definitions")
_VALUES = frozenset({"const", "enum", "default", "examples", "example"})  # JSON data, no refs
_MAPS = frozenset({"properties", "$defs", "definitions", "patternProperties"})


def _rebase(node: Any, prefix: str) -> Any:
    """A copy of a tool's parameters schema whose root-relative `$ref`s ("#", "#/properties/
    ...") point into its place `prefix` in the "required" schema; refs into `$defs` /
    `definitions` stay (those are hoisted to the top, see `_hoist_defs`)."""
    if isinstance(node, list):
        return [_rebase(x, prefix) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k == "$ref" and isinstance(v, str) and v.startswith("#") and not any(
                v.startswith(f"#/{d}/") for d in _DEFS):
            out[k] = prefix + v[1:]
        elif k in _MAPS and isinstance(v, dict):  # name -> schema: any name, even "enum"
            out[k] = {name: _rebase(sub, prefix) for name, sub in v.items()}
        else:
            out[k] = v if k in _VALUES else _rebase(v, prefix)
    return out


def _hoist_defs(params: dict, defs: dict[str, dict[str, Any]]) -> dict:
    """`params` without its `$defs` / `definitions`, which are merged into `defs[key]` (the
    top of the "required" schema, where their refs point); a name defined twice with
    different schemas is a 400, as in vLLM."""
    for key in _DEFS:
        table = defs.setdefault(key, {})
        for k, v in (params.get(key) or {}).items():
            if k in table and table[k] != v:
                raise HTTPError(400, f"Tool definition '{k}' has multiple schemas, "
                                "which is not supported.", "tools")
            table[k] = v
    return {k: v for k, v in params.items() if k not in _DEFS}


def forced_tools(req: Any) -> ForcedTools | None:
    """The request's forced tool calls (see the module docstring); ChatParsing.tool_choice has
    already checked tool_choice and tools."""
    choice = req.tool_choice
    fns = _functions(req.tools)
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        params = fns[name].get("parameters") or _EMPTY_OBJECT
        return ForcedTools("named", params, name)
    if choice != "required":
        return None
    defs: dict[str, dict[str, Any]] = {}
    branches = []
    for i, (name, fn) in enumerate(fns.items()):
        params = fn.get("parameters") or _EMPTY_OBJECT
        if isinstance(params, dict):
            params = _rebase(params, f"#/items/anyOf/{i}/properties/parameters")
            params = _hoist_defs(params, defs)
        branches.append({"type": "object", "properties": {
            "name": {"type": "string", "enum": [name]}, "parameters": params},
            "required": ["name", "parameters"]})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": branches}}
    if req.parallel_tool_calls is False:
        schema["maxItems"] = 1
    schema.update({key: d for key, d in defs.items() if d})
    return ForcedTools("required", schema)


def force_tool_schema(params: SamplingParams, forced: ForcedTools) -> SamplingParams:
    """`params` constrained to the forced calls' schema (a 400 if the request already asks
    for another structured output: one constraint per request)."""
    if params.structured_outputs is not None:
        raise HTTPError(400, "tool_choice 'required' or a named function cannot be combined "
                        "with response_format or guided decoding", "tool_choice")
    return msgspec.structs.replace(params, structured_outputs={"json": forced.schema})


class ForcedToolStream:
    """Streamed forced tool calls (see the module docstring)."""

    __slots__ = ("_forced", "_held", "_id", "_scan", "calls")

    def __init__(self, forced: ForcedTools):
        self._forced = forced
        self._id: str | None = None
        self._scan = _ArrayScanner()
        self.calls: list[str] = []  # the names called so far
        # "required": the text before the first complete call, which finish() sends as content
        # when none completes (cut by max_tokens), as the whole answer's `calls` leaves it
        self._held: list[str] = []

    def feed(self, text: str) -> tuple[str, list[DeltaToolCall]]:
        if not text:
            return "", []
        if self._forced.kind == "named":
            if self._id is None:
                self._id = _tool_id()
                self.calls.append(self._forced.name)
                return "", [DeltaToolCall(id=self._id, type="function", index=0,
                                          function=DeltaFunctionCall(name=self._forced.name,
                                                                     arguments=text))]
            return "", [DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=text))]
        if not self.calls:
            self._held.append(text)
        deltas = []
        for call in _decoded_calls(self._scan.feed(text)):
            deltas.append(DeltaToolCall(id=call.id, type="function", index=len(self.calls),
                                        function=DeltaFunctionCall(
                                            name=call.function.name,
                                            arguments=call.function.arguments)))
            self.calls.append(call.function.name)
        return "", deltas

    def finish(self) -> tuple[str, list[DeltaToolCall]]:
        if self._forced.kind == "named" or self.calls:
            return "", []
        return "".join(self._held), []  # no call completed: the text is the content


class _ArrayScanner:
    """Splits a streamed JSON array's text into its top-level elements as each completes."""

    def __init__(self) -> None:
        self.depth = 0  # 1 inside the array, 2+ inside an element's brackets
        self.in_str = False
        self.esc = False
        self.cur: list[str] = []

    def feed(self, text: str) -> list[str]:
        done = []
        for ch in text:
            if self.depth >= 2 or (self.depth == 1 and ch not in ",] \t\n\r"):
                self.cur.append(ch)
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif ch == "\\":
                    self.esc = True
                elif ch == '"':
                    self.in_str = False
                continue
            if ch == '"':
                self.in_str = True
            elif ch in "[{":
                self.depth += 1
            elif ch in "]}":
                self.depth -= 1
                if self.depth == 1 and self.cur:
                    done.append("".join(self.cur))
                    self.cur = []
        return done
