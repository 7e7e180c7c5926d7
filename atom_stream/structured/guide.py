"""Token masks from byte-level DFAs: what a guided request may sample next.

- `TokenIndex(table, vocab_size)`: the vocabulary's bytes (Tokenizer.byte_table(True): specials
  are b"" and never allowed by a grammar), sorted by length and stored column by column, so
  one DFA state's allowed tokens are found by one vectorized walk (`allowed_bits`): all tokens
  advance byte j together (`trans[states, column j]`), the dead drop out, and a token is
  allowed iff its last byte leaves the DFA alive.
- `Grammar(dfa, index)`: one compiled spec over one vocabulary; masks are cached per DFA state
  (packed bits, little bit order: token t is bit t % 8 of byte t // 8), so requests that share
  a spec (every json_object request) share the work. The cache is the vocabulary's, shared by
  all its grammars and bounded (MAX_CACHED_MASKS, least recently used out).
- `GuideState(grammar, stop_ids)`: one sequence's position; `bits(token_ids, start)` advances
  over the outputs (token_ids[start:]) it has not seen and returns the next step's mask. The stop ids (the EOS ids
  and stop_token_ids) are allowed exactly where the DFA accepts: the text so far is complete.
  Where nothing else remains (or the DFA died: an output it did not allow), only they are.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict

import numpy as np

from atom_stream.structured.dfa import DEAD, LazyDFA

MAX_CACHED_MASKS = 4096  # per vocabulary: ~80 MB at 163,840 tokens (20 KB a mask)
_grammar_ids = itertools.count()


class TokenIndex:
    def __init__(self, table: list[bytes], vocab_size: int,
                 text_table: list[bytes] | None = None):
        self.vocab_size = vocab_size
        self.table = list(table[:vocab_size])
        # the bytes every token decodes to with special tokens as their text (finds a
        # reasoning end tag that is a special token); `table` where not given
        self.text_table = self.table if text_table is None else list(text_table[:vocab_size])
        lens = np.fromiter((len(b) for b in self.table), dtype=np.int64, count=len(self.table))
        order = np.argsort(-lens, kind="stable")
        order = order[lens[order] > 0]
        self.order = order
        slen = lens[order]
        self.max_len = int(slen[0]) if len(order) else 0
        # counts[j]: tokens longer than j bytes = a prefix of `order`
        per_len = np.bincount(slen, minlength=self.max_len + 1)
        self.counts = (per_len[::-1].cumsum()[::-1] - per_len)[: self.max_len].tolist()
        flat = np.frombuffer(b"".join(self.table[i] for i in order.tolist()), dtype=np.uint8)
        starts = np.concatenate([[0], np.cumsum(slen)[:-1]]) if len(order) else slen
        self.cols = [flat[starts[: self.counts[j]] + j] for j in range(self.max_len)]
        self.nbytes = (vocab_size + 7) // 8
        self.masks: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self.lock = threading.Lock()

    def allowed(self, dfa: LazyDFA, state: int) -> np.ndarray:
        """bool [vocab_size]: the tokens whose bytes all leave `dfa` alive from `state`."""
        mask = np.zeros(self.vocab_size, dtype=bool)
        if state == DEAD or not self.max_len:
            return mask
        order = self.order
        pos = np.arange(self.counts[0])
        st = np.full(len(pos), state, dtype=np.int32)
        for j in range(self.max_len):
            cut = int(np.searchsorted(pos, self.counts[j]))
            if cut < len(pos):  # these are j bytes long and survived all of them
                mask[order[pos[cut:]]] = True
                pos, st = pos[:cut], st[:cut]
            if not len(pos):
                return mask
            dfa.ensure(st)
            st = dfa.trans[st, self.cols[j][pos]]
            live = st != DEAD
            pos, st = pos[live], st[live]
        mask[order[pos]] = True
        return mask


class Grammar:
    """A compiled guided-decoding spec: `dfa` over the vocabulary of `index`."""

    def __init__(self, dfa: LazyDFA, index: TokenIndex, description: str = ""):
        self.dfa = dfa
        self.index = index
        self.description = description
        self._id = next(_grammar_ids)  # its masks' key in the index's cache

    def allowed_bits(self, state: int) -> np.ndarray:
        """Packed uint8 [ceil(V / 8)] of the tokens allowed from `state` (cached, read-only)."""
        index, key = self.index, (self._id, state)
        with index.lock:
            hit = index.masks.get(key)
            if hit is not None:
                index.masks.move_to_end(key)
                return hit
        bits = np.packbits(index.allowed(self.dfa, state), bitorder="little")
        bits.flags.writeable = False
        with index.lock:
            index.masks[key] = bits
            if len(index.masks) > MAX_CACHED_MASKS:
                index.masks.popitem(last=False)
        return bits

    def matches(self, text: str) -> bool:
        return self.dfa.matches(text.encode())

    def __deepcopy__(self, memo: dict) -> Grammar:
        return self  # shared by every request of the spec (SamplingParams.clone copies deeply)


class GuideState:
    """One sequence's walk through a Grammar (see the module docstring). `after`: the grammar
    applies only to what follows the first occurrence of this text in the output (a reasoning
    end tag); until then the output is free and `bits` is None."""

    __slots__ = ("after", "consumed", "ended", "grammar", "only_stops", "seen", "state",
                 "stop_ids")

    def __init__(self, grammar: Grammar, stop_ids, after: str | None = None):
        self.grammar = grammar
        self.stop_ids = sorted({t for t in stop_ids if 0 <= t < grammar.index.vocab_size})
        self.state = grammar.dfa.start
        self.consumed = 0
        self.ended = False  # a stop id was sampled where the text was complete
        self.after = after.encode() if after else None
        self.seen = b""  # the output so far while `after` has not appeared (its tail only)
        self.only_stops = False  # the last `bits` allowed the stop ids only

    def advance(self, token_ids: list[int], start: int = 0) -> None:
        """Walk the outputs token_ids[start:] not walked yet (only that tail is read: the
        engine passes a sequence's whole token list and its prompt length every step)."""
        dfa, index = self.grammar.dfa, self.grammar.index
        table = index.table
        for t in token_ids[start + self.consumed:]:
            if self.ended or self.state == DEAD:
                break
            if self.after is not None:
                self._look_for_start(index.text_table[t] if 0 <= t < len(table) else b"")
            elif t in self.stop_ids and dfa.accept[self.state]:
                self.ended = True
            elif 0 <= t < len(table) and table[t]:
                self.state = dfa.walk(self.state, table[t])
            else:
                self.state = DEAD
        self.consumed = len(token_ids) - start

    def _look_for_start(self, data: bytes) -> None:
        tag = self.after
        seen = self.seen + data
        i = seen.find(tag)
        if i < 0:
            keep = len(tag) - 1  # a tag split over tokens is still found
            self.seen = seen[-keep:] if keep else b""
            return
        self.after = None
        self.seen = b""
        rest = seen[i + len(tag):]  # the same token's bytes after the tag: the grammar's first
        if rest:
            self.state = self.grammar.dfa.walk(self.state, rest)

    def bits(self, token_ids: list[int], start: int = 0) -> np.ndarray | None:
        """The packed mask of the next token after the outputs token_ids[start:] (all real
        ids); None
        while the grammar does not apply yet (see `after`)."""
        self.advance(token_ids, start)
        if self.after is not None:
            return None
        g = self.grammar
        live = not self.ended and self.state != DEAD
        base = g.allowed_bits(self.state) if live else None
        self.only_stops = base is None or not base.any()
        if live and not g.dfa.accept[self.state] and not self.only_stops:
            return base
        out = np.zeros(g.index.nbytes, dtype=np.uint8) if base is None else base.copy()
        for t in self.stop_ids:
            out[t >> 3] |= np.uint8(1 << (t & 7))
        return out
