"""Configuration: `EngineConfig` (the engine's settings, the CLI flags' names) and,
re-exported from `model_config`, `ModelConfig` (parsed from a checkpoint's config.json).

Config is read here and in `model_config` and nowhere else.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from atom_stream.model_config import (  # noqa: F401 - the public names
    SUPPORTED_ARCHITECTURES,
    ConfigError,
    ModelConfig,
    RopeScaling,
    apply_hf_overrides,
    check_hf_overrides,
    generation_eos_ids,
    generation_sampling_defaults,
    yarn_get_mscale,
)

_KV_CACHE_DTYPES = ("auto", "bf16", "fp8", "fp8_e4m3")
_DTYPES = ("auto", "float32", "bfloat16", "float16")
# vLLM's --dtype spellings (and torch dtypes, in-process) -> ours
_DTYPE_ALIASES = {"half": "float16", "float": "float32", "fp16": "float16", "bf16": "bfloat16",
                  "fp32": "float32"}
_BOOL_FIELDS = ("enable_expert_parallel", "headless", "enforce_eager", "trust_remote_code",
                "enable_prefix_caching")
_LOAD_FORMATS = ("auto", "dummy", "safetensors")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# what a text-only engine reads from a checkpoint (weights skipped for dummy loads)
_HUB_FILES = ["*.json", "*.py", "*.model", "*.tiktoken", "*.txt", "*.jinja"]

logger = logging.getLogger(__name__)


def _is(*values: Any) -> Any:
    return lambda v: v in values


def _at_most(limit: float) -> Any:
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= limit


# vLLM engine keywords (EngineArgs) that vLLM scripts pass to LLM(...) / AsyncLLM and that have no
# effect here: name -> (the values that are a no-op here, why). Other values ask for behaviour
# this engine does not implement: a ConfigError naming the keyword.
_VLLM_NOOP_KWARGS: dict[str, tuple[Any, str]] = {
    "disable_log_stats": (_is(True, False), "statistics are in stats() and on /metrics"),
    "enable_chunked_prefill": (_is(True, False, None), "prefill is always chunked here"),
    "swap_space": (_at_most(float("inf")), "preemption recomputes; nothing is swapped"),
    "cpu_offload_gb": (_at_most(0), "weights are not offloaded to the CPU here"),
    "disable_custom_all_reduce": (_is(True, False), "collectives are torch.distributed's"),
    "max_seq_len_to_capture": (_at_most(float("inf")), "graph sizes: cudagraph_capture_sizes"),
    "tokenizer_mode": (_is("auto", "hf", None), "the tokenizer is the checkpoint's own"),
    "revision": (_is(None), "pass a local directory to pin a revision"),
    "tokenizer_revision": (_is(None), "pass a local directory to pin a revision"),
    "code_revision": (_is(None), "pass a local directory to pin a revision"),
    "download_dir": (_is(None), "hub models go to the Hugging Face cache"),
    "max_logprobs": (_at_most(20), "logprobs are served up to 20 per token"),
    "distributed_executor_backend": (_is(None, "mp", "uni"), "TP ranks are spawned processes"),
    "pipeline_parallel_size": (_is(1), "pipeline parallelism is not implemented (only 1)"),
}


def _drop_vllm_noop_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` without the _VLLM_NOOP_KWARGS keywords (each given one logged as accepted with
    no effect); a value that asks for more than a no-op is a ConfigError naming the keyword."""
    rest = {}
    for name, value in kwargs.items():
        spec = _VLLM_NOOP_KWARGS.get(name)
        if spec is None:
            rest[name] = value
            continue
        ok, why = spec
        if not ok(value):
            raise ConfigError(f"{name}: {value!r} is not supported here ({why})")
        logger.info("%s=%r accepted for vLLM compatibility; no effect here: %s", name, value, why)
    return rest


def resolve_model_path(model: str | None, load_format: str = "auto") -> str | None:
    """A Hugging Face hub id ("moonshotai/Kimi-K2.5", as the usage guide's BF16 command gives)
    -> its snapshot directory: the local cache first, then a download (huggingface_hub; no
    download with HF_HUB_OFFLINE=1). Local paths, "demo" and bench presets pass through.
    Raises ConfigError naming the model when it cannot be resolved. Called where an engine
    starts (LLMEngine, a multi-node worker node), not when a config is parsed."""
    if not model or os.path.exists(model) or not _HUB_ID.match(model):  # "owner/name" only
        return model
    try:
        from huggingface_hub import snapshot_download
        patterns = _HUB_FILES + ([] if load_format == "dummy" else ["*.safetensors"])
        try:
            return snapshot_download(model, allow_patterns=patterns, local_files_only=True)
        except Exception:  # noqa: BLE001 - not (fully) cached: fetch it
            return snapshot_download(model, allow_patterns=patterns)
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, no access, ...
        raise ConfigError(f"model: {model!r} is not a local directory, and as a Hugging Face "
                          f"hub id it could not be found in the cache or downloaded "
                          f"({type(e).__name__}: {e})") from None


@dataclass
class EngineConfig:
    """Engine settings. Keyword names match the CLI flags (`--max-num-seqs` == `max_num_seqs`).

    `model`: a checkpoint directory, "demo" (or None) for the embedded tiny model, or a
    bench preset name ("k25-tp8-rank", ...) which implies dummy weights. `model` / `tokenizer`
    may be os.PathLike (stored as str); text fields are strings or None, sizes positive integers
    or None (`kv_cache_memory_bytes` included): anything else is a ConfigError naming the field.

    Step budgets as vLLM's: an unset `max_num_seqs` is min(DEFAULT_MAX_NUM_SEQS,
    max_num_batched_tokens) (EngineArgs); a given one above `max_num_batched_tokens` is a
    ConfigError (SchedulerConfig.verify_max_model_len). Its max_num_batched_tokens >=
    max_model_len check guards runs without chunked prefill only: this engine always chunks.
    """

    DEFAULT_MAX_NUM_SEQS: ClassVar[int] = 256

    model: str | None = "demo"
    tokenizer: str | None = None
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    # multi-node TP (engine/multinode.py): this is node `node_rank` of `nnodes`, each hosting
    # tensor_parallel_size / nnodes ranks; all rendezvous at master_addr:master_port (node 0).
    # headless: this node runs TP ranks only (nodes 1..nnodes-1; node 0 runs the server)
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    headless: bool = False
    kv_cache_dtype: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    block_size: int = 16
    max_num_seqs: int | None = None  # None: min(DEFAULT_MAX_NUM_SEQS, max_num_batched_tokens)
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None
    enforce_eager: bool = False
    cudagraph_capture_sizes: list[int] | None = None
    load_format: str = "auto"
    trust_remote_code: bool = False
    enable_prefix_caching: bool = True
    seed: int | None = 0  # None: a random seed, drawn once (every rank and replica shares it)
    max_waiting_requests: int = 4096
    served_model_name: str | None = None
    chat_template: str | None = None
    # KV pool size in bytes when num_kv_blocks is unset (a positive integer or None); on a GPU
    # it overrides gpu_memory_utilization's sizing, as vLLM's --kv-cache-memory-bytes
    kv_cache_memory_bytes: int | None = None
    # the CPU runs one step behind the device (engine/pipeline.py); None = on when the runner
    # supports it (single rank), False = the synchronous loop
    async_scheduling: bool | None = None
    # TP: a step that has not finished after this many seconds means a rank is hung (alive but
    # stuck, e.g. inside a collective): the engine is marked dead, its requests fail, /health
    # turns 503 and the local workers are killed (SGLang's --watchdog-timeout, same default)
    watchdog_timeout: float = 300.0
    # vLLM's hf_overrides: config.json fields to override (a dict; apply_hf_overrides), applied
    # wherever the model config is read (the engine, every TP rank, DP replica, worker node)
    hf_overrides: dict[str, Any] | None = None
    # vLLM's --scheduling-policy: only "fcfs" (first come, first served) is implemented;
    # "priority" is a ConfigError, and so is a request priority other than 0
    scheduling_policy: str = "fcfs"
    # ATOM's --online_quant_config: {"global_quant_config", "layer_quant_config",
    # "exclude_layer"} (a dict, or its JSON text); the unquantized Linear layers it selects are
    # quantized at load (ptpc_fp8 / per_block_fp8; layers/quant/online.py). None / {}: none
    online_quant_config: dict[str, Any] | None = None
    # vLLM's quantization: None (the checkpoint's quantization_config decides), or the
    # checkpoint's own quant_method ("compressed-tensors", "fp8", "quark"), checked where the
    # model config is read (layers/quant/config.check_requested_method); else a ConfigError
    quantization: str | None = None

    def __post_init__(self) -> None:
        for name in ("model", "tokenizer"):  # a pathlib.Path is a path: read it as its string
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
        dt = self.dtype
        if not isinstance(dt, str) and str(dt).startswith("torch."):  # torch.float16 etc.
            dt = str(dt)[len("torch."):]
        self.dtype = _DTYPE_ALIASES.get(dt, dt) if isinstance(dt, str) else dt
        for name in _BOOL_FIELDS:  # 0 / 1 read as false / true (vLLM's EngineArgs takes them)
            value = getattr(self, name)
            if type(value) is int and value in (0, 1):
                setattr(self, name, bool(value))
        if self.seed is None:
            self.seed = int.from_bytes(os.urandom(4), "little") >> 1
        if self.max_num_seqs is None:  # a bad budget is validate()'s to refuse
            b = self.max_num_batched_tokens
            ok = isinstance(b, int) and not isinstance(b, bool) and b >= 1
            self.max_num_seqs = min(self.DEFAULT_MAX_NUM_SEQS, b if ok else 1 << 30)
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{name}: {why} (got {getattr(self, name)!r})")

        if self.kv_cache_dtype not in _KV_CACHE_DTYPES:
            raise bad("kv_cache_dtype", f"must be one of {_KV_CACHE_DTYPES}")
        if self.dtype not in _DTYPES:
            raise bad("dtype", f"must be one of {_DTYPES}")
        if self.load_format not in _LOAD_FORMATS:
            raise bad("load_format", f"must be one of {_LOAD_FORMATS}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise bad("device", "must be auto, cpu, cuda or cuda:N")
        for name in ("tensor_parallel_size", "data_parallel_size", "block_size", "max_num_seqs",
                     "max_num_batched_tokens", "max_waiting_requests"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, "must be a positive integer")
        if self.block_size & (self.block_size - 1):
            raise bad("block_size", "must be a power of two")
        if self.max_num_batched_tokens < self.max_num_seqs:  # vLLM's message, then the flags
            raise ConfigError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be greater than "
                f"or equal to max_num_seqs ({self.max_num_seqs}): raise "
                f"--max-num-batched-tokens or lower --max-num-seqs")
        def count(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1

        for name in ("max_model_len", "num_kv_blocks", "kv_cache_memory_bytes"):
            if getattr(self, name) is not None and not count(getattr(self, name)):
                raise bad(name, "must be a positive integer")
        for name in ("model", "tokenizer", "served_model_name", "chat_template"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise bad(name, "must be a string")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")
        if self.quantization is not None and (not isinstance(self.quantization, str)
                                              or not self.quantization.strip()):
            raise bad("quantization", "must be a quantization method name or null")
        gmu = self.gpu_memory_utilization
        if isinstance(gmu, bool) or not isinstance(gmu, (int, float)) or not 0.0 < gmu <= 1.0:
            raise bad("gpu_memory_utilization", "must be a number in (0, 1]")
        if self.cudagraph_capture_sizes is not None:
            sizes = self.cudagraph_capture_sizes
            if (not isinstance(sizes, (list, tuple)) or not sizes
                    or not all(count(s) for s in sizes)):
                raise bad("cudagraph_capture_sizes", "must be a non-empty list of positive ints")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise bad("seed", "must be an integer or null (random)")
        self._validate_nodes(bad)
        check_hf_overrides(self.hf_overrides)
        self._validate_online_quant()
        if self.scheduling_policy == "priority":
            raise ConfigError("scheduling_policy: priority scheduling is not implemented "
                              "(--scheduling-policy priority); only fcfs, the default, is")
        if self.scheduling_policy != "fcfs":
            raise bad("scheduling_policy", "must be fcfs (the only policy implemented)")
        if self.async_scheduling not in (None, True, False):
            raise bad("async_scheduling", "must be true, false or null (auto)")
        if (isinstance(self.watchdog_timeout, bool)
                or not isinstance(self.watchdog_timeout, (int, float))
                or not self.watchdog_timeout > 0):
            raise bad("watchdog_timeout", "must be a positive number of seconds")

    def _validate_online_quant(self) -> None:
        """online_quant_config: a JSON text becomes its dict; a malformed one, an unknown key or
        an unsupported target (mxfp4 / mxfp8) is a ConfigError naming it."""
        raw = self.online_quant_config
        if raw is None:
            return
        from atom_stream.layers.quant.online import parse_online_quant_config

        parse_online_quant_config(raw)
        if isinstance(raw, str):
            self.online_quant_config = json.loads(raw) if raw.strip() else None

    def _validate_nodes(self, bad) -> None:
        """Multi-node fields (engine/multinode.py)."""
        for name in ("nnodes", "node_rank"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (1 if name == "nnodes" else 0):
                raise bad(name, "must be a positive integer" if name == "nnodes"
                          else "must be a non-negative integer")
        if self.node_rank >= self.nnodes:
            raise bad("node_rank", f"must be below nnodes ({self.nnodes})")
        if self.headless and self.node_rank == 0:
            raise bad("headless", "node 0 runs the server; --headless is for --node-rank >= 1")
        if self.node_rank > 0 and not self.headless:
            raise bad("node_rank", "nodes other than 0 run TP ranks only: add --headless")
        if self.nnodes == 1:
            return
        if self.tensor_parallel_size % self.nnodes:
            raise bad("nnodes", f"must divide tensor_parallel_size ({self.tensor_parallel_size})")
        if self.data_parallel_size > 1:
            raise bad("nnodes", "multi-node runs one TP engine (data_parallel_size 1); for data "
                      "parallelism run one server per node")
        if not self.master_addr:
            raise bad("master_addr", "node 0's address is required with nnodes > 1 "
                      "(--master-addr or MASTER_ADDR)")
        if (not isinstance(self.master_port, int) or isinstance(self.master_port, bool)
                or not 0 < self.master_port < 65536):
            raise bad("master_port", "a TCP port is required with nnodes > 1 "
                      "(--master-port or MASTER_PORT)")

    @property
    def is_demo(self) -> bool:
        return self.model in (None, "", "demo")

    @property
    def kv_cache_is_fp8(self) -> bool:
        return self.kv_cache_dtype in ("fp8", "fp8_e4m3")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Build from keyword arguments, rejecting unknown names with a clear error. vLLM's
        engine keywords that have no effect here (_VLLM_NOOP_KWARGS) are accepted with a log
        line at their no-op values and refused by name otherwise."""
        kwargs = _drop_vllm_noop_kwargs(kwargs)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown engine argument")
        return cls(**kwargs)
