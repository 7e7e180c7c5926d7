"""atom_stream.structured.json_schema on scalar schemas: strings (lengths counted in JSON
characters, `pattern` rewritten to the JSON encoding, formats), integers and numbers with
bounds (exhaustive small ranges, random large ones), enum and const. Checked as
test_json_schema_regex.py does (json_schema_checks)."""

from __future__ import annotations

import json
import random
import re
from decimal import Decimal

import pytest
from json_schema_checks import assert_bad, assert_ok, forms, matches, rx_of

from atom_stream.structured.errors import GrammarError
from atom_stream.structured.json_schema import schema_to_regex


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
    for fmt in ("ipv4", "uri", "hostname", "duration", "binary"):  # annotations: any string
        assert_ok({"type": "string", "format": fmt, "maxLength": 4}, '"x"', '"1.2"')
        assert_bad({"type": "string", "format": fmt, "maxLength": 4}, '"12345"', "1")


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
    check({"type": "number", "minimum": 0.5}, Decimal("0.5"), False, None, False)
    check({"type": "number", "maximum": -0.25}, None, False, Decimal("-0.25"), False)
    for bad in ({"type": "number", "minimum": 3, "maximum": 2},
                {"type": "number", "minimum": 2, "exclusiveMaximum": 2},
                {"type": "number", "maximum": 1e40}, {"type": "number", "minimum": 1e-40}):
        with pytest.raises(GrammarError):
            schema_to_regex(bad)


def test_decimal_number_bounds_random():
    """Decimal bounds (pydantic's Field(gt=0, le=0.5) and the like) against Decimal
    comparisons, on many plain decimals either side of them."""
    rng = random.Random(5)
    marks = ["0", "0.5", "0.05", "1", "1.25", "2.5", "-0.5", "-1.75", "3", "0.999", "10.01",
             "-0.05", "0.1", "0.125", "-2"]
    texts = set()
    for _ in range(300):
        i = rng.choice([0, 1, 2, 3, 9, 10, 11, 99])
        f = "".join(rng.choice("0123456789") for _ in range(rng.randint(0, 4)))
        texts.update({f"{i}.{f}" if f else str(i), f"-{i}.{f}" if f else f"-{i}"})
    for _ in range(120):
        lo, hi = (rng.choice([None, Decimal(rng.choice(marks))]) for _ in range(2))
        lo_x, hi_x = rng.random() < 0.5, rng.random() < 0.5
        if (lo is None and hi is None) or (lo is not None and hi is not None and (
                lo > hi or lo == hi and (lo_x or hi_x))):
            continue
        schema = {"type": "number"}
        if lo is not None:
            schema["exclusiveMinimum" if lo_x else "minimum"] = float(lo)
        if hi is not None:
            schema["exclusiveMaximum" if hi_x else "maximum"] = float(hi)
        rx = re.compile(rx_of(schema))
        for t in texts:
            v = Decimal(t)
            if t.startswith("-") and v == 0:
                continue  # -0 forms: canonical output may omit them
            want = (lo is None or (v > lo if lo_x else v >= lo)) and (
                hi is None or (v < hi if hi_x else v <= hi))
            assert (rx.fullmatch(t) is not None) == want, (schema, t)


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
