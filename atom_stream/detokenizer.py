"""Incremental, UTF-8-safe detokenization and text-level stop strings, per request, on the
event loop (so every push is a few dict/list lookups and one C call). Behaves as vLLM's
vllm/v1/engine/detokenizer.py (FastIncrementalDetokenizer on tokenizers' DecodeStream,
SlowIncrementalDetokenizer on transformers_utils/detokenizer_utils.detokenize_incrementally).

`IncrementalDetokenizer(tokenizer, prompt_token_ids=None, skip_special_tokens=True)`:
- `push(token_ids) -> str`: the text these tokens add. As vLLM (`DecodeStream.step` returns None,
  `detokenize_incrementally` returns "" while the decoded text ends in U+FFFD), nothing comes out
  while the text so far ends in U+FFFD or in an unfinished UTF-8 character: a character split
  over tokens comes out whole, an invalid byte as U+FFFD together with the text after it.
- `flush() -> str`: always "" (and the state is reset): at the end of the stream vLLM flushes
  nothing, so text still held (an unfinished character, a trailing U+FFFD) is dropped. The pushes
  concatenated are `tokenizer.decode(ids)` up to the last token after which that decode did not
  end in U+FFFD.
- The prompt primes the decoder (vLLM: `DecodeStream` stepped through / built with the prompt
  ids, the slow path's prefix/read offsets over the prompt's last tokens): an unfinished character
  at the prompt's end is completed by the output, whose first text is then that character. If the
  output breaks it instead, its U+FFFD stays the prompt's (not repeated in the output).
- Byte path (tokenizers with a `byte_table`: demo, Kimi, HF byte-level BPE): a table lookup
  per token into Python's incremental UTF-8 decoder; O(1) per token, no re-decoding.
- Text path (others, e.g. SentencePiece): vLLM/TGI's prefix_offset/read_offset method, which
  re-decodes only the last few tokens and withholds text ending in U+FFFD (at most 32 tokens:
  then it emits up to the last complete character, where vLLM would keep re-decoding).
- Ids outside the tokenizer's vocabulary (a model vocab padded beyond the tokenizer's) decode
  to nothing.

`StopStringChecker(stop, include_stop_str_in_output=False)`:
- `feed(new_text, check=True) -> (emit, matched)`: `emit` is safe to stream now; only the longest
  suffix that could still begin a stop string is held back, so no part of a stop string is
  streamed before it is ruled out. With `check`, a stop string that ENDS in `new_text` matches
  (vLLM's check_stop_strings window: it may begin up to len(stop) - 1 characters earlier, also in
  text fed with check=False, which is how vLLM treats the output up to min_tokens); of several,
  the earliest-ending one, ties by list order (vLLM). `emit` then ends right before the stop
  string (or includes it with include_stop_str_in_output) and `matched` is the string; later
  feeds return ("", None). Fed one step's text at a time, the result is vLLM's whenever the
  stops a step completes end at the same character (always so for one-character steps). When
  one step's text (a multi-character token) completes several stops ending at different
  characters, vLLM takes the first LISTED one found (stop=[" world", " wor"] and the token
  " world": vLLM " world", here " wor"): this checker keeps the earliest-ending one, the stop
  a character-by-character stream would have hit first.
- `flush() -> str`: the held text, when the stream ends for another reason (length/eos).

`decode_token(tokenizer, tid) -> str`: one token decoded on its own (vLLM's
Logprob.decoded_token; the OpenAI servers' logprob token strings).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from typing import Any

_utf8_decoder = codecs.getincrementaldecoder("utf-8")
_REPLACEMENT = "\ufffd"
_PREFIX_CONTEXT = 5  # text path: tokens of left context re-decoded with the new ones
_MAX_PENDING = 32  # text path: tokens held behind a trailing U+FFFD before it is emitted
_CHAR_TOKENS = 4  # a UTF-8 character has at most 4 bytes, so spans at most 4 tokens
_PRIME_TOKENS = 16  # byte path: prompt tokens looked at for the prompt's last 4 bytes


def decode_token(tokenizer: Any, tid: int) -> str:
    """A token decoded on its own (vLLM's Logprob.decoded_token: `tokenizer.decode([tid])`,
    special tokens as their text), JSON-safe. An id outside the tokenizer's vocabulary (a model
    vocabulary padded beyond it, as DeepSeek-V3's 129,280 rows over its smaller tokenizer: such
    ids are sampled or ranked in the top-k, often so with dummy weights) is "", as a Hugging
    Face fast tokenizer decodes it and as the detokenizer streams it (nothing), instead of the
    tokenizer's ValueError. Lone surrogates (which cannot go into JSON) become U+FFFD."""
    n = getattr(tokenizer, "vocab_size", None)
    if n is not None and not 0 <= tid < n:
        return ""
    s = tokenizer.decode([tid], skip_special_tokens=False)
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        s = s.encode("utf-8", "replace").decode("utf-8")
    return s


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
    __slots__ = ("_decode", "_held", "_n", "_pending", "_prompt_tail", "_reset", "_table")

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int] | None = None,
                 skip_special_tokens: bool = True):
        self._table: list[bytes] = tokenizer.byte_table(skip_special_tokens)
        self._n = len(self._table)
        dec = _utf8_decoder("replace")
        self._decode = dec.decode
        self._pending = dec.getstate  # ()[0]: the bytes of an unfinished character
        self._reset = dec.reset
        self._held = ""  # decoded, not emitted: it ends in U+FFFD or an unfinished character
        # U+FFFDs the prompt's unfinished last character shows as when broken (0: none held)
        self._prompt_tail = 0
        if prompt_token_ids:
            self._prime(prompt_token_ids)

    def _prime(self, prompt: Sequence[int]) -> None:
        # Byte-level text has no cross-token normalization: only an unfinished character at
        # the prompt's end matters (<= 3 bytes; 4 bytes of context resynchronize the decoder).
        table, n = self._table, self._n
        tail = b""
        for t in reversed(prompt[-_PRIME_TOKENS:]):
            if 0 <= t < n:
                tail = table[t] + tail
                if len(tail) >= 4:
                    break
        if tail:
            self._decode(tail)  # the prompt's own text is not output
            # decode(prompt) shows broken bytes as U+FFFDs (b"\xed\xa0": two, b"\xe4\xbd": one)
            self._prompt_tail = self._pending()[0].decode("utf-8", "replace").count(_REPLACEMENT)

    def push(self, token_ids: Sequence[int]) -> str:
        if len(token_ids) != 1:  # vLLM decodes token by token (emitting where it can)
            return "".join([self.push([t]) for t in token_ids])
        t = token_ids[0]
        data = self._table[t] if 0 <= t < self._n else b""
        text = self._decode(data)
        if self._prompt_tail and text:
            # the prompt's unfinished character is resolved: completed (it leads `text`), or
            # broken: then its U+FFFDs are the prompt's text (as decode(prompt) shows them)
            k, self._prompt_tail = 0, min(self._prompt_tail, len(text))
            while k < self._prompt_tail and text[k] == _REPLACEMENT:
                k += 1
            text, self._prompt_tail = text[k:], 0
        if self._held:
            text = self._held + text
        # vLLM emits nothing while the decoded text ends in U+FFFD, which an unfinished
        # character decodes to (an ASCII last byte cannot leave one: skip the C call)
        if text[-1:] == _REPLACEMENT or ((not data or data[-1] >= 0x80) and self._pending()[0]):
            self._held = text
            return ""
        self._held = ""
        return text

    def flush(self) -> str:
        self._reset()
        self._held = ""
        self._prompt_tail = 0
        return ""


class _TextDetokenizer(IncrementalDetokenizer):
    __slots__ = ("_ids", "_n", "_prefix", "_prompt_text", "_read", "_skip", "_tok")

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int] | None = None,
                 skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._n = tokenizer.vocab_size
        # The prompt's last tokens are left context (e.g. SentencePiece's leading-space rule).
        ctx = [t for t in (prompt_token_ids or ())[-(_PREFIX_CONTEXT + _CHAR_TOKENS):]
               if 0 <= t < self._n]
        read = len(ctx)
        self._prompt_text: str | None = None
        if read and self._decode(ctx[max(read - _PREFIX_CONTEXT, 0):]).endswith(_REPLACEMENT):
            # The prompt may end inside a character: its last tokens (as many as a character
            # can span) are left unread, so the output can complete it (vLLM's prefix/read
            # offsets would compare equal lengths and drop it). The prompt's text is kept: the
            # output's first text starts where it differs from it.
            read = max(read - _CHAR_TOKENS, 0)
            self._prompt_text = self._decode(ctx[max(read - _PREFIX_CONTEXT, 0):])
        prefix = max(read - _PREFIX_CONTEXT, 0)
        self._ids: list[int] = ctx[prefix:]
        self._read = read - prefix
        self._prefix = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def _delta(self) -> str:
        ids, p, r = self._ids, self._prefix, self._read
        prefix_text = self._decode(ids[p:r])
        new_text = self._decode(ids[p:])
        stuck = len(ids) - r >= _MAX_PENDING  # bound the re-decoded window
        end = len(ids)
        if len(new_text) <= len(prefix_text):
            if not stuck:
                return ""
            new_text = prefix_text  # nothing visible (e.g. skipped specials): move on
        elif new_text.endswith(_REPLACEMENT):
            if not stuck:
                return ""  # possibly an unfinished multi-byte character
            # bounded window: emit up to the last token boundary whose text is complete, so a
            # character still being built is not streamed as U+FFFD (only bytes that stay
            # invalid for the whole window come out as U+FFFD)
            for k in range(len(ids) - 1, r, -1):
                text = self._decode(ids[p:k])
                if len(text) > len(prefix_text) and not text.endswith(_REPLACEMENT):
                    new_text, end = text, k
                    break
        cut = len(prefix_text)
        if self._prompt_text is not None:  # the first text after a prompt ending in U+FFFD
            # the output starts where it leaves the prompt's text: at the character it
            # completed, or after the prompt's U+FFFDs if it broke it
            old, self._prompt_text = self._prompt_text, None
            cut = 0
            while cut < len(old) and cut < len(new_text) and old[cut] == new_text[cut]:
                cut += 1
        self._prefix, self._read = r, end
        if self._prefix > 4 * _PREFIX_CONTEXT:  # keep the id list short
            drop = self._prefix
            del ids[:drop]
            self._prefix -= drop
            self._read -= drop
        return new_text[cut:]

    def push(self, token_ids: Sequence[int]) -> str:
        n = self._n
        if len(token_ids) != 1:  # vLLM decodes token by token (emitting where it can)
            return "".join([self.push([t]) for t in token_ids])
        t = token_ids[0]
        if not 0 <= t < n:
            return ""
        self._ids.append(t)
        return self._delta()

    def flush(self) -> str:
        self._ids = []
        self._prefix = self._read = 0
        self._prompt_text = None
        return ""


class StopStringChecker:
    """Text-level stop strings over a stream of text deltas (see the module docstring)."""

    __slots__ = ("_done", "_held", "_include", "_stops")

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False):
        self._stops = [s for s in dict.fromkeys(stop) if s]  # empty strings never match
        self._include = include_stop_str_in_output
        self._held = ""
        self._done = False

    def feed(self, new_text: str, check: bool = True) -> tuple[str, str | None]:
        if self._done:
            return "", None
        held = self._held
        buf = held + new_text if held else new_text
        if not buf:
            return "", None
        best: tuple[int, int, str] | None = None  # (end, index in the list, stop)
        if check and new_text:
            # vLLM's check_stop_strings: search from len(stop) - 1 chars before the new text
            # (buf = held + new_text, and held is the longest suffix that may begin a stop)
            base = len(held) + 1
            for k, s in enumerate(self._stops):
                i = buf.find(s, max(base - len(s), 0))
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
