"""Test helpers for the serving tests: a real uvicorn server (demo model, CPU) in a thread.

`running_server(engine_kwargs, **server_kwargs)` (a context manager, for module-scoped fixtures)
starts a server on a free port and yields a `RunningServer`:
`.url` (http://127.0.0.1:PORT), `.ws_url`, `.engine` (the AsyncEngine), `.call(coro)` (run a
coroutine on the serving loop, e.g. `engine.stats()` without racing the engine loop), `.stop()`.
The server runs exactly what `atom-stream serve` runs (build_app + uvicorn_config: uvloop,
httptools, the app's lifespan owning the engine); only the thread is test-specific.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from atom_stream.config import EngineConfig
from atom_stream.server.app import ServerConfig, build_app, uvicorn_config

# small KV pool: fast start, and "KV usage back to zero" is visible in a few blocks
ENGINE_KWARGS: dict[str, Any] = {"model": "demo", "device": "cpu", "num_kv_blocks": 1024,
                                     "max_num_seqs": 64}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    def __init__(self, engine_kwargs: dict[str, Any], server_kwargs: dict[str, Any]):
        import uvicorn

        self.port = free_port()
        self.engine_config = EngineConfig(**engine_kwargs)
        self.config = ServerConfig(port=self.port, log_level="warning", access_log=False,
                                   **server_kwargs)
        self.app = build_app(self.engine_config, self.config)
        self.server = uvicorn.Server(uvicorn_config(self.app, self.config))
        self.thread = threading.Thread(target=self.server.run, daemon=True,
                                       name=f"uvicorn-{self.port}")
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)

    @property
    def state(self) -> Any:
        return self.app.state.server

    @property
    def engine(self) -> Any:
        return self.state.engine

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    def call(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.state.loop).result(timeout)

    def stats(self) -> dict:
        async def get() -> dict:
            return self.engine.stats()
        return self.call(get())

    def wait_idle(self, timeout: float = 20.0) -> dict:
        """Wait until no request is running or waiting and no KV block is in use."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if (s["num_running"] == 0 and s["num_waiting"] == 0 and s["used_blocks"] == 0
                    and s["num_streams"] == 0):
                return s
            if time.monotonic() > deadline:
                return s
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


@contextlib.contextmanager
def running_server(engine_kwargs: dict[str, Any] | None = None, **server_kwargs: Any
                   ) -> Iterator[RunningServer]:
    """A server for the duration of the block (use from a module-scoped fixture)."""
    srv = RunningServer({**ENGINE_KWARGS, **(engine_kwargs or {})}, server_kwargs)
    try:
        yield srv
    finally:
        srv.stop()
