"""Incremental, UTF-8-safe detokenization and text-level stop strings, per request, on the
event loop (so every push is a few dict/list lookups and one C call).

`IncrementalDetokenizer(tokenizer, prompt_token_ids=None, skip_special_tokens=True)`:
- `push(token_ids) -> str`: the text completed by these tokens. A UTF-8 character split over
  tokens is held until complete (never U+FFFD mid-stream for valid UTF-8); bytes that are provably
  invalid come out as U+FFFD at once, an unfinished tail at `flush()`. The concatenation of all
  pushes + flush equals `tokenizer.decode(all ids, skip_special_tokens)`.
- `flush() -> str`: what is still held, at the end of the stream (then the state is reset).
- Byte path (tokenizers with a `byte_table`: demo, Kimi, HF byte-level BPE): a table lookup
  per token into Python's incremental UTF-8 decoder; O(1) per token, no re-decoding.
- Text path (others, e.g. SentencePiece): vLLM/TGI's prefix_offset/read_offset method, which
  re-decodes only the last few tokens and withholds text ending in U+FFFD.
- Ids outside the tokenizer's vocabulary (a model vocab padded beyond the tokenizer's) decode
  to nothing.

`StopStringChecker(stop, include_stop_str_in_output=False)`:
- `feed(new_text) -> (emit, matched)`: `emit` is safe to stream now; only the longest suffix
  that could still begin a stop string is held back, so no part of a stop string is streamed
  before it is ruled out. On a match (it may span any number of feeds), `emit` ends right before
  the stop string (or includes it with include_stop_str_in_output) and `matched` is the string;
  the earliest-ending match wins (ties: the first listed, as vLLM), so the result does not depend on how
  the text was chunked. Later feeds return ("", None).
- `flush() -> str`: the held text, when the stream ends for another reason (length/eos).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from typing import Any

_utf8_decoder = codecs.getincrementaldecoder("utf-8")
_REPLACEMENT = "\ufffd"
_PREFIX_CONTEXT = 5  # text path: tokens of left context re-decoded with the new ones
_MAX_PENDING = 32  # text path: tokens held behind a trailing U+FFFD before it is emitted


class IncrementalDetokenizer:
    """Factory base: constructing it returns the byte-path or the text-path implementation."""

    __slots__ = ()

    def __new__(cls, tokenizer: Any, prompt_token_ids: Sequence[int] | None = None,
                skip_special_tokens: bool = True):
        impl = cls
        if cls is IncrementalDetokenizer:
            table = getattr(tokenizer, "byte_table", None)
            impl = _ByteDetokenizer if table and table(skip_special_tokens) else _TextDetokenizer
        return object.__new__(impl)

    def push(self, token_ids: Sequence[int]) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def flush(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError


class _ByteDetokenizer(IncrementalDetokenizer):
    __slots__ = ("_decode", "_n", "_reset", "_table")

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int] | None = None,
                 skip_special_tokens: bool = True):
        # The prompt does not matter: byte-level text has no cross-token normalization.
        self._table: list[bytes] = tokenizer.byte_table(skip_special_tokens)
        self._n = len(self._table)
        dec = _utf8_decoder("replace")
        self._decode = dec.decode
        self._reset = dec.reset

    def push(self, token_ids: Sequence[int]) -> str:
        table, n = self._table, self._n
        if len(token_ids) == 1:
            t = token_ids[0]
            return self._decode(table[t]) if 0 <= t < n else ""
        return self._decode(b"".join([table[t] for t in token_ids if 0 <= t < n]))

    def flush(self) -> str:
        out = self._decode(b"", True)
        self._reset()
        return out


class _TextDetokenizer(IncrementalDetokenizer):
    __slots__ = ("_ids", "_n", "_prefix", "_read", "_skip", "_tok")

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int] | None = None,
                 skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._n = tokenizer.vocab_size
        # The prompt's last tokens are left context (e.g. SentencePiece's leading-space rule).
        ctx = [t for t in (prompt_token_ids or ())[-(_PREFIX_CONTEXT + 1):] if 0 <= t < self._n]
        self._ids: list[int] = ctx
        self._read = len(ctx)
        self._prefix = max(self._read - _PREFIX_CONTEXT, 0)

    def _delta(self, force: bool) -> str:
        ids, p, r = self._ids, self._prefix, self._read
        prefix_text = self._tok.decode(ids[p:r], skip_special_tokens=self._skip)
        new_text = self._tok.decode(ids[p:], skip_special_tokens=self._skip)
        stuck = len(ids) - r >= _MAX_PENDING  # bound the re-decoded window
        end = len(ids)
        if len(new_text) <= len(prefix_text):
            if not stuck:
                return ""
            new_text = prefix_text  # nothing visible (e.g. skipped specials): move on
        elif not force and new_text.endswith(_REPLACEMENT):
            if not stuck:
                return ""  # possibly an unfinished multi-byte character
            # bounded window: emit up to the last token boundary whose text is complete, so a
            # character still being built is not streamed as U+FFFD (only bytes that stay
            # invalid for the whole window come out as U+FFFD)
            for k in range(len(ids) - 1, r, -1):
                text = self._tok.decode(ids[p:k], skip_special_tokens=self._skip)
                if len(text) > len(prefix_text) and not text.endswith(_REPLACEMENT):
                    new_text, end = text, k
                    break
        self._prefix, self._read = r, end
        if self._prefix > 4 * _PREFIX_CONTEXT:  # keep the id list short
            drop = self._prefix
            del ids[:drop]
            self._prefix -= drop
            self._read -= drop
        return new_text[len(prefix_text):]

    def push(self, token_ids: Sequence[int]) -> str:
        n = self._n
        self._ids.extend(t for t in token_ids if 0 <= t < n)
        return self._delta(force=False)

    def flush(self) -> str:
        out = self._delta(force=True)
        self._ids = self._ids[self._read:]  # nothing pending: fresh context
        self._prefix = self._read = 0
        return out


class StopStringChecker:
    """Text-level stop strings over a stream of text deltas (see the module docstring)."""

    __slots__ = ("_done", "_held", "_include", "_stops")

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False):
        self._stops = [s for s in dict.fromkeys(stop) if s]  # empty strings never match
        self._include = include_stop_str_in_output
        self._held = ""
        self._done = False

    def feed(self, new_text: str) -> tuple[str, str | None]:
        if self._done:
            return "", None
        buf = self._held + new_text if self._held else new_text
        if not buf:
            return "", None
        best: tuple[int, int, str] | None = None  # (end, index in the list, stop)
        for k, s in enumerate(self._stops):
            i = buf.find(s)
            if i >= 0:
                key = (i + len(s), k, s)
                if best is None or key < best:
                    best = key
        if best is not None:
            # the stop that ends first; of stops ending at the same character, the first
            # listed (vLLM checks the stops in request order)
            end, _, s = best
            self._done = True
            self._held = ""
            return (buf[:end] if self._include else buf[:end - len(s)]), s
        hold = len(buf)
        for s in self._stops:  # the longest suffix of buf that is a proper prefix of s
            first = s[0]
            i = buf.find(first, max(0, len(buf) - len(s) + 1))
            while 0 <= i < hold:
                if s.startswith(buf[i:]):
                    hold = i
                    break
                i = buf.find(first, i + 1)
        self._held = buf[hold:]
        return buf[:hold], None

    def flush(self) -> str:
        out, self._held = self._held, ""
        return out
