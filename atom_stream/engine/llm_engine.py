"""LLMEngine: the synchronous engine core (no asyncio). AsyncEngine and LLM both drive it.

One step = `schedule()` -> `execute(batch)` (the runner; blocking, the only part AsyncEngine runs
in its worker thread) -> `postprocess(batch, output)`:

- advance every scheduled sequence (`num_computed_tokens += n`), register its newly full blocks
  in the prefix cache, append the sampled token;
- stop checks, in order: EOS (unless `ignore_eos`) and `stop_token_ids` -> "stop" (only once
  `min_tokens` outputs exist; `stop_reason` None for the tokenizer's own EOS, the id for a stop
  token or another EOS id, e.g. generation_config.json's, as vLLM; the stop token stays in
  token_ids, its text is dropped unless `include_stop_str_in_output`), `max_tokens` or
  `max_model_len` -> "length";
- incremental detokenization, then text-level stop strings (held back until ruled out, trimmed
  when matched: "stop" with `stop_reason` = the string; a match must end in the text of output
  token min_tokens + 1 or later, as vLLM's `len(output_token_ids) > min_tokens`, but may begin
  earlier; not on the text of a token that stopped the request);
- one RequestOutput delta per sampled sequence (with logprobs asked for: `cumulative_logprob`,
  the running sum of the sampled-token logprobs delivered); finished sequences free their blocks
  at once.

An exception from `execute` fails exactly the sequences of that batch (finish_reason "error",
the message in `error`) and frees their blocks; later steps go on. `abort(id)` frees at once; the
caller (AsyncEngine) defers it while the runner reads the sequences (execute / launch).

Async scheduling (`async_scheduling`, engine/pipeline.py): the runner's `launch`/`collect` split
lets step N+1 be scheduled and launched before step N is postprocessed; `postprocess(...,
committed=True)` then finds N already committed and overwrites placeholders instead of appending.
`step()` stays synchronous (it drains the pipeline first); `pipeline.step()` is the pipelined one.

A request's length is capped at `max_model_len = min(config/model limit, pool capacity)`, so a
single sequence always fits the KV pool (no livelock under preemption) and a prompt that could
never fit is refused up front with PromptTooLongError.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import os
import time
from typing import Any

import msgspec

from atom_stream.config import ConfigError, EngineConfig, ModelConfig, resolve_model_path
from atom_stream.engine.block_manager import BlockManager
from atom_stream.engine.engine_setup import coerce_params, load_engine_tokenizer
from atom_stream.engine.metrics import EngineMetrics
from atom_stream.engine.outputs import RequestOutput, Usage
from atom_stream.engine.pipeline import Pipeline
from atom_stream.engine.scheduler import Scheduler
from atom_stream.engine.sequence import ScheduledBatch, Sequence, StepOutput
from atom_stream.errors import (
    InvalidRequestError,
    MaxTokensTooLargeError,
    PromptTooLongError,
)
from atom_stream.sampling_params import SamplingParams, SamplingParamsError, tokenize_bad_words
from atom_stream.structured.errors import GrammarError
from atom_stream.structured.guide import GuideState
from atom_stream.structured.params import GrammarCompiler

logger = logging.getLogger(__name__)

def _detok_classes():
    """The incremental detokenizer and stop-string checker (imported lazily)."""
    from atom_stream.detokenizer import IncrementalDetokenizer, StopStringChecker
    return IncrementalDetokenizer, StopStringChecker


class _Request:
    """Engine-side state of one live request (the Sequence plus text and logprob bookkeeping).
    `cumulative_logprob`: the running sum of the sampled-token logprobs delivered (None when
    the request asked for none)."""

    __slots__ = ("cumulative_logprob", "detok", "prompt_logprob_ranks", "prompt_logprobs",
                 "sent_first", "seq", "stop")

    def __init__(self, seq: Sequence, detok: Any, stop: Any):
        self.seq = seq
        self.detok = detok
        self.stop = stop
        self.sent_first = False
        self.prompt_logprobs: list | None = None
        self.prompt_logprob_ranks: list[int] | None = None
        self.cumulative_logprob: float | None = None if seq.params.logprobs is None else 0.0

    def first_prompt_logprobs(self) -> list | None:
        """The engine prompt logprobs the request's first output carries: None when not asked
        for; [] when asked for but no position has any (a one-token prompt: vLLM's
        prompt_logprobs is then [None])."""
        plps = self.prompt_logprobs
        if plps is None and self.seq.params.prompt_logprobs is not None:
            return []
        return plps


def _integer(x: Any) -> int | None:
    """x as a Python int when it is an integer other than a bool (numpy / torch scalars
    included), else None."""
    if isinstance(x, bool):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


class LLMEngine:
    """`runner`: anything with the ModelRunner contract (tests pass fakes); default: the real
    runner (`make_executor`). `tokenizer`: a Tokenizer, or None to load the config's one.
    `skip_tokenizer_init`: token ids in and out only (text is "", stop strings refused)."""

    def __init__(self, config: EngineConfig, *, runner: Any = None, tokenizer: Any = None,
                 skip_tokenizer_init: bool = False):
        self.config = config
        self._shut_down = False
        explicit_len = config.max_model_len is not None  # the runner may fill it in
        if runner is None:
            config.model = resolve_model_path(config.model, config.load_format)  # hub ids
            if not config.is_demo and os.path.isdir(os.path.expanduser(config.model)):
                # config.json first (cheap): an unsupported checkpoint is that one clear
                # error, not whatever its tokenizer files make the tokenizer loader say
                ModelConfig.from_pretrained(os.path.expanduser(config.model),
                                            config.hf_overrides)
        if tokenizer is None and not skip_tokenizer_init:
            # before the weights (minutes for a real checkpoint) and the TP workers: a missing
            # tokenizer is an error at once, with nothing to tear down
            tokenizer = load_engine_tokenizer(config)
        if runner is None:
            from atom_stream.engine.distributed import make_executor
            runner = make_executor(config)
        self.runner = runner
        self.model_config = runner.model_config
        limit = config.max_model_len or self.model_config.max_position_embeddings
        self.block_size = config.block_size
        capacity = runner.num_kv_blocks * config.block_size
        self.max_model_len = min(limit, capacity)
        if capacity < limit and explicit_len:  # as vLLM: a length asked for must fit
            with contextlib.suppress(Exception):
                runner.shutdown()
            raise ConfigError(
                f"max_model_len: {limit} tokens do not fit the KV cache ({runner.num_kv_blocks} "
                f"blocks of {config.block_size} = {capacity} tokens); raise "
                f"gpu_memory_utilization / num_kv_blocks or lower max_model_len")
        if capacity < limit:  # the model's own limit: serve what the pool holds
            logger.warning("max_model_len %d (the model's) lowered to %d: the KV pool (%d "
                           "blocks of %d) holds no more; raise gpu_memory_utilization / "
                           "num_kv_blocks to serve longer", limit, capacity,
                           runner.num_kv_blocks, config.block_size)
        self.tokenizer = tokenizer
        self._detok_cls, self._stop_cls = _detok_classes() if tokenizer is not None else (None,
                                                                                        None)
        eos = getattr(tokenizer, "eos_token_ids", None) or self.model_config.eos_token_id
        self.eos_token_ids: tuple[int, ...] = tuple(eos or ())
        self.block_manager = BlockManager(runner.num_kv_blocks, config.block_size,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs,
                                   config.max_num_batched_tokens, config.max_waiting_requests)
        name = config.served_model_name or config.model or "demo"
        self.metrics = EngineMetrics(name)
        self.requests: dict[str, _Request] = {}
        self._seen_preemptions = 0
        supported = bool(getattr(runner, "supports_async", False))
        want = config.async_scheduling
        if want and not supported:
            logger.warning("async_scheduling: this runner has no launch/collect split; using "
                           "the synchronous loop")
        self.async_scheduling = supported if want is None else bool(want and supported)
        self.pipeline = Pipeline(self)
        # structured outputs (construction does no work: the vocabulary's index is built at the
        # first compile); None without a tokenizer
        self._grammars = (GrammarCompiler(tokenizer, self.model_config.vocab_size)
                          if tokenizer is not None else None)

    # ------------------------------------------------------------------ requests
    @property
    def is_dead(self) -> bool:
        return bool(getattr(self.runner, "dead", None))

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or self.pipeline.inflight is not None

    def check_params(self, params: SamplingParams | dict | None) -> SamplingParams:
        """A request's prompt-independent checks (vLLM's `_validate_params`, run before the
        prompt is looked at): coerced and valid, n == 1, stop / bad_words only with a
        tokenizer, token-id fields in the vocabulary. Returns the params to run (bad words
        tokenized, on a copy); raises InvalidRequestError naming the field."""
        params = coerce_params(params)
        if params.n != 1:
            raise InvalidRequestError("n: the engine core generates one choice per request; "
                                      "use LLM.generate (it fans n > 1 out) or submit n "
                                      "requests (SamplingParams.child(i))", "n")
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop: stop strings need a tokenizer", "stop")
        if params.stop and not params.detokenize:  # vLLM's SamplingParams check
            raise InvalidRequestError("stop strings are only supported when detokenize is True",
                                      "stop")
        vocab = self.model_config.vocab_size
        for name, toks in (("logit_bias", params.logit_bias or ()),
                           ("allowed_token_ids", params.allowed_token_ids or ()),
                           ("stop_token_ids", params.stop_token_ids or ())):
            bad = next((t for t in toks if t >= vocab), None)
            if bad is not None:
                raise InvalidRequestError(f"{name}: {bad} is not a token id in [0, {vocab})",
                                          name)
        k = params.truncate_prompt_tokens
        if k is not None and k > self.max_model_len:  # vLLM's _validate_truncation_size
            raise InvalidRequestError(f"truncate_prompt_tokens value ({k}) is greater than "
                                      f"max_model_len ({self.max_model_len}). Please, select "
                                      f"a smaller truncation size.", "truncate_prompt_tokens")
        return self._compile_structured(self._tokenize_bad_words(params, vocab))

    def _compile_structured(self, params: SamplingParams) -> SamplingParams:
        """params with its structured_outputs compiled (`_grammar`, on a copy); the compile
        (regex / JSON schema -> lazy DFA) is cached per spec. InvalidRequestError if the spec
        cannot be served."""
        spec = params.structured_outputs
        if spec is None:
            return params
        if self._grammars is None:
            raise InvalidRequestError("structured_outputs: structured outputs need a "
                                      "tokenizer", "structured_outputs")
        try:
            grammar = self._grammars.compile(spec)
        except GrammarError as e:
            raise InvalidRequestError(f"structured_outputs: {e}", "structured_outputs") from None
        words = params._bad_words_token_ids
        params = msgspec.structs.replace(params)  # construction resets both private fields
        params._bad_words_token_ids = words
        params._grammar = grammar
        return params

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams | None = None, *,
                    strict_max_tokens: bool = False, params_checked: bool = False) -> Sequence:
        """Validate and queue a request, all or nothing (every check runs before anything is
        registered or allocated): the id (a string, not live), `check_params`
        (`params_checked`: already done, `params` is its result), then the prompt: empty, ids
        in the vocabulary, too long. Raises InvalidRequestError (bad or duplicate id, bad
        params or token ids), PromptTooLongError,
        MaxTokensTooLargeError (with `strict_max_tokens`: the prompt plus params.max_tokens
        exceed max_model_len; without it max_tokens is capped at the context left), or
        EngineOverloadedError (waiting queue full)."""
        if not isinstance(request_id, str):  # vLLM's add_request: a TypeError
            raise InvalidRequestError(f"request_id: must be a string, got "
                                      f"{type(request_id).__name__}", "request_id")
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already live", "request_id")
        if not params_checked:
            params = self.check_params(params)
        ids = params.truncate_prompt(list(prompt_token_ids), self.max_model_len)
        vocab = self.model_config.vocab_size
        if not ids:
            raise InvalidRequestError("prompt: must not be empty", "prompt")
        for j, t in enumerate(ids):
            v = t if type(t) is int else _integer(t)  # numpy / torch integers count (vLLM)
            if v is None or not 0 <= v < vocab:
                raise InvalidRequestError(
                    f"prompt_token_ids: {t!r} is not a token id in [0, {vocab})", "prompt")
            if v is not t:
                ids[j] = v
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(len(ids), self.max_model_len)
        max_tokens = self.max_model_len - len(ids)
        if params.max_tokens is not None:
            if strict_max_tokens and params.max_tokens > max_tokens:
                raise MaxTokensTooLargeError(params.max_tokens, self.max_model_len, len(ids))
            max_tokens = min(max_tokens, params.max_tokens)
        elif strict_max_tokens and params.min_tokens > max_tokens:
            # max_tokens filled from the context left: min_tokens past it cannot be met (vLLM
            # checks min_tokens against the filled max_tokens too)
            raise InvalidRequestError(
                f"min_tokens ({params.min_tokens}) must not exceed max_tokens ({max_tokens}: "
                f"the context left after the {len(ids)}-token prompt)", "min_tokens")
        # the EOS ids ride along even with ignore_eos: min_tokens bans them regardless (vLLM's
        # all_stop_token_ids always holds the model's EOS); only the stop check skips them
        seq = Sequence(request_id, ids, params, max_tokens, self.eos_token_ids)
        if params._grammar is not None:
            seq.guide = GuideState(params._grammar,
                                   (*self.eos_token_ids, *params.stop_token_ids),
                                   params._structured_after)
        detok = stop = None
        if self._detok_cls is not None and params.detokenize:
            detok = self._detok_cls(self.tokenizer, prompt_token_ids=ids,
                                    skip_special_tokens=params.skip_special_tokens)
            if params.stop:
                stop = self._stop_cls(params.stop, params.include_stop_str_in_output)
        self.scheduler.add(seq)  # may raise EngineOverloadedError
        self.requests[request_id] = _Request(seq, detok, stop)
        return seq

    def _tokenize_bad_words(self, params: SamplingParams, vocab: int) -> SamplingParams:
        """params with `bad_words_token_ids` set (vLLM's update_from_tokenizer), on a copy: the
        caller's object stays as given (vLLM clones it first) and may serve other requests."""
        if not params.bad_words:
            if params.bad_words_token_ids is None:
                return params  # the common case: no work
            return msgspec.structs.replace(params)  # construction drops a stray value
        if self.tokenizer is None:
            # vLLM skips update_from_tokenizer without a tokenizer (the words are silently not
            # enforced); refused here, as stop strings are and as vLLM refuses structured outputs
            raise InvalidRequestError("bad_words: bad words need a tokenizer", "bad_words")
        tok = self.tokenizer
        try:
            seqs = tokenize_bad_words(
                params.bad_words, lambda text: tok.encode(text, add_special_tokens=False), vocab)
        except SamplingParamsError as e:
            raise InvalidRequestError(str(e), e.param) from None
        params = msgspec.structs.replace(params)
        params._bad_words_token_ids = seqs
        return params

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a live request now, freeing its blocks. Returns its final ("abort") delta, or
        None if the id is not live. Never call while the runner reads the sequences (`execute`,
        `launch`); while a launched step is only in flight (async scheduling) it is safe: its
        uncollected tokens are dropped and its row of that step is discarded."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        seq = req.seq
        self.scheduler.finish(seq, "abort")
        seq.drop_placeholders()
        now = time.monotonic()
        self.metrics.request_finished("abort", now - seq.arrival_time)
        self._record_step(0, 0, {}, now)  # gauges reflect the freed blocks at once
        return self._final(req, [], "", "abort", None)

    def _final(self, req: _Request, toks: list[int], text: str, reason: str,
               stop_reason: Any, error: str | None = None) -> RequestOutput:
        seq = req.seq
        out = RequestOutput(seq.request_id, toks, text, reason, stop_reason,
                            Usage(seq.num_prompt_tokens, seq.num_output_tokens, seq.num_tokens,
                                  seq.num_cached_tokens), error=error,
                            cumulative_logprob=req.cumulative_logprob)
        if not req.sent_first:
            req.sent_first = True
            out.prompt_token_ids = seq.prompt_token_ids
            out.engine_prompt_logprobs = plps = req.first_prompt_logprobs()
            out.prompt_logprob_ranks = req.prompt_logprob_ranks
            if plps is not None:
                out.set_tokenizer(self.tokenizer)
        return out

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[RequestOutput]:
        """One synchronous step: schedule, execute, postprocess. If a pipelined step is in
        flight, this call only collects and postprocesses it."""
        if self.pipeline.inflight is not None:
            return self.pipeline.drain()
        batch = self.schedule()
        if not batch.seqs:
            self.record_idle_step()
            return []
        try:
            out = self.execute(batch)
        except Exception as e:  # noqa: BLE001 - a failed step fails its requests only
            return self.fail(batch, e)
        return self.postprocess(batch, out)

    def schedule(self) -> ScheduledBatch:
        batch = self.scheduler.schedule()
        for seq in batch.preempted:
            req = self.requests.get(seq.request_id)
            if req is not None and not req.sent_first:
                req.prompt_logprobs = req.prompt_logprob_ranks = None  # recomputed from 0
        return batch

    def execute(self, batch: ScheduledBatch) -> StepOutput:
        return self.runner.execute(batch)

    def launch(self, batch: ScheduledBatch, prev: Any = None) -> Any:
        """Async scheduling: enqueue `batch` (runner.launch; `prev` = the in-flight handle)."""
        return self.runner.launch(batch, prev)

    def collect(self, handle: Any) -> StepOutput:
        """Async scheduling: wait for a launched step's results (blocking; off the loop)."""
        return self.runner.collect(handle)

    def record_idle_step(self) -> None:
        self._record_step(0, 0, {}, time.monotonic())

    def fail(self, batch: ScheduledBatch, exc: BaseException) -> list[RequestOutput]:
        """Fail the sequences of `batch` after its step raised `exc`."""
        logger.error("engine step failed for %d requests: %r", len(batch.seqs), exc,
                     exc_info=exc)
        msg = f"{type(exc).__name__}: {exc}"
        outputs = []
        now = time.monotonic()
        for seq in batch.seqs:
            req = self.requests.get(seq.request_id)
            if req is None or req.seq is not seq:  # ended already (the id may be reused)
                continue
            del self.requests[seq.request_id]
            self.scheduler.finish(seq, "error")
            seq.drop_placeholders()
            self.metrics.request_finished("error", now - seq.arrival_time)
            outputs.append(self._final(req, [], "", "error", None, error=msg))
        self._record_step(0, 0, {}, now)
        return outputs

    def postprocess(self, batch: ScheduledBatch, out: StepOutput,
                    committed: bool = False) -> list[RequestOutput]:
        """Apply a step's output. `committed`: the batch was committed at launch (async
        scheduling): counts are not advanced again and sampled tokens overwrite the oldest
        placeholder; a sequence that ended meanwhile has its row discarded."""
        now = time.monotonic()
        bm = self.block_manager
        caching = bm.enable_prefix_caching
        bs = self.block_size
        requests = self.requests
        max_len = self.max_model_len
        toks = out.token_ids
        lps = out.logprobs
        plps = out.prompt_logprobs
        pranks = out.prompt_logprob_ranks
        ranks = getattr(out, "logprob_ranks", None)  # the sampled tokens' ranks, if given
        ttft = self.metrics.ttft
        outputs: list[RequestOutput] = []
        finished: list[_Request] = []
        itl: dict[float, int] = {}
        n_prompt = 0
        n_gen = 0  # tokens delivered (rows of ended requests are skipped: never counted)
        j = 0
        for i, seq in enumerate(batch.seqs):
            req = requests.get(seq.request_id)
            if committed:
                seq.num_uncollected -= batch.num_new_tokens[i]
                if req is None or req.seq is not seq:  # ended while in flight: discard the row
                    j += batch.sample[i]
                    continue
                if caching:
                    self._register_collected(seq)
            else:
                seq.num_computed_tokens += batch.num_new_tokens[i]
                if caching and seq.num_computed_tokens >= (seq.num_registered_blocks + 1) * bs:
                    bm.register_computed(seq)
                if req is None or req.seq is not seq:  # ended while the step ran (cannot
                    j += batch.sample[i]               # happen when aborts are deferred)
                    continue
            if plps is not None and i in plps and not req.sent_first:
                if req.prompt_logprobs is None:
                    req.prompt_logprobs = []
                    # a runner that gives no ranks (test fakes) gives none for any chunk
                    req.prompt_logprob_ranks = None if pranks is None else []
                req.prompt_logprobs.extend(plps[i])
                if req.prompt_logprob_ranks is not None:
                    req.prompt_logprob_ranks.extend(pranks[i])
            if not batch.sample[i]:
                continue
            tok = toks[j]
            lp = lps[j] if lps is not None else None
            j += 1
            n_gen += 1
            token_ids = seq.token_ids
            if committed:
                assert seq.num_placeholders > 0, seq
                pos = len(token_ids) - seq.num_placeholders  # the oldest placeholder
                token_ids[pos] = tok
                seq.num_placeholders -= 1
                n_known = pos + 1
            else:
                token_ids.append(tok)
                n_known = len(token_ids)
            if seq.first_token_time is None:
                seq.first_token_time = now
                ttft.observe(now - seq.arrival_time)
                n_prompt += seq.num_prompt_tokens
            else:
                last = seq.last_token_time
                itl[last] = itl.get(last, 0) + 1
            seq.last_token_time = now

            params = seq.params
            nout = n_known - seq.num_prompt_tokens
            reason = None
            stop_reason = None
            hide = False
            is_eos = not params.ignore_eos and tok in seq.eos_token_ids
            if nout >= params.min_tokens and (is_eos or tok in seq.stop_token_set):
                reason = "stop"
                # the tokenizer's own EOS (the first id) has no stop_reason; vLLM turns the
                # other EOS ids (generation_config.json's) into stop_token_ids
                # (SamplingParams.update_from_generation_config): their stop_reason is the id
                if not is_eos or tok != seq.eos_token_ids[0]:
                    stop_reason = tok
                hide = not params.include_stop_str_in_output
            elif nout >= seq.max_tokens or n_known >= max_len:
                reason = "length"

            text = ""
            detok = req.detok
            if detok is not None:
                if not hide:
                    text = detok.push([tok])
                # nothing to flush at the end: an unfinished character is dropped (vLLM)
                stop = req.stop
                if stop is not None and reason == "stop":
                    # ended by a stop token: its text (include_stop_str_in_output) is not
                    # searched for stop strings (vLLM: stop_terminated); held text goes out
                    text = stop.flush() + text
                elif stop is not None:
                    # stop strings are checked from the token after min_tokens (vLLM:
                    # len(output_token_ids) > min_tokens) but may begin in the text before it
                    # (its window reaches back len(stop) - 1 chars), so that text is fed too
                    text, matched = stop.feed(text, nout > params.min_tokens)
                    if matched is not None:
                        reason = "stop"
                        stop_reason = matched
                    elif reason is not None:
                        text += stop.flush()

            if reason is None:
                o = RequestOutput(seq.request_id, [tok], text).set_num_cached_tokens(
                    seq.num_cached_tokens)  # vLLM: on every output, not only the final one
                if not req.sent_first:
                    req.sent_first = True
                    o.prompt_token_ids = seq.prompt_token_ids
                    o.engine_prompt_logprobs = first = req.first_prompt_logprobs()
                    o.prompt_logprob_ranks = req.prompt_logprob_ranks
                    if first is not None:
                        o.set_tokenizer(self.tokenizer)
            else:
                seq.finish_reason = reason
                seq.stop_reason = stop_reason
                seq.drop_placeholders()  # a launched next step's token is wasted, never shown
                o = self._final(req, [tok], text, reason, stop_reason)
                finished.append(req)
            if lp is not None:
                o.engine_logprobs = [lp]
                if ranks is not None:
                    o.logprob_ranks = [ranks[j - 1]]
                o.set_tokenizer(self.tokenizer)
                if req.cumulative_logprob is not None:
                    req.cumulative_logprob += lp[0]  # exactly the sum of what is delivered
            o.cumulative_logprob = req.cumulative_logprob
            outputs.append(o)

        for req in finished:
            seq = req.seq
            del requests[seq.request_id]
            self.scheduler.finish(seq)
            self.metrics.request_finished(seq.finish_reason, now - seq.arrival_time)
        self._record_step(n_prompt, n_gen, itl, now)
        return outputs

    def _register_collected(self, seq: Sequence) -> None:
        """Register the full blocks computed by COLLECTED steps only (not the launched one's:
        if it failed, garbage KV would be served from the cache). All their tokens are known."""
        n = seq.num_computed_tokens
        done = n - seq.num_uncollected
        if done < (seq.num_registered_blocks + 1) * self.block_size:
            return
        # register_computed reads num_computed_tokens; set it for the call (loop thread only,
        # and no runner call reads the sequences now)
        seq.num_computed_tokens = done
        try:
            self.block_manager.register_computed(seq)
        finally:
            seq.num_computed_tokens = n

    def _record_step(self, n_prompt: int, n_gen: int, itl: dict[float, int], now: float) -> None:
        m = self.metrics
        for last, count in itl.items():
            m.itl.observe(now - last, count)
        sched = self.scheduler
        bm = self.block_manager
        new_preemptions = sched.num_preemptions - self._seen_preemptions
        self._seen_preemptions = sched.num_preemptions
        m.record_step(num_running=sched.num_running, num_waiting=sched.num_waiting,
                      kv_usage=bm.usage, hit_rate=bm.hit_rate, prompt_tokens=n_prompt,
                      generation_tokens=n_gen, preemptions=new_preemptions,
                      prefix_queries=bm.prefix_queries, prefix_hits=bm.prefix_hits)

    # ------------------------------------------------------------------ introspection
    def stats(self) -> dict[str, Any]:
        bm = self.block_manager
        m = self.metrics
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv_usage": bm.usage,
            "prefix_cache_hit_rate": bm.hit_rate,
            "prefix_cache_queries": bm.prefix_queries,
            "prefix_cache_hits": bm.prefix_hits,
            "used_blocks": bm.num_used,
            "cached_blocks": bm.num_cached_blocks,
            "total_blocks": bm.num_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "prompt_tokens": m.total_prompt_tokens,
            "generation_tokens": m.total_generation_tokens,
            "finished": dict(m.finished),
            "max_model_len": self.max_model_len,
        }

    def abort_all(self) -> list[RequestOutput]:
        return [o for rid in list(self.requests) if (o := self.abort(rid)) is not None]

    def reset_prefix_cache(self) -> bool:
        """vLLM's reset_prefix_cache: no later request hits a prefix computed before the call
        (BlockManager.reset_prefix_cache: blocks in use stay theirs). On the engine's thread;
        safe while a step runs (it frees only blocks no sequence holds). Returns True."""
        n = self.block_manager.reset_prefix_cache()
        logger.info("prefix cache reset: %d cached blocks freed", n)
        return True

    def shutdown(self) -> None:
        """Abort every request and stop the runner (TP workers, KV pool); a second call does
        nothing."""
        if self._shut_down:
            return
        self._shut_down = True
        self.abort_all()
        self.runner.shutdown()
