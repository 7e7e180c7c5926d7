"""Data parallelism (`-dp N`, `data_parallel_size`): N engine replicas behind one server.

    engine = make_async_engine(config)    # AsyncEngine for dp=1, DPEngine for dp>1
    async with engine:
        async for out in engine.generate("Hello", SamplingParams(max_tokens=32)): ...

`DPEngine` has AsyncEngine's public surface (generate/abort/tokenize_prompt/stats/metrics/
tokenizer/model_config/max_model_len/is_dead/start/shutdown, async context manager) and wraps one
AsyncEngine per replica, all on the caller's event loop: each replica has its own engine loop
task, step thread, scheduler, KV pool and model copy. There is no IPC hop: requests go straight
to a replica's AsyncEngine.

Placement: replica i gets device `cuda:{b + i*tp}` (b: the index in `device="cuda:b"`, else 0),
and with tensor_parallel_size > 1 its TP ranks use GPUs [b + i*tp, b + (i+1)*tp)
(engine/distributed.py; each replica's TP group is a private process group, because this
process hosts rank 0 of every replica). On the CPU every replica uses the CPU.

Balancing: a new request goes to the live replica with the fewest outstanding requests (admitted
and not yet finished, counted here); ties go round robin. `generate(..., data_parallel_rank=i)`
(vLLM's keyword) puts a request on replica i instead. A replica that refuses a request it was
given as full (EngineOverloadedError: its own count can lag ours, e.g. an abort it has not applied
yet) hands it, once, to the least loaded other replica with room; only when none has room is the
refusal (503) the caller's. Request ids are unique across replicas.
Sampling: replica i draws unseeded requests' noise from a generator seeded `seed + i`
(replica 0: `seed`, a single engine's draws). One seed for all would make replicas draw the same
noise in lock step, so concurrent sampled requests on two replicas (an `n=2` request's choices)
would come out identical. Requests with their own `seed` are unaffected (their own generators:
the same tokens on any replica), and so are the model weights (dummy weights included).
Health: `is_dead` is true as soon as any replica is dead (its requests fail with an error; new
requests go to the live replicas until the server is restarted, as for a dead TP rank).

Metrics: `metrics.registry` exposes every replica's atom_stream:* series with an extra label
`engine="i"` (vLLM's DP convention); `stats()` sums the replicas and lists each in "replicas".
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from atom_stream.config import ConfigError, EngineConfig
from atom_stream.engine.async_engine import AsyncEngine, hold_places
from atom_stream.engine.engine_setup import requested_n
from atom_stream.engine.outputs import RequestOutput
from atom_stream.engine.prompts import Prompt
from atom_stream.errors import EngineDeadError, EngineOverloadedError, InvalidRequestError
from atom_stream.sampling_params import SamplingParams

# stats() keys summed over the replicas (the others are derived or taken from replica 0)
_SUMMED = ("num_running", "num_waiting", "prefix_cache_queries", "prefix_cache_hits",
           "used_blocks", "cached_blocks", "total_blocks", "num_preemptions", "prompt_tokens",
           "generation_tokens", "num_streams")


def make_async_engine(config: EngineConfig | None = None, **engine_kwargs: Any):
    """The in-process engine for `config`: AsyncEngine when data_parallel_size is 1, else a
    DPEngine over data_parallel_size replicas."""
    if config is None:
        config = EngineConfig.from_kwargs(**engine_kwargs)
    elif engine_kwargs:
        raise TypeError("pass either an EngineConfig or engine keyword arguments")
    if config.data_parallel_size == 1:
        return AsyncEngine(config)
    return DPEngine(config)


def replica_configs(config: EngineConfig) -> list[EngineConfig]:
    """One EngineConfig per replica: the same settings on that replica's device(s)."""
    dp, tp = config.data_parallel_size, config.tensor_parallel_size
    dev = config.device
    if dev == "auto" or dev.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            base = int(dev.partition(":")[2] or 0)
            need = base + dp * tp
            if need > torch.cuda.device_count():
                raise ConfigError(
                    f"data_parallel_size: {dp} replicas x tensor_parallel_size {tp} from GPU "
                    f"{base} need {need} GPUs, {torch.cuda.device_count()} visible")
            return [dataclasses.replace(config, device=f"cuda:{base + i * tp}")
                    for i in range(dp)]
        if dev != "auto":
            raise ConfigError(f"device: {dev!r} requested but no CUDA/ROCm GPU is available")
    return [dataclasses.replace(config, device="cpu" if dev == "auto" else dev)
            for _ in range(dp)]


def _seed_replica_sampler(replica: AsyncEngine, index: int) -> None:
    """Give replica `index` > 0 a sampler seeded `config.seed + index` (module docstring,
    "Sampling"; Megatron-LM's per-DP-rank rule). Rank 0's ModelRunner samples (a TPExecutor
    holds it as `.runner`); its sampler is created lazily, so setting it before the first
    request replaces nothing drawn yet. A runner without a sampler (test doubles) is left as
    it is."""
    if index == 0:  # config.seed is an int here (a null seed is drawn once, in EngineConfig)
        return
    runner = replica.core.runner
    runner = getattr(runner, "runner", runner)
    if hasattr(runner, "sampler"):
        from atom_stream.layers.sampler import Sampler

        runner.sampler = Sampler(seed=replica.config.seed + index)


# process-wide counts (engine/compile_watch.stats) every replica's registry reports alike:
# merged from replica 0 only, or a sum over engine="i" would count each compile N times
_PROCESS_WIDE = ("atom_stream:triton_compile",)


class _MergedCollector:
    """Every replica registry's families, each sample labelled engine="i" (process-wide
    families: replica 0's only)."""

    def __init__(self, registries: list[CollectorRegistry]):
        self.registries = registries

    def describe(self):
        return []  # names are only known once replicas exist; skip the registry's dup check

    def collect(self):
        merged: dict[str, Metric] = {}
        for i, reg in enumerate(self.registries):
            for fam in reg.collect():
                if i and fam.name.startswith(_PROCESS_WIDE):
                    continue
                out = merged.get(fam.name)
                if out is None:
                    out = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type,
                                                    fam.unit)
                for s in fam.samples:
                    out.add_sample(s.name, {**s.labels, "engine": str(i)}, s.value,
                                   s.timestamp, s.exemplar)
        yield from merged.values()


class DPMetrics:
    """`registry`: the replicas' metrics merged (label engine="i"); `replicas`: their
    EngineMetrics."""

    def __init__(self, replicas: list[Any]):
        self.replicas = replicas
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_MergedCollector([m.registry for m in replicas]))


class DPEngine:
    """`config.data_parallel_size` AsyncEngine replicas behind AsyncEngine's interface."""

    def __init__(self, config: EngineConfig | None = None, **engine_kwargs: Any):
        if config is None:
            config = EngineConfig.from_kwargs(**engine_kwargs)
        elif engine_kwargs:
            raise TypeError("pass either an EngineConfig or engine keyword arguments")
        self.config = config
        self.replicas = [AsyncEngine(c) for c in replica_configs(config)]
        self.outstanding = [0] * len(self.replicas)  # places held per replica (n per request)
        self._owner: dict[str, int] = {}  # live request id -> replica index
        self._places: dict[str, int] = {}  # live request id -> places it holds (its n)
        self._next = 0  # round-robin start among the least loaded
        self._reserved = 0  # places held by front ends tokenizing before generate (reserve)
        self._metrics: DPMetrics | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> DPEngine:
        """Start every replica (model loads run concurrently, each on its own step thread)."""
        results = await asyncio.gather(*(r.start() for r in self.replicas),
                                       return_exceptions=True)
        errors = [e for e in results if isinstance(e, BaseException)]
        if errors:
            await asyncio.gather(*(r.shutdown() for r in self.replicas),
                                 return_exceptions=True)
            raise errors[0]
        for i, replica in enumerate(self.replicas):
            _seed_replica_sampler(replica, i)
        return self

    async def __aenter__(self) -> DPEngine:  # noqa: PYI034
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    async def shutdown(self, drain: bool = False, timeout: float | None = None) -> None:
        """Shut every replica down (concurrently; `drain`/`timeout` as AsyncEngine.shutdown)."""
        results = await asyncio.gather(
            *(r.shutdown(drain=drain, timeout=timeout) for r in self.replicas),
            return_exceptions=True)  # one replica's failure must not leave the others running
        errors = [e for e in results if isinstance(e, BaseException)]
        if errors:
            raise errors[0]

    # ------------------------------------------------------------------ properties
    @property
    def tokenizer(self) -> Any:
        return self.replicas[0].tokenizer

    @property
    def model_config(self) -> Any:
        return self.replicas[0].model_config

    @property
    def max_model_len(self) -> int:
        return min(r.max_model_len for r in self.replicas)

    @property
    def max_live_requests(self) -> int:
        return sum(r.max_live_requests for r in self.replicas)

    @property
    def metrics(self) -> DPMetrics:
        if self._metrics is None:
            self._metrics = DPMetrics([r.metrics for r in self.replicas])
        return self._metrics

    @property
    def is_dead(self) -> bool:
        return any(r.is_dead for r in self.replicas)

    @property
    def errored(self) -> bool:
        """vLLM's AsyncLLM.errored: a replica errored (AsyncEngine.errored)."""
        return any(r.errored for r in self.replicas)

    @property
    def is_running(self) -> bool:
        return all(r.is_running for r in self.replicas)

    async def check_health(self) -> None:
        """vLLM's AsyncLLM.check_health: each replica's (EngineDeadError when one errored)."""
        for r in self.replicas:
            await r.check_health()

    async def get_tokenizer(self) -> Any:
        return self.tokenizer

    async def get_model_config(self) -> Any:
        return self.model_config

    def stats(self) -> dict[str, Any]:
        per = [r.stats() for r in self.replicas]
        s: dict[str, Any] = {k: sum(p[k] for p in per) for k in _SUMMED if k in per[0]}
        s["kv_usage"] = s["used_blocks"] / s["total_blocks"] if s.get("total_blocks") else 0.0
        q = s.get("prefix_cache_queries", 0)
        s["prefix_cache_hit_rate"] = s.get("prefix_cache_hits", 0) / q if q else 0.0
        s["finished"] = {}
        for p in per:
            for reason, n in p.get("finished", {}).items():
                s["finished"][reason] = s["finished"].get(reason, 0) + n
        s["max_model_len"] = self.max_model_len
        s["is_dead"] = self.is_dead
        s["outstanding"] = list(self.outstanding)
        s["replicas"] = per
        return s

    # ------------------------------------------------------------------ requests
    def _pick(self) -> int:
        """The live replica with the fewest outstanding requests; ties round robin."""
        n = len(self.replicas)
        best = None
        for j in range(n):
            i = (self._next + j) % n
            if self.replicas[i].is_dead:
                continue
            if best is None or self.outstanding[i] < self.outstanding[best]:
                best = i
        if best is None:
            raise EngineDeadError("every data-parallel replica is dead")
        self._next = (best + 1) % n
        return best

    def check_room(self, n: int = 1) -> None:
        """AsyncEngine.check_room over the replicas: EngineDeadError when no replica is alive,
        EngineOverloadedError (503) when the outstanding
        requests plus the places held by front ends' tokenizing leave fewer than `n` places
        below max_live_requests (the replicas' sum)."""
        if all(r.is_dead for r in self.replicas):
            raise EngineDeadError("every data-parallel replica is dead")
        if sum(self.outstanding) + self._reserved + n > self.max_live_requests:
            raise EngineOverloadedError(f"the waiting queues are full ({self.max_live_requests} "
                                        f"requests over {len(self.replicas)} replicas); retry "
                                        f"later")

    def _rank(self, rank: Any) -> int:
        """A caller's data_parallel_rank, checked as vLLM checks it (its own replica's
        errors, a dead one's included, come from that replica's generate)."""
        n = len(self.replicas)
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < n:
            raise InvalidRequestError(f"data_parallel_rank {rank!r} is out of range [0, {n})",
                                      "data_parallel_rank")
        return rank

    def reserve(self, n: int = 1) -> contextlib.AbstractContextManager[None]:
        """AsyncEngine.reserve over the replicas: check_room(n) before any tokenizing, then
        the n places are held while the block runs."""
        return hold_places(self, n)

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       request_id: str | None = None, *,
                       chat_template_kwargs: dict | None = None,
                       strict_max_tokens: bool = False,
                       add_special_tokens: bool = True,
                       data_parallel_rank: int | None = None, **chat_options: Any
                       ) -> AsyncIterator[RequestOutput]:
        """AsyncEngine.generate on the least loaded replica (same deltas, errors, abort);
        `data_parallel_rank`: vLLM's AsyncLLM.generate keyword, run on that replica instead
        (in [0, data_parallel_size), else InvalidRequestError; never moved when that replica
        is full); `chat_options`: AsyncEngine.generate's other keywords
        (add_generation_prompt, continue_final_message), passed on. A full replica's
        refusal moves the request once (module docstring, "Balancing")."""
        if request_id is None:
            request_id = uuid.uuid4().hex
        elif not isinstance(request_id, str):  # AsyncEngine's answer (a list is unhashable)
            raise InvalidRequestError(f"request_id: must be a string, got "
                                      f"{type(request_id).__name__}", "request_id")
        elif request_id in self._owner:
            raise InvalidRequestError(f"request id {request_id!r} is already live", "request_id")
        i = self._pick() if data_parallel_rank is None else self._rank(data_parallel_rank)
        kwargs = dict(chat_template_kwargs=chat_template_kwargs,
                      strict_max_tokens=strict_max_tokens,
                      add_special_tokens=add_special_tokens, **chat_options)
        places = requested_n(params)  # an n > 1 request holds n places on its replica
        self._place(request_id, i, places)
        stream = self.replicas[i].generate(prompt, params, request_id, **kwargs)
        try:
            try:
                first = await stream.__anext__()
            except EngineOverloadedError:
                # the chosen replica is full (e.g. an abort it has not applied yet still
                # counts there): once, the least loaded other replica with room takes it
                j = None if data_parallel_rank is not None else self._other_with_room(i)
                if j is None:
                    raise
                self._unplace(request_id, i)
                i = j
                self._place(request_id, i, places)
                stream = self.replicas[j].generate(prompt, params, request_id, **kwargs)
                first = await stream.__anext__()
            yield first
            async for out in stream:
                yield out
        finally:
            await stream.aclose()  # a closed/cancelled consumer aborts the request at once
            self._unplace(request_id, i)

    def _place(self, request_id: str, i: int, places: int = 1) -> None:
        """Count live request `request_id` on replica `i`, as `places` requests (an n > 1
        request holds n places there: its n child requests)."""
        self._owner[request_id] = i
        self._places[request_id] = places
        self.outstanding[i] += places

    def _unplace(self, request_id: str, i: int) -> None:
        """Undo `_place(request_id, i, ...)`."""
        self.outstanding[i] -= self._places.pop(request_id)
        del self._owner[request_id]

    def _other_with_room(self, refused: int) -> int | None:
        """The live replica other than `refused` with the fewest outstanding requests (ties:
        round robin, as `_pick`) whose own check_room admits one more request; None when no
        other replica has room."""
        n = len(self.replicas)
        best = None
        for j in range(n):
            k = (self._next + j) % n
            if k == refused or self.replicas[k].is_dead:
                continue
            if best is not None and self.outstanding[k] >= self.outstanding[best]:
                continue
            try:
                self.replicas[k].check_room()
            except (EngineOverloadedError, EngineDeadError):
                continue
            best = k
        return best

    async def abort(self, request_id: str | Iterable[str], internal: bool = False) -> None:
        """Abort a live request, or each of an iterable of ids (AsyncEngine.abort); each
        stream ends with a finish_reason "abort" delta. Unknown ids are ignored. `internal`:
        vLLM's keyword, no effect here."""
        for rid in (request_id,) if isinstance(request_id, str) else tuple(request_id):
            i = self._owner.get(rid)
            if i is not None:
                await self.replicas[i].abort(rid)

    async def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        """AsyncEngine.reset_prefix_cache on every live replica (EngineDeadError when none is)."""
        live = [r for r in self.replicas if not r.is_dead]
        if not live:
            raise EngineDeadError("every data-parallel replica is dead")
        return all([await r.reset_prefix_cache(reset_running_requests) for r in live])

    async def abort_all(self) -> int:
        """AsyncEngine.abort_all on every replica; returns how many requests were aborted."""
        return sum(await asyncio.gather(*(r.abort_all() for r in self.replicas)))

    async def tokenize_prompt(self, prompt: Prompt, chat_template_kwargs: dict | None = None,
                              *, add_special_tokens: bool = True, **chat_options: Any
                              ) -> list[int]:
        """AsyncEngine.tokenize_prompt of replica 0 (every replica has the same tokenizer, as
        `tokenizer`): the token ids generate() would run for `prompt` on any replica."""
        return await self.replicas[0].tokenize_prompt(prompt, chat_template_kwargs,
                                                      add_special_tokens=add_special_tokens,
                                                      **chat_options)
