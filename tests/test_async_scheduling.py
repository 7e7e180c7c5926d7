"""Async scheduling (engine/pipeline.py): the pipelined core and AsyncEngine loop give exactly the
sync outputs (tokens, text, finish/stop reasons, usage, deltas) for greedy, seeded, EOS /
stop_token_ids / stop strings, max_tokens, penalties (read on the device: no drain), preemption
and chunked prefill, on the fake KV runner and the demo model; aborts and failures mid-pipeline
leak no blocks and fail exactly the failing step's requests; the prefix cache registers
generated blocks. A GPU test (graphs) is marked `gpu`."""

from __future__ import annotations

import asyncio
import random
import re
from collections import defaultdict

import pytest
import torch
from engine_fakes import EOS, FakeKVRunner

from atom_stream import AsyncEngine, EngineConfig, SamplingParams
from atom_stream.config import ConfigError
from atom_stream.engine.llm_engine import LLMEngine
from atom_stream.engine.outputs import RequestOutput
from atom_stream.engine.sequence import PLACEHOLDER
from atom_stream.errors import GenerationError
from atom_stream.tokenizer import load_tokenizer

TOK = load_tokenizer(None)


def fake_core(pipelined: bool, num_kv_blocks: int = 64, eos_every: int = 0,
              **kw) -> LLMEngine:
    runner = FakeKVRunner(num_kv_blocks, kw.get("block_size", 16), eos_every=eos_every,
                          pipelined=pipelined)
    return LLMEngine(EngineConfig(model="demo", **kw), runner=runner, tokenizer=TOK)


def demo_core(pipelined: bool, **kw) -> LLMEngine:
    cfg = {"model": "demo", "device": "cpu", "dtype": "float32", "async_scheduling": pipelined}
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg), tokenizer=TOK)


def drive(engine: LLMEngine, reqs, pipelined: bool, hook=None):
    """Submit `reqs`, step to completion (pipelined: `pipeline.step()`), checking the block
    accounting against the live sequences after every step. Returns ({id: merged}, {id: deltas})."""
    assert engine.async_scheduling == pipelined
    for rid, ids, p in reqs:
        engine.add_request(rid, ids, p)
    merged: dict[str, RequestOutput] = {}
    deltas: dict[str, list] = defaultdict(list)
    n = 0
    while engine.has_unfinished_requests():
        outs = engine.pipeline.step() if pipelined else engine.step()
        n += 1
        assert n < 10_000
        engine.block_manager.check_invariants([r.seq for r in engine.requests.values()])
        for r in engine.requests.values():  # only blocks of collected steps are in the cache
            seq = r.seq
            done = seq.num_computed_tokens - seq.num_uncollected
            assert seq.num_registered_blocks * engine.block_size <= max(done, 0), seq
        for o in outs:
            assert PLACEHOLDER not in o.token_ids
            deltas[o.request_id].append((o.token_ids, o.text, o.finish_reason, o.stop_reason))
            merged.setdefault(o.request_id, RequestOutput(o.request_id)).merge(o)
        if hook is not None:
            hook(engine, n)
    assert engine.pipeline.inflight is None
    engine.block_manager.check_invariants([])
    assert engine.block_manager.num_used == 0
    return merged, deltas


def drive_pipelined(engine: LLMEngine, reqs, hook=None):
    """drive(engine, reqs, True), counting the pipeline's drains: (merged, deltas, drains)."""
    drains = []
    orig = engine.pipeline.drain
    engine.pipeline.drain = lambda: drains.append(1) or orig()
    merged, deltas = drive(engine, reqs, True, hook)
    return merged, deltas, len(drains)


def count_preemptions_with_placeholder(engine: LLMEngine) -> list:
    """Record, per preemption, whether the victim held an uncollected token."""
    seen: list[bool] = []
    orig = engine.scheduler._preempt

    def preempt(victim):
        seen.append(victim.num_placeholders > 0)
        orig(victim)

    engine.scheduler._preempt = preempt
    return seen


def assert_same(a: dict, b: dict, usage: bool = True) -> None:
    assert sorted(a) == sorted(b)
    for rid, x in a.items():
        y = b[rid]
        assert x.token_ids == y.token_ids, rid
        assert (x.text, x.finish_reason, x.stop_reason) == (y.text, y.finish_reason,
                                                            y.stop_reason), rid
        assert x.usage.completion_tokens == len(x.token_ids), rid  # no wasted token counted
        if usage:
            assert x.usage == y.usage, rid


def mixed(n: int, seed: int, max_prompt: int = 90, stop_ids=(), stop=(), eos=False):
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        kind = i % 3
        p = SamplingParams(
            temperature=0.0 if kind == 0 else 0.8, top_p=1.0 if kind < 2 else 0.9,
            seed=None if kind == 0 else 1000 + i, max_tokens=rng.randint(1, 14),
            ignore_eos=not eos, stop_token_ids=list(stop_ids), stop=list(stop))
        reqs.append((f"r{i}", [rng.randrange(256) for _ in range(rng.randint(2, max_prompt))],
                     p))
    return reqs


# ---------------------------------------------------------------- fake runner, engine core
def test_fake_pipelined_equals_sync_with_stops_preemption_and_chunking():
    reqs = mixed(40, 0, stop_ids=(3, 77), stop=("a", "Q"), eos=True)
    kw = {"num_kv_blocks": 14, "max_num_batched_tokens": 48, "max_num_seqs": 16, "eos_every": 9}
    sync = fake_core(False, **kw)
    want, want_d = drive(sync, reqs, False)
    pipe = fake_core(True, **kw)
    preempted = count_preemptions_with_placeholder(pipe)
    got, got_d = drive(pipe, reqs, True)
    assert any(preempted)  # a victim's token was still on the "device"
    assert_same(got, want, usage=False)  # cached_tokens may differ: admissions move one step
    assert dict(got_d) == dict(want_d)  # the same deltas, one by one
    reasons = {o.finish_reason for o in got.values()}
    stop_reasons = {o.stop_reason for o in got.values()}
    assert reasons == {"stop", "length"}
    assert {3, 77} & stop_reasons and {"a", "Q"} & stop_reasons  # every stop kind happened
    assert any(o.finish_reason == "stop" and o.stop_reason is None for o in got.values())  # EOS
    for engine in (sync, pipe):
        assert engine.runner.corruptions == 0
        assert engine.stats()["num_preemptions"] > 0
    assert pipe.runner.pending_inputs > 0  # decode inputs really came from the previous handle
    # stopped requests wasted a launched row (never shown); generation_tokens counts only the
    # delivered tokens, so both loops count the same: the outputs' token counts
    delivered = sum(len(o.token_ids) for o in got.values())
    assert pipe.stats()["generation_tokens"] == sync.stats()["generation_tokens"] == delivered


def test_max_tokens_and_max_model_len_waste_no_slot():
    rng = random.Random(3)
    reqs = [(f"r{i}", [rng.randrange(256) for _ in range(rng.randint(1, 40))],
             SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 12), ignore_eos=True))
            for i in range(20)]
    reqs.append(("long", [5] * 50, SamplingParams(temperature=0.0, max_tokens=None,
                                                  ignore_eos=True)))
    sync = fake_core(False, max_model_len=60)
    want, _ = drive(sync, reqs, False)
    pipe = fake_core(True, max_model_len=60)
    got, _ = drive(pipe, reqs, True)
    assert_same(got, want)
    assert len(got["long"].token_ids) == 10 and got["long"].finish_reason == "length"
    # every sampled row was used: no step was launched for a request known to be finished
    assert pipe.stats()["generation_tokens"] == sync.stats()["generation_tokens"]
    assert pipe.runner.steps == sync.runner.steps


def test_aborts_while_a_step_is_in_flight_leak_nothing():
    reqs = mixed(16, 5, max_prompt=40)
    reqs = [(rid, ids, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
            for rid, ids, _ in reqs]
    aborted: dict[str, RequestOutput] = {}
    in_flight_aborts = []

    def hook(engine, n):
        if n in (3, 6, 9):
            inflight = engine.pipeline.inflight
            for rid in list(engine.requests)[:2]:
                seq = engine.requests[rid].seq
                in_flight_aborts.append(inflight is not None and seq in inflight.batch.seqs)
                aborted[rid] = engine.abort(rid)  # its row in the in-flight step is discarded
        if n == 3:  # the id of an aborted request is reused while its old row is in flight
            engine.add_request("r0", [1, 2, 3],
                               SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))

    engine = fake_core(True, num_kv_blocks=20)
    got, deltas = drive(engine, reqs, True, hook)
    assert len(aborted) == 6 and "r0" in aborted and sum(in_flight_aborts) >= 4
    for rid, final in aborted.items():
        assert final.finish_reason == "abort"
        shown = sum(len(d[0]) for d in deltas[rid]) if rid != "r0" else None
        if shown is not None:  # usage counts what was delivered, never an uncollected token
            assert final.usage.completion_tokens == shown
    assert got["r0"].token_ids[-4:] == engine.runner.reference([1, 2, 3], 4)
    assert got["r0"].finish_reason == "length"
    for rid, ids, p in reqs:
        if rid not in aborted:
            assert got[rid].token_ids == engine.runner.reference(ids, 20), rid
    assert engine.runner.corruptions == 0


def test_prefix_cache_registers_prompt_and_generated_blocks():
    rng = random.Random(7)
    prompt = [rng.randrange(256) for _ in range(40)]
    p30 = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    results = []
    for pipelined in (False, True):
        engine = fake_core(pipelined)
        a = drive(engine, [("a", prompt, p30)], pipelined)[0]["a"]
        follow = prompt + a.token_ids + [1, 2, 3]  # a "next turn" reuses the answer's blocks
        b = drive(engine, [("b", follow, p30), ("c", prompt + [9], p30)], pipelined)[0]
        results.append((a, b))
        assert b["b"].usage.cached_tokens == 64  # 40 + 30 - 1 computed -> 4 full blocks
        assert b["c"].usage.cached_tokens == 32
        assert engine.runner.corruptions == 0
    (a0, b0), (a1, b1) = results
    assert a0.token_ids == a1.token_ids
    assert_same(b1, b0)


def test_launch_and_collect_failures_fail_exactly_that_step():
    reqs = [(f"r{i}", [i + 1] * (3 + i), SamplingParams(temperature=0.0, max_tokens=12,
                                                           ignore_eos=True)) for i in range(8)]
    engine = fake_core(True, max_num_seqs=4)
    runner = engine.runner
    failed_batches: list[set[str]] = []

    def fail_launch(batch):
        ids = {s.request_id for s in batch.seqs}
        if not failed_batches and "r1" in ids and batch.num_decodes == len(batch.seqs):
            failed_batches.append(ids)
            return True
        return False

    def fail_collect(handle):
        ids = {s.request_id for s in handle.rows}
        if len(failed_batches) == 1 and "r5" in ids:
            failed_batches.append(ids)
            return True
        return False

    runner.fail_if = fail_launch
    runner.fail_collect_if = fail_collect
    got, _ = drive(engine, reqs, True)
    assert len(failed_batches) == 2
    errored = {rid for rid, o in got.items() if o.finish_reason == "error"}
    assert errored == failed_batches[0] | failed_batches[1]
    assert all("injected" in got[rid].error for rid in errored)
    for rid, ids, p in reqs:
        if rid not in errored:
            assert got[rid].token_ids == runner.reference(ids, 12)
            assert got[rid].finish_reason == "length"
    later, _ = drive(engine, [("x", [7, 7, 7], SamplingParams(temperature=0.0, max_tokens=5,
                                                               ignore_eos=True))], True)
    assert later["x"].token_ids == runner.reference([7, 7, 7], 5)


def test_sync_step_drains_and_config_switches():
    engine = fake_core(True)
    engine.add_request("a", [1, 2], SamplingParams(temperature=0.0, max_tokens=6,
                                                   ignore_eos=True))
    outs = engine.pipeline.step() + engine.pipeline.step()
    assert engine.pipeline.inflight is not None
    outs += engine.step()  # collects the in-flight step only
    assert engine.pipeline.inflight is None
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert [t for o in outs for t in o.token_ids] == engine.runner.reference([1, 2], 6)
    assert not fake_core(False).async_scheduling
    off = LLMEngine(EngineConfig(model="demo", async_scheduling=False),
                    runner=FakeKVRunner(pipelined=True), tokenizer=TOK)
    assert not off.async_scheduling
    with pytest.raises(ConfigError):
        EngineConfig(async_scheduling="yes")
    from atom_stream import cli
    for argv, want in (([], None), (["--async-scheduling"], True),
                       (["--no-async-scheduling"], False)):
        args = cli.serve_parser().parse_args(argv)
        assert cli.engine_config_from_args(args).async_scheduling is want


# ---------------------------------------------------------------- demo model
def test_demo_pipelined_equals_sync_greedy_seeded_stops_preemption():
    reqs = mixed(18, 11, max_prompt=70)
    small = {"num_kv_blocks": 10, "max_num_batched_tokens": 48, "max_num_seqs": 12}
    want, _ = drive(demo_core(False, **small), reqs, False)
    # stop on tokens the requests really produce, mid-stream
    stops = sorted({o.token_ids[len(o.token_ids) // 2] for o in want.values()
                    if len(o.token_ids) > 2})[:4]
    reqs = [(rid, ids, SamplingParams(**{**{f: getattr(p, f) for f in p.__struct_fields__},
                                         "stop_token_ids": stops}))
            for rid, ids, p in reqs]
    sync = demo_core(False, **small)
    want, want_d = drive(sync, reqs, False)
    pipe = demo_core(True, **small)
    gathered = []
    orig = pipe.runner._pending_rows
    pipe.runner._pending_rows = lambda *a: gathered.append(r := orig(*a)) or r
    preempted = count_preemptions_with_placeholder(pipe)
    got, got_d = drive(pipe, reqs, True)
    assert any(preempted)
    assert_same(got, want, usage=False)
    assert dict(got_d) == dict(want_d)
    assert any(o.finish_reason == "stop" for o in got.values())
    assert pipe.stats()["num_preemptions"] > 0 and sync.stats()["num_preemptions"] > 0
    assert sum(r is not None for r in gathered) > 5  # inputs gathered on the device


def test_demo_penalties_pipelined_without_drain_match_sync(monkeypatch):
    """Penalized rows read their last token on the device: no drain, and tokens and logprobs
    exactly the sync path's. Prompt logprobs still drain."""
    rng = random.Random(12)
    reqs = []
    for i in range(8):
        pen = i % 2 == 0
        reqs.append((f"p{i}", [rng.randrange(256) for _ in range(rng.randint(3, 30))],
                     SamplingParams(temperature=0.0 if i % 4 < 2 else 1.0, seed=i,
                                    max_tokens=8, ignore_eos=True, logprobs=2,
                                    min_tokens=3 if i == 3 else 0,
                                    presence_penalty=1.5 if pen else 0.0,
                                    frequency_penalty=0.7 if pen else 0.0,
                                    repetition_penalty=1.3 if i % 4 == 0 else 1.0)))
    want, _ = drive(demo_core(False, num_kv_blocks=32), reqs, False)
    from atom_stream.layers.sampler import SamplingMetadata
    build = SamplingMetadata.from_sequences.__func__
    on_device = []

    def spy(cls, *a, **kw):
        md = build(cls, *a, **kw)
        on_device.append(md.ph_pos is not None)
        return md

    monkeypatch.setattr(SamplingMetadata, "from_sequences", classmethod(spy))
    got, _, drains = drive_pipelined(demo_core(True, num_kv_blocks=32), reqs)
    assert_same(got, want)
    assert not drains and sum(on_device) > 4  # penalties over device tokens, no sync step
    for rid in got:
        assert [lp[0] for lp in got[rid].engine_logprobs] == [
            lp[0] for lp in want[rid].engine_logprobs]
    # prompt logprobs in flight still drain the pipeline
    lp_reqs = [(rid, ids, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True,
                                         prompt_logprobs=1 if rid == "p1" else None))
               for rid, ids, _ in reqs]
    want, _ = drive(demo_core(False, num_kv_blocks=32), lp_reqs, False)
    got, _, lp_drains = drive_pipelined(demo_core(True, num_kv_blocks=32), lp_reqs)
    assert_same(got, want)
    assert lp_drains
    gp, wp = got["p1"].engine_prompt_logprobs, want["p1"].engine_prompt_logprobs
    assert len(gp) == len(wp) == len(reqs[1][1]) - 1
    assert [x[0] for x in gp] == pytest.approx([x[0] for x in wp], abs=1e-5)
    assert [x[1][0][0] for x in gp] == [x[1][0][0] for x in wp]


def test_demo_grammars_and_bad_words_pipelined_without_drain_match_sync(monkeypatch):
    """Structured outputs and multi-token bad words read the previous token on the host: launch
    N+1 waits for N's host copy after its forward is enqueued (no drain), and the outputs are
    the sync path's."""
    check_grammars_pipelined(monkeypatch, 9, num_kv_blocks=48)


PRICE = r"-?[1-9][0-9]{0,3}\.[0-9]{2}"


def check_grammars_pipelined(monkeypatch, n: int, **kw) -> None:
    """n requests, a third each a price regex / a choice / free with multi-token bad words, on
    demo_core(**kw): pipelined == sync, no drain, the host copy waited for, the regex kept."""
    from atom_stream.engine.model_runner import ModelRunner
    rng = random.Random(5)
    kinds = ({"regex": PRICE}, {"choice": ["red apple", "green", "blue (x)"]}, None)
    reqs = []
    for i in range(n):
        so = kinds[i % 3]
        reqs.append((f"g{i}", [rng.randrange(256) for _ in range(rng.randint(3, 20))],
                     SamplingParams(temperature=1.0, seed=i, max_tokens=40 if so else 10,
                                    ignore_eos=so is None, structured_outputs=so,
                                    bad_words=["ab cd", "e"] if so is None else None)))
    want, _ = drive(demo_core(False, **kw), reqs, False)
    waits = []
    orig_host = ModelRunner.sampled_on_host
    monkeypatch.setattr(ModelRunner, "sampled_on_host",
                        staticmethod(lambda h: waits.append(1) or orig_host(h)))
    got, _, drains = drive_pipelined(demo_core(True, **kw), reqs)
    assert_same(got, want, usage=False)
    assert not drains and len(waits) > 5
    for i in range(0, n, 3):
        assert re.fullmatch(PRICE, got[f"g{i}"].text), got[f"g{i}"].text


# ---------------------------------------------------------------- AsyncEngine loop
async def collect_stream(engine, rid, ids, p):
    out = RequestOutput(rid)
    async for o in engine.generate(ids, p, request_id=rid):
        assert PLACEHOLDER not in o.token_ids
        out.merge(o)
    return out


async def test_async_engine_pipelined_demo_equals_sync_with_breaks():
    reqs = mixed(16, 21, max_prompt=60, eos=True, stop_ids=(EOS,))
    want, _ = drive(demo_core(False, num_kv_blocks=24), reqs, False)
    cfg = EngineConfig(model="demo", device="cpu", dtype="float32", num_kv_blocks=24)
    async with AsyncEngine(cfg, tokenizer=TOK) as engine:
        assert engine.core.async_scheduling
        res = await asyncio.gather(*(collect_stream(engine, rid, ids, p)
                                     for rid, ids, p in reqs))
        assert_same({o.request_id: o for o in res}, want, usage=False)

        async def breaker(i):  # closes its stream mid-way: aborted, blocks freed
            n = 0
            async for o in engine.generate([i + 1] * 20, SamplingParams(
                    temperature=0.0, max_tokens=40, ignore_eos=True)):
                n += len(o.token_ids)
                if n >= 3:
                    break
            return n

        assert all(n >= 3 for n in await asyncio.gather(*(breaker(i) for i in range(6))))
        for _ in range(50):
            await asyncio.sleep(0.01)
            if engine.stats()["used_blocks"] == 0:
                break
        assert engine.stats()["used_blocks"] == 0 and engine.stats()["num_running"] == 0


async def test_async_engine_pipelined_failures_aborts_and_shutdown():
    runner = FakeKVRunner(128, delay=0.002, pipelined=True)
    engine = AsyncEngine(EngineConfig(model="demo", max_num_seqs=2), runner=runner,
                         tokenizer=TOK)
    async with engine:
        p = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        runner.fail_if = lambda batch: any(s.request_id == "0" for s in batch.seqs)
        gens = [collect_stream(engine, str(i), [i + 1] * 5, p) for i in range(3)]
        res = await asyncio.gather(*gens, return_exceptions=True)
        assert isinstance(res[0], GenerationError) and "injected" in str(res[0])
        assert isinstance(res[1], GenerationError)  # shared the failing step with "0"
        assert res[2].token_ids == runner.reference([3] * 5, 6)
        runner.fail_if = None
        runner.fail_collect_if = lambda h: any(s.request_id == "c" for s in h.rows)
        res = await asyncio.gather(collect_stream(engine, "c", [4, 4], p),
                                   return_exceptions=True)
        assert isinstance(res[0], GenerationError) and "collect" in str(res[0])
        runner.fail_collect_if = None
        agen = engine.generate([5, 6], SamplingParams(temperature=0.0, max_tokens=500,
                                                      ignore_eos=True), request_id="ab")
        await agen.__anext__()
        await engine.abort("ab")
        rest = [o async for o in agen]
        assert rest[-1].finish_reason == "abort"
        assert engine.stats()["used_blocks"] == 0
        ok = await collect_stream(engine, "z", [8, 8, 8], p)
        assert ok.token_ids == runner.reference([8, 8, 8], 6) and not engine.is_dead
        task = asyncio.ensure_future(collect_stream(engine, "d", [9], p))
        await asyncio.sleep(0.005)
    assert (await task).finish_reason in ("length", "abort")
    assert engine.core.block_manager.num_used == 0 and runner.corruptions == 0
    assert runner.pending_inputs > 0


# ---------------------------------------------------------------- GPU (run with -m gpu)
@pytest.mark.gpu
def test_gpu_graphs_pipelined_equals_sync():
    """Pipelined == sync on the GPU with decode graphs, in float32, as test_gpu_engine_core's
    batch-invariance test runs. Pipelining changes the batches (48 requests on the CPU demo: 52
    sync steps vs 57 pipelined; a stopped sequence rides one more step, admissions move), and
    the GPU's decode is not bitwise batch invariant: rows <= 1-2 take the Triton GEMVs, more
    take cuBLAS, up to 4 fold W_UV into the MLA merge, and split lengths follow the batch above
    S x MIN_SPLIT tokens. float32 keeps those differences far below the logit gaps that decide
    a token; in bf16 a sampled request (r14) drew another token at a near-tie (H200, session
    22; the same at the kernels of session 21)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA/ROCm GPU")
    reqs = mixed(48, 31, max_prompt=200, stop_ids=(EOS,), eos=True)
    kw = {"device": "cuda", "dtype": "float32", "num_kv_blocks": 64,
          "max_num_batched_tokens": 256, "max_num_seqs": 32,
          "cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32]}
    sync = demo_core(False, **kw)
    assert sync.runner.graphs is not None
    want, want_d = drive(sync, reqs, False)
    pipe = demo_core(True, **kw)
    got, got_d = drive(pipe, reqs, True)
    assert_same(got, want, usage=False)
    assert dict(got_d) == dict(want_d)


@pytest.mark.gpu
def test_gpu_graphs_pipelined_penalties_equal_sync():
    """Penalties over the previous step's token on the device (prev ids gathered on the GPU,
    searchsorted / index_add in the sampler): the same outputs as sync, with no drain."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA/ROCm GPU")
    reqs = [(rid, ids, SamplingParams(**{**{f: getattr(p, f) for f in p.__struct_fields__},
                                         "presence_penalty": 0.6 * (i % 3),
                                         "frequency_penalty": 0.3 * (i % 2),
                                         "repetition_penalty": 1.0 + 0.2 * (i % 4 == 0)}))
            for i, (rid, ids, p) in enumerate(mixed(24, 41, max_prompt=120))]
    kw = {"device": "cuda", "dtype": "float32", "num_kv_blocks": 64,
          "max_num_batched_tokens": 256, "max_num_seqs": 16,
          "cudagraph_capture_sizes": [1, 2, 4, 8, 16]}
    want, _ = drive(demo_core(False, **kw), reqs, False)
    got, _, drains = drive_pipelined(demo_core(True, **kw), reqs)
    assert_same(got, want, usage=False)
    assert not drains


@pytest.mark.gpu
def test_gpu_graphs_pipelined_grammars_equal_sync(monkeypatch):
    """Grammar masks over the previous step's token, waited for on the GPU inside launch (after
    the graph replay is enqueued): the sync path's outputs, no drain."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA/ROCm GPU")
    check_grammars_pipelined(monkeypatch, 15, device="cuda", dtype="float32", num_kv_blocks=64,
                             max_num_seqs=16, cudagraph_capture_sizes=[1, 2, 4, 8, 16])
