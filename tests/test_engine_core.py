"""Engine core (LLMEngine) and the LLM wrapper: batch invariance under preemption and chunked
prefill, prefix-cache reuse, seeds (real demo model); stops, stop strings, UTF-8 streaming, step
failures, aborts, metrics (fake runners); a hypothesis state machine with no block leaks."""

from __future__ import annotations

import logging
import random

import pytest
from engine_fakes import (
    EOS,
    FakeKVRunner,
    ScriptedRunner,
)
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from prometheus_client import generate_latest

from atom_stream import LLM, EngineConfig, SamplingParams
from atom_stream.engine.llm_engine import LLMEngine
from atom_stream.engine.outputs import RequestOutput, Usage
from atom_stream.errors import (
    EngineOverloadedError,
    InvalidRequestError,
    PromptTooLongError,
)
from atom_stream.tokenizer import load_tokenizer

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


def fake_engine(runner=None, **kw) -> LLMEngine:
    runner = runner or FakeKVRunner(kw.pop("num_kv_blocks", 64), kw.get("block_size", 16))
    tok = load_tokenizer(None)
    return LLMEngine(EngineConfig(model="demo", **kw), runner=runner, tokenizer=tok)


def demo_engine(**kw) -> LLMEngine:
    tok = load_tokenizer(None)
    return LLMEngine(EngineConfig(model="demo", device="cpu", dtype="float32", **kw),
                     tokenizer=tok)


def run(engine: LLMEngine, reqs: list[tuple[str, list[int], SamplingParams]]):
    """Submit all, step to completion; returns {id: merged output} and every delta."""
    for rid, ids, p in reqs:
        engine.add_request(rid, ids, p)
    merged: dict[str, RequestOutput] = {}
    deltas: list[RequestOutput] = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            deltas.append(o)
            if o.request_id in merged:
                merged[o.request_id].merge(o)
            else:
                merged[o.request_id] = RequestOutput(o.request_id).merge(o)
    engine.block_manager.check_invariants([])
    assert engine.block_manager.num_used == 0
    return merged, deltas


def mixed_requests(n: int, seed: int = 0, max_len: int = 150):
    rng = random.Random(seed)
    return [(f"r{i}", [rng.randrange(256) for _ in range(rng.randint(3, max_len))],
             SamplingParams(temperature=0.0, max_tokens=rng.randint(4, 10), ignore_eos=True))
            for i in range(n)]


# ---------------------------------------------------------------- real demo model
def test_batch_invariance_64_requests_with_preemption_and_chunked_prefill():
    reqs = mixed_requests(64)
    alone = demo_engine(num_kv_blocks=64, enable_prefix_caching=False)
    expected = {}
    for rid, ids, p in reqs:
        expected[rid] = run(alone, [(rid, ids, p)])[0][rid].token_ids
    small = demo_engine(num_kv_blocks=24, max_num_batched_tokens=64, max_num_seqs=32)
    got, _ = run(small, reqs)
    stats = small.stats()
    assert stats["num_preemptions"] > 0  # the pool forced recomputes
    assert max(len(ids) for _, ids, _ in reqs) > 64  # prompts were chunked
    for rid, _, p in reqs:
        assert got[rid].token_ids == expected[rid], rid
        assert len(got[rid].token_ids) == p.max_tokens


def test_prefix_cache_reuses_a_200_token_prefix_with_identical_output():
    rng = random.Random(1)
    prefix = [rng.randrange(256) for _ in range(200)]
    a = prefix + [rng.randrange(256) for _ in range(9)]
    b = prefix + [rng.randrange(256) for _ in range(13)]
    p = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    cold = demo_engine(num_kv_blocks=64, enable_prefix_caching=False)
    want = run(cold, [("b", b, p)])[0]["b"].token_ids
    warm = demo_engine(num_kv_blocks=64)
    run(warm, [("a", a, p)])
    assert warm.stats()["prefix_cache_hits"] == 0
    out = run(warm, [("b", b, p)])[0]["b"]
    assert out.usage.cached_tokens == 192  # 12 full blocks of 16
    stats = warm.stats()
    assert stats["prefix_cache_hits"] == 192 and 0 < stats["prefix_cache_hit_rate"] < 1
    assert out.token_ids == want


def test_seeded_sampling_is_the_same_alone_and_in_a_batch():
    rng = random.Random(2)
    prompt = [rng.randrange(256) for _ in range(40)]
    seeded = SamplingParams(temperature=1.0, seed=42, max_tokens=10, ignore_eos=True)
    alone = run(demo_engine(num_kv_blocks=64), [("s", prompt, seeded)])[0]["s"].token_ids
    others = [(f"o{i}", [rng.randrange(256) for _ in range(rng.randint(5, 90))],
               SamplingParams(temperature=0.9, seed=(i if i % 2 else None), max_tokens=10,
                              ignore_eos=True)) for i in range(12)]
    crowd = demo_engine(num_kv_blocks=12, max_num_batched_tokens=48)
    got, _ = run(crowd, others[:6] + [("s", prompt, seeded)] + others[6:])
    assert got["s"].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, seed=43, max_tokens=10, ignore_eos=True)
    diff = run(demo_engine(num_kv_blocks=64), [("t", prompt, other_seed)])[0]["t"].token_ids
    assert diff != alone


def test_llm_wrapper_demo_model_in_input_order():
    llm = LLM(model="demo", device="cpu", dtype="float32", num_kv_blocks=32)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    assert [o.prompt_token_ids for o in outs] == prompts
    for o in outs:
        assert o.outputs[0] is o and o.finish_reason in ("stop", "length")
        assert 1 <= len(o.token_ids) <= 8
        # a trailing U+FFFD (an unfinished character) is dropped, as vLLM's detokenizer does
        assert o.text == llm.tokenizer.decode(o.token_ids).rstrip("\ufffd") or (
            o.finish_reason == "stop")
    again = llm.generate(prompt_token_ids=prompts[1], sampling_params=GREEDY)
    assert again[0].token_ids == outs[1].token_ids
    texts = llm.generate(["Hello", "world!"], SamplingParams(max_tokens=4))
    assert [o.prompt_token_ids for o in texts] == [llm.tokenizer.encode(t)
                                                   for t in ("Hello", "world!")]
    chat = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=3))
    assert chat[0].prompt_token_ids == llm.tokenizer.encode_chat(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert chat[0].finish_reason is not None
    with pytest.raises(InvalidRequestError):
        llm.generate(["a"], [GREEDY, GREEDY])


# ---------------------------------------------------------------- fake runners
def test_fake_runner_batch_invariance_and_no_kv_corruption():
    reqs = mixed_requests(64, seed=3, max_len=60)
    runner = FakeKVRunner(num_kv_blocks=14, block_size=8)
    eng = fake_engine(runner, block_size=8, max_num_batched_tokens=40, max_num_seqs=16)
    got, _ = run(eng, reqs)
    assert eng.stats()["num_preemptions"] > 0 and runner.corruptions == 0
    for rid, ids, p in reqs:
        assert got[rid].token_ids == runner.reference(ids, p.max_tokens, ignore_eos=True)


def script_engine(text_or_ids, **kw):
    ids = list(text_or_ids.encode()) if isinstance(text_or_ids, str) else text_or_ids
    return fake_engine(ScriptedRunner({"x": ids}), **kw)


def collect(eng, params, prompt=(1, 2, 3)):
    merged, deltas = run(eng, [("x", list(prompt), params)])
    return merged["x"], deltas


def test_stop_string_spanning_three_tokens_is_never_streamed():
    eng = script_engine("I say abXab then abc! tail")
    out, deltas = collect(eng, SamplingParams(max_tokens=40, stop=["abc"]))
    assert out.finish_reason == "stop" and out.stop_reason == "abc"
    assert out.text == "I say abXab then "
    assert all("abc" not in d.text for d in deltas)
    assert "".join(d.text for d in deltas) == out.text
    assert bytes(out.token_ids).decode() == "I say abXab then abc"  # tokens kept to the match
    eng = script_engine("I say abXab then abc! tail")
    out, _ = collect(eng, SamplingParams(max_tokens=40, stop=["abc"],
                                         include_stop_str_in_output=True))
    assert out.text == "I say abXab then abc"


def test_utf8_multibyte_characters_stream_without_replacement_chars():
    s = "héllo 世界 🎉 ok"
    eng = script_engine(s)
    out, deltas = collect(eng, SamplingParams(max_tokens=64))
    assert out.finish_reason == "stop" and out.text == s
    assert all("\ufffd" not in d.text for d in deltas)
    eng = script_engine(s)
    out, deltas = collect(eng, SamplingParams(max_tokens=64, stop=["界 🎉"]))
    assert out.text == "héllo 世" and all("\ufffd" not in d.text for d in deltas)


def test_stop_strings_after_min_tokens_and_not_on_a_stop_tokens_text():
    # vLLM: stop strings are checked once len(output) > min_tokens, so with min_tokens 3 the
    # "b" of output token 3 does not stop, the next one (token 5) does
    out, _ = collect(script_engine("cababbacbbaa"), SamplingParams(max_tokens=12, stop=["b"],
                                                                   min_tokens=3))
    assert (out.text, out.stop_reason, len(out.token_ids)) == ("caba", "b", 5)
    out, _ = collect(script_engine("cababbacbbaa"), SamplingParams(max_tokens=12, stop=["b"]))
    assert (out.text, len(out.token_ids)) == ("ca", 3)
    # a stop token's own text (include_stop_str_in_output) is not searched for stop strings:
    # the stop reason stays the token (vLLM's stop_terminated)
    out, _ = collect(script_engine([99, 97, 98]), SamplingParams(
        max_tokens=9, stop_token_ids=[97], stop=["a"], include_stop_str_in_output=True))
    assert (out.text, out.stop_reason) == ("ca", 97)
    out, _ = collect(script_engine([99, 120, 97, 98]), SamplingParams(
        max_tokens=9, stop_token_ids=[97], stop=["xa"], include_stop_str_in_output=True))
    assert (out.text, out.stop_reason) == ("cxa", 97)  # the held "x" goes out unchecked


def test_eos_stop_token_ids_min_tokens_and_ignore_eos():
    out, _ = collect(script_engine([65, 66, EOS, 67]), SamplingParams(max_tokens=9))
    assert (out.token_ids, out.text, out.finish_reason, out.stop_reason) == (
        [65, 66, EOS], "AB", "stop", None)
    out, _ = collect(script_engine([65, EOS, 66, EOS]), SamplingParams(max_tokens=9,
                                                                       min_tokens=3))
    assert out.token_ids == [65, EOS, 66, EOS]
    out, _ = collect(script_engine([65, EOS, 66, EOS]), SamplingParams(max_tokens=3,
                                                                       ignore_eos=True))
    assert out.token_ids == [65, EOS, 66] and out.finish_reason == "length"
    out, _ = collect(script_engine([65, 66, 67]), SamplingParams(stop_token_ids=[66]))
    assert (out.token_ids, out.text, out.stop_reason) == ([65, 66], "A", 66)
    out, _ = collect(script_engine([65, 66, 67]),
                     SamplingParams(stop_token_ids=[66], include_stop_str_in_output=True))
    assert out.text == "AB"


def test_length_limits_and_prompt_validation():
    eng = script_engine([65] * 100, max_model_len=32)
    out, deltas = collect(eng, SamplingParams(max_tokens=None), prompt=[1] * 29)
    assert out.finish_reason == "length" and len(out.token_ids) == 3
    assert out.usage == Usage(29, 3, 32, 0)
    assert deltas[0].prompt_token_ids == [1] * 29
    assert all(d.prompt_token_ids is None for d in deltas[1:])
    assert [d.usage is not None for d in deltas] == [False, False, True]
    with pytest.raises(PromptTooLongError):
        eng.add_request("y", [1] * 32, GREEDY)
    small = fake_engine(num_kv_blocks=4)  # 64 token slots: longer prompts can never fit
    assert small.max_model_len == 64
    with pytest.raises(PromptTooLongError):
        small.add_request("y", [1] * 64, GREEDY)
    for bad in ([], [1, 320], [1, -1], ["a"]):
        with pytest.raises(InvalidRequestError):
            small.add_request("z", bad, GREEDY)
    with pytest.raises(InvalidRequestError):
        small.add_request("z", [1], SamplingParams(n=2))
    small.add_request("dup", [1], GREEDY)
    with pytest.raises(InvalidRequestError):
        small.add_request("dup", [1], GREEDY)


def test_waiting_queue_overload_raises():
    eng = fake_engine(max_num_seqs=1, max_waiting_requests=2)
    for rid in "abc":  # one can start at the next step, two wait
        eng.add_request(rid, [1], GREEDY)
    with pytest.raises(EngineOverloadedError):
        eng.add_request("d", [1], GREEDY)
    assert "d" not in eng.requests


def test_step_exception_fails_only_that_batch_and_engine_keeps_serving():
    runner = FakeKVRunner(64)
    eng = fake_engine(runner, max_num_seqs=2)
    for rid in "abc":
        eng.add_request(rid, [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True))
    runner.fail_next = 1
    outs = eng.step()
    assert sorted(o.request_id for o in outs) == ["a", "b"]  # c was still waiting
    for o in outs:
        assert o.finish_reason == "error" and "injected step failure" in o.error
    assert set(eng.requests) == {"c"}
    assert eng.block_manager.num_used == 0
    eng.add_request("d", [4, 5], SamplingParams(max_tokens=4, ignore_eos=True))
    merged, _ = run(eng, [])
    assert {k: v.finish_reason for k, v in merged.items()} == {"c": "length", "d": "length"}
    assert eng.metrics.finished["error"] == 2


def test_abort_frees_blocks_at_once_and_reports_usage():
    eng = fake_engine()
    eng.add_request("a", list(range(40)), SamplingParams(max_tokens=50))
    eng.step()
    assert eng.block_manager.num_used == 3
    out = eng.abort("a")
    assert out.finish_reason == "abort" and out.usage.prompt_tokens == 40
    assert eng.block_manager.num_used == 0 and not eng.has_unfinished_requests()
    assert eng.abort("a") is None


def test_logprobs_are_aligned_with_tokens_and_merge_concatenates():
    eng = fake_engine(FakeKVRunner(64))
    merged, deltas = run(eng, [("l", [1, 2], SamplingParams(max_tokens=5, logprobs=2,
                                                            ignore_eos=True))])
    out = merged["l"]
    # the engine form (what the servers read); `logprobs` is vLLM's dicts built from it
    assert len(out.engine_logprobs) == len(out.logprobs) == len(out.token_ids) == 5
    assert all(len(d.engine_logprobs) == len(d.token_ids) for d in deltas)
    assert out.engine_logprobs[0] == (-0.5, [(out.token_ids[0], -0.5)] * 2)
    assert out.logprobs[0][out.token_ids[0]].logprob == -0.5
    assert out.prompt_token_ids == [1, 2] and out.usage.completion_tokens == 5


def test_metrics_in_own_registry_with_design_names():
    e1, e2 = fake_engine(served_model_name="m1"), fake_engine(served_model_name="m2")
    run(e1, [("a", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True))])
    text = generate_latest(e1.metrics.registry).decode()
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "prefix_cache_hit_rate", "prompt_tokens_total", "generation_tokens_total",
                 "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_count",
                 "e2e_request_latency_seconds_sum"):
        assert f"atom_stream:{name}" in text, name
    assert ('atom_stream:request_success_total{engine="0",finished_reason="length",'
            'model_name="m1"} 1.0') in text
    assert 'atom_stream:generation_tokens_total{engine="0",model_name="m1"} 3.0' in text
    assert 'atom_stream:inter_token_latency_seconds_count{engine="0",model_name="m1"} 2.0' in text
    assert "m1" not in generate_latest(e2.metrics.registry).decode()


def test_prefix_cache_query_and_hit_counters():
    """vLLM v1's prefix_cache_queries / prefix_cache_hits as token counters: a 3-block prompt
    twice -> the second lookup hits 2 full blocks (the last token is always recomputed)."""
    eng = fake_engine(block_size=4, enable_prefix_caching=True)
    prompt = list(range(1, 13))
    p = SamplingParams(max_tokens=2, ignore_eos=True)
    run(eng, [("a", prompt, p)])
    run(eng, [("b", prompt, p)])
    text = generate_latest(eng.metrics.registry).decode()
    bm = eng.block_manager
    assert bm.prefix_queries == 24 and bm.prefix_hits == 8, (bm.prefix_queries, bm.prefix_hits)
    assert 'atom_stream:prefix_cache_queries_total{engine="0",model_name="demo"} 24.0' in text
    assert 'atom_stream:prefix_cache_hits_total{engine="0",model_name="demo"} 8.0' in text


# ---------------------------------------------------------------- state machine
class EngineMachine(RuleBasedStateMachine):
    """Random add / step / abort / failing step / run-to-finish against the fake KV runner:
    block accounting is exact after every rule, outputs match the reference, no leaks."""

    def __init__(self):
        super().__init__()
        self.runner = FakeKVRunner(num_kv_blocks=12, block_size=4, eos_every=17)
        self.engine = LLMEngine(
            EngineConfig(model="demo", block_size=4, max_num_seqs=4,
                         max_num_batched_tokens=10, max_waiting_requests=6),
            runner=self.runner, skip_tokenizer_init=True)
        self.count = 0
        self.prompts: dict[str, tuple[list[int], int]] = {}
        self.tokens: dict[str, list[int]] = {}

    @rule(plen=st.integers(1, 30), max_tokens=st.integers(1, 12), shared=st.booleans())
    def add(self, plen, max_tokens, shared):
        rid = f"q{self.count}"
        self.count += 1
        prompt = ([3, 1, 4, 1, 5, 9, 2, 6] * 4)[:plen] if shared else [
            (self.count * 7 + i) % 250 for i in range(plen)]
        try:
            seq = self.engine.add_request(rid, prompt, SamplingParams(temperature=0.0,
                                                                          max_tokens=max_tokens))
        except EngineOverloadedError:
            return
        self.prompts[rid] = (prompt, seq.max_tokens)
        self.tokens[rid] = []

    def _consume(self, outs):
        for o in outs:
            self.tokens[o.request_id] += o.token_ids
            if o.finish_reason in ("stop", "length"):
                prompt, max_tokens = self.prompts[o.request_id]
                assert self.tokens[o.request_id] == self.runner.reference(prompt, max_tokens)

    @rule()
    def step(self):
        self._consume(self.engine.step())

    @rule()
    def failing_step(self):
        self.runner.fail_next = 1
        outs = self.engine.step()
        assert all(o.finish_reason == "error" for o in outs)
        self.runner.fail_next = 0

    @rule(k=st.integers(0, 100))
    def abort(self, k):
        live = sorted(self.engine.requests)
        if live:
            assert self.engine.abort(live[k % len(live)]).finish_reason == "abort"

    @rule()
    def finish(self):
        while self.engine.has_unfinished_requests():
            self._consume(self.engine.step())
        assert self.engine.block_manager.num_used == 0

    @invariant()
    def accounting(self):
        eng = self.engine
        eng.block_manager.check_invariants([r.seq for r in eng.requests.values()])
        assert self.runner.corruptions == 0

    def teardown(self):
        self.finish()
        bm = self.engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks


TestEngineMachine = EngineMachine.TestCase
TestEngineMachine.settings = settings(max_examples=40, stateful_step_count=40, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("name", ["ignore_eos", "include_stop_str_in_output",
                                  "skip_special_tokens"])
@pytest.mark.parametrize("value", ["false", 0, 1, None, []])
def test_boolean_params_must_be_booleans(name, value):
    """A non-boolean where a boolean belongs is an error naming the field ("false" is truthy:
    taken as is it would mean the opposite of what the client sent)."""
    from atom_stream.sampling_params import SamplingParamsError

    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**{name: value})
    assert e.value.param == name
    assert getattr(SamplingParams(**{name: True}), name) is True


def test_max_model_len_above_the_kv_pool(caplog):
    # asked for: refused at start-up, as vLLM (it used to be lowered silently); the model's
    # own limit (max_model_len unset): lowered to what the pool holds, with a warning
    from atom_stream.config import ConfigError
    with pytest.raises(ConfigError, match="max_model_len: 256 tokens do not fit"):
        fake_engine(num_kv_blocks=4, block_size=16, max_model_len=256)
    with caplog.at_level(logging.WARNING, logger="atom_stream.engine.llm_engine"):
        eng = fake_engine(num_kv_blocks=4, block_size=16)
    limit = eng.model_config.max_position_embeddings
    assert limit > 64 and eng.max_model_len == 64
    assert any(f"max_model_len {limit} (the model's) lowered to 64" in r.getMessage()
               for r in caplog.records)


def test_min_tokens_bans_eos_even_with_ignore_eos_end_to_end():
    """vLLM: min_tokens bans the model's EOS ids whatever ignore_eos says (all_stop_token_ids);
    ignore_eos only keeps EOS from stopping. The demo model biased hard towards EOS (257)."""
    eng = demo_engine()
    eos = set(eng.eos_token_ids)
    p = SamplingParams(temperature=0.0, max_tokens=6, min_tokens=3, ignore_eos=True,
                       logit_bias={257: 100})
    merged, _ = run(eng, [("a", [1, 2, 3], p)])
    toks = merged["a"].token_ids
    assert not eos & set(toks[:3]), toks
    assert toks[3:] == [257, 257, 257] and merged["a"].finish_reason == "length", toks
    # without ignore_eos the first EOS after min_tokens stops
    p2 = SamplingParams(temperature=0.0, max_tokens=6, min_tokens=3, logit_bias={257: 100})
    merged, _ = run(eng, [("b", [1, 2, 3], p2)])
    assert merged["b"].token_ids[3:] == [257] and merged["b"].finish_reason == "stop"


def test_out_of_vocab_stop_token_ids_are_refused():
    """vLLM's processor: 'stop_token_ids contain out-of-vocab token ids' -> 400."""
    eng = demo_engine()
    vocab = eng.model_config.vocab_size
    with pytest.raises(InvalidRequestError) as e:
        eng.add_request("x", [1, 2], SamplingParams(max_tokens=2, stop_token_ids=[vocab]))
    assert e.value.param == "stop_token_ids"
    assert eng.block_manager.num_used == 0 and not eng.has_unfinished_requests()
