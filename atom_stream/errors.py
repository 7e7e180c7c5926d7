"""Exceptions shared by the engine and the front ends, with the HTTP status each maps to."""

from __future__ import annotations


class AtomStreamError(Exception):
    """Base class. `status` is the HTTP status the server answers with; `param` the bad field."""

    status: int = 500
    type: str = "InternalServerError"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(AtomStreamError, ValueError):
    """The request is malformed or a parameter is out of range (400)."""

    status = 400
    type = "BadRequestError"


class PromptTooLongError(InvalidRequestError):
    """The prompt does not fit in max_model_len (400, param "input_tokens")."""

    def __init__(self, num_tokens: int, max_model_len: int):
        super().__init__(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"request has {num_tokens} input tokens. Please reduce the length of the input "
            f"messages.",
            param="input_tokens",
        )


class MaxTokensTooLargeError(InvalidRequestError):
    """The prompt plus the requested max_tokens exceed max_model_len (400, param "max_tokens";
    vLLM's OpenAI server message). Raised only for requests that ask for the check (the HTTP
    API); the engine otherwise caps max_tokens at the context left."""

    def __init__(self, max_tokens: int, max_model_len: int, num_tokens: int):
        super().__init__(
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's "
            f"maximum context length is {max_model_len} tokens and your request has "
            f"{num_tokens} input tokens ({max_tokens} > {max_model_len} - {num_tokens}).",
            param="max_tokens",
        )


class EngineOverloadedError(AtomStreamError):
    """The waiting queue is full (503 with Retry-After)."""

    status = 503
    type = "ServiceUnavailableError"


class EngineDeadError(AtomStreamError):
    """The engine loop or a worker rank died; nothing more will be served (503)."""

    status = 503
    type = "ServiceUnavailableError"


class GenerationError(AtomStreamError):
    """A model step failed for this request; the engine goes on serving others (500)."""

    status = 500
    type = "InternalServerError"


class ServerShuttingDownError(AtomStreamError):
    """The server shut down while the request ran: it was aborted at the drain deadline (503,
    as the WebSocket's error frame for the same event)."""

    status = 503
    type = "ServiceUnavailableError"

    def __init__(self, message: str = "the request was aborted (server shutting down)"):
        super().__init__(message)


def refuse_lora(lora_request: object) -> None:
    """vLLM's `lora_request` argument (LLM.generate / chat, AsyncEngine.generate): only None;
    this engine serves no LoRA adapters."""
    if lora_request is not None:
        raise InvalidRequestError("lora_request is not supported: this engine serves no LoRA "
                                  "adapters", "lora_request")


def priority_error(priority: object) -> str:
    """vLLM's refusal of a non-zero request priority without --scheduling-policy priority
    (clients match on its wording), and why (the HTTP routes and LLM.generate)."""
    return (f"Got priority {priority} but Priority scheduling is not enabled. (This server "
            "implements only --scheduling-policy fcfs.)")
