"""The JSON Schema compiler behind json_schema.schema_to_regex (internal): schema dict ->
regex text, in the dialect and with the semantics stated in json_schema's module docstring.
"""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal
from functools import lru_cache

from atom_stream.structured.errors import GrammarError
from atom_stream.structured.json_keywords import (
    ANNOTATIONS,
    ARR_KW,
    NUM_KW,
    OBJ_KW,
    STR_KW,
    bounds,
    check_keys,
    count_kw,
    merge,
    resolve_pointer,
    schema_types,
)
from atom_stream.structured.json_pattern import pattern_content
from atom_stream.structured.json_regex import (
    CHAR_COUNTED,
    FORMATS,
    INT,
    MAX_ITEMS_REPEAT,
    MAX_STRING_REPEAT,
    NUMBER,
    PRIMITIVE,
    STRING,
    alt,
    cat,
    int_range,
    lits,
    number_range,
    rep,
)


@lru_cache(maxsize=64)
def any_value_regex(depth: int, ws: str) -> str:
    """Any JSON value nested at most `depth` levels of objects / arrays, `ws` between tokens
    (depth 0: primitives only)."""
    if depth <= 0:
        return PRIMITIVE
    return f"(?:{PRIMITIVE[3:-1]}|{_any_object(depth, ws)}|{_any_array(depth, ws)})"


def _container(open_: str, core: str | None, nullable: bool, close: str, ws: str):
    """open, optional whitespace, the content (optional when nullable), close."""
    if core is None or core == "":
        return None if not nullable else open_ + ws + close
    inner = core + ws
    return open_ + ws + (rep(inner, 0, 1) if nullable else inner) + close


def _list_of(item: str | None, ws: str, lo: int = 0, hi: int | None = None):
    """(core, nullable): lo..hi comma-separated `item`s (core: the non-empty form)."""
    if item is None or hi == 0:
        return (None if lo else ""), lo == 0
    sep = ws + "," + ws
    more = rep(sep + item, max(lo - 1, 0), None if hi is None else hi - 1)
    return item + more, lo == 0


def _any_object(depth: int, ws: str) -> str:
    """Any JSON object whose values nest at most depth - 1 levels."""
    member = STRING + ws + ":" + ws + any_value_regex(depth - 1, ws)
    return _container("\\{", *_list_of(member, ws), "\\}", ws)


def _any_array(depth: int, ws: str) -> str:
    """Any JSON array whose elements nest at most depth - 1 levels."""
    return _container("\\[", *_list_of(any_value_regex(depth - 1, ws), ws), "\\]", ws)


def _decimal(v) -> Decimal | None:
    """A bound as an exact Decimal (a float by its shortest repr: 0.1 -> 0.1)."""
    if v is None:
        return None
    d = Decimal(str(v)) if isinstance(v, float) else Decimal(v)
    if not d.is_finite() or abs(d) >= 10 ** 30 or d.normalize().as_tuple().exponent < -30:
        raise GrammarError(f"a numeric bound {v!r} is outside what is supported (|v| < 1e30, "
                           f"at most 30 decimals)")
    return d


class Compiler:
    """Compiles (sub)schemas of `root` to regexes (`build`), `ws` between tokens.

    Every method returns a regex, or None when no finite instance remains (a `$ref` expanded
    inside itself more than `max_depth` times, disjoint types, ...); GrammarError for
    unsupported keywords / bad values. `any_depth`: the nesting of "any JSON value" parts.
    One instance per schema_to_regex call (it tracks the `$ref`s being expanded).
    """

    def __init__(self, root, ws: str, max_depth: int, any_depth: int):
        self.root, self.ws, self.max_depth, self.any_depth = root, ws, max_depth, any_depth
        self.active: dict[str, int] = {}  # $ref -> expansions in progress

    @property
    def sep(self) -> str:
        return self.ws + "," + self.ws

    def any_value(self, nested: bool = False) -> str:
        return any_value_regex(max(self.any_depth - 1, 0) if nested else self.any_depth, self.ws)

    # -- entry
    def build(self, schema) -> str | None:
        if schema is True:
            return self.any_value()
        if schema is False:
            return None
        if not isinstance(schema, dict):
            raise GrammarError(f"a schema must be an object or a boolean, got {schema!r}")
        check_keys(schema)
        if "$ref" in schema:
            return self.ref(schema)
        if "allOf" in schema:
            branches = schema["allOf"]
            if not isinstance(branches, list) or len(branches) != 1:
                raise GrammarError("'allOf' is only supported with exactly one subschema")
            rest = {k: v for k, v in schema.items() if k != "allOf"}
            return self.with_siblings(rest, branches[0])
        for key in ("anyOf", "oneOf"):
            if key in schema:
                if "anyOf" in schema and "oneOf" in schema:
                    raise GrammarError("'anyOf' together with 'oneOf' is not supported")
                branches = schema[key]
                if not isinstance(branches, list) or not branches:
                    raise GrammarError(f"'{key}' must be a non-empty list of schemas")
                rest = {k: v for k, v in schema.items() if k != key}
                return alt([self.with_siblings(rest, b) for b in branches])
        if "enum" in schema or "const" in schema:
            return self.enum(schema)
        return self.typed(schema)

    def with_siblings(self, siblings: dict, sub) -> str | None:
        """The intersection of `sub` with the keywords beside the combinator."""
        constraining = {k: v for k, v in siblings.items()
                        if k not in ANNOTATIONS and not k.startswith("x-")}
        if not constraining:
            return self.build(sub)
        if sub is False:
            return None
        if sub is True:
            return self.build(constraining)
        if not isinstance(sub, dict):
            raise GrammarError(f"a schema must be an object or a boolean, got {sub!r}")
        if "$ref" in sub:  # resolve first so the merge sees its keywords
            return self.ref(sub, extra=constraining)
        merged = merge(constraining, sub)
        return None if merged is None else self.build(merged)

    def ref(self, schema: dict, extra: dict | None = None) -> str | None:
        ref = schema["$ref"]
        target = resolve_pointer(self.root, ref)
        if self.active.get(ref, 0) >= self.max_depth:
            return None
        siblings = {k: v for k, v in schema.items() if k != "$ref"}
        if extra:
            merged = merge(extra, siblings)
            if merged is None:
                return None
            siblings = merged
        self.active[ref] = self.active.get(ref, 0) + 1
        try:
            return self.with_siblings(siblings, target)
        finally:
            self.active[ref] -= 1

    # -- enum / const
    def enum(self, schema: dict) -> str | None:
        if "const" in schema:
            values = [schema["const"]]
            if "enum" in schema and schema["const"] not in schema["enum"]:
                return None
        else:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise GrammarError(f"'enum' must be a non-empty list, got {values!r}")
        rest = {k: v for k, v in schema.items() if k not in ("enum", "const")
                and k not in ANNOTATIONS and not k.startswith("x-")}
        checks: dict[str, object] = {}
        out = []
        for v in values:
            if rest and not isinstance(v, (dict, list)):
                vtype = ("null" if v is None else "boolean" if isinstance(v, bool) else
                         "number" if isinstance(v, (int, float)) else "string")
                if vtype not in checks:
                    checks[vtype] = self.enum_check(rest, vtype)
                text = json.dumps(v, ensure_ascii=False, separators=(",", ":"))
                if not checks[vtype](text):
                    continue
            out.append(self.literal(v))
        return alt(out)

    def enum_check(self, rest: dict, vtype: str):
        """fullmatch of the compact JSON texts of type `vtype` valid under `rest` (the
        schema's keywords besides enum / const; without a `type`, only `vtype`'s keywords
        apply, as in JSON Schema)."""
        sub = Compiler(self.root, "", self.max_depth, self.any_depth)
        sub.active = dict(self.active)
        rx = sub.typed(rest if "type" in rest else {**rest, "type": vtype})
        return (lambda text: False) if rx is None else re.compile(rx).fullmatch

    def literal(self, v) -> str:
        """The JSON value `v`, keys in order, `ws` between tokens."""
        if isinstance(v, dict):
            members = [self.literal(str(k)) + self.ws + ":" + self.ws + self.literal(x)
                       for k, x in v.items()]
            core = self.sep.join(members)
            return _container("\\{", core, False, "\\}", self.ws) if core else \
                "\\{" + self.ws + "\\}"
        if isinstance(v, list):
            core = self.sep.join(self.literal(x) for x in v)
            return _container("\\[", core, False, "\\]", self.ws) if core else \
                "\\[" + self.ws + "\\]"
        try:
            forms = {json.dumps(v, ensure_ascii=False, allow_nan=False),
                     json.dumps(v, allow_nan=False)}
        except (TypeError, ValueError) as e:
            raise GrammarError(f"enum / const value {v!r} is not JSON ({e})") from None
        return alt([lits(f) for f in sorted(forms)])

    # -- types
    def typed(self, schema: dict) -> str | None:
        types = schema_types(schema)
        if types is None:
            fams = [("object", OBJ_KW), ("array", ARR_KW), ("string", STR_KW),
                    ("number", NUM_KW)]
            types = [t for t, kws in fams if any(k in schema for k in kws)]
            if not types:
                return self.any_value()
        if "integer" in types and "number" in types:
            types = [t for t in types if t != "integer"]
        return alt([getattr(self, "t_" + t)(schema) for t in types])

    def t_null(self, schema: dict) -> str:
        return "null"

    def t_boolean(self, schema: dict) -> str:
        return "(?:true|false)"

    def t_integer(self, schema: dict) -> str | None:
        (lo, lo_x), (hi, hi_x) = bounds(schema)
        if lo is None and hi is None:
            return INT
        ilo = None if lo is None else math.floor(lo) + 1 if lo_x else math.ceil(lo)
        ihi = None if hi is None else math.ceil(hi) - 1 if hi_x else math.floor(hi)
        if ilo is not None and ihi is not None and ilo > ihi:
            raise GrammarError(f"no integer satisfies the bounds of {schema!r}")
        return int_range(ilo, ihi)

    def t_number(self, schema: dict) -> str | None:
        (lo, lo_x), (hi, hi_x) = bounds(schema)
        if lo is None and hi is None:
            return NUMBER
        lo, hi = _decimal(lo), _decimal(hi)
        if lo is not None and hi is not None and (lo > hi or lo == hi and (lo_x or hi_x)):
            raise GrammarError(f"no number satisfies the bounds of {schema!r}")
        return number_range(lo, lo_x, hi, hi_x)

    def t_string(self, schema: dict) -> str | None:
        lo, hi = count_kw(schema, "minLength") or 0, count_kw(schema, "maxLength")
        fmt, pattern = schema.get("format"), schema.get("pattern")
        if fmt not in FORMATS:
            fmt = None  # an annotation (JSON Schema's default for formats not enforced here)
        has_len = "minLength" in schema or "maxLength" in schema
        if fmt is not None or pattern is not None:
            if (fmt is not None and pattern is not None) or has_len:
                raise GrammarError("'pattern' / 'format' cannot be combined with each other or "
                                   "with 'minLength' / 'maxLength'")
            if pattern is not None:
                return cat('"', pattern_content(pattern), '"')
            return '"' + FORMATS[fmt] + '"'
        if hi is not None and lo > hi:
            raise GrammarError(f"'minLength' {lo} is greater than 'maxLength' {hi}")
        if lo > MAX_STRING_REPEAT:
            raise GrammarError(f"'minLength' above {MAX_STRING_REPEAT} is not supported")
        if hi is not None and hi > MAX_STRING_REPEAT:
            hi = None
        if lo == 0 and hi is None:
            return STRING
        return '"' + rep(CHAR_COUNTED, lo, hi) + '"'

    def t_object(self, schema: dict) -> str | None:
        props = schema.get("properties", {})
        required = schema.get("required", [])
        ap = schema.get("additionalProperties", None)
        if not isinstance(props, dict):
            raise GrammarError(f"'properties' must be an object, got {props!r}")
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise GrammarError(f"'required' must be a list of strings, got {required!r}")
        required = list(dict.fromkeys(required))
        if ap is not None and not isinstance(ap, (bool, dict)):
            raise GrammarError(f"'additionalProperties' must be a schema, got {ap!r}")
        ws = self.ws
        # `properties` present (even `{}`: a function without parameters) and no
        # additionalProperties: the listed keys only, as xgrammar's strict mode
        listed = "properties" in schema
        if (ap is False or (ap is None and listed)) and not props and not required:
            return "\\{" + ws + "\\}"
        extra_value = self.build(True if ap is None else ap)  # like `{}`: any_depth
        allow_extra = ap is not False and (ap is not None or not listed)
        if not props and not required:
            if ap is None or ap is True or ap == {}:
                return _any_object(max(self.any_depth, 1), ws)
            member = cat(STRING, ws + ":" + ws, extra_value)
            return _container("\\{", *_list_of(member, ws), "\\}", ws)
        items: list[tuple[str, bool]] = []
        for name, sub in props.items():
            key = self.literal(name) + ws + ":" + ws
            value = self.build(sub)
            if value is None:
                if name in required:
                    return None
                continue
            items.append((key + value, name in required))
        for name in required:
            if name not in props:
                if ap is False:
                    raise GrammarError(f"required property {name!r} is not in 'properties' and "
                                       f"'additionalProperties' is false")
                if extra_value is None:
                    return None
                items.append((self.literal(name) + ws + ":" + ws + extra_value, True))
        if allow_extra and extra_value is not None:
            member = STRING + ws + ":" + ws + extra_value
            items.append((member + rep(self.sep + member, 0, None), False))
        core, nullable = self.sequence(items)
        return _container("\\{", core, nullable, "\\}", ws)

    def sequence(self, items: list[tuple[str, bool]]) -> tuple[str, bool]:
        """(core, nullable): the items in order, comma-separated, each optional unless marked
        required; every item's regex appears at most twice."""
        if not items:
            return "", True
        sep = self.sep
        req = [i for i, (_, r) in enumerate(items) if r]
        if req:
            f = req[0]
            out = "".join(rep(x + sep, 0, 1) for x, _ in items[:f]) + items[f][0]
            for x, r in items[f + 1:]:
                out += sep + x if r else rep(sep + x, 0, 1)
            return out, False
        # X_i = p_i | (p_i sep)? X_{i+1}: any non-empty ordered subsequence
        x = items[-1][0]
        for p, _ in reversed(items[:-1]):
            x = f"(?:{p}|{rep(p + sep, 0, 1)}{x})"
        return x, True

    def t_array(self, schema: dict) -> str | None:
        prefix = schema.get("prefixItems")
        items = schema.get("items", True)
        if isinstance(items, list):  # drafts 4-7 tuple form
            if prefix is not None:
                raise GrammarError("'items' as a list cannot be combined with 'prefixItems'")
            prefix, items = items, schema.get("additionalItems", True)
        elif "additionalItems" in schema:
            raise GrammarError("'additionalItems' is only supported with 'items' as a list")
        if prefix is not None and not isinstance(prefix, list):
            raise GrammarError(f"'prefixItems' must be a list of schemas, got {prefix!r}")
        lo, hi = count_kw(schema, "minItems") or 0, count_kw(schema, "maxItems")
        if hi is not None and lo > hi:
            raise GrammarError(f"'minItems' {lo} is greater than 'maxItems' {hi}")
        if lo > MAX_ITEMS_REPEAT:
            raise GrammarError(f"'minItems' above {MAX_ITEMS_REPEAT} is not supported")
        if hi is not None and hi > MAX_ITEMS_REPEAT + len(prefix or ()):
            hi = None
        elems = [self.build(s) for s in prefix or ()]
        if items is True or items == {}:
            rest = self.any_value(nested=True)
        else:
            rest = self.build(items)
        k = len(elems)
        sep = self.sep

        def tail(i: int) -> str | None:  # after i elements
            if hi is not None and i >= hi:
                return ""
            if i < k:
                nxt = cat(sep, elems[i], tail(i + 1))
                return rep(nxt, 0, 1) if i >= lo else nxt
            lo_r = max(0, lo - i)
            return rep(None if rest is None else sep + rest, lo_r,
                        None if hi is None else hi - i)

        first = elems[0] if k else rest
        core = cat(first, tail(1)) if hi != 0 else None
        if core is None and lo > 0:
            return None
        return _container("\\[", core, lo == 0, "\\]", self.ws)
