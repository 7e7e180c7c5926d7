"""Tokenizers: the `Tokenizer` interface, the demo byte-level tokenizer, the Hugging Face adapter
and `load_tokenizer`, which picks one for a model path.

`load_tokenizer(path)`:
- `None` / `"demo"`: `DemoTokenizer` (ids 0..255 = raw bytes, specials 256..319, vocab 320, EOS
  (257, 262), Kimi-like chat format without a default system message or think tags).
- a directory with `tiktoken.model` + `tokenizer_config.json`: the native Kimi tokenizer
  (`tokenizers_kimi.KimiTokenizer`; no remote code, nothing imported from the checkpoint). Its chat
  format is the built-in Kimi renderer, even when the directory ships `chat_template.jinja` or a
  `chat_template` in tokenizer_config.json, unless `trust_remote_code=True`, in which case the
  checkpoint's jinja template is rendered (jinja is data, not code: it runs sandboxed).
- anything else: `transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)`.
- `chat_template` (a file path or a literal jinja string) overrides the chat format of any of
  them. A path where nothing loads raises ValueError naming it.

Interface contracts (every tokenizer):
- `encode(text)` never prepends BOS. `add_special_tokens=True` asks for what the checkpoint's
  own tokenizer adds to a text prompt, as vLLM's completions do: an HF tokenizer its own
  (DeepSeek-V3: BOS), Kimi nothing (its TikTokenTokenizer has no BOS rule:
  reference/model_spec.md "no BOS is added"), the demo / preset tokenizers nothing (Kimi-like).
  For Kimi/demo, special-token strings in the text become their control ids.
- `decode(ids, skip_special_tokens=True)`: ids outside [0, vocab_size) raise ValueError; invalid
  UTF-8 decodes to U+FFFD. decode(encode(s), skip_special_tokens=False) == s for any str s.
- `token_bytes(id)`: the raw bytes of a byte-level vocabulary's token, None for specials / when
  the vocabulary is not byte-level. `byte_table(skip)` (cached): bytes for every id, specials as
  b"" (skip) or their UTF-8 text, or None when not byte-level; the detokenizer's fast path.
- `eos_token_ids`: tuple, the tokenizer's EOS plus `generation_config.json`'s eos_token_id(s).
- Jinja chat templates (HF's, a `chat_template` override, Kimi's with trust_remote_code) see the
  messages as vLLM passes them (`chat_template.template_messages`): tool-call arguments given
  as JSON text are objects; the built-in Kimi / demo renderers write such text as given.
"""

from __future__ import annotations

import json
import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any

from atom_stream.chat_template import (
    checkpoint_chat_template,
    cut_at_continue_tag,
    render_jinja,
    render_template_messages,
    resolve_chat_template,
    tag_final_message,
)
from atom_stream.config import generation_eos_ids

logger = logging.getLogger(__name__)

Message = dict[str, Any]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the form HF byte-level vocabularies
    store tokens in)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


BYTE_TO_UNICODE = bytes_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}


def bytes_to_token_str(b: bytes) -> str:
    return "".join(BYTE_TO_UNICODE[x] for x in b)


class Tokenizer(ABC):
    """What the engine, the servers and the detokenizer need from a tokenizer."""

    vocab_size: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    all_special_ids: frozenset[int]

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str: ...

    @abstractmethod
    def id_to_str(self, token_id: int) -> str:
        """The vocabulary's string for one id (GPT-2 byte form for byte-level BPE)."""

    @abstractmethod
    def _render_chat(self, messages: list[Message], add_generation_prompt: bool,
                     **kwargs: Any) -> str: ...

    _chat_template: str | None = None  # a jinja override, rendered instead of _render_chat

    def chat_template_source(self) -> str | None:
        """The jinja text chats are rendered with (None: the built-in renderer)."""
        return self._chat_template

    @property
    def eos_token_id(self) -> int | None:
        """Hugging Face's attribute: the first EOS id (None without one)."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def token_bytes(self, token_id: int) -> bytes | None:
        return None

    def is_special(self, token_id: int) -> bool:
        return token_id in self.all_special_ids

    def special_text(self, token_id: int) -> str:
        """The text a special token decodes to when specials are kept."""
        return self.id_to_str(token_id)

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True,
                            continue_final_message: bool = False, tokenize: bool = False,
                            **chat_template_kwargs: Any) -> str | list[int]:
        """OpenAI-style messages -> the prompt string. Extra keywords (e.g. `thinking`, `tools`)
        reach the template. `continue_final_message`: the prompt ends inside the last message
        (rendered without a generation prompt and cut right where that message's content ends,
        as transformers' apply_chat_template does: see `tag_final_message`); both it and
        `add_generation_prompt` -> a ValueError (vLLM's check_generation_prompt). `tokenize`
        (Hugging Face's keyword; default False here): the prompt's ids instead of the string."""
        if tokenize:
            return self.encode_chat(messages, add_generation_prompt, continue_final_message,
                                    **chat_template_kwargs)
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("messages must be a list of dicts")
        if continue_final_message and add_generation_prompt:
            raise ValueError("Cannot set both `continue_final_message` and "
                             "`add_generation_prompt` to True.")
        final_text = None
        if continue_final_message:
            messages, final_text = tag_final_message(messages)
        try:
            if self._chat_template is not None:
                rendered = self._render_override(messages, add_generation_prompt,
                                                 chat_template_kwargs)
            else:
                rendered = self._render_chat(messages, add_generation_prompt,
                                             **chat_template_kwargs)
        except Exception as e:
            # a jinja TemplateError (the template's raise_exception, an undefined name) is the
            # request's fault: a ValueError (400, as vLLM answers it), not an internal error
            if type(e).__module__.split(".", 1)[0] == "jinja2":
                raise ValueError(f"chat template error: {e}") from None
            raise
        if final_text is not None:
            rendered = cut_at_continue_tag(rendered, final_text)
        return rendered

    def _render_override(self, messages: list[Message], add_generation_prompt: bool,
                         kwargs: dict[str, Any]) -> str:
        return render_jinja(self._chat_template, messages, add_generation_prompt,
                            self._template_vars(), kwargs)

    def encode_chat(self, messages: list[Message], add_generation_prompt: bool = True,
                    continue_final_message: bool = False, add_special_tokens: bool = False,
                    **chat_template_kwargs: Any) -> list[int]:
        """The rendered chat prompt's ids. `add_special_tokens` (vLLM's chat default: false, the
        template holds the specials) adds the tokenizer's own prefix (an HF BOS) on top."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt,
                                                    continue_final_message,
                                                    **chat_template_kwargs),
                           add_special_tokens=add_special_tokens)

    def _template_vars(self) -> dict[str, Any]:
        bos = self.bos_token_id
        eos = self.eos_token_ids[0] if self.eos_token_ids else None
        return {"bos_token": self.id_to_str(bos) if bos is not None else "",
                "eos_token": self.id_to_str(eos) if eos is not None else ""}

    def byte_table(self, skip_special_tokens: bool) -> list[bytes] | None:
        """Bytes of every id (specials: b"" or their text), cached; None if not byte-level."""
        cache = self.__dict__.setdefault("_byte_tables", {})
        if skip_special_tokens not in cache:
            cache[skip_special_tokens] = self._build_byte_table(skip_special_tokens)
        return cache[skip_special_tokens]

    def _build_byte_table(self, skip_special_tokens: bool) -> list[bytes] | None:
        table = []
        for i in range(self.vocab_size):
            if self.is_special(i):
                table.append(b"" if skip_special_tokens else self.special_text(i).encode())
                continue
            b = self.token_bytes(i)
            if b is None:
                return None
            table.append(b)
        return table

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(t) for t in ids]
        n = self.vocab_size
        for t in ids:
            if not 0 <= t < n:
                raise ValueError(f"token id {t} is not in [0, {n})")
        return ids


# ------------------------------------------------------------------------------------ demo
DEMO_SPECIALS = {256: "<|bos|>", 257: "<|eos|>", 258: "<|im_user|>", 259: "<|im_assistant|>",
                 260: "<|im_system|>", 261: "<|im_middle|>", 262: "<|im_end|>"}
DEMO_SPECIALS.update({i: f"<|reserved_{i}|>" for i in range(263, 320)})
_GIL_SLICE = 1 << 16  # bytes per C-level step of a long encode (see DemoTokenizer.encode)


def special_splitter(names: Iterable[str]) -> re.Pattern:
    """A regex with one capture group matching any of `names` (longest first)."""
    alts = sorted(names, key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, alts)) + ")")


class DemoTokenizer(Tokenizer):
    """The embedded demo model's byte-level tokenizer (see the module docstring)."""

    vocab_size = 320
    bos_token_id = 256
    eos_token_ids = (257, 262)
    all_special_ids = frozenset(range(256, 320))

    def __init__(self, chat_template: str | None = None):
        self._chat_template = chat_template
        self._name_to_id = {v: k for k, v in DEMO_SPECIALS.items()}
        self._split = special_splitter(DEMO_SPECIALS.values())

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        prefix: list[int] = []  # Kimi-like: no BOS even with add_special_tokens
        if "<|" not in text:  # fast path: no special names possible
            data = text.encode()
            if len(data) <= _GIL_SLICE:
                return list(data)
            # one C call over megabytes holds the GIL for tens of ms: the event loop thread
            # (which this runs beside, in the executor) gets a turn between slices
            for i in range(0, len(data), _GIL_SLICE):
                prefix.extend(data[i:i + _GIL_SLICE])
            return prefix
        ids = prefix
        for i, part in enumerate(self._split.split(text)):
            if i % 2:
                ids.append(self._name_to_id[part])
            elif part:
                ids.extend(part.encode())
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        out = bytearray()
        for t in self._check_ids(ids):
            if t < 256:
                out.append(t)
            elif not skip_special_tokens:
                out += DEMO_SPECIALS[t].encode()
        return out.decode("utf-8", "replace")

    def token_bytes(self, token_id: int) -> bytes | None:
        return bytes((token_id,)) if 0 <= token_id < 256 else None

    def id_to_str(self, token_id: int) -> str:
        if 0 <= token_id < 256:
            return BYTE_TO_UNICODE[token_id]
        return DEMO_SPECIALS[token_id]

    def _render_chat(self, messages: list[Message], add_generation_prompt: bool,
                     **kwargs: Any) -> str:
        from atom_stream.tokenizers_kimi import render_kimi_chat
        return render_kimi_chat(messages, add_generation_prompt, default_system=None,
                                think_tags=False, template_kwargs=kwargs)


class PresetTokenizer(DemoTokenizer):
    """The demo tokenizer stretched to a bench preset's vocabulary (`k25-tp8-rank`: 20,480 ids,
    dummy weights, no tokenizer files). Ids 0..319 are the demo's; every id from 320 up decodes
    to a fixed ASCII word (" t<hex id>", lowercase, no leading zero), so any sampled id streams
    as text, and encode() maps such a word back to its id (other text: the demo's bytes and
    specials), so random benchmark prompts keep their token counts and decode(encode(s)) == s."""

    _WORD = re.compile(r"( t[1-9a-f][0-9a-f]{2,4})(?![0-9a-f])")

    def __init__(self, vocab_size: int, chat_template: str | None = None):
        super().__init__(chat_template)
        if vocab_size < DemoTokenizer.vocab_size:
            raise ValueError(f"preset vocab {vocab_size} is smaller than the demo's 320")
        self.vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if " t" not in text:
            return super().encode(text, add_special_tokens)
        ids: list[int] = []  # as the demo: no BOS
        for i, part in enumerate(self._WORD.split(text)):
            if i % 2 and 320 <= (t := int(part[2:], 16)) < self.vocab_size:  # noqa: FURB166
                ids.append(t)
            elif part:
                ids.extend(super().encode(part))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = self._check_ids(ids)
        if all(t < 320 for t in ids):
            return super().decode(ids, skip_special_tokens)
        out = bytearray()
        for t in ids:
            b = self.token_bytes(t)
            if b is not None:
                out += b
            elif not skip_special_tokens:
                out += DEMO_SPECIALS[t].encode()
        return out.decode("utf-8", "replace")

    def token_bytes(self, token_id: int) -> bytes | None:
        if 320 <= token_id < self.vocab_size:
            return b" t%x" % token_id
        return super().token_bytes(token_id)

    def id_to_str(self, token_id: int) -> str:
        if 320 <= token_id < self.vocab_size:
            return "".join(BYTE_TO_UNICODE[c] for c in self.token_bytes(token_id))
        return super().id_to_str(token_id)


def preset_tokenizer(model: str | None, chat_template: str | None = None
                     ) -> PresetTokenizer | None:
    """The tokenizer of a dummy-weight bench preset (`models/presets.py`) named `model`, or
    None when `model` is not a preset. The server and the benchmark client both use it."""
    from atom_stream.models.presets import PRESETS
    if model not in PRESETS:
        return None
    return PresetTokenizer(PRESETS[model]["vocab_size"], chat_template=chat_template)


# ------------------------------------------------------------------------------ hugging face
class HFTokenizer(Tokenizer):
    """Adapter over a transformers tokenizer. Byte-level BPE vocabularies (ByteLevel decoder)
    get `token_bytes`, so the detokenizer takes the byte path."""

    def __init__(self, tok: Any, chat_template: str | None = None,
                 extra_eos: Sequence[int] = ()):
        self._tok = tok
        self._chat_template = chat_template
        self.vocab_size = len(tok)
        self.bos_token_id = tok.bos_token_id
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        self.eos_token_ids = tuple(dict.fromkeys([*eos, *extra_eos]))
        self.all_special_ids = frozenset(tok.all_special_ids)
        self._added = {i: t.content for i, t in tok.added_tokens_decoder.items()}
        self._byte_level = _has_byte_level_decoder(tok)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens,
                                clean_up_tokenization_spaces=False)

    def id_to_str(self, token_id: int) -> str:
        s = self._tok.convert_ids_to_tokens(int(token_id))
        return s if s is not None else ""

    def special_text(self, token_id: int) -> str:
        return self._added.get(token_id) or self.id_to_str(token_id)

    def token_bytes(self, token_id: int) -> bytes | None:
        if not self._byte_level or self.is_special(token_id):
            return None
        if token_id in self._added:  # added tokens are stored as plain text
            return self._added[token_id].encode()
        try:
            return bytes(UNICODE_TO_BYTE[c] for c in self.id_to_str(token_id))
        except KeyError:
            return None

    def _build_byte_table(self, skip_special_tokens: bool) -> list[bytes] | None:
        if not self._byte_level:
            return None
        strs = self._tok.convert_ids_to_tokens(list(range(self.vocab_size)))  # one batched call
        table = []
        for i, s in enumerate(strs):
            if self.is_special(i):
                table.append(b"" if skip_special_tokens else self.special_text(i).encode())
            elif i in self._added:
                table.append(self._added[i].encode())
            else:
                try:
                    table.append(bytes([UNICODE_TO_BYTE[c] for c in s or ""]))
                except KeyError:
                    return None
        return table

    def _render_chat(self, messages: list[Message], add_generation_prompt: bool,
                     **kwargs: Any) -> str:
        def render(msgs: list[Message]) -> str:
            return self._tok.apply_chat_template(msgs, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt,
                                                 **kwargs)
        return render_template_messages(render, messages)

    def chat_template_source(self) -> str | None:
        src = self._chat_template or getattr(self._tok, "chat_template", None)
        return src if isinstance(src, str) else None

    def _render_override(self, messages: list[Message], add_generation_prompt: bool,
                         kwargs: dict[str, Any]) -> str:
        # HF renders the override with its own variables (bos_token, eos_token, ...)
        return self._render_chat(messages, add_generation_prompt,
                                 chat_template=self._chat_template, **kwargs)


def _has_byte_level_decoder(tok: Any) -> bool:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return False
    try:
        return json.loads(backend.to_str()).get("decoder", {}).get("type") == "ByteLevel"
    except (ValueError, AttributeError):
        return False


# ------------------------------------------------------------------------------ loading
def load_tokenizer(model_path: str | None, *, trust_remote_code: bool = False,
                   chat_template: str | None = None) -> Tokenizer:
    """The tokenizer for `model_path` (see the module docstring for the rules)."""
    template = resolve_chat_template(chat_template)
    if model_path is None or model_path == "demo":
        return DemoTokenizer(chat_template=template)
    path = os.path.expanduser(model_path)
    if os.path.isfile(os.path.join(path, "tiktoken.model")) and os.path.isfile(
            os.path.join(path, "tokenizer_config.json")):
        from atom_stream.tokenizers_kimi import KimiTokenizer
        if template is None and trust_remote_code:
            template = checkpoint_chat_template(path)
        try:
            return _warm(KimiTokenizer(path, chat_template=template,
                                       extra_eos=generation_eos_ids(path)))
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"cannot load the Kimi tokenizer in {model_path!r}: {e}") from e
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"tokenizer path {model_path!r} is a file, not a model directory")
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                            local_files_only=True)
    except Exception as e:
        raise ValueError(f"no loadable tokenizer at {model_path!r}: {type(e).__name__}: {e}"
                         ) from e
    extra = generation_eos_ids(path) if os.path.isdir(path) else ()
    return _warm(HFTokenizer(tok, chat_template=template, extra_eos=extra))


def _warm(tok: Tokenizer) -> Tokenizer:
    """Build the detokenizer's byte tables now (at load, off the event loop), not on the first
    request."""
    tok.byte_table(True)
    tok.byte_table(False)
    return tok
