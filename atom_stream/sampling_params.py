"""SamplingParams: per-request generation settings, validated with errors that name the field."""

from __future__ import annotations

import copy
import enum
import math
from collections.abc import Callable
from typing import Any

import msgspec

from atom_stream.structured.params import coerce_structured

MAX_LOGPROBS = 20
_INT64_MAX = 2**63 - 1
SAMPLING_EPS = 1e-5  # vLLM's _SAMPLING_EPS: a temperature below it is greedy
MIN_TEMPERATURE = 1e-2  # vLLM's _MAX_TEMP: positive temperatures below it are raised to it
MAX_TEMPERATURE = 2.0  # vLLM's _verify_args (PR #44965) and OpenAI: [0, 2]
MAX_LOGIT_BIAS = 100.0  # vLLM's from_optional clamps logit_bias values to [-100, 100]
MAX_NUM_BAD_WORDS = 128  # vLLM's VLLM_MAX_NUM_BAD_WORDS: token sequences per request
MAX_BAD_WORDS_TOTAL_TOKENS = 1024  # vLLM's VLLM_MAX_BAD_WORDS_TOTAL_TOKENS


class SamplingParamsError(ValueError):
    """An invalid sampling parameter. `param` names it (the OpenAI error's `param`)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


class RequestOutputKind(enum.IntEnum):
    """vLLM's RequestOutputKind (same names and values): what `AsyncEngine.generate` yields.
    DELTA (the default here, DESIGN.md; vLLM's default is CUMULATIVE): each output holds what
    is new since the previous one. CUMULATIVE: each output holds everything so far.
    FINAL_ONLY: one output, the whole request, at the end. `LLM.generate` ignores it (it
    returns whole outputs, as vLLM's LLM does)."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


_OUTPUT_KINDS = frozenset(k.value for k in RequestOutputKind)


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """How to generate. Defaults follow vLLM (temperature 1, top_p 1, top_k off, min_p 0).

    - `max_tokens=None`: fill the context up to max_model_len.
    - `top_k <= 0`: no top-k (-1 and 0 alike). `temperature`: in [0, 2]; 0 = greedy (and then
      n must be 1, as vLLM; top_p / top_k / min_p are validated and then ignored);
      0 < t < 0.01 is raised to 0.01 (vLLM's _MAX_TEMP), so only 0 is greedy.
    - `seed`: per-request generator; the same seed gives the same tokens alone or in any batch.
      -1 means no seed (vLLM).
    - `logprobs`: None = none; k >= 0 = the sampled token's logprob plus the top k (k <= 20);
      True is read as 1 and False as 0 (the sampled token's logprob only), as in vLLM, where a
      bool is an int.
    - `prompt_logprobs`: None or k >= 0 (True = 1, False = 0), logprobs of the prompt tokens.
    - `stop`: strings matched on the detokenized text (trimmed from the output unless
      `include_stop_str_in_output`); `stop_token_ids`: extra stop tokens (kept in token_ids).
      None for either is "none" (vLLM's default), read as []; stop_token_ids are deduplicated.
    - `detokenize`: vLLM's; False returns the token ids only (text "", stop strings refused).
    - `spaces_between_special_tokens`: vLLM's; accepted and kept. It has no effect here, as in
      vLLM with a fast tokenizer: every tokenizer this engine loads (byte-level BPE, Kimi's
      tiktoken, the demo's bytes) joins special tokens without spaces either way.
    - `logit_bias`: token id (JSON: its string) -> a number added to its logit, clamped to
      [-100, 100] as vLLM's OpenAI server does; `allowed_token_ids`: sample only among these ids
      (OpenAI / vLLM).
    - `bad_words`: words never to generate (vLLM): the engine tokenizes them
      (`tokenize_bad_words`, into `bad_words_token_ids`); at each step the last token of a
      sequence is banned when the output so far ends with the rest of it (a one-token word is
      always banned). Duplicates are dropped, empty strings refused.
    - `output_kind`: vLLM's RequestOutputKind (or its int value) for AsyncEngine streams;
      default DELTA.
    - `truncate_prompt_tokens`: vLLM's; None, or keep only the LAST k prompt tokens (k >= 1;
      -1: as many as leave room for max_tokens); k above max_model_len is refused by the
      engine (`truncate_prompt`).
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = msgspec.field(default_factory=list)
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True  # vLLM's: False returns token ids only (text "", no stop strings)
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] = msgspec.field(default_factory=list)
    # vLLM's cache_salt: prefix-cache hits only between requests with the same salt (it enters
    # the first block's hash: engine/block_manager.salt_root); None = unsalted
    cache_salt: str | None = None
    output_kind: RequestOutputKind = RequestOutputKind.DELTA
    truncate_prompt_tokens: int | None = None
    # vLLM keywords that ported code passes, accepted with vLLM's meaning here: `extra_args`
    # is kept for plugins and read by no sampler (as in vLLM); `skip_clone` changes nothing
    # (the engine copies the params either way); `flat_logprobs` is vLLM's storage format of
    # the same per-position dicts.
    extra_args: dict[str, Any] | None = None
    skip_clone: bool = False
    flat_logprobs: bool = False
    # guided decoding (atom_stream.structured): a StructuredOutputsParams or a dict of its
    # fields; `guided_decoding` is vLLM's older name of the same (either one, or both equal)
    structured_outputs: Any = None
    guided_decoding: Any = None
    # the token-id sequences of bad_words: set only by the engine (LLMEngine.add_request, on its
    # own copy, as vLLM's update_from_tokenizer on a clone); reset by every construction
    _bad_words_token_ids: list[list[int]] | None = None
    # the compiled structured_outputs (a structured.Grammar): set only by the engine, likewise
    _grammar: Any = None
    # the text after which structured_outputs applies (a reasoning parser's end tag, set by
    # the chat route when the request thinks: the reasoning itself is free, as vLLM's
    # reasoning-aware structured outputs); None: from the first token
    _structured_after: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:  # vLLM: None (its default) is no stop strings
            self.stop = []
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if self.bad_words is None:
            self.bad_words = []
        elif isinstance(self.bad_words, list) and all(isinstance(w, str) for w in self.bad_words):
            self.bad_words = list(dict.fromkeys(self.bad_words))  # vLLM: duplicates dropped
        self._bad_words_token_ids = None
        self._grammar = None
        self._coerce_structured()
        if isinstance(self.logit_bias, dict):  # JSON keys are strings: "50256" -> 50256
            bias = {}
            for k, v in self.logit_bias.items():
                try:
                    tid = int(k)
                except (TypeError, ValueError):
                    raise SamplingParamsError("logit_bias",
                                              f"key {k!r} is not a token id") from None
                if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v):
                    v = min(MAX_LOGIT_BIAS, max(-MAX_LOGIT_BIAS, float(v)))  # NaN: refused below
                bias[tid] = v
            self.logit_bias = bias
        kind = self.output_kind
        if isinstance(kind, int) and not isinstance(kind, bool) and kind in _OUTPUT_KINDS:
            self.output_kind = RequestOutputKind(kind)  # 1 (JSON) -> RequestOutputKind.DELTA
        if self.seed == -1:  # vLLM: -1 is "no seed"
            self.seed = None
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if isinstance(v, bool):  # vLLM: a bool is an int there (True is 1, False is 0)
                setattr(self, name, int(v))
        t = self.temperature
        if isinstance(t, (int, float)) and not isinstance(t, bool) and 0.0 < t < MIN_TEMPERATURE:
            # vLLM raises these (NaN/inf in its tensors otherwise) before deciding greedy
            self.temperature = MIN_TEMPERATURE
        self.validate()
        self._normalize_valid()

    def _coerce_structured(self) -> None:
        """structured_outputs / guided_decoding as one StructuredOutputsParams (a dict or
        vLLM's own object is converted; SamplingParamsError naming the field if invalid)."""
        specs = {}
        for name in ("structured_outputs", "guided_decoding"):
            try:
                specs[name] = coerce_structured(getattr(self, name))
            except ValueError as e:
                raise SamplingParamsError(name, str(e)) from None
        a, b = specs["structured_outputs"], specs["guided_decoding"]
        if a is not None and b is not None and a != b:
            raise SamplingParamsError("guided_decoding", "give structured_outputs or "
                                      "guided_decoding (its older name), not two different ones")
        self.structured_outputs = self.guided_decoding = a if a is not None else b

    def _normalize_valid(self) -> None:
        """vLLM's __post_init__ step after _verify_args: stop_token_ids deduplicated (first
        occurrence kept; after validation, so that True never merges into 1). Greedy rows
        ignore top_p / top_k / min_p (the sampler skips them) but, unlike vLLM, keep them."""
        self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids))

    def __repr__(self) -> str:
        """The public fields (vLLM's repr lists them; the engine's tokenized bad words are
        not one)."""
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__struct_fields__
                           if not name.startswith("_"))
        return f"SamplingParams({fields})"

    def clone(self) -> SamplingParams:
        """A deep copy (vLLM's SamplingParams.clone): changing its lists or dicts leaves this
        one unchanged."""
        return copy.deepcopy(self)

    def truncate_prompt(self, ids: list[int], max_model_len: int) -> list[int]:
        """The prompt a request runs: the last `truncate_prompt_tokens` of `ids` (vLLM's left
        truncation; -1: max_model_len - max_tokens of them, at least 1, as vLLM's renderer);
        `ids` itself when unset or already that short."""
        k = self.truncate_prompt_tokens
        if k is None:
            return ids
        return keep_last(ids, truncation_length(k, max_model_len, self.max_tokens))

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    def validate(self) -> None:
        def num(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise SamplingParamsError(name, f"must be a finite number, got {v!r}")
            return float(v)

        def integer(name: str, lo: int, hi: int = _INT64_MAX, optional: bool = False) -> None:
            v = getattr(self, name)
            if v is None and optional:
                return
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise SamplingParamsError(name, f"must be an integer in [{lo}, {hi}], got {v!r}")

        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens",
                     "spaces_between_special_tokens", "detokenize", "skip_clone",
                     "flat_logprobs"):
            v = getattr(self, name)
            if not isinstance(v, bool):  # "false" would be truthy: the opposite of the intent
                raise SamplingParamsError(name, f"must be true or false, got {v!r}")
        if self.extra_args is not None and not isinstance(self.extra_args, dict):
            raise SamplingParamsError("extra_args", f"must be a dict, got {self.extra_args!r}")
        integer("n", 1, 128)
        integer("max_tokens", 1, optional=True)
        integer("min_tokens", 0)
        k = self.truncate_prompt_tokens
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k == 0
                              or k < -1):
            raise SamplingParamsError("truncate_prompt_tokens",
                                      f"must be an integer >= 1 or -1, got {k!r}")
        if not 0.0 <= num("temperature") <= MAX_TEMPERATURE:
            raise SamplingParamsError("temperature", f"must be in [0, {MAX_TEMPERATURE:g}], got "
                                      f"{self.temperature!r}")
        if self.greedy and self.n > 1:  # vLLM's _verify_greedy_sampling
            raise SamplingParamsError("n", f"must be 1 when using greedy sampling, got {self.n}")
        if not 0.0 < num("top_p") <= 1.0:
            raise SamplingParamsError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        integer("top_k", -1, 2**31 - 1)
        if not 0.0 <= num("min_p") <= 1.0:
            raise SamplingParamsError("min_p", f"must be in [0, 1], got {self.min_p!r}")
        integer("seed", -(2**63), _INT64_MAX, optional=True)
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= num(name) <= 2.0:
                raise SamplingParamsError(name, f"must be in [-2, 2], got {getattr(self, name)!r}")
        if not 0.0 < num("repetition_penalty"):  # vLLM: any finite value > 0
            raise SamplingParamsError("repetition_penalty", f"must be greater than zero, got "
                                      f"{self.repetition_penalty!r}")
        integer("logprobs", 0, MAX_LOGPROBS, optional=True)
        integer("prompt_logprobs", 0, MAX_LOGPROBS, optional=True)
        if not isinstance(self.stop, list) or any(not isinstance(s, str) for s in self.stop):
            raise SamplingParamsError("stop", "must be a string or a list of strings")
        # bounded (the stop matcher's work per token grows with them), looser than before
        if any(not s for s in self.stop):  # vLLM's _verify_args
            raise SamplingParamsError("stop", "cannot contain an empty string")
        if len(self.stop) > 64 or any(len(s) > 1024 for s in self.stop):
            raise SamplingParamsError("stop", "at most 64 strings of <= 1024 chars")
        if not isinstance(self.stop_token_ids, list) or any(
            isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids
        ):
            raise SamplingParamsError("stop_token_ids", "must be a list of non-negative ints")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamsError("min_tokens", f"must be less than or equal to "
                                      f"max_tokens={self.max_tokens}, got {self.min_tokens}")
        if self.logit_bias is not None and (not isinstance(self.logit_bias, dict) or any(
                isinstance(k, bool) or not isinstance(k, int) or k < 0
                or isinstance(v, bool) or not isinstance(v, (int, float))
                or not -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS
                for k, v in self.logit_bias.items())):
            raise SamplingParamsError("logit_bias", "must map token ids (>= 0) to numbers")
        if self.allowed_token_ids is not None and (
                not isinstance(self.allowed_token_ids, list) or not self.allowed_token_ids
                or any(isinstance(t, bool) or not isinstance(t, int) or t < 0
                       for t in self.allowed_token_ids)):
            raise SamplingParamsError("allowed_token_ids",
                                      "must be a non-empty list of non-negative ints")
        if self.cache_salt is not None and (not isinstance(self.cache_salt, str)
                                            or not self.cache_salt):
            # vLLM's protocol validator, word for word
            raise SamplingParamsError(
                "cache_salt", "Parameter 'cache_salt' must be a non-empty string if provided.")
        kind = self.output_kind  # an int set after construction is as good (IntEnum)
        if isinstance(kind, bool) or not isinstance(kind, int) or kind not in _OUTPUT_KINDS:
            raise SamplingParamsError("output_kind", f"must be a RequestOutputKind (0 "
                                      f"CUMULATIVE, 1 DELTA, 2 FINAL_ONLY), got "
                                      f"{self.output_kind!r}")
        bw = self.bad_words
        if not isinstance(bw, list) or any(not isinstance(w, str) for w in bw):
            raise SamplingParamsError("bad_words", "must be a list of strings")
        if any(not w for w in bw):  # vLLM's _verify_args
            raise SamplingParamsError("bad_words", "cannot contain an empty string")
        if len(bw) > MAX_NUM_BAD_WORDS:
            # each word tokenizes to >= 1 sequence: vLLM refuses these after tokenizing
            raise SamplingParamsError("bad_words", f"at most {MAX_NUM_BAD_WORDS} words (vLLM's "
                                      f"limit of {MAX_NUM_BAD_WORDS} token sequences)")

    @property
    def bad_words_token_ids(self) -> list[list[int]] | None:
        """The tokenized bad_words (None until the engine tokenized them, or none given)."""
        return self._bad_words_token_ids

    @property
    def uses_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    def child(self, index: int) -> SamplingParams:
        """The params of choice `index` of an n > 1 request, as vLLM's ParentRequest makes them:
        n = 1 and, with a seed, seed + index. The seed is set after construction (vLLM assigns it
        on a copy) so that a child landing on -1 keeps it as a seed instead of reading it as
        "no seed"; it wraps within int64, which seeds the same generator (seed_key uses 64 bits).
        """
        c = msgspec.structs.replace(self, n=1)
        if self.seed is not None:
            c.seed = (self.seed + index + 2**63) % 2**64 - 2**63
        return c


def truncation_length(k: int, max_model_len: int, max_tokens: int | None) -> int:
    """How many prompt tokens `truncate_prompt_tokens` k keeps: k itself, or for -1 the
    max_model_len - max_tokens that leave room for the output (at least 1; vLLM's renderer)."""
    return max(1, max_model_len - (max_tokens or 0)) if k == -1 else k


def keep_last(ids: list[int], k: int) -> list[int]:
    """The last k ids (vLLM's left truncation, `tokens[-max_length:]`); `ids` itself when it
    is no longer."""
    return ids if k >= len(ids) else ids[-k:]


def tokenize_bad_words(words: list[str], encode: Callable[[str], list[int]],
                       vocab_size: int) -> list[list[int]]:
    """vLLM's SamplingParams.update_from_tokenizer: the token-id sequences that bad_words ban.

    `encode(text)` must tokenize without special tokens (add_special_tokens=False). Each word is
    left-stripped and encoded as is, then with a leading space; the space form is kept only when
    it is a different word token of the same length (first id differs, same number of ids), so a
    tokenizer whose space is its own token (byte-level) keeps only the bare form. Raises
    SamplingParamsError("bad_words") for a word without tokens, more than MAX_NUM_BAD_WORDS
    sequences or MAX_BAD_WORDS_TOTAL_TOKENS ids, or an id outside [0, vocab_size).
    """
    seqs: list[list[int]] = []
    for word in words:
        for add_prefix_space in (False, True):
            ids = list(encode((" " if add_prefix_space else "") + word.lstrip()))
            if not ids:
                if not add_prefix_space:
                    raise SamplingParamsError(
                        "bad_words", f"entries must tokenize to at least one token, {word!r} "
                        "does not")
                continue  # the bare form is still enforceable
            if not add_prefix_space or (ids[0] != seqs[-1][0] and len(ids) == len(seqs[-1])):
                seqs.append(ids)
                if len(seqs) > MAX_NUM_BAD_WORDS:
                    raise SamplingParamsError(
                        "bad_words", f"too many bad words after tokenization: {len(seqs)}; the "
                        f"max number is {MAX_NUM_BAD_WORDS}")
    total = sum(len(ids) for ids in seqs)
    if total > MAX_BAD_WORDS_TOTAL_TOKENS:
        raise SamplingParamsError("bad_words", f"too many total bad word tokens: {total}; the "
                                  f"max is {MAX_BAD_WORDS_TOTAL_TOKENS}")
    invalid = [t for ids in seqs for t in ids if not 0 <= t < vocab_size]
    if invalid:
        raise SamplingParamsError("bad_words", f"the model vocabulary size is {vocab_size}, but "
                                  f"these tokens were specified as bad: {invalid}")
    return seqs


def model_sampling_defaults(model: str | None) -> dict:
    """The checkpoint's generation_config.json sampling defaults (config.
    generation_sampling_defaults: vLLM's get_diff_sampling_param), checked once: values that
    SamplingParams refuses are logged and dropped (a bad file must not fail every request)."""
    import logging

    from atom_stream.config import generation_sampling_defaults

    defaults = generation_sampling_defaults(model)
    log = logging.getLogger(__name__)
    for key in list(defaults):
        try:
            SamplingParams(**{key: defaults[key]})
        except (SamplingParamsError, TypeError, ValueError, msgspec.ValidationError) as e:
            log.warning("generation_config.json: %s=%r ignored (%s)", key, defaults.pop(key), e)
    if defaults:
        log.info("default sampling parameters from the model's generation_config.json: %s "
                 "(a request's own values override them)", defaults)
    return defaults
