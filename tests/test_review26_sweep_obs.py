"""Session-26 observability sweep: black-box checks of /metrics arithmetic over HTTP workloads
that earlier tests do not cover (no gap was found in the metrics, auth or /v1/models code; these
keep the behaviour a vLLM user relies on):

- n > 1 counts every choice (prompt tokens per choice, as vLLM's child requests); requests
  refused with 400 / 404 / wrong content type move no counter and no histogram.
- A workload that forces preemption by recompute counts each prompt and each generated token
  exactly once (prompt_tokens_total / generation_tokens_total equal the usage sums), one TTFT
  and one e2e observation per request, one ITL observation per token after the first.
"""

from __future__ import annotations

import threading

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving_helpers import running_server

P = "atom_stream:"
# a 12-block pool of 16: three 40+40-token requests (5 blocks each at the end) cannot all fit
ENGINE = {"num_kv_blocks": 12, "block_size": 16, "max_num_batched_tokens": 32,
          "max_num_seqs": 4}


@pytest.fixture(scope="module")
def srv():
    with running_server(ENGINE) as s:
        yield s


def _scrape(srv) -> dict[str, float]:
    """Every atom_stream:* sample by name and labels (model_name / engine dropped)."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(srv.url + "/metrics").text):
        for s in fam.samples:
            labels = {k: v for k, v in s.labels.items() if k not in ("model_name", "engine")}
            out[s.name + "".join(f",{k}={v}" for k, v in sorted(labels.items()))] = s.value
    return out


def _delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after[P + name] - before.get(P + name, 0.0)


def test_n_choices_counted_and_refused_requests_not(srv):
    srv.wait_idle()
    before = _scrape(srv)
    body = {"model": "demo", "prompt": [7, 8, 9, 10], "max_tokens": 3, "n": 3,
            "ignore_eos": True, "temperature": 1.0, "seed": 26}
    usage = httpx.post(srv.url + "/v1/completions", json=body, timeout=60).json()["usage"]
    assert usage == {**usage, "prompt_tokens": 4, "completion_tokens": 9}
    refused = [
        httpx.post(srv.url + "/v1/completions", json={**body, "max_tokens": -1}),
        httpx.post(srv.url + "/v1/completions", json={**body, "model": "no-such-model"}),
        httpx.post(srv.url + "/v1/completions", content=b'{"prompt": "x"}',
                   headers={"content-type": "text/plain"}),
        httpx.post(srv.url + "/v1/chat/completions", json={"messages": "not a list"}),
    ]
    assert [r.status_code for r in refused] == [400, 404, 400, 400]
    assert all(set(r.json()["error"]) == {"message", "type", "param", "code"} for r in refused)
    after = _scrape(srv)
    assert _delta(before, after, "prompt_tokens_total") == 12  # per choice, as vLLM
    assert _delta(before, after, "generation_tokens_total") == 9
    assert _delta(before, after, "request_success_total,finished_reason=length") == 3
    assert _delta(before, after, "time_to_first_token_seconds_count") == 3
    assert _delta(before, after, "e2e_request_latency_seconds_count") == 3
    assert _delta(before, after, "inter_token_latency_seconds_count") == 6
    assert _delta(before, after, "time_to_first_token_seconds_bucket,le=+Inf") == 3
    for name in ("request_success_total,finished_reason=stop",
                 "request_success_total,finished_reason=abort",
                 "request_success_total,finished_reason=error"):
        assert _delta(before, after, name) == 0, name


def test_preemption_counts_each_token_once(srv):
    srv.wait_idle()
    before = _scrape(srv)
    usages: list[dict] = []

    def one(i: int) -> None:
        body = {"model": "demo", "prompt": [i] * 40, "max_tokens": 40, "ignore_eos": True}
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=120)
        usages.append(r.json()["usage"])

    threads = [threading.Thread(target=one, args=(i,)) for i in (11, 12, 13)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    srv.wait_idle()
    after = _scrape(srv)
    assert _delta(before, after, "num_preemptions_total") >= 1  # the workload preempted
    assert _delta(before, after, "prompt_tokens_total") == 3 * 40
    assert _delta(before, after, "generation_tokens_total") == 3 * 40
    assert [u["completion_tokens"] for u in usages] == [40] * 3
    assert _delta(before, after, "request_success_total,finished_reason=length") == 3
    assert _delta(before, after, "time_to_first_token_seconds_count") == 3
    assert _delta(before, after, "e2e_request_latency_seconds_count") == 3
    assert _delta(before, after, "inter_token_latency_seconds_count") == 3 * 39
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert after[P + gauge] == 0.0, gauge
