"""A real atom-stream server in a subprocess, for end-to-end tests of the benchmark and lm_eval.

`live_server()` starts `python -m atom_stream.entrypoints.openai_server --server-port P` with
no --model (the embedded demo model on the CPU) on a free loopback port, waits for GET /health
== 200, and yields (base_url, served_model_name); the process is terminated (then killed) on
exit. The server's output goes to a log file whose tail is shown when start-up fails.
`ATOM_STREAM_TEST_BASE_URL` points the tests at an already running server instead.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import httpx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STARTUP_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_model(base_url: str) -> str:
    data = httpx.get(f"{base_url}/v1/models", timeout=10, trust_env=False).json()
    return data["data"][0]["id"]


def offline_env(**extra: str) -> dict[str, str]:
    """The environment for subprocesses: no hub access, few threads, repo importable."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false", NO_PROXY="*")
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


@contextlib.contextmanager
def live_server(*extra_args: str) -> Iterator[tuple[str, str]]:
    if os.environ.get("ATOM_STREAM_TEST_BASE_URL"):
        url = os.environ["ATOM_STREAM_TEST_BASE_URL"].rstrip("/")
        yield url, served_model(url)
        return
    port = free_port()
    log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the server
        "w+", prefix="atom-stream-server-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "atom_stream.entrypoints.openai_server", "--host", "127.0.0.1",
           "--server-port", str(port), *extra_args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=offline_env(), stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{_tail(log.name)}")
            try:
                if httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not healthy after {STARTUP_TIMEOUT_S}s:\n"
                                   f"{_tail(log.name)}")
            time.sleep(0.25)
        yield url, served_model(url)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        os.unlink(log.name)


def _tail(path: str, n: int = 4000) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()[-n:]
