"""HTTPS and WSS (vLLM's --ssl-keyfile / --ssl-certfile / --ssl-ca-certs / --ssl-cert-reqs;
--root-path): a self-signed certificate made for the test (openssl), chat over HTTPS, a
WebSocket request over WSS, plain HTTP refused on the TLS port, client certificates required
when asked, and clear errors for incomplete settings."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess

import httpx
import pytest
import websockets.sync.client as ws_client
from serving_helpers import running_server
from test_cli import parse

from atom_stream.server.app import ServerConfig

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def _cert(d, name: str, cn: str, ca: tuple | None = None) -> tuple[str, str]:
    """A key and certificate for `cn` (127.0.0.1 as its IP name), self-signed or signed by
    `ca` (its key and certificate files)."""
    key, crt = str(d / f"{name}.key"), str(d / f"{name}.crt")
    subj = ["-subj", f"/CN={cn}", "-addext", "subjectAltName=IP:127.0.0.1"]
    if ca is None:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                        key, "-out", crt, "-days", "1", *subj], check=True, capture_output=True)
        return key, crt
    csr = str(d / f"{name}.csr")
    subprocess.run(["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", csr, "-subj", f"/CN={cn}"], check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", csr, "-CA", ca[1], "-CAkey", ca[0],
                    "-CAcreateserial", "-out", crt, "-days", "1"], check=True,
                   capture_output=True)
    return key, crt


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    server = _cert(d, "server", "127.0.0.1")
    ca = _cert(d, "ca", "test-ca")
    client = _cert(d, "client", "client", ca=ca)
    return {"server": server, "ca": ca, "client": client}


def test_https_and_wss(certs):
    key, crt = certs["server"]
    with running_server(ssl_keyfile=key, ssl_certfile=crt, root_path="/llm") as srv:
        base = f"https://127.0.0.1:{srv.port}"
        r = httpx.post(f"{base}/v1/chat/completions", json=CHAT, verify=crt, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert httpx.get(f"{base}/health", verify=crt).status_code == 200
        with pytest.raises(httpx.HTTPError):  # an unverified certificate is refused
            httpx.get(f"{base}/health", timeout=10)
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port gets no answer
            httpx.get(f"http://127.0.0.1:{srv.port}/health", timeout=10)
        ctx = ssl.create_default_context(cafile=crt)
        with ws_client.connect(f"wss://127.0.0.1:{srv.port}/v1/ws", ssl=ctx,
                               subprotocols=["atom-stream.v1.json"]) as ws:
            ws.send(json.dumps({"type": "generate", "id": "a", "prompt": "hi",
                                "params": {"max_tokens": 2, "ignore_eos": True}}))
            frames = []
            while not frames or frames[-1]["type"] != "done":
                frames.append(json.loads(ws.recv(timeout=60)))
        assert frames[-1]["usage"]["completion_tokens"] == 2


def test_client_certificates_required(certs):
    key, crt = certs["server"]
    ca_crt = certs["ca"][1]
    with running_server(ssl_keyfile=key, ssl_certfile=crt, ssl_ca_certs=ca_crt,
                        ssl_cert_reqs=2) as srv:
        base = f"https://127.0.0.1:{srv.port}"
        ctx = ssl.create_default_context(cafile=crt)
        with pytest.raises(httpx.HTTPError):  # no client certificate
            httpx.get(f"{base}/health", verify=ctx, timeout=10)
        ctx.load_cert_chain(certs["client"][1], certs["client"][0])
        assert httpx.get(f"{base}/health", verify=ctx, timeout=10).status_code == 200


def test_settings_checked(certs, tmp_path):
    key, crt = certs["server"]
    for kwargs, words in [({"ssl_keyfile": key}, "go together"),
                          ({"ssl_keyfile": key, "ssl_certfile": str(tmp_path / "none.crt")},
                           "no such file"),
                          ({"ssl_keyfile": key, "ssl_certfile": crt, "ssl_cert_reqs": 3},
                           "ssl_cert_reqs"),
                          ({"ssl_keyfile": key, "ssl_certfile": crt, "ssl_cert_reqs": 2},
                           "needs ssl_ca_certs")]:
        with pytest.raises(ValueError, match=words):
            ServerConfig(**kwargs)
    _, server = parse(f"--ssl-keyfile {key} --ssl-certfile {crt} --ssl-cert-reqs 0 "
                      "--root-path /llm")
    assert (server.ssl_keyfile, server.ssl_certfile, server.root_path) == (key, crt, "/llm")
