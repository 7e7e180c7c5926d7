"""Request ids as vLLM's OpenAI server makes them: the client names the response, the engine
gets a unique id.

    base = base_request_id(request.headers, req.request_id)   # header > body > random
    rid = f"cmpl-{base}"                                       # the response's "id"
    engine.generate(..., engine_request_id(rid))               # "cmpl-<base>-<8 hex>"

- `base_request_id`: vLLM's `OpenAIServing._base_request_id`
  (vllm/entrypoints/openai/engine/serving.py): an `X-Request-Id` header, when present (even
  empty), wins over the body's `request_id`; without either, a random uuid4 hex.
- `engine_request_id`: vLLM's `InputProcessor.assign_request_id`
  (vllm/v1/engine/input_processor.py): the external id plus "-" and 8 random hex characters, so
  two live requests that carry the same client id (a gateway retrying with one id, a trace id
  stamped on every request) are two engine requests, and both succeed. The engine id is never
  shown to the client; responses keep the external id. Aborts need no mapping: the HTTP layer
  aborts by closing the request's own generator (disconnects, errors), which knows its engine id.
  Two live requests could still collide with probability ~n^2 / 2^33 (vLLM accepts the same);
  the engine then refuses the second with its "already live" 400.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping

REQUEST_ID_HEADER = "X-Request-Id"


def base_request_id(headers: Mapping[str, str] | None, default: str | None = None) -> str:
    """The client's id for a request: the `X-Request-Id` header (case-insensitive lookup on
    starlette Headers; present, even empty, it wins), else `default` (the body's
    `request_id`), else a random hex uuid; an empty `default` counts as none (vLLM's
    `default = default or random_uuid()`)."""
    if headers is not None:
        value = headers.get(REQUEST_ID_HEADER)
        if value is not None:
            return value
    return default or uuid.uuid4().hex


def engine_request_id(external_id: str) -> str:
    """A unique engine-level id for `external_id` (vLLM: `f"{id}-{random_uuid():.8}"`)."""
    return f"{external_id}-{uuid.uuid4().hex[:8]}"


__all__ = ["REQUEST_ID_HEADER", "base_request_id", "engine_request_id"]
