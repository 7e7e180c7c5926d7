"""LLM: the synchronous offline API, a thin wrapper that steps the engine core in a loop.

    llm = LLM()                                   # the embedded demo model
    outs = llm.generate(["Hello", "Hi"], SamplingParams(max_tokens=16, temperature=0))
    outs[0].text, outs[0].token_ids, outs[0].finish_reason, outs[0].outputs[0].text

`generate` returns one RequestOutput per prompt, in input order, holding the whole completion
(every delta merged): `request_id, prompt_token_ids, token_ids, text, finish_reason,
stop_reason, usage, logprobs, cumulative_logprob, prompt_logprobs, prompt_logprob_ranks`, and
vLLM's `prompt` (the text prompt; None for token ids; `chat`: the rendered conversation).
`logprobs` / `prompt_logprobs` are vLLM's (`out.outputs[0].logprobs[i][tid]` is a `Logprob`
with `.logprob`, `.rank`, `.decoded_token`; `out.prompt_logprobs[0] is None`; see
engine/outputs.py). A request whose model step failed comes back with finish_reason "error"
and `error` set (the batch's other results are kept). No event loop needed.

`SamplingParams(n=k)`, k > 1 (greedy refuses it, as vLLM): as vLLM's ParentRequest, the prompt fans
out into k child requests `f"{i}_{request_id}"` with `params.child(i)` (n = 1; a seed becomes
seed + i, so choice i's tokens equal the same params run alone with seed + i), and their finished
outputs come back as ONE `MultiChoiceOutput` for the prompt, in input order: `.outputs` holds the
k `CompletionOutput`s (index 0..k-1) and the top-level `.token_ids` / `.text` / `.finish_reason`
are choice 0's (engine/outputs.py says what each field means). n == 1 outputs are unchanged.
As in vLLM each child is a whole request: with prompt_logprobs every child computes them (the
output carries them once).

A checkpoint directory holding no tokenizer file at all (a bare `save_pretrained` of a model,
no `tokenizer=` given) runs as `skip_tokenizer_init=True` with a warning: token-id prompts work,
text prompts are an InvalidRequestError. Tokenizer files that fail to load stay an error.

`shutdown()` (or `with LLM(...) as llm:`) stops the engine: TP worker processes, their shared
memory, the KV pool; it also runs at interpreter exit, and a second call does nothing.
"""

from __future__ import annotations

import functools
import itertools
import numbers
import weakref
from collections.abc import Callable, Iterable
from collections.abc import Sequence as Seq
from typing import Any

import numpy as np

from atom_stream.config import EngineConfig
from atom_stream.engine.engine_setup import (
    checkpoint_lacks_tokenizer,
    coerce_params,
    requested_n,
    warn_no_tokenizer,
    warn_one_replica,
)
from atom_stream.engine.llm_engine import LLMEngine
from atom_stream.engine.outputs import MultiChoiceOutput, RequestOutput
from atom_stream.engine.prompts import (
    MULTI_MODAL_KEYS,
    apply_content_format,
    encode_chat_prompt,
    prompt_text,
    refuse_request_template,
    resolve_chat_options,
    resolve_content_format,
    with_cache_salt,
)
from atom_stream.errors import EngineDeadError, InvalidRequestError, priority_error, refuse_lora
from atom_stream.sampling_params import (
    SamplingParams,
    model_sampling_defaults,
)


class LLM:
    def __init__(self, model: str | None = "demo", *, skip_tokenizer_init: bool = False,
                 **engine_kwargs: Any):
        config = EngineConfig.from_kwargs(model=model, **engine_kwargs)
        warn_one_replica(config, "LLM")
        if not skip_tokenizer_init and checkpoint_lacks_tokenizer(config):
            warn_no_tokenizer(config)
            skip_tokenizer_init = True
        self.engine = LLMEngine(config, skip_tokenizer_init=skip_tokenizer_init)
        self._ids = itertools.count()
        # call-once: shutdown(), or at exit (a TP engine's workers and shared memory)
        self._finalizer: weakref.finalize | None = weakref.finalize(self, self.engine.shutdown)

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> LLM:
        """Wrap an existing engine core (tests inject runners this way; the caller owns its
        shutdown)."""
        self = cls.__new__(cls)
        self.engine = engine
        self._ids = itertools.count()
        self._finalizer = None
        return self

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's LLM.get_default_sampling_params: SamplingParams with the checkpoint's
        generation_config.json defaults (temperature, top_p, top_k, min_p, repetition_penalty,
        max_new_tokens as max_tokens), what `generate` / `chat` use when given no params. A new
        object each call, as vLLM's: changing it changes nothing else."""
        return self._default_params.clone()

    @functools.cached_property
    def _default_params(self) -> SamplingParams:  # the file is read once per LLM
        return SamplingParams(**model_sampling_defaults(self.engine.config.model))

    def reset_prefix_cache(self) -> bool:
        """vLLM's LLM.reset_prefix_cache: later requests hit no prefix computed before."""
        return self.engine.reset_prefix_cache()

    def shutdown(self) -> None:
        """Stop the engine (see the module docstring); idempotent."""
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> LLM:  # noqa: PYI034
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def llm_engine(self) -> LLMEngine:
        """vLLM's LLM.llm_engine: the engine core this LLM steps (`engine`)."""
        return self.engine

    def get_tokenizer(self) -> Any:
        """vLLM's LLM.get_tokenizer: the engine's tokenizer (None with skip_tokenizer_init)."""
        return self.engine.tokenizer

    def generate(self, prompts: Any = None,
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 prompt_token_ids: list[int] | list[list[int]] | None = None,
                 use_tqdm: bool | Callable[..., Any] = False,
                 lora_request: Any = None,
                 priority: list[int] | None = None) -> list[RequestOutput]:
        """`prompts`: one prompt or a list (any iterable) of them, each a string, a list of token
        ids, or vLLM's dict forms {"prompt": str} / {"prompt_token_ids": [int]}; or the ids by
        keyword (`prompt_token_ids`: one list of ids or several). A dict prompt's `cache_salt`
        (vLLM's) becomes that prompt's SamplingParams.cache_salt; its `multi_modal_data` /
        `mm_processor_kwargs` / `multi_modal_uuids` other than empty are refused (text only);
        other keys are ignored, as vLLM's TypedDicts do. `lora_request` is vLLM's argument: None
        is accepted, anything else refused (no LoRA adapters), as `chat` does. `priority` is
        vLLM's too (one int per prompt): only FCFS is implemented, so all zeros (or None) are
        served and a non-zero one is vLLM's ValueError, before any work."""
        refuse_lora(lora_request)
        if prompts is not None and prompt_token_ids is not None:
            raise InvalidRequestError("pass prompts or prompt_token_ids, not both", "prompts")
        if prompts is not None:
            if isinstance(prompts, (str, dict)) or (
                    isinstance(prompts, (list, tuple)) and prompts
                    and isinstance(prompts[0], numbers.Integral)):
                prompts = [prompts]
            elif not isinstance(prompts, (list, tuple)):
                prompts = _listed(prompts)  # a generator: walked more than once below
            token_lists = [self._prompt_ids(p) for p in prompts]
            texts = [prompt_text(p) for p in prompts]
            sampling_params = self._salted(sampling_params, prompts)
        elif prompt_token_ids is not None:
            if len(prompt_token_ids) and isinstance(prompt_token_ids[0], numbers.Integral):
                prompt_token_ids = [prompt_token_ids]
            token_lists = [list(p) for p in prompt_token_ids]
            texts = [None] * len(token_lists)
        else:
            raise InvalidRequestError("pass prompts or prompt_token_ids", "prompts")
        _check_priority(priority, len(token_lists))
        outs = self._run(token_lists, sampling_params, use_tqdm)
        return [o.set_prompt(t) for o, t in zip(outs, texts)]

    def _salted(self, sampling_params: Any, prompts: Seq[Any]) -> Any:
        """`sampling_params` with each dict prompt's `cache_salt` set on that prompt's copy
        (unchanged when no prompt has one, or when a list of params has the wrong length:
        `_run` refuses it)."""
        salts = [p.get("cache_salt") if isinstance(p, dict) else None for p in prompts]
        if all(salt is None for salt in salts):
            return sampling_params
        if sampling_params is None or isinstance(sampling_params, (SamplingParams, dict)):
            # _run's rule: none (or {}) means the checkpoint's defaults, salted or not
            params = [sampling_params or self.get_default_sampling_params()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                return sampling_params
        return [p if salt is None else self._with_salt(p, salt) for p, salt in zip(params, salts)]

    def _with_salt(self, params: Any, salt: Any) -> Any:
        return with_cache_salt(self.get_default_sampling_params() if params is None else params,
                               salt)

    def _prompt_ids(self, p: Any) -> list[int]:
        if isinstance(p, dict):
            for key in MULTI_MODAL_KEYS:
                if p.get(key):
                    raise InvalidRequestError(f"{key} is not supported: this engine serves "
                                              "text models only", key)
            if "prompt_token_ids" in p:
                return list(p["prompt_token_ids"])
            if "prompt" in p:
                p = p["prompt"]
            else:
                raise InvalidRequestError("a dict prompt needs 'prompt' or 'prompt_token_ids'",
                                          "prompts")
        if isinstance(p, str):
            tok = self.engine.tokenizer
            if tok is None:
                raise InvalidRequestError("text prompts need a tokenizer", "prompts")
            return tok.encode(p, add_special_tokens=True)  # as vLLM: an HF DeepSeek BOS
        if isinstance(p, (list, tuple)) or (isinstance(p, np.ndarray) and p.ndim == 1):
            return list(p)  # token ids (numpy integers included): checked by the engine
        raise InvalidRequestError(f"a prompt must be a string, a list of token ids or a dict, "
                                  f"got {type(p).__name__}", "prompts")

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool | Callable[..., Any] = False, lora_request: Any = None,
             chat_template: str | None = None, chat_template_content_format: str = "auto",
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             tools: list[dict[str, Any]] | None = None,
             chat_template_kwargs: dict[str, Any] | None = None,
             mm_processor_kwargs: dict[str, Any] | None = None,
             ) -> list[RequestOutput]:
        """vLLM's LLM.chat (its arguments, in its order): one conversation (a list of message
        dicts) or a list of them, each rendered by the model's chat template and generated with
        `sampling_params` (one for all, or one per conversation). `tools` reach the template as
        its `tools` variable; `chat_template_kwargs` go to the template last (as vLLM: their
        `add_generation_prompt` / `continue_final_message` / `tools` override the arguments);
        both options true is the HTTP routes' ChatOptionsError. A `chat_template` (argument or
        template kwarg) is refused as the HTTP server refuses a request's.
        `chat_template_content_format` is vLLM's: "string" flattens list-of-parts content to
        one string (text parts joined by "\n") before rendering, "openai" gives the template
        every content as a list of text parts, "auto" picks the one the chat template reads
        (engine/prompts.py `resolve_content_format`, as the HTTP routes do). `lora_request` /
        `mm_processor_kwargs` other than None are refused (no LoRA, text only). `use_tqdm`
        defaults to False (vLLM: True); as in vLLM it may be a tqdm-like callable that makes
        the bar."""
        refuse_lora(lora_request)
        if mm_processor_kwargs is not None:
            raise InvalidRequestError("mm_processor_kwargs is not supported: this engine "
                                      "serves text models only", "mm_processor_kwargs")
        apply_content_format([], chat_template_content_format)  # the name, before any work
        kwargs = {**({"tools": tools} if tools else {}), **(chat_template_kwargs or {})}
        refuse_request_template(chat_template, kwargs)
        # the HTTP routes' options and error (chat_template_kwargs override the arguments)
        resolve_chat_options(kwargs, add_generation_prompt, continue_final_message)
        if self.engine.tokenizer is None:
            raise InvalidRequestError("chat needs a tokenizer", "messages")
        if not isinstance(messages, (list, tuple)):
            raise InvalidRequestError("messages: expected a list of message dicts or a list of "
                                      f"conversations, got {type(messages).__name__}",
                                      "messages")
        if not messages:
            return []  # no conversations (vLLM's LLM.chat([]))
        convs = [messages] if isinstance(messages[0], dict) else messages
        tok = self.engine.tokenizer
        fmt = resolve_content_format(tok, chat_template_content_format)
        convs = [apply_content_format(c, fmt) for c in convs]
        token_lists = [encode_chat_prompt(tok, c, kwargs, add_generation_prompt,
                                          continue_final_message) for c in convs]
        outs = self._run(token_lists, sampling_params, use_tqdm)
        # vLLM's output.prompt of a chat: the rendered conversation
        return [o.set_prompt(tok.decode(ids, skip_special_tokens=False))
                for o, ids in zip(outs, token_lists)]

    def _run(self, token_lists: list[list[int]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None,
             use_tqdm: bool | Callable[..., Any]) -> list[RequestOutput]:
        n = len(token_lists)
        if sampling_params is None or isinstance(sampling_params, (SamplingParams, dict)):
            params = [sampling_params or self.get_default_sampling_params()] * n
        else:
            params = list(sampling_params)
            if len(params) != n:
                raise InvalidRequestError(
                    f"sampling_params: {len(params)} given for {n} prompts", "sampling_params")
        engine = self.engine
        if engine.has_unfinished_requests():
            raise InvalidRequestError("the engine is busy with other requests", "prompts")
        # the engine requests: (id, prompt index, choice index, params); a prompt with n > 1
        # fans out into its children (vLLM's ParentRequest.get_child_info), all checked first
        parent_ids = [f"llm-{next(self._ids)}" for _ in range(n)]
        reqs: list[tuple[str, int, int, Any]] = []
        multi = [False] * n
        for i, p in enumerate(params):
            kids = _children(p)
            if kids is None:
                reqs.append((parent_ids[i], i, 0, p))
            else:
                multi[i] = True
                reqs.extend((f"{c}_{parent_ids[i]}", i, c, kp) for c, kp in enumerate(kids))
        index = {rid: j for j, (rid, *_) in enumerate(reqs)}
        results: list[RequestOutput | None] = [None] * len(reqs)
        left = [0] * n  # unfinished engine requests per prompt
        for _, i, _, _ in reqs:
            left[i] += 1
        last = [0] * n  # the choice that finished last (vLLM takes prompt-level fields from it)
        bar = None
        if use_tqdm:
            make_bar = use_tqdm if callable(use_tqdm) else _tqdm()  # vLLM: a tqdm-like callable
            bar = make_bar(total=n, desc="generate", unit="req")
        max_waiting = engine.config.max_waiting_requests
        nxt = 0
        try:
            _raise_if_dead(engine)
            while nxt < len(reqs) or engine.has_unfinished_requests():
                # feed the waiting queue up to its bound instead of failing with overload
                while nxt < len(reqs) and engine.scheduler.num_waiting < max_waiting:
                    rid, i, _, p = reqs[nxt]
                    engine.add_request(rid, token_lists[i], p)
                    nxt += 1
                for out in engine.step():
                    j = index[out.request_id]
                    if results[j] is None:
                        results[j] = out
                    else:
                        results[j].merge(out)
                    if out.finish_reason is not None:
                        _, i, c, _ = reqs[j]
                        left[i] -= 1
                        last[i] = c
                        if left[i] == 0 and bar is not None:
                            bar.update(1)
                _raise_if_dead(engine)  # its failed step ended the requests with "error"
        except BaseException:
            engine.abort_all()
            raise
        finally:
            if bar is not None:
                bar.close()
        outs: list[RequestOutput | None] = [None] * n
        choices: list[list[RequestOutput]] = [[] for _ in range(n)]
        for (_, i, _, _), r in zip(reqs, results):
            if multi[i]:
                choices[i].append(r)  # type: ignore[arg-type]  # reqs hold choices in order
            else:
                outs[i] = r
        for i in range(n):
            if multi[i]:
                outs[i] = MultiChoiceOutput.gather(parent_ids[i], choices[i], last[i])
        return outs  # type: ignore[return-value]


def _check_priority(priority: Seq[int] | None, n: int) -> None:
    """LLM.generate's `priority`: None, or n ints all 0 (FCFS); otherwise an
    InvalidRequestError (a ValueError, as vLLM's) naming priority."""
    if priority is None:
        return
    if isinstance(priority, (str, bytes)) or not isinstance(priority, Seq):
        raise InvalidRequestError(f"priority must be a list of ints, one per prompt, got "
                                  f"{type(priority).__name__}", "priority")
    if len(priority) != n:
        raise InvalidRequestError(f"priority: {len(priority)} given for {n} prompts",
                                  "priority")
    for p in priority:
        if p:
            raise InvalidRequestError(priority_error(p), "priority")


def _tqdm() -> Callable[..., Any]:
    from tqdm.auto import tqdm

    return tqdm


def _listed(prompts: Any) -> list[Any]:
    """An iterable of prompts as a list; anything else (an int, a float...) is the
    InvalidRequestError naming prompts, not a bare TypeError from `list`."""
    if not isinstance(prompts, Iterable):
        raise InvalidRequestError(f"prompts: must be a prompt or a list of prompts, got "
                                  f"{type(prompts).__name__}", "prompts")
    return list(prompts)


def _children(p: Any) -> list[SamplingParams] | None:
    """The n child params of an n > 1 request (checked whole first: a child has n = 1, so the
    engine's own check could no longer see a greedy n > 1); None for n == 1, or for an n the
    engine's checks refuse (not an int, < 1), so those answer exactly as before."""
    if requested_n(p) <= 1:
        return None
    p = coerce_params(p)  # add_request's own path: the dict form, the checks, their errors
    return [p.child(c) for c in range(p.n)]


def _raise_if_dead(engine: Any) -> None:
    """EngineDeadError when the model runner has died (a TP worker rank exited): nothing more
    will be served, and vLLM's LLM.generate raises then too (AsyncEngine does the same)."""
    dead = getattr(engine.runner, "dead", None)
    if dead:
        raise EngineDeadError(f"the model runner died: {dead}")
