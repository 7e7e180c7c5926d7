"""Prompt -> token ids: the one tokenizing path of the engine and the server.

Tokenizing is one path for every caller: `tokenize_prompt(tokenizer, prompt, ...)` (also the
`tokenize_prompt` method of AsyncEngine and DPEngine; generate() and the OpenAI routes'
truncate_prompt_tokens use it), with the chat options resolved by `resolve_chat_options`
(chat_template_kwargs override add_generation_prompt / continue_final_message, as vLLM; both
true is `ChatOptionsError`, the one error for the HTTP routes, /tokenize and the in-process API).
Long text prompts and every chat prompt (template rendering plus tokenization) are tokenized in
the default thread pool, off the loop.
"""

from __future__ import annotations

import asyncio
import functools
import re
from typing import Any

import msgspec

from atom_stream.errors import InvalidRequestError
from atom_stream.sampling_params import SamplingParams, SamplingParamsError

Prompt = str | list[int] | list[dict] | dict
_OFFLOOP_CHARS = 2048  # tokenize longer prompts in a thread
# vLLM's check_generation_prompt (a model validator of ChatCompletionRequest and
# TokenizeChatRequest), verbatim
BOTH_CHAT_OPTIONS = ("Cannot set both `continue_final_message` and `add_generation_prompt` "
                     "to True.")


# vLLM's _validate_chat_template error (a request / call chat template without
# --trust-request-chat-template), verbatim
UNTRUSTED_TEMPLATE = ("Chat template is passed with request, but --trust-request-chat-template "
                      "is not set. Refused request with untrusted chat template.")


class ChatOptionsError(InvalidRequestError):
    """continue_final_message and add_generation_prompt both true. vLLM's check is a request
    validator, so FastAPI answers it as a RequestValidationError: 400, type "Bad Request" (the
    server's VALIDATION_TYPE), param null; one error for every route and the engine."""

    type = "Bad Request"

    def __init__(self) -> None:
        super().__init__(BOTH_CHAT_OPTIONS)


def resolve_chat_options(chat_template_kwargs: dict | None, add_generation_prompt: bool = True,
                         continue_final_message: bool = False) -> tuple[bool, bool, dict]:
    """The chat options a template renders with: (add_generation_prompt,
    continue_final_message, the other template kwargs). Keys of the same names in
    `chat_template_kwargs` override the arguments (vLLM updates its template kwargs with the
    request's chat_template_kwargs last). Both true, as given or after the override, is a
    ChatOptionsError (vLLM refuses the request's own pair; the template would refuse the
    overridden one)."""
    kw = dict(chat_template_kwargs or {})
    if "tokenize" in kw:  # the template would return ids where text is expected (vLLM's 400)
        raise InvalidRequestError(
            "Found unexpected chat template kwargs from request: {'tokenize'}")
    agp = bool(kw.pop("add_generation_prompt", add_generation_prompt))
    cfm = bool(kw.pop("continue_final_message", continue_final_message))
    if (add_generation_prompt and continue_final_message) or (agp and cfm):
        raise ChatOptionsError()
    return agp, cfm, kw


def refuse_request_template(chat_template: str | None, chat_template_kwargs: dict | None
                            ) -> None:
    """A chat template given with a request (field or template kwarg) is refused, as vLLM does
    without --trust-request-chat-template: InvalidRequestError (400, param null)."""
    if chat_template is not None or (chat_template_kwargs or {}).get("chat_template") is not None:
        raise InvalidRequestError(UNTRUSTED_TEMPLATE)


CONTENT_FORMATS = ("auto", "string", "openai")  # vLLM's ChatTemplateContentFormatOption
# vLLM's text-like content parts (chat_utils._parse_chat_message_content_part) -> the key
# holding each one's text
TEXT_PART_FIELD = {"text": "text", "input_text": "text", "output_text": "text",
                   "refusal": "refusal", "thinking": "thinking"}


# a template that loops over a message's content reads it as a list of parts (vLLM's
# _detect_content_format looks for the same loop in the template's syntax tree)
_PARTS_LOOP = re.compile(r"for\s+\w+\s+in\s+\w+\s*(?:\[\s*['\"]content['\"]\s*\]|\.content\b)")


def resolve_content_format(tokenizer: Any, content_format: str = "auto") -> str:
    """"string" or "openai": `content_format` itself, or for "auto" (vLLM's default) the form
    the tokenizer's chat template reads: "openai" when its jinja loops over a message's
    content, else "string" (also the built-in renderers: one place decides for LLM.chat, the
    AsyncEngine, the HTTP / WebSocket routes and /tokenize, so a list of parts renders the
    same prompt everywhere)."""
    if content_format not in CONTENT_FORMATS:
        raise InvalidRequestError(
            "chat_template_content_format must be 'auto', 'string' or 'openai', got "
            f"{content_format!r}", "chat_template_content_format")
    if content_format != "auto":
        return content_format
    source = getattr(tokenizer, "chat_template_source", lambda: None)()
    return _template_format(source) if source else "string"


@functools.lru_cache(maxsize=16)
def _template_format(source: str) -> str:
    """A jinja template's content format, scanned once per template text (every chat request
    asks, on the event loop)."""
    return "openai" if _PARTS_LOOP.search(source) else "string"


def with_cache_salt(params: Any, salt: str) -> Any:
    """`params` (SamplingParams, or a dict of its fields) with vLLM's dict-prompt `cache_salt`
    set (a copy); any other type as given, for the engine's own type error."""
    if isinstance(params, dict):
        return {**params, "cache_salt": salt}  # checked with the rest by the engine
    if not isinstance(params, SamplingParams):
        return params
    try:
        return msgspec.structs.replace(params, cache_salt=salt)
    except SamplingParamsError as e:
        raise InvalidRequestError(str(e), e.param) from None


def apply_content_format(messages: list[dict], content_format: str) -> list[dict]:
    """Messages as a template of `content_format` reads them (vLLM's parse_chat_messages):

    - "string": a message's content is one string; a list of parts becomes its text parts
      joined with "\n" (plain string parts too), null content "".
    - "openai": a message's content is a list of `{"type": "text", "text": ...}` parts; a
      string becomes one such part, null content [].
    - "auto": the messages as given (callers resolve "auto" first: resolve_content_format).

    Text-like part types are vLLM's: text, input_text, output_text, refusal, thinking (all
    read as text); a part of any other type (image_url, ...) is an InvalidRequestError naming
    `messages`, as this engine serves text only. The messages are copied, never changed."""
    if content_format not in CONTENT_FORMATS:
        raise InvalidRequestError(
            "chat_template_content_format must be 'auto', 'string' or 'openai', got "
            f"{content_format!r}", "chat_template_content_format")
    if content_format == "auto":
        return messages
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "content" not in m:
            out.append(m)  # the renderer reports malformed messages
            continue
        texts = _content_texts(m["content"], i)
        if texts is None:  # not text content: left for the renderer to refuse
            out.append(m)
            continue
        content: Any = ("\n".join(texts) if content_format == "string"
                        else [{"type": "text", "text": t} for t in texts])
        out.append({**m, "content": content})
    return out


def _content_texts(content: Any, index: int) -> list[str] | None:
    """The text pieces of one message's content (None when it is neither text nor parts)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, (list, tuple)):
        return None
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
            continue
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind is None:  # vLLM: "Missing 'type' field in multimodal part."
            raise InvalidRequestError(f"messages[{index}].content: a content part lacks its "
                                      "'type'", "messages")
        if kind not in TEXT_PART_FIELD:
            raise InvalidRequestError(f"messages[{index}].content: content part type {kind!r} "
                                      "is not supported; this engine serves text only",
                                      "messages")
        text = part.get(TEXT_PART_FIELD[kind])
        if text is not None:  # vLLM skips a text / refusal part without its text
            texts.append(str(text))
    return texts


def encode_chat_prompt(tokenizer: Any, messages: list[dict], chat_template_kwargs: dict | None,
                       add_generation_prompt: bool = True, continue_final_message: bool = False,
                       **encode_kw: Any) -> list[int]:
    """Messages -> token ids through the chat template, synchronously: the options resolved
    (`resolve_chat_options`), template errors as InvalidRequestError naming `messages`."""
    agp, cfm, kw = resolve_chat_options(chat_template_kwargs, add_generation_prompt,
                                        continue_final_message)
    try:
        return need_tokenizer(tokenizer, "messages").encode_chat(
            messages, add_generation_prompt=agp, continue_final_message=cfm, **encode_kw, **kw)
    except InvalidRequestError:
        raise
    except (ValueError, TypeError, KeyError) as e:
        raise InvalidRequestError(f"messages: {e}", "messages") from None


async def tokenize_prompt(tokenizer: Any, prompt: Prompt, chat_template_kwargs: dict | None = None,
                          *, add_special_tokens: bool = True, add_generation_prompt: bool = True,
                          continue_final_message: bool = False) -> list[int]:
    """A prompt -> its token ids, as the engine tokenizes it (AsyncEngine.tokenize_prompt /
    DPEngine.tokenize_prompt; the OpenAI routes' truncate_prompt_tokens). Token ids are
    returned as given; text is tokenized in the default thread pool when long; a chat prompt
    always is: rendering reads more than the contents (tools, tool calls, template kwargs), so
    its size says nothing about its cost (a megabyte of tool schemas beside a "hi").
    vLLM's dict forms are taken too: {"prompt_token_ids": [...]} (TokensPrompt, preferred when
    both keys are there, as vLLM) and {"prompt": str} (TextPrompt); non-empty multi-modal keys
    are refused (MULTI_MODAL_KEYS). Their `cache_salt` is the caller's (SamplingParams).
    Errors are InvalidRequestError naming `prompt` / `messages` (ChatOptionsError for the
    chat option pair)."""
    if isinstance(prompt, dict):
        prompt = _dict_prompt(prompt)
    if isinstance(prompt, (list, tuple)) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)  # a tuple of ids too, as LLM.generate takes it
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("prompt: must not be empty", "prompt")
        fn = functools.partial(need_tokenizer(tokenizer).encode, prompt,
                               add_special_tokens=add_special_tokens)
        size = len(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        resolve_chat_options(chat_template_kwargs, add_generation_prompt,
                             continue_final_message)  # the pair's error before any work
        fmt = resolve_content_format(need_tokenizer(tokenizer, "messages"))

        def fn(messages: list[dict] = prompt) -> list[int]:  # off the loop: O(content size)
            return encode_chat_prompt(tokenizer, apply_content_format(messages, fmt),
                                      chat_template_kwargs, add_generation_prompt,
                                      continue_final_message)
        size = _OFFLOOP_CHARS + 1  # always off the loop (see the docstring)
    else:
        raise InvalidRequestError(
            "prompt: must be a non-empty string, list of token ids or list of messages",
            "prompt")
    try:
        if size > _OFFLOOP_CHARS:
            return await asyncio.get_running_loop().run_in_executor(None, fn)
        return fn()
    except InvalidRequestError:
        raise
    except (ValueError, TypeError, KeyError) as e:
        field = "prompt" if isinstance(prompt, str) else "messages"
        raise InvalidRequestError(f"{field}: {e}", field) from None


# vLLM prompt-dict keys this text-only engine cannot honour (refused unless empty)
MULTI_MODAL_KEYS = ("multi_modal_data", "mm_processor_kwargs", "multi_modal_uuids")


def _dict_prompt(prompt: dict) -> Any:
    """The prompt inside vLLM's TokensPrompt / TextPrompt dict (checked by the caller); a
    non-empty multi-modal key is refused (text only: its data would be silently dropped)."""
    for key in MULTI_MODAL_KEYS:
        if prompt.get(key):
            raise InvalidRequestError(f"{key} is not supported: this engine serves text models "
                                      "only", key)
    if "prompt_token_ids" in prompt:
        ids = prompt["prompt_token_ids"]
        if isinstance(ids, list) and all(isinstance(t, int) for t in ids):
            return ids  # empty / bools: refused with the list forms' error
    elif isinstance(prompt.get("prompt"), str):
        return prompt["prompt"]
    raise InvalidRequestError("prompt: a dict prompt needs 'prompt_token_ids' (a list of token "
                              "ids) or 'prompt' (a string)", "prompt")


_NEEDS_TEXT = {"prompt": "text prompts need", "messages": "chat messages need",
               "tokens": "detokenizing needs", "echo": "echoing the prompt needs",
               "prompt_logprobs": "prompt logprob texts need",
               "logprobs": "logprob texts (without return_tokens_as_token_ids) need"}


def need_tokenizer(tokenizer: Any, field: str = "prompt") -> Any:
    """`tokenizer`, or for an engine without one (skip_tokenizer_init, a checkpoint with no
    tokenizer file: token-id prompts only) an InvalidRequestError naming `field` (the request
    field whose answer needs token text: "prompt", "messages", "tokens", "echo", ...). The one
    check every path (engine, /tokenize, /detokenize, completions) makes."""
    if tokenizer is None:
        what = _NEEDS_TEXT.get(field, "needs")
        raise InvalidRequestError(f"{field}: {what} a tokenizer (token-id prompts only "
                                  "without one)", field)
    return tokenizer


def prompt_text(p: Any) -> str | None:
    """A prompt's text (vLLM's RequestOutput.prompt): the string of a text prompt
    or of a dict's "prompt" key (also beside "prompt_token_ids", vLLM's TokensPrompt), None
    for token ids."""
    if isinstance(p, dict):  # vLLM's TokensPrompt may carry its text as "prompt" too
        text = p.get("prompt")
        return text if isinstance(text, str) else None
    return p if isinstance(p, str) else None
