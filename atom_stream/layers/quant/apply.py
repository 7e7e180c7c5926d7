"""Wiring quantized checkpoints into the model: `quant_init`, `apply_quantization`, the loader
hook, `weight_bytes_report`, `set_activation_quant`.

Runner sequence (engine/model_runner.py):

    with quant_init(cfg):                      # quantizable weights are built on `meta`
        model = model_cls(cfg, max_len, dtype, device)
    hooks = apply_quantization(model, cfg, online_quant_config=config.online_quant_config)
                                               # swap in packed buffers; materialize the rest
    load_checkpoint(model, path, ..., extra_hooks=hooks)   (or init_dummy_weights, then
                                               init_online_dummy_weights)
    logger.info(weight_bytes_report(model))

`quant_init` matters for full-size models: without it every routed expert would first be
allocated dense (bf16 experts of one K2.5 TP8 rank do not fit a GPU). It defers each Linear
weight and Experts w13/w2 as it is registered (global parameter-registration hook; the dense
tensor is freed at once). `apply_quantization` works with or without it.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook

from atom_stream.config import ModelConfig
from atom_stream.layers.linear import Linear
from atom_stream.layers.parallel import TPInfo, tp
from atom_stream.layers.quant import config as qc
from atom_stream.layers.quant.common import CheckpointError, log_once, real_device
from atom_stream.layers.quant.fp8_block import Fp8BlockLinearMethod, Fp8BlockMoEMethod
from atom_stream.layers.quant.int4_pack import Int4LinearMethod, Int4MoEMethod
from atom_stream.layers.quant.kv_cache import KvScaleHook
from atom_stream.layers.quant.mxfp4 import Mxfp4LinearMethod, Mxfp4MoEMethod
from atom_stream.layers.quant.online import PTPC_FP8, OnlineQuantConfig, parse_online_quant_config
from atom_stream.layers.quant.ptpc_fp8 import OnlineFp8BlockLinearMethod, PtpcFp8LinearMethod
from atom_stream.layers.quant.w4a8 import W4A8LinearMethod, W4A8MoEMethod
from atom_stream.models.deepseek_v3 import Experts

logger = logging.getLogger(__name__)

METHODS = {
    qc.INT4: (Int4LinearMethod, Int4MoEMethod),
    qc.MXFP4: (Mxfp4LinearMethod, Mxfp4MoEMethod),
    qc.W4A8: (W4A8LinearMethod, W4A8MoEMethod),
    qc.FP8_BLOCK: (Fp8BlockLinearMethod, Fp8BlockMoEMethod),
}
# online_quant_config targets (layers/quant/online.py): Linear methods fed from float weights
ONLINE_METHODS = {PTPC_FP8: PtpcFp8LinearMethod, qc.FP8_BLOCK: OnlineFp8BlockLinearMethod}
_EXPERT_RE = re.compile(r"^(.+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(\w+)$")


def _deferrable(module: nn.Module, name: str) -> bool:
    return (isinstance(module, Linear) and name == "weight") or (
        isinstance(module, Experts) and name in ("w13", "w2"))


@contextmanager
def quant_init(model_config: ModelConfig):
    """Build quantizable weights on `meta` while the model is constructed (no-op when the
    checkpoint is unquantized)."""
    if qc.parse_quant_config(model_config.quantization_config) is None:
        yield
        return

    def hook(module, name, param):
        if param is None or not _deferrable(module, name) or param.device.type == "meta":
            return None
        meta = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
        meta.real_device = param.device
        return meta

    handle = register_module_parameter_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class QuantLoader:
    """Loader hook for the quantized layers' checkpoint tensors; `check_complete()` names the
    first one that never arrived."""

    def __init__(self):
        self.linears: dict[str, nn.Module] = {}
        self.experts: dict[str, nn.Module] = {}
        self.arrived: set[tuple] = set()

    def __call__(self, name: str, get, shape) -> bool:
        m = _EXPERT_RE.match(name)
        if m and m.group(1) in self.experts:
            prefix, idx, proj, suffix = m.group(1), int(m.group(2)), m.group(3), m.group(4)
            experts = self.experts[prefix]
            if idx >= experts.num_experts:
                raise CheckpointError(f"{name}: expert {idx} out of range "
                                      f"({experts.num_experts} experts)")
            local = idx - experts.expert_start  # expert parallel: buffers hold our experts only
            if (self._accept(experts.quant_method, suffix, name, prefix)
                    and 0 <= local < experts.num_local_experts):  # others' are never read
                experts.quant_method.load(experts, local, proj, suffix, get(), name)
                self.arrived.add((prefix, idx, proj, suffix))
            return True
        prefix, _, suffix = name.rpartition(".")
        layer = self.linears.get(prefix)
        if layer is None:
            if name.rsplit(".", 1)[0] in self.experts:  # transformers-5 fused dense experts
                raise CheckpointError(f"{name}: dense experts in a checkpoint whose "
                                      "quantization_config quantizes them")
            return False
        if self._accept(layer.quant_method, suffix, name, prefix):
            layer.quant_method.load(layer, suffix, get(), name)
            self.arrived.add((prefix, suffix))
        return True

    @staticmethod
    def _accept(method, suffix: str, name: str, prefix: str) -> bool:
        if suffix in method.suffixes:
            return True
        if suffix in method.optional:
            return False
        raise CheckpointError(
            f"{name}: quantization_config makes {prefix} {method.format} (tensors "
            f"{', '.join(method.suffixes)}), but the checkpoint has {suffix!r} there")

    def check_complete(self) -> None:
        for prefix, layer in self.linears.items():
            for s in layer.quant_method.suffixes:
                if (prefix, s) not in self.arrived:
                    raise CheckpointError(f"checkpoint is missing tensor '{prefix}.{s}'")
        for prefix, ex in self.experts.items():
            for e in range(ex.expert_start, ex.expert_start + ex.num_local_experts):
                for p in ("gate_proj", "up_proj", "down_proj"):
                    for s in ex.quant_method.suffixes:
                        if (prefix, e, p, s) not in self.arrived:
                            raise CheckpointError(
                                f"checkpoint is missing tensor '{prefix}.{e}.{p}.{s}'")


def _materialize(model: nn.Module) -> None:
    """Give every still-deferred (meta) parameter real, uninitialized storage."""
    for module in model.modules():
        for pname, p in list(module._parameters.items()):
            if p is not None and p.device.type == "meta":
                new = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=real_device(p)),
                                   requires_grad=False)
                if hasattr(p, "tp_dim"):
                    new.tp_dim = p.tp_dim
                setattr(module, pname, new)


def apply_quantization(model: nn.Module, model_config: ModelConfig,
                       tp_info: TPInfo | None = None, online_quant_config=None) -> list:
    """Swap the layers the checkpoint quantizes for their packed buffers (filled with valid dummy
    values) and return the loader hooks for `load_checkpoint(..., extra_hooks=...)`: the
    quantized-tensor loader (when anything is quantized) and the KV k_scale reader (always).

    `online_quant_config` (EngineConfig.online_quant_config, ATOM's --online_quant_config; see
    layers/quant/online.py): the Linear layers the checkpoint leaves unquantized and the config
    selects get an online method (ptpc_fp8 / per_block_fp8) whose loader quantizes the float
    checkpoint weight; checkpoint-quantized layers keep their method."""
    info = tp_info or tp()
    cfg = qc.parse_quant_config(model_config.quantization_config)
    online = parse_online_quant_config(online_quant_config)
    loader = QuantLoader()
    methods: dict[tuple, object] = {}
    if cfg is not None or online is not None:
        for name, module in list(model.named_modules()):
            kind, scheme = _layer_scheme(cfg, online, name, module)
            if scheme is None:
                continue
            key = (kind, scheme)
            if key not in methods:
                methods[key] = (ONLINE_METHODS[scheme.format] if kind == 2
                                else METHODS[scheme.format][kind])(scheme)
            if kind == 1:
                methods[key].create(module, name, info)
                loader.experts[name] = module
            else:
                methods[key].create(module, name)
                loader.linears[name] = module
        _log_methods(cfg, online, loader, methods)
    _materialize(model)
    hooks: list = [KvScaleHook(model)]
    if loader.linears or loader.experts:
        hooks.insert(0, loader)
    return hooks


def _layer_scheme(cfg, online: OnlineQuantConfig | None, name: str, module: nn.Module):
    """(kind, scheme) of one module: kind 0 a Linear the checkpoint quantizes, 1 routed experts,
    2 a Linear the checkpoint leaves unquantized (scheme: its online target); scheme None: the
    module stays as built."""
    if isinstance(module, Linear):
        scheme = cfg.scheme(name) if cfg is not None else None
        if scheme is not None:
            return 0, scheme
        return 2, online.scheme(name) if online is not None else None
    if isinstance(module, Experts):
        scheme = cfg.experts_scheme(name, module.num_experts) if cfg is not None else None
        if scheme is None and online is not None:
            _online_experts(online, name)
        return 1, scheme
    return 0, None


def _online_experts(online: OnlineQuantConfig, name: str) -> None:
    """Routed experts the online config selects stay in the model dtype (Linear layers only)."""
    scheme = online.scheme(name)
    if scheme is not None:
        log_once("online-experts", "online_quant_config selects the routed experts (e.g. %s) "
                 "for %s: online quantization covers Linear layers only here, the unquantized "
                 "experts stay in the model dtype (exclude them, e.g. \"*expert*\", to "
                 "silence this)", name, scheme.format)


def _log_methods(cfg, online, loader: QuantLoader, methods: dict) -> None:
    """One line: the checkpoint's quantized layers, then the online-quantized linears."""
    def formats(online_kind: bool) -> str:
        return ", ".join(sorted({m.format for (k, _), m in methods.items()
                                 if (k == 2) == online_kind})) or "none"

    n_online = sum(1 for lyr in loader.linears.values() if lyr.quant_method.online)
    tail = (f"; online_quant_config {online.describe()}: {n_online} linears quantized at load "
            f"({formats(True)})" if online is not None else "")
    logger.info("quantization %s: %d MoE layers and %d linears quantized (%s)%s",
                cfg.method if cfg is not None else "none", len(loader.experts),
                len(loader.linears) - n_online, formats(False), tail)


@torch.no_grad()
def init_online_dummy_weights(model: nn.Module, seed: int) -> None:
    """Dummy weights (load_format dummy, the demo) of the online-quantized Linears: each one
    quantizes the float weight loader.init_dummy_weights gives the same Linear unquantized
    (generator seed + crc32 of `{layer}.weight`, the whole [out, in] tensor N(0, 1/sqrt(in)) in
    float32, rounded to the model dtype; the method's `load` keeps this rank's shard), so an
    online_quant_config on a dummy model quantizes that model. Call after init_dummy_weights."""
    import zlib

    for name, layer in model.named_modules():
        method = getattr(layer, "quant_method", None)
        if not (isinstance(layer, Linear) and getattr(method, "online", False)):
            continue
        pname = f"{name}.weight"
        dev = layer.weight.device
        g = torch.Generator(device=dev).manual_seed(seed + zlib.crc32(pname.encode()))
        shape = method.full_shape(layer)
        full = torch.empty(shape, dtype=torch.float32, device=dev).normal_(
            0.0, shape[-1] ** -0.5, generator=g)
        method.load(layer, "weight", full.to(layer.quant_dtype), pname)


def weight_bytes_report(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's registered tensors, keyed by the quant format of the layer that owns
    them (e.g. "int4_pack", "mxfp4", "w4a8_fp8", "fp8_block") or else by dtype ("bfloat16")."""
    out: dict[str, int] = {}
    seen: set[int] = set()
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        tensors = list(module._parameters.values()) + list(module._buffers.values())
        for t in tensors:
            if t is None or t.device.type == "meta" or id(t) in seen:
                continue
            seen.add(id(t))
            key = method.format if method is not None else str(t.dtype).replace("torch.", "")
            out[key] = out.get(key, 0) + t.numel() * t.element_size()
    return out


def set_activation_quant(model: nn.Module, enabled: bool) -> None:
    """Turn dynamic activation quantization of FP8-block layers on/off (weight-only tests)."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None and hasattr(method, "act_quant"):
            method.act_quant = enabled
