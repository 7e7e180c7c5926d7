"""AsyncEngine: the engine loop task on the running (uv)loop, and per-request delta streams.

    async with AsyncEngine(EngineConfig(...)) as engine:
        async for out in engine.generate("Hello", SamplingParams(max_tokens=32)):
            print(out.text, end="")

Process model (DESIGN.md): one asyncio task drives the synchronous core (`LLMEngine`). Each
iteration: apply deferred aborts -> `schedule()` on the loop thread -> `runner.execute(batch)` in
a dedicated ONE-thread executor (the loop stays free for I/O, new requests and aborts while the
model runs) -> `postprocess()` on the loop thread -> push deltas into the request slots. All core
state is touched only on the loop thread, and never while a batch executes: an abort that arrives
mid-step is applied as soon as the step returns (blocks freed then; no new step reads them).

With async scheduling (`core.async_scheduling`, engine/pipeline.py) an iteration is: [drain] ->
schedule N+1 -> `runner.launch(N+1, prev=N)` in the executor (returns once the device work is
enqueued) -> commit N+1 -> `runner.collect(N)` in the executor (waits for N's CUDA event, off the
loop) -> postprocess N on the loop while the device runs N+1 -> deliver. Aborts are deferred only
while `launch` runs (it reads the sequences); `collect` reads only its handle.

Streams: each request has one output slot holding at most one RequestOutput; when the consumer
lags, later deltas MERGE into it (vLLM's RequestOutputCollector), so memory is bounded and the
engine never waits for a reader. Breaking out of `async for` (the generator is closed), cancelling
the consuming task, or `await engine.abort(id)` aborts the request and frees its blocks.

Errors: InvalidRequestError / PromptTooLongError / EngineOverloadedError are raised by the first
`__anext__` (before anything is yielded), and a refused request leaves nothing registered (no
slot, no core request, no KV block). Checked in this order: engine alive, the id (a string, not
live), the params (`LLMEngine.check_params`; vLLM's process_inputs validates them before it
tokenizes), room (the live requests plus those being tokenized below max_num_seqs +
max_waiting_requests: a flood past the bound is refused before any tokenizing), the prompt's
tokenization, too long (before the per-id look), the core's prompt checks, the queue bound.
A request's id and stream are released when its final delta is handed to the consumer (not
when the consumer next resumes the generator). A failed model step raises GenerationError from
the affected requests' iterators only; if the loop itself dies, every stream raises
EngineDeadError and `is_dead` turns true. Prompts are tokenized by engine/prompts.py
(`tokenize_prompt`, also `AsyncEngine.tokenize_prompt`): long text prompts and every chat prompt
off the loop; vLLM's {"prompt_token_ids": ...} / {"prompt": ...} dicts are taken too (their
`cache_salt` salts the request; non-empty multi-modal keys are refused).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any

import msgspec

from atom_stream.config import EngineConfig
from atom_stream.engine.engine_loop import EngineLoop
from atom_stream.engine.engine_setup import (
    checkpoint_lacks_tokenizer,
    coerce_params,
    requested_n,
    warn_no_tokenizer,
)
from atom_stream.engine.llm_engine import LLMEngine
from atom_stream.engine.output_slots import OutputShaper, OutputSlot, hold_places
from atom_stream.engine.outputs import RequestOutput, Usage
from atom_stream.engine.parallel_sampling import ParentRequests, fan_out
from atom_stream.engine.prompts import Prompt, prompt_text, tokenize_prompt, with_cache_salt
from atom_stream.errors import (
    EngineDeadError,
    EngineOverloadedError,
    GenerationError,
    InvalidRequestError,
    PromptTooLongError,
    priority_error,
    refuse_lora,
)
from atom_stream.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)


def _with_prompt_salt(params: Any, prompt: Any) -> Any:
    """`params` with a vLLM dict prompt's `cache_salt` (vLLM's TextPrompt / TokensPrompt key:
    the prompt's prefix-cache blocks are shared only with the same salt); unchanged otherwise.
    Set before check_params (a struct's copy is re-validated, and its bad words re-tokenized
    there)."""
    salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
    if salt is None:
        return params
    return with_cache_salt(params if isinstance(params, dict) else coerce_params(params), salt)


def _structured(params: Any) -> bool:
    """Whether `params` (a SamplingParams, a dict or None) ask for structured outputs, whose
    compile runs off the loop (a large schema or vocabulary takes 10-600 ms)."""
    get = params.get if isinstance(params, dict) else functools.partial(getattr, params)
    return params is not None and any(
        get(k, None) is not None for k in ("structured_outputs", "guided_decoding"))


class AsyncEngine(EngineLoop):
    """`config` or engine keyword arguments; `runner`/`tokenizer` inject test doubles."""

    def __init__(self, config: EngineConfig | None = None, *, runner: Any = None,
                 tokenizer: Any = None, skip_tokenizer_init: bool = False, **engine_kwargs: Any):
        if config is None:
            config = EngineConfig.from_kwargs(**engine_kwargs)
        elif engine_kwargs:
            raise TypeError("pass either an EngineConfig or engine keyword arguments")
        self.config = config
        if tokenizer is None and not skip_tokenizer_init and checkpoint_lacks_tokenizer(config):
            warn_no_tokenizer(config)
            skip_tokenizer_init = True
        self._core_args = {"runner": runner, "tokenizer": tokenizer,
                           "skip_tokenizer_init": skip_tokenizer_init}
        self._core: LLMEngine | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="atom-stream-step")
        self._slots: dict[str, OutputSlot] = {}
        # request id -> aborted while its prompt was being tokenized (not yet in the core)
        self._tokenizing: dict[str, bool] = {}
        self._reserved = 0  # places held by front ends tokenizing before generate (reserve)
        self._parents = ParentRequests()  # n > 1 requests (engine/parallel_sampling.py)
        self._pending_aborts: list[str] = []
        # set once the deferred aborts are applied (an `await abort()` made mid-step waits)
        self._aborts_applied: asyncio.Future | None = None
        self._in_step = False
        self._task: asyncio.Task | None = None
        self._wakeup: asyncio.Event | None = None
        self._stopping = False
        self._closed = False
        self._dead: BaseException | None = None
        self._idle: asyncio.Event | None = None

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def from_engine_args(cls, engine_args: EngineConfig | None = None,
                         start_engine_loop: bool = True, usage_context: Any = None,
                         stat_loggers: Any = None, enable_log_requests: bool = False,
                         disable_log_stats: bool = False, **kwargs: Any) -> AsyncEngine:
        """vLLM's AsyncLLM.from_engine_args: an engine whose model is loaded when this returns
        (it blocks, as vLLM's); its loop starts with the first generate() (or `await start()`).
        Stop it with `await engine.shutdown()`, or use it in `async with`. vLLM's other
        keywords (start_engine_loop, usage_context, stat_loggers, enable_log_requests,
        disable_log_stats) are taken and change nothing (stats() and /metrics report)."""
        engine = cls(engine_args, **kwargs)
        engine._core = engine._executor.submit(engine._new_core).result()
        return engine

    def _new_core(self) -> LLMEngine:
        return LLMEngine(self.config, **self._core_args)

    async def start(self) -> AsyncEngine:
        if self._task is not None:
            return self
        if self._closed:
            raise EngineDeadError("the engine is shut down")
        loop = asyncio.get_running_loop()
        # The step thread runs Python model code between torch ops and holds the GIL meanwhile;
        # a 1 ms switch interval (CPython's default is 5 ms) lets the loop thread in sooner,
        # which keeps streaming latency low while a long prefill runs.
        if sys.getswitchinterval() > 0.001:
            sys.setswitchinterval(0.001)
        if self._core is None:  # from_engine_args loaded it already
            # model loading blocks: do it on the step thread (torch state then lives there too)
            self._core = await loop.run_in_executor(self._executor, self._new_core)
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task = loop.create_task(self._run(), name="atom-stream-engine-loop")
        return self

    async def __aenter__(self) -> AsyncEngine:  # noqa: PYI034
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    async def shutdown(self, drain: bool = False, timeout: float | None = None) -> None:
        """Stop: `drain` lets in-flight requests finish (up to `timeout` s), the rest are
        aborted; then the loop task ends after its current step and the runner shuts down."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        if self._task is not None:
            if drain and self._dead is None:
                try:
                    await asyncio.wait_for(self._idle.wait(), timeout)
                except TimeoutError:
                    pass
            self._stopping = True
            self._wakeup.set()
            with contextlib.suppress(BaseException):  # its failure was already reported
                await self._task
            for out in self._core.abort_all():
                self._deliver(out)
            for slot in self._slots.values():
                slot.fail(EngineDeadError("the engine was shut down"))
            if self._core.is_dead:
                # the runner's own thread may still be stuck in a hung step (a TP collective):
                # shut the runner down beside it, bounded, and do not wait for that thread
                await self._shutdown_dead_runner(loop)
                self._executor.shutdown(wait=False, cancel_futures=True)
                return
            await self._shutdown_runner(loop)
        elif self._core is not None:  # loaded by from_engine_args, never started
            await self._shutdown_runner(loop)
        await loop.run_in_executor(None, functools.partial(self._executor.shutdown, wait=True))

    async def _shutdown_runner(self, loop) -> None:
        """runner.shutdown on the step thread (TP workers, shared memory); failures logged."""
        try:
            await loop.run_in_executor(self._executor, self._core.runner.shutdown)
        except Exception:
            logger.exception("runner shutdown failed")

    async def _shutdown_dead_runner(self, loop, timeout: float = 30.0) -> None:
        """runner.shutdown on a daemon thread (it kills the workers, which also fails a
        collective stuck in the executor's thread with gloo), waited for at most `timeout` s."""
        done = asyncio.Event()

        def run() -> None:
            try:
                self._core.runner.shutdown()
            except Exception:  # reported; the engine is dead anyway
                logger.exception("runner shutdown failed")
            finally:
                with contextlib.suppress(RuntimeError):  # the loop closed after a timeout
                    loop.call_soon_threadsafe(done.set)

        threading.Thread(target=run, name="atom-stream-runner-shutdown", daemon=True).start()
        try:
            await asyncio.wait_for(done.wait(), timeout)
        except TimeoutError:
            logger.error("runner shutdown still blocked after %.0f s; giving up on it", timeout)

    # ------------------------------------------------------------------ properties
    @property
    def core(self) -> LLMEngine:
        if self._core is None:
            raise EngineDeadError("the engine is not started; use `async with AsyncEngine(...)`")
        return self._core

    @property
    def tokenizer(self) -> Any:
        return self.core.tokenizer

    @property
    def model_config(self) -> Any:
        return self.core.model_config

    @property
    def metrics(self) -> Any:
        return self.core.metrics

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def max_live_requests(self) -> int:
        """The most requests it can hold at once (running slots + the waiting queue's bound)."""
        return self.config.max_num_seqs + self.config.max_waiting_requests

    @property
    def is_dead(self) -> bool:
        return self._dead is not None or (self._core is not None and self._core.is_dead)

    def stats(self) -> dict[str, Any]:
        s = self.core.stats()
        s["is_dead"] = self.is_dead
        s["num_streams"] = len(self._slots)
        return s

    # ------------------------------------------------------------------ requests
    @property
    def is_running(self) -> bool:
        """vLLM's AsyncLLM.is_running: the model is loaded and the engine is not `errored`
        (true from from_engine_args on, as vLLM's before its loop starts)."""
        return self._core is not None and not self.errored

    @property
    def errored(self) -> bool:
        """vLLM's AsyncLLM.errored: dead, shut down (or shutting down), or its loop ended."""
        return (self.is_dead or self._closed
                or (self._task is not None and self._task.done()))

    @property
    def is_stopped(self) -> bool:
        """vLLM's AsyncLLM.is_stopped: `errored`."""
        return self.errored

    @property
    def dead_error(self) -> BaseException:
        """vLLM's AsyncLLM.dead_error: what check_health raises."""
        if self.is_dead:
            return EngineDeadError(f"the engine is dead: {self._dead or self._core.runner.dead}")
        return EngineDeadError("the engine is shut down")

    async def check_health(self) -> None:
        """vLLM's AsyncLLM.check_health: raises `dead_error` (EngineDeadError) when `errored`
        (dead or shut down)."""
        if self.errored:
            raise self.dead_error

    async def get_tokenizer(self) -> Any:
        """vLLM's AsyncLLM.get_tokenizer (None with skip_tokenizer_init)."""
        return self.core.tokenizer

    async def get_model_config(self) -> Any:
        return self.core.model_config

    def _check_alive(self) -> LLMEngine:
        core = self.core
        if self.is_dead:
            raise EngineDeadError(f"the engine is dead: {self._dead or core.runner.dead}")
        if self._closed:
            raise EngineDeadError("the engine is shutting down")
        return core

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       request_id: str | None = None, *,
                       sampling_params: SamplingParams | None = None,
                       priority: int = 0,
                       lora_request: Any = None,
                       data_parallel_rank: int | None = None,
                       chat_template_kwargs: dict | None = None,
                       strict_max_tokens: bool = False,
                       add_special_tokens: bool = True,
                       add_generation_prompt: bool = True,
                       continue_final_message: bool = False) -> AsyncIterator[RequestOutput]:
        """Yield RequestOutput deltas until the final one (finish_reason set); with
        `params.output_kind` CUMULATIVE each output holds everything so far instead, with
        FINAL_ONLY only the whole final output comes (vLLM's RequestOutputKind).
        `sampling_params`: vLLM's name for `params` (AsyncLLM.generate's keyword); pass one.
        `priority`: vLLM's; only 0 (FCFS scheduling), anything else is an InvalidRequestError.
        `lora_request`: vLLM's; only None (no LoRA adapters are served), as LLM.generate.
        `data_parallel_rank`: vLLM's; one engine is replica 0 (None or 0; DPEngine places).
        `strict_max_tokens`: refuse (MaxTokensTooLargeError) a max_tokens that does not fit
        the context left after the prompt instead of capping it (the OpenAI server's rule).
        `add_special_tokens`: a text prompt gets the tokenizer's own prefix (an HF DeepSeek
        tokenizer's BOS; nothing for Kimi), as vLLM's completions by default; for messages it is
        ignored (vLLM's chat default: the template holds the specials).
        `add_generation_prompt` / `continue_final_message` (messages only): vLLM's chat options;
        keys of the same names in `chat_template_kwargs` override them, as in vLLM."""
        core = self._check_alive()
        if priority != 0:
            raise InvalidRequestError(priority_error(priority), "priority")
        refuse_lora(lora_request)
        if data_parallel_rank not in (None, 0):
            raise InvalidRequestError(f"data_parallel_rank {data_parallel_rank!r} is out of "
                                      "range [0, 1)", "data_parallel_rank")
        if sampling_params is not None:
            if params is not None:
                raise InvalidRequestError("pass params or sampling_params, not both",
                                          "sampling_params")
            params = sampling_params
        if self._task is None:  # loaded by from_engine_args: the loop starts now
            await self.start()
        if request_id is None:
            request_id = uuid.uuid4().hex
        elif not isinstance(request_id, str):  # vLLM's add_request: a TypeError
            raise InvalidRequestError(f"request_id: must be a string, got "
                                      f"{type(request_id).__name__}", "request_id")
        elif request_id in self._slots or request_id in self._parents.kids:
            raise InvalidRequestError(f"request id {request_id!r} is already live", "request_id")
        # vLLM's order (process_inputs): the params first, so a bad request costs no tokenizing
        params = _with_prompt_salt(params, prompt)
        n = requested_n(params)  # n > 1: checked as its children (n = 1) are, then fanned out
        if n > 1:
            params = msgspec.structs.replace(coerce_params(params), n=1)
        if request_id in self._tokenizing:
            raise InvalidRequestError(f"request id {request_id!r} is already live", "request_id")
        aborted_early = False
        if _structured(params):  # a grammar compile (the first: the vocabulary's index too)
            self._tokenizing[request_id] = False  # off the loop: abort() meanwhile marks it
            try:
                params = await asyncio.get_running_loop().run_in_executor(
                    None, core.check_params, params)
            finally:
                aborted_early = self._tokenizing.pop(request_id, False)
        else:
            params = core.check_params(params)
        if request_id in self._tokenizing:
            raise InvalidRequestError(f"request id {request_id!r} is already live", "request_id")
        self.check_room(n)
        self._tokenizing[request_id] = aborted_early
        try:
            ids = await self.tokenize_prompt(prompt, chat_template_kwargs,
                                             add_special_tokens=add_special_tokens,
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message)
        finally:
            aborted = self._tokenizing.pop(request_id, False)
        ids = params.truncate_prompt(ids, core.max_model_len)  # the prompt that runs (or not)
        # a child whose parent was aborted before the child started never starts either
        aborted = aborted or self._parents.child_aborted(request_id)
        if aborted:  # abort(request_id) came while the prompt was tokenized: never started
            yield RequestOutput(request_id, finish_reason="abort", prompt_token_ids=ids,
                                usage=Usage(len(ids), 0, len(ids)))
            return
        if n > 1:  # closed here, not by the GC: a closed parent frees its children at once
            async with contextlib.aclosing(fan_out(
                    self, ids, msgspec.structs.replace(params, n=n), request_id,
                    strict_max_tokens, prompt=prompt_text(prompt))) as fanned:
                async for out in fanned:
                    yield out
            return
        core = self._check_alive()
        if request_id in self._slots:
            raise InvalidRequestError(f"request id {request_id!r} is already live", "request_id")
        if len(ids) >= core.max_model_len:
            # the core's answer too, but only after checking every id on the loop thread (a
            # 6 MB prompt: ~0.4 s of event-loop stall); too long needs no per-id look
            raise PromptTooLongError(len(ids), core.max_model_len)
        core.add_request(request_id, ids, params,  # raises for bad ids/too long/overloaded
                         strict_max_tokens=strict_max_tokens, params_checked=True)
        slot = self._slots[request_id] = OutputSlot()
        self._idle.clear()
        self._wakeup.set()
        kind = params.output_kind  # DELTA (the servers' kind): no shaper, no per-token call
        shaper = None if kind == RequestOutputKind.DELTA else OutputShaper(kind)
        done = False
        try:
            while True:
                out = slot.out
                if out is not None:  # skip the task switch when output is already there
                    slot.out = None
                else:
                    out = await slot.get()
                if out.finish_reason is not None:
                    done = True
                    # ended: the id is free and the stream gone before the consumer resumes
                    # (one holding the suspended generator must not keep either)
                    if self._slots.get(request_id) is slot:
                        del self._slots[request_id]
                    if out.finish_reason == "error":
                        raise GenerationError(out.error or "generation failed")
                if shaper is not None:
                    out = shaper.shape(out)
                if out is not None:
                    yield out
                if done:
                    return
        finally:
            if self._slots.get(request_id) is slot:
                del self._slots[request_id]
            if not done:
                self._abort(request_id)

    def check_room(self, n: int = 1) -> None:
        """Refuse (EngineOverloadedError, the queue's own answer) `n` more requests that could
        not all be admitted now: the live requests plus those still being tokenized (by
        generate, or under a front end's `reserve`) leave fewer than `n` places below
        max_num_seqs + max_waiting_requests. generate() checks this before it tokenizes, so a
        flood beyond the bound costs no tokenization and holds no token lists (DESIGN: memory
        is bounded)."""
        core = self._check_alive()
        busy = len(core.requests) + len(self._tokenizing) + self._reserved
        if busy + n > self.max_live_requests:
            raise EngineOverloadedError(f"the waiting queue is full "
                                        f"({self.config.max_waiting_requests} requests); retry "
                                        f"later")

    def reserve(self, n: int = 1) -> contextlib.AbstractContextManager[None]:
        """For a front end that tokenizes before it calls generate (the OpenAI routes):
        check_room(n), then hold those n places while the block runs, so concurrent requests
        tokenizing meanwhile count against the bound as generate's own do (a flood is refused
        before its tokenizing, not after). Leave the block before calling generate: its own
        check then counts the request itself."""
        return hold_places(self, n)

    async def abort(self, request_id: str | Iterable[str], internal: bool = False) -> None:
        """Abort a live request, or each of an iterable of ids (vLLM's AsyncLLM.abort); each
        stream ends with a finish_reason "abort" delta (also when its prompt is still being
        tokenized: it then never starts). Unknown ids are ignored. When this returns, the
        requests' KV blocks are free: an abort that lands while a step runs (applied when the
        step returns) is waited for. `internal`: vLLM's keyword, no effect here."""
        ids = (request_id,) if isinstance(request_id, str) else tuple(request_id)
        for rid in ids:
            for one in (rid, *self._parents.abort(rid)):  # an n > 1 request: every child
                if one in self._tokenizing:
                    self._tokenizing[one] = True
                else:
                    self._abort(one)
        if self._pending_aborts:
            await self._wait_aborts_applied()

    async def abort_all(self) -> int:
        """Abort every live request (each stream ends with an "abort" delta; one whose prompt
        is still being tokenized never starts); returns how many. The engine keeps serving.
        When this returns, their KV blocks are free (as abort)."""
        for rid in self._tokenizing:
            self._tokenizing[rid] = True
        self._parents.abort_all()
        ids = list(self._slots)
        for rid in ids:
            self._abort(rid)
        count = len(ids) + len(self._tokenizing)
        if self._pending_aborts:
            await self._wait_aborts_applied()
        return count

    async def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        """vLLM's AsyncLLM.reset_prefix_cache: later requests hit no prefix computed before the
        call. Running requests keep their blocks (they only stop being shared), so
        `reset_running_requests` (vLLM: preempt them first) changes nothing here."""
        return self._check_alive().reset_prefix_cache()

    def _abort(self, request_id: str) -> None:
        if self._core is None:
            return
        if self._in_step:
            self._pending_aborts.append(request_id)  # the step thread is reading block tables
            return
        out = self._core.abort(request_id)
        if out is not None:
            self._deliver(out)
        self._check_idle()

    async def tokenize_prompt(self, prompt: Prompt, chat_template_kwargs: dict | None = None,
                              *, add_special_tokens: bool = True,
                              add_generation_prompt: bool = True,
                              continue_final_message: bool = False) -> list[int]:
        """The token ids generate() would run for `prompt` (module-level tokenize_prompt with
        this engine's tokenizer; same arguments as generate's)."""
        return await tokenize_prompt(self.core.tokenizer, prompt, chat_template_kwargs,
                                     add_special_tokens=add_special_tokens,
                                     add_generation_prompt=add_generation_prompt,
                                     continue_final_message=continue_final_message)
