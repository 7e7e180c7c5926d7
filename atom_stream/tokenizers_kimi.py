"""The native Kimi tokenizer (tiktoken BPE, no remote code) and the Kimi chat format.

Checkpoint files read: `tiktoken.model` (base64-token/rank lines, ids 0..N-1) and
`tokenizer_config.json` (`added_tokens_decoder` names the 256 special slots N..N+255; unnamed
slots are `<|reserved_token_{i}|>`; `bos_token`/`eos_token` name BOS/EOS, default [BOS]/[EOS]).
Nothing from the checkpoint is imported or executed.

- `encode`: the text is cut into 400k-character windows, then into runs of at most 25k
  consecutive whitespace / non-whitespace characters (tiktoken's regex recursion limit), each
  encoded with `allowed_special="all"` (special names in the text become control tokens); no BOS.
- `pat_str` is Kimi's verbatim. tiktoken's regex engine (fancy-regex over the Rust regex crate)
  accepts its `&&` class intersections; `PAT_STR_PORTABLE` is the same pattern with
  `[X&&[^\\p{Han}]]` rewritten as `(?:(?!\\p{Han})[X])`, used if a tiktoken build rejects `&&`
  (the test suite checks that both split identically).
- Special ids (skipped by `decode(skip_special_tokens=True)`): unnamed slots, slots whose
  `added_tokens_decoder` entry has `"special": true`, and the bos/eos/unk/pad and
  `additional_special_tokens` names. EOS ids: [EOS], <|im_end|>, generation_config's.

Chat format (`render_kimi_chat`; K2/K2.5 as in model_spec §5 and the checkpoints'
chat_template.jinja, byte for byte; no newlines between turns):
`<|im_system|>system<|im_middle|>{..}<|im_end|><|im_user|>user<|im_middle|>{..}<|im_end|>`
`<|im_assistant|>assistant<|im_middle|><think>{reasoning}</think>{content}[tool calls]<|im_end|>`
- `tools` (chat_template_kwargs / request tools) come first, in a `tool_declare` system turn:
  deep-sorted (tokenization_kimi.py's `deep_sort_dict`), then K2.5's TypeScript-style
  declaration (`encode_tools_typescript`, a port of its tool_declaration_ts.py) or, for K2 and
  when that fails or is empty, compact JSON;
- the default system turn is written when messages[0] is not a system message (before every
  message, as the template checks messages[0] only);
- think tags (`KimiChatFormat.think_tags`): every assistant turn up to the last assistant
  message without tool calls gets an empty `<think></think>`; later ones keep their reasoning
  (the first non-None of reasoning_content / thinking / reasoning, transformers' aliasing)
  unless `thinking=False` (K2.5); the K2.5 generation prompt ends in `<think>` (thinking, the
  default) or `<think></think>` (`chat_template_kwargs={"thinking": false}`), K2-Thinking's at
  `<|im_middle|>`; `detect_chat_format` tells the variants apart from the checkpoint's files;
- tool calls: `functions.{name}:{index}` when a call has no id; arguments as given when a
  string, else JSON (`tojson`: ", " / ": " separators);
- tool results: `<|im_system|>{name|tool}<|im_middle|>## Return of {tool_call_id}\\n{content}`;
- a message's `name`, when set, replaces the role name in its header (as the HF template does);
- image/audio content parts raise ValueError (text backbone only).
With a jinja template (`trust_remote_code` or `chat_template`), the template gets what Kimi's
own apply_chat_template passes: deep-sorted `tools` and, for K2.5, `tools_ts_str`.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import tiktoken

from atom_stream.tokenizer import Message, Tokenizer, bytes_to_token_str
from atom_stream.tool_declaration_ts import encode_tools_typescript

logger = logging.getLogger(__name__)

NUM_SPECIAL_SLOTS = 256
WINDOW_CHARS = 400_000
MAX_RUN_CHARS = 25_000
DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."

_LETTERS_UPPER = r"\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}"
_LETTERS_LOWER = r"\p{Ll}\p{Lm}\p{Lo}\p{M}"
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"


def _kimi_pattern(upper: str, lower: str) -> str:
    return "|".join([
        r"[\p{Han}]+",
        rf"[^\r\n\p{{L}}\p{{N}}]?{upper}*{lower}+{_CONTRACTIONS}",
        rf"[^\r\n\p{{L}}\p{{N}}]?{upper}+{lower}*{_CONTRACTIONS}",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ])


PAT_STR = _kimi_pattern(rf"[{_LETTERS_UPPER}&&[^\p{{Han}}]]", rf"[{_LETTERS_LOWER}&&[^\p{{Han}}]]")
PAT_STR_PORTABLE = _kimi_pattern(rf"(?:(?!\p{{Han}})[{_LETTERS_UPPER}])",
                                 rf"(?:(?!\p{{Han}})[{_LETTERS_LOWER}])")

_RUN_RE = re.compile(r"\s+|\S+")  # `\s` is str.isspace() for str patterns


def load_bpe_ranks(path: str) -> dict[bytes, int]:
    """`tiktoken.model` -> {token bytes: rank}, parsed exactly like tiktoken's
    `load_tiktoken_bpe`, which is not called because it copies the file into a cache keyed by
    the path's hash (/tmp/data-gym-cache) and returns that stale copy if the file at the same
    path changes later; it would also download URLs."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f.read().splitlines():
            if not line:
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except Exception as e:
                raise ValueError(f"bad line {line[:80]!r} in {path}") from e
    return ranks


def split_runs(text: str, max_run: int = MAX_RUN_CHARS,
               window: int = WINDOW_CHARS) -> Iterator[str]:
    """Kimi's pre-split: windows of `window` chars, each cut so that no piece holds more than
    `max_run` consecutive whitespace or non-whitespace characters (same cut points as
    tokenization_kimi's `_split_whitespaces_or_nonwhitespaces`, found with a C regex scan)."""
    if len(text) <= max_run:
        yield text
        return
    for w0 in range(0, len(text), window):
        w = text[w0:w0 + window]
        if len(w) <= max_run:
            yield w
            continue
        start = 0
        for m in _RUN_RE.finditer(w):
            a, b = m.span()
            if b - a > max_run:
                for cut in range(a + max_run, b, max_run):
                    yield w[start:cut]
                    start = cut
        yield w[start:]


def _token_name(v: Any) -> str | None:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


class KimiTokenizer(Tokenizer):
    """Kimi's tiktoken tokenizer from `model_dir` (see the module docstring)."""

    def __init__(self, model_dir: str, chat_template: str | None = None,
                 extra_eos: Sequence[int] = (), chat_format: KimiChatFormat | None = None):
        with open(os.path.join(model_dir, "tokenizer_config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        ranks = load_bpe_ranks(os.path.join(model_dir, "tiktoken.model"))
        n = len(ranks)
        if sorted(ranks.values()) != list(range(n)):
            raise ValueError("tiktoken.model ranks must be exactly 0..N-1")
        names: dict[int, str] = {}
        flagged: set[int] = set()
        for key, entry in (cfg.get("added_tokens_decoder") or {}).items():
            i, name = int(key), _token_name(entry)
            if name is not None and n <= i < n + NUM_SPECIAL_SLOTS:
                names[i] = name
                if not isinstance(entry, dict) or entry.get("special", True):
                    flagged.add(i)
        self._names = [names.get(i, f"<|reserved_token_{i}|>")
                       for i in range(n, n + NUM_SPECIAL_SLOTS)]
        specials = {name: n + k for k, name in enumerate(self._names)}
        try:
            self._enc = tiktoken.Encoding(name=os.path.basename(model_dir.rstrip("/")) or "kimi",
                                          pat_str=PAT_STR, mergeable_ranks=ranks,
                                          special_tokens=specials)
        except ValueError:  # a regex engine without `&&` class intersection
            self._enc = tiktoken.Encoding(name="kimi", pat_str=PAT_STR_PORTABLE,
                                          mergeable_ranks=ranks, special_tokens=specials)
        self._bytes: list[bytes] = [b""] * n
        for b, r in ranks.items():
            self._bytes[r] = b
        self.num_base_tokens = n
        self.vocab_size = n + NUM_SPECIAL_SLOTS
        self._specials = specials
        named = {_token_name(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token",
                                                    "pad_token")}
        named.update(_token_name(t) for t in cfg.get("additional_special_tokens") or ())
        self.all_special_ids = frozenset(
            i for i in range(n, n + NUM_SPECIAL_SLOTS)
            if i not in names or i in flagged or names[i] in named)
        self.bos_token_id = specials.get(_token_name(cfg.get("bos_token")) or "[BOS]")
        eos = [specials.get(_token_name(cfg.get("eos_token")) or "[EOS]"),
               specials.get("<|im_end|>"), *extra_eos]
        self.eos_token_ids = tuple(dict.fromkeys(e for e in eos if e is not None))
        self.has_think_tags = "<think>" in specials and "</think>" in specials
        self.chat_format = chat_format or detect_chat_format(model_dir, self.has_think_tags)
        self._chat_template = chat_template
        # the checkpoint's own jinja (rendered only with trust_remote_code): read for the
        # content format "auto" resolves to (engine/prompts.resolve_content_format), as vLLM
        # detects it from the template it serves (K2-Instruct loops over the parts)
        from atom_stream.chat_template import checkpoint_chat_template
        self._checkpoint_template = checkpoint_chat_template(model_dir)

    def chat_template_source(self) -> str | None:
        return self._chat_template or self._checkpoint_template

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """add_special_tokens adds nothing: Kimi's TikTokenTokenizer has no BOS rule (HF's
        default build_inputs_with_special_tokens), so vLLM's completions send no BOS either."""
        ids: list[int] = []
        enc = self._enc.encode
        for piece in split_runs(text):
            ids.extend(enc(piece, allowed_special="all", disallowed_special=()))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = self._check_ids(ids)
        if skip_special_tokens:
            special = self.all_special_ids
            ids = [t for t in ids if t not in special]
        return self._enc.decode(ids)  # errors="replace"

    def token_bytes(self, token_id: int) -> bytes | None:
        return self._bytes[token_id] if 0 <= token_id < self.num_base_tokens else None

    def special_text(self, token_id: int) -> str:
        return self._names[token_id - self.num_base_tokens]

    def id_to_str(self, token_id: int) -> str:
        if 0 <= token_id < self.num_base_tokens:
            return bytes_to_token_str(self._bytes[token_id])
        if self.num_base_tokens <= token_id < self.vocab_size:
            return self._names[token_id - self.num_base_tokens]
        raise ValueError(f"token id {token_id} is not in [0, {self.vocab_size})")

    def _build_byte_table(self, skip_special_tokens: bool) -> list[bytes]:
        special = self.all_special_ids
        n = self.num_base_tokens
        return self._bytes + [b"" if skip_special_tokens and n + k in special else name.encode()
                              for k, name in enumerate(self._names)]

    def _render_chat(self, messages: list[Message], add_generation_prompt: bool,
                     **kwargs: Any) -> str:
        fmt = self.chat_format
        return render_kimi_chat(messages, add_generation_prompt,
                                default_system=DEFAULT_SYSTEM_PROMPT, think_tags=fmt.think_tags,
                                thinking_switch=fmt.thinking_switch,
                                typescript_tools=fmt.typescript_tools, template_kwargs=kwargs)

    def _render_override(self, messages: list[Message], add_generation_prompt: bool,
                         kwargs: dict[str, Any]) -> str:
        """A jinja template gets the variables Kimi's own `apply_chat_template`
        (tokenization_kimi.py) adds: `tools` deep-sorted and, for K2.5, `tools_ts_str` (the
        TypeScript declaration, left out when it fails to convert)."""
        tools = kwargs.get("tools")
        if tools is not None:
            kwargs = {**kwargs, "tools": deep_sort_dict(tools)}
            if tools and self.chat_format.typescript_tools:
                try:
                    kwargs["tools_ts_str"] = encode_tools_typescript(kwargs["tools"])
                except Exception:
                    logger.warning("tools do not convert to Kimi's TypeScript declaration",
                                   exc_info=True)
        return super()._render_override(messages, add_generation_prompt, kwargs)


# -------------------------------------------------------------------------- chat format
@dataclass(frozen=True)
class KimiChatFormat:
    """Which variant of the Kimi chat template a checkpoint ships (see `detect_chat_format`).
    - `think_tags`: assistant turns carry `<think>…</think>` (K2-Thinking, K2.5; not K2-Instruct);
    - `thinking_switch`: the template reads `thinking` and the generation prompt ends in `<think>`
      / `<think></think>` (K2.5; K2-Thinking's prompt ends at `<|im_middle|>` and keeps the
      suffix reasoning whatever `thinking` says);
    - `typescript_tools`: the tool_declare turn holds tool_declaration_ts.py's TypeScript-style
      declarations (K2.5) instead of compact JSON (K2)."""

    think_tags: bool = True
    thinking_switch: bool = True
    typescript_tools: bool = False


_THINKING_SWITCH_RE = re.compile(r"\bthinking\s+is\s+(?:defined|false|true|not)\b")


def detect_chat_format(model_dir: str, has_think_tags: bool) -> KimiChatFormat:
    """The chat format of the checkpoint in `model_dir`, from its data files only (nothing
    executed): K2.5 ships `tool_declaration_ts.py` (imported by its tokenization_kimi.py),
    config.json `model_type: kimi_k25` and a chat_template.jinja that reads `tools_ts_str`; the
    template's text says whether it writes think tags and reads `thinking`. Without a template
    the vocabulary decides (`<think>`/`</think>` named: K2.5-style think tags and prompt)."""
    from atom_stream.chat_template import checkpoint_chat_template, read_json
    tpl = checkpoint_chat_template(model_dir)
    try:
        model_type = read_json(os.path.join(model_dir, "config.json")).get("model_type")
    except (OSError, ValueError, AttributeError):  # the model loader reports a bad config
        model_type = None
    ts = (os.path.isfile(os.path.join(model_dir, "tool_declaration_ts.py"))
          or model_type == "kimi_k25" or (tpl is not None and "tools_ts_str" in tpl))
    if tpl is None:
        return KimiChatFormat(has_think_tags, has_think_tags, ts)
    think = has_think_tags and "<think>" in tpl
    return KimiChatFormat(think, think and bool(_THINKING_SWITCH_RE.search(tpl)), ts)


def deep_sort_dict(obj: Any) -> Any:
    """Every mapping's keys sorted, recursively (lists keep their order): what Kimi's
    tokenization_kimi.py `apply_chat_template` does to `tools` before rendering."""
    if isinstance(obj, dict):
        return {k: deep_sort_dict(v) for k, v in sorted(obj.items())}
    if isinstance(obj, list):
        return [deep_sort_dict(v) for v in obj]
    return obj


def tool_declaration(tools: list[dict[str, Any]], typescript: bool = False) -> str:
    """The tool_declare turn's body, as tokenization_kimi.py + chat_template.jinja make it: the
    tools deep-sorted, then K2.5's TypeScript declaration (`tools_ts_str`) when it encodes to
    something, else compact JSON (`tools | tojson(separators=(',', ':'))`)."""
    tools = deep_sort_dict(tools)
    if typescript:
        try:
            ts = encode_tools_typescript(tools)
        except Exception:  # tokenization_kimi.py prints the error and renders JSON
            logger.warning("tools do not convert to Kimi's TypeScript declaration; using JSON",
                           exc_info=True)
            ts = ""
        if ts:
            return ts
    return json.dumps(tools, separators=(",", ":"), ensure_ascii=False)


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _reasoning_text(m: Message) -> Any:
    """The message's reasoning: its first non-None of reasoning_content / thinking / reasoning
    (transformers' `_alias_reasoning_fields`, which fills `reasoning_content` from them)."""
    return next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), "")


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text":
                out.append(str(part.get("text", "")))
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"content part of type {kind!r} is not supported "
                                 "(this server runs the text backbone only)")
        return "".join(out)
    raise ValueError(f"message content must be a string or a list of parts, not "
                     f"{type(content).__name__}")


def _tool_calls_text(tool_calls: list[dict]) -> str:
    out = ["<|tool_calls_section_begin|>"]
    for idx, tc in enumerate(tool_calls):
        fn = tc.get("function") or {}
        name = fn.get("name", "")
        args = fn.get("arguments", "")
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        tid = tc.get("id") or f"functions.{name}:{idx}"
        out.append(f"<|tool_call_begin|>{tid}<|tool_call_argument_begin|>{args}<|tool_call_end|>")
    out.append("<|tool_calls_section_end|>")
    return "".join(out)


def thinking_enabled(template_kwargs: dict[str, Any] | None) -> bool:
    """`thinking` from the template kwargs (default True; `enable_thinking` is an alias)."""
    kw = template_kwargs or {}
    return bool(kw.get("thinking", kw.get("enable_thinking", True)))


def render_kimi_chat(messages: list[Message], add_generation_prompt: bool = True, *,
                     default_system: str | None = DEFAULT_SYSTEM_PROMPT, think_tags: bool = True,
                     thinking_switch: bool = True, typescript_tools: bool = False,
                     template_kwargs: dict[str, Any] | None = None) -> str:
    """The Kimi prompt for OpenAI-style `messages` (see the module docstring and
    `KimiChatFormat` for the flags). `template_kwargs`: `thinking` (bool, default True;
    `enable_thinking` is an alias) and `tools` (OpenAI tool list); other keys are ignored, as
    templates ignore unknown variables."""
    kw = template_kwargs or {}
    # K2-Thinking's template has no `thinking` variable: the suffix keeps its reasoning
    thinking = thinking_enabled(kw) or not thinking_switch
    tools = kw.get("tools")
    msgs = list(messages)
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError("each message must be a dict with a string 'role'")  # noqa: TRY004
    out = []
    if tools:
        out.append(f"<|im_system|>tool_declare<|im_middle|>"
                   f"{tool_declaration(tools, typescript_tools)}<|im_end|>")
    # the template checks messages[0] only: a leading tool_declare message gets the default
    # system turn before it (`messages|length == 0 or messages[0]['role'] != 'system'`)
    if default_system is not None and (not msgs or msgs[0]["role"] != "system"):
        out.append(f"<|im_system|>system<|im_middle|>{default_system}<|im_end|>")
    last_plain = -1  # the last assistant message without tool calls
    for i, m in enumerate(msgs):
        if m["role"] == "assistant" and not m.get("tool_calls"):
            last_plain = i
    for i, m in enumerate(msgs):
        role = m["role"]
        name = m.get("name") or role
        if role == "assistant":
            body = ""
            if think_tags:
                keep = thinking and i > last_plain
                body = f"<think>{_reasoning_text(m) if keep else ''}</think>"
            body += _content_text(m.get("content"))
            if m.get("tool_calls"):
                body += _tool_calls_text(m["tool_calls"])
            out.append(f"<|im_assistant|>{name}<|im_middle|>{body}<|im_end|>")
        elif role == "user":
            out.append(f"<|im_user|>{name}<|im_middle|>{_content_text(m.get('content'))}"
                       "<|im_end|>")
        elif role == "tool":
            body = f"## Return of {m.get('tool_call_id') or ''}\n{_content_text(m.get('content'))}"
            out.append(f"<|im_system|>{name}<|im_middle|>{body}<|im_end|>")
        else:  # system, tool_declare and any other role: system-style turn
            out.append(f"<|im_system|>{name}<|im_middle|>{_content_text(m.get('content'))}"
                       "<|im_end|>")
    if add_generation_prompt:
        out.append("<|im_assistant|>assistant<|im_middle|>")
        if think_tags and thinking_switch:
            out.append("<think>" if thinking else "<think></think>")
    return "".join(out)
