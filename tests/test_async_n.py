"""n > 1 through AsyncEngine.generate (vLLM's AsyncLLM fans it out through ParentRequest): the
demo model, seeded sampling. Each streamed output carries one choice (`outputs == [choice]`,
`index` 0..n-1); only the last one is finished, with the whole request's usage; the choices'
tokens equal LLM.generate's n choices (same child seeds); FINAL_ONLY gives one output with every
choice; abort(parent), breaking out and a refused child leave nothing behind."""

from __future__ import annotations

import asyncio

import pytest

from atom_stream import LLM, AsyncEngine, EngineConfig, SamplingParams
from atom_stream.errors import InvalidRequestError, PromptTooLongError
from atom_stream.sampling_params import RequestOutputKind, SamplingParamsError

KW = {"model": "demo", "device": "cpu", "dtype": "float32", "num_kv_blocks": 96,
      "block_size": 4, "max_model_len": 128}
PROMPT = [5, 17, 33, 2, 9, 41, 7]


def _params(n=3, kind=RequestOutputKind.DELTA, max_tokens=6, seed=11) -> SamplingParams:
    return SamplingParams(n=n, temperature=0.9, top_k=50, seed=seed, max_tokens=max_tokens,
                          ignore_eos=True, output_kind=kind)


@pytest.fixture(scope="module")
def llm_choices() -> list[list[int]]:
    llm = LLM(**KW)
    try:
        out = llm.generate(prompt_token_ids=[PROMPT], sampling_params=_params())[0]
        return [c.token_ids for c in out.outputs]
    finally:
        llm.engine.shutdown()


async def _idle(engine: AsyncEngine) -> None:
    """The engine holds no request, no block, no parent (polled: a closed stream's aborts
    are applied after the running step)."""
    for _ in range(200):
        if (not engine.core.requests and engine.stats()["used_blocks"] == 0
                and not engine._parents and not engine._slots):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not idle: {engine.stats()}, parents {engine._parents}")


async def test_delta_stream_one_choice_per_output_matches_llm(llm_choices):
    async with AsyncEngine(EngineConfig(**KW)) as engine:
        outs = [o async for o in engine.generate(PROMPT, _params(), request_id="p")]
        got: dict[int, list[int]] = {}
        ended = set()
        for o in outs[:-1]:
            assert o.request_id == "p" and len(o.outputs) == 1
            assert o.finish_reason is None and not o.finished and o.usage is None
        for o in outs:
            c = o.outputs[0]
            assert c.index not in ended, "a choice spoke after its final output"
            got.setdefault(c.index, []).extend(c.token_ids)
            assert o.token_ids == c.token_ids
            if c.finish_reason is not None:
                assert c.finish_reason == "length"
                ended.add(c.index)
        assert [got[i] for i in range(3)] == llm_choices
        last = outs[-1]
        assert last.finished and last.finish_reason == "length" and ended == {0, 1, 2}
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(PROMPT), 18)
        await _idle(engine)


async def test_final_only_and_cumulative(llm_choices):
    async with AsyncEngine(EngineConfig(**KW)) as engine:
        outs = [o async for o in engine.generate(
            PROMPT, _params(kind=RequestOutputKind.FINAL_ONLY), request_id="f")]
        assert len(outs) == 1
        whole = outs[0]
        assert [c.index for c in whole.outputs] == [0, 1, 2]
        assert [c.token_ids for c in whole.outputs] == llm_choices
        assert whole.usage.completion_tokens == 18 and whole.finished
        cum = [o async for o in engine.generate(
            PROMPT, _params(kind=RequestOutputKind.CUMULATIVE), request_id="c")]
        last_of = {}
        for o in cum:
            c = o.outputs[0]
            prev = last_of.get(c.index, [])
            assert c.token_ids[:len(prev)] == prev  # each holds everything so far
            last_of[c.index] = c.token_ids
        assert [last_of[i] for i in range(3)] == llm_choices
        await _idle(engine)


async def test_abort_parent_at_every_point_ends_every_choice():
    """abort(parent) after 1..8 loop turns (before the children start, while they run): every
    stream ends, each choice that was started ends with "abort", nothing is left. (After none,
    the id is not known yet: the abort is ignored, as vLLM's.)"""
    async with AsyncEngine(EngineConfig(**KW)) as engine:
        for turns in range(1, 9):
            rid = f"a{turns}"
            agen = engine.generate(PROMPT, _params(max_tokens=200), request_id=rid)
            task = asyncio.ensure_future(_collect(agen))
            for _ in range(turns):
                await asyncio.sleep(0)
            await engine.abort(rid)
            outs = await asyncio.wait_for(task, 30)
            assert outs, "an aborted n > 1 request still ends with an output"
            assert outs[-1].finish_reason == "abort"
            for o in outs:
                for c in o.outputs:
                    assert c.finish_reason in (None, "abort")
            await _idle(engine)


async def _collect(agen) -> list:
    return [o async for o in agen]


async def test_break_out_and_cancel_free_every_child():
    async with AsyncEngine(EngineConfig(**KW)) as engine:
        agen = engine.generate(PROMPT, _params(max_tokens=200), request_id="b")
        async for _ in agen:
            break
        await agen.aclose()
        await _idle(engine)
        started = asyncio.Event()

        async def consume():
            async for _ in engine.generate(PROMPT, _params(max_tokens=200), request_id="x"):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _idle(engine)
        # the ids are free again: the same parent id runs to the end
        outs = [o async for o in engine.generate(PROMPT, _params(max_tokens=2),
                                                 request_id="b")]
        assert outs[-1].usage.completion_tokens == 6


async def test_refusals_leave_nothing_and_other_requests_run():
    async with AsyncEngine(EngineConfig(**KW)) as engine:
        with pytest.raises(PromptTooLongError):
            async for _ in engine.generate(list(range(1, 130)), _params()):
                pass
        await _idle(engine)
        with pytest.raises((SamplingParamsError, InvalidRequestError)):
            SamplingParams(n=2, temperature=0)  # vLLM: greedy takes n == 1 only
        live = engine.generate(PROMPT, _params(max_tokens=200), request_id="dup")
        first = await live.__anext__()
        assert first.request_id == "dup"
        with pytest.raises(InvalidRequestError, match="already live"):
            async for _ in engine.generate(PROMPT, _params(), request_id="dup"):
                pass
        with pytest.raises(InvalidRequestError, match="already live"):  # a child's id
            async for _ in engine.generate(PROMPT, SamplingParams(max_tokens=2),
                                           request_id=f"{first.outputs[0].index}_dup"):
                pass
        await engine.abort("dup")
        await _collect(live)
        await _idle(engine)
        one = [o async for o in engine.generate(PROMPT, SamplingParams(max_tokens=3,
                                                                       ignore_eos=True))]
        assert one[-1].usage.completion_tokens == 3 and one[-1].outputs == [one[-1]]


async def test_dp_counts_an_n_request_as_n_places_and_aborts_it_by_the_parent_id():
    from atom_stream.engine.dp import DPEngine

    async with DPEngine(EngineConfig(**KW, data_parallel_size=2)) as dp:
        agen = dp.generate(PROMPT, _params(n=3, max_tokens=200), request_id="dp")
        first = await agen.__anext__()
        assert first.outputs[0].index in (0, 1, 2)
        assert sorted(dp.outstanding) == [0, 3]
        await dp.abort("dp", internal=True)
        outs = [first] + await _collect(agen)
        assert outs[-1].finish_reason == "abort"
        assert dp.outstanding == [0, 0] and not dp.errored
        await dp.check_health()


async def test_text_prompt_is_every_outputs_prompt():
    async with AsyncEngine(EngineConfig(**KW)) as engine:
        outs = [o async for o in engine.generate("hello there", _params(max_tokens=2))]
        assert outs and all(o.prompt == "hello there" for o in outs)
        assert all(o.prompt_token_ids == outs[0].prompt_token_ids for o in outs)
