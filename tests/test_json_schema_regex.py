"""atom_stream.structured.json_schema: JSON Schema / choices -> full-match regexes.

Every regex is checked with Python's `re.fullmatch` (the dialect means the same there): valid
instances (compact, spaced, indented) match, invalid ones (wrong type, missing / extra keys,
values out of range, broken JSON) do not; unsupported keywords raise GrammarError; every
emitted regex stays in the dialect (no \\d \\w \\s, lookarounds, anchors, ...; parsed by the
engine's regex_parse). A seeded random generator checks many values of
a few schemas in json.dumps' compact, default and indent=2 forms. CPU only, about a second.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from decimal import Decimal

import pytest

from atom_stream.structured.errors import GrammarError
from atom_stream.structured.json_pattern import parse_regex
from atom_stream.structured.json_schema import (
    WS_DEFAULT,
    choice_regex,
    json_value_regex,
    schema_to_regex,
)

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


# ----------------------------------------------------------------------------- primitives
def test_primitive_types():
    assert_ok({"type": "string"}, '""', '"abc"', '"a\\"b"', '"\\u00e9\\n\\/"', '"é ✓ 😀"')
    assert_bad({"type": "string"}, "abc", '"a"b"', '"a\nb"', '"\\x"', '"\\u12"', '"a', "1")
    assert_ok({"type": "integer"}, "0", "-0", "7", "-42", "1234567890123456789")
    assert_bad({"type": "integer"}, "01", "1.0", "1e3", "+1", "-", "", " 1", '"1"')
    assert_ok({"type": "number"}, "0", "-0.5", "3.25", "1e10", "2.5E-3", "-1E+2")
    assert_bad({"type": "number"}, "01", ".5", "1.", "1e", "NaN", "Infinity", "--1")
    assert_ok({"type": "boolean"}, "true", "false")
    assert_bad({"type": "boolean"}, "True", "1", "null")
    assert_ok({"type": "null"}, "null")
    assert_bad({"type": "null"}, "None", '"null"', "")


def test_type_list_and_bool_schemas():
    assert_ok({"type": ["string", "null"]}, '"x"', "null")
    assert_bad({"type": ["string", "null"]}, "1", "true")
    assert_ok({"type": ["integer", "number"]}, "1", "1.5")
    for s in (True, {}, {"description": "anything"}):
        assert_ok(s, "1", '"a"', "null", '{"a": [1, {"b": null}]}', "[]", "[[1, 2]]",
                  any_depth=3)
        assert_ok(s, "1", '"a"', "null", '{"a": [1, null], "b": {}}', "[]", "[[1, 2]]")
        assert_bad(s, '{"a": [1, {"b": null}]}', "[[[]]]", "nul", "[1,]")
    with pytest.raises(GrammarError, match="false"):
        schema_to_regex(False)


def test_schema_as_json_text():
    assert_ok('{"type": "integer", "minimum": 3}', "3", "40")
    assert_bad('{"type": "integer", "minimum": 3}', "2")
    with pytest.raises(GrammarError, match="not valid JSON"):
        schema_to_regex("{not json")
    with pytest.raises(GrammarError):
        schema_to_regex("[1, 2]")


# --------------------------------------------------------------------------------- strings
def test_string_lengths_count_json_characters():
    s = {"type": "string", "minLength": 2, "maxLength": 3}
    assert_ok(s, '"ab"', '"abc"', '"a\\"c"', '"\\u00e9x"', '"éé"', '"\\n\\t"')
    assert_bad(s, '""', '"a"', '"abcd"', '"\\u00e9"', '"ab\\"c"')
    # code points: an escaped surrogate pair is one character, a lone one is refused
    assert_ok({"type": "string", "maxLength": 1}, '"\\ud83d\\ude00"', '"😀"', '"\\uFFFF"')
    assert_bad({"type": "string", "maxLength": 1}, '"\\ud83d"', '"\\ude00"')
    assert_bad({"type": "string", "minLength": 2}, '"\\ud83d\\ude00"')
    assert_ok({"type": "string"}, '"\\ud83d"')  # free strings: JSON's grammar allows it
    assert_ok({"type": "string", "maxLength": 0}, '""')
    assert_bad({"type": "string", "maxLength": 0}, '"a"')
    assert_ok({"type": "string", "minLength": 1}, '"a"', '"' + "x" * 500 + '"')
    assert_bad({"type": "string", "minLength": 1}, '""')


def test_string_large_max_length_is_unbounded():
    rx = rx_of({"type": "string", "maxLength": 1000})
    assert "1000" not in rx and matches(rx, '"' + "a" * 1200 + '"')  # documented relaxation
    rx = rx_of({"type": "string", "minLength": 3, "maxLength": 256})
    assert matches(rx, '"' + "a" * 256 + '"') and not matches(rx, '"' + "a" * 257 + '"')
    with pytest.raises(GrammarError, match="minLength"):
        schema_to_regex({"type": "string", "minLength": 300})
    with pytest.raises(GrammarError, match="minLength"):
        schema_to_regex({"type": "string", "minLength": 5, "maxLength": 2})
    with pytest.raises(GrammarError, match="maxLength"):
        schema_to_regex({"type": "string", "maxLength": -1})


def test_pattern_basic():
    assert_ok({"type": "string", "pattern": "^[a-z]+$"}, '"abc"', '"z"')
    assert_bad({"type": "string", "pattern": "^[a-z]+$"}, '""', '"aBc"', '"abc1"')
    tel = {"type": "string", "pattern": r"\d{3}-\d{4}"}
    assert_ok(tel, '"555-1234"')
    assert_bad(tel, '"5551234"', '"555-12345"', '"٣٣٣-1234"')  # \d is ASCII
    assert_ok({"pattern": "^(cat|dog)s?$"}, '"cat"', '"dogs"')  # type inferred: string
    assert_bad({"pattern": "^(cat|dog)s?$"}, '"cow"', "1")
    assert_ok({"type": "string", "pattern": "a|"}, '"a"', '""')
    assert_ok({"type": "string", "pattern": r"\$\^x{2,}\}"}, '"$^xx}"', '"$^xxxxx}"')
    assert_bad({"type": "string", "pattern": r"\$\^x{2,}\}"}, '"$^x}"')
    assert_ok({"type": "string", "pattern": "a{,2}b{3}c+?"}, '"bbbc"', '"aabbbcc"')


def test_pattern_json_escaping():
    # a " or \ in the pattern matches its JSON escape; . and [^...] never produce a raw "
    assert_ok({"type": "string", "pattern": 'a"b'}, '"a\\"b"')
    assert_bad({"type": "string", "pattern": 'a"b'}, '"a"b"')
    assert_ok({"type": "string", "pattern": r"a\\b"}, '"a\\\\b"')
    assert_ok({"type": "string", "pattern": "^[^a]$"}, '"\\""', '"\\\\"', '"\\n"', '"é"',
              '"\\u0001"', '"\\u001F"')
    assert_bad({"type": "string", "pattern": "^[^a]$"}, '"a"', '"\\u0061"', '"""', '"\n"')
    dot = {"type": "string", "pattern": "^a.c$"}
    assert_ok(dot, '"abc"', '"a\\tc"', '"a\\"c"', '"aéc"')
    assert_bad(dot, '"a\\nc"', '"ac"', '"a"c"')
    assert_ok({"type": "string", "pattern": r"^\u00e9\x41\t$"}, '"éA\\t"')
    assert_ok({"type": "string", "pattern": r"^[\s]+$"}, '" \\t\\n\\r\\f\\u000b"')
    assert_ok({"type": "string", "pattern": r"^[\S]$"}, '"x"', '"\\""')
    assert_bad({"type": "string", "pattern": r"^[\S]$"}, '" "', '"\\n"')
    assert_ok({"type": "string", "pattern": r"^[\w.+-]+@x\.org$"}, '"a.b+c-d_9@x.org"')
    assert_ok({"type": "string", "pattern": r"^\$$"}, '"$"')  # an escaped $ is kept


@pytest.mark.parametrize("pattern,text,ok", [
    (r"\012", "\n", True), ("\\€", "€", True), (r"[\ud800-\udfff]?x", "x", True),
    (r"[^\ud800-\udfff]", "é", True), (r"[a-\ud800]", "b", True),
])
def test_pattern_python_forms_mean_what_python_means(pattern, text, ok):
    """Forms Python's re reads specially (an octal escape, an escaped non-ASCII symbol,
    surrogate range ends: no generated text holds a surrogate) mean the same here."""
    rx = schema_to_regex({"type": "string", "pattern": pattern})
    assert (re.fullmatch(rx, json.dumps(text, ensure_ascii=False)) is not None) == ok


@pytest.mark.parametrize("pattern", [
    "(?=a)", "(?!a)b", "(?<=a)b", "(?P<n>a)", r"(a)\1", r"\bfoo", "(?i)a", "a**", "a$b",
    "a^b", "[a", "(a", "a)", r"\p{L}", r"\Aa", r"a\Z", "*a", r"\u12", r"[z-a]", r"[\w-z]",
    "x{3,2}", "a{2}+", "[\ud800-z]",
])
def test_pattern_outside_dialect_raises(pattern):
    with pytest.raises(GrammarError, match="pattern"):
        schema_to_regex({"type": "string", "pattern": pattern})


def test_pattern_and_format_restrictions():
    for s in ({"type": "string", "pattern": "a", "maxLength": 3},
              {"type": "string", "format": "date", "minLength": 1},
              {"type": "string", "pattern": "a", "format": "date"}):
        with pytest.raises(GrammarError, match="pattern"):
            schema_to_regex(s)
    with pytest.raises(GrammarError, match="pattern"):
        schema_to_regex({"type": "string", "pattern": 5})
    with pytest.raises(GrammarError, match="repeat"):
        schema_to_regex({"type": "string", "pattern": "a{300}"})
    rx = rx_of({"type": "string", "pattern": "a{1,999}"})  # big max: unbounded
    assert matches(rx, '"' + "a" * 1000 + '"')


def test_formats():
    cases = {
        "date-time": (['"2024-01-31T23:59:59Z"', '"1999-12-01T00:00:00.123+05:30"'],
                      ['"2024-13-01T00:00:00Z"', '"2024-01-01 00:00:00Z"',
                       '"2024-01-01T24:00:00Z"', '"2024-01-01T00:00:00"']),
        "date": (['"2024-02-29"', '"0001-01-01"'], ['"2024-2-29"', '"2024-00-10"', '"24-01-01"']),
        "time": (['"12:30:00"', '"23:59:59.5Z"', '"00:00:00-08:00"'], ['"12:30"', '"25:00:00"']),
        "uuid": (['"123e4567-e89b-12d3-a456-426614174000"',
                  '"123E4567-E89B-12D3-A456-426614174000"'],
                 ['"123e4567e89b12d3a456426614174000"', '"123e4567-e89b-12d3-a456-42661417400"']),
        "email": (['"a@b.co"', '"first.last+tag@mail.example.org"'],
                  ['"a@b"', '"@b.co"', '"a b@c.de"', '"a@-b.co"', '"a..b@c.de"']),
    }
    for fmt, (good, bad) in cases.items():
        assert_ok({"type": "string", "format": fmt}, *good)
        assert_bad({"type": "string", "format": fmt}, *bad)
    for fmt in ("ipv4", "uri", "hostname", "regex"):
        with pytest.raises(GrammarError, match=fmt):
            schema_to_regex({"type": "string", "format": fmt})


# --------------------------------------------------------------------------------- numbers
def _int_schema(lo, hi, lo_kind="minimum", hi_kind="maximum"):
    s = {"type": "integer"}
    if lo is not None:
        s[lo_kind] = lo
    if hi is not None:
        s[hi_kind] = hi
    return s


def test_integer_ranges_exhaustive():
    cases = [(0, None), (None, 0), (1, None), (-5, 5), (0, 150), (18, 65), (-1000, -37),
             (7, 7), (99, 1001), (None, -10), (-7, None), (0, 9), (10, 99), (-99, -10)]
    for lo, hi in cases:
        rx = rx_of(_int_schema(lo, hi))
        for n in range(-1200, 1200):
            want = (lo is None or n >= lo) and (hi is None or n <= hi)
            assert matches(rx, str(n)) == want, (lo, hi, n, rx)
        assert not matches(rx, "-0") or lo is None and hi is None


def test_integer_ranges_random_large():
    rng = random.Random(7)
    for _ in range(60):
        a = rng.randint(-10**rng.randint(1, 20), 10**rng.randint(1, 20))
        b = a + rng.randint(0, 10**rng.randint(0, 20))
        rx = re.compile(rx_of(_int_schema(a, b)))
        probes = {a, b, a - 1, b + 1, 0, -1, 1, (a + b) // 2}
        probes |= {rng.randint(a - 10**6, b + 10**6) for _ in range(40)}
        probes |= {rng.randint(a, b) for _ in range(40)}
        for n in probes:
            assert (rx.fullmatch(str(n)) is not None) == (a <= n <= b), (a, b, n)


def test_integer_bound_variants():
    # exclusive (numbers: draft 6+; booleans: draft 4), float bounds, both given
    assert_ok(_int_schema(0, 10, "exclusiveMinimum", "exclusiveMaximum"), "1", "9")
    assert_bad(_int_schema(0, 10, "exclusiveMinimum", "exclusiveMaximum"), "0", "10")
    d4 = {"type": "integer", "minimum": 0, "exclusiveMinimum": True, "maximum": 3,
          "exclusiveMaximum": False}
    assert_ok(d4, "1", "3")
    assert_bad(d4, "0", "4")
    assert_ok(_int_schema(1.5, 4.5), "2", "4")
    assert_bad(_int_schema(1.5, 4.5), "1", "5")
    assert_ok({"type": "integer", "minimum": 2, "exclusiveMinimum": 4}, "5")
    assert_bad({"type": "integer", "minimum": 2, "exclusiveMinimum": 4}, "4")
    big = rx_of({"type": "integer", "minimum": 0, "maximum": 2**63 - 1})
    assert matches(big, str(2**63 - 1)) and not matches(big, str(2**63))
    assert not matches(big, "-1") and len(big) < 2000
    for bad in ({"type": "integer", "minimum": 5, "maximum": 3},
                {"type": "integer", "minimum": 1.2, "maximum": 1.8},
                {"type": "integer", "minimum": "0"}, {"type": "integer", "maximum": True},
                {"type": "integer", "minimum": float("inf")}):
        with pytest.raises(GrammarError):
            schema_to_regex(bad)


def test_number_bounds():
    def check(schema, lo, lo_x, hi, hi_x):
        rx = re.compile(rx_of(schema))
        for i in range(-30, 31):
            for frac in ("", ".0", ".5", ".05", ".000"):
                text = f"{'-' if i < 0 else ''}{abs(i)}{frac}"
                v = Decimal(text)
                want = (lo is None or (v > lo if lo_x else v >= lo)) and (
                    hi is None or (v < hi if hi_x else v <= hi))
                if text.startswith("-0") and v == 0:
                    continue  # -0 forms: canonical output may omit them
                assert (rx.fullmatch(text) is not None) == want, (schema, text)

    check({"type": "number", "minimum": 0}, 0, False, None, False)
    check({"type": "number", "exclusiveMinimum": 0}, 0, True, None, False)
    check({"type": "number", "minimum": 0, "maximum": 1}, 0, False, 1, False)
    check({"type": "number", "minimum": -1, "maximum": 1}, -1, False, 1, False)
    check({"type": "number", "minimum": -10, "exclusiveMaximum": -2}, -10, False, -2, True)
    check({"type": "number", "exclusiveMinimum": -3, "exclusiveMaximum": 3}, -3, True, 3, True)
    check({"type": "number", "maximum": 5.0}, None, False, 5, False)
    check({"type": "number", "exclusiveMaximum": 0}, None, False, 0, True)
    assert_ok({"type": "number", "minimum": 0, "maximum": 1}, "0.999999", "0.25")
    assert_bad({"type": "number", "minimum": 0, "maximum": 1}, "1e-3", "1.0001", "-0.1")
    for bad in ({"type": "number", "minimum": 0.5}, {"type": "number", "maximum": -0.25},
                {"type": "number", "minimum": 3, "maximum": 2},
                {"type": "number", "minimum": 2, "exclusiveMaximum": 2}):
        with pytest.raises(GrammarError):
            schema_to_regex(bad)


# ------------------------------------------------------------------------------ enum, const
def test_enum_and_const():
    s = {"enum": ["a.b", "(x)", "1+1", "é", 3, 2.5, None, True, {"k": [1, "v"]}, []]}
    rx = rx_of(s)
    for v in s["enum"]:
        for t in forms(v):
            assert matches(rx, t), t
    for t in ('"ab"', '"axb"', '"x"', "4", "false", '{"k": [1]}', "[1]", '"(x)"x'):
        assert not matches(rx, t), t
    assert_ok({"const": "x\"y"}, '"x\\"y"')
    assert_bad({"const": "x\"y"}, '"x"', '"y"')
    assert_ok({"const": {"a": 1}}, '{"a":1}', '{ "a" : 1 }')
    assert_bad({"const": {"a": 1}}, '{"a":2}', "{}")
    assert_ok({"const": 1, "enum": [1, 2]}, "1")
    assert_bad({"const": 1, "enum": [1, 2]}, "2")
    with pytest.raises(GrammarError, match="enum"):
        schema_to_regex({"enum": []})
    with pytest.raises(GrammarError):
        schema_to_regex({"enum": [float("nan")]})


def test_enum_filtered_by_other_keywords():
    assert_ok({"type": "string", "enum": ["a", 1, "bb"]}, '"a"', '"bb"')
    assert_bad({"type": "string", "enum": ["a", 1, "bb"]}, "1")
    assert_bad({"type": "string", "maxLength": 1, "enum": ["a", "bb"]}, '"bb"')
    assert_bad({"type": "integer", "minimum": 2, "enum": [1, 2, 3]}, "1")
    # without a type only the value's own type's keywords apply (as in JSON Schema)
    assert_ok({"maxLength": 1, "enum": ["a", "bb", 12345]}, '"a"', "12345")
    assert_bad({"maxLength": 1, "enum": ["a", "bb", 12345]}, '"bb"')
    with pytest.raises(GrammarError, match="no value"):
        schema_to_regex({"type": "string", "enum": [1, 2]})


# --------------------------------------------------------------------------------- objects
PROPS3 = {"a": {"type": "integer"}, "b": {"type": "string"}, "c": {"type": "boolean"}}
VALS3 = {"a": 1, "b": "x", "c": True}


@pytest.mark.parametrize("req", [r for n in range(4) for r in itertools.combinations("abc", n)])
def test_object_required_combinations(req):
    schema = {"type": "object", "properties": PROPS3, "required": list(req)}
    rx = rx_of(schema)
    compact = rx_of(schema, whitespace="")
    for n in range(4):
        for present in itertools.combinations("abc", n):
            obj = {k: VALS3[k] for k in present}
            want = set(req) <= set(present)
            for t in forms(obj):
                assert matches(rx, t) == want, (req, t)
            assert matches(compact, json.dumps(obj, separators=(",", ":"))) == want
            if present:
                assert not matches(compact, json.dumps(obj))  # spaces: not compact
    broken = ['{"a":1,}', '{,"a":1}', '{"a":1"b":"x"}', '{"a":1,,"b":"x"}', '{"a":1,"d":0}',
              '{"b":"x","a":1}', '{"a":"1"}', '{"a":1,"a":1}', '{"a":1', '"a":1}', "[]"]
    for t in broken:
        assert not matches(rx, t), t


def test_object_nested_and_whitespace():
    schema = {"type": "object", "required": ["name", "pos"], "properties": {
        "name": {"type": "string", "maxLength": 8},
        "pos": {"type": "object", "required": ["x", "y"], "properties": {
            "x": {"type": "number"}, "y": {"type": "number"}}},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}}}}
    good = {"name": "p", "pos": {"x": 1.5, "y": -2}, "tags": ["a", "b", "a"]}
    assert_ok(schema, *forms(good))
    assert_ok(schema, '{\n\t"name" :"p" ,\r\n "pos":{ "x":1,"y":2 } }')
    bad = [{"name": "p"}, {"name": "p" * 9, "pos": {"x": 1, "y": 2}},
           {"name": "p", "pos": {"x": 1}}, {"name": "p", "pos": {"x": 1, "y": 2}, "tags": ["c"]},
           {"name": "p", "pos": {"x": 1, "y": 2, "z": 3}}]
    for v in bad:
        assert_bad(schema, *forms(v))
    assert_bad(schema, ' {"name":"p","pos":{"x":1,"y":2}}', '{"name":"p","pos":{"x":1,"y":2}} ')


def test_object_additional_properties():
    base = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert_bad(base, '{"a":1,"b":2}')  # absent: strict, like false
    assert_bad({**base, "additionalProperties": False}, '{"a":1,"b":2}')
    loose = {**base, "additionalProperties": True}
    assert_ok(loose, '{"a":1}', '{"a":1,"b":[1,{"c":null}]}', '{"z":"y"}', "{}", '{"b":1,"c":2}')
    typed = {**base, "additionalProperties": {"type": "string"}, "required": ["a"]}
    assert_ok(typed, '{"a":1}', '{"a":1,"x":"y","z":"w"}')
    assert_bad(typed, '{"a":1,"x":2}', '{"x":"y"}')
    mapping = {"type": "object", "additionalProperties": {"type": "integer"}}
    assert_ok(mapping, "{}", '{"x":1}', '{"x": 1, "y\\"": -2}')
    assert_bad(mapping, '{"x":"1"}', '{"x":1,}')
    assert_ok({"type": "object", "additionalProperties": False}, "{}", "{ }")
    assert_bad({"type": "object", "additionalProperties": False}, '{"a":1}')


def test_object_without_properties_is_any_object():
    for s in ({"type": "object"}, {"type": "object", "additionalProperties": True}):
        assert_ok(s, "{}", '{"a": 1, "b": [true, "d"], "e": {"f": null}}')
        assert_bad(s, "[]", "1", '{"a"}', '{"a":1,}', '{"a": {"b": {"c": 1}}}')  # depth 2
    assert_ok({"type": "object"}, '{"a": {"b": {"c": 1}}}', any_depth=3)
    assert_ok({"type": "object"}, '{"a": 1}', any_depth=0)  # containers: one level at least
    assert_bad({"type": "object"}, '{"a": []}', any_depth=0)


def test_object_required_not_in_properties_and_false_properties():
    s = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "z"]}
    assert_ok(s, '{"a":1,"z":[1]}', '{"a":1,"z":"any"}')
    assert_bad(s, '{"a":1}')
    assert_ok({"type": "object", "required": ["id"]}, '{"id": 3}', '{"id": 3, "x": 1}')
    assert_bad({"type": "object", "required": ["id"]}, "{}", '{"x": 1}')
    with pytest.raises(GrammarError, match="'z'"):
        schema_to_regex({**s, "additionalProperties": False})
    no_b = {"type": "object", "properties": {"a": {"type": "integer"}, "b": False}}
    assert_ok(no_b, '{"a":1}', "{}")
    assert_bad(no_b, '{"a":1,"b":2}')
    with pytest.raises(GrammarError, match="no value"):
        schema_to_regex({**no_b, "required": ["b"]})


def test_object_properties_inferred_without_type():
    assert_ok({"properties": {"a": {"const": 1}}, "required": ["a"]}, '{"a": 1}')
    assert_bad({"properties": {"a": {"const": 1}}, "required": ["a"]}, '"a"', "{}")


def test_object_regex_stays_linear_in_optional_properties():
    props = {f"p{i}": {"type": "string", "maxLength": 4} for i in range(30)}
    rx = rx_of({"type": "object", "properties": props})
    one = len(rx_of({"type": "object", "properties": {"p0": props["p0"]}}))
    assert len(rx) < 2 * 30 * one  # each property's regex appears at most twice
    assert matches(rx, '{"p3": "x", "p29": "yy"}')
    assert not matches(rx, '{"p29": "x", "p3": "yy"}')


# ---------------------------------------------------------------------------------- arrays
def test_array_items_and_bounds():
    for lo, hi in ((0, None), (1, None), (0, 2), (2, 4), (3, 3), (0, 0)):
        s = {"type": "array", "items": {"type": "integer"}, "minItems": lo}
        if hi is not None:
            s["maxItems"] = hi
        rx = rx_of(s)
        for n in range(7):
            want = n >= lo and (hi is None or n <= hi)
            for t in forms(list(range(n))):
                assert matches(rx, t) == want, (s, t)
    s = {"type": "array", "items": {"type": "integer"}}
    assert_bad(s, "[1,]", "[,1]", "[1 2]", '[1,"2"]', "[", "[1]]", "{}")
    assert_ok({"type": "array"}, "[]", '[1, "a", [2], {"b": 3}]')
    assert_bad({"type": "array"}, "[[[1]]]")  # any_depth 2
    assert_ok({"type": "array", "items": False}, "[]")
    assert_bad({"type": "array", "items": False}, "[1]")
    with pytest.raises(GrammarError, match="minItems"):
        schema_to_regex({"type": "array", "minItems": 3, "maxItems": 2})
    with pytest.raises(GrammarError, match="minItems"):
        schema_to_regex({"type": "array", "minItems": 100})
    rx = rx_of({"type": "array", "items": {"type": "integer"}, "maxItems": 500})
    assert matches(rx, json.dumps([0] * 600))  # a big maxItems is treated as unbounded


def test_prefix_items_tuples():
    s = {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}],
         "items": False}
    assert_ok(s, '["a", 1]', '["a"]', "[]")
    assert_bad(s, '["a", 1, 2]', '[1, "a"]', '["a", "b"]')
    s2 = {**s, "minItems": 2, "items": {"type": "boolean"}}
    assert_ok(s2, '["a", 1]', '["a", 1, true, false]')
    assert_bad(s2, '["a"]', '["a", 1, 2]')
    s3 = {**s2, "maxItems": 3}
    assert_ok(s3, '["a", 1, true]')
    assert_bad(s3, '["a", 1, true, false]')
    d7 = {"type": "array", "items": [{"const": "x"}, {"type": "null"}],
          "additionalItems": {"type": "integer"}}
    assert_ok(d7, '["x", null, 1, 2]', '["x"]')
    assert_bad(d7, '["x", null, "y"]')
    with pytest.raises(GrammarError):
        schema_to_regex({"type": "array", "prefixItems": [{}], "minItems": 2, "items": False})
    with pytest.raises(GrammarError, match="additionalItems"):
        schema_to_regex({"type": "array", "additionalItems": False})


# ------------------------------------------------------------------------------ combinators
def test_any_of_one_of_all_of():
    s = {"anyOf": [{"type": "integer", "minimum": 10}, {"type": "string", "maxLength": 1}]}
    assert_ok(s, "10", '"a"')
    assert_bad(s, "9", '"ab"', "null")
    assert_ok({"oneOf": [{"type": "null"}, {"type": "boolean"}]}, "null", "true")
    assert_ok({"allOf": [{"type": "integer"}], "maximum": 3}, "3")
    assert_bad({"allOf": [{"type": "integer"}], "maximum": 3}, "4")
    with pytest.raises(GrammarError, match="allOf"):
        schema_to_regex({"allOf": [{"type": "integer"}, {"minimum": 1}]})
    with pytest.raises(GrammarError, match="anyOf"):
        schema_to_regex({"anyOf": []})


def test_combinator_siblings_are_merged():
    s = {"type": "object", "properties": {"kind": {"enum": ["a", "b"]}},
         "anyOf": [{"properties": {"x": {"type": "integer"}}, "required": ["kind", "x"]},
                   {"properties": {"y": {"type": "string"}}, "required": ["kind", "y"]}]}
    assert_ok(s, '{"kind": "a", "x": 1}', '{"kind": "b", "y": "s"}')
    assert_bad(s, '{"kind": "a"}', '{"kind": "a", "x": "s"}', '{"x": 1}')
    assert_ok({"type": "number", "anyOf": [{"type": "integer"}, {"type": "string"}]}, "3")
    assert_bad({"type": "number", "anyOf": [{"type": "integer"}, {"type": "string"}]}, '"s"',
               "3.5")
    with pytest.raises(GrammarError, match="maxLength"):
        schema_to_regex({"maxLength": 1, "anyOf": [{"type": "string", "maxLength": 2}]})


# --------------------------------------------------------------------------------- $ref
def test_refs_defs_and_definitions():
    s = {"$defs": {"Pos": {"type": "integer", "minimum": 0}},
         "definitions": {"Name": {"type": "string"}},
         "type": "object", "required": ["p", "n"],
         "properties": {"p": {"$ref": "#/$defs/Pos"}, "n": {"$ref": "#/definitions/Name"},
                        "q": {"$ref": "#/$defs/Pos", "maximum": 9}}}
    assert_ok(s, '{"p": 1, "n": "x"}', '{"p": 1, "n": "x", "q": 9}')
    assert_bad(s, '{"p": -1, "n": "x"}', '{"p": 1, "n": 2}', '{"p": 1, "n": "x", "q": 10}')
    unused = {"$defs": {"U": {"not": {}}}, "type": "null"}  # never referenced: not compiled
    assert_ok(unused, "null")
    esc = {"$defs": {"a/b~c": {"const": 1}}, "$ref": "#/$defs/a~1b~0c"}
    assert_ok(esc, "1")
    for bad, msg in ((("http://x/s.json#/a"), "local"), ("#/$defs/Missing", "resolve"),
                     ("#anchor", "anchor")):
        with pytest.raises(GrammarError, match=msg):
            schema_to_regex({"$defs": {}, "$ref": bad})


def _nest(depth):
    v = {"v": 0, "next": None}
    for i in range(1, depth):
        v = {"v": i, "next": v}
    return v


def test_recursive_ref_limited_by_max_depth():
    s = {"$defs": {"Node": {"type": "object", "required": ["v", "next"], "properties": {
        "v": {"type": "integer"},
        "next": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/Node"}]}}}},
        "$ref": "#/$defs/Node"}
    for d in (1, 2, 4):
        rx = rx_of(s, max_depth=d)
        for n in range(1, 6):
            assert matches(rx, json.dumps(_nest(n))) == (n <= d), (d, n)
    tree = {"type": "object", "properties": {"name": {"type": "string"}, "children": {
        "type": "array", "items": {"$ref": "#"}}}}
    rx = rx_of(tree, max_depth=3)
    assert matches(rx, '{"name": "r", "children": [{"children": [{"name": "l"}]}, {}]}')
    assert not matches(rx, '{"children": [{"children": [{"children": [{}]}]}]}')
    assert len(rx_of(tree)) < 200_000
    with pytest.raises(GrammarError, match="max_depth"):  # every instance is infinite
        schema_to_regex({"$defs": {"L": {"type": "object", "required": ["n"],
                                         "properties": {"n": {"$ref": "#/$defs/L"}}}},
                         "$ref": "#/$defs/L"})
    with pytest.raises(GrammarError, match="max_depth"):
        schema_to_regex({"type": "integer"}, max_depth=0)


# ------------------------------------------------------------------------ refused keywords
@pytest.mark.parametrize("kw,val", [
    ("multipleOf", 2), ("patternProperties", {"a": {}}), ("uniqueItems", True),
    ("if", {}), ("then", {}), ("else", {}), ("not", {}), ("dependentRequired", {}),
    ("dependentSchemas", {}), ("minProperties", 1), ("maxProperties", 1),
    ("propertyNames", {}), ("contains", {}), ("unevaluatedProperties", False),
    ("$dynamicRef", "#x"), ("nullable", True), ("maxlength", 3),
])
def test_unsupported_keywords_raise_naming_them(kw, val):
    with pytest.raises(GrammarError, match=re.escape(kw)):
        schema_to_regex({"type": "object", "properties": {"a": {"type": "string", kw: val}}})


def test_annotations_ignored_and_bad_values():
    s = {"type": "integer", "title": "t", "description": "d", "examples": [1], "default": 0,
         "$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "x", "$comment": "",
         "deprecated": False, "readOnly": True, "writeOnly": False, "x-vendor": {"k": 1}}
    assert_ok(s, "5")
    for bad, msg in (({"type": "float"}, "float"), ({"type": []}, "type"),
                     ({"type": "object", "properties": []}, "properties"),
                     ({"type": "object", "required": "a"}, "required"),
                     ({"type": "object", "additionalProperties": 1}, "additionalProperties"),
                     ({"type": "array", "prefixItems": {}}, "prefixItems"),
                     ({"type": "object", "properties": {"a": 3}}, "schema"), (5, "object")):
        with pytest.raises(GrammarError, match=msg):
            schema_to_regex(bad)


# --------------------------------------------------------------------- whitespace, any value
def test_whitespace_option():
    s = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}}}}
    assert_ok(s, '{"a":[1,2]}', whitespace="")
    assert_bad(s, '{"a": [1, 2]}', '{ "a":[1,2]}', whitespace="")
    assert_ok(s, '{"a": [1, 2]}', whitespace="[ ]?")
    assert_bad(s, '{"a":  [1, 2]}', '{"a":\n[1]}', whitespace="[ ]?")
    assert_ok(s, '{"a":\n\n[1,  2]}', whitespace=" *|\\n*")  # top-level | gets grouped
    assert_bad(s, '{"a": \n[1]}', whitespace=" *|\\n*")
    assert_ok(s, '{\n  "a": [\n    1\n  ]\n}', whitespace=WS_DEFAULT)
    with pytest.raises(GrammarError, match="whitespace"):
        schema_to_regex(s, whitespace="(?= )")
    with pytest.raises(GrammarError, match="whitespace"):
        schema_to_regex(s, whitespace=3)
    for anchored in ("^ *", " *$", "^$"):
        with pytest.raises(GrammarError, match="anchor"):
            schema_to_regex(s, whitespace=anchored)


def test_json_value_regex_depths():
    r0, r1, r2 = (json_value_regex(d) for d in range(3))
    for r in (r0, r1, r2):
        check_dialect(r)
        for t in ('"s"', "-1.5e3", "true", "false", "null"):
            assert matches(r, t)
        assert not matches(r, "nul") and not matches(r, "'s'")
    assert not matches(r0, "[]") and not matches(r0, "{}")
    assert matches(r1, '[1, "x"]') and matches(r1, '{"a": 1, "b": "c"}') and matches(r1, "{}")
    assert not matches(r1, "[[1]]") and not matches(r1, '{"a": {"b": 1}}')
    assert matches(r2, '[1, {"a": 2}, "x"]') and matches(r2, '{"a": [], "b": {}}')
    assert matches(r2, '[[1], {"a": 2}]') and not matches(r2, "[[[1]]]")
    assert not matches(r2, '[{"a": [2]}]')
    assert not matches(r2, "[1,]") and not matches(r2, '{"a" 1}')
    assert matches(json_value_regex(1, whitespace=""), "[1,2]")
    assert not matches(json_value_regex(1, whitespace=""), "[1, 2]")
    assert len(json_value_regex(4)) < 100_000
    with pytest.raises(GrammarError):
        json_value_regex(-1)


# ------------------------------------------------------------------------------- choices
def test_choice_regex_escapes_metacharacters():
    choices = ["a.b", "(x)", "1+1", "é", "[y]", "a|b", "^$", "\\d", "{2}", "tab\there", "*",
               "?", 'q"', "😀", "-", " "]
    rx = choice_regex(choices)
    check_dialect(rx)
    for c in choices:
        assert matches(rx, c), c
    for t in ("axb", "x", "11", "a", "b", "1", "", "e", "y", "d", "22", "a.bc", "(x))"):
        assert not matches(rx, t), t
    assert choice_regex(["only"]) == "only"
    assert matches(choice_regex(["a", "", "b"]), "")
    assert choice_regex(["x", "x"]) == "x"
    with pytest.raises(GrammarError):
        choice_regex([])
    with pytest.raises(GrammarError):
        choice_regex(["a", 1])


# -------------------------------------------------------------------- randomized instances
_TEXT_POOL = "abcXYZ019 _-.\"\\/\n\t\r\x01\x1féß€😀"


def gen(schema, rng: random.Random, root, depth=0):
    """A random instance of `schema` (the subset these tests use)."""
    if schema is True or schema == {}:
        return rng.choice([None, True, 1, -2.5, "s", [1], {"k": "v"}])
    if "$ref" in schema:
        target = root
        for part in schema["$ref"][2:].split("/") if schema["$ref"] != "#" else []:
            target = target[part]
        return gen(target, rng, root, depth + 1)
    if "anyOf" in schema:
        opts = schema["anyOf"]
        if depth >= 3:  # stop recursion: prefer a branch without $ref
            opts = [o for o in opts if "$ref" not in o] or opts
        return gen(rng.choice(opts), rng, root, depth)
    if "enum" in schema:
        return rng.choice(schema["enum"])
    if "const" in schema:
        return schema["const"]
    t = schema["type"]
    if isinstance(t, list):
        t = rng.choice(t)
    if t == "null":
        return None
    if t == "boolean":
        return rng.random() < 0.5
    if t == "integer":
        lo, hi = schema.get("minimum", -10**9), schema.get("maximum", 10**9)
        return rng.randint(lo, hi)
    if t == "number":
        lo, hi = schema.get("minimum", -1e6), schema.get("maximum", 1e6)
        return rng.choice([rng.uniform(lo, hi), float(rng.randint(int(lo), int(hi))),
                           rng.randint(int(lo), int(hi))])
    if t == "string":
        n = rng.randint(schema.get("minLength", 0), min(schema.get("maxLength", 12), 12))
        return "".join(rng.choice(_TEXT_POOL) for _ in range(n))
    if t == "array":
        n = rng.randint(schema.get("minItems", 0), schema.get("maxItems", 4))
        if depth >= 3:
            n = schema.get("minItems", 0)
        return [gen(schema.get("items", True), rng, root, depth + 1) for _ in range(n)]
    req = set(schema.get("required", []))
    return {k: gen(sub, rng, root, depth + 1) for k, sub in schema["properties"].items()
            if k in req or rng.random() < 0.5}


RANDOM_SCHEMAS = [
    {"type": "object", "required": ["id", "name"], "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 99999},
        "name": {"type": "string", "minLength": 1, "maxLength": 10},
        "score": {"type": "number", "minimum": 0, "maximum": 100},
        "ratio": {"type": "number"},
        "tags": {"type": "array", "items": {"enum": ["x", "y.z", "é", 1, None]},
                 "maxItems": 3},
        "meta": {}, "flag": {"type": ["boolean", "null"]},
        "delta": {"type": "integer", "minimum": -500, "maximum": 500}}},
    {"$defs": {"T": {"type": "object", "required": ["v"], "properties": {
        "v": {"type": "integer", "minimum": -3, "maximum": 3},
        "kids": {"type": "array", "items": {"$ref": "#/$defs/T"}, "maxItems": 2}}}},
     "$ref": "#/$defs/T"},
    {"type": "array", "minItems": 1, "maxItems": 5, "items": {"anyOf": [
        {"type": "string", "maxLength": 3}, {"type": "integer"},
        {"type": "object", "properties": {"a": {"type": "null"}, "b": {"type": "string"}}}]}},
]


@pytest.mark.parametrize("idx", range(len(RANDOM_SCHEMAS)))
def test_random_instances_match(idx):
    schema = RANDOM_SCHEMAS[idx]
    rx = re.compile(rx_of(schema))
    compact = re.compile(rx_of(schema, whitespace=""))
    rng = random.Random(1234 + idx)
    for _ in range(150):
        v = gen(schema, rng, schema)
        for t in forms(v):
            assert rx.fullmatch(t), t
        assert compact.fullmatch(json.dumps(v, separators=(",", ":"), ensure_ascii=False))


def test_random_mutations_do_not_match():
    schema = RANDOM_SCHEMAS[0]
    rx = re.compile(rx_of(schema))
    rng = random.Random(99)
    mutations = [
        lambda v: v.pop("id"),
        lambda v: v.__setitem__("id", -1),
        lambda v: v.__setitem__("id", 100000),
        lambda v: v.__setitem__("name", ""),
        lambda v: v.__setitem__("name", "n" * 11),
        lambda v: v.__setitem__("score", 100.5),
        lambda v: v.__setitem__("tags", ["x", "q"]),
        lambda v: v.__setitem__("tags", ["x"] * 4),
        lambda v: v.__setitem__("extra", 1),
        lambda v: v.__setitem__("flag", 0),
        lambda v: v.__setitem__("delta", 501),
    ]
    for _ in range(100):
        v = gen(schema, rng, schema)
        rng.choice(mutations)(v)
        for t in forms(v):
            assert not rx.fullmatch(t), t
    for t in ('{"id": 1, "name": "a",}', '{"id": 1 "name": "a"}', '{"id": 1, "name": "a"b"}',
              '{"id": 01, "name": "a"}', '{"id": 1, "name": "a\n"}'):
        assert not rx.fullmatch(t), t
