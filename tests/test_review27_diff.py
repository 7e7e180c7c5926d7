"""Review of session 27's diff: an n > 1 AsyncEngine request (vLLM's ParentRequest fan-out) frees
its id and children as a single request does (closing the parent frees every child before
aclose returns; the id is free once the final output is handed over), and a failed or dead
engine ends every choice with nothing left; the vLLM AsyncLLM health surface (is_running /
errored / check_health through `errored`, as vLLM's test_check_health patches it) and
from_engine_args with vLLM's keywords; an engine loaded by from_engine_args and shut down
unstarted shuts its runner down."""

from __future__ import annotations

import asyncio
from unittest.mock import patch

import pytest
from engine_fakes import FakeKVRunner, slow_chat_renders

from atom_stream import AsyncEngine, EngineConfig, SamplingParams
from atom_stream.errors import EngineDeadError, GenerationError
from atom_stream.sampling_params import RequestOutputKind
from atom_stream.tokenizer import load_tokenizer

PROMPT = [9, 4, 71, 30, 12]


def _engine(runner: FakeKVRunner | None = None) -> AsyncEngine:
    return AsyncEngine(EngineConfig(model="demo", num_kv_blocks=128, block_size=16),
                       runner=runner or FakeKVRunner(128, 16, delay=0.002),
                       tokenizer=load_tokenizer(None))


def _n(n: int = 3, max_tokens: int = 200, **kw) -> SamplingParams:
    return SamplingParams(n=n, temperature=0.8, seed=5, max_tokens=max_tokens,
                          ignore_eos=True, **kw)


def _nothing_left(engine: AsyncEngine) -> None:
    assert not engine.core.requests and engine.stats()["used_blocks"] == 0
    assert not engine._slots and not engine._parents and not engine._tokenizing


async def test_closing_the_parent_frees_every_child_before_aclose_returns():
    """A closed n = 1 stream aborts its request at once; a closed n > 1 stream left its
    children to the garbage collector's finalizer (id still live, blocks held)."""
    async with _engine() as engine:
        for turn in range(3):
            agen = engine.generate(PROMPT, _n(), request_id="par")
            await agen.__anext__()
            await agen.aclose()
            _nothing_left(engine)
            outs = [o async for o in engine.generate(PROMPT, _n(max_tokens=2),
                                                     request_id="par")]
            assert outs[-1].finished and outs[-1].usage.completion_tokens == 6, turn


@pytest.mark.parametrize("kind", [RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY])
async def test_parent_id_is_free_once_its_final_output_is_handed_over(kind):
    """DESIGN: the id is released when the final output reaches the consumer, not when the
    consumer next resumes the generator."""
    async with _engine() as engine:
        held = engine.generate(PROMPT, _n(max_tokens=3, output_kind=kind), request_id="fin")
        async for out in held:
            if out.finished:
                break  # `held` is suspended, not closed
        again = [o async for o in engine.generate(PROMPT, _n(max_tokens=2), request_id="fin")]
        assert again[-1].finished
        await held.aclose()
        _nothing_left(engine)


async def test_a_failed_step_and_a_dead_loop_end_every_choice():
    runner = FakeKVRunner(128, 16, delay=0.002)
    async with _engine(runner) as engine:
        agen = engine.generate(PROMPT, _n(), request_id="g")
        await agen.__anext__()
        runner.fail_next = 1
        with pytest.raises(GenerationError):
            async for _ in agen:
                pass
        await asyncio.sleep(0.05)
        _nothing_left(engine)
        agen = engine.generate(PROMPT, _n(), request_id="d")
        await agen.__anext__()

        def boom(batch, out):
            raise RuntimeError("bug in postprocess")

        engine.core.postprocess = boom
        with pytest.raises(EngineDeadError):
            async for _ in agen:
                pass
        assert not engine._parents and not engine._slots
        assert engine.errored and not engine.is_running
        with pytest.raises(EngineDeadError):
            await engine.check_health()


async def test_vllm_health_surface_and_from_engine_args_keywords():
    runner = FakeKVRunner(64, 16)
    engine = AsyncEngine.from_engine_args(
        EngineConfig(model="demo", num_kv_blocks=64), runner=runner,
        tokenizer=load_tokenizer(None), start_engine_loop=True, usage_context=None)
    assert engine.is_running and not engine.errored  # vLLM: running before its loop starts
    await engine.check_health()
    # vLLM's test_check_health: check_health answers from `errored`
    with (patch.object(type(engine), "errored", new_callable=lambda: property(lambda s: True)),
          pytest.raises(EngineDeadError)):
        await engine.check_health()
    await engine.shutdown()  # never started: its runner is still shut down
    assert runner.shut
    assert not engine.is_running and engine.errored and engine.is_stopped
    with pytest.raises(EngineDeadError):  # vLLM: a shut-down engine fails the health check
        await engine.check_health()


async def test_a_request_aborted_while_tokenized_reports_its_truncated_prompt():
    """truncate_prompt_tokens: the abort output of a request aborted while its chat prompt was
    rendered shows the prompt it would have run (the last k ids), as every other output."""
    async with _engine() as engine:
        slow_chat_renders(engine.tokenizer, 0.3)
        msgs = [{"role": "user", "content": "a prompt of more than four tokens"}]
        agen = engine.generate(msgs, SamplingParams(max_tokens=2, truncate_prompt_tokens=4),
                               request_id="t")
        task = asyncio.ensure_future(agen.__anext__())
        await asyncio.sleep(0.05)
        await engine.abort("t")
        out = await task
        assert out.finish_reason == "abort" and len(out.prompt_token_ids) == 4
        assert out.usage.prompt_tokens == 4
        await agen.aclose()
        _nothing_left(engine)
