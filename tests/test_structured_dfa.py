"""atom_stream.structured's automata against references: RegexDFA against Python `re` on random
strings, the UTF-8 byte-range split against str.encode, JsonDFA against json.loads, and
TokenIndex's vectorized masks against walking every token one by one."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest

from atom_stream.structured.dfa import DEAD, JsonDFA, RegexDFA
from atom_stream.structured.errors import GrammarError
from atom_stream.structured.guide import Grammar, GuideState, TokenIndex
from atom_stream.structured.regex_parse import normalize, utf8_sequences

PATTERNS = [
    r"abc", r"a|b|cd", r"[a-z]+\d*", r"(?:ab)*c?", r"\w{2,4}-\s?x", r'[^"\\]*', r"é+|ü",
    r".{3}", r"[\u00e0-\u00ff]+", r"a{,2}b{2}", r"(a|b)*abb", r"^x?$", r"a{3,}", r"[😀-😂]x",
    r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?", r"\{\}", r"[-a]+|[a\-]b", r"[]a]*",
    r"\x41\u00e9\U0001F600", r"(a|)+b", r"a*?b+?", r"[^a-c\d]{1,2}", r"[\s\S]", r"\.\*\+",
]
ALPHABET = ["a", "b", "c", "d", "x", "-", " ", "1", "0", "9", ".", "é", "ü", '"', "\\", "\n",
            "😁", "😀", "{", "}", "e", "E", "+", "à", "A", "*", "]", "\t", "\u0100"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_regex_dfa_matches_python_re(pattern):
    rng = random.Random(hash(pattern) & 0xFFFF)
    dfa = RegexDFA(pattern)
    ref = re.compile(pattern, re.ASCII)  # the dialect's \d \w \s are ASCII
    for _ in range(1500):
        s = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 6)))
        assert dfa.matches(s.encode()) == (ref.fullmatch(s) is not None), (pattern, s)


@pytest.mark.parametrize("pattern", [r"(?=a)", r"(?P<n>a)", r"\1", r"a\b", r"\p{L}", r"(a",
                                     r"a)", r"[a", r"*a", r"a**", r"[z-a]", r"a{5,2}",
                                     r"(?i)a", r"a{2000}", "\\"])
def test_unsupported_or_bad_regex_is_a_grammar_error(pattern):
    with pytest.raises(GrammarError):
        RegexDFA(pattern)


def test_utf8_sequences_cover_exactly_the_code_points():
    rng = random.Random(7)
    for _ in range(40):
        lo = rng.choice([0, 0x7F, 0x7FF, 0xFFFF, 0xD7FF]) + rng.randint(0, 300)
        hi = lo + rng.choice([0, 5, 200, 5000, 70000])
        seqs = utf8_sequences(normalize([(lo, min(hi, 0x10FFFF))]))
        for cp in [lo, hi, *(rng.randint(lo, hi) for _ in range(50)),
                   max(0, lo - 1), hi + 1]:
            if cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
                continue
            data = chr(cp).encode()
            hits = sum(len(s) == len(data) and all(a <= b <= z for (a, z), b in zip(s, data))
                       for s in seqs)
            assert hits == (1 if lo <= cp <= hi else 0), (hex(lo), hex(hi), hex(cp))


def _random_json(rng: random.Random, depth: int):
    kinds = ["str", "num", "lit"] + (["obj", "arr"] if depth else [])
    k = rng.choice(kinds)
    if k == "str":
        chars = [*ALPHABET, "\u0001", "\u2028"]
        return "".join(rng.choice(chars) for _ in range(rng.randint(0, 4)))
    if k == "num":
        return rng.choice([0, -3, 17, 2.5, -0.125, 1e-7, 12345678901234])
    if k == "lit":
        return rng.choice([True, False, None])
    if k == "obj":
        return {f"k{i}é"[: rng.randint(1, 3)] + str(i): _random_json(rng, depth - 1)
                for i in range(rng.randint(0, 3))}
    return [_random_json(rng, depth - 1) for _ in range(rng.randint(0, 3))]


def test_json_dfa_accepts_json_objects_and_arrays_only():
    rng = random.Random(3)
    dfa = JsonDFA(max_depth=6)
    compact = JsonDFA(max_depth=6, whitespace="none")
    for _ in range(300):
        v = _random_json(rng, 4)
        for text in (json.dumps(v), json.dumps(v, indent=2), json.dumps(v, ensure_ascii=False)):
            want = isinstance(v, (dict, list))
            assert dfa.matches(text.encode()) == want, text
        tight = json.dumps(v, separators=(",", ":"), ensure_ascii=False)
        assert compact.matches(tight.encode()) == isinstance(v, (dict, list))
        # mutations: drop / insert a byte; valid iff json.loads agrees (top: object / array)
        data = tight.encode()
        for _ in range(5):
            i = rng.randrange(len(data) + 1)
            mutated = data[:i] + bytes([rng.choice(b'{}[],:"0-.eatx\\ ')]) + data[i + 1:]
            try:
                ok = isinstance(json.loads(mutated), (dict, list)) and mutated == mutated.strip()
            except (ValueError, UnicodeDecodeError):
                ok = False
            assert dfa.matches(mutated) == ok, mutated


def test_json_dfa_rejects_bad_utf8_depth_and_trailing_text():
    dfa = JsonDFA(max_depth=3)
    for bad in (b'["\xc0\x80"]', b'["\xed\xa0\x80"]', b'["\xf4\x90\x80\x80"]', b'["\x80"]',
                b"[[[[]]]]", b"{} ", b" {}", b'{"a":1}x', b"[01]", b"[1.]", b"[-]",
                b'{"a"}', b"[1,]", b'["\\x"]', b'["\\u12g4"]', b"[tru]", b"1", b'"s"'):
        assert not dfa.matches(bad), bad
    for good in (b"[[[]]]", b'["\xf0\x9f\x98\x80\xc3\xa9"]', b'{"a": [1e5, -0.5E-2, "\\u00e9"]}'):
        assert dfa.matches(good), good


def _vocab(rng: random.Random, n: int) -> list[bytes]:
    chars = list(b' abcxyz{}[]":,0123456789.-e\\\n') + [0xC3, 0xA9, 0xF0, 0x9F, 0x98]
    table = [bytes([i]) for i in range(256)]
    while len(table) < n - 3:
        table.append(bytes(rng.choice(chars) for _ in range(rng.randint(1, 9))))
    return table + [b"", b"", b""]  # specials


@pytest.mark.parametrize("dfa", [JsonDFA(), RegexDFA(r'\{"n": "[a-z é]{1,6}", "v": \d{1,3}\}'),
                                 RegexDFA(r"(yes|no|maybe)")], ids=["json", "regex", "choice"])
def test_token_masks_equal_walking_each_token(dfa):
    rng = random.Random(11)
    table = _vocab(rng, 3000)
    index = TokenIndex(table, 3008)  # the model's vocab is larger than the tokenizer's
    grammar = Grammar(dfa, index)
    prefixes = [b"", b"{", b'{"n": "ab', b'{"a": [1, "x\\', b"ma", b'{"n": "\xc3', b"yes"]
    for p in prefixes:
        s = dfa.walk(dfa.start, p)
        if s == DEAD:
            continue
        bits = grammar.allowed_bits(s)
        mask = np.unpackbits(bits, bitorder="little")[:3008].astype(bool)
        want = np.array([t < len(table) and bool(table[t]) and dfa.walk(s, table[t]) != DEAD
                         for t in range(3008)])
        assert (mask == want).all(), p
        assert grammar.allowed_bits(s) is bits  # cached


def test_guide_state_allows_stop_ids_only_where_the_text_is_complete():
    table = [bytes([i]) for i in range(256)] + [b"", b"yes", b"ye"]
    index = TokenIndex(table, 259)
    g = Grammar(RegexDFA("yes|yesno"), index)
    eos = 256
    guide = GuideState(g, (eos,))

    def allowed(outs):
        bits = guide.bits(outs)
        return set(np.flatnonzero(np.unpackbits(bits, bitorder="little")[:259]).tolist())

    assert allowed([]) == {ord("y"), 257, 258}
    assert allowed([258]) == {ord("s")}
    assert allowed([258, ord("s")]) == {ord("n"), eos}  # complete: EOS, or go on to "yesno"
    assert allowed([258, ord("s"), ord("n"), ord("o")]) == {eos}  # final: only EOS
    guide2 = GuideState(g, (eos,))
    assert allowed_after(guide2, [ord("x")]) == {eos}  # an output the grammar refused: end


def allowed_after(guide: GuideState, outs: list[int]) -> set[int]:
    bits = guide.bits(outs)
    return set(np.flatnonzero(np.unpackbits(bits, bitorder="little")).tolist())


def test_guide_state_after_a_reasoning_tag_binds_only_what_follows():
    table = [bytes([i]) for i in range(256)] + [b"", b"</th", b"ink>x", b"yes"]
    text = [*table[:256], b"</think>", *table[257:]]  # 256: a special token, "</think>"
    index = TokenIndex(table, 260, text)
    g = Grammar(RegexDFA("xyes|yes"), index)
    eos = 300  # outside the vocabulary: ignored
    for outs, state_bits in (([ord("a"), 257], None),  # the tag not complete: free
                             ([257, 258], {ord("y"), 259}),  # split tag + "x" walked
                             ([ord("h"), 256], {ord("x"), ord("y"), 259})):  # special tag
        guide = GuideState(g, (eos,), after="</think>")
        bits = guide.bits(outs)
        if state_bits is None:
            assert bits is None
        else:
            got = set(np.flatnonzero(np.unpackbits(bits, bitorder="little")).tolist())
            assert got == state_bits, outs
    guide = GuideState(g, (eos,), after="</think>")
    assert guide.bits([ord("<")]) is None and guide.bits([ord("<"), ord("/")]) is None
