"""Regex-text building for json_schema (internal): the JSON grammar's pieces, string
formats, literal / class / group / alternation / repeat builders, and exact integer / number
range regexes.

Every builder returns a regex string in json_schema's output dialect (see its module
docstring), "" for the empty string, or None for "matches nothing" (an impossible branch,
e.g. recursion past max_depth); builders taking such values propagate None: `cat` of a None
part is None, `alt` drops None branches, `rep(None, 0, hi)` is "". A result is always a
well-formed regex that can be concatenated, repeated (through `group`) or alternated as is.
Code-point sets are regex_parse's Ranges (`normalize` / `complement` / `MAX_CP`).
"""

from __future__ import annotations

from decimal import Decimal

from atom_stream.structured.regex_parse import MAX_CP, complement, normalize

# Public constants, re-exported by json_schema.
WS_DEFAULT = r"[ \t\n\r]*"
MAX_STRING_REPEAT = 256  # a maxLength (or a pattern's repeat maximum) above this: unbounded
MAX_ITEMS_REPEAT = 64  # a maxItems above this is treated as unbounded
ANY_VALUE_DEPTH = 2  # nesting of "any JSON value" ({}, objects without properties, ...)

# A JSON string character: anything but `"`, `\` and U+0000-U+001F, or an escape (as in
# JSON's grammar, a \uXXXX escape may be a lone surrogate).
_HEX = "[0-9a-fA-F]"
_PLAIN_OR_SHORT = r'[^"\\\x00-\x1f]|\\["\\/bfnrt]'  # a plain character or a 2-char escape
CHAR = f"(?:{_PLAIN_OR_SHORT}|\\\\u{_HEX}{{4}})"
# The same, counted for minLength / maxLength (code points): an escaped surrogate only as a
# high + low pair, which is one character.
CHAR_COUNTED = (f"(?:{_PLAIN_OR_SHORT}|\\\\u(?:[0-9a-cA-Ce-fE-F]{_HEX}{{3}}|[dD][0-7]{_HEX}{{2}}"
                f"|[dD][89abAB]{_HEX}{{2}}\\\\u[dD][c-fC-F]{_HEX}{{2}}))")
STRING = '"' + CHAR + '*"'
INT = r"-?(?:0|[1-9][0-9]*)"
NUMBER = INT + r"(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
PRIMITIVE = f"(?:{STRING}|{NUMBER}|true|false|null)"

_DATE = r"[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])"
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,9})?"
_OFFSET = r"(?:Z|[+\-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_EMAIL_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?"
FORMATS = {
    # RFC 3339: the offset is required in date-time, optional in time.
    "date-time": f"{_DATE}T{_TIME}{_OFFSET}",
    "date": _DATE,
    "time": f"{_TIME}{_OFFSET}?",
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    "email": rf"{_EMAIL_ATOM}(?:\.{_EMAIL_ATOM})*@(?:{_LABEL}\.)+{_LABEL}",
}



# ------------------------------------------------------------------------ regex text helpers
_META = set("\\.[](){}*+?|^$")
_CTRL_ESC = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\f": "\\f", "\v": "\\v"}


def lit(c: str) -> str:
    """One character as a regex literal (metacharacters backslash-escaped; controls,
    DEL, non-printable BMP characters and surrogates as `\\xHH` / `\\uXXXX`)."""
    if c in _META:
        return "\\" + c
    if c in _CTRL_ESC:
        return _CTRL_ESC[c]
    n = ord(c)
    if n < 0x20 or n == 0x7F:
        return f"\\x{n:02x}"
    if 0x80 <= n <= 0xFFFF and (not c.isprintable() or 0xD800 <= n <= 0xDFFF):
        return f"\\u{n:04x}"
    return c


def lits(s: str) -> str:
    """The string `s` matched literally (every character through `lit`)."""
    return "".join(lit(c) for c in s)


def _cls_char(n: int) -> str:
    """Code point `n` as a character inside `[...]`."""
    c = chr(n)
    return "\\" + c if c in "\\]-[^" else lit(c)


def _atom_end(s: str, i: int) -> int:
    """The end of the regex atom (literal, escape, class or group) starting at s[i]."""
    c = s[i]
    if c == "\\":
        return i + {"x": 4, "u": 6, "U": 10}.get(s[i + 1], 2)
    if c == "[":
        j = i + 1
        if j < len(s) and s[j] == "^":
            j += 1
        if j < len(s) and s[j] == "]":
            j += 1
        while s[j] != "]":
            j = _atom_end(s, j) if s[j] == "\\" else j + 1
        return j + 1
    if c == "(":
        j = i + 1
        while s[j] != ")":
            j = _atom_end(s, j)
        return j + 1
    return i + 1


def _is_atom(s: str) -> bool:
    """Whether `s` (one of our regexes) is a single atom, so a quantifier may follow it."""
    return bool(s) and _atom_end(s, 0) == len(s)


def has_top_alt(s: str) -> bool:
    """Whether `s` (one of our regexes) has a `|` outside any group or class."""
    i = 0
    while i < len(s):
        if s[i] == "|":
            return True
        i = _atom_end(s, i)
    return False


def _top_branches(s: str) -> list[str]:
    """`s` (one of our regexes) split at its top-level `|`s."""
    out, start, i = [], 0, 0
    while i < len(s):
        if s[i] == "|":
            out.append(s[start:i])
            start = i + 1
            i += 1
        else:
            i = _atom_end(s, i)
    return [*out, s[start:]]


def group(s: str) -> str:
    """`s` as one atom: as is when it is one, else wrapped in `(?:...)`."""
    return s if _is_atom(s) else f"(?:{s})"


def cat(*parts: str | None) -> str | None:
    """The concatenation; None if any part is None. Callers group alternations first."""
    if any(p is None for p in parts):
        return None
    return "".join(parts)


def alt(branches) -> str | None:
    """Alternation of the possible branches (deduplicated; an empty branch makes the rest
    optional); None if none is possible."""
    seen: list[str] = []
    empty = False
    flat: list[str | None] = []
    for b in branches:  # splice nested alternations: (?:a|b)|c -> a|b|c
        if b and b.startswith("(?:") and _is_atom(b) and has_top_alt(b[3:-1]):
            flat.extend(_top_branches(b[3:-1]))
        else:
            flat.append(b)
    for b in flat:
        if b is None:
            continue
        if b == "":
            empty = True
        elif b not in seen:
            seen.append(b)
    if not seen:
        return "" if empty else None
    core = seen[0] if len(seen) == 1 else "(?:" + "|".join(seen) + ")"
    return rep(core, 0, 1) if empty else core


def rep(s: str | None, lo: int, hi: int | None) -> str | None:
    """`s` repeated lo..hi times (hi None: unbounded)."""
    if s is None:
        return "" if lo == 0 else None
    if s == "" or hi == 0:
        return ""
    if (lo, hi) == (1, 1):
        return s
    q = {(0, None): "*", (1, None): "+", (0, 1): "?"}.get((lo, hi))
    if q is None:
        q = f"{{{lo}}}" if lo == hi else f"{{{lo},}}" if hi is None else f"{{{lo},{hi}}}"
    return group(s) + q


# ------------------------------------------------------------------- code-point classes
_JSON_SPECIAL = ((0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C))  # escaped in a JSON string


def _has(ranges, n: int) -> bool:
    """Whether code point `n` is in `ranges`."""
    return any(lo <= n <= hi for lo, hi in ranges)


def char_class(ranges) -> str | None:
    """A regex for one character of `ranges` (surrogates ignored): a literal, `[...]` or
    `[^...]` (whichever fits: sets reaching U+10FFFF are written negated)."""
    ranges = normalize(ranges)
    if not ranges:
        return None
    if len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
        return lit(chr(ranges[0][0]))
    neg = ranges[-1][1] == MAX_CP
    items = complement(ranges) if neg else ranges
    if neg and not items:
        return "(?:.|\\n)"
    body = "".join(
        _cls_char(a) if a == b else _cls_char(a) + _cls_char(b) if b == a + 1
        else f"{_cls_char(a)}-{_cls_char(b)}" for a, b in items)
    return f"[^{body}]" if neg else f"[{body}]"


_SHORT_ESC = {0x08: "b", 0x09: "t", 0x0A: "n", 0x0C: "f", 0x0D: "r"}


def json_char_class(ranges) -> str | None:
    """A regex for the JSON encoding (json.dumps form, `\\uXXXX` hex in either case) of one
    character of `ranges`."""
    ranges = normalize(ranges)
    parts = [char_class(complement(complement(ranges) + _JSON_SPECIAL))]  # minus the specials
    if _has(ranges, 0x22):
        parts.append('\\\\"')
    if _has(ranges, 0x5C):
        parts.append("\\\\\\\\")
    ctrl = [n for n in range(0x20) if _has(ranges, n)]
    short = [_SHORT_ESC[n] for n in ctrl if n in _SHORT_ESC]
    if short:
        parts.append("\\\\" + (short[0] if len(short) == 1 else "[" + "".join(short) + "]"))
    long_ = [n for n in ctrl if n not in _SHORT_ESC]
    if long_:
        parts.append("\\\\u00" + _hex_pair(long_))
    return alt(parts)


def _hex_pair(codes: list[int]) -> str:
    """Two hex digits (either case) for the code points `codes` (all < 0x20)."""
    def low(nibbles):
        chars = []
        for v in nibbles:
            d = "0123456789abcdef"[v]
            chars += [ord(d)] + ([ord(d.upper())] if d.isalpha() else [])
        return char_class([(c, c) for c in chars])

    hi0 = [c & 15 for c in codes if c < 16]
    hi1 = [c & 15 for c in codes if c >= 16]
    if hi0 == hi1:
        return "[01]" + low(hi0)
    return alt([cat("0", low(hi0)) if hi0 else None, cat("1", low(hi1)) if hi1 else None])



# ------------------------------------------------------------------------- integer ranges
def _same_len(lo: str, hi: str) -> str:
    """Digit strings of len(lo) == len(hi) between lo and hi (leading zeros allowed)."""
    n = len(lo)
    if lo == hi:
        return lo
    if lo == "0" * n and hi == "9" * n:
        return rep("[0-9]", n, n)
    if n == 1:
        return f"[{lo}-{hi}]"
    if lo[0] == hi[0]:
        return lo[0] + _same_len(lo[1:], hi[1:])
    parts = []
    a0, b0 = int(lo[0]), int(hi[0])
    start, end, tail = a0, b0, None
    if lo[1:] != "0" * (n - 1):
        parts.append(lo[0] + _same_len(lo[1:], "9" * (n - 1)))
        start = a0 + 1
    if hi[1:] != "9" * (n - 1):
        tail = hi[0] + _same_len("0" * (n - 1), hi[1:])
        end = b0 - 1
    if start <= end:
        first = str(start) if start == end else f"[{start}-{end}]"
        parts.append(first + rep("[0-9]", n - 1, n - 1))
    parts.append(tail)
    return alt(parts)


def _nat_range(a: int, b: int | None) -> str | None:
    """Canonical decimal naturals in [a, b] (b None: unbounded)."""
    if b is not None and a > b:
        return None
    if b is None:
        if a <= 1:
            return "(?:0|[1-9][0-9]*)" if a == 0 else "[1-9][0-9]*"
        n = len(str(a))
        return alt([_nat_range(a, 10 ** n - 1), "[1-9]" + rep("[0-9]", n, None)])
    parts = []
    for n in range(len(str(a)), len(str(b)) + 1):
        lo = max(a, 10 ** (n - 1) if n > 1 else 0)
        hi = min(b, 10 ** n - 1)
        parts.append(_same_len(str(lo), str(hi)))
    return alt(parts)


def int_range(lo: int | None, hi: int | None) -> str | None:
    """Canonical JSON integers in [lo, hi] (None: unbounded); `-0` is not emitted."""
    if lo is None and hi is None:
        return INT
    parts = []
    if hi is None or hi >= 0:
        parts.append(_nat_range(max(lo, 0) if lo is not None else 0, hi))
    if lo is None or lo < 0:
        mag_lo = -hi if hi is not None and hi < 0 else 1
        parts.append(cat("-", group_or_none(_nat_range(mag_lo, None if lo is None else -lo))))
    return alt(parts)


def group_or_none(s: str | None) -> str | None:
    """`group(s)`, None staying None."""
    return None if s is None else group(s)


_FRAC_ANY = r"(?:\.[0-9]+)?"


def _split_decimal(v: Decimal) -> tuple[int, str]:
    """(integer part, fraction digits without trailing zeros) of a non-negative Decimal."""
    i = int(v)
    frac = format(v - i, "f")
    return i, frac.partition(".")[2].rstrip("0")


def _frac_at(lo: str, lo_x: bool, hi: str | None, hi_x: bool, i: int, tl: bool, th: bool,
             nz: bool) -> str | None:
    """The rest, from digit i on, of a fraction's digits s (0.s within the bounds: `_frac`);
    tl / th: s[:i] equals lo's / hi's first digits so far; nz: a non-zero digit must still
    come (a strict lower bound met with equality so far)."""
    if tl and i >= len(lo):  # s[:i] == lo: any rest is >= lo; > lo needs a non-zero digit
        tl, nz = False, nz or lo_x
    if th and i >= len(hi):  # s[:i] == hi: only zeros may follow, and s == hi
        return None if hi_x or nz else ("0*" if i else "0+")
    if not tl and not th:
        return "[0-9]*[1-9][0-9]*" if nz else ("[0-9]*" if i else "[0-9]+")
    parts = [] if tl or nz or not i else [""]  # s may end here (below hi, not tied to lo)
    dl, dh = (int(lo[i]) if tl else 0), (int(hi[i]) if th else 9)
    groups: dict[tuple, list[int]] = {}
    for c in range(dl, dh + 1):
        groups.setdefault((tl and c == dl, th and c == dh, nz and c == 0), []).append(c)
    for (ntl, nth, nnz), cs in groups.items():
        rest = _frac_at(lo, lo_x, hi, hi_x, i + 1, ntl, nth, nnz)
        if rest is not None:
            d = str(cs[0]) if len(cs) == 1 else f"[{cs[0]}-{cs[-1]}]"
            parts.append(d + (group(rest) if has_top_alt(rest) else rest))
    return alt(parts) if parts else None


def _frac(lo: str, lo_x: bool, hi: str | None, hi_x: bool, empty_ok: bool) -> str | None:
    """The optional fraction part (`.digits`) of a decimal whose fraction value 0.s lies from
    0.lo to 0.hi (digit strings without trailing zeros, "" = 0; hi None: below 1; *_x:
    exclusive); `empty_ok`: no fraction at all (the value 0) is allowed."""
    digits = _frac_at(lo, lo_x, hi, hi_x, 0, True, hi is not None, False)
    dotted = None if digits is None else r"\." + group_or_none(digits)
    if empty_ok:
        return f"(?:{dotted})?" if dotted else ""
    return dotted


def _magnitude(a: Decimal, a_excl: bool, b: Decimal | None, b_excl: bool) -> str | None:
    """Decimals (no sign, no exponent) whose value is in the interval from a >= 0 to b."""
    if b is not None and (a > b or a == b and (a_excl or b_excl)):
        return None
    A, fa = _split_decimal(a)
    B, fb = _split_decimal(b) if b is not None else (None, None)
    a_empty = not fa and not a_excl  # the integer A itself is above the lower bound
    if B == A:
        return cat(str(A), _frac(fa, a_excl, fb, b_excl, a_empty and (bool(fb) or not b_excl)))
    parts = [cat(str(A), _frac(fa, a_excl, None, False, a_empty))]
    if B is None or A + 1 <= B - 1:
        parts.append(cat(group_or_none(_nat_range(A + 1, None if B is None else B - 1)),
                         _FRAC_ANY))
    if B is not None:
        parts.append(cat(str(B), _frac("", False, fb, b_excl, bool(fb) or not b_excl)))
    return alt(parts)


def number_range(lo, lo_excl: bool, hi, hi_excl: bool) -> str | None:
    """JSON numbers (plain decimal notation) in the interval; lo / hi: Decimal or None."""
    parts = []
    if hi is None or hi > 0 or (hi == 0 and not hi_excl):
        a, ae = (lo, lo_excl) if lo is not None and lo >= 0 else (0, False)
        parts.append(_magnitude(a, ae, hi, hi_excl))
    if lo is None or lo < 0:
        a, ae = (-hi, hi_excl) if hi is not None and hi < 0 else (0, True)
        b, be = (None, False) if lo is None else (-lo, lo_excl)
        parts.append(cat("-", group_or_none(_magnitude(a, ae, b, be))))
    return alt(parts)
