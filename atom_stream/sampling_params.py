"""SamplingParams: per-request generation settings, validated with errors that name the field."""

from __future__ import annotations

import math

import msgspec

MAX_LOGPROBS = 20
_INT64_MAX = 2**63 - 1
SAMPLING_EPS = 1e-5  # vLLM's _SAMPLING_EPS: a temperature below it is greedy
MIN_TEMPERATURE = 1e-2  # vLLM's _MAX_TEMP: positive temperatures below it are raised to it
MAX_TEMPERATURE = 2.0  # vLLM's _verify_args (PR #44965) and OpenAI: [0, 2]
MAX_LOGIT_BIAS = 100.0  # vLLM's from_optional clamps logit_bias values to [-100, 100]


class SamplingParamsError(ValueError):
    """An invalid sampling parameter. `param` names it (the OpenAI error's `param`)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """How to generate. Defaults follow vLLM (temperature 1, top_p 1, top_k off, min_p 0).

    - `max_tokens=None`: fill the context up to max_model_len.
    - `top_k <= 0`: no top-k (-1 and 0 alike). `temperature`: in [0, 2]; 0 = greedy (and then
      n must be 1, as vLLM); 0 < t < 0.01 is raised to 0.01 (vLLM's _MAX_TEMP), so only 0 is
      greedy.
    - `seed`: per-request generator; the same seed gives the same tokens alone or in any batch.
      -1 means no seed (vLLM).
    - `logprobs`: None = none; k >= 0 = the sampled token's logprob plus the top k (k <= 20).
    - `prompt_logprobs`: None or k >= 0, logprobs of the prompt tokens (for echo/loglikelihood).
    - `stop`: strings matched on the detokenized text (trimmed from the output unless
      `include_stop_str_in_output`); `stop_token_ids`: extra stop tokens (kept in token_ids).
    - `logit_bias`: token id (JSON: its string) -> a number added to its logit, clamped to
      [-100, 100] as vLLM's OpenAI server does; `allowed_token_ids`: sample only among these ids
      (OpenAI / vLLM).
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
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.logit_bias, dict):  # JSON keys are strings: "50256" -> 50256
            bias = {}
            for k, v in self.logit_bias.items():
                try:
                    tid = int(k)
                except (TypeError, ValueError):
                    raise SamplingParamsError("logit_bias", f"key {k!r} is not a token id") from None
                if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v):
                    v = min(MAX_LOGIT_BIAS, max(-MAX_LOGIT_BIAS, float(v)))  # NaN: refused below
                bias[tid] = v
            self.logit_bias = bias
        if self.seed == -1:  # vLLM: -1 is "no seed"
            self.seed = None
        t = self.temperature
        if isinstance(t, (int, float)) and not isinstance(t, bool) and 0.0 < t < MIN_TEMPERATURE:
            # vLLM raises these (NaN/inf in its tensors otherwise) before deciding greedy
            self.temperature = MIN_TEMPERATURE
        self.validate()

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

        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            v = getattr(self, name)
            if not isinstance(v, bool):  # "false" would be truthy: the opposite of the intent
                raise SamplingParamsError(name, f"must be true or false, got {v!r}")
        integer("n", 1, 128)
        integer("max_tokens", 1, optional=True)
        integer("min_tokens", 0)
        if not 0.0 <= num("temperature") <= MAX_TEMPERATURE:
            raise SamplingParamsError("temperature", f"must be in [0, {MAX_TEMPERATURE:g}], got "
                                      f"{self.temperature!r}")
        if self.greedy and self.n > 1:  # vLLM's _verify_greedy_sampling
            raise SamplingParamsError("n", f"must be 1 when using greedy sampling, got {self.n}")
        if not 0.0 < num("top_p") <= 1.0:
            raise SamplingParamsError("top_p", "must be in (0, 1]")
        integer("top_k", -1, 2**31 - 1)
        if not 0.0 <= num("min_p") <= 1.0:
            raise SamplingParamsError("min_p", "must be in [0, 1]")
        integer("seed", -(2**63), _INT64_MAX, optional=True)
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= num(name) <= 2.0:
                raise SamplingParamsError(name, "must be in [-2, 2]")
        if not 0.0 < num("repetition_penalty"):  # vLLM: any finite value > 0
            raise SamplingParamsError("repetition_penalty", "must be > 0")
        integer("logprobs", 0, MAX_LOGPROBS, optional=True)
        integer("prompt_logprobs", 0, MAX_LOGPROBS, optional=True)
        if not isinstance(self.stop, list) or any(not isinstance(s, str) for s in self.stop):
            raise SamplingParamsError("stop", "must be a string or a list of strings")
        # bounded (the stop matcher's work per token grows with them), looser than before
        if len(self.stop) > 64 or any(not s or len(s) > 1024 for s in self.stop):
            raise SamplingParamsError("stop", "at most 64 non-empty strings of <= 1024 chars")
        if not isinstance(self.stop_token_ids, list) or any(
            isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids
        ):
            raise SamplingParamsError("stop_token_ids", "must be a list of non-negative ints")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamsError("min_tokens", "must not exceed max_tokens")
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
