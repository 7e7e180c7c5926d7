"""vLLM parity of the in-process outputs (cumulative_logprob, prompt-logprob ranks) and the
engine review leftovers: one params-coercion path, per-request stop sets, one tokenizer load."""

from __future__ import annotations

import random

import pytest
import torch
from engine_fakes import FakeKVRunner

from atom_stream import LLM, EngineConfig, SamplingParams
from atom_stream.engine import llm_engine
from atom_stream.engine.llm_engine import LLMEngine
from atom_stream.engine.sequence import Sequence
from atom_stream.errors import InvalidRequestError
from atom_stream.layers.attention import AttentionMetadata
from atom_stream.layers.sampling_metadata import SamplingMetadata

KW = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 64}


def sampled_sum(out) -> float:
    return sum(lp[0] for lp in out.engine_logprobs)  # the engine form's sampled logprobs


def test_cumulative_logprob_is_the_sum_of_the_sampled_logprobs(llm):
    prompts = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12]]
    for params in (SamplingParams(max_tokens=6, logprobs=2, seed=1, ignore_eos=True),
                   SamplingParams(max_tokens=6, logprobs=0, temperature=0, ignore_eos=True)):
        for out in llm.generate(prompts, params):
            assert len(out.logprobs) == 6
            assert out.cumulative_logprob == sampled_sum(out)  # exact: the same additions
            assert out.cumulative_logprob < 0
    for out in llm.generate(prompts, SamplingParams(max_tokens=3, seed=1)):
        assert out.logprobs is None and out.cumulative_logprob is None
    (multi,) = llm.generate([prompts[0]], SamplingParams(n=2, max_tokens=4, logprobs=1, seed=5))
    for ch in multi.outputs:
        assert ch.cumulative_logprob == sampled_sum(ch)
    assert multi.cumulative_logprob == multi.outputs[0].cumulative_logprob


def test_cumulative_logprob_is_a_running_total_on_every_delta(llm):
    eng = llm.engine
    eng.add_request("cum", [3, 1, 4, 1, 5], SamplingParams(max_tokens=5, logprobs=1, seed=2,
                                                           ignore_eos=True))
    eng.add_request("none", [2, 7, 1], SamplingParams(max_tokens=5, seed=2, ignore_eos=True))
    total, seen = 0.0, 0
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.request_id == "none":
                assert o.cumulative_logprob is None
                continue
            total += o.engine_logprobs[0][0]
            seen += 1
            assert o.cumulative_logprob == total
    assert seen == 5
    eng.add_request("gone", [9, 9], SamplingParams(max_tokens=5, logprobs=1))
    assert eng.abort("gone").cumulative_logprob == 0.0  # asked for, nothing sampled yet


def reference_logprobs(runner, ids: list[int]) -> torch.Tensor:
    """[T-1, V] float32 logprobs of prompt positions 1..T-1: one plain prefill of the runner's
    model over fresh caches (no engine, no scheduler, no chunking)."""
    cfg, bs = runner.model_config, runner.block_size
    T = len(ids)
    blocks = -(-T // bs)
    caches = [torch.zeros(blocks, bs, cfg.kv_cache_dim) for _ in range(cfg.num_hidden_layers)]
    md = AttentionMetadata(query_start_loc=[0, T], seq_lens=[T],
                           block_tables=torch.arange(blocks, dtype=torch.int32)[None],
                           slot_mapping=torch.arange(T), num_decodes=0, block_size=bs)
    with torch.inference_mode():
        hidden = runner.model(torch.tensor(ids), torch.arange(T), caches, md)
        return torch.log_softmax(runner.model.compute_logits(hidden[:-1]).float(), dim=-1)


def check_ranks(out, ids: list[int], ref: torch.Tensor, k: int, exact: bool) -> None:
    ranks = out.prompt_logprob_ranks
    assert ranks is not None and len(ranks) == len(out.engine_prompt_logprobs) == len(ids) - 1
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    target = torch.tensor(ids[1:])
    chosen = ref.gather(1, target[:, None])
    want = (ref >= chosen).sum(-1).tolist()  # vLLM: entries with logprob >= the token's
    assert want == (ref > chosen).sum(-1).add(1).tolist()  # no ties here: 1 + strictly greater
    for p, (rank, (lp, tops)) in enumerate(zip(ranks, out.engine_prompt_logprobs)):
        assert lp == pytest.approx(chosen[p, 0].item(), abs=1e-4)
        assert out.prompt_logprobs[p + 1][ids[p + 1]].rank == rank  # vLLM's dict: same rank
        if exact:
            assert rank == want[p], p
        else:  # chunked: other float roundings, so only values within 1e-4 may swap
            row, c = ref[p], chosen[p, 0]
            assert int((row > c + 1e-4).sum()) + 1 <= rank <= int((row >= c - 1e-4).sum()), p
        ids_top = [t for t, _ in tops]
        assert len(tops) == k
        if ids[p + 1] in ids_top:  # inside the top k: its place there (what the server shows)
            assert rank == ids_top.index(ids[p + 1]) + 1
        else:
            assert rank > k
    assert sum(r > k for r in ranks) >= len(ranks) // 2  # mostly the case the server nulled


def test_prompt_logprob_ranks_match_a_torch_reference(llm):
    rng = random.Random(11)
    ids = [rng.randrange(256) for _ in range(24)]
    ref = reference_logprobs(llm.engine.runner, ids)
    (out,) = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=2))
    check_ranks(out, ids, ref, 2, exact=True)
    (plain,) = llm.generate([ids], SamplingParams(max_tokens=1))
    assert plain.prompt_logprobs is None and plain.prompt_logprob_ranks is None
    # a prompt prefilled in chunks: the ranks come per chunk, in order
    with LLM("demo", max_num_batched_tokens=8, **KW) as small:
        assert small.engine.config.max_num_batched_tokens == 8
        (chunked,) = small.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=3))
        check_ranks(chunked, ids, ref, 3, exact=False)


def test_llm_fans_out_through_the_engines_params_path(llm, monkeypatch):
    seen = []
    orig = llm_engine.coerce_params
    monkeypatch.setattr("atom_stream.llm.coerce_params",
                        lambda p: seen.append(p) or orig(p))
    (multi,) = llm.generate([[1, 2]], {"n": 2, "max_tokens": 2, "seed": 3})
    assert len(multi.outputs) == 2 and seen == [{"n": 2, "max_tokens": 2, "seed": 3}]
    for bad in ({"n": 2, "bogus": 1}, {"n": 2, "top_p": 0}):
        with pytest.raises(InvalidRequestError) as fan:
            llm.generate([[1, 2]], bad)
        with pytest.raises(InvalidRequestError) as core:
            llm.engine.add_request("x", [1, 2], {k: v for k, v in bad.items() if k != "n"})
        assert (str(fan.value), fan.value.param) == (str(core.value), core.value.param)


def test_stop_sets_are_built_once_per_sequence():
    p = SamplingParams(min_tokens=3, stop_token_ids=[7, 9, 7], max_tokens=8)
    seq = Sequence("s", [1, 2], p, 8, eos_token_ids=(9, 400))
    assert seq.stop_token_set == frozenset({7, 9})
    assert sorted(seq.min_tokens_bans) == [7, 9, 400]
    assert Sequence("t", [1], SamplingParams(stop_token_ids=[5]), 4, (9,)).min_tokens_bans == ()
    V = 320
    md = SamplingMetadata.from_sequences([seq, seq], V, "cpu")
    assert sorted(md.banned_pos.tolist()) == [7, 9, V + 7, V + 9]  # 400 >= V: never written
    seq.token_ids += [3, 4, 5]  # min_tokens reached: nothing banned
    assert SamplingMetadata.from_sequences([seq], V, "cpu").banned_pos is None
    # the stop check reads the set: a stop token id ends the request with it as stop_reason
    eng = LLMEngine(EngineConfig(model="demo"), runner=FakeKVRunner(16),
                    skip_tokenizer_init=True)
    eng.add_request("r", [1, 2], SamplingParams(max_tokens=50, ignore_eos=True,
                                                stop_token_ids=list(range(250))))
    (out,) = eng.step()
    assert out.finish_reason == "stop" and out.stop_reason == out.token_ids[0]


def test_engine_loads_the_tokenizer_at_one_site(monkeypatch):
    calls = []
    orig = llm_engine.load_engine_tokenizer
    monkeypatch.setattr(llm_engine, "load_engine_tokenizer",
                        lambda config: calls.append(config.model) or orig(config))
    eng = LLMEngine(EngineConfig(model="demo"), runner=FakeKVRunner(16))
    assert calls == ["demo"] and eng.tokenizer is not None
    with LLM("demo", **KW) as real:  # the real runner: loaded once too
        assert len(calls) == 2 and real.tokenizer is not None
    LLMEngine(EngineConfig(model="demo"), runner=FakeKVRunner(16), skip_tokenizer_init=True)
    assert len(calls) == 2
