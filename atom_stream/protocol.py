"""Wire types: OpenAI-compatible requests/responses/stream chunks and the native WebSocket frames.

Everything on the wire is a msgspec Struct so that decoding validates (a type error names its JSON
path, which becomes the OpenAI error's `param`) and encoding is one C call with reusable encoders.

OpenAI shapes follow vLLM (about v0.10) byte for byte where clients may care:

- chat chunks are dumped like pydantic's `exclude_unset=True`: fields left at `UNSET` are omitted,
  so the role chunk is `{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,
  "finish_reason":null}` and only the finish chunk carries `stop_reason`;
- completion chunks are dumped with every field (`exclude_unset=False`), so each carries
  `"stop_reason":null` and a top-level `"usage":null`; the final usage chunk omits nulls;
- usage is `{"prompt_tokens","total_tokens","completion_tokens"}` in that order.

Unknown request fields are ignored (OpenAI clients send many); known fields are type-checked.

WebSocket frames (DESIGN.md, `/v1/ws`) are tagged unions on `"type"`; the same Structs encode to
JSON (subprotocol `atom-stream.v1.json`) and MessagePack (`atom-stream.v1.msgpack`).
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET, Struct, UnsetType

# ----------------------------------------------------------------------------------------------
# OpenAI requests
# ----------------------------------------------------------------------------------------------


class StreamOptions(Struct, kw_only=True):
    """Current vLLM (PR #36379; engine/protocol.py `include_usage: bool | None = False`): usage
    only when include_usage is true, so `{}` asks for nothing; continuous_usage_stats needs
    include_usage. Fields left out stay UNSET (false) so that `empty` can tell `{}` apart: vLLM
    refuses only a non-empty object without `stream`."""

    include_usage: bool | None | UnsetType = UNSET
    continuous_usage_stats: bool | None | UnsetType = UNSET

    @property
    def empty(self) -> bool:
        return self.include_usage is UNSET and self.continuous_usage_stats is UNSET


class ContentPart(Struct, kw_only=True):
    """One part of a list-valued message content; only text-like parts are served (text
    backbone): text / input_text / output_text (`text`), refusal (`refusal`), thinking
    (`thinking`), as vLLM reads them."""

    type: str
    text: str | None = None
    refusal: str | None = None
    thinking: str | None = None


class ChatMessage(Struct, kw_only=True, omit_defaults=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None  # newer vLLM's name for it; both are read (K2.5 history)
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class _SamplingRequest(Struct, kw_only=True):
    """Fields shared by chat and completions (OpenAI plus vLLM's extras)."""

    model: str | None = None
    # null takes the default in the fields the OpenAI API makes nullable (n, stream, echo,
    # logprobs; vLLM's Optional[...] fields): SDKs that dump every field send them as null
    n: int | None = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # vLLM's pydantic (lax mode) reads true / false as 1 / 0 (__post_init__)
    prompt_logprobs: int | bool | None = None
    request_id: str | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    # vLLM: chat and (since vLLM PR #46793) completions; list[str] (null and a bare string are
    # refused with 400, as vLLM's pydantic field list[str] = [])
    bad_words: list[str] = msgspec.field(default_factory=list)
    cache_salt: str | None = None  # vLLM: salts the prefix cache (SamplingParams.cache_salt)
    return_tokens_as_token_ids: bool | None = False  # vLLM: logprob tokens as "token_id:{id}"
    # vLLM: keep only the last N prompt tokens (-1: as many as fit; validated by the handler)
    truncate_prompt_tokens: int | None = None
    # vLLM: choices carry `token_ids` (and the prompt's `prompt_token_ids`)
    return_token_ids: bool | None = None
    use_beam_search: bool = False  # vLLM runs beam search; refused here with a 400
    # structured output (openai_params.structured_outputs; guided_grammar is refused)
    response_format: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    # newer vLLM's form of the guided_* fields ({"json" | "regex" | "choice" | "grammar" | ...})
    structured_outputs: dict[str, Any] | None = None
    # OpenAI / vLLM V0: sample best_of, return the n best; only best_of <= n is served (400)
    best_of: int | None = None
    # vLLM: the request's priority under --scheduling-policy priority; only FCFS is served,
    # so 0 (or null) only, as vLLM's default policy (openai_params.check_priority)
    priority: int | None = 0

    def __post_init__(self) -> None:
        if isinstance(self.prompt_logprobs, bool):
            self.prompt_logprobs = int(self.prompt_logprobs)


# the thinking switch's {"type": ...} forms as the bool the K2.5 / DeepSeek templates read
# (ATOM's `thinking` chat field, Anthropic's `thinking` request field)
THINKING_TYPES = {"enabled": True, "adaptive": True, "disabled": False}


class ChatCompletionRequest(_SamplingRequest, kw_only=True):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    echo: bool | None = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None  # refused (vLLM's default: untrusted request template)
    include_reasoning: bool = True  # vLLM's: false drops reasoning_content (still split off)
    # template variables set from request fields (chat_template_kwargs win over them):
    # vLLM's `reasoning_effort`, ATOM's `thinking` (true / false, or {"type": "enabled" |
    # "adaptive" | "disabled"}: K2.5's and DeepSeek's thinking switch; other values pass as
    # given; openai.py template_fields)
    reasoning_effort: str | None = None
    thinking: Any = None
    # tools are rendered into the prompt by the chat template; tool calls are parsed with
    # --enable-auto-tool-choice --tool-call-parser (tool_choice "auto"), see chat_parsing.py
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_SamplingRequest, kw_only=True):
    # str | list[int] | list[str] | list[list[int]]: msgspec unions allow one array type, so the
    # shape is checked by the handler.
    prompt: str | list[Any]
    max_tokens: int | None = 16
    echo: bool | None = False
    logprobs: int | bool | None = None  # true / false: 1 / 0, as vLLM's pydantic reads them
    suffix: str | None = None
    add_special_tokens: bool = True  # vLLM's extra field: the tokenizer's own prefix (BOS)

    def __post_init__(self) -> None:
        _SamplingRequest.__post_init__(self)
        if isinstance(self.logprobs, bool):
            self.logprobs = int(self.logprobs)


# ----------------------------------------------------------------------------------------------
# OpenAI responses
# ----------------------------------------------------------------------------------------------


class PromptTokensDetails(Struct):
    cached_tokens: int


class UsageInfo(Struct):
    """A streamed chunk's usage (vLLM streams with exclude_unset: no prompt_tokens_details key
    unless --enable-prompt-tokens-details sets it)."""

    prompt_tokens: int
    total_tokens: int
    completion_tokens: int
    prompt_tokens_details: PromptTokensDetails | UnsetType = UNSET

    def for_body(self) -> BodyUsage:
        """The same usage in a whole (non-streamed) body."""
        details = self.prompt_tokens_details
        return BodyUsage(self.prompt_tokens, self.total_tokens, self.completion_tokens,
                         None if details is UNSET else details)


class BodyUsage(Struct):
    """A whole body's usage: vLLM dumps it with model_dump, `prompt_tokens_details` null
    included."""

    prompt_tokens: int
    total_tokens: int
    completion_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class PromptLogprob(Struct):
    """vLLM's Logprob as its prompt_logprobs serialize it (keyed by token id)."""

    logprob: float
    rank: int | None
    decoded_token: str | None


# vLLM's `list[dict[int, Logprob] | None]`: None for the first prompt token, then per position
# the prompt token and the top-N
PromptLogprobs = list[dict[int, PromptLogprob] | None]


class TopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int]


class ChatLogprobToken(Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Struct):
    content: list[ChatLogprobToken]


class CompletionLogprobs(Struct):
    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class FunctionCall(Struct):
    name: str
    arguments: str  # the model's JSON text, as generated (not re-serialized)


class ToolCall(Struct):
    """vLLM's ToolCall (message.tool_calls[k]): id, type "function", function."""

    id: str
    type: str
    function: FunctionCall


class DeltaFunctionCall(Struct):
    name: str | UnsetType = UNSET
    arguments: str | UnsetType = UNSET


class DeltaToolCall(Struct, kw_only=True):
    """vLLM's DeltaToolCall dumped with exclude_unset: the first delta of a call carries id,
    type and function.name; later ones index and function.arguments (a piece of the text)."""

    id: str | UnsetType = UNSET
    type: str | UnsetType = UNSET
    index: int
    function: DeltaFunctionCall | UnsetType = UNSET


class DeltaMessage(Struct):
    role: str | UnsetType = UNSET
    content: str | UnsetType = UNSET
    # with --reasoning-parser / --tool-call-parser (vLLM's DeltaMessage field order)
    reasoning_content: str | UnsetType = UNSET
    tool_calls: list[DeltaToolCall] | UnsetType = UNSET


class ChatStreamChoice(Struct):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None | UnsetType = UNSET
    token_ids: list[int] | UnsetType = UNSET  # return_token_ids


class ChatCompletionChunk(Struct):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | UnsetType = UNSET
    prompt_token_ids: list[int] | UnsetType = UNSET  # return_token_ids: first chunk only


class CompletionStreamChoice(Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # return_token_ids (vLLM: prompt_token_ids on a choice's first chunk, token_ids on each)
    prompt_token_ids: list[int] | UnsetType = UNSET
    token_ids: list[int] | UnsetType = UNSET


class CompletionChunk(Struct):
    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionStreamChoice]
    usage: UsageInfo | None = None


class CompletionUsageChunk(Struct):
    """The final usage chunk of a completions stream (vLLM dumps it with exclude_none)."""

    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionStreamChoice]
    usage: UsageInfo


class ResponseMessage(Struct, kw_only=True):
    """vLLM's ChatMessage (about v0.10), dumped as its model_dump(): every field, always, in
    its declaration order, parsers or not. refusal, annotations, audio and function_call are
    OpenAI fields vLLM leaves null; tool_calls is [] and reasoning_content null when no parser
    produced them."""

    role: str
    content: str | None = None
    refusal: str | None = None
    annotations: Any = None
    audio: Any = None
    function_call: FunctionCall | None = None
    tool_calls: list[ToolCall] = msgspec.field(default_factory=list)
    reasoning_content: str | None = None  # vLLM's own field (not in the OpenAI spec)


class ChatChoice(Struct):
    """vLLM's ChatCompletionResponseChoice field order; token_ids only with return_token_ids."""

    index: int
    message: ResponseMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None
    stop_reason: int | str | None
    token_ids: list[int] | UnsetType = UNSET  # return_token_ids


class ChatCompletionResponse(Struct, kw_only=True):
    """vLLM's field order, dumped with every field (its model_dump): service_tier and
    system_fingerprint are the OpenAI fields vLLM leaves null."""

    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    service_tier: str | None = None
    system_fingerprint: str | None = None
    usage: BodyUsage
    prompt_logprobs: PromptLogprobs | None = None  # vLLM: on the response, not the choice
    prompt_token_ids: list[int] | UnsetType = UNSET  # return_token_ids
    kv_transfer_params: dict[str, Any] | None = None  # vLLM's (disaggregated prefill): null


class CompletionChoice(Struct):
    """vLLM's CompletionResponseChoice field order; token_ids / prompt_token_ids only with
    return_token_ids, prompt_logprobs always (null unless asked for, as vLLM dumps it)."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None
    stop_reason: int | str | None
    token_ids: list[int] | UnsetType = UNSET
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | UnsetType = UNSET


class CompletionResponse(Struct, kw_only=True):
    """vLLM's field order and nulls, as ChatCompletionResponse."""

    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    service_tier: str | None = None
    system_fingerprint: str | None = None
    usage: BodyUsage
    kv_transfer_params: dict[str, Any] | None = None  # vLLM's (disaggregated prefill): null


class ModelPermission(Struct):
    """vLLM's model_permission object (one per card, fixed values)."""
    id: str
    created: int
    object: str = "model_permission"
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(Struct):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "atom-stream"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[ModelPermission] = msgspec.field(default_factory=list)


class ModelList(Struct, kw_only=True):
    object: str = "list"  # vLLM's order: object, then data
    data: list[ModelCard] = msgspec.field(default_factory=list)


class ErrorInfo(Struct):
    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(Struct):
    error: ErrorInfo


# ----------------------------------------------------------------------------------------------
# WebSocket frames (/v1/ws)
# ----------------------------------------------------------------------------------------------

WS_JSON = "atom-stream.v1.json"
WS_MSGPACK = "atom-stream.v1.msgpack"
WS_SUBPROTOCOLS = (WS_JSON, WS_MSGPACK)


class WsGenerate(Struct, tag_field="type", tag="generate", kw_only=True):
    id: str
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[ChatMessage] | None = None
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    chat_template_kwargs: dict[str, Any] | None = None
    # messages only, as the chat route's fields (chat_template_kwargs override them)
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class WsCancel(Struct, tag_field="type", tag="cancel", kw_only=True):
    id: str


class WsAuth(Struct, tag_field="type", tag="auth", kw_only=True):
    api_key: str


ClientFrame = WsGenerate | WsCancel | WsAuth


class WsUsage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class WsDelta(Struct, tag_field="type", tag="delta"):
    id: str
    text: str
    token_ids: list[int]
    # [[logprob, [[token_id, logprob], ...]], ...] aligned with token_ids; only when asked for
    logprobs: list[Any] | UnsetType = UNSET


class WsDone(Struct, tag_field="type", tag="done"):
    id: str
    finish_reason: str
    usage: WsUsage
    stop_reason: int | str | None | UnsetType = UNSET


class WsError(Struct, tag_field="type", tag="error"):
    id: str | None
    code: int
    message: str
    param: str | UnsetType = UNSET


ServerFrame = WsDelta | WsDone | WsError


def validation_param(err: msgspec.ValidationError) -> str | None:
    """`Expected int, got str - at $.messages[0].role` -> `messages[0].role` (None at the root)."""
    msg = str(err)
    at = msg.rfind(" - at `$")
    if at < 0:
        return None
    path = msg[at + 8 : -1].lstrip(".")
    return path or None
