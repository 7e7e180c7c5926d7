"""Security properties (issue 10, "security").

- `--api-key` guards every /v1 route (HTTP) and /v1/ws (handshake header or auth frame); the key
  check is constant time (hashlib digests compared with secrets/hmac.compare_digest, no `==`).
- The server binds 127.0.0.1 unless told otherwise (ServerConfig and the CLI default).
- Size limits: body (413), WebSocket frame (413 error frame), prompt longer than max_model_len
  (400), and max_tokens is bounded by max_model_len (a huge max_tokens ends at the context).
- Remote code runs only with --trust-remote-code: a checkpoint whose tokenizer points at a custom
  Python file that writes a marker when imported is never imported without the flag.
- No keys or prompts in the logs at the default level (subprocess server, log captured).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import httpx
import pytest
from live_server import REPO, offline_env
from serving_helpers import running_server
from test_faults import _start_subprocess_server
from websockets.sync.client import connect

KEY = "sk-test-5f0c1e0e2b7d4f7c"
JSON = "atom-stream.v1.json"
V1_ROUTES = [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
             ("GET", "/v1/models"), ("POST", "/v1/no-such-route")]


@pytest.fixture(scope="module")
def srv():
    with running_server({"max_model_len": 64}, api_keys=[KEY], max_body_bytes=64 << 10,
                        ws_max_frame_bytes=16 << 10) as s:
        yield s


def auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(("method", "path"), V1_ROUTES)
@pytest.mark.parametrize("headers", [{}, auth("wrong"), {"Authorization": KEY},
                                     auth(KEY + "x"), auth(KEY[:-1])])
def test_every_v1_route_needs_the_key(srv, method, path, headers):
    r = httpx.request(method, srv.url + path, headers=headers,
                      json={"prompt": "hi", "max_tokens": 1})
    assert r.status_code == 401, (r.status_code, r.text)
    assert r.json()["error"]["code"] == 401


def test_right_key_is_served(srv):
    r = httpx.post(srv.url + "/v1/completions", headers=auth(),
                   json={"prompt": "hi", "max_tokens": 1})
    assert r.status_code == 200
    assert httpx.get(srv.url + "/v1/models", headers=auth()).status_code == 200


def test_websocket_needs_the_key(srv):
    with pytest.raises(Exception):  # noqa: B017 - handshake refused (401)
        connect(srv.ws_url, subprotocols=[JSON], additional_headers=auth("wrong"),
                open_timeout=10)
    # no header: every frame before a good auth frame gets 401; a wrong key closes the socket
    with connect(srv.ws_url, subprotocols=[JSON]) as ws:
        ws.send(json.dumps({"type": "generate", "id": "a", "prompt": "hi"}))
        f = json.loads(ws.recv(timeout=10))
        assert f["type"] == "error" and f["code"] == 401
        ws.send(json.dumps({"type": "auth", "api_key": "wrong"}))
        f = json.loads(ws.recv(timeout=10))
        assert f["code"] == 401
        with pytest.raises(Exception):  # noqa: B017 - closed with 1008
            ws.recv(timeout=10)
    with connect(srv.ws_url, subprotocols=[JSON]) as ws:
        ws.send(json.dumps({"type": "auth", "api_key": KEY}))
        ws.send(json.dumps({"type": "generate", "id": "b", "prompt": "hi",
                            "params": {"max_tokens": 1}}))
        while (f := json.loads(ws.recv(timeout=30)))["type"] == "delta":
            pass
        assert f["type"] == "done", f


def test_key_compare_is_constant_time():
    from atom_stream.server import auth as auth_mod

    src = inspect.getsource(auth_mod.KeyChecker)
    assert "compare_digest" in src
    assert "==" not in src.split("def check(")[1].split("def check_header")[0]
    checker = auth_mod.KeyChecker(["a", "b"])
    assert checker.check("a") and checker.check("b") and not checker.check("c")
    assert not checker.check("")


def test_binds_loopback_by_default():
    from atom_stream.cli import serve_parser, server_config_from_args
    from atom_stream.server.app import ServerConfig

    assert ServerConfig().host == "127.0.0.1"
    args = serve_parser().parse_args([])
    assert server_config_from_args(args).host == "127.0.0.1"


def test_size_limits(srv):
    r = httpx.post(srv.url + "/v1/completions", headers=auth(),
                   content=b'{"prompt":"' + b"a" * (100 << 10) + b'"}')
    assert r.status_code == 413
    r = httpx.post(srv.url + "/v1/completions", headers=auth(),
                   json={"prompt": "a" * 500, "max_tokens": 1})
    assert r.status_code == 400 and "max_model_len" in r.text.lower().replace(" ", "_") or \
        r.status_code == 400, r.text
    # max_tokens is bounded by max_model_len: it ends at the context, never runs past it
    r = httpx.post(srv.url + "/v1/completions", headers=auth(),
                   json={"prompt": "hi", "max_tokens": 10**9, "ignore_eos": True}, timeout=60)
    if r.status_code == 200:
        u = r.json()["usage"]
        assert u["total_tokens"] <= 64 and r.json()["choices"][0]["finish_reason"] == "length"
    else:
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
    with connect(srv.ws_url, subprotocols=[JSON], additional_headers=auth(),
                 max_size=None) as ws:
        ws.send(json.dumps({"type": "generate", "id": "big", "prompt": "a" * (20 << 10)}))
        f = json.loads(ws.recv(timeout=10))
        assert f["type"] == "error" and f["code"] == 413 and f["id"] == "big"


EVIL = """
import os
open(os.environ["ATOM_STREAM_MARKER"], "w").write("imported")
from transformers import PreTrainedTokenizerFast
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def _evil_checkpoint(path, kimi: bool) -> None:
    os.makedirs(path, exist_ok=True)
    (path / "tokenization_evil.py").write_text(EVIL)
    cfg = {"tokenizer_class": "EvilTokenizer",
           "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    if kimi:
        import base64

        (path / "tiktoken.model").write_text("".join(
            f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))


@pytest.mark.parametrize("kimi", [False, True])
def test_remote_code_only_with_trust_remote_code(tmp_path, kimi):
    ckpt = tmp_path / "ckpt"
    _evil_checkpoint(ckpt, kimi)
    marker = tmp_path / "marker"
    code = ("import sys\nfrom atom_stream.tokenizer import load_tokenizer\n"
            "try:\n    load_tokenizer(sys.argv[1], trust_remote_code=sys.argv[2] == '1')\n"
            "except Exception as e:\n    print('refused:', type(e).__name__)\n")
    env = offline_env(ATOM_STREAM_MARKER=str(marker))
    out = subprocess.run([sys.executable, "-c", code, str(ckpt), "0"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert not marker.exists(), out.stdout + out.stderr[-2000:]
    if not kimi:  # the check can fail: with the flag, transformers does import the file
        subprocess.run([sys.executable, "-c", code, str(ckpt), "1"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120, check=False)
        assert marker.exists()


def test_no_keys_or_prompts_in_logs_by_default():
    secret, prompt = "sk-LOGSECRET-91c2", "PROMPT-MARKER-7d3a"
    proc, url, log = _start_subprocess_server("--api-key", secret)
    try:
        h = {"Authorization": f"Bearer {secret}"}
        r = httpx.post(url + "/v1/completions", headers=h,
                       json={"prompt": prompt, "max_tokens": 2}, timeout=60)
        assert r.status_code == 200
        r = httpx.post(url + "/v1/chat/completions", headers=h, timeout=60, json={
            "messages": [{"role": "user", "content": prompt}], "max_tokens": 2})
        assert r.status_code == 200
        bad = httpx.post(url + "/v1/completions", headers=auth(secret + "x"),
                         json={"prompt": prompt})
        assert bad.status_code == 401
    finally:
        proc.terminate()
        proc.wait(30)
    with open(log) as f:
        text = f.read()
    os.unlink(log)
    assert "POST /v1/completions" in text or "serving" in text, text[-2000:]  # logs were on
    assert secret not in text and prompt not in text, text[-3000:]
