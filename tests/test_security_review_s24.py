"""Security / resource-limit review (session 24) of the HTTP front end, on a live server.

- Request ids are bounded (request_ids.MAX_REQUEST_ID_CHARS): a megabyte `request_id` or
  `X-Request-Id` was repeated in every SSE chunk (one token = one megabyte on the wire, every
  other stream on the loop slowed down); now a 400.
- Nesting that passes the JSON decoder but not the chat template's rendering (tools or
  chat_template_kwargs some hundreds deep) is a 400, not a 500 "RecursionError"; a 500 names
  only the exception type (no internal text or paths) and is logged with its traceback.
- Request heads are bounded (ServerConfig.max_header_bytes, 431): uvicorn's httptools parser
  buffered a header of any size.
- Pinned on the way (verified, not pinned elsewhere): Bearer parsing, a slow body holds no
  engine slot, and the server serves and is idle after every case.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time

import httpx
import pytest
from serving_helpers import running_server

from atom_stream.server.responses import HTTPError

KEY = "sk-s24-3b9e"
MAX_REQUEST_ID_CHARS = 1024  # request_ids.MAX_REQUEST_ID_CHARS
HEAD_LIMIT = 16 << 10
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


@pytest.fixture(scope="module")
def srv():
    with running_server({"max_model_len": 128}, api_keys=[KEY], max_body_bytes=256 << 10,
                        max_header_bytes=HEAD_LIMIT) as s:
        yield s


@pytest.fixture(scope="module")
def http(srv):
    with httpx.Client(base_url=srv.url, timeout=60, trust_env=False,
                      headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def _serves_and_idle(srv, http) -> None:
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200, r.text
    s = srv.wait_idle()
    assert s["used_blocks"] == 0 and s["num_streams"] == 0 and not s["is_dead"], s


def _raw(port: int, head: bytes, body: bytes = b"", timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head + body)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


# ------------------------------------------------------------------------------ request ids
@pytest.mark.parametrize("where", ["header", "body"])
def test_oversized_request_id_is_a_400(srv, http, where):
    big = "r" * (MAX_REQUEST_ID_CHARS + 1)
    for route, body in (("/v1/completions", {"prompt": "hi", "max_tokens": 1}),
                        ("/v1/chat/completions", CHAT)):
        if where == "header":
            r = http.post(route, json=body, headers={"X-Request-Id": big})
        else:
            r = http.post(route, json={**body, "request_id": big})
        assert r.status_code == 400, r.text[:300]
        err = r.json()["error"]
        assert err["param"] == (None if where == "header" else "request_id"), err
        assert str(MAX_REQUEST_ID_CHARS) in err["message"] and big not in err["message"]
    ok = "o" * MAX_REQUEST_ID_CHARS  # at the limit: served, and names the response
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, "request_id": ok})
    assert r.status_code == 200 and r.json()["id"] == f"cmpl-{ok}"
    _serves_and_idle(srv, http)


# ------------------------------------------------------------------------------ nesting, 500s
def _deep(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/tokenize"])
def test_deep_tools_are_a_400_not_a_500(srv, http, route):
    body = (b'{"messages":[{"role":"user","content":"a"}],"max_tokens":1,"tool_choice":"none",'
            b'"tools":[{"type":"function","function":{"name":"f","parameters":' + _deep(700)
            + b"}}]}")
    if route == "/tokenize":
        body = body.replace(b'"max_tokens":1,"tool_choice":"none",', b"")
    r = http.post(route, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text[:300]
    err = r.json()["error"]
    assert "nested too deeply" in err["message"] and "Recursion" not in err["message"], err
    _serves_and_idle(srv, http)


def test_internal_error_hides_its_text_and_is_logged(caplog):
    with caplog.at_level(logging.ERROR, logger="atom_stream.server"):
        err = HTTPError.from_exception(OSError("/srv/secret/weights.bin: bad"))
    assert err.status == 500 and "secret" not in err.message and "OSError" in err.message
    assert any(r.exc_info and "secret" in str(r.exc_info[1]) for r in caplog.records)
    assert HTTPError.from_exception(RecursionError("x")).status == 400


# ------------------------------------------------------------------------------ request heads
def test_oversized_header_is_431_and_bounded(srv, http):
    head = (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (HEAD_LIMIT // 2)
            + b"\r\n\r\n")
    assert _raw(srv.port, head + b"").startswith(b"HTTP/1.1 200")  # under the limit: served
    got = b""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            for _ in range(64):  # 4 MiB of one header, in 64 KiB writes
                s.sendall(b"a" * (64 << 10))
                time.sleep(0.002)
        except OSError:
            pass  # the server closed the connection: what is under test
        try:
            while chunk := s.recv(65536):
                got += chunk
        except OSError:
            pass
    assert got.startswith(b"HTTP/1.1 431"), got[:200]
    # a head over the limit that arrives whole in one write, or in two, is refused too
    big = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (2 * HEAD_LIMIT) + b"\r\n\r\n"
    got = _raw(srv.port, big)
    assert got.startswith(b"HTTP/1.1 431")
    # the error contract's JSON body (DESIGN.md), as every other error
    head, _, body = got.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    err = json.loads(body)["error"]
    assert err["code"] == 431 and "exceed" in err["message"] and "param" in err, err
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(big[:HEAD_LIMIT])
        time.sleep(0.05)
        s.sendall(big[HEAD_LIMIT:])
        got = b""
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                got += chunk
    assert got.startswith(b"HTTP/1.1 431"), got[:200]
    # a body far larger than the head limit is no head: served as before
    r = http.post("/v1/completions", json={"prompt": "a" * (4 * HEAD_LIMIT), "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input_tokens", r.text[:300]
    # pipelined: two requests (one with a large body) in one write, both answered
    body = json.dumps({"prompt": "x" * (2 * HEAD_LIMIT), "max_tokens": 1}).encode()
    one = (b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    out = _raw(srv.port, one + one.replace(b"Host: x", b"Host: x\r\nConnection: close"))
    assert out.count(b"HTTP/1.1 200") == 2, out[:300]
    _serves_and_idle(srv, http)


# ------------------------------------------------------------------------------ pinned
@pytest.mark.parametrize(("value", "status"), [
    (f"Bearer {KEY}", 200), (f"bearer {KEY}", 200), (f"BEARER  {KEY}", 200),
    (KEY, 401), (f"Basic {KEY}", 401), ("Bearer", 401), (f"Bearer {KEY}x", 401)])
def test_bearer_parsing(srv, value, status):
    r = httpx.post(srv.url + "/v1/completions", headers={"Authorization": value},
                   json={"prompt": "hi", "max_tokens": 1}, trust_env=False)
    assert r.status_code == status, (value, r.text[:200])
    if status == 401:
        assert KEY not in r.text and r.headers["www-authenticate"] == "Bearer"


def test_slow_body_holds_no_engine_slot(srv, http):
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nAuthorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 200"
                  b"\r\n\r\n{\"prompt\": \"hi\",")
        time.sleep(0.3)
        s_ = srv.stats()
        assert s_["num_waiting"] == 0 and s_["num_streams"] == 0, s_
        assert http.get("/load").json() == {"server_load": 0}
        _serves_and_idle(srv, http)  # others are served while the body trickles
