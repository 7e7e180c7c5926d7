"""Client: a small synchronous wrapper over AsyncClient (its event loop runs in a thread).

    with Client("ws://127.0.0.1:8000/v1/ws") as client:
        for delta in client.generate("Hello", max_tokens=16):
            print(delta.text, end="")
        print(client.complete("Hello", max_tokens=16).text)

Leaving the `for` loop early closes the generator, which cancels the request on the server.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

from atom_stream_client.client import AsyncClient
from atom_stream_client.messages import Completion, Delta


class Client:
    def __init__(self, url: str = "ws://127.0.0.1:8000/v1/ws", api_key: str | None = None,
                 **kwargs: Any):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="atom-stream-client",
                                        daemon=True)
        self._thread.start()
        self._async = AsyncClient(url, api_key, **kwargs)
        try:
            self._call(self._async.connect())
        except BaseException:
            self.close()
            raise

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def generate(self, prompt: str | None = None, **kwargs: Any) -> Iterator[Delta]:
        agen = self._async.generate(prompt, **kwargs).__aiter__()
        try:
            while True:
                try:
                    yield self._call(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._call(agen.aclose())  # sends a cancel if the stream had not finished

    def chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> Iterator[Delta]:
        return self.generate(messages=messages, **kwargs)

    def complete(self, prompt: str | None = None, **kwargs: Any) -> Completion:
        return self._call(self._async.complete(prompt, **kwargs))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._call(self._async.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()

    def __enter__(self) -> Client:  # noqa: PYI034 - Self needs 3.11; SDK: 3.10+
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
