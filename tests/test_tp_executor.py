"""TP worker processes on the CPU (gloo): the step broadcast over the shared-memory ring gives
rank 0 the same logits as a single rank, and many engine steps with block-table deltas
(engine/step_codec.py) keep the worker in lockstep (same tokens as a single rank); a dead worker
is detected within seconds and leaves no orphan process."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from atom_stream.config import EngineConfig
from atom_stream.engine.model_runner import ModelRunner
from atom_stream.engine.sequence import ScheduledBatch, Sequence
from atom_stream.engine.shm_ring import ShmRing
from atom_stream.sampling_params import SamplingParams


def _batch(block_size: int, seed: int) -> ScheduledBatch:
    """Two prefills of random lengths over disjoint, shuffled blocks."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randperm(40, generator=g).tolist()
    seqs, news = [], []
    for n in (13, 29):
        s = Sequence(f"r{n}", torch.randint(0, 256, (n,), generator=g).tolist(),
                     SamplingParams(temperature=0), max_tokens=8)
        need = -(-n // block_size)
        s.block_table = [blocks.pop() for _ in range(need)]
        seqs.append(s)
        news.append(n)
    return ScheduledBatch(seqs=seqs, num_new_tokens=news, sample=[True, True], num_decodes=0)


def _config(tp: int) -> EngineConfig:
    return EngineConfig(model="demo", device="cpu", dtype="float32", tensor_parallel_size=tp,
                        num_kv_blocks=64, block_size=4, max_model_len=256)


def test_shm_ring_in_order_with_wraparound():
    ring = ShmRing(None, num_readers=1, num_slots=2, slot_bytes=64)
    reader = ShmRing.attach(ring.spec())
    try:
        got = []
        for i in range(7):
            ring.write(bytes([i]) * (i + 1))
            got.append(reader.read(0, timeout=1.0))
        assert got == [bytes([i]) * (i + 1) for i in range(7)]
        with pytest.raises(ValueError):
            ring.write(b"x" * 65)
    finally:
        reader.unlink()
        ring.unlink()


def test_tp2_logits_match_single_rank():
    from atom_stream.engine.distributed import TPExecutor

    single = ModelRunner(_config(1))
    want, _ = single.run_inputs(single.build_inputs(_batch(4, 0)))
    ex = TPExecutor(_config(2))
    try:
        batch = _batch(4, 0)
        inp = ex.runner.build_inputs(batch)
        ex._broadcast(inp)
        got, _ = ex.runner.run_inputs(inp)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    finally:
        ex.shutdown()
    assert all(not p.is_alive() for p in ex.procs)


def test_dead_worker_is_detected_and_reported():
    from atom_stream.engine.distributed import TPExecutor

    ex = TPExecutor(_config(2))
    try:
        os.kill(ex.procs[0].pid, signal.SIGKILL)
        t0 = time.monotonic()
        while ex.dead is None and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        assert ex.dead is not None and time.monotonic() - t0 < 10
        with pytest.raises(RuntimeError, match="died"):
            ex._broadcast(ex.runner.build_inputs(_batch(4, 1)))
    finally:
        ex.shutdown(timeout=2.0)
    assert all(not p.is_alive() for p in ex.procs)


async def signal_worker_mid_stream(engine, pid: int, sig: int, sent: dict) -> None:
    """Stream a greedy request and send `sig` to `pid` once 3 tokens arrived (time in
    sent["at"]); the stream is expected to end with an error, which propagates."""
    import asyncio

    from atom_stream import SamplingParams

    got = 0
    async for out in engine.generate(list(range(1, 9)), SamplingParams(
            max_tokens=400, ignore_eos=True, temperature=0)):
        got += len(out.token_ids)
        if got >= 3 and "at" not in sent:
            os.kill(pid, sig)
            sent["at"] = time.monotonic()
        await asyncio.sleep(0)


async def test_killing_a_worker_fails_requests_and_marks_the_engine_dead():
    """Through the AsyncEngine: a TP worker killed mid-generation ends the in-flight request
    with an error within 10 s, and the engine reports itself dead (the server's /health 503)."""
    from atom_stream import AsyncEngine
    from atom_stream.errors import AtomStreamError

    cfg = _config(2)
    async with AsyncEngine(cfg) as engine:
        ex, sent = engine.core.runner, {}
        with pytest.raises(AtomStreamError):
            await signal_worker_mid_stream(engine, ex.procs[0].pid, signal.SIGKILL, sent)
        assert time.monotonic() - sent["at"] < 10
        assert engine.is_dead


async def test_hung_worker_trips_the_step_watchdog():
    """A TP worker that is alive but stuck (SIGSTOP) mid-generation: after watchdog_timeout the
    in-flight request ends with an error, the engine reports dead with a message naming the
    hang, and shutdown leaves no process behind (the stopped worker is killed)."""
    from dataclasses import replace

    from atom_stream import AsyncEngine
    from atom_stream.errors import AtomStreamError

    cfg = replace(_config(2), watchdog_timeout=2.0)
    async with AsyncEngine(cfg) as engine:
        ex, sent = engine.core.runner, {}
        try:
            with pytest.raises(AtomStreamError):
                await signal_worker_mid_stream(engine, ex.procs[0].pid, signal.SIGSTOP, sent)
            assert time.monotonic() - sent["at"] < 10
            assert engine.is_dead and "hung" in str(ex.dead)
            ex.procs[0].join(5)  # the watchdog killed the stopped worker (not our cleanup)
            assert ex.procs[0].exitcode == -signal.SIGKILL
        finally:
            for p in ex.procs:
                if p.is_alive():
                    os.kill(p.pid, signal.SIGCONT)
    assert all(not p.is_alive() for p in ex.procs)
    # the shutdown thread wakes the loop as its last act, so it may not have returned yet
    for t in threading.enumerate():
        if t.name == "atom-stream-runner-shutdown":
            t.join(10)
    assert not any(t.name == "atom-stream-runner-shutdown" for t in threading.enumerate())


def test_watchdog_timeout_is_validated():
    from dataclasses import replace

    from atom_stream.config import ConfigError

    with pytest.raises(ConfigError, match="watchdog_timeout"):
        replace(_config(2), watchdog_timeout=0)


LLM_KW = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 48, "block_size": 4,
          "max_model_len": 192}  # the pool's 48 x 4 tokens


def _greedy_prompts(mult: int, base: int, step: int, n: int, max_tokens: int):
    """n prompts of growing length, greedy params, and a single rank's (TP=1) tokens for them."""
    from atom_stream.llm import LLM

    prompts = [[(mult * i + j) % 250 + 1 for j in range(base + step * i)] for i in range(n)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    single = LLM("demo", **LLM_KW)
    want = [o.token_ids for o in single.generate(prompt_token_ids=prompts, sampling_params=params)]
    single.engine.shutdown()
    return prompts, params, want


def test_tp2_engine_with_table_deltas_matches_single_rank():
    """Many steps through the worker: block-table deltas (the encoder's default, also for these small tables)
    reach rank 1 and it stays in lockstep, so the tokens equal a single rank's."""
    from atom_stream.engine.step_codec import StepEncoder
    from atom_stream.llm import LLM

    prompts, params, want = _greedy_prompts(7, 3, 5, 4, 12)
    llm = LLM("demo", tensor_parallel_size=2, **LLM_KW)
    try:
        ex = llm.engine.runner
        ex._encoder = StepEncoder(min_delta_cells=1)
        got = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]
        assert ex._encoder.num_delta >= 5, (ex._encoder.num_delta, ex._encoder.num_full)
        assert ex.dead is None
    finally:
        llm.engine.shutdown()
    assert got == want


def count_id_broadcasts(monkeypatch) -> list[int]:
    """Rank 0's device broadcasts of pending decode ids (model_runner.broadcast_from_first),
    counted: the list gets one entry (the ids' length) per call."""
    from atom_stream.engine import model_runner as mr

    calls: list[int] = []
    real = mr.broadcast_from_first
    monkeypatch.setattr(mr, "broadcast_from_first",
                        lambda x, info: calls.append(x.shape[0]) or real(x, info))
    return calls


def test_tp2_async_scheduling_matches_sync_and_single_rank(monkeypatch):
    """Async scheduling under TP: decode inputs that are the previous step's uncollected tokens
    reach rank 1 through a device broadcast from rank 0 inside the step. Pipelined TP=2 gives the
    synchronous TP=2 and the single-rank tokens (greedy, mixed prompt lengths so prefills run
    beside in-flight decodes), and the broadcast really ran."""
    from dataclasses import replace

    from test_async_scheduling import TOK, drive

    from atom_stream.engine.llm_engine import LLMEngine

    calls = count_id_broadcasts(monkeypatch)
    g = torch.Generator().manual_seed(21)
    reqs = [(f"q{i}", torch.randint(1, 250, (int(n),), generator=g).tolist(),
             SamplingParams(temperature=0, max_tokens=10 + i, ignore_eos=True))
            for i, n in enumerate(torch.randint(2, 30, (5,), generator=g))]

    def run(tp: int, pipelined: bool):
        # a rank stuck without its broadcast partner fails in seconds, not the default 300
        cfg = replace(_config(tp), async_scheduling=pipelined, max_num_batched_tokens=24,
                      max_num_seqs=24,
                      watchdog_timeout=30.0)
        engine = LLMEngine(cfg, tokenizer=TOK)
        try:
            merged, _ = drive(engine, reqs, pipelined)
            assert getattr(engine.runner, "dead", None) is None
        finally:
            engine.shutdown()
        return {rid: o.token_ids for rid, o in merged.items()}

    want = run(1, False)
    assert run(2, False) == want
    assert not calls
    assert run(2, True) == want
    assert calls, "no pending decode ids were broadcast"


def test_tp2_in_a_process_that_already_has_a_default_group(tmp_path):
    """An application that initialized torch.distributed itself (or an earlier engine whose stuck
    teardown abandoned its group) can still start a TP engine: the ranks form a private group,
    give the single rank's tokens, and shutdown leaves the application's default group alone."""
    import torch.distributed as dist

    from atom_stream.llm import LLM

    prompts, params, want = _greedy_prompts(5, 4, 3, 3, 6)
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/app", rank=0, world_size=1)
    try:
        llm = LLM("demo", tensor_parallel_size=2, **LLM_KW)
        try:
            assert llm.engine.runner.private_group
            got = [o.token_ids
                   for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]
        finally:
            llm.engine.shutdown()
        assert got == want
        assert dist.is_initialized()  # the application's group survives the engine
        t = torch.ones(2)
        dist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0]
    finally:
        dist.destroy_process_group()


def test_rendezvous_port_is_below_the_ephemeral_range():
    """The TP store's port is one the kernel never gives a connecting socket as its local port
    (a worker connecting early cannot self-connect on it), and it is free."""
    import socket

    from atom_stream.engine.tp_workers import _ephemeral_low, _free_port

    for _ in range(5):
        port = _free_port()
        assert 1024 < port < _ephemeral_low()
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_bad_config_fails_every_rank_with_one_line_each():
    """A configuration error every rank meets (max_model_len past the model's) is the leader's
    ConfigError and one log line from the worker, not a traceback per rank."""
    import subprocess
    import sys

    code = ("import logging; logging.basicConfig()\n"
            "from atom_stream import LLM\nfrom atom_stream.config import ConfigError\n"
            "try:\n    LLM('demo', tensor_parallel_size=2, device='cpu', dtype='float32',"
            " num_kv_blocks=16, max_model_len=10 ** 7)\n"
            "except ConfigError as e:\n    print('ERR', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 0 and r.stdout.startswith("ERR max_model_len"), r.stdout + r.stderr
    assert "TP rank 1 could not start: ConfigError: max_model_len" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
