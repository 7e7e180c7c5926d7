"""ATOM's `--online_quant_config` (EngineConfig.online_quant_config): weights of unquantized
Linear layers quantized while they load (ATOM docs/online_quantization_guide.md, atom/config.py
QuantizationConfig, atom/quant_spec.py QuarkOnlineParser).

The value is one JSON object with three optional keys:

    {"global_quant_config": "ptpc_fp8",                 # every Linear (default target)
     "layer_quant_config": {"*self_attn*": "ptpc_fp8"},  # pattern -> target, first match wins
     "exclude_layer": ["lm_head", "*.gate.*"]}          # str or list: left at source precision

Targets (case-insensitive, as ATOM's FORMAT_MAP): "ptpc_fp8" (FP8 e4m3 weights, one fp32 scale
per output channel; activations quantized per token at run time: layers/quant/ptpc_fp8.py),
"per_block_fp8" / "per_block128_fp8" (DeepSeek FP8, 128x128 weight blocks, activations per
token per 128 channels: layers/quant/fp8_block.py's method, quantized at load). "mxfp4" and
"mxfp8" are ATOM targets this engine does not implement: a ConfigError naming them.

Resolution for a layer (ATOM's get_layer_quant_config(use_online_quant=True)):
1. `exclude_layer`: "re:<regex>" (re.search), a glob (`*`, `?`, `[`: fnmatch on the name or on
   a module below it), else the exact name or a parent module name -> not quantized;
2. the first `layer_quant_config` pattern that matches (glob: fnmatch; else ATOM's
   `name in pattern`, i.e. the exact name);
3. `global_quant_config` ("" or absent: the layer keeps its source precision).

Names are ours after the loader's mapping (`model.layers.3.self_attn.o_proj`), in each spelling
a config may use: as is, with Kimi-K2.5's `language_model.` prefix (ATOM's module names there),
and ATOM's packed names (`fused_qkv_a_proj` for q_a_proj / kv_a_proj_with_mqa, `gate_up_proj`
for gate_proj / up_proj; patterns naming the unpacked ones are remapped to the packed name, as
ATOM's remap_layer_name does, so both halves of a packed module always agree). Only Linear
layers the checkpoint leaves unquantized are affected (a checkpoint-quantized layer keeps its
method, as ATOM passes MXFP4 through); `lm_head` is never quantized (ATOM's ParallelLMHead is
not a Linear); routed experts stay in the model dtype (layers/quant/apply.py logs it).
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from typing import Any

from atom_stream.config import ConfigError
from atom_stream.layers.quant.config import FP8_BLOCK, QuantScheme, name_forms

PTPC_FP8 = "ptpc_fp8"  # FP8 e4m3 per-channel weights, per-token dynamic activations

KEYS = ("global_quant_config", "layer_quant_config", "exclude_layer")
TARGETS: dict[str, QuantScheme] = {
    "ptpc_fp8": QuantScheme(PTPC_FP8, act="fp8_token"),
    "per_block_fp8": QuantScheme(FP8_BLOCK, act="fp8_group", block=(128, 128)),
    "per_block128_fp8": QuantScheme(FP8_BLOCK, act="fp8_group", block=(128, 128)),
}
UNSUPPORTED = ("mxfp4", "mxfp8")  # ATOM targets not implemented here
# ATOM's packed modules (DeepSeek-V3 / Kimi): our separate projections and the packed name
PACKED = {"q_a_proj": "fused_qkv_a_proj", "kv_a_proj_with_mqa": "fused_qkv_a_proj",
          "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
_WHERE = "online_quant_config"


def _target(value: Any, where: str) -> QuantScheme | None:
    """The scheme a format string names (None: "" = no target)."""
    if not isinstance(value, str):
        raise ConfigError(f"{_WHERE}.{where}: expected a format string, got {value!r}")
    key = value.strip().lower()
    if not key:
        return None
    if key in UNSUPPORTED:
        raise ConfigError(f"{_WHERE}.{where}: online quantization to {key} is not supported "
                          f"here (supported: {', '.join(TARGETS)})")
    if key not in TARGETS:
        raise ConfigError(f"{_WHERE}.{where}: unknown format {value!r} (supported: "
                          f"{', '.join(TARGETS)})")
    return TARGETS[key]


def _packed(pattern: str) -> str:
    """ATOM's remap of a pattern naming an unpacked projection to its packed module."""
    for part, packed in PACKED.items():
        if "." + part in pattern:
            return pattern.replace(part, packed, 1)
    return pattern


def _is_glob(p: str) -> bool:
    return any(c in p for c in "*?[")


def layer_forms(name: str) -> tuple[str, ...]:
    """`name` as ATOM may spell it: name_forms, each also with its packed module name."""
    forms = list(name_forms(name))
    last = name.rpartition(".")[2]
    if last in PACKED:
        forms += [f.rpartition(".")[0] + "." + PACKED[last] for f in name_forms(name)]
    return tuple(forms)


def _excluded(forms: tuple[str, ...], entry: str) -> bool:
    if entry.startswith("re:"):
        pat = re.compile(entry[3:])
        return any(pat.search(f) for f in forms)
    if _is_glob(entry):
        return any(fnmatch.fnmatchcase(f, entry) or fnmatch.fnmatchcase(f, entry + ".*")
                   for f in forms)
    return any(f == entry or f.startswith(entry + ".") for f in forms)


@dataclass
class OnlineQuantConfig:
    """A parsed, validated online_quant_config; `scheme(name)` -> the target or None."""

    global_scheme: QuantScheme | None
    layers: list[tuple[str, QuantScheme | None]]
    exclude: list[str]
    raw: dict

    def scheme(self, name: str) -> QuantScheme | None:
        """The online target of the Linear called `name` (None: it keeps its precision)."""
        if name == "lm_head":
            return None
        forms = layer_forms(name)
        if any(_excluded(forms, e) for e in self.exclude):
            return None
        for pattern, scheme in self.layers:
            pats = {pattern, _packed(pattern)}
            if _is_glob(pattern):
                hit = any(fnmatch.fnmatchcase(f, p) for f in forms for p in pats)
            else:
                hit = any(f in p for f in forms for p in pats)
            if hit:
                return scheme
        return self.global_scheme

    def describe(self) -> str:
        return json.dumps(self.raw, sort_keys=True)


def parse_online_quant_config(raw: Any) -> OnlineQuantConfig | None:
    """Validate ATOM's online_quant_config (a dict, a JSON string, or None) -> the parsed config,
    or None when it quantizes nothing ({} / no targets). Any malformed field, unknown key or
    unsupported target is a ConfigError naming it."""
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as e:
            raise ConfigError(f"{_WHERE}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{_WHERE}: must be a JSON object with keys {', '.join(KEYS)} "
                          f"(got {raw!r})")
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise ConfigError(f"{_WHERE}: unknown key {unknown[0]!r} (known: {', '.join(KEYS)})")
    global_scheme = _target(raw.get("global_quant_config") or "", "global_quant_config")
    layer_cfg = raw.get("layer_quant_config") or {}
    if not isinstance(layer_cfg, dict):
        raise ConfigError(f"{_WHERE}.layer_quant_config: must be an object of layer pattern -> "
                          f"format (got {layer_cfg!r})")
    layers = [(str(p), _target(f, f"layer_quant_config[{p!r}]")) for p, f in layer_cfg.items()]
    exclude = raw.get("exclude_layer") or []
    if isinstance(exclude, str):
        exclude = [exclude]
    if not isinstance(exclude, list) or not all(isinstance(e, str) for e in exclude):
        raise ConfigError(f"{_WHERE}.exclude_layer: must be a layer pattern or a list of them "
                          f"(got {raw.get('exclude_layer')!r})")
    if global_scheme is None and not any(s for _, s in layers):
        return None
    return OnlineQuantConfig(global_scheme, layers, [e for e in exclude if e], dict(raw))
