"""What the engine's constructors and front doors share: the request params' coercion
(`coerce_params`), the tokenizer choice (`load_engine_tokenizer`; `checkpoint_lacks_tokenizer` /
`warn_no_tokenizer`: a checkpoint directory with no tokenizer file serves token ids only in the
in-process APIs), and LLM's data-parallel warning (`warn_one_replica`)."""

from __future__ import annotations

import logging
import os
from typing import Any

from atom_stream.config import EngineConfig
from atom_stream.errors import InvalidRequestError
from atom_stream.sampling_params import SamplingParams, SamplingParamsError

logger = logging.getLogger(__name__)

_DEFAULT_PARAMS = SamplingParams()


def coerce_params(params: Any) -> SamplingParams:
    """A request's params as the engine takes them (the one path: add_request, and LLM's n > 1
    fan-out before it): None = the defaults, a SamplingParams, or an SGLang-style plain dict of
    the same fields and checks; validated again (a struct may have been mutated since its
    construction). Raises InvalidRequestError naming the field."""
    params = _DEFAULT_PARAMS if params is None else params
    try:
        if isinstance(params, dict):
            params = SamplingParams(**params)
        elif not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params: must be SamplingParams or a dict, got "
                                      f"{type(params).__name__}", "params")
        params.validate()
    except SamplingParamsError as e:
        raise InvalidRequestError(str(e), e.param) from None
    except TypeError as e:  # an unknown field in a dict
        raise InvalidRequestError(f"params: {e}", "params") from None
    return params


def requested_n(params: Any) -> int:
    """The choices a request's params (SamplingParams, a dict or None) ask for, read without
    validating: n, or 1 when unset or not a count >= 1 (coerce_params refuses a bad n)."""
    n = params.get("n", 1) if isinstance(params, dict) else getattr(params, "n", 1)
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1


def load_engine_tokenizer(config: EngineConfig):
    """The tokenizer for `config`: `config.tokenizer`, else the checkpoint directory's, else
    the demo byte-level one (a bench preset gets it stretched to its vocab)."""
    from atom_stream.tokenizer import load_tokenizer
    path = config.tokenizer
    if path is None and not config.is_demo and os.path.isdir(os.path.expanduser(config.model)):
        path = config.model
    if path is None and not config.is_demo:
        from atom_stream.tokenizer import preset_tokenizer
        tok = preset_tokenizer(config.model, config.chat_template)
        if tok is not None:  # dummy-weight bench preset: ids past the demo's 320
            return tok
    return load_tokenizer(path, trust_remote_code=config.trust_remote_code,
                          chat_template=config.chat_template)


# files any tokenizer loader reads (HF fast/slow, sentencepiece, BPE, Kimi's tiktoken)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "tiktoken.model", "vocab.json", "vocab.txt", "merges.txt", "spiece.model")


def checkpoint_lacks_tokenizer(config: EngineConfig) -> bool:
    """True when the tokenizer would come from a local checkpoint directory (no explicit
    `tokenizer`) that holds no tokenizer file at all (e.g. a bare save_pretrained of a model).
    A directory with tokenizer files that fail to load is not this case: that stays an error."""
    if config.tokenizer is not None or config.is_demo or config.model is None:
        return False
    path = os.path.expanduser(config.model)
    if not os.path.isdir(path):
        return False
    return not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES)


def warn_no_tokenizer(config: EngineConfig) -> None:
    """The in-process APIs (LLM, AsyncEngine) run such a checkpoint as skip_tokenizer_init."""
    logger.warning("no tokenizer files in %s: token-id prompts only (pass tokenizer=PATH for "
                   "text)", config.model)


def warn_one_replica(config: EngineConfig, who: str) -> None:
    """data_parallel_size > 1 is a server setting (engine/dp.DPEngine: `atom-stream serve -dp
    N`, dp.make_async_engine); `who` (LLM) runs one engine and says so. (AsyncEngine does not
    warn: DPEngine's replicas are AsyncEngines whose configs keep the replica count.)"""
    if config.data_parallel_size > 1:
        logger.warning("%s runs one engine: data_parallel_size=%d is ignored here (use "
                       "`atom-stream serve -dp N` or atom_stream.engine.dp.make_async_engine)",
                       who, config.data_parallel_size)
