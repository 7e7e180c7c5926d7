"""AsyncEngine's vLLM AsyncLLM surface: from_engine_args (model loaded on return, the loop
started by the first generate), is_running / errored / check_health / get_tokenizer /
get_model_config, abort(..., internal=...)."""

from __future__ import annotations

import pytest

from atom_stream import AsyncEngine, EngineConfig, SamplingParams
from atom_stream.errors import EngineDeadError

KW = {"model": "demo", "device": "cpu", "dtype": "float32", "num_kv_blocks": 64}


async def test_from_engine_args_serves_without_start_and_reports_state():
    engine = AsyncEngine.from_engine_args(EngineConfig(**KW))
    try:
        assert engine.core is not None and engine.is_running  # vLLM: running from the load on
        outs = [o async for o in engine.generate([1, 2, 3], SamplingParams(
            max_tokens=3, temperature=0, ignore_eos=True), request_id="r")]
        assert outs[-1].usage.completion_tokens == 3
        assert engine.is_running and not engine.errored
        await engine.check_health()
        assert (await engine.get_tokenizer()) is engine.tokenizer
        assert (await engine.get_model_config()) is engine.model_config
        await engine.abort("unknown", internal=True)  # vLLM's keyword; unknown ids ignored
    finally:
        await engine.shutdown()
    assert not engine.is_running


async def test_from_engine_args_takes_keywords_and_async_with():
    async with AsyncEngine.from_engine_args(**KW) as engine:
        outs = [o async for o in engine.generate("hi", SamplingParams(max_tokens=2))]
        assert outs[-1].finished


async def test_a_plain_engine_still_asks_to_be_started():
    engine = AsyncEngine(EngineConfig(**KW))
    with pytest.raises(EngineDeadError, match="not started"):
        async for _ in engine.generate([1, 2], SamplingParams(max_tokens=1)):
            pass
    await engine.shutdown()
    with pytest.raises(EngineDeadError, match="shut down"):  # no loading after a shutdown
        await engine.start()
