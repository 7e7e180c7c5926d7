"""Tool-call parsers (vLLM's `--tool-call-parser`): the model's text -> OpenAI tool calls.

A format is a handful of markers (`ToolFormat`); one state machine (`ToolCallStream`) reads any
of them from the detokenized text, streamed or whole:

    content <SECTION_BEGIN> <CALL_BEGIN> header <ARGS_BEGIN> arguments <CALL_END> ...
            <SECTION_END> content

- `kimi_k2` (Kimi-K2 / K2.5): `<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX
  <|tool_call_argument_begin|>{json}<|tool_call_end|>...<|tool_calls_section_end|>`; the id is
  the header as the model wrote it (`functions.NAME:IDX`, as vLLM's KimiK2ToolParser; Kimi's
  chat template writes it back as "## Return of {tool_call_id}"); a header without `:IDX` is
  malformed and the call dropped, as vLLM's. The singular variants
  `<|tool_call_section_begin|>` / `_end|>` are accepted too (vLLM does).
- `deepseek_v3` (DeepSeek-V3 / R1): `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>
  NAME\\n```json\\n{json}\\n```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>`; the id is a fresh
  `chatcmpl-tool-<hex>` (vLLM's make_tool_call_id).
- `deepseek_v31` (DeepSeek-V3.1, vLLM's DeepSeekV31ToolParser): the same section and call
  markers, `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{json}<｜tool▁call▁end｜>` (no type, no
  fence); ids as `deepseek_v3`'s.

The arguments are the model's own JSON text (not re-serialized), whitespace around them trimmed
(vLLM's regexes: `\\s*(...)\\s*`). Streamed, a call's first delta carries `id`, `type` and
`function.name` (sent once the header is complete), later ones pieces of `function.arguments`
as they are generated. Text that may be the beginning of a marker is held back until the next
text rules it in or out, so a marker split over deltas never leaks into `content`; trailing
whitespace of the arguments is held until more arguments follow. Text between calls inside the
section is dropped; text after the section is content again (vLLM's streaming parser does the
same; its non-streaming one drops it). A call whose header never completes, or whose name is
empty, is dropped; a call cut off by the end of the output keeps the arguments it has. A call
whose end marker is missing ends at the next call's begin or at the section's end, which then
do their own work (a new call, content again), never becoming argument text, nor does the
arguments' closing text written before them (DeepSeek's fence "```"); like a call cut
off by the end, it keeps the arguments it has (streamed, they are already sent; vLLM's
non-streaming regex drops such a call, its streaming parser has sent it too).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from atom_stream.protocol import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall

_HEADER_LIMIT = 1024  # characters: a longer call header is malformed output, the call dropped


def held_suffix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `markers` (the
    text to hold back until the next delta shows whether a marker begins there)."""
    best = 0
    n = len(text)
    for m in markers:
        j = text.find(m[0], max(0, n - len(m) + 1))
        while j != -1 and n - j > best:
            if m.startswith(text[j:]):
                best = n - j
                break
            j = text.find(m[0], j + 1)
    return best


def earliest(text: str, markers: tuple[str, ...]) -> tuple[int, str]:
    """(position, marker) of the first marker in `text`, (-1, "") when none."""
    best, which = -1, ""
    for m in markers:
        k = text.find(m)
        if k != -1 and (best == -1 or k < best or (k == best and len(m) > len(which))):
            best, which = k, m
    return best, which


@dataclass(frozen=True)
class ToolFormat:
    name: str
    section_begin: tuple[str, ...]
    section_end: tuple[str, ...]
    call_begin: str
    args_begin: str
    call_end: tuple[str, ...]  # the first one found ends the call
    # (header text, call index) -> (function name, tool call id)
    parse_header: Callable[[str, int], tuple[str, str]]

    @property
    def interrupts(self) -> tuple[str, ...]:
        """Markers that end an unfinished call (no call end written): the next call's begin
        and the section's end; the call keeps what it has, the marker is not its text."""
        return (self.call_begin, *self.section_end)

    @property
    def args_interrupts(self) -> tuple[str, ...]:
        """`interrupts` as the arguments see them: each also preceded by the text that closes
        the arguments before the end token (a call end marker that ends in another one:
        DeepSeek's "```" of "```<｜tool▁call▁end｜>"), so that text is not argument text."""
        closers = {e[:-len(f)] for e in self.call_end for f in self.call_end
                   if e != f and e.endswith(f)}
        return (*self.interrupts, *(c + i for c in sorted(closers) for i in self.interrupts))

    @property
    def markers(self) -> tuple[str, ...]:
        """The special-token texts the parser must see (kept in the detokenized text)."""
        return (*self.section_begin, *self.section_end, self.call_begin, self.args_begin,
                *self.call_end)


_KIMI_HEADER = re.compile(r"(.+?):\d+", re.DOTALL)


def _kimi_header(header: str, index: int) -> tuple[str, str]:
    """`functions.NAME:IDX` (or `NAME:IDX`) -> (NAME, the header as the id); a header without
    the `:IDX` -> ("", "") (the call dropped: vLLM's regexes require `[^<]+:\\d+` for the id)."""
    h = header.strip()
    m = _KIMI_HEADER.fullmatch(h)
    if not m:
        return "", ""
    return m[1].removeprefix("functions."), h


_DS_SEP = "<｜tool▁sep｜>"


def _deepseek_header(header: str, index: int) -> tuple[str, str]:
    _, sep, name = header.partition(_DS_SEP)
    return (name if sep else header).strip(), f"chatcmpl-tool-{uuid.uuid4().hex}"


KIMI_K2 = ToolFormat(
    "kimi_k2",
    section_begin=("<|tool_calls_section_begin|>", "<|tool_call_section_begin|>"),
    section_end=("<|tool_calls_section_end|>", "<|tool_call_section_end|>"),
    call_begin="<|tool_call_begin|>", args_begin="<|tool_call_argument_begin|>",
    call_end=("<|tool_call_end|>",), parse_header=_kimi_header)

DEEPSEEK_V3 = ToolFormat(
    "deepseek_v3",
    section_begin=("<｜tool▁calls▁begin｜>",), section_end=("<｜tool▁calls▁end｜>",),
    call_begin="<｜tool▁call▁begin｜>", args_begin="```json",
    # the closing fence belongs to the end marker; a bare end token is accepted too
    call_end=("```<｜tool▁call▁end｜>", "<｜tool▁call▁end｜>"), parse_header=_deepseek_header)


def _deepseek_v31_header(header: str, index: int) -> tuple[str, str]:
    return header.strip(), f"chatcmpl-tool-{uuid.uuid4().hex}"


DEEPSEEK_V31 = ToolFormat(
    "deepseek_v31",
    section_begin=("<｜tool▁calls▁begin｜>",), section_end=("<｜tool▁calls▁end｜>",),
    call_begin="<｜tool▁call▁begin｜>", args_begin=_DS_SEP, call_end=("<｜tool▁call▁end｜>",),
    parse_header=_deepseek_v31_header)

TOOL_PARSERS: dict[str, ToolFormat] = {f.name: f for f in (KIMI_K2, DEEPSEEK_V3, DEEPSEEK_V31)}

_CONTENT, _SECTION, _HEADER, _ARGS, _SKIP = range(5)


class ToolCallStream:
    """One choice's tool-call parser. `feed(text)` -> (content, deltas) for the text this
    step adds; `finish()` the same for the text still held at the end. `calls` holds every
    call found so far as [id, name, [argument pieces]]; `entered` says whether a tool-call
    section began."""

    __slots__ = ("_buf", "_header", "_started", "_state", "_ws", "calls", "entered", "fmt")

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self._state = _CONTENT
        self._buf = ""
        self._header = ""
        self._ws = ""  # trailing whitespace of the arguments, held until more follows
        self._started = False  # the current call's arguments have begun
        self.calls: list[list] = []
        self.entered = False

    def feed(self, text: str) -> tuple[str, list[DeltaToolCall]]:
        content: list[str] = []
        deltas: list[DeltaToolCall] = []
        self._buf += text
        while self._buf and self._step(content, deltas):
            pass
        return "".join(content), deltas

    def finish(self) -> tuple[str, list[DeltaToolCall]]:
        content: list[str] = []
        deltas: list[DeltaToolCall] = []
        buf, self._buf = self._buf, ""
        if self._state == _CONTENT:
            content.append(buf)
        elif self._state == _ARGS:  # cut off: a held piece of the call's end is not argument
            self._args(buf[:len(buf) - held_suffix(buf, self.fmt.call_end)], deltas, final=True)
        self._state = _CONTENT if self._state == _CONTENT else _SECTION
        return "".join(content), deltas

    def tool_calls(self) -> list[ToolCall]:
        return [ToolCall(cid, "function", FunctionCall(name, "".join(parts)))
                for cid, name, parts in self.calls]

    # ------------------------------------------------------------------ states
    def _step(self, content: list[str], deltas: list[DeltaToolCall]) -> bool:
        """Consume what the buffer allows; True when a marker was passed (go on)."""
        fmt, buf, state = self.fmt, self._buf, self._state
        if state == _CONTENT:
            k, m = earliest(buf, fmt.section_begin)
            if k == -1:
                cut = len(buf) - held_suffix(buf, fmt.section_begin)
                content.append(buf[:cut])
                self._buf = buf[cut:]
                return False
            content.append(buf[:k])
            self._buf = buf[k + len(m):]
            self._state = _SECTION
            self.entered = True
            return True
        if state == _SECTION:  # between calls: wait for the next call or the section's end
            stops = fmt.interrupts  # the next call's begin, the section's end
            k, m = earliest(buf, stops)
            if k == -1:
                self._buf = buf[len(buf) - held_suffix(buf, stops):]  # the rest is dropped
                return False
            self._buf = buf[k + len(m):]
            self._after(m)
            return True
        if state == _HEADER:
            stops = (fmt.args_begin, *fmt.call_end, *fmt.interrupts)
            k, m = earliest(buf, stops)
            if k == -1:
                cut = len(buf) - held_suffix(buf, stops)
                self._header += buf[:cut]
                self._buf = buf[cut:]
                if len(self._header) > _HEADER_LIMIT:
                    self._state = _SKIP
                return False
            self._buf = buf[k + len(m):]
            if m != fmt.args_begin:  # a call without arguments marker: malformed, dropped
                self._after(m)
                return True
            header = self._header + buf[:k]
            if len(header) > _HEADER_LIMIT:  # whether it came in one piece or many
                self._state = _SKIP
                return True
            name, cid = fmt.parse_header(header, len(self.calls))
            if not name:
                self._state = _SKIP
                return True
            self.calls.append([cid, name, []])
            deltas.append(DeltaToolCall(id=cid, type="function", index=len(self.calls) - 1,
                                        function=DeltaFunctionCall(name=name)))
            self._state, self._started, self._ws = _ARGS, False, ""
            return True
        # _ARGS / _SKIP: up to the end of the call (or a marker that cuts it short, with the
        # arguments' closing text before it: DeepSeek's fence)
        stops = (*fmt.call_end, *fmt.args_interrupts)
        k, m = earliest(buf, stops)
        if k == -1:
            cut = len(buf) - held_suffix(buf, stops)
            if state == _ARGS:
                self._args(buf[:cut], deltas, final=False)
            self._buf = buf[cut:]
            return False
        if state == _ARGS:
            self._args(buf[:k], deltas, final=True)
        self._buf = buf[k + len(m):]
        self._after(m)
        return True

    def _after(self, marker: str) -> None:
        """The state after `marker` ends a call or the gap between calls: a call begin starts
        the next call's header, a section end returns to content, a call end waits in the
        section."""
        if marker.endswith(self.fmt.call_begin):  # also with a closing text before it
            self._state, self._header = _HEADER, ""
        elif marker.endswith(self.fmt.section_end):
            self._state = _CONTENT
        else:
            self._state = _SECTION

    def _args(self, piece: str, deltas: list[DeltaToolCall], final: bool) -> None:
        piece = self._ws + piece
        if not self._started:
            piece = piece.lstrip()
        keep = piece.rstrip()
        self._ws = "" if final else piece[len(keep):]
        if not keep:
            return
        self._started = True
        index = len(self.calls) - 1
        self.calls[index][2].append(keep)
        last = deltas[-1] if deltas else None
        if last is not None and last.index == index:  # its name went out in this same step
            fn = last.function
            fn.arguments = fn.arguments + keep if isinstance(fn.arguments, str) else keep
        else:
            deltas.append(DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=keep)))


def extract_tool_calls(fmt: ToolFormat, text: str) -> tuple[str | None, list[ToolCall]]:
    """A whole output -> (content, tool calls). Without a tool-call section the text is the
    content unchanged; with one, content is the text outside it (None when empty)."""
    s = ToolCallStream(fmt)
    c1, _ = s.feed(text)
    c2, _ = s.finish()
    if not s.entered:
        return text, []
    return (c1 + c2) or None, s.tool_calls()
