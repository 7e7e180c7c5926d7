"""TP review (session 25), CPU/gloo, black-box through LLM and AsyncEngine with
tensor_parallel_size=2 on the demo model:

- a step whose broadcast inputs are larger than one shared-memory ring slot (long prompts, many
  sequences, e.g. many rows over a long cached prefix) used to fail every request of that step
  (finish_reason "error": the ring refused the message); it now travels over several slots and
  the tokens equal a single rank's. The module's TP engine runs with tiny slots, so every other
  test here goes through multi-slot messages too.
- many concurrent streams (greedy and seeded) with aborts mid-prefill and mid-decode, prefix
  caching on, and bad requests refused on rank 0 between them: the workers stay in step and
  every completed stream equals TP1's.
- a worker killed mid-step: the engine's error names the dead worker first (it used to lead with
  "a TP step failed on rank 0 ..." and gloo's socket error).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest

from atom_stream import LLM, AsyncEngine, SamplingParams
from atom_stream.config import EngineConfig
from atom_stream.engine.shm_ring import ShmRing

KW = {"model": "demo", "device": "cpu", "dtype": "float32", "num_kv_blocks": 256,
      "block_size": 4, "max_model_len": 256, "enable_prefix_caching": True}
SLOT = 1024  # bytes: a 40-token prefill step is already larger
PREFIX = [17] * 24


def _prompts(n: int, seed: int) -> list[list[int]]:
    """n prompts over a shared prefix, of varied lengths (some past one ring slot alone)."""
    return [PREFIX + [(seed * 31 + 7 * i + j) % 250 + 1 for j in range(1 + (i * 13) % 120)]
            for i in range(n)]


def _params(i: int) -> SamplingParams:
    if i % 2:
        return SamplingParams(temperature=0.9, top_k=40, seed=1000 + i, max_tokens=10,
                              ignore_eos=True)
    return SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def _single_rank(prompts) -> list[list[int]]:
    llm = LLM(**KW)
    try:
        outs = llm.generate(prompt_token_ids=prompts,
                            sampling_params=[_params(i) for i in range(len(prompts))])
        return [o.token_ids for o in outs]
    finally:
        llm.engine.shutdown()


@pytest.fixture(scope="module")
def tp_config(monkeypatch_module):
    import atom_stream.engine.tp_workers as dist

    monkeypatch_module.setattr(dist, "RING_SLOT_BYTES", SLOT)
    return EngineConfig(tensor_parallel_size=2, **KW)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _read_all(reader: ShmRing, n: int, got: list) -> None:
    for _ in range(n):
        while True:
            try:
                got.append(reader.read(0, timeout=0.05))
                break
            except TimeoutError:
                continue


def test_ring_message_larger_than_the_whole_ring():
    """A chunked ring carries messages of any size in order (several slots, more than the whole
    ring, empty); a reader's timeout part-way through a message resumes it; an unchunked ring
    still refuses a message larger than a slot."""
    ring = ShmRing(None, num_readers=1, num_slots=2, slot_bytes=16, chunked=True)
    reader = ShmRing.attach(ring.spec())
    try:
        msgs = [bytes([i % 251]) * n for i, n in enumerate((0, 1, 16, 17, 33, 100, 5, 64))]
        got: list[bytes] = []
        t = threading.Thread(target=_read_all, args=(reader, len(msgs), got))
        t.start()
        for m in msgs:
            ring.write(m, timeout=10)
        t.join(10)
        assert got == msgs
        # the first chunk of a message only: the reader times out part-way, then resumes
        ring._write_chunk(memoryview(b"a" * 16), True, 1.0, None)
        with pytest.raises(TimeoutError):
            reader.read(0, timeout=0.05)
        ring._write_chunk(memoryview(b"bc"), False, 1.0, None)
        assert reader.read(0, timeout=1) == b"a" * 16 + b"bc"
    finally:
        reader.unlink()
        ring.unlink()
    plain = ShmRing(None, num_readers=1, num_slots=2, slot_bytes=16)
    try:
        with pytest.raises(ValueError, match="exceeds the ring slot"):
            plain.write(b"x" * 17)
    finally:
        plain.unlink()


def test_step_larger_than_a_ring_slot_matches_single_rank(tp_config):
    """Long prompts in one batch: the step's inputs span many ring slots (SLOT bytes each); every
    request finishes ("length", not "error") with the single rank's tokens."""
    prompts = _prompts(8, seed=1)
    want = _single_rank(prompts)
    llm = LLM(**{**KW, "tensor_parallel_size": 2})
    try:
        ex = llm.engine.runner
        assert ex.ring.slot_bytes == SLOT
        outs = llm.generate(prompt_token_ids=prompts,
                            sampling_params=[_params(i) for i in range(len(prompts))])
        assert [o.finish_reason for o in outs] == ["length"] * len(prompts)
        assert [o.token_ids for o in outs] == want
        assert ex.dead is None
    finally:
        llm.engine.shutdown()
    assert all(not p.is_alive() for p in ex.procs)


async def _stream(engine, prompt, params, rid, abort_after=None) -> list[int] | None:
    """The stream's tokens; `abort_after` tokens (0: before the first) abort it (None back)."""
    toks: list[int] = []
    agen = engine.generate(prompt, params, request_id=rid)
    if abort_after == 0:
        first = asyncio.ensure_future(agen.__anext__())
        await asyncio.sleep(0)
        await engine.abort(rid)
        await asyncio.gather(first, return_exceptions=True)
        await agen.aclose()
        return None
    async for out in agen:
        toks += out.token_ids
        if abort_after is not None and len(toks) >= abort_after:
            await engine.abort(rid)
            return None
    return toks


async def _bad(engine, kind: str) -> str:
    """The error type name of a bad request (the prompt is checked on rank 0), or "accepted"."""
    try:
        if kind == "long":
            prompt, params = [1] * 1000, _params(0)
        elif kind == "params":
            prompt, params = [1, 2, 3], SamplingParams(max_tokens=3, stop_token_ids=[10 ** 9])
        elif kind == "token":
            prompt, params = [10 ** 9], _params(0)
        else:
            prompt, params = "", _params(0)
        async for _ in engine.generate(prompt, params):
            pass
    except Exception as e:  # noqa: BLE001 - the refusal is what is checked
        return type(e).__name__
    return "accepted"


async def test_concurrent_streams_aborts_and_bad_requests_match_single_rank(tp_config):
    """24 concurrent streams over a shared cached prefix, a third aborted (before the first token
    or after 4), bad requests refused between them; then the same prompts again: every stream
    that ran to the end equals TP1's tokens, the engine is alive and its KV pool is empty."""
    prompts = _prompts(24, seed=2)
    want = _single_rank(prompts)
    async with AsyncEngine(tp_config) as engine:
        cut = {i: (0 if i % 6 == 1 else 4) for i in range(24) if i % 6 in (1, 3)}
        tasks = [_stream(engine, p, _params(i), f"a{i}", cut.get(i))
                 for i, p in enumerate(prompts)]
        bad = [_bad(engine, k) for k in ("long", "params", "token", "empty")]
        got = await asyncio.gather(*tasks, *bad)
        assert got[24:] == ["PromptTooLongError"] + ["InvalidRequestError"] * 3
        for i in range(24):
            assert got[i] == (None if i in cut else want[i]), i
        again = await asyncio.gather(*[_stream(engine, p, _params(i), f"b{i}")
                                       for i, p in enumerate(prompts)])
        assert again == want
        assert not engine.is_dead
        stats = engine.stats()
        assert (stats["num_running"], stats["num_waiting"]) == (0, 0)


async def test_worker_killed_mid_step_is_named_as_the_cause(tp_config):
    """SIGKILL on the worker while streams decode: every stream ends with an error within
    seconds, the engine is dead, and its reason starts with the dead worker (not with rank 0's
    collective error), as does the error new requests get."""
    from atom_stream.errors import AtomStreamError

    async with AsyncEngine(tp_config) as engine:
        ex = engine.core.runner
        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        streams = [asyncio.ensure_future(_stream(engine, [i + 1] * 8, params, f"k{i}"))
                   for i in range(3)]
        deadline = time.monotonic() + 30
        while engine.stats()["num_running"] < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # decoding
        os.kill(ex.procs[0].pid, signal.SIGKILL)
        t0 = time.monotonic()
        ends = await asyncio.wait_for(asyncio.gather(*streams, return_exceptions=True), 15)
        assert time.monotonic() - t0 < 10
        assert all(isinstance(e, AtomStreamError) for e in ends), ends
        assert engine.is_dead
        assert str(ex.dead).startswith("TP worker atom-stream-tp1 died"), ex.dead
        with pytest.raises(AtomStreamError, match="TP worker atom-stream-tp1 died"):
            await _stream(engine, [5, 6], params, "late")
    assert all(not p.is_alive() for p in ex.procs)


def test_llm_generate_raises_once_a_worker_died(tp_config):
    """LLM.generate after a TP worker died raises EngineDeadError naming it (vLLM's LLM raises
    too), also for a call made after the death; it does not return "error" outputs."""
    from atom_stream.errors import EngineDeadError

    llm = LLM(**{**KW, "tensor_parallel_size": 2})
    try:
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        assert llm.generate([[1, 2, 3]], params)[0].token_ids
        proc = llm.engine.runner.procs[0]
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        for _ in range(2):  # the step that finds the death, then a later call
            with pytest.raises(EngineDeadError, match="TP worker atom-stream-tp1 died"):
                llm.generate([[4, 5, 6]], params)
    finally:
        llm.shutdown()


def test_unguarded_script_gets_a_clear_start_error(tmp_path):
    """A script that builds a TP engine at import time (no `if __name__ == '__main__':`): each
    spawned rank re-imports it and exits 1. The error says so (it used to be a bare "died during
    start-up (exit code 1)"), and the rank's aborted start leaves no shared-memory segment."""
    import subprocess
    import sys

    from live_server import offline_env

    script = tmp_path / "unguarded.py"
    script.write_text("from atom_stream import LLM\n"
                      "LLM('demo', tensor_parallel_size=2, device='cpu', dtype='float32',"
                      " num_kv_blocks=16)\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=120, env=offline_env(), check=False)
    assert r.returncode == 1, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()
    assert any("TP rank 1 could not start: died during start-up (exit code 1) (if unguarded.py"
               " builds the engine at import time" in line for line in last), r.stderr[-2000:]
    assert "leaked shared_memory" not in r.stderr, r.stderr[-2000:]
