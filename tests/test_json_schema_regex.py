"""atom_stream.structured.json_schema: JSON Schema / choices -> full-match regexes.

Every regex is checked with Python's `re.fullmatch` (the dialect means the same there): valid
instances (compact, spaced, indented) match, invalid ones (wrong type, missing / extra keys,
values out of range, broken JSON) do not; unsupported keywords raise GrammarError; every
emitted regex stays in the dialect (no \\d \\w \\s, lookarounds, anchors, ...; parsed by the
engine's regex_parse). A seeded random generator checks many values of
a few schemas in json.dumps' compact, default and indent=2 forms. CPU only, about a second.
Strings, numbers, enum / const: test_json_schema_scalars.py; shared checks: json_schema_checks.
"""

from __future__ import annotations

import itertools
import json
import random
import re

import pytest
from json_schema_checks import assert_bad, assert_ok, check_dialect, forms, matches, rx_of

from atom_stream.structured.errors import GrammarError
from atom_stream.structured.json_schema import (
    WS_DEFAULT,
    choice_regex,
    json_value_regex,
    schema_to_regex,
)


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
    ("multipleOf", 2), ("patternProperties", {"a": {}}),
    ("if", {}), ("then", {}), ("else", {}), ("not", {}), ("dependentRequired", {}),
    ("dependentSchemas", {}), ("minProperties", 1), ("maxProperties", 1),
    ("propertyNames", {}), ("contains", {}), ("unevaluatedProperties", False),
    ("$dynamicRef", "#x"), ("nullable", True), ("maxlength", 3),
])
def test_unsupported_keywords_raise_naming_them(kw, val):
    with pytest.raises(GrammarError, match=re.escape(kw)):
        schema_to_regex({"type": "object", "properties": {"a": {"type": "string", kw: val}}})


def test_unique_items_is_accepted_not_enforced():
    # pydantic's set[int]: {"type": "array", "items": {...}, "uniqueItems": true}
    assert_ok({"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
              "[1, 2]", "[1, 1]", "[]")


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
