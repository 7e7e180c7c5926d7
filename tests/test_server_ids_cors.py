"""Request ids and CORS as vLLM's OpenAI server has them (the reviewer's items 4 and 5).

Ids: a client id (`X-Request-Id` header over the body's `request_id`, vLLM's `_base_request_id`)
names the response (`cmpl-<id>` / `chatcmpl-<id>`); the engine id adds 8 random hex characters
(vLLM's `assign_request_id`), so two live requests with one client id both succeed, and closing
one stream aborts that request only. CORS: starlette's CORSMiddleware with vLLM's defaults
(`["*"]` origins/methods/headers, no credentials): a browser preflight gets 200 and the
Access-Control-* headers on every route, also with `--api-key` (no key needed for OPTIONS), and a
401 carries them so a browser can read it.
"""

from __future__ import annotations

import json
import re

import httpx
import pytest
from starlette.testclient import TestClient

from atom_stream.config import EngineConfig
from atom_stream.server.app import ServerConfig, build_app
from atom_stream.server.request_ids import base_request_id, engine_request_id

PREFLIGHT = {"Origin": "http://example.com", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "content-type,authorization"}


# ------------------------------------------------------------------------------- request ids
def test_id_helpers_follow_vllm():
    assert base_request_id({"X-Request-Id": "hdr"}, "body") == "hdr"  # the header wins
    assert base_request_id({}, "body") == "body"
    assert base_request_id(None, "body") == "body"
    assert base_request_id({"X-Request-Id": ""}, "body") == ""  # present, even empty (vLLM)
    assert re.fullmatch(r"[0-9a-f]{32}", base_request_id({}, None))
    a, b = engine_request_id("cmpl-x"), engine_request_id("cmpl-x")
    assert a != b and re.fullmatch(r"cmpl-x-[0-9a-f]{8}", a)


def _first_event(lines) -> dict:
    for line in lines:
        if line.startswith("data: "):
            return json.loads(line[len("data: "):])
    raise AssertionError("no SSE event")


def test_same_client_id_twice_live_both_succeed_and_abort_apart(srv):
    body = {"prompt": "x", "max_tokens": 400, "ignore_eos": True, "stream": True,
            "request_id": "same"}
    before = srv.stats()["finished"]["abort"]
    with (httpx.Client(base_url=srv.url, timeout=60) as c,
          c.stream("POST", "/v1/completions", json=body) as r1):
        assert r1.status_code == 200, r1.read()
        lines1 = r1.iter_lines()
        assert _first_event(lines1)["id"] == "cmpl-same"
        with c.stream("POST", "/v1/completions", json={**body, "max_tokens": 40}) as r2:
            assert r2.status_code == 200, r2.read()  # was 400 "already live"
            lines2 = r2.iter_lines()
            assert _first_event(lines2)["id"] == "cmpl-same"

            async def live_ids() -> list[str]:
                return sorted(srv.engine._slots)
            ids = srv.call(live_ids())
            assert len(ids) == 2 and all(re.fullmatch(r"cmpl-same-[0-9a-f]{8}", i)
                                         for i in ids), ids
            # the second one runs to its end while the first is still streaming
            events = [json.loads(x[6:]) for x in lines2
                      if x.startswith("data: ") and x != "data: [DONE]"]
            assert {e["id"] for e in events} == {"cmpl-same"}
            assert events[-1]["choices"][0]["finish_reason"] == "length"
        # leaving the first stream early (a client disconnect) aborts that request only
    s = srv.wait_idle()
    assert s["finished"]["abort"] == before + 1 and s["used_blocks"] == 0


def test_x_request_id_header_names_the_response(srv):
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/v1/completions", headers={"X-Request-Id": "hdr1"},
                   json={"prompt": "x", "max_tokens": 1, "request_id": "body1"})
        assert r.status_code == 200 and r.json()["id"] == "cmpl-hdr1"
        r = c.post("/v1/chat/completions", headers={"x-request-id": "hdr2"},
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        assert r.status_code == 200 and r.json()["id"] == "chatcmpl-hdr2"
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1,
                                            "request_id": "body1"})
        assert r.json()["id"] == "cmpl-body1"
        # non-streamed duplicates at once: both answered
        import concurrent.futures as cf
        with cf.ThreadPoolExecutor(2) as pool:
            rs = list(pool.map(lambda _: c.post(
                "/v1/completions", headers={"X-Request-Id": "dup"},
                json={"prompt": "x", "max_tokens": 64, "ignore_eos": True}), range(2)))
        assert [r.status_code for r in rs] == [200, 200], [r.text for r in rs]
        assert {r.json()["id"] for r in rs} == {"cmpl-dup"}


# ------------------------------------------------------------------------------- CORS
def _client(**server_kwargs) -> TestClient:
    # no `with`: the lifespan (engine start) never runs; CORS needs no engine
    app = build_app(EngineConfig(model="demo", device="cpu"), ServerConfig(**server_kwargs))
    return TestClient(app)


def test_cors_defaults_answer_preflight_on_every_route():
    c = _client()
    for path in ("/v1/chat/completions", "/v1/completions", "/tokenize", "/health"):
        r = c.options(path, headers=PREFLIGHT)
        assert r.status_code == 200, (path, r.status_code, r.text)
        assert r.headers["access-control-allow-origin"] == "*"
        assert "POST" in r.headers["access-control-allow-methods"]
        assert r.headers["access-control-allow-headers"] == "content-type,authorization"
        assert "access-control-allow-credentials" not in r.headers
    r = c.get("/health", headers={"Origin": "http://example.com"})  # a simple request
    assert r.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-origin" not in c.get("/health").headers  # no Origin: none


def test_cors_configured_origins_and_credentials():
    c = _client(allowed_origins=["http://ok.example"], allow_credentials=True,
                allowed_methods=["GET", "POST"], allowed_headers=["content-type"])
    r = c.options("/v1/completions", headers={**PREFLIGHT, "Origin": "http://ok.example",
                                              "Access-Control-Request-Headers": "content-type"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://ok.example"
    assert r.headers["access-control-allow-credentials"] == "true"
    r = c.options("/v1/completions", headers=PREFLIGHT)  # another origin: refused (400)
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = c.options("/v1/completions", headers={**PREFLIGHT, "Origin": "http://ok.example",
                                              "Access-Control-Request-Method": "DELETE"})
    assert r.status_code == 400


def test_cors_with_api_key():
    c = _client(api_keys=["k"])
    r = c.options("/v1/chat/completions", headers=PREFLIGHT)  # browsers send no key here
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    r = c.post("/v1/chat/completions", headers={"Origin": "http://example.com"}, json={})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "*"


def test_cors_config_rejects_a_bare_string():
    with pytest.raises(ValueError, match="allowed_origins"):
        ServerConfig(allowed_origins="*")  # type: ignore[arg-type]
    assert ServerConfig().allowed_origins == ["*"] and not ServerConfig().allow_credentials
    assert not ServerConfig().enable_prompt_tokens_details
