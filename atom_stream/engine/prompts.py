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
from typing import Any

from atom_stream.errors import InvalidRequestError

Prompt = str | list[int] | list[dict]
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


def encode_chat_prompt(tokenizer: Any, messages: list[dict], chat_template_kwargs: dict | None,
                       add_generation_prompt: bool = True, continue_final_message: bool = False,
                       **encode_kw: Any) -> list[int]:
    """Messages -> token ids through the chat template, synchronously: the options resolved
    (`resolve_chat_options`), template errors as InvalidRequestError naming `messages`."""
    agp, cfm, kw = resolve_chat_options(chat_template_kwargs, add_generation_prompt,
                                        continue_final_message)
    try:
        return _need(tokenizer).encode_chat(messages, add_generation_prompt=agp,
                                            continue_final_message=cfm, **encode_kw, **kw)
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
    Errors are InvalidRequestError naming `prompt` / `messages` (ChatOptionsError for the
    chat option pair)."""
    if isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("prompt: must not be empty", "prompt")
        fn = functools.partial(_need(tokenizer).encode, prompt,
                               add_special_tokens=add_special_tokens)
        size = len(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        resolve_chat_options(chat_template_kwargs, add_generation_prompt,
                             continue_final_message)  # the pair's error before any work
        _need(tokenizer)
        fn = functools.partial(encode_chat_prompt, tokenizer, prompt, chat_template_kwargs,
                               add_generation_prompt, continue_final_message)
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


def _need(tokenizer: Any) -> Any:
    if tokenizer is None:
        raise InvalidRequestError("prompt: text prompts need a tokenizer", "prompt")
    return tokenizer
