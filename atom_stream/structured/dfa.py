"""Byte-level DFAs built lazily, row by row, for guided decoding.

A `LazyDFA` interns its states as ints: 0 is the dead state (every byte leads back to it, never
accepting); `start` is the initial state. `trans[s, b]` is the successor of state s on byte b
once row s is expanded (`ensure`); rows are computed on first use by the subclass's
`_successors(key)` (256 keys, None = dead) and cached, so only the states a generation (or a
vocabulary walk) actually reaches are ever built.

- `RegexDFA(pattern)`: the subset construction over regex_parse's NFA (full-match).
- `JsonDFA(max_depth, whitespace)`: any JSON object or array (xgrammar's built-in JSON grammar,
  what vLLM serves for response_format json_object), nesting at most max_depth levels, with
  `whitespace` ("any": [ \\t\\n\\r]* between tokens; "none": no whitespace) and exact
  UTF-8 validation inside strings.
"""

from __future__ import annotations

import threading

import numpy as np

from atom_stream.structured.regex_parse import build_nfa

DEAD = 0
# past it a grammar's new states are dead (its requests then end): bounds one DFA's table to
# ~20 MB (adversarial patterns such as (a|b)*a(a|b){20} have exponentially many states)
MAX_DFA_STATES = 20_000


class LazyDFA:
    # whether a compiler retires this DFA once `worn` (JsonDFA: see there)
    retires = False

    def __init__(self) -> None:
        self._ids: dict = {}
        self._keys: list = []
        self.trans = np.zeros((64, 256), dtype=np.int32)
        self.accept = np.zeros(64, dtype=bool)
        self.expanded = np.zeros(64, dtype=bool)
        self._lock = threading.Lock()  # expansion may run on several engine threads (DP)
        self._intern(None)  # state 0: dead; its row is all 0 (itself)
        self.expanded[DEAD] = True
        self.start = self._intern(self._start_key())

    # subclass API
    def _start_key(self):
        raise NotImplementedError

    def _successors(self, key) -> list:
        """The 256 successor keys of a live state's key (None: dead)."""
        raise NotImplementedError

    def _accepts(self, key) -> bool:
        raise NotImplementedError

    # ---------------------------------------------------------------------------------
    @property
    def num_states(self) -> int:
        return len(self._keys)

    @property
    def worn(self) -> bool:
        """A retiring DFA past half of MAX_DFA_STATES: a compiler then builds a fresh one for
        new requests (those in flight keep this one, with room left)."""
        return self.retires and len(self._keys) >= MAX_DFA_STATES // 2

    def _intern(self, key) -> int:
        if key is None and self._keys:
            return DEAD
        s = self._ids.get(key)
        if s is not None:
            return s
        s = len(self._keys)
        if s >= MAX_DFA_STATES:
            return DEAD
        if s >= len(self.accept):
            n = 2 * len(self.accept)
            self.trans = np.concatenate([self.trans, np.zeros_like(self.trans)])
            self.accept = np.concatenate([self.accept, np.zeros(n - len(self.accept), bool)])
            self.expanded = np.concatenate([self.expanded,
                                            np.zeros(n - len(self.expanded), bool)])
        self._ids[key] = s
        self._keys.append(key)
        self.accept[s] = key is not None and self._accepts(key)
        return s

    def ensure(self, states: np.ndarray) -> None:
        """Expand the rows of `states` (any int array) that are not built yet."""
        if self.expanded[states].all():
            return
        with self._lock:
            for s in np.unique(states[~self.expanded[states]]).tolist():
                if self.expanded[s]:
                    continue
                row = [self._intern(k) for k in self._successors(self._keys[s])]
                self.trans[s] = row  # after interning: the table may have been reallocated
                self.expanded[s] = True

    def step(self, s: int, byte: int) -> int:
        if not self.expanded[s]:
            self.ensure(np.array([s]))
        return int(self.trans[s, byte])

    def walk(self, s: int, data: bytes) -> int:
        """The state after `data` from s (DEAD once it dies)."""
        for b in data:
            s = self.step(s, b)
            if s == DEAD:
                return DEAD
        return s

    def matches(self, data: bytes) -> bool:
        s = self.walk(self.start, data)  # first: walking may reallocate `accept`
        return bool(self.accept[s])

    def is_final(self, s: int) -> bool:
        """Accepting with no live continuation: only the end of the text may follow."""
        self.ensure(np.array([s]))
        return bool(self.accept[s]) and not self.trans[s].any()


class RegexDFA(LazyDFA):
    """The DFA of a regex_parse pattern; a state's key is its set of NFA states (closed under
    epsilon moves)."""

    def __init__(self, pattern: str):
        self.pattern = pattern
        self.nfa = build_nfa(pattern)  # GrammarError on a bad pattern, before anything else
        self._closures: dict[frozenset, frozenset] = {}
        super().__init__()

    def _closure(self, states) -> frozenset:
        key = frozenset(states)
        hit = self._closures.get(key)
        if hit is not None:
            return hit
        eps = self.nfa.eps
        seen, stack = set(key), list(key)
        while stack:
            for t in eps[stack.pop()]:
                if t not in seen:
                    seen.add(t)
                    stack.append(t)
        out = self._closures[key] = frozenset(seen)
        return out

    def _start_key(self):
        return self._closure((self.nfa.start,))

    def _accepts(self, key) -> bool:
        return self.nfa.accept in key

    def _successors(self, key) -> list:
        buckets: list[set | None] = [None] * 256
        edges = self.nfa.edges
        for s in key:
            for lo, hi, t in edges[s]:
                for b in range(lo, hi + 1):
                    if buckets[b] is None:
                        buckets[b] = {t}
                    else:
                        buckets[b].add(t)
        out: list = [None] * 256
        memo: dict[frozenset, frozenset] = {}
        for b, targets in enumerate(buckets):
            if targets:
                f = frozenset(targets)
                if f not in memo:
                    memo[f] = self._closure(f)
                out[b] = memo[f]
        return out


# ------------------------------------------------------------------------------- JSON value
# A JsonDFA key is (stack, mode): stack a string of "O" / "A" (the open objects / arrays, the
# innermost last); mode one of the tuples below.
_WS = b" \t\n\r"
_HEX = b"0123456789abcdefABCDEF"
_DIGITS = b"0123456789"
_NUM_END = {"zero", "int", "frac", "exp"}  # number modes where the number may end
# UTF-8 after the lead byte: the allowed range of the first continuation byte, and how many
# more (80-BF) follow (RFC 3629: no overlongs, no surrogates, nothing above U+10FFFF)
_UTF8_LEAD = {**{b: ((0x80, 0xBF), 0) for b in range(0xC2, 0xE0)},
              0xE0: ((0xA0, 0xBF), 1), **{b: ((0x80, 0xBF), 1) for b in range(0xE1, 0xED)},
              0xED: ((0x80, 0x9F), 1), 0xEE: ((0x80, 0xBF), 1), 0xEF: ((0x80, 0xBF), 1),
              0xF0: ((0x90, 0xBF), 2), 0xF1: ((0x80, 0xBF), 2), 0xF2: ((0x80, 0xBF), 2),
              0xF3: ((0x80, 0xBF), 2), 0xF4: ((0x80, 0x8F), 2)}
_LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}


class JsonDFA(LazyDFA):
    """Any JSON object or array, nested at most `max_depth` deep; `whitespace` "any" / "none"
    (between tokens; never before the first or after the last byte).

    Its states hold the stack of open containers, so every request (and every vocabulary walk
    from its states) that nests in a new way adds states, without bound over a server's life:
    shared by all json_object requests, it would reach MAX_DFA_STATES and then refuse valid
    tokens of every later request. It `retires` (LazyDFA.worn) instead."""

    retires = True

    def __init__(self, max_depth: int = 32, whitespace: str = "any"):
        if whitespace not in ("any", "none"):
            raise ValueError("whitespace must be 'any' or 'none'")
        self.max_depth = max_depth
        self.ws = whitespace == "any"
        super().__init__()

    def _start_key(self):
        return ("", ("top",))

    def _accepts(self, key) -> bool:
        return key[1] == ("done",)

    def _successors(self, key) -> list:
        return [self._next(key, b) for b in range(256)]

    def _after_value(self, stack: str):
        return (stack, ("done",)) if not stack else (stack, ("after",))

    def _open(self, stack: str, b: int):
        if len(stack) >= self.max_depth:
            return None
        if b == ord("{"):
            return (stack + "O", ("key_or_close",))
        return (stack + "A", ("value_or_close",))

    def _value_start(self, stack: str, b: int):
        """The state after byte b starts a value (None: b cannot start one)."""
        if b in (ord("{"), ord("[")):
            return self._open(stack, b)
        if b == ord('"'):
            return (stack, ("str", False))
        if b == ord("-"):
            return (stack, ("num", "minus"))
        if b == ord("0"):
            return (stack, ("num", "zero"))
        if b in _DIGITS:
            return (stack, ("num", "int"))
        if b in _LITERALS:
            return (stack, ("lit", _LITERALS[b]))
        return None

    def _next(self, key, b: int):
        stack, mode = key
        kind = mode[0]
        if kind == "top":
            return self._open(stack, b) if b in (ord("{"), ord("[")) else None
        if kind == "done":
            return None
        if kind == "str":
            return self._in_string(stack, mode, b)
        if kind == "num":
            return self._in_number(stack, mode[1], b)
        if kind == "lit":
            rest = mode[1]
            if b != rest[0]:
                return None
            return (stack, ("lit", rest[1:])) if len(rest) > 1 else self._after_value(stack)
        if self.ws and b in _WS:
            return key
        if kind == "value":
            return self._value_start(stack, b)
        if kind == "value_or_close":
            return self._close(stack, "A") if b == ord("]") else self._value_start(stack, b)
        if kind == "key_or_close":
            return self._close(stack, "O") if b == ord("}") else self._key_start(stack, b)
        if kind == "key":
            return self._key_start(stack, b)
        if kind == "colon":
            return (stack, ("value",)) if b == ord(":") else None
        if kind == "after":
            top = stack[-1]
            if b == ord(","):
                return (stack, ("key",)) if top == "O" else (stack, ("value",))
            if b == (ord("}") if top == "O" else ord("]")):
                return self._after_value(stack[:-1])
            return None
        raise AssertionError(mode)

    def _key_start(self, stack: str, b: int):
        return (stack, ("str", True)) if b == ord('"') else None

    def _close(self, stack: str, kind: str):
        return self._after_value(stack[:-1]) if stack[-1] == kind else None

    def _in_string(self, stack: str, mode: tuple, b: int):
        is_key = mode[1]
        sub = mode[2:] if len(mode) > 2 else ()
        if not sub:  # between characters
            if b == ord('"'):
                return (stack, ("colon",)) if is_key else self._after_value(stack)
            if b == ord("\\"):
                return (stack, ("str", is_key, "esc"))
            if b < 0x20:  # control characters must be escaped
                return None
            if b < 0x80:
                return (stack, ("str", is_key))
            lead = _UTF8_LEAD.get(b)
            if lead is None:
                return None
            return (stack, ("str", is_key, "utf8", lead[0], lead[1]))
        if sub[0] == "esc":
            if b in b'"\\/bfnrt':
                return (stack, ("str", is_key))
            if b == ord("u"):
                return (stack, ("str", is_key, "hex", 4))
            return None
        if sub[0] == "hex":
            if b not in _HEX:
                return None
            left = sub[1] - 1
            return (stack, ("str", is_key, "hex", left)) if left else (stack, ("str", is_key))
        lo, hi = sub[1]
        if not lo <= b <= hi:
            return None
        more = sub[2]
        if more:
            return (stack, ("str", is_key, "utf8", (0x80, 0xBF), more - 1))
        return (stack, ("str", is_key))

    def _in_number(self, stack: str, part: str, b: int):
        if part == "minus":
            if b == ord("0"):
                return (stack, ("num", "zero"))
            return (stack, ("num", "int")) if b in _DIGITS else None
        if part in ("int", "frac", "exp") and b in _DIGITS:
            return (stack, ("num", part))
        if part in ("zero", "int") and b == ord("."):
            return (stack, ("num", "dot"))
        if part in ("zero", "int", "frac") and b in b"eE":
            return (stack, ("num", "e"))
        if part == "dot":
            return (stack, ("num", "frac")) if b in _DIGITS else None
        if part == "e":
            if b in b"+-":
                return (stack, ("num", "esign"))
            return (stack, ("num", "exp")) if b in _DIGITS else None
        if part == "esign":
            return (stack, ("num", "exp")) if b in _DIGITS else None
        if part not in _NUM_END:
            return None
        # the number ended: b is the next token's first byte (numbers are never top-level)
        return self._next((stack, ("after",)), b)
