"""ModelRunner: owns the model, the latent KV pool and the sampler; runs one ScheduledBatch.

Contract (engine core <-> runner): `execute(batch) -> StepOutput` is blocking and is called from
one worker thread; it reads the sequences (tokens, computed counts, block tables, params) and
never mutates them. On the CPU it runs the torch reference paths in the worker thread (torch
releases the GIL), so the event loop stays responsive.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from atom_stream.config import ConfigError, EngineConfig, ModelConfig
from atom_stream.engine.sequence import ScheduledBatch, StepOutput
from atom_stream.layers.attention import AttentionMetadata, fp8_dtype
from atom_stream.loader import init_dummy_weights, load_checkpoint
from atom_stream.models import MODEL_REGISTRY

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_KV_POOL_BYTES = 512 * 2**20  # default CPU KV pool when num_kv_blocks is not given


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
    if config.is_demo:
        from atom_stream.models.demo import DEMO_CONFIG
        return ModelConfig.from_dict(DEMO_CONFIG)
    from atom_stream.models.presets import PRESETS  # bench presets: full shapes, dummy weights
    if config.model in PRESETS:
        return ModelConfig.from_dict(PRESETS[config.model])
    return ModelConfig.from_pretrained(config.model)


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = resolve_device(config.device)
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
        model_cls = MODEL_REGISTRY[cfg.architecture]
        self.model = model_cls(cfg, self.max_model_len, self.dtype, self.device)
        dummy = config.is_demo or config.load_format == "dummy" or not _is_dir(config.model)
        if dummy:
            from atom_stream.models.demo import DEMO_SEED
            init_dummy_weights(self.model, DEMO_SEED if config.is_demo else config.seed)
        else:
            load_checkpoint(self.model, config.model, cfg.num_hidden_layers,
                            cfg.tie_word_embeddings)
        self.model.process_weights_after_loading()
        self.model.eval()
        logger.info("model %s loaded in %.2fs (%s, %s)", config.model or "demo",
                    time.perf_counter() - t0, self.dtype, self.device)

        self.kv_dtype = fp8_dtype() if config.kv_cache_is_fp8 else self.dtype
        self.num_kv_blocks = self._num_kv_blocks()
        # one extra block at the end: the scratch block that padded rows write into
        self.scratch_block = self.num_kv_blocks
        shape = (self.num_kv_blocks + 1, self.block_size, cfg.kv_cache_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
                          for _ in range(cfg.num_hidden_layers)]
        from atom_stream.layers.sampler import Sampler
        self.sampler = Sampler()
        self.graphs = None
        if self.device.type == "cuda" and not config.enforce_eager:
            self._capture_graphs()

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
            budget = self._profile_kv_budget()
        want = self.config.max_num_seqs * math.ceil(self.max_model_len / self.block_size)
        blocks = int(min(budget // bytes_per_block, want))
        if blocks < 1:
            raise ConfigError("gpu_memory_utilization: no memory left for the KV cache")
        return blocks

    @torch.inference_mode()
    def _profile_kv_budget(self) -> float:
        """Bytes left for the KV pool: gpu_memory_utilization * total minus what the weights,
        other processes and a profiling forward at the largest prefill batch use."""
        dev = self.device
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        n = min(self.config.max_num_batched_tokens, self.max_model_len)
        blocks = math.ceil(n / self.block_size) + 1
        cfg = self.model_config
        tmp = [torch.zeros(blocks, self.block_size, cfg.kv_cache_dim, dtype=self.kv_dtype,
                           device=dev) for _ in range(cfg.num_hidden_layers)]
        md = AttentionMetadata(
            query_start_loc=[0, n], seq_lens=[n],
            block_tables=torch.arange(blocks, dtype=torch.int32, device=dev)[None],
            slot_mapping=torch.arange(n, device=dev), num_decodes=0, block_size=self.block_size)
        ids = torch.randint(0, cfg.vocab_size, (n,), device=dev)
        hidden = self.model(ids, torch.arange(n, device=dev), tmp, md)
        self.model.compute_logits(hidden[-self.config.max_num_seqs:])
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        del tmp, hidden
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        ours_now = torch.cuda.memory_allocated(dev)
        others = total - free - torch.cuda.memory_reserved(dev)
        budget = total * self.config.gpu_memory_utilization - others - peak
        logger.info("KV budget %.2f GiB (weights %.2f GiB, profiling peak %.2f GiB)",
                    budget / 2**30, ours_now / 2**30, peak / 2**30)
        return budget

    # ------------------------------------------------------------------ step
    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flatten the batch into input ids, positions and attention metadata."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        max_blocks = 1
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            end = start + n
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            qsl.append(qsl[-1] + n)
            seq_lens.append(end)
            max_blocks = max(max_blocks, len(table))
        tables = torch.full((len(batch.seqs), max_blocks), self.scratch_block, dtype=torch.int32)
        for i, seq in enumerate(batch.seqs):
            if seq.block_table:
                tables[i, : len(seq.block_table)] = torch.tensor(seq.block_table, dtype=torch.int32)
        dev = self.device
        pin = dev.type == "cuda"

        def put(data, dtype):
            t = torch.tensor(data, dtype=dtype)
            return t.pin_memory().to(dev, non_blocking=True) if pin else t

        md = AttentionMetadata(
            query_start_loc=qsl, seq_lens=seq_lens,
            block_tables=tables.pin_memory().to(dev, non_blocking=True) if pin else tables,
            slot_mapping=put(slots, torch.int64), num_decodes=batch.num_decodes, block_size=bs,
            decode_seq_lens=put(seq_lens[: batch.num_decodes], torch.int32))
        return put(ids, torch.int64), put(positions, torch.int64), md

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepOutput:
        from atom_stream.layers.sampler import SamplingMetadata

        input_ids, positions, md = self.prepare(batch)
        sampled = [seq for seq, s in zip(batch.seqs, batch.sample) if s]
        n = len(batch.seqs)
        if (self.graphs is not None and batch.num_decodes == n and n <= self.graphs.max_batch):
            B = self.graphs.load_inputs(input_ids, positions, md.slot_mapping,
                                        md.decode_seq_lens, md.block_tables)
            logits, greedy = self.graphs.replay(B)
            logits = logits[:n]
            prompt_lps = None
        else:
            hidden = self.model(input_ids, positions, self.kv_caches, md)
            rows = [md.query_start_loc[i + 1] - 1 for i, s in enumerate(batch.sample) if s]
            prompt_lps = self._prompt_logprobs(batch, hidden, md)
            if not rows:
                return StepOutput(token_ids=[], prompt_logprobs=prompt_lps)
            logits = self.model.compute_logits(hidden[rows])
        meta = SamplingMetadata.from_sequences(sampled, logits.shape[-1], self.device)
        out = self.sampler(logits, meta)
        token_ids = out.token_ids.tolist()
        logprobs = None
        if out.logprobs is not None:
            lp, top_ids, top_lps = (t.tolist() for t in out.logprobs)
            logprobs = []
            for j, seq in enumerate(sampled):
                k = seq.params.logprobs
                logprobs.append(None if k is None else
                                (lp[j], list(zip(top_ids[j][:k], top_lps[j][:k]))))
        return StepOutput(token_ids=token_ids, logprobs=logprobs, prompt_logprobs=prompt_lps)

    def _prompt_logprobs(self, batch: ScheduledBatch, hidden: torch.Tensor,
                         md: AttentionMetadata) -> dict[int, list] | None:
        """For sequences asking prompt_logprobs: for each chunk position p with p+1 in the prompt,
        (logprob of prompt token p+1, top-k [(id, logprob)]). Keyed by batch index."""
        result = None
        for i, seq in enumerate(batch.seqs):
            k = seq.params.prompt_logprobs
            if k is None or i < batch.num_decodes:
                continue
            start = seq.num_computed_tokens
            n = min(batch.num_new_tokens[i], seq.num_prompt_tokens - 1 - start)
            if n <= 0:
                continue
            s = md.query_start_loc[i]
            lps = torch.log_softmax(self.model.compute_logits(hidden[s:s + n]), dim=-1)
            targets = torch.tensor(seq.token_ids[start + 1:start + 1 + n], device=lps.device)
            chosen = lps.gather(1, targets[:, None])[:, 0].tolist()
            entries = []
            if k:
                top_v, top_i = lps.topk(k, dim=-1)
                for j in range(n):
                    entries.append((chosen[j], list(zip(top_i[j].tolist(), top_v[j].tolist()))))
            else:
                entries = [(c, []) for c in chosen]
            result = result or {}
            result[i] = entries
        return result

    def shutdown(self) -> None:
        self.kv_caches = []


def _is_dir(path: str | None) -> bool:
    import os
    return bool(path) and os.path.isdir(path)
