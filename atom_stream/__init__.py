"""atom-stream: a streaming inference server for DeepseekV3-style MoE + MLA models.

Public API: `LLM` (synchronous, offline), `AsyncEngine` (in-process async streams),
`SamplingParams`, `EngineConfig`, `RequestOutput`, `Logprob` (vLLM's: one entry of
`RequestOutput.logprobs[i]` / `prompt_logprobs[i]`, dicts keyed by token id),
`StructuredOutputsParams` (vLLM's guided decoding: `SamplingParams(structured_outputs=...)`;
`GuidedDecodingParams` is its older name).
"""

from __future__ import annotations

from atom_stream.config import EngineConfig
from atom_stream.engine.async_engine import AsyncEngine
from atom_stream.engine.outputs import (
    CompletionOutput,
    Logprob,
    MultiChoiceOutput,
    RequestOutput,
    Usage,
)
from atom_stream.llm import LLM
from atom_stream.sampling_params import RequestOutputKind, SamplingParams
from atom_stream.structured.params import GuidedDecodingParams, StructuredOutputsParams

__all__ = [
    "LLM",
    "AsyncEngine",
    "CompletionOutput",
    "EngineConfig",
    "GuidedDecodingParams",
    "Logprob",
    "MultiChoiceOutput",
    "RequestOutput",
    "RequestOutputKind",
    "SamplingParams",
    "StructuredOutputsParams",
    "Usage",
]
__version__ = "0.1.0"
