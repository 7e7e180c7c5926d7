"""JSON Schema keywords for json_schema (internal): the supported vocabulary, readers of
keyword values (each raising GrammarError that names the keyword on a bad value), the merge
of sibling keywords into a subschema, and local `$ref` resolution.
"""

from __future__ import annotations

import math
from urllib.parse import unquote

from atom_stream.structured.errors import GrammarError

# Keywords that do not constrain the value (ignored; so are vendor keywords `x-...`).
ANNOTATIONS = frozenset({
    "title", "description", "examples", "example", "default", "$schema", "$id", "$comment",
    "deprecated", "readOnly", "writeOnly", "$defs", "definitions", "$anchor",
    "$dynamicAnchor", "$vocabulary", "contentMediaType", "contentEncoding", "discriminator",
})
_SUPPORTED = frozenset({
    "type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref",
    "properties", "required", "additionalProperties",
    "items", "prefixItems", "additionalItems", "minItems", "maxItems",
    "uniqueItems",  # accepted, not enforced (see json_schema's docstring)
    "minLength", "maxLength", "pattern", "format",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
})
# Keywords that imply a type when `type` is absent.
OBJ_KW = ("properties", "required", "additionalProperties")
ARR_KW = ("items", "prefixItems", "additionalItems", "minItems", "maxItems")
STR_KW = ("minLength", "maxLength", "pattern", "format")
NUM_KW = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_TYPES = ("string", "integer", "number", "boolean", "null", "object", "array")  # `type` names


def count_kw(schema: dict, key: str) -> int | None:
    """A non-negative integer keyword (None when absent)."""
    v = schema.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or v != int(v):
        raise GrammarError(f"'{key}' must be a non-negative integer, got {v!r}")
    return int(v)


def _num_kw(schema: dict, key: str):
    """A finite number keyword (None when absent; a draft-4 boolean for exclusive*)."""
    v = schema.get(key)
    if v is None or isinstance(v, bool) and key.startswith("exclusive"):
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise GrammarError(f"'{key}' must be a finite number, got {v!r}")
    return v


def bounds(schema: dict):
    """((lo, lo_excl), (hi, hi_excl)): the tightest numeric bounds (values int / float or
    None), reading draft-4 boolean exclusiveMinimum / exclusiveMaximum too."""
    mn, mx = _num_kw(schema, "minimum"), _num_kw(schema, "maximum")
    emn, emx = _num_kw(schema, "exclusiveMinimum"), _num_kw(schema, "exclusiveMaximum")
    lows, highs = [], []
    if mn is not None:
        lows.append((mn, emn is True))
    if emn is not None and not isinstance(emn, bool):
        lows.append((emn, True))
    if mx is not None:
        highs.append((mx, emx is True))
    if emx is not None and not isinstance(emx, bool):
        highs.append((emx, True))
    lo = max(lows, key=lambda t: (t[0], t[1])) if lows else (None, False)
    hi = min(highs, key=lambda t: (t[0], not t[1])) if highs else (None, False)
    return lo, hi


def check_keys(schema: dict) -> None:
    """GrammarError unless every key of `schema` is supported, an annotation or `x-...`."""
    for key in schema:
        if not isinstance(key, str):
            raise GrammarError(f"schema keys must be strings, got {key!r}")
        if key in _SUPPORTED or key in ANNOTATIONS or key.startswith("x-"):
            continue
        raise GrammarError(f"JSON Schema keyword '{key}' is not supported by guided decoding")


def schema_types(schema: dict) -> list[str] | None:
    """The `type` keyword as a list (None when absent); GrammarError on bad values."""
    t = schema.get("type")
    if t is None:
        return None
    types = [t] if isinstance(t, str) else t
    if not isinstance(types, list) or not types:
        raise GrammarError(f"'type' must be a type name or a non-empty list, got {t!r}")
    for x in types:
        if x not in _TYPES:
            raise GrammarError(f"unsupported 'type' {x!r} (supported: {', '.join(_TYPES)})")
    return list(dict.fromkeys(types))


def merge(a: dict, b: dict) -> dict | None:
    """A schema for the intersection of `a` and `b` where that is a plain merge: `type`
    intersected, `required` / `properties` united; None when the types are disjoint;
    GrammarError on any other key with different values on both sides."""
    out = dict(a)
    for k, v in b.items():
        if k in ANNOTATIONS or k.startswith("x-"):
            continue
        if k not in out or out[k] == v:
            out[k] = v
        elif k == "type":
            ta, tb = schema_types(out), schema_types(b)
            both = [t for t in ta if t in tb or (t == "integer" and "number" in tb)]
            both += [t for t in tb if t == "integer" and "number" in ta and t not in both]
            if not both:
                return None
            out["type"] = both
        elif k == "required":
            out[k] = list(dict.fromkeys(list(out[k]) + list(v)))
        elif k == "properties" and isinstance(v, dict) and isinstance(out[k], dict):
            merged = dict(out[k])
            for name, sub in v.items():
                if name in merged and merged[name] != sub:
                    raise GrammarError(f"cannot combine two different schemas for property "
                                       f"{name!r} (allOf / $ref / anyOf siblings)")
                merged[name] = sub
            out[k] = merged
        else:
            raise GrammarError(f"cannot combine '{k}' of a subschema with a different '{k}' "
                               f"beside it (allOf / $ref / anyOf siblings)")
    return out


def resolve_pointer(root, ref) -> object:
    """The subschema of `root` at the local `$ref` `ref` (a JSON pointer after `#`, percent-
    and ~-unescaped); GrammarError for a remote ref, an anchor, a dangling pointer, or a
    target that is not a schema (object / boolean)."""
    if not isinstance(ref, str) or not ref.startswith("#"):
        raise GrammarError(f"only local '$ref's ('#/$defs/...') are supported, got {ref!r}")
    frag = unquote(ref[1:])
    if frag and not frag.startswith("/"):
        raise GrammarError(f"'$ref' {ref!r}: anchors are not supported, use a JSON pointer")
    node = root
    for part in frag.split("/")[1:] if frag else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise GrammarError(f"'$ref' {ref!r} does not resolve")
    if not isinstance(node, (dict, bool)):
        raise GrammarError(f"'$ref' {ref!r} does not point to a schema")
    return node
