"""Reasoning parsers (vLLM's `--reasoning-parser`): `<think>...</think>` -> `reasoning_content`.

- `deepseek_r1` (vLLM's DeepSeekR1ReasoningParser): the output is reasoning until `</think>`,
  content after it. The chat template usually ends the prompt with `<think>`, so the model
  never writes the opening tag; one it does write is dropped. An output without `</think>` is
  reasoning only (content null).
- `kimi_k2` (vLLM's KimiK2ReasoningParser): the same, unless the chat template was asked not to
  think (`chat_template_kwargs: {"thinking": false}`, request or `--default-chat-template-kwargs`;
  K2.5's instant mode, whose prompt already closes `<think></think>`): then all of it is
  content. A tool-call section (`<|tool_calls_section_begin|>`, or the singular variant the tool
  parser accepts) also ends the reasoning, the marker staying in the content for the tool
  parser: Kimi K2 may start calling tools without writing `</think>` (vLLM's
  KimiK2ReasoningParser: is_reasoning_end / extract_reasoning). Kimi's "(no content)"
  placeholder (written before tool calls without text) is removed from the content (what the
  tool parser leaves: never from tool-call arguments), and content left blank is null.
- `deepseek_v3` (vLLM's DeepSeekV3ReasoningParser, for DeepSeek-V3.1-style templates that read
  `thinking`): `deepseek_r1` when the request asks to think (`chat_template_kwargs: {"thinking":
  true}`, or `enable_thinking`), else no reasoning at all (all of the output is content): the
  default is not to think, as that template's.

Streamed, text that may be the beginning of a tag (or of the placeholder) is held back until the
next delta rules it in or out, so a tag split over deltas never leaks; the concatenated deltas
equal the non-streamed split.
"""

from __future__ import annotations

from dataclasses import dataclass

from atom_stream.server.tool_parsers import earliest, held_suffix


@dataclass(frozen=True)
class ReasoningFormat:
    name: str
    start: str = "<think>"
    end: str = "</think>"
    thinking_switch: bool = False  # chat_template_kwargs thinking=false: no reasoning at all
    default_thinking: bool = True  # with the switch: whether a request that leaves it out thinks
    placeholder: str | None = None  # removed from the content
    # markers that end the reasoning without `</think>`; they begin the content
    implicit_end: tuple[str, ...] = ()

    def thinks(self, template_kwargs: dict | None) -> bool:
        """Whether the output of a request with these chat-template kwargs starts reasoning
        (the kwargs the template got: `thinking`, or its alias `enable_thinking`)."""
        if not self.thinking_switch:
            return True
        kw = template_kwargs or {}
        if not self.default_thinking:  # off unless asked (vLLM's deepseek_v3: either key on)
            return bool(kw.get("thinking")) or bool(kw.get("enable_thinking"))
        return bool(kw.get("thinking", kw.get("enable_thinking", self.default_thinking)))


REASONING_PARSERS: dict[str, ReasoningFormat] = {
    f.name: f for f in (ReasoningFormat("deepseek_r1"),
                        ReasoningFormat("deepseek_v3", thinking_switch=True,
                                        default_thinking=False),
                        ReasoningFormat("kimi_k2", thinking_switch=True,
                                        placeholder="(no content)",
                                        implicit_end=("<|tool_calls_section_begin|>",
                                                      "<|tool_call_section_begin|>")))}


class ThinkStream:
    """One choice's reasoning/content splitter: `feed(text)` -> (reasoning, content) for the
    text this step adds, `finish()` the same for the text still held."""

    __slots__ = ("_buf", "_ends", "_in", "_marks", "end", "start")

    def __init__(self, fmt: ReasoningFormat, thinking: bool = True):
        self.start, self.end = fmt.start, fmt.end
        self._ends = (fmt.end, *fmt.implicit_end)
        self._marks = (fmt.start, *self._ends)
        self._in = thinking
        self._buf = ""

    @property
    def reasoning(self) -> bool:
        return self._in

    def feed(self, text: str) -> tuple[str, str]:
        if not self._in:
            return "", text
        buf = self._buf + text
        k, m = earliest(buf, self._ends)
        if k != -1:
            self._in, self._buf = False, ""
            # `</think>` is dropped; an implicit end (a tool-call section) begins the content
            rest = buf[k + len(m):] if m == self.end else buf[k:]
            return buf[:k].replace(self.start, ""), rest
        cut = len(buf) - held_suffix(buf, self._marks)
        self._buf = buf[cut:]
        return buf[:cut].replace(self.start, ""), ""

    def finish(self) -> tuple[str, str]:
        buf, self._buf = self._buf, ""
        return (buf.replace(self.start, ""), "") if self._in else ("", buf)


class Scrub:
    """Removes every occurrence of `word` from a text stream (holding a possible beginning), as
    `str.replace` on the whole text: occurrences in the text as written, not ones that removing
    another makes (`((no content)no content)` -> `(no content)`, however it is cut). `word`
    must not overlap itself (no proper prefix that is also a suffix), so a held beginning never
    belongs to an occurrence already removed."""

    __slots__ = ("_buf", "_marks", "word")

    def __init__(self, word: str):
        self.word = word
        self._marks = (word,)
        self._buf = ""

    def feed(self, text: str) -> str:
        buf = self._buf + text  # held raw: removing first could join a new occurrence
        cut = len(buf) - held_suffix(buf, self._marks)
        self._buf = buf[cut:]
        return buf[:cut].replace(self.word, "")

    def finish(self) -> str:
        buf, self._buf = self._buf, ""
        return buf


def scrub_placeholder(fmt: ReasoningFormat, content: str) -> str | None:
    """`content` without the format's placeholder; None when that leaves it empty (or, with a
    placeholder, blank)."""
    if fmt.placeholder:
        content = content.replace(fmt.placeholder, "")
        if not content.strip():
            content = ""
    return content or None


def extract_reasoning(fmt: ReasoningFormat, text: str, thinking: bool = True,
                      scrub: bool = True) -> tuple[str | None, str | None]:
    """A whole output -> (reasoning, content), as vLLM's extract_reasoning_content: reasoning
    is None when the request does not think; content is None when empty (or, with a
    placeholder, blank). `scrub=False` leaves the placeholder in (the caller removes it from
    the content left after the tool calls are taken out: see chat_parsing.ParsePlan)."""
    s = ThinkStream(fmt, thinking)
    r1, c1 = s.feed(text)
    r2, c2 = s.finish()
    content = c1 + c2
    return (r1 + r2 if thinking else None), (scrub_placeholder(fmt, content) if scrub
                                             else content or None)
