"""Regular expression -> byte-level NFA (Thompson), the front half of guided decoding's DFAs.

Dialect: a subset of Python `re` with full-match semantics (the pattern must match the whole
generated text):
- literals; escapes of punctuation (`\\.`, `\\[`, `\\"`, ...), `\\n \\t \\r \\f \\v \\a \\0`,
  `\\xHH`, `\\uXXXX`, `\\UXXXXXXXX`; `\\d \\w \\s` and `\\D \\W \\S` in their ASCII meaning
  ([0-9], [A-Za-z0-9_], [ \\t\\n\\r\\f\\v]);
- classes `[...]` / `[^...]` with ranges, escapes and any Unicode character; `.` = any
  character but `\\n`;
- groups `(...)` / `(?:...)`, alternation `|`, quantifiers `* + ? {n} {n,} {,m} {n,m}` (a
  lazy `?` after one is accepted and ignored: it does not change the matched language);
- `^` at the very start and `$` at the very end (both implied anyway).
Refused with a GrammarError: backreferences, lookarounds, named groups, inline flags, `\\b`,
`\\A`, `\\Z`, `\\p{...}` and any other escape of a letter.

Characters are code points (surrogates excluded); the NFA reads their UTF-8 bytes, so a class
becomes an alternation of byte-range sequences (`utf8_sequences`).

    nfa = build_nfa(pattern)      # Nfa: .start, .accept, .eps[s], .edges[s] = [(lo, hi, t)]
"""

from __future__ import annotations

from dataclasses import dataclass, field

from atom_stream.structured.errors import GrammarError

MAX_CP = 0x10FFFF
_SURROGATES = (0xD800, 0xDFFF)
MAX_NFA_STATES = 200_000  # a pattern past this (huge counted repeats) is refused
MAX_REPEAT = 1000

Ranges = tuple[tuple[int, int], ...]  # sorted, disjoint, inclusive code-point ranges

_DIGIT: Ranges = ((0x30, 0x39),)
_WORD: Ranges = ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A))
_SPACE: Ranges = ((0x09, 0x0D), (0x20, 0x20))
_SIMPLE_ESCAPES = {"n": 0x0A, "t": 0x09, "r": 0x0D, "f": 0x0C, "v": 0x0B, "a": 0x07, "0": 0}


def normalize(ranges) -> Ranges:
    """Sort and merge (lo, hi) ranges; surrogates removed."""
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        for a, b in _minus_surrogates(lo, hi):
            if out and a <= out[-1][1] + 1:
                out[-1][1] = max(out[-1][1], b)
            else:
                out.append([a, b])
    return tuple((a, b) for a, b in out)


def _minus_surrogates(lo: int, hi: int):
    s0, s1 = _SURROGATES
    if hi < s0 or lo > s1:
        yield lo, hi
        return
    if lo < s0:
        yield lo, s0 - 1
    if hi > s1:
        yield s1 + 1, hi


def complement(ranges: Ranges) -> Ranges:
    out, nxt = [], 0
    for lo, hi in normalize(ranges):
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= MAX_CP:
        out.append((nxt, MAX_CP))
    return normalize(out)


_ANY_BUT_NL = complement(((0x0A, 0x0A),))


def utf8_sequences(ranges: Ranges) -> list[list[tuple[int, int]]]:
    """Byte-range sequences whose concatenations are exactly the UTF-8 encodings of the code
    points in `ranges` (the classic split: by encoded length, then so that every byte after
    the first differing one spans its whole continuation range)."""
    out: list[list[tuple[int, int]]] = []
    for lo, hi in normalize(ranges):
        for a, b in _split_by_length(lo, hi):
            _split(a, b, out)
    return out


def _split_by_length(lo: int, hi: int):
    for top in (0x7F, 0x7FF, 0xFFFF, MAX_CP):
        if lo > hi:
            return
        if lo <= top:
            yield lo, min(hi, top)
            lo = top + 1


def _split(lo: int, hi: int, out: list) -> None:
    a, b = chr(lo).encode(), chr(hi).encode()
    n = len(a)
    for i in range(1, n):
        m = (1 << (6 * i)) - 1
        if lo & ~m != hi & ~m:
            if lo & m:
                _split(lo, lo | m, out)
                _split((lo | m) + 1, hi, out)
                return
            if hi & m != m:
                _split(lo, (hi & ~m) - 1, out)
                _split(hi & ~m, hi, out)
                return
    out.append([(a[k], b[k]) for k in range(n)])


# ------------------------------------------------------------------------------------ parser
# AST: ("set", Ranges) | ("cat", [node]) | ("alt", [node]) | ("rep", node, lo, hi | None)
class _Parser:
    def __init__(self, pattern: str):
        self.p = pattern
        self.i = 0

    def error(self, what: str) -> GrammarError:
        return GrammarError(f"regex {self.p!r}: {what} at position {self.i}")

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def parse(self):
        node = self.alt()
        if self.i < len(self.p):
            raise self.error("unbalanced ')'")
        return node

    def alt(self):
        branches = [self.cat()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.cat())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def cat(self):
        items = []
        while self.i < len(self.p) and self.p[self.i] not in "|)":
            c = self.p[self.i]
            if c == "^" and self.i == 0:
                self.i += 1
                continue
            if c == "$" and self.i == len(self.p) - 1:
                self.i += 1
                continue
            items.append(self.quantified())
        return ("cat", items)

    def quantified(self):
        node = self.atom()
        quantified = False
        while True:
            c = self.peek()
            if c in ("*", "+", "?"):
                lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
                self.i += 1
            elif c == "{" and (count := self._count()) is not None:
                lo, hi = count
            else:
                return node
            if quantified:
                raise self.error("multiple repeat")
            quantified = True
            if self.peek() == "?":  # lazy: the same language
                self.i += 1
            node = ("rep", node, lo, hi)

    def _count(self) -> tuple[int, int | None] | None:
        """A `{n}`, `{n,}`, `{,m}`, `{n,m}` quantifier at self.i (consumed), else None (then
        `{` is a literal, as in Python)."""
        j = self.p.find("}", self.i)
        if j < 0:
            return None
        body = self.p[self.i + 1:j]
        lo_s, comma, hi_s = body.partition(",")
        if not (lo_s.isdigit() or (comma and not lo_s)) or (hi_s and not hi_s.isdigit()):
            return None
        if not comma and not lo_s:
            return None
        lo = int(lo_s) if lo_s else 0
        hi = (int(hi_s) if hi_s else None) if comma else lo
        if hi is not None and hi < lo:
            raise self.error("min repeat greater than max repeat")
        if max(lo, hi or 0) > MAX_REPEAT:
            raise self.error(f"a repeat count above {MAX_REPEAT}")
        self.i = j + 1
        return lo, hi

    def atom(self):
        c = self.p[self.i]
        if c == "(":
            self.i += 1
            if self.peek() == "?":
                if self.p.startswith("?:", self.i):
                    self.i += 2
                else:
                    raise self.error("lookarounds, named groups and inline flags are not "
                                     "supported (only '(?:...)')")
            node = self.alt()
            if self.peek() != ")":
                raise self.error("missing ')'")
            self.i += 1
            return node
        if c in "*+?":
            raise self.error("nothing to repeat")
        self.i += 1
        if c == "[":
            return ("set", self._class())
        if c == ".":
            return ("set", _ANY_BUT_NL)
        if c == "\\":
            return ("set", self._escape(in_class=False))
        if c in "^$":
            raise self.error(f"'{c}' is only supported at the pattern's start / end")
        return ("set", normalize(((ord(c), ord(c)),)))

    def _escape(self, in_class: bool) -> Ranges:
        """The escape after a backslash (consumed), as code-point ranges."""
        v = self._escape_code(in_class)
        return v if isinstance(v, tuple) else normalize(((v, v),))

    def _escape_code(self, in_class: bool) -> int | Ranges:
        """The escape after a backslash (consumed): one code point (surrogates too, for a
        range's ends), or the ranges of a class escape (\\d ...)."""
        if self.i >= len(self.p):
            raise self.error("a trailing backslash")
        c = self.p[self.i]
        self.i += 1
        sets = {"d": _DIGIT, "w": _WORD, "s": _SPACE}
        if c in sets:
            return sets[c]
        if c.lower() in sets:
            return complement(sets[c.lower()])
        if c == "0":  # Python: \0 and up to two more octal digits
            j = self.i
            while j < len(self.p) and j < self.i + 2 and self.p[j] in "01234567":
                j += 1
            v, self.i = int("0" + self.p[self.i:j], 8), j
            return v
        if c in _SIMPLE_ESCAPES:
            return _SIMPLE_ESCAPES[c]
        if c in "xuU":
            n = {"x": 2, "u": 4, "U": 8}[c]
            digits = self.p[self.i:self.i + n]
            if len(digits) != n or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.error(f"a bad \\{c} escape")
            self.i += n
            v = int(digits, 16)
            if v > MAX_CP:
                raise self.error("a code point above U+10FFFF")
            return v
        if c == "b" and in_class:
            return 0x08
        if c.isascii() and c.isalnum():
            raise self.error(f"the escape \\{c} is not supported")
        return ord(c)

    def _class(self) -> Ranges:
        negate = self.peek() == "^"
        if negate:
            self.i += 1
        ranges: list[tuple[int, int]] = []
        first = True
        while True:
            if self.i >= len(self.p):
                raise self.error("unterminated character class")
            if self.p[self.i] == "]" and not first:
                self.i += 1
                break
            first = False
            lo = self._class_atom()
            is_range = (self.peek() == "-" and self.i + 1 < len(self.p)
                        and self.p[self.i + 1] != "]")
            if not is_range:
                ranges.extend(lo if isinstance(lo, tuple) else ((lo, lo),))
                continue
            self.i += 1
            hi = self._class_atom()
            if isinstance(lo, tuple) or isinstance(hi, tuple):
                raise self.error("a bad character range (a class escape as an end)")
            if hi < lo:
                raise self.error("a bad character range (reversed)")
            ranges.append((lo, hi))
        out = normalize(ranges)  # surrogates leave only here: [\\ud800-\\udfff] is empty
        return complement(out) if negate else out

    def _class_atom(self) -> int | Ranges:
        c = self.p[self.i]
        self.i += 1
        if c == "\\":
            return self._escape_code(in_class=True)
        return ord(c)


def parse(pattern: str):
    """The pattern's AST (see the comment above _Parser); GrammarError if unsupported."""
    if not isinstance(pattern, str):
        raise GrammarError(f"regex must be a string, got {type(pattern).__name__}")
    return _Parser(pattern).parse()


# ---------------------------------------------------------------------------------------- NFA
@dataclass
class Nfa:
    """States 0..n-1; `eps[s]`: epsilon successors; `edges[s]`: (lo, hi, target) byte ranges."""

    eps: list[list[int]] = field(default_factory=list)
    edges: list[list[tuple[int, int, int]]] = field(default_factory=list)
    start: int = 0
    accept: int = 0

    def new(self) -> int:
        if len(self.eps) >= MAX_NFA_STATES:
            raise GrammarError(f"the pattern is too large (over {MAX_NFA_STATES} NFA states); "
                               f"use smaller repeat counts")
        self.eps.append([])
        self.edges.append([])
        return len(self.eps) - 1


def build_nfa(pattern: str) -> Nfa:
    """The Thompson NFA over UTF-8 bytes of `pattern` (full-match)."""
    nfa = Nfa()
    s, e = _frag(nfa, parse(pattern))
    nfa.start, nfa.accept = s, e
    return nfa


def _frag(nfa: Nfa, node) -> tuple[int, int]:
    kind = node[0]
    if kind == "set":
        s, e = nfa.new(), nfa.new()
        for seq in utf8_sequences(node[1]):
            cur = s
            for k, (lo, hi) in enumerate(seq):
                nxt = e if k == len(seq) - 1 else nfa.new()
                nfa.edges[cur].append((lo, hi, nxt))
                cur = nxt
        return s, e
    if kind == "cat":
        s = cur = nfa.new()
        for item in node[1]:
            a, b = _frag(nfa, item)
            nfa.eps[cur].append(a)
            cur = b
        return s, cur
    if kind == "alt":
        s, e = nfa.new(), nfa.new()
        for item in node[1]:
            a, b = _frag(nfa, item)
            nfa.eps[s].append(a)
            nfa.eps[b].append(e)
        return s, e
    _, sub, lo, hi = node
    s = cur = nfa.new()
    for _ in range(lo):
        a, b = _frag(nfa, sub)
        nfa.eps[cur].append(a)
        cur = b
    if hi is None:
        loop = nfa.new()
        nfa.eps[cur].append(loop)
        a, b = _frag(nfa, sub)
        nfa.eps[loop].append(a)
        nfa.eps[b].append(loop)
        return s, loop
    end = nfa.new()
    nfa.eps[cur].append(end)
    for _ in range(hi - lo):
        a, b = _frag(nfa, sub)
        nfa.eps[cur].append(a)
        nfa.eps[b].append(end)
        cur = b
    return s, end
