"""Session 23 review of the OpenAI routes against current vLLM (demo model, real server).

- `stream_options: {}` asks for nothing: no usage chunk (vLLM PR #36379, merged: StreamOptions
  `include_usage` defaults to False in vllm/entrypoints/openai/engine/protocol.py; before it an
  empty object gave usage). `{"include_usage": true}` still does, and continuous usage still
  needs include_usage.
- `stream_options: {}` (or null) without `stream` is accepted: vLLM's validate_stream_options
  refuses only a truthy object (`if data.get("stream_options") and not data.get("stream")`);
  a non-empty one without stream stays a 400 naming `stream_options`.
- `prompt_logprobs: 0` with `stream: true` is accepted: vLLM's check_logprobs refuses only
  `prompt_logprobs > 0` (or -1) when streaming; a positive value stays a 400.
- Request fields are validated in pydantic's lax mode (vLLM's OpenAIBaseModel; pydantic's
  conversion table): an integral float or a numeric string for an int field (`max_tokens: 3.0`,
  `"3"`), a numeric string for a float, "true"/"false" for a bool are converted; `3.5` for an
  int, or a word for a number, stays a 400 naming the field.
"""

from __future__ import annotations

import json

import pytest

CHAT = [{"role": "user", "content": "Hello there"}]
ROUTES = [("/v1/chat/completions", {"messages": CHAT}), ("/v1/completions", {"prompt": "Hi"})]


def events(raw: str) -> list[dict]:
    assert raw.endswith("data: [DONE]\n\n")
    return [json.loads(p[len("data: "):]) for p in raw.split("\n\n")
            if p.startswith("data: {")]


def stream(http, path: str, body: dict, **extra) -> list[dict]:
    r = http.post(path, json={**body, "max_tokens": 3, "stream": True, **extra})
    assert r.status_code == 200, r.text
    return events(r.text)


def assert_error(r, param: str) -> None:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == 400 and err["param"] == param and err["message"]


@pytest.mark.parametrize("path,body", ROUTES)
def test_empty_stream_options_sends_no_usage(http, path, body):
    evs = stream(http, path, body, stream_options={})
    assert all(e["choices"] for e in evs)  # no usage-only chunk
    assert all(not e.get("usage") for e in evs)
    evs = stream(http, path, body, stream_options={"continuous_usage_stats": True})
    assert all(not e.get("usage") for e in evs)  # continuous usage needs include_usage
    evs = stream(http, path, body, stream_options={"include_usage": True})
    assert evs[-1]["choices"] == [] and evs[-1]["usage"]["completion_tokens"] == 3
    assert all(not e.get("usage") for e in evs[:-1])


@pytest.mark.parametrize("path,body", ROUTES)
def test_empty_stream_options_without_stream_is_accepted(http, path, body):
    for opts in ({}, None):
        r = http.post(path, json={**body, "max_tokens": 2, "stream_options": opts})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 2
    r = http.post(path, json={**body, "max_tokens": 2,
                              "stream_options": {"include_usage": False}})
    assert_error(r, "stream_options")


@pytest.mark.parametrize("path,body", ROUTES)
def test_stream_with_zero_prompt_logprobs_is_accepted(http, path, body):
    evs = stream(http, path, body, prompt_logprobs=0)
    assert evs[-1]["choices"][0]["finish_reason"] == "length"
    r = http.post(path, json={**body, "max_tokens": 2, "stream": True, "prompt_logprobs": 1})
    assert_error(r, "prompt_logprobs")


@pytest.mark.parametrize("path,body", ROUTES)
def test_lax_field_types_as_pydantic(http, path, body):
    for extra in ({"max_tokens": 3.0}, {"max_tokens": "3", "temperature": "0.5", "n": "1"},
                  {"max_tokens": 3, "ignore_eos": "true", "seed": 7.0}):
        r = http.post(path, json={**body, **extra})
        assert r.status_code == 200, (extra, r.text)
        assert r.json()["usage"]["completion_tokens"] == 3
    assert_error(http.post(path, json={**body, "max_tokens": 3.5}), "max_tokens")
    assert_error(http.post(path, json={**body, "temperature": "hot"}), "temperature")
    assert_error(http.post(path, json={**body, "stream": "maybe"}), "stream")


def test_server_idle_after_review_requests(http, srv):
    """Nothing above leaves a request or a KV block behind."""
    s = srv.wait_idle()
    assert s["num_running"] == 0 and s["used_blocks"] == 0


def test_a_second_served_name_is_echoed_back():
    """vLLM's _get_model_name: a response carries the served name the request asked for (not
    always the first); no model field: the first name; an unknown one: 404."""
    import httpx
    from serving_helpers import running_server
    with running_server(served_model_name=["kimi", "alias2"]) as s:
        body = {"prompt": "hi", "max_tokens": 2}
        for asked, want in (("alias2", "alias2"), ("kimi", "kimi"), (None, "kimi")):
            r = httpx.post(s.url + "/v1/completions", json=dict(body, model=asked), timeout=60)
            assert r.status_code == 200 and r.json()["model"] == want, r.text
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                "model": "alias2", "stream": True}
        r = httpx.post(s.url + "/v1/chat/completions", json=chat, timeout=60)
        assert '"model":"alias2"' in r.text
        r = httpx.post(s.url + "/v1/completions", json=dict(body, model="other"), timeout=60)
        assert r.status_code == 404


def test_streams_end_cleanly_when_the_shutdown_timeout_runs_out(tmp_path):
    """SIGTERM with a stream that outlives --shutdown-timeout: shortly before the deadline the
    server aborts the live requests, so the stream ends with an error event and [DONE] (it was
    cut mid-stream when uvicorn cancelled the handler, with a CancelledError traceback)."""
    import signal
    import subprocess
    import sys
    import time

    import httpx
    from live_server import REPO, free_port, offline_env

    port = free_port()
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "atom_stream.entrypoints.openai_server", "--host",
             "127.0.0.1", "--server-port", str(port), "--shutdown-timeout", "3"],
            cwd=REPO, env=offline_env(), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(url + "/health", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.25)
        body = {"prompt": "hi", "max_tokens": 4000, "ignore_eos": True, "stream": True}
        text, n = "", 0
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60,
                          trust_env=False) as r:
            for chunk in r.iter_text():
                text += chunk
                n += 1
                if n == 3:
                    proc.send_signal(signal.SIGTERM)
        assert text.endswith("data: [DONE]\n\n"), text[-500:]
        assert "server shutting down" in text.rsplit("data: ", 2)[-2]
        # exit status 0 (vLLM's), not uvicorn's re-raised SIGTERM (server/app.py)
        assert proc.wait(timeout=30) == 0, log_path.read_text()[-2000:]
        assert "Traceback" not in log_path.read_text()
        assert "Application shutdown complete" in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
