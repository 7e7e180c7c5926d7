"""Request features through every engine topology (demo model, CPU, real servers).

Topologies: one engine (async scheduling on, the default; and off), tensor parallel 2 (gloo
worker process), data parallel 2 (DPEngine), and (slow) TP=2 without async scheduling and
DP=2 x TP=2. Each topology's server runs the same list of requests (`CASES`: bad_words,
cache_salt, min_tokens + ignore_eos, logit_bias, seeded n > 1, prompt_logprobs,
truncate_prompt_tokens, echo with max_tokens 0, return_token_ids, stop strings,
continue_final_message / add_generation_prompt false), a concurrent burst, two live requests
with the same client request_id, and a client disconnect mid-stream; then:

- every answer equals the single engine's (greedy or seeded: same tokens, text, finish
  reasons, usage; prompt logprobs to 1e-4);
- case-level sanity on every topology (the banned token absent, the bias obeyed, ...);
- afterwards no KV block is held (used_blocks 0, nothing running), the Prometheus
  generation_tokens_total / request_success_total agree with the answers' usage, across
  topologies;
- LLM.generate with seeded n > 1 gives the same choices on TP=2 (async on/off) as one engine.
"""

from __future__ import annotations

import copy
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import serving_helpers

ENGINE = {"dtype": "float32", "num_kv_blocks": 256, "max_model_len": 512}
TOPOLOGIES: dict[str, dict[str, Any]] = {
    "single": {},
    "single-sync": {"async_scheduling": False},
    "tp2": {"tensor_parallel_size": 2},
    "dp2": {"data_parallel_size": 2},
    "tp2-sync": {"tensor_parallel_size": 2, "async_scheduling": False},
    "dp2-tp2": {"data_parallel_size": 2, "tensor_parallel_size": 2},
}
SLOW = {"tp2-sync", "dp2-tp2"}

LONG = "The quick brown fox jumps over the lazy dog. " * 2  # 90 tokens: several full blocks
G = {"model": "demo", "temperature": 0, "return_token_ids": True}
CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
CASES: list[tuple[str, str, dict]] = [
    ("plain", CMPL, {**G, "prompt": "Hello", "max_tokens": 12, "ignore_eos": True}),
    # "%" is one byte token (37), greedy token 1 of "Hello" without the ban
    ("bad_words", CMPL, {**G, "prompt": "Hello", "max_tokens": 12, "ignore_eos": True,
                         "bad_words": ["%"]}),
    ("salt_a1", CMPL, {**G, "prompt": LONG, "max_tokens": 4, "cache_salt": "A"}),
    ("salt_a2", CMPL, {**G, "prompt": LONG, "max_tokens": 4, "cache_salt": "A"}),
    ("salt_a3", CMPL, {**G, "prompt": LONG, "max_tokens": 4, "cache_salt": "A"}),
    ("salt_b", CMPL, {**G, "prompt": LONG, "max_tokens": 4, "cache_salt": "B"}),
    ("min_tokens", CMPL, {**G, "prompt": "1 2 3 4", "max_tokens": 10, "min_tokens": 6,
                          "ignore_eos": True}),
    ("min_tokens_eos", CMPL, {**G, "prompt": "1 2 3 4", "max_tokens": 10, "min_tokens": 6,
                              "stop_token_ids": [273]}),
    ("logit_bias", CMPL, {**G, "prompt": "Hello", "max_tokens": 6, "logit_bias": {"65": 100}}),
    ("seeded_n3", CMPL, {**G, "prompt": "Hello", "max_tokens": 8, "temperature": 0.9,
                         "seed": 11, "n": 3, "ignore_eos": True}),
    ("seeded_12", CMPL, {**G, "prompt": "Hello", "max_tokens": 8, "temperature": 0.9,
                         "seed": 12, "ignore_eos": True}),
    ("prompt_logprobs", CMPL, {**G, "prompt": "Hi there", "max_tokens": 2,
                               "prompt_logprobs": 2, "logprobs": 2}),
    ("truncate", CMPL, {**G, "prompt": LONG, "max_tokens": 5, "truncate_prompt_tokens": 7}),
    # vLLM: with return_token_ids the echoed text is "" (the ids are given instead)
    ("echo0", CMPL, {**G, "return_token_ids": False, "prompt": "Hi there", "max_tokens": 0,
                     "echo": True, "logprobs": 1}),
    ("stop", CMPL, {**G, "prompt": "aaaa", "max_tokens": 16, "stop": ["tt"]}),
    ("stop_incl", CMPL, {**G, "prompt": "aaaa", "max_tokens": 16, "stop": ["tt"],
                         "include_stop_str_in_output": True}),
    ("chat_continue", CHAT, {**G, "max_tokens": 6, "ignore_eos": True,
                             "continue_final_message": True, "add_generation_prompt": False,
                             "messages": [{"role": "user", "content": "Hi"},
                                          {"role": "assistant", "content": "Sure, "}]}),
    ("chat_no_gen_prompt", CHAT, {**G, "max_tokens": 6, "ignore_eos": True,
                                  "add_generation_prompt": False,
                                  "messages": [{"role": "user", "content": "Hi"}]}),
    ("chat_n2_seeded", CHAT, {**G, "max_tokens": 6, "ignore_eos": True, "n": 2, "seed": 5,
                              "temperature": 1.0, "logprobs": True, "top_logprobs": 1,
                              "messages": [{"role": "user", "content": "Hi"}]}),
]
BURST = [{**G, "prompt": f"burst {i} " * (1 + i % 3), "max_tokens": 6 + i % 4,
          "ignore_eos": True} for i in range(8)]


def _norm(path: str, body: dict) -> dict:
    """An answer without its ids / timestamps; logprob floats rounded (compared apart)."""
    out: dict[str, Any] = {"usage": body["usage"], "choices": []}
    for c in body["choices"]:
        d = {k: v for k, v in c.items() if k not in ("logprobs", "prompt_logprobs")}
        out["choices"].append(d)
    return out


def _floats(obj: Any) -> list[float]:
    """Every float in a (logprobs) structure, in order."""
    if isinstance(obj, float):
        return [obj]
    if isinstance(obj, dict):
        return [f for k in sorted(obj, key=str) for f in _floats(obj[k])]
    if isinstance(obj, list):
        return [f for v in obj for f in _floats(v)]
    return []


def _shape(obj: Any) -> Any:
    """The structure with floats blanked (tokens, ranks, keys kept)."""
    if isinstance(obj, float):
        return "f"
    if isinstance(obj, dict):
        return {k: _shape(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_shape(v) for v in obj]
    return obj


def _metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _stream(url: str, body: dict, stop_after: int | None = None) -> list[dict]:
    """A streamed /v1/completions request's chunks; closed by the client after `stop_after`."""
    chunks: list[dict] = []
    with httpx.Client(timeout=60) as c, \
            c.stream("POST", url + CMPL, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[len("data: "):]))
                if stop_after is not None and len(chunks) == stop_after:
                    break
    return chunks


def _disconnects(url: str) -> dict:
    """Client disconnects mid-stream: one request; a seeded n = 3 fan-out; one of two live
    requests sharing a client request_id (the other must run to its end)."""
    out: dict[str, Any] = {}
    long = {**G, "prompt": "Hello", "max_tokens": 400, "ignore_eos": True}
    out["one"] = len(_stream(url, long, stop_after=3))
    out["n3"] = len(_stream(url, {**long, "n": 3, "seed": 1, "temperature": 1.0}, stop_after=4))
    dup = {**G, "prompt": "dup", "max_tokens": 30, "ignore_eos": True, "request_id": "same"}
    with ThreadPoolExecutor(1) as pool:
        full = pool.submit(_stream, url, dup)
        time.sleep(0.05)
        _stream(url, {**dup, "max_tokens": 400}, stop_after=2)
        chunks = full.result()
    out["dup_survivor"] = ([c["choices"][0]["finish_reason"] for c in chunks][-1],
                           sum(len(c["choices"][0]["token_ids"]) for c in chunks))
    return out


def _run_topology(kw: dict) -> dict:
    with serving_helpers.running_server({**ENGINE, **kw},
                                        enable_prompt_tokens_details=True) as s, \
            httpx.Client(base_url=s.url, timeout=120) as http:
        res: dict[str, Any] = {"raw": {}, "norm": {}}
        for name, path, body in CASES:
            r = http.post(path, json=body)
            assert r.status_code == 200, (name, r.text)
            res["raw"][name] = r.json()
            res["norm"][name] = _norm(path, r.json())
        with ThreadPoolExecutor(8) as pool:
            burst = list(pool.map(lambda b: http.post(CMPL, json=b).json(), BURST))
        res["burst"] = [_norm(CMPL, b) for b in burst]
        # two live requests with one client id (body request_id and the X-Request-Id header)
        dup = {**G, "prompt": "dup", "max_tokens": 20, "ignore_eos": True, "request_id": "same"}
        with ThreadPoolExecutor(3) as pool:
            futs = [pool.submit(http.post, CMPL, json=dup) for _ in range(2)]
            futs.append(pool.submit(http.post, CMPL, json={**dup, "request_id": None},
                                    headers={"X-Request-Id": "same"}))
            res["dup"] = [(f.result().status_code, f.result().json()) for f in futs]
        res["idle_before_abort"] = s.wait_idle()
        res["metrics"] = http.get("/metrics").text
        res["stats"] = s.stats()
        aborts0 = res["stats"]["finished"].get("abort", 0)
        res["disconnects"] = _disconnects(s.url)
        res["idle_after_abort"] = s.wait_idle()
        res["aborts"] = res["idle_after_abort"]["finished"].get("abort", 0) - aborts0
        res["metrics_after_abort"] = http.get("/metrics").text
        res["health"] = http.get("/health").status_code
        return res


_CACHE: dict[str, dict] = {}


def results(topo: str) -> dict:
    if topo not in _CACHE:
        _CACHE[topo] = _run_topology(TOPOLOGIES[topo])
    return _CACHE[topo]


def _topos() -> list:
    return [pytest.param(t, marks=pytest.mark.slow) if t in SLOW else t for t in TOPOLOGIES]


# ------------------------------------------------------------------ per-topology sanity
@pytest.mark.parametrize("topo", _topos())
def test_features_sane(topo):
    r = results(topo)
    raw = r["raw"]
    tok = lambda name, i=0: raw[name]["choices"][i]["token_ids"]
    assert len(tok("plain")) == 12 and tok("plain")[1] == 37  # the greedy path bad_words cuts
    assert 37 not in tok("bad_words") and tok("bad_words")[0] == tok("plain")[0]
    # cache_salt: the same salt hits the prefix cache (DP: the 3rd request, back on replica 0),
    # another salt never does
    cached = {n: raw[n]["usage"]["prompt_tokens_details"]["cached_tokens"]
              for n in ("salt_a1", "salt_a2", "salt_a3", "salt_b")}
    assert cached["salt_a1"] == 0 and cached["salt_a3"] > 0 and cached["salt_b"] == 0, cached
    assert len(tok("min_tokens")) == 10
    # 273 is "1 2 3 4"'s greedy token 1 (a stop at 2 tokens without min_tokens): banned below 6
    mt, fin = tok("min_tokens_eos"), raw["min_tokens_eos"]["choices"][0]["finish_reason"]
    assert 273 not in mt[:6] and len(mt) >= 6, mt
    assert (fin, len(mt)) == (("stop", mt.index(273) + 1) if 273 in mt else ("length", 10)), mt
    assert tok("logit_bias") == [65] * 6
    n3 = raw["seeded_n3"]["choices"]
    assert [c["index"] for c in n3] == [0, 1, 2] and len({tuple(c["token_ids"]) for c in n3}) == 3
    assert n3[1]["token_ids"] == tok("seeded_12")  # a child's seed is seed + index (vLLM)
    pl = raw["prompt_logprobs"]["choices"][0]["prompt_logprobs"]
    assert pl[0] is None and len(pl) == len(raw["prompt_logprobs"]["choices"][0]
                                              ["prompt_token_ids"])
    tr = raw["truncate"]["choices"][0]["prompt_token_ids"]
    assert len(tr) == 7 and raw["truncate"]["usage"]["prompt_tokens"] == 7
    echo = raw["echo0"]["choices"][0]
    assert echo["text"] == "Hi there" and echo["logprobs"]["tokens"] == list("Hi there")
    assert raw["stop"]["choices"][0]["stop_reason"] == "tt"
    assert raw["stop_incl"]["choices"][0]["text"] == raw["stop"]["choices"][0]["text"] + "tt"
    # vLLM: without a generation prompt the response role is the last message's
    roles = {n: raw[n]["choices"][0]["message"]["role"]
             for n in ("chat_continue", "chat_no_gen_prompt", "chat_n2_seeded")}
    assert roles == {"chat_continue": "assistant", "chat_no_gen_prompt": "user",
                     "chat_n2_seeded": "assistant"}
    assert len(raw["chat_n2_seeded"]["choices"]) == 2
    assert [code for code, _ in r["dup"]] == [200, 200, 200], r["dup"]
    assert all(len(b["choices"][0]["token_ids"]) == 20 for _, b in r["dup"])
    assert len({json.dumps(b["choices"][0]["token_ids"]) for _, b in r["dup"]}) == 1


@pytest.mark.parametrize("topo", _topos())
def test_no_leak_and_metrics_sane(topo):
    r = results(topo)
    for key in ("idle_before_abort", "idle_after_abort"):
        s = r[key]
        assert (s["used_blocks"], s["num_running"], s["num_waiting"], s["num_streams"]) == \
            (0, 0, 0, 0), (key, s)
    assert r["health"] == 200
    assert r["disconnects"] == {"one": 3, "n3": 4, "dup_survivor": ("length", 30)}
    assert r["aborts"] == 5  # 1 + 3 children + 1 of the two "same" ids
    m, m2 = r["metrics"], r["metrics_after_abort"]
    gen = sum(b["usage"]["completion_tokens"] for b in r["raw"].values())
    gen += sum(b["usage"]["completion_tokens"] for b in r["burst"])
    gen += sum(b["usage"]["completion_tokens"] for _, b in r["dup"])
    assert _metric_sum(m, "atom_stream:generation_tokens_total") == gen
    assert r["stats"]["generation_tokens"] == gen
    n_req = sum(len(b["choices"]) for b in r["raw"].values()) + len(BURST) + 3
    ok = sum(_metric_sum(m, "atom_stream:request_success_total", finished_reason=f)
             for f in ("stop", "length"))
    assert ok == n_req
    assert _metric_sum(m2, "atom_stream:request_success_total", finished_reason="abort") == \
        _metric_sum(m, "atom_stream:request_success_total", finished_reason="abort") + 5
    assert _metric_sum(m2, "atom_stream:request_success_total", finished_reason="length") == \
        _metric_sum(m, "atom_stream:request_success_total", finished_reason="length") + 1
    assert _metric_sum(m2, "atom_stream:num_requests_running") == 0
    assert _metric_sum(m2, "atom_stream:kv_cache_usage_perc") == 0


@pytest.mark.parametrize("topo", [t for t in _topos() if t != "single"])
def test_same_answers_as_single_engine(topo):
    want, got = copy.deepcopy(results("single")), copy.deepcopy(results(topo))
    for name, _, _ in CASES:
        w, g = want["norm"][name], got["norm"][name]
        # DP: which request hits the prefix cache depends on its replica
        if name in ("salt_a2", "salt_a3") or topo.startswith("dp"):
            for d in (w, g):
                d["usage"] = {k: v for k, v in d["usage"].items()
                              if k != "prompt_tokens_details"}
        assert g == w, name
        for i, (wc, gc) in enumerate(zip(want["raw"][name]["choices"],
                                         got["raw"][name]["choices"])):
            for key in ("logprobs", "prompt_logprobs"):
                assert _shape(gc.get(key)) == _shape(wc.get(key)), (name, i, key)
                assert _floats(gc.get(key)) == pytest.approx(_floats(wc.get(key)), abs=1e-4), \
                    (name, i, key)
    if topo.startswith("dp"):
        for b in want["burst"] + got["burst"]:
            b["usage"].pop("prompt_tokens_details", None)
    assert got["burst"] == want["burst"]
    assert [b["choices"][0]["token_ids"] for _, b in got["dup"]] == \
        [b["choices"][0]["token_ids"] for _, b in want["dup"]]


# ------------------------------------------------------------------ LLM.generate n > 1 on TP
def _llm_choices(**kw) -> list[list[list[int]]]:
    from atom_stream import LLM, SamplingParams

    params = SamplingParams(temperature=0.9, seed=3, n=3, max_tokens=8, ignore_eos=True)
    with LLM("demo", device="cpu", dtype="float32", num_kv_blocks=64, block_size=16,
             max_model_len=256, **kw) as llm:
        outs = llm.generate(["Hello", "abc"], params)
        stats = llm.engine.stats()
    assert stats["used_blocks"] == 0 and stats["num_running"] == 0
    return [[c.token_ids for c in o.outputs] for o in outs]


@pytest.mark.parametrize("kw", [{"tensor_parallel_size": 2},
                                pytest.param({"tensor_parallel_size": 2,
                                              "async_scheduling": False},
                                             marks=pytest.mark.slow),
                                {"async_scheduling": False}],
                         ids=["tp2", "tp2-sync", "single-sync"])
def test_llm_generate_seeded_n_matches_single_engine(kw):
    want = _llm_choices()
    got = _llm_choices(**kw)
    assert got == want
    assert all(len({tuple(c) for c in o}) == 3 for o in want)



# ------------------------------------------------------------------ preemption under pressure
SMALL = {"num_kv_blocks": 12, "block_size": 4}  # 48 tokens: six requests preempt each other


def _pressure(kw: dict) -> tuple[list, dict]:
    bodies = [{"model": "demo", "prompt": f"p{i}", "max_tokens": 20, "ignore_eos": True,
               "temperature": 1.0, "seed": i, "bad_words": ["a"], "logit_bias": {"98": 3},
               "return_token_ids": True} for i in range(6)]
    with serving_helpers.running_server({**ENGINE, "max_model_len": None, **SMALL, **kw}) as s, \
            httpx.Client(base_url=s.url, timeout=120) as http, ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(lambda b: http.post(CMPL, json=b).json(), bodies))
        stats = s.wait_idle()
    return [o["choices"][0]["token_ids"] for o in outs], stats


@pytest.mark.parametrize("kw", [{"tensor_parallel_size": 2}, {"data_parallel_size": 2},
                                {"async_scheduling": False}], ids=["tp2", "dp2", "single-sync"])
def test_preempted_seeded_bad_words_requests_match_single_engine(kw):
    want, ws = _pressure({})
    got, gs = _pressure(kw)
    assert ws["num_preemptions"] > 0  # the case is real: requests were recomputed
    assert got == want and all(97 not in t for t in got)
    assert (gs["used_blocks"], gs["num_running"], gs["num_streams"]) == (0, 0, 0)
