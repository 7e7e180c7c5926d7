"""JSON Schema -> regular expression, for guided decoding (vLLM's `guided_json`,
`response_format: json_schema`, `guided_choice`).

    schema_to_regex(schema, whitespace=None, max_depth=4, any_depth=ANY_VALUE_DEPTH) -> str
    json_value_regex(depth, whitespace=None) -> str
    choice_regex(choices) -> str

The regexes are full-match patterns (no `^`/`$`) in the dialect of
`atom_stream.structured.regex_parse`, and they mean the same under Python's `re.fullmatch`.
Constructs emitted (and nothing else): literal characters (ASCII printable and printable
non-ASCII as themselves), the escapes `\\\\ \\. \\[ \\] \\( \\) \\{ \\} \\* \\+ \\? \\| \\^
\\$ \\- \\n \\t \\r \\f \\v \\xHH \\uXXXX`, classes `[...]` / `[^...]` with ranges (never
`\\d \\w \\s`: always explicit ASCII classes), non-capturing groups `(?:...)`, `|`, and the
quantifiers `* + ? {n} {n,} {n,m}`. Never an empty group `(?:)` nor an empty alternative.
A caller's `whitespace` regex is validated against the dialect and embedded as given.

Supported schema subset (anything else raises GrammarError naming the keyword / value):
- `true` / `{}` (any value), `type` (one or a list), `enum`, `const`, `anyOf`, `oneOf` (as
  alternation: oneOf's exclusivity is not enforced), `allOf` with one element, `$ref` to a
  root-relative JSON pointer (`#`, `#/$defs/X`, `#/definitions/X`, ...).
  Keywords beside `$ref` / `allOf` / `anyOf` / `oneOf` are merged into the referenced schema /
  each branch (`type`: intersection, `required`: union, `properties`: union; any other key
  present on both sides with different values -> GrammarError).
- No `type`: inferred from the keywords present (properties/required/additionalProperties ->
  object; items/prefixItems/minItems/maxItems -> array; minLength/maxLength/pattern/format ->
  string; minimum/maximum/exclusive* -> number); none of them -> any value.
- string: `minLength` / `maxLength` (counted in code points: a character or an escape is
  one, an escaped surrogate pair `\\ud83d\\ude00` is one and a lone escaped surrogate is
  refused), a `maxLength` above MAX_STRING_REPEAT is treated as unbounded (a `minLength` above
  it is refused); `pattern` (regex_parse's dialect, a Python-`re` subset, less a few forms
  it reads otherwise than Python: see json_pattern.parse_regex; full match of the string's
  content: a leading `^` / trailing `$` is allowed; the pattern is rewritten to match the JSON
  encoding of the characters it allows, e.g. a `"` in the pattern matches `\\"`; a repeat
  maximum above MAX_STRING_REPEAT is treated as unbounded, a minimum above it is refused, and
  regex_parse refuses any count above its MAX_REPEAT); `format`: date-time, date, time, uuid,
  email (simple forms, see json_regex.FORMATS) are enforced; any other format (uri, ipv4,
  duration, binary, ...: pydantic's AnyUrl, timedelta, bytes) is an annotation, as JSON
  Schema's default: a plain string. An enforced `format` or a `pattern` cannot be combined with
  each other or with lengths.
- integer: `-?(0|[1-9][0-9]*)`; minimum / maximum / exclusiveMinimum / exclusiveMaximum (draft 4
  booleans too) are enforced EXACTLY for any range by digit-range alternations.
- number: JSON number grammar. Bounds (integers or decimals such as 0.5, |v| < 1e30, at most
  30 decimals; a float bound by its shortest repr) are exact: the regex then allows plain
  decimal notation only (no exponent), by integer-part ranges and digit-by-digit fraction
  comparisons (json_regex._frac).
- object: `properties` in the given order, each optional unless `required`;
  `additionalProperties` absent or false with `properties` -> no other keys (vLLM/xgrammar's
  strict behaviour); true / a schema -> more keys (any JSON string, not checked against the
  listed names; true: values as for `{}`) after the listed ones. No `properties`: any object
  (the object part of json_value_regex(any_depth)) unless `additionalProperties` is a schema
  (then a map of it) or false (then `{}` only). `required` names missing from `properties` are
  appended as properties whose value is the additionalProperties schema (`{}` if absent).
- array: `items` (a schema, or a list = tuple in drafts 4-7 with `additionalItems`),
  `prefixItems`, `minItems` / `maxItems` (a maxItems above MAX_ITEMS_REPEAT is treated as
  unbounded; a minItems above it is refused); `uniqueItems` (pydantic's set / frozenset) is
  accepted and not enforced (no regex can), as vLLM's fallback backends. Items absent / true:
  the array part of json_value_regex(any_depth).
- enum / const: values are emitted structurally in their compact form (keys in the given
  order) with `whitespace` allowed between tokens; a string is its json.dumps
  (ensure_ascii=False) form, or its ASCII-escaped form when that differs. Scalar enum values
  are filtered through the other keywords of the schema; containers are not.
- `{}` / true / no constraining keyword: json_value_regex(any_depth) (default depth 2).
- `$ref` recursion: a definition may be expanded inside itself at most `max_depth` times; past
  that the branch is impossible (dropped from alternations, optional properties / array items
  omitted). If nothing finite remains: GrammarError.
- Ignored annotations: see ANNOTATIONS. Vendor keywords starting with `x-` are ignored too.
Canonical forms: integers / numbers never match `-0`-style or exponent forms where bounds
apply; strings from `pattern` / `format` / `enum` match one JSON encoding per character (the
json.dumps one); free strings (`"type": "string"`) match every valid JSON string.
"""

from __future__ import annotations

import json

from atom_stream.structured.errors import GrammarError
from atom_stream.structured.json_compiler import Compiler, any_value_regex
from atom_stream.structured.json_keywords import ANNOTATIONS
from atom_stream.structured.json_pattern import check_dialect
from atom_stream.structured.json_regex import (
    ANY_VALUE_DEPTH,
    MAX_ITEMS_REPEAT,
    MAX_STRING_REPEAT,
    WS_DEFAULT,
    alt,
    lits,
)

__all__ = [
    "ANNOTATIONS", "ANY_VALUE_DEPTH", "MAX_ITEMS_REPEAT", "MAX_STRING_REPEAT", "WS_DEFAULT",
    "choice_regex", "json_value_regex", "schema_to_regex",
]


def _parse_schema(schema):
    """`schema`, decoded when it is JSON text; GrammarError unless an object / boolean."""
    if isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise GrammarError(f"a JSON schema must be an object or a boolean, got "
                           f"{type(schema).__name__}")
    return schema


def _whitespace(whitespace: str | None) -> str:
    """The whitespace regex to embed: WS_DEFAULT for None, else the caller's, checked."""
    if whitespace is None:
        return WS_DEFAULT
    return check_dialect(whitespace, "whitespace pattern")


def schema_to_regex(schema: dict | bool | str, *, whitespace: str | None = None,
                    max_depth: int = 4, any_depth: int = ANY_VALUE_DEPTH) -> str:
    """A regex (the dialect in the module docstring) whose FULL matches are JSON texts valid
    under `schema` (within the supported subset, see the module docstring; canonical forms
    where noted), with `whitespace` (a regex, default WS_DEFAULT; "" for compact output)
    allowed between tokens, never before / after the value. `schema` may be a JSON string.
    `max_depth`: how many times a `$ref` may be expanded inside itself; `any_depth`: nesting
    of the values of "any JSON value" schemas. Raises GrammarError with a message naming the
    unsupported keyword / bad value, or when no finite instance remains."""
    schema = _parse_schema(schema)
    if schema is False:
        raise GrammarError("the schema 'false' allows no value")
    if not isinstance(max_depth, int) or max_depth < 1:
        raise GrammarError(f"max_depth must be a positive integer, got {max_depth!r}")
    if not isinstance(any_depth, int) or any_depth < 0:
        raise GrammarError(f"any_depth must be a non-negative integer, got {any_depth!r}")
    comp = Compiler(schema, _whitespace(whitespace), max_depth, any_depth)
    comp.active["#"] = 1  # the root counts as one expansion of "#"
    out = comp.build(schema)
    if out is None or out == "":
        raise GrammarError(f"the schema allows no value (nothing finite remains within "
                           f"max_depth={max_depth} expansions of a recursive '$ref', or the "
                           f"constraints contradict each other)")
    return out


def json_value_regex(depth: int, whitespace: str | None = None) -> str:
    """Any JSON value nested at most `depth` levels of objects / arrays (depth 0: primitives
    only: string, number, true, false, null), `whitespace` (default WS_DEFAULT) between
    tokens."""
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise GrammarError(f"depth must be a non-negative integer, got {depth!r}")
    return any_value_regex(depth, _whitespace(whitespace))


def choice_regex(choices: list[str]) -> str:
    """Alternation of the literal strings (each matched exactly, every regex metacharacter
    escaped; duplicates dropped; an empty string makes the rest optional). GrammarError for
    an empty list or a non-string choice."""
    if not isinstance(choices, (list, tuple)) or not choices:
        raise GrammarError("guided choice needs a non-empty list of strings")
    for c in choices:
        if not isinstance(c, str):
            raise GrammarError(f"guided choice entries must be strings, got {c!r}")
    out = alt([lits(c) for c in choices])
    if not out:  # only empty strings: the empty string, as an empty regex
        return ""
    return out
