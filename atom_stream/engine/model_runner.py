"""ModelRunner: owns the model, the latent KV pool and the sampler; runs one ScheduledBatch.

Contract (engine core <-> runner): `execute(batch) -> StepOutput` is blocking and is called from
one worker thread; it reads the sequences (tokens, computed counts, block tables, params) and
never mutates them. On the CPU it runs the torch reference paths in the worker thread (torch
releases the GIL), so the event loop stays responsive.

Async scheduling (`supports_async`): `execute` = `collect(launch(batch))`.
- `launch(batch, prev) -> StepHandle` reads the sequences (only while it runs: the caller keeps
  them unchanged meanwhile), enqueues the forward and the sampler, and returns without waiting
  for the device. Decode rows whose input is a `PLACEHOLDER` (the token `prev` sampled, not yet
  on the host) take it from `prev.token_ids` with a gather on the device: no host sync. The
  sampled ids (and logprobs) are copied to pinned host memory with non_blocking copies, then a
  CUDA event is recorded. On the CPU the forward runs synchronously inside `launch`.
  Under TP the other ranks get those rows as PLACEHOLDERs too (the StepInputs broadcast carries
  host values only): every rank sees them in the ids and takes part in one broadcast of the
  device ids from rank 0, after rank 0's gather (`_run`), still with no host sync.
- `collect(handle) -> StepOutput` waits for that event (call it off the event loop) and does the
  `.tolist()` work. It reads only the handle, never a sequence.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from itertools import chain

import msgspec
import numpy as np
import torch

from atom_stream import envs
from atom_stream.config import ConfigError, EngineConfig, ModelConfig
from atom_stream.engine.block_rows import BlockTableRows
from atom_stream.engine.kv_pool import allocate_kv_caches
from atom_stream.engine.sequence import ScheduledBatch, StepOutput
from atom_stream.layers.attention import AttentionMetadata, fp8_dtype
from atom_stream.layers.parallel import TPInfo, broadcast_from_first, tp_context
from atom_stream.layers.quant import (
    apply_quantization,
    init_online_dummy_weights,
    quant_init,
    weight_bytes_report,
)
from atom_stream.loader import init_dummy_weights, load_checkpoint
from atom_stream.models import MODEL_REGISTRY, mla_prefix

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_KV_POOL_BYTES = 512 * 2**20  # default CPU KV pool when num_kv_blocks is not given
# TP on GPUs: decode-sized all-reduces as one-shot kernels over symmetric (peer) memory
# (layers/symm_allreduce.py) instead of NCCL/RCCL; =0 keeps NCCL/RCCL. On by default since the
# session-7 A/B on two H200s (bench/RESULTS.md): a step's collectives alone 2.36 -> 0.94 ms at
# B=1, the TP=2 decode step 7.93 -> 7.57 ms at B=1, equal at B=16 / 64. Platforms without
# symmetric memory keep NCCL/RCCL (try_create: every rank agrees first).
SYMM_ALLREDUCE = envs.flag("ATOM_STREAM_SYMM_ALLREDUCE")
# Prefill lengths run once at GPU start-up after the profiling forward (at the largest prefill
# batch): one per MoE expert-block class below it (int4: 16 tokens per block up to 512, 32 up
# to 2048, then 64), so no request pays a kernel compile (~3.5 s each on an H200); 64: the
# parallel align's small scan class (<= 1024 pairs, kernels/moe_align.par_scan)
WARMUP_PREFILL_LENS = (1024, 256, 64)


def prefill_batch(n: int, max_len: int, block_size: int,
                  device: torch.device) -> tuple[AttentionMetadata, torch.Tensor, int]:
    """A prefill-only step of n >= 1 tokens as fresh sequences of max_len tokens (the last one
    shorter), each in its own blocks of a scratch KV cache: the start-up forwards' batch (the
    scheduler packs several prompts into one step when max_len < max_num_batched_tokens).
    Returns (metadata, positions [n] int64, blocks the scratch cache needs)."""
    lens = [max_len] * (n // max_len) + ([n % max_len] if n % max_len else [])
    nbs = [math.ceil(x / block_size) for x in lens]
    first = np.concatenate([[0], np.cumsum(nbs)])
    tables = torch.zeros(len(lens), max(nbs), dtype=torch.int32)
    for i, nb in enumerate(nbs):
        tables[i, :nb] = torch.arange(first[i], first[i] + nb, dtype=torch.int32)
    slots = torch.cat([torch.arange(x) + int(first[i]) * block_size for i, x in enumerate(lens)])
    positions = torch.cat([torch.arange(x) for x in lens])
    md = AttentionMetadata(
        query_start_loc=[0, *np.cumsum(lens).tolist()], seq_lens=lens,
        block_tables=tables.to(device), slot_mapping=slots.to(device), num_decodes=0,
        block_size=block_size)
    return md, positions.to(device), int(first[-1])


def use_symm_allreduce(config: EngineConfig, tp_info: TPInfo, device: torch.device) -> bool:
    """Whether this TP group tries the one-shot all-reduce: several ranks on GPUs of ONE node
    (it reads peers' memory over P2P; a group spanning nodes, `nnodes` > 1, keeps NCCL/RCCL),
    over torch.distributed's default group (symmetric memory rendezvouses by a registered group
    name, which the private groups of layers/parallel.private_group lack), and SYMM_ALLREDUCE.
    Same answer on every rank (a collective follows)."""
    return (SYMM_ALLREDUCE and tp_info.size > 1 and device.type == "cuda"
            and config.nnodes == 1 and tp_info.group is None)


@dataclasses.dataclass
class StepHandle:
    """A launched step. `rows`: each sampled Sequence -> its row of `token_ids` [n] int64 (on the
    device; the next launch gathers pending inputs from it). `host_ids`/`logprobs`/`prompt` are
    host copies, complete once `event` (None on the CPU) has fired; `lp_ks[j]` is row j's
    `params.logprobs`; `prompt` holds (batch index, k, chosen [m], ranks [m], top values
    [m, k] | None, top ids [m, k] | None) per prompt-logprob range."""

    rows: dict = dataclasses.field(default_factory=dict)
    token_ids: torch.Tensor | None = None
    host_ids: torch.Tensor | None = None
    logprobs: tuple | None = None
    lp_ks: list = dataclasses.field(default_factory=list)
    prompt: list = dataclasses.field(default_factory=list)
    event: object = None


class StepInputs(msgspec.Struct, array_like=True):
    """One step, flattened on the host: int64/int32 arrays as raw bytes (cheap to encode and
    broadcast). tables is [len(seq_lens), max_blocks] int32; logit_rows index the flat tokens;
    prompt_ranges are (batch index, first flat row, n) for prompt logprobs."""

    ids: bytes
    positions: bytes
    slots: bytes
    qsl: list[int]
    seq_lens: list[int]
    num_decodes: int
    tables: bytes
    max_blocks: int
    logit_rows: list[int]
    prompt_ranges: list[tuple[int, int, int]]
    use_graph: bool




def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but no CUDA/ROCm GPU is available")
    return torch.device(name)


def resolve_dtype(name: str, model_cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16


def load_model_config(config: EngineConfig) -> ModelConfig:
    """The model config `config` names (the demo's, a bench preset's or a checkpoint's
    config.json) with `config.hf_overrides` applied: every rank and replica reads it here,
    and checks `config.quantization` (vLLM's argument) against it."""
    from atom_stream.layers.quant.config import check_requested_method
    mc = _read_model_config(config)
    check_requested_method(config.quantization, mc.quantization_config)
    return mc


def _read_model_config(config: EngineConfig) -> ModelConfig:
    overrides = config.hf_overrides
    if config.is_demo:
        from atom_stream.models.demo import DEMO_CONFIG
        return ModelConfig.from_dict(DEMO_CONFIG, overrides)
    from atom_stream.models.presets import PRESETS  # bench presets: full shapes, dummy weights
    if config.model in PRESETS:
        return ModelConfig.from_dict(PRESETS[config.model], overrides)
    if os.path.isfile(config.model):  # not a checkpoint: would serve random weights
        raise ConfigError(f"model: {config.model!r} is a file; give the checkpoint directory "
                          f"(config.json, *.safetensors, tokenizer files)")
    return ModelConfig.from_pretrained(config.model, overrides)


class ModelRunner:
    """`tp_info`: this process's tensor-parallel rank (None: single rank)."""

    def __init__(self, config: EngineConfig, tp_info: TPInfo | None = None):
        from atom_stream.engine import compile_watch
        with compile_watch.startup():  # this thread's compiles until ready are start-up's
            self._init(config, tp_info)
        if self.device.type == "cuda":
            # from here on a Triton compile is a request's wait
            compile_watch.watch()

    def _init(self, config: EngineConfig, tp_info: TPInfo | None) -> None:
        self.config = config
        self.tp_info = tp_info or TPInfo()
        if config.enable_expert_parallel and not self.tp_info.ep:  # EP group = TP group (issue 9)
            self.tp_info = dataclasses.replace(self.tp_info, ep=True)
        self.device = resolve_device(config.device)
        if use_symm_allreduce(config, self.tp_info, self.device):
            from atom_stream.layers.symm_allreduce import try_create  # a collective: all ranks
            self.tp_info = dataclasses.replace(
                self.tp_info, fast_ar=try_create(self.tp_info.group, self.device))
        self.model_config = cfg = load_model_config(config)
        self.dtype = resolve_dtype(config.dtype, cfg, self.device)
        if config.max_model_len is None:
            config.max_model_len = cfg.max_position_embeddings
        elif config.max_model_len > cfg.max_position_embeddings:
            raise ConfigError(
                f"max_model_len: {config.max_model_len} exceeds the model's "
                f"max_position_embeddings {cfg.max_position_embeddings}")
        self.max_model_len = config.max_model_len
        self.block_size = config.block_size
        torch.manual_seed(config.seed)

        t0 = time.perf_counter()
        with tp_context(self.tp_info):
            model_cls = MODEL_REGISTRY[cfg.architecture]
            with quant_init(cfg):  # layers/quant (issue 8): quantized weights never built dense
                self.model = model_cls(cfg, self.max_model_len, self.dtype, self.device)
            quant_hooks = apply_quantization(  # packed buffers + loader hooks
                self.model, cfg, online_quant_config=config.online_quant_config)
            dummy = config.is_demo or config.load_format == "dummy" or not _is_dir(config.model)
            if dummy:
                from atom_stream.models.demo import DEMO_SEED
                seed = DEMO_SEED if config.is_demo else config.seed
                init_dummy_weights(self.model, seed)
                init_online_dummy_weights(self.model, seed)  # quantized from those weights
            else:
                load_checkpoint(self.model, config.model, cfg.num_hidden_layers,
                                cfg.tie_word_embeddings, extra_hooks=quant_hooks,
                                mtp_layers=cfg.num_nextn_predict_layers)
        self.model.process_weights_after_loading()
        self.model.eval()
        logger.info("model %s loaded in %.2fs (%s, %s)", config.model or "demo",
                    time.perf_counter() - t0, self.dtype, self.device)
        logger.info("weight bytes by format: %s", weight_bytes_report(self.model))  # issue 8

        self.kv_dtype = fp8_dtype() if config.kv_cache_is_fp8 else self.dtype
        self.num_kv_blocks = self._num_kv_blocks()
        # one extra block at the end: the scratch block that padded rows write into
        self.scratch_block = self.num_kv_blocks
        shape = (self.num_kv_blocks + 1, self.block_size, cfg.kv_cache_dim)
        self.kv_caches = allocate_kv_caches(cfg.num_hidden_layers, shape, self.kv_dtype,
                                            self.device)
        self.sampler = None  # created on first use: only rank 0 samples
        self.graphs = None
        self.broadcast = None  # set by the TP executor: sends StepInputs to ranks 1..N-1
        if self.device.type == "cuda" and not config.enforce_eager:
            self._capture_graphs()
        if self.device.type == "cuda":
            from atom_stream.engine.kernel_warmup import warm_decode_kernels
            warm_decode_kernels(self)

    def _capture_graphs(self) -> None:
        from atom_stream.engine.graphs import DecodeGraphRunner, default_capture_sizes
        sizes = self.config.cudagraph_capture_sizes or default_capture_sizes(
            self.config.max_num_seqs)
        sizes = [s for s in sizes if s <= self.config.max_num_seqs] or [1]
        max_blocks = math.ceil(self.max_model_len / self.block_size)
        self.graphs = DecodeGraphRunner(
            self.model, self.kv_caches, sizes, max_blocks, self.block_size,
            scratch_slot=self.scratch_block * self.block_size, scratch_block=self.scratch_block,
            device=self.device)
        t0 = time.perf_counter()
        self.graphs.capture()
        logger.info("graph capture took %.1fs", time.perf_counter() - t0)

    def _num_kv_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        cfg = self.model_config
        bytes_per_block = (self.block_size * cfg.kv_cache_dim * cfg.num_hidden_layers
                           * torch.empty((), dtype=self.kv_dtype).element_size())
        if self.device.type == "cpu":
            budget = self.config.kv_cache_memory_bytes or CPU_KV_POOL_BYTES
        else:
            budget = self._profile_kv_budget()  # runs the start-up forwards in any case
            if self.config.kv_cache_memory_bytes is not None:
                # vLLM's --kv-cache-memory-bytes: the pool's size, gpu_memory_utilization's
                # sizing ignored (the caller owns the fit)
                budget = self.config.kv_cache_memory_bytes
        want = self.config.max_num_seqs * math.ceil(self.max_model_len / self.block_size)
        blocks = int(min(budget // bytes_per_block, want))
        if self.tp_info.size > 1:  # every rank must hold the same pool
            t = torch.tensor([blocks], device=self.device if self.device.type == "cuda" else "cpu")
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN,
                                         group=self.tp_info.group)
            blocks = int(t.item())
        if blocks < 1:
            raise ConfigError("gpu_memory_utilization: no memory left for the KV cache")
        return blocks

    @torch.inference_mode()
    def _prefill_warmup(self, kv_caches: list[torch.Tensor], max_tokens: int) -> list[int]:
        """One prefill step of each of WARMUP_PREFILL_LENS tokens below max_tokens (fresh
        sequences of at most max_model_len tokens each: prefill_batch; KV written into
        `kv_caches`, scratch caches of at least prefill_batch's block count for max_tokens):
        kernels whose compiled variant depends on the token count (the MoE's expert-block rows,
        kernels/fused_moe default_config) compile now, not at the first request of that size (a
        cold compile is seconds of time to first token: bench/RESULTS.md session 7). Every TP
        rank runs the same lengths (collectives inside). Returns the lengths run."""
        dev = kv_caches[0].device
        lens = [w for w in WARMUP_PREFILL_LENS if w < max_tokens]
        for w in lens:
            md, positions, _ = prefill_batch(w, self.max_model_len, self.block_size, dev)
            ids = torch.randint(0, self.model_config.vocab_size, (w,), device=dev)
            self.model(ids, positions, kv_caches, md)
        return lens

    def largest_prefill_tokens(self) -> int:
        """Tokens of the largest step the scheduler can form: max_num_batched_tokens, or fewer
        where max_num_seqs sequences of max_model_len tokens cannot fill it (several prompts
        share a step when max_model_len < max_num_batched_tokens)."""
        return min(self.config.max_num_batched_tokens,
                   self.config.max_num_seqs * self.max_model_len)

    @torch.inference_mode()
    def _profile_kv_budget(self) -> float:
        """Bytes left for the KV pool: gpu_memory_utilization * total minus what the weights,
        other processes and a profiling forward at the largest prefill batch use, and what a
        prefill after a long cached prefix adds (models/mla_prefix.budget_reserve_bytes)."""
        dev = self.device
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        n = self.largest_prefill_tokens()
        md, positions, blocks = prefill_batch(n, self.max_model_len, self.block_size, dev)
        cfg = self.model_config
        tmp = [torch.zeros(blocks + 1, self.block_size, cfg.kv_cache_dim, dtype=self.kv_dtype,
                           device=dev) for _ in range(cfg.num_hidden_layers)]
        ids = torch.randint(0, cfg.vocab_size, (n,), device=dev)
        hidden = self.model(ids, positions, tmp, md)
        self.model.compute_logits(hidden[-self.config.max_num_seqs:])
        del hidden
        self._prefill_warmup(tmp, n)  # smaller than the forward above: the peak stands
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        del tmp
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        ours_now = torch.cuda.memory_allocated(dev)
        others = total - free - torch.cuda.memory_reserved(dev)
        # a prefill after a long cached prefix expands it piece by piece (models/mla_prefix.py)
        # with fp32 partials: memory this forward (no prefix) never reaches
        reserve = mla_prefix.budget_reserve_bytes(
            max(1, cfg.num_attention_heads // self.tp_info.size), cfg.v_head_dim,
            min(self.config.max_num_batched_tokens, self.max_model_len))
        budget = total * self.config.gpu_memory_utilization - others - peak - reserve
        logger.info("KV budget %.2f GiB (weights %.2f GiB, profiling peak %.2f GiB)",
                    budget / 2**30, ours_now / 2**30, peak / 2**30)
        return budget

    # ------------------------------------------------------------------ step
    def build_inputs(self, batch: ScheduledBatch) -> StepInputs:
        """Flatten the batch on the host (what rank 0 broadcasts to the other TP ranks).
        Vectorized with numpy: per sequence only list slicing happens in Python; the block
        tables come from a persistent copy updated incrementally (BlockTableRows)."""
        bs = self.block_size
        seqs = batch.seqs
        S = len(seqs)
        news = np.asarray(batch.num_new_tokens, dtype=np.int64)
        starts = np.fromiter((s.num_computed_tokens for s in seqs), np.int64, S)
        ends = starts + news
        qsl_arr = np.zeros(S + 1, dtype=np.int64)
        np.cumsum(news, out=qsl_arr[1:])
        T = int(qsl_arr[-1])
        if batch.num_decodes == S:  # decode-only: one token per sequence
            ids_arr = np.fromiter((s.token_ids[s.num_computed_tokens] for s in seqs), np.int64, S)
        else:
            ids_arr = np.fromiter(chain.from_iterable(
                s.token_ids[a:a + n] for s, a, n in zip(seqs, starts.tolist(), batch.num_new_tokens)),
                np.int64, T)
        btr = getattr(self, "_block_rows", None)  # lazy: also works on a bare namespace
        if btr is None:
            btr = self._block_rows = BlockTableRows(self.scratch_block)
        tables, max_blocks = btr.gather(seqs)  # [S, max_blocks] int32, scratch-padded
        seq_of_tok = np.repeat(np.arange(S), news)
        positions_arr = np.arange(T, dtype=np.int64) - np.repeat(qsl_arr[:-1], news) + \
            np.repeat(starts, news)
        slots_arr = tables[seq_of_tok, positions_arr // bs].astype(np.int64) * bs + positions_arr % bs
        qsl = qsl_arr.tolist()
        seq_lens = ends.tolist()
        rows = [qsl[i + 1] - 1 for i, s in enumerate(batch.sample) if s]
        prompt_ranges = []
        for i, seq in enumerate(batch.seqs):
            if seq.params.prompt_logprobs is None or i < batch.num_decodes:
                continue
            n = min(batch.num_new_tokens[i], seq.num_prompt_tokens - 1 - seq.num_computed_tokens)
            if n > 0:
                prompt_ranges.append((i, qsl[i], n))
        use_graph = (self.graphs is not None and batch.num_decodes == len(batch.seqs)
                     and len(batch.seqs) <= self.graphs.max_batch and not prompt_ranges)
        return StepInputs(
            ids=ids_arr.tobytes(), positions=positions_arr.tobytes(), slots=slots_arr.tobytes(),
            qsl=qsl, seq_lens=seq_lens,
            num_decodes=batch.num_decodes, tables=tables.tobytes(), max_blocks=max_blocks,
            logit_rows=rows, prompt_ranges=prompt_ranges, use_graph=use_graph)

    def _put(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(arr)
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" \
            else t

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy of device tensor t that completes asynchronously (pinned memory, ready
        once an event recorded after it fires); t itself on the CPU."""
        if t.device.type == "cpu":
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return host.copy_(t, non_blocking=True)

    def _to_device(self, inp: StepInputs):
        put = self._put
        tables = np.frombuffer(inp.tables, dtype=np.int32).reshape(len(inp.seq_lens),
                                                                    inp.max_blocks)
        md = AttentionMetadata(
            query_start_loc=inp.qsl, seq_lens=inp.seq_lens, block_tables=put(tables.copy()),
            slot_mapping=put(np.frombuffer(inp.slots, dtype=np.int64).copy()),
            num_decodes=inp.num_decodes, block_size=self.block_size,
            decode_seq_lens=put(np.asarray(inp.seq_lens[: inp.num_decodes], dtype=np.int32)))
        ids = put(np.frombuffer(inp.ids, dtype=np.int64).copy())
        positions = put(np.frombuffer(inp.positions, dtype=np.int64).copy())
        return ids, positions, md

    def run_inputs(self, inp: StepInputs) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Every TP rank runs this on the same inputs (collectives inside). Returns the logits of
        `logit_rows` [N, V] (None if none) and the logits of each prompt-logprob range."""
        return self._run(inp, None)

    @property
    def supports_async(self) -> bool:
        """launch/collect with device-side inputs (any TP size: see the module docstring)."""
        return True

    def _pending_rows(self, batch: ScheduledBatch, inp: StepInputs, prev: StepHandle | None):
        """(flat rows, rows of prev.token_ids, prev.token_ids) for the inputs that are still
        PLACEHOLDERs, or None. Only decodes (flat row == batch index) may have one."""
        ids = np.frombuffer(inp.ids, dtype=np.int64)
        rows = np.flatnonzero(ids < 0)
        if not rows.size:
            return None
        if prev is None or prev.token_ids is None:
            raise RuntimeError("a decode input is still on the device but no previous step "
                               "was given")
        if int(rows[-1]) >= batch.num_decodes:
            raise RuntimeError("a pending input token outside the decode rows")
        try:
            src = [prev.rows[batch.seqs[r]] for r in rows.tolist()]
        except KeyError:
            raise RuntimeError("a pending input token was not sampled by the previous step") \
                from None
        return rows, np.asarray(src, dtype=np.int64), prev.token_ids

    @torch.inference_mode()
    def _run(self, inp: StepInputs, pending) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        ids, positions, md = self._to_device(inp)
        if pending is not None:
            rows, src, prev_ids = pending
            # on the device, stream-ordered after the previous step's sampler: no host sync
            ids.index_copy_(0, self._put(rows), prev_ids.index_select(0, self._put(src)))
        if self.tp_info.size > 1 and (np.frombuffer(inp.ids, dtype=np.int64) < 0).any():
            # rank 0 holds the pending tokens (sampled on its device); every rank sees the
            # same PLACEHOLDERs in the broadcast inputs, so all of them take part
            broadcast_from_first(ids, self.tp_info)
        if inp.use_graph:
            B = self.graphs.load_inputs(ids, positions, md.slot_mapping, md.decode_seq_lens,
                                        md.block_tables)
            logits, _ = self.graphs.replay(B)
            return logits[: len(inp.seq_lens)], []
        hidden = self.model(ids, positions, self.kv_caches, md)
        prompt_logits = [self.model.compute_logits(hidden[s:s + n])
                         for _, s, n in inp.prompt_ranges]
        logits = self.model.compute_logits(hidden[inp.logit_rows]) if inp.logit_rows else None
        return logits, prompt_logits

    def execute(self, batch: ScheduledBatch) -> StepOutput:
        return self.collect(self.launch(batch))

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, prev: StepHandle | None = None) -> StepHandle:
        """Enqueue one step (see the module docstring); `prev`: the previous step's handle when
        some decode inputs are its uncollected tokens."""
        from atom_stream.layers.sampler import SamplingMetadata

        inp = self.build_inputs(batch)
        pending = self._pending_rows(batch, inp, prev)
        if self.broadcast is not None:
            self.broadcast(inp)
        logits, prompt_logits = self._run(inp, pending)
        handle = StepHandle(prompt=self._prompt_logprobs(batch, inp, prompt_logits))
        if logits is not None:
            sampled = [seq for seq, s in zip(batch.seqs, batch.sample) if s]
            if self.sampler is None:
                from atom_stream.layers.sampler import Sampler
                self.sampler = Sampler(seed=self.config.seed)
            # a decode's last token may still be prev's: the penalties gather it on the device,
            # a grammar waits for prev's host copy (this step's forward is enqueued already)
            meta = SamplingMetadata.from_sequences(
                sampled, logits.shape[-1], self.device,
                prev_ids=None if prev is None else prev.token_ids,
                prev_rows=None if prev is None else prev.rows,
                prev_host=None if prev is None else functools.partial(self.sampled_on_host, prev))
            out = self.sampler(logits, meta)
            handle.rows = {seq: j for j, seq in enumerate(sampled)}
            handle.token_ids = out.token_ids
            handle.host_ids = self._to_host(out.token_ids)
            if out.logprobs is not None:
                handle.logprobs = tuple(self._to_host(t) for t in out.logprobs)
                handle.lp_ks = [seq.params.logprobs for seq in sampled]
        if self.device.type == "cuda":
            handle.event = torch.cuda.Event()
            handle.event.record()
        return handle

    @staticmethod
    def sampled_on_host(handle: StepHandle) -> torch.Tensor:
        """The step's sampled ids on the host [n] int64, once its event fired (blocking)."""
        if handle.host_ids is None:
            raise RuntimeError("that step sampled nothing")
        if handle.event is not None:
            handle.event.synchronize()
        return handle.host_ids

    def collect(self, handle: StepHandle) -> StepOutput:
        """Wait for the step's host copies (blocking: call it off the event loop) and convert
        them. Reads only `handle`."""
        if handle.event is not None:
            handle.event.synchronize()
        prompt_lps = prompt_ranks = None
        if handle.prompt:
            prompt_lps, prompt_ranks = {}, {}
            for i, k, chosen, ranks, top_v, top_i in handle.prompt:
                prompt_ranks[i] = ranks.tolist()
                c = chosen.tolist()
                if k:
                    tv, ti = top_v.tolist(), top_i.tolist()
                    prompt_lps[i] = [(c[j], list(zip(ti[j], tv[j]))) for j in range(len(c))]
                else:
                    prompt_lps[i] = [(x, []) for x in c]
        if handle.host_ids is None:
            return StepOutput(token_ids=[], prompt_logprobs=prompt_lps,
                              prompt_logprob_ranks=prompt_ranks)
        logprobs = ranks = None
        if handle.logprobs is not None:
            lp, top_ids, top_lps, rk = (t.tolist() for t in handle.logprobs)
            logprobs = [None if k is None else (lp[j], list(zip(top_ids[j][:k], top_lps[j][:k])))
                        for j, k in enumerate(handle.lp_ks)]
            ranks = [None if k is None else rk[j] for j, k in enumerate(handle.lp_ks)]
        return StepOutput(token_ids=handle.host_ids.tolist(), logprobs=logprobs,
                          prompt_logprobs=prompt_lps, prompt_logprob_ranks=prompt_ranks,
                          logprob_ranks=ranks)

    def _prompt_logprobs(self, batch: ScheduledBatch, inp: StepInputs,
                         prompt_logits: list[torch.Tensor]) -> list:
        """For sequences asking prompt_logprobs: for each chunk position p with p+1 in the prompt,
        the logprob of prompt token p+1, its rank (layers/sampler.token_ranks, vLLM's) and the
        top k, as StepHandle.prompt entries (host copies in flight; `collect` builds the
        (logprob, [(id, logprob)]) lists and the ranks keyed by batch index)."""
        from atom_stream.layers.sampler import token_ranks

        result = []
        for (i, _, n), logits in zip(inp.prompt_ranges, prompt_logits):
            seq = batch.seqs[i]
            k = seq.params.prompt_logprobs
            start = seq.num_computed_tokens
            lps = torch.log_softmax(logits, dim=-1)
            targets = torch.tensor(seq.token_ids[start + 1:start + 1 + n], device=lps.device)
            chosen = lps.gather(1, targets[:, None])[:, 0]
            ranks = self._to_host(token_ranks(lps, chosen))
            chosen = self._to_host(chosen)
            top_v = top_i = None
            if k:
                top = lps.topk(k, dim=-1)
                top_v, top_i = self._to_host(top.values), self._to_host(top.indices)
            result.append((i, k, chosen, ranks, top_v, top_i))
        return result

    def shutdown(self, sync: bool = True) -> None:
        """Drop the decode graphs and the KV pool. The graphs go first and (`sync`) the device
        is synchronized: under TP a captured graph holds NCCL/RCCL collectives, and the process
        group must not be torn down under a graph that may still run. `sync=False` where a TP
        peer is dead (a synchronize could wait on its collective forever)."""
        if self.graphs is not None:
            if sync and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.graphs = None
        self.kv_caches = []


def _is_dir(path: str | None) -> bool:
    return bool(path) and os.path.isdir(path)
