"""Reasoning parsers (vLLM's `--reasoning-parser`): `<think>...</think>` -> `reasoning_content`.

- `deepseek_r1` (vLLM's DeepSeekR1ReasoningParser): the output is reasoning until `</think>`,
  content after it. The chat template usually ends the prompt with `<think>`, so the model
  never writes the opening tag; one it does write is dropped. An output without `</think>` is
  reasoning only (content null).
- `kimi_k2` (vLLM's KimiK2ReasoningParser): the same, unless the chat template was asked not to
  think (`chat_template_kwargs: {"thinking": false}`, request or `--default-chat-template-kwargs`;
  K2.5's instant mode, whose prompt already closes `<think></think>`): then all of it is
  content. Kimi's "(no content)" placeholder (written before tool calls without text) is removed
  from the content, and content left blank is null.

Streamed, text that may be the beginning of a tag (or of the placeholder) is held back until the
next delta rules it in or out, so a tag split over deltas never leaks; the concatenated deltas
equal the non-streamed split.
"""

from __future__ import annotations

from dataclasses import dataclass

from atom_stream.server.tool_parsers import held_suffix


@dataclass(frozen=True)
class ReasoningFormat:
    name: str
    start: str = "<think>"
    end: str = "</think>"
    thinking_switch: bool = False  # chat_template_kwargs thinking=false: no reasoning at all
    placeholder: str | None = None  # removed from the content

    def thinks(self, template_kwargs: dict | None) -> bool:
        """Whether the output of a request with these chat-template kwargs starts reasoning
        (the kwargs the template got: `thinking`, or its alias `enable_thinking`)."""
        if not self.thinking_switch:
            return True
        kw = template_kwargs or {}
        return bool(kw.get("thinking", kw.get("enable_thinking", True)))


REASONING_PARSERS: dict[str, ReasoningFormat] = {
    f.name: f for f in (ReasoningFormat("deepseek_r1"),
                        ReasoningFormat("kimi_k2", thinking_switch=True,
                                        placeholder="(no content)"))}


class ThinkStream:
    """One choice's reasoning/content splitter: `feed(text)` -> (reasoning, content) for the
    text this step adds, `finish()` the same for the text still held."""

    __slots__ = ("_buf", "_in", "_marks", "end", "start")

    def __init__(self, fmt: ReasoningFormat, thinking: bool = True):
        self.start, self.end = fmt.start, fmt.end
        self._marks = (fmt.start, fmt.end)
        self._in = thinking
        self._buf = ""

    @property
    def reasoning(self) -> bool:
        return self._in

    def feed(self, text: str) -> tuple[str, str]:
        if not self._in:
            return "", text
        buf = self._buf + text
        k = buf.find(self.end)
        if k != -1:
            self._in, self._buf = False, ""
            return buf[:k].replace(self.start, ""), buf[k + len(self.end):]
        cut = len(buf) - held_suffix(buf, self._marks)
        self._buf = buf[cut:]
        return buf[:cut].replace(self.start, ""), ""

    def finish(self) -> tuple[str, str]:
        buf, self._buf = self._buf, ""
        return (buf.replace(self.start, ""), "") if self._in else ("", buf)


class Scrub:
    """Removes every occurrence of `word` from a text stream (holding a possible beginning)."""

    __slots__ = ("_buf", "_marks", "word")

    def __init__(self, word: str):
        self.word = word
        self._marks = (word,)
        self._buf = ""

    def feed(self, text: str) -> str:
        buf = (self._buf + text).replace(self.word, "") if text else self._buf
        cut = len(buf) - held_suffix(buf, self._marks)
        self._buf = buf[cut:]
        return buf[:cut]

    def finish(self) -> str:
        buf, self._buf = self._buf, ""
        return buf


def extract_reasoning(fmt: ReasoningFormat, text: str, thinking: bool = True
                      ) -> tuple[str | None, str | None]:
    """A whole output -> (reasoning, content), as vLLM's extract_reasoning_content: reasoning
    is None when the request does not think; content is None when empty (or, with a
    placeholder, blank)."""
    s = ThinkStream(fmt, thinking)
    r1, c1 = s.feed(text)
    r2, c2 = s.finish()
    content = c1 + c2
    if fmt.placeholder:
        content = content.replace(fmt.placeholder, "")
        if not content.strip():
            content = ""
    return (r1 + r2 if thinking else None), (content or None)
