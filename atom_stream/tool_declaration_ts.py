"""K2.5's TypeScript-style tool declarations (`tools_ts_str`): `encode_tools_typescript`.

A port of K2.5's `tool_declaration_ts.py` (`encode_tools_to_typescript_style`), used by
tokenizers_kimi.tool_declaration; see the comment below for the source read.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

# TypeScript-style tool declarations: a port of K2.5's `tool_declaration_ts.py`
# (`encode_tools_to_typescript_style`; the copy read is tinker-cookbook's
# renderers/kimi_k2_5_tool_declaration_ts.py, "copied from kimi-k2.5-hf-tokenizer"). Schemas are
# parsed into nodes first (in the reference's order, which decides when a `$ref` resolves) and
# then rendered; any error makes the caller fall back to JSON, as tokenization_kimi.py does.
_TS_INDENT = "  "
_TS_FIELD_DELIMITER = ",\n"
_TS_UNION_NAMES = {"string": "string", "number": "number", "integer": "number",
                   "boolean": "boolean", "null": "null", "object": "{}", "array": "Array<any>"}
_TS_CONSTRAINT_KEYS = {"string": ("maxLength", "minLength", "pattern"),
                       "number": ("maximum", "minimum"), "integer": ("maximum", "minimum")}


def _ts_comment(text: str, indent: str = "") -> str:
    return "\n".join(f"{indent}// {line}" if line else "" for line in text.split("\n"))


class _TsRegistry:
    def __init__(self) -> None:
        self.definitions: dict[str, Any] = {}
        self.has_self_ref = False

    def ref_name(self, ref: str) -> str:
        if ref == "#":
            self.has_self_ref = True
            return "parameters"
        if ref.startswith("#/$defs/"):
            name = ref.split("/")[-1]
            if name not in self.definitions:
                raise ValueError(f"Reference not found: {ref}")
            return name
        raise ValueError(f"Unsupported reference format: {ref}")


class _TsNode:
    """One parsed schema: a `kind` (scalar, object, array, enum, anyof, union, ref), its
    description and constraints (the docstring), and the kind's own fields."""

    def __init__(self, kind: str, schema: dict[str, Any], constraint_keys: Iterable[str] = ()):
        self.kind = kind
        self.description = schema.get("description", "")
        keys = set(constraint_keys)
        self.constraints = {k: v for k, v in schema.items() if k in keys}
        self.text = ""  # scalar type / ref name
        self.items: list[Any] = []  # anyof/union members, enum values, object fields
        self.item: _TsNode | None = None  # array item
        self.extra: Any = None  # object additionalProperties

    def docstring(self, indent: str) -> str:
        lines = []
        if self.description:
            lines.append(_ts_comment(self.description, indent))
        if self.constraints:
            lines.append(f"{indent}// " + ", ".join(
                f"{k}: {v}" for k, v in sorted(self.constraints.items(), key=lambda kv: kv[0])))
        return "".join(x + "\n" for x in lines)

    def render(self, indent: str = "") -> str:
        k = self.kind
        if k == "scalar":
            return "number" if self.text == "integer" else self.text
        if k == "ref":
            return self.text
        if k == "enum":
            return " | ".join(f'"{e}"' if isinstance(e, str) else str(e) for e in self.items)
        if k == "union":
            return " | ".join(self.items)
        if k == "anyof":
            return " | ".join(t.render(indent) for t in self.items)
        if k == "array":
            assert self.item is not None
            doc = self.item.docstring(indent + _TS_INDENT)
            if doc:
                return (f"Array<\n{doc}{indent}{_TS_INDENT}"
                        f"{self.item.render(indent + _TS_INDENT)}\n{indent}>")
            return f"Array<{self.item.render(indent)}>"
        return self._render_object(indent)

    def _render_object(self, indent: str) -> str:
        fields = (sorted((f for f in self.items if not f.optional), key=lambda f: f.name)
                  + sorted((f for f in self.items if f.optional), key=lambda f: f.name))
        parts = [f.render(indent + _TS_INDENT) for f in fields]
        if self.extra is not None:
            if self.extra is True:
                extra = "any"
            elif self.extra is False:
                extra = "never"
            elif isinstance(self.extra, _TsNode):
                extra = self.extra.render(indent + _TS_INDENT)
            else:
                raise ValueError(f"Unknown additionalProperties: {self.extra}")
            parts.append(f"{indent}{_TS_INDENT}[k: string]: {extra}")
        if not parts:
            return "{}"
        return "{\n" + _TS_FIELD_DELIMITER.join(parts) + f"\n{indent}}}"


class _TsField:
    def __init__(self, name: str, node: _TsNode, optional: bool, default: Any):
        self.name, self.node, self.optional, self.default = name, node, optional, default

    def render(self, indent: str) -> str:
        out = self.node.docstring(indent)
        if self.default is not None:
            d = self.default
            shown = repr(d) if isinstance(d, (int, float, bool)) else json.dumps(
                d, ensure_ascii=False)
            out += f"{indent}// Default: {shown}\n"
        return out + f"{indent}{self.name}{'?' if self.optional else ''}: {self.node.render(indent)}"


def _ts_object(schema: dict[str, Any], reg: _TsRegistry) -> _TsNode:
    node = _TsNode("object", schema)
    if not schema:
        return node
    if schema.get("$defs"):
        for name, definition in schema["$defs"].items():
            reg.definitions[name] = definition
    extra = schema.get("additionalProperties")
    node.extra = _ts_parse(extra, reg) if isinstance(extra, dict) else extra
    if "properties" not in schema:
        return node
    props = schema["properties"]
    optional = set(props.keys()) - set(schema.get("required", []))
    node.items = [_TsField(name, _ts_parse(prop, reg), name in optional,
                           prop.get("default") if isinstance(prop, dict) else None)
                  for name, prop in props.items()]
    return node


def _ts_enum(schema: dict[str, Any]) -> _TsNode:
    node = _TsNode("enum", schema)
    node.items = schema["enum"]
    if "type" in schema:
        typ = schema["type"]
        if isinstance(typ, list):
            if len(typ) == 2 and "null" in typ:
                typ = typ[0] if typ[0] != "null" else typ[1]
            elif len(typ) == 1:
                typ = typ[0]
            else:
                raise ValueError(f"Enum type {typ} is not supported")
        checks = {"string": lambda v: isinstance(v, str),
                  "number": lambda v: isinstance(v, (int, float)),
                  "integer": lambda v: isinstance(v, int),
                  "boolean": lambda v: isinstance(v, bool)}
        check = checks.get(typ) if isinstance(typ, str) else None
        for v in node.items:
            if v is not None and check is not None and not check(v):
                raise ValueError(f"Enum value {v} does not match type {typ}")
    return node


def _ts_parse(schema: Any, reg: _TsRegistry) -> _TsNode:
    if isinstance(schema, bool):  # true: any value; false: the reference warns, uses null
        node = _TsNode("scalar", {})
        node.text = "any" if schema else "null"
        return node
    if not isinstance(schema, dict):
        raise TypeError(f"Invalid JSON Schema object: {schema}")
    if "$ref" in schema:
        node = _TsNode("ref", schema)
        node.text = reg.ref_name(schema["$ref"])
        return node
    if "anyOf" in schema:
        node = _TsNode("anyof", schema)
        node.items = [_ts_parse(t, reg) for t in schema["anyOf"]]
        return node
    if "enum" in schema:
        return _ts_enum(schema)
    if "type" in schema:
        typ = schema["type"]
        if isinstance(typ, list):
            node = _TsNode("union", schema)
            node.items = [_TS_UNION_NAMES[t] for t in typ]
            return node
        if typ == "object":
            return _ts_object(schema, reg)
        if typ == "array":
            node = _TsNode("array", schema, ("minItems", "maxItems"))
            node.item = _ts_parse(schema["items"], reg) if schema.get("items") else _ts_parse(
                {}, reg)
            return node
        node = _TsNode("scalar", schema,
                       _TS_CONSTRAINT_KEYS.get(typ, ()) if isinstance(typ, str) else ())
        node.text = typ
        return node
    if schema == {}:
        node = _TsNode("scalar", {})
        node.text = "any"
        return node
    raise ValueError(f"Invalid JSON Schema object: {schema}")


def _ts_function(function: dict[str, Any]) -> str:
    reg = _TsRegistry()
    params = _ts_object(function.get("parameters") or {}, reg)
    interfaces = []
    root = None
    if reg.has_self_ref:  # the parameters refer to themselves ("#"): a named interface
        root = "parameters"
        body = _TS_FIELD_DELIMITER.join(f.render(_TS_INDENT) for f in params.items)
        body = "\n" + body + "\n" if body else ""
        interfaces.append(f"interface {root} {{{body}}}")
    for name, schema in dict(reg.definitions).items():
        body = _ts_parse(schema, reg).render()
        desc = schema.get("description", "")
        desc = _ts_comment(desc) + "\n" if desc else ""
        interfaces.append(f"{desc}interface {name} {body}")
    name = function.get("name", "function")
    type_def = f"type {name} = (_: {root or params.render()}) => any;"
    desc = function.get("description")
    return "\n".join(x for x in ("\n".join(interfaces), (desc and _ts_comment(desc)) or "",
                                 type_def) if x)


def encode_tools_typescript(tools: list[dict[str, Any]]) -> str:
    """OpenAI tools -> K2.5's TypeScript-style declaration ("# Tools\n\n## functions\nnamespace
    functions {\n…}\n"); "" when no tool is of type "function". Raises on schemas the reference
    rejects (callers then fall back to JSON)."""
    functions = [_ts_function(t["function"]) for t in tools or ()
                 if t.get("type") == "function" and t.get("function")]
    if not functions:
        return ""
    return "# Tools\n\n## functions\nnamespace functions {\n" + "\n".join(functions) + "\n}\n"
