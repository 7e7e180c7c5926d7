"""Shared checks of the JSON-schema regex tests (tests/test_json_schema_*.py): every
emitted regex stays in the engine's dialect and means the same under Python's re.fullmatch."""

from __future__ import annotations

import json
import re

from atom_stream.structured.json_pattern import parse_regex
from atom_stream.structured.json_schema import schema_to_regex

_FORBIDDEN = re.compile(r"\\[dDwWsSbBAZzpPNG1-9]|\(\?[^:]|\(\?:\)")



def check_dialect(rx: str) -> None:
    """`rx` uses only the constructs the engine's dialect has, means the same in Python."""
    re.compile(rx)
    i = 0
    while i < len(rx):  # scan escapes: never a class shorthand / anchor / backreference
        if rx[i] == "\\":
            assert not _FORBIDDEN.match(rx, i), (rx[i:i + 2], rx)
            i += 2
        else:
            assert not (rx[i] == "(" and rx.startswith("(?", i) and not rx.startswith("(?:", i))
            assert not rx.startswith("(?:)", i)
            i += 1
    parse_regex(rx, "emitted", anchors=False)  # regex_parse.parse, no anchors


def rx_of(schema, **kw) -> str:
    rx = schema_to_regex(schema, **kw)
    check_dialect(rx)
    return rx


def matches(rx: str, text: str) -> bool:
    return re.fullmatch(rx, text) is not None


def assert_ok(schema, *texts, **kw):
    rx = rx_of(schema, **kw)
    for t in texts:
        assert matches(rx, t), (schema, t, rx)


def assert_bad(schema, *texts, **kw):
    rx = rx_of(schema, **kw)
    for t in texts:
        assert not matches(rx, t), (schema, t, rx)


def forms(v) -> list[str]:
    return [json.dumps(v), json.dumps(v, separators=(",", ":")), json.dumps(v, indent=2),
            json.dumps(v, ensure_ascii=False)]
