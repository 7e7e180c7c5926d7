"""Review 25 of the app shell, metrics and CLI (server/app.py):

- (SIGTERM with an SSE stream in flight exits with status 0: tests/test_server_review_s23.py);
- a 405 carries the `Allow` header starlette computed (the JSON error handler dropped it);
- a served name given only in ServerConfig labels the engine's metrics too (model_name: the
  engine series said "demo" while the front end's and /v1/models said the served name);
- /version does not read package metadata (file I/O) on the event loop per request.
"""

from __future__ import annotations

import importlib.metadata

import httpx
import pytest
from serving_helpers import running_server

ALIAS = "alias-r25"


@pytest.fixture(scope="module")
def srv():
    with running_server({"num_kv_blocks": 128, "max_model_len": 256},
                        served_model_name=[ALIAS, "second-r25"]) as s:
        yield s


def test_405_carries_allow_header(srv):
    r = httpx.delete(srv.url + "/v1/models", timeout=10)
    assert r.status_code == 405
    assert r.json()["error"]["code"] == 405
    assert set(r.headers["allow"].replace(" ", "").split(",")) >= {"GET", "HEAD"}
    r = httpx.get(srv.url + "/v1/chat/completions", timeout=10)
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_engine_metrics_labelled_with_the_served_name(srv):
    body = {"model": "second-r25", "prompt": "label me", "max_tokens": 3, "ignore_eos": True}
    assert httpx.post(srv.url + "/v1/completions", json=body, timeout=60).status_code == 200
    text = httpx.get(srv.url + "/metrics", timeout=10).text
    line = next(ln for ln in text.splitlines()
                if ln.startswith("atom_stream:request_success_total{")
                and 'finished_reason="length"' in ln)
    assert f'model_name="{ALIAS}"' in line and float(line.rsplit(" ", 1)[1]) >= 1
    assert 'model_name="demo"' not in text


def test_version_reads_no_metadata_per_request(srv, monkeypatch):
    calls = []
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: calls.append(name) or real(name))
    for _ in range(3):
        r = httpx.get(srv.url + "/version", timeout=10)
        assert r.status_code == 200 and isinstance(r.json()["version"], str)
    assert calls == []


def test_atom_stream_serve_raises_the_open_file_limit(monkeypatch):
    """`atom-stream serve` (not only the ATOM entry point) raises RLIMIT_NOFILE before serving,
    as `vllm serve`: every in-flight request holds a socket."""
    from atom_stream import cli
    from atom_stream.entrypoints import limits
    from atom_stream.server import app

    order = []
    monkeypatch.setattr(limits, "raise_fd_limit", lambda *a: order.append("limit"))
    monkeypatch.setattr(app, "run_server", lambda e, s: order.append(("serve", s.port)))
    assert cli.main(["serve", "--port", "18999", "--kv_cache_dtype", "fp8"]) == 0
    assert order == ["limit", ("serve", 18999)]


@pytest.mark.parametrize("flags", ["--request-log", "--request-log /tmp/req.jsonl",
                                   "--request_log"])
def test_atom_server_flag_request_log_is_accepted(flags):
    """atom.md's server flags (`--host`, `--server-port`, `--timeout-keep-alive`,
    `--disable-uvicorn-access-log`, `--chat-template`, `--default-chat-template-kwargs`,
    `--request-log`) all parse under the ATOM entry point."""
    import shlex

    from atom_stream import cli

    line = ("--host 0.0.0.0 --server-port 8001 --timeout-keep-alive 5 "
            "--disable-uvicorn-access-log --default-chat-template-kwargs '{\"thinking\": false}' "
            + flags)
    args = cli.serve_parser(atom_ports=True).parse_args(shlex.split(line))
    server = cli.server_config_from_args(args)
    assert (server.host, server.port, server.access_log) == ("0.0.0.0", 8001, False)
    assert server.default_chat_template_kwargs == {"thinking": False}


def test_enable_request_id_headers_flag():
    """vLLM's --enable-request-id-headers: X-Request-Id on every HTTP response (the client's
    own when it sent one), SSE included; off by default."""
    from atom_stream import cli

    args = cli.serve_parser().parse_args(["--enable-request-id-headers"])
    assert cli.server_config_from_args(args).enable_request_id_headers is True
    assert cli.server_config_from_args(cli.serve_parser().parse_args([])
                                       ).enable_request_id_headers is False
    with running_server({"num_kv_blocks": 64, "max_model_len": 256},
                        enable_request_id_headers=True) as s:
        r = httpx.get(s.url + "/health", headers={"X-Request-Id": "trace-r25"}, timeout=10)
        assert r.headers["x-request-id"] == "trace-r25"
        r = httpx.get(s.url + "/v1/models", timeout=10)
        assert len(r.headers["x-request-id"]) == 32
        body = {"prompt": "x", "max_tokens": 2, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60,
                          headers={"X-Request-Id": "sse-r25"}) as r:
            assert r.headers["x-request-id"] == "sse-r25"
            assert "".join(r.iter_text()).endswith("data: [DONE]\n\n")
