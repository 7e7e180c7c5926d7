"""Client frames of `/v1/ws` as the connection (server/websocket.py) first reads them: the
frame structs that refuse unknown top-level fields, a generate frame's `params` read as the
OpenAI routes read the same fields (`sampling_kwargs`), an error's `param` named as the frame
names it (`frame_param`), the request id of an oversized frame found without parsing it
(`sniff_id`), and the frames read ahead while the connection's reading is paused (`ReadAhead`)."""

from __future__ import annotations

import contextlib
import re
from collections import Counter, deque
from typing import Any

import msgspec

from atom_stream.protocol import WsAuth, WsCancel, WsGenerate
from atom_stream.sampling_params import SamplingParams
from atom_stream.server.openai_params import cap_max_tokens

MAX_ID_LEN = 256

# params names (n must be 1: one choice per request id; prompt_logprobs is refused with its
# own message)
# output_kind is the in-process API's stream shape; frames are always deltas; the vLLM
# pass-through keywords of in-process code (plugin args, copy / storage switches, the older
# name of structured_outputs) are no frame parameters. `structured_outputs` is one: a dict of
# StructuredOutputsParams fields ({"json": schema} / {"regex": ...} / {"choice": [...]} /
# {"json_object": true})
IN_PROCESS_ONLY = frozenset({"output_kind", "extra_args", "skip_clone", "flat_logprobs",
                             "guided_decoding"})
PARAM_NAMES = frozenset(f for f in SamplingParams.__struct_fields__
                         if not f.startswith("_")) - IN_PROCESS_ONLY
PROMPT_FIELDS = ("prompt", "prompt_token_ids", "messages")


# Client frames as first decoded here: an unknown top-level field sends the frame to
# _Connection.refused (a sampling parameter there is an error: a `max_tokens` next to `prompt`
# instead of under `params` was silently ignored; other unknown fields are ignored).
class LenientGenerate(WsGenerate):
    # null is the defaults, as an omitted "params" (JSON clients that send every key)
    params: dict[str, Any] | None = msgspec.field(default_factory=dict)


class StrictGenerate(LenientGenerate, forbid_unknown_fields=True):
    pass


class StrictCancel(WsCancel, forbid_unknown_fields=True):
    pass


class StrictAuth(WsAuth, forbid_unknown_fields=True):
    pass


ClientFrameStruct = StrictGenerate | StrictCancel | StrictAuth
LenientFrameStruct = LenientGenerate | WsCancel | WsAuth  # unknown top-level fields ignored
UNKNOWN_FIELD = re.compile(r"unknown field `([^`]*)`")
SAMPLING_NAMES = frozenset(f for f in SamplingParams.__struct_fields__ if not f.startswith("_"))
DECODE_ERRORS = (msgspec.ValidationError, msgspec.DecodeError, RecursionError,
                  UnicodeDecodeError)
# generate-frame fields an error may name as they are (everything else is under "params.")
_FRAME_FIELDS = frozenset({"id", "prompt", "prompt_token_ids", "messages",
                           "chat_template_kwargs", "add_generation_prompt",
                           "continue_final_message"})


_INT_PARAMS = frozenset(f.name for f in msgspec.structs.fields(SamplingParams)
                        if f.type in (int, int | None))
_DEFAULT_MAX_TOKENS = SamplingParams().max_tokens


def sampling_kwargs(given: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """A generate frame's `params` -> SamplingParams keywords, as the OpenAI routes read the
    same fields (openai_params.build_sampling_params): null means the parameter's default
    (`max_tokens` null: as many as fit, as over HTTP), `logprobs` / `prompt_logprobs` false
    means none; an integral float is an int (pydantic's
    lax mode, as HTTP decodes); the checkpoint's generation_config.json `defaults` fill the
    fields the frame leaves out, its `max_tokens` caps the frame's (vLLM's
    get_diff_sampling_param / get_max_tokens)."""
    kw: dict[str, Any] = {}
    for name, value in given.items():
        if isinstance(value, float) and name in _INT_PARAMS and value.is_integer():
            value = int(value)
        if value is False and name in ("logprobs", "prompt_logprobs"):
            value = None  # off, as a client means it (in-process, vLLM reads False as 0)
        if value is not None or name == "max_tokens":
            kw[name] = value
    for name, value in defaults.items():
        if name != "max_tokens":
            kw.setdefault(name, value)
    if defaults.get("max_tokens") is not None:
        kw["max_tokens"] = cap_max_tokens(kw.get("max_tokens", _DEFAULT_MAX_TOKENS), defaults)
    return kw


def frame_param(param: str | None, prompt_field: str) -> str | None:
    """An error's param as the generate frame names it: sampling parameters under "params.",
    the engine's "prompt" as the prompt field the frame gave (prompt / prompt_token_ids /
    messages), frame fields and vLLM's "input_tokens" (prompt too long) as they are."""
    if not param:
        return param
    root = param.split("[", 1)[0].split(".", 1)[0]
    if root == "prompt":
        return prompt_field + param[len("prompt"):]
    if root == "params" or root in _FRAME_FIELDS or root == "input_tokens":  # vLLM's name
        return param
    return f"params.{param}"


# an "id" key and its JSON string, escapes included (the string is decoded by msgspec)
_JSON_ID = re.compile(rb'"id"\s*:\s*("(?:[^"\\]|\\.){1,3072}")')
_SNIFF_BYTES = 4096  # a 256-character id, \\uXXXX-escaped surrogate pairs (12 bytes each)


def frame_size(data: bytes | str) -> int:
    """A frame's size in bytes: a text frame's UTF-8 size, not its character count."""
    if isinstance(data, bytes) or data.isascii():
        return len(data)
    return len(data.encode("utf-8", "surrogatepass"))


class ReadAhead:
    """Client messages received while the connection's reading is paused (its client reads
    nothing and too much output waits), kept in order until reading resumes. Receiving goes on
    meanwhile so that a close frame (the disconnect behind these messages) ends the connection
    at once and uvicorn answers pings; it stops once `full()` (MAX_FRAMES messages or MAX_BYTES
    of payload, plus the one message that crossed it): TCP then pushes back on the client.

    `may_overtake(rid)`: a frame for `rid` may be acted on before the held ones, as no held frame
    names `rid` or has an id not found by `sniff_id`."""

    MAX_FRAMES = 64
    MAX_BYTES = 1 << 20

    def __init__(self) -> None:
        self._held: deque[tuple[dict, int, str | None]] = deque()
        self._bytes = 0
        self._ids: Counter[str | None] = Counter()

    def __len__(self) -> int:
        return len(self._held)

    def full(self) -> bool:
        return len(self._held) >= self.MAX_FRAMES or self._bytes >= self.MAX_BYTES

    def push(self, message: dict, data: bytes | str | None) -> None:
        size = 0 if data is None else frame_size(data)
        rid = None if data is None else sniff_id(data)
        self._held.append((message, size, rid))
        self._bytes += size
        self._ids[rid] += 1

    def pop(self) -> dict:
        message, size, rid = self._held.popleft()
        self._bytes -= size
        self._ids[rid] -= 1
        if not self._ids[rid]:
            del self._ids[rid]
        return message

    def may_overtake(self, rid: str) -> bool:
        return rid not in self._ids and None not in self._ids


def sniff_id(data: bytes | str) -> str | None:
    """The request id of an oversized frame, if it appears in its first `_SNIFF_BYTES` (the SDK
    and msgspec put it right after "type"); the frame itself is never parsed. Any valid id is
    found: JSON escapes are decoded, MessagePack fixstr / str8 / str16 values read. None when no
    id of 1..MAX_ID_LEN characters is there."""
    head = data[:_SNIFF_BYTES]
    if isinstance(head, str):
        head = head.encode("utf-8", "surrogatepass")
    rid: str | None = None
    m = _JSON_ID.search(head)
    if m:
        with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
            rid = msgspec.json.decode(m.group(1), type=str)
    else:
        at = head.find(b"\xa2id")  # msgpack: fixstr "id", then a fixstr/str8/str16 value
        tag = head[at + 3] if 0 <= at < len(head) - 3 else None
        start, n = at + 4, -1
        if tag is not None and 0xA0 <= tag <= 0xBF:
            n = tag - 0xA0
        elif tag == 0xD9 and at + 4 < len(head):
            start, n = at + 5, head[at + 4]
        elif tag == 0xDA and at + 5 < len(head):
            start, n = at + 6, int.from_bytes(head[at + 4:at + 6], "big")
        if n >= 0 and start + n <= len(head):
            with contextlib.suppress(UnicodeDecodeError):
                rid = head[start:start + n].decode("utf-8")
    return rid if rid and len(rid) <= MAX_ID_LEN else None
