"""EngineMetrics: the Prometheus metrics the engine core keeps, in the engine's own registry.

Names (DESIGN.md; vLLM's with our prefix), every one labelled `model_name` and `engine` ("0";
DPEngine's merged registry: the replica index, as vLLM's data-parallel ranks):

- gauges `atom_stream:num_requests_running`, `atom_stream:num_requests_waiting`,
  `atom_stream:kv_cache_usage_perc` (0..1), `atom_stream:prefix_cache_hit_rate` (0..1, tokens);
- counters `atom_stream:prompt_tokens_total`, `atom_stream:generation_tokens_total`,
  `atom_stream:request_success_total{finished_reason}`, `atom_stream:num_preemptions_total`,
  `atom_stream:prefix_cache_queries_total` / `atom_stream:prefix_cache_hits_total` (tokens;
  vLLM v1's prefix_cache_queries / prefix_cache_hits);
- histograms `atom_stream:time_to_first_token_seconds`, `atom_stream:inter_token_latency_seconds`,
  `atom_stream:e2e_request_latency_seconds`;
- counters `atom_stream:triton_compiles_total` / `atom_stream:triton_compile_seconds_total`:
  Triton kernels this process (TP rank 0) compiled after GPU start-up, each on some request's
  path (engine/compile_watch.py; 0 on the CPU).

Each engine owns a `CollectorRegistry` (several engines in one process do not clash); the server
serves `prometheus_client.generate_latest(engine.metrics.registry)`. The histograms are a small
custom collector with `observe(value, count)`: at 256 running requests the inter-token latency is
observed for every token of every step, and one observation per distinct value (all decodes of a
step share their previous step's time) keeps that off the per-token path. Updates happen on the
engine loop's thread only.
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISH_REASONS = ("stop", "length", "abort", "error")


class BatchHistogram:
    """A labelled Prometheus histogram with weighted observations (a registry collector)."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...],
                 labels: dict[str, str], registry: CollectorRegistry):
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # last: +Inf
        self.sum = 0.0
        self.count = 0
        self._labels = labels
        registry.register(self)

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect_left(self.bounds, value)] += n
        self.sum += value * n
        self.count += n

    def describe(self):
        return [HistogramMetricFamily(self.name, self.documentation, labels=list(self._labels))]

    def collect(self):
        fam = HistogramMetricFamily(self.name, self.documentation, labels=list(self._labels))
        cum = 0
        buckets = []
        for le, c in zip((*map(repr, self.bounds), "+Inf"), self.counts):
            cum += c
            buckets.append((le, cum))
        fam.add_metric(list(self._labels.values()), buckets, self.sum)
        yield fam


class CompileCounters:
    """Read engine/compile_watch.stats at scrape time (a registry collector)."""

    def __init__(self, prefix: str, labels: dict[str, str], registry: CollectorRegistry):
        self.prefix = prefix
        self._labels = labels
        registry.register(self)

    def describe(self):
        return list(self._families(0, 0.0))

    def collect(self):
        from atom_stream.engine import compile_watch
        return self._families(compile_watch.stats.count, compile_watch.stats.seconds)

    def _families(self, count: int, seconds: float):
        for name, doc, value in (
                ("triton_compiles", "Triton kernels compiled after start-up.", count),
                ("triton_compile_seconds", "Seconds spent in those compiles.", seconds)):
            fam = CounterMetricFamily(self.prefix + name, doc, labels=list(self._labels))
            fam.add_metric(list(self._labels.values()), value)
            yield fam


class EngineMetrics:
    def __init__(self, model_name: str = "demo", registry: CollectorRegistry | None = None):
        self.model_name = model_name
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        # vLLM labels every series model_name and engine (the DP rank; "0" for one engine;
        # DPEngine relabels each replica's samples engine="i")
        lbl = ["model_name", "engine"]
        p = "atom_stream:"

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(p + name, doc, lbl, registry=reg).labels(model_name, "0")

        def counter(name: str, doc: str) -> Counter:
            return Counter(p + name, doc, lbl, registry=reg).labels(model_name, "0")

        self.num_running = gauge("num_requests_running", "Requests in the running batch.")
        self.num_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.")
        self.hit_rate = gauge("prefix_cache_hit_rate", "Prefix-cache hit rate over prompt tokens.")
        self.prompt_tokens = counter("prompt_tokens_total", "Prefilled prompt tokens.")
        self.generation_tokens = counter("generation_tokens_total", "Generated tokens.")
        self.preemptions = counter("num_preemptions_total", "Preemptions by recompute.")
        # vLLM v1's prefix_cache_queries / prefix_cache_hits (tokens): a rate over any window
        self.prefix_queries = counter("prefix_cache_queries_total",
                                      "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("prefix_cache_hits_total",
                                   "Prompt tokens served from the prefix cache.")
        self._seen_queries = self._seen_hits = 0
        success = Counter(p + "request_success_total", "Finished requests by finish reason.",
                          ["model_name", "engine", "finished_reason"], registry=reg)
        self._success = {r: success.labels(model_name, "0", r) for r in FINISH_REASONS}
        labels = {"model_name": model_name, "engine": "0"}
        self.ttft = BatchHistogram(p + "time_to_first_token_seconds",
                                   "Time to first token in seconds.", TTFT_BUCKETS, labels, reg)
        self.itl = BatchHistogram(p + "inter_token_latency_seconds",
                                  "Inter-token latency in seconds.", ITL_BUCKETS, labels, reg)
        self.e2e = BatchHistogram(p + "e2e_request_latency_seconds",
                                  "End-to-end request latency in seconds.", E2E_BUCKETS, labels,
                                  reg)
        self.compiles = CompileCounters(p, labels, reg)
        # plain totals for stats() (reading Prometheus children back is not a public API)
        self.total_prompt_tokens = 0
        self.total_generation_tokens = 0
        self.total_preemptions = 0
        self.finished: dict[str, int] = dict.fromkeys(FINISH_REASONS, 0)

    def record_step(self, *, num_running: int, num_waiting: int, kv_usage: float,
                    hit_rate: float, prompt_tokens: int, generation_tokens: int,
                    preemptions: int, prefix_queries: int = 0, prefix_hits: int = 0) -> None:
        """prefix_queries / prefix_hits: the block manager's running totals (the counters
        advance by the difference)."""
        self.num_running.set(num_running)
        if prefix_queries > self._seen_queries:
            self.prefix_queries.inc(prefix_queries - self._seen_queries)
            self._seen_queries = prefix_queries
        if prefix_hits > self._seen_hits:
            self.prefix_hits.inc(prefix_hits - self._seen_hits)
            self._seen_hits = prefix_hits
        self.num_waiting.set(num_waiting)
        self.kv_usage.set(kv_usage)
        self.hit_rate.set(hit_rate)
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens)
            self.total_prompt_tokens += prompt_tokens
        if generation_tokens:
            self.generation_tokens.inc(generation_tokens)
            self.total_generation_tokens += generation_tokens
        if preemptions:
            self.preemptions.inc(preemptions)
            self.total_preemptions += preemptions

    def request_finished(self, reason: str, e2e_seconds: float) -> None:
        """Count a finished request; only completed ones ("stop"/"length") enter the e2e
        latency histogram (an abort's or a failure's duration says nothing about serving)."""
        self._success[reason].inc()
        self.finished[reason] += 1
        if reason in ("stop", "length"):
            self.e2e.observe(e2e_seconds)
