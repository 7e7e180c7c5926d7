"""Prometheus exposition: the engine's registry (atom_stream:* engine metrics) plus the front end's.

The engine keeps its own `CollectorRegistry` (`engine.metrics.registry`: queue, KV usage, tokens,
TTFT/ITL/e2e histograms; names in DESIGN.md). The server adds a few front-end series in a second
registry, labelled `model_name` like the engine's:

- counter `atom_stream:http_requests_total{route,status}` (OpenAI routes and /v1/ws handshakes),
- gauge `atom_stream:websocket_connections` (open /v1/ws connections),
- gauge `atom_stream:streams_open{interface}` (live SSE streams / WebSocket requests),
- counter `atom_stream:client_disconnects_total{interface}` (requests aborted because the client
  went away: interface "http" for SSE and plain HTTP, "websocket").

`render()` concatenates both registries in the text format (0.0.4); it runs on the loop thread and
costs well under a millisecond for these few series.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST


class FrontendMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        reg = self.registry
        self.model_name = model_name
        self._requests = Counter("atom_stream:http_requests_total", "HTTP requests by route/status.",
                                 ["model_name", "route", "status"], registry=reg)
        self.ws_connections = Gauge("atom_stream:websocket_connections",
                                    "Open /v1/ws connections.", ["model_name"],
                                    registry=reg).labels(model_name)
        streams = Gauge("atom_stream:streams_open", "Live streams by interface.",
                        ["model_name", "interface"], registry=reg)
        self.sse_streams = streams.labels(model_name, "sse")
        self.ws_streams = streams.labels(model_name, "websocket")
        disconnects = Counter("atom_stream:client_disconnects_total",
                              "Streams aborted because the client went away.",
                              ["model_name", "interface"], registry=reg)
        self.http_disconnects = disconnects.labels(model_name, "http")
        self.ws_disconnects = disconnects.labels(model_name, "websocket")
        self._children: dict[tuple[str, int], object] = {}

    def request(self, route: str, status: int) -> None:
        child = self._children.get((route, status))
        if child is None:
            child = self._children[(route, status)] = self._requests.labels(
                self.model_name, route, str(status))
        child.inc()  # type: ignore[attr-defined]

    def render(self, engine_registry: CollectorRegistry | None) -> bytes:
        out = generate_latest(self.registry)
        if engine_registry is not None:
            out = generate_latest(engine_registry) + out
        return out
