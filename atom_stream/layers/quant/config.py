"""`quantization_config` -> QuantConfig: which scheme quantizes the layer called NAME.

Formats (model_spec.md §4):
- compressed-tensors `pack-quantized` INT4 (Kimi-K2-Thinking / K2.5): `config_groups` with
  `targets` ("Linear" = every linear, or names / `re:` regexes) and an `ignore` list.
- AMD Quark (`quant_method: quark`): MXFP4 w4a4 / w4a16 (fp4 per_group 32, e8m0 scales) and W4A8
  (`weight` is a list of two specs: fp8_e4m3 per_tensor + int4 per_channel). Resolution order
  (vLLM QuarkConfig): `exclude` -> `layer_quant_config` (fnmatch patterns) ->
  `layer_type_quant_config` ("Linear") -> `global_quant_config`.
- DeepSeek-V3 FP8 block (`quant_method: fp8`, `weight_block_size`): every Linear except lm_head,
  minus `ignored_layers` / `modules_to_not_convert` when present.

Names are ours (`model.layers.3.mlp.experts.0.gate_proj`, `lm_head`); an ignore/exclude entry
matches when it matches any of the name's checkpoint spellings: as is, with the Kimi-K2.5
`language_model.` prefix, or the NVFP4 re-export's `language_model.layers.*` (ATOM's
quant_exclude_name_mapping). Entries: `re:<regex>` (re.match, as compressed-tensors and Quark
do), an exact module name, or a parent module name (`model.layers.0.mlp` covers its children).
Routed experts are asked per projection (`{experts}.{e}.{gate,up,down}_proj`); the three must
agree, since they share one stacked MoE method.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from atom_stream.config import ConfigError

INT4 = "int4_pack"      # compressed-tensors pack-quantized INT4, group scales, W4A16
MXFP4 = "mxfp4"         # Quark OCP MXFP4 (fp4 e2m1 x2 per byte, e8m0 group-32 scales)
W4A8 = "w4a8_fp8"       # Quark INT4 weights re-quantized at load to FP8 per tensor
FP8_BLOCK = "fp8_block"  # FP8 e4m3 weights with [128, 128] block scales (weight_scale_inv)


@dataclass(frozen=True)
class QuantScheme:
    """How one layer is quantized. `act`: runtime activation quantization —
    None (weight-only), "mxfp4" (dynamic per 32), "fp8_token" (dynamic per token),
    "fp8_static" (checkpoint input_scale, per tensor), "fp8_group" (dynamic per token-group of
    block[1], DeepSeek FP8)."""

    format: str
    group_size: int = 32
    act: str | None = None
    block: tuple[int, int] = (128, 128)
    ue8m0: bool = False  # FP8 block: activation scales rounded up to powers of two (V3.1)


def name_forms(name: str) -> tuple[str, ...]:
    """Our module name in every spelling a checkpoint config may use for it."""
    forms = [name, "language_model." + name]
    if name.startswith("model."):
        forms.append("language_model." + name[len("model."):])
    return tuple(forms)


def _entry_matches(entry: str, forms: tuple[str, ...]) -> bool:
    if entry.startswith("re:"):
        pat = re.compile(entry[3:])
        return any(pat.match(f) for f in forms)
    return any(f == entry or f.startswith(entry + ".") for f in forms)


def matches_any(name: str, entries) -> bool:
    forms = name_forms(name)
    return any(_entry_matches(e, forms) for e in entries or ())


class QuantConfig:
    """Answers `scheme(name)` (None: the layer stays unquantized)."""

    method: str = ""

    def scheme(self, name: str) -> QuantScheme | None:
        raise NotImplementedError

    def experts_scheme(self, prefix: str, num_experts: int) -> QuantScheme | None:
        """The scheme of the stacked routed experts at `prefix` (`model.layers.N.mlp.experts`)."""
        names = [f"{prefix}.{e}.{p}" for e in {0, num_experts - 1}
                 for p in ("gate_proj", "up_proj", "down_proj")]
        schemes = {self.scheme(n) for n in names}
        if len(schemes) > 1:
            raise ConfigError(f"quantization_config: the routed experts at {prefix} mix schemes "
                              f"({sorted(map(str, schemes))}); one scheme per MoE layer only")
        return schemes.pop()

    def kv_cache_quantized(self) -> bool:
        return False


# ---------------------------------------------------------------- compressed-tensors
class CompressedTensorsConfig(QuantConfig):
    method = "compressed-tensors"

    def __init__(self, raw: dict):
        fmt = raw.get("format")
        self.ignore = list(raw.get("ignore") or [])
        self.groups: list[tuple[list[str], QuantScheme]] = []
        for gname, group in (raw.get("config_groups") or {}).items():
            w = group.get("weights") or {}
            where = f"quantization_config.config_groups.{gname}"
            if group.get("input_activations") or group.get("output_activations"):
                raise ConfigError(f"{where}: activation quantization is not supported "
                                  "(compressed-tensors weight-only INT4 only)")
            ok = (w.get("num_bits") == 4 and w.get("type") == "int" and w.get("symmetric", True)
                  and w.get("strategy") == "group" and not w.get("dynamic", False)
                  and w.get("actorder") in (None, False, "static"))
            if not ok or fmt != "pack-quantized":
                raise ConfigError(f"{where}: only format pack-quantized, 4-bit symmetric int, "
                                  f"strategy group is supported (got format {fmt!r}, {w})")
            scheme = QuantScheme(INT4, group_size=int(w.get("group_size") or 32))
            self.groups.append((list(group.get("targets") or []), scheme))
        if not self.groups:
            raise ConfigError("quantization_config: compressed-tensors config has no config_groups")
        self.kv_scheme = raw.get("kv_cache_scheme")

    def scheme(self, name: str) -> QuantScheme | None:
        # "Linear" targets every linear, lm_head included (hence Kimi's `ignore: ["lm_head", ..]`)
        if matches_any(name, self.ignore):
            return None
        for targets, scheme in self.groups:
            if "Linear" in targets or matches_any(name, [t for t in targets if t != "Linear"]):
                return scheme
        return None

    def kv_cache_quantized(self) -> bool:
        return self.kv_scheme is not None


# ---------------------------------------------------------------- Quark
def _quark_scheme(spec: dict | None, where: str) -> QuantScheme | None:
    if not spec:
        return None
    w, a = spec.get("weight"), spec.get("input_tensors")
    if w is None:
        return None
    if isinstance(w, list):
        dtypes = sorted(s.get("dtype") for s in w)
        if dtypes != ["fp8_e4m3", "int4"]:
            raise ConfigError(f"{where}.weight: a list of specs must be fp8_e4m3 per_tensor + int4 "
                              f"per_channel (W4A8), got {dtypes}")
        int4 = next(s for s in w if s.get("dtype") == "int4")
        fp8 = next(s for s in w if s.get("dtype") == "fp8_e4m3")
        if int4.get("qscheme") != "per_channel" or fp8.get("qscheme") != "per_tensor":
            raise ConfigError(f"{where}.weight: W4A8 needs int4 per_channel + fp8 per_tensor")
        if not a or a.get("dtype") != "fp8_e4m3":
            raise ConfigError(f"{where}.input_tensors: W4A8 needs fp8_e4m3 activations")
        return QuantScheme(W4A8, act="fp8_token" if a.get("is_dynamic", True) else "fp8_static")
    dtype = w.get("dtype")
    if dtype == "fp4":
        if (w.get("qscheme") != "per_group" or int(w.get("group_size") or 0) != 32
                or w.get("scale_format", "e8m0") != "e8m0"):
            raise ConfigError(f"{where}.weight: fp4 must be per_group 32 with e8m0 scales (MXFP4)")
        if a is None:
            return QuantScheme(MXFP4, act=None)
        if a.get("dtype") != "fp4" or not a.get("is_dynamic", True):
            raise ConfigError(f"{where}.input_tensors: MXFP4 weights support dynamic fp4 "
                              f"activations or none (got {a.get('dtype')!r})")
        return QuantScheme(MXFP4, act="mxfp4")
    raise ConfigError(f"{where}.weight: Quark dtype {dtype!r} is not supported "
                      "(supported: MXFP4, W4A8)")


class QuarkConfig(QuantConfig):
    method = "quark"

    def __init__(self, raw: dict):
        self.exclude = list(raw.get("exclude") or [])
        self.global_scheme = _quark_scheme(raw.get("global_quant_config"),
                                           "quantization_config.global_quant_config")
        self.layer = [(pat, _quark_scheme(spec, f"quantization_config.layer_quant_config[{pat}]"))
                      for pat, spec in (raw.get("layer_quant_config") or {}).items()]
        self.types = {t: _quark_scheme(spec, f"quantization_config.layer_type_quant_config[{t}]")
                      for t, spec in (raw.get("layer_type_quant_config") or {}).items()}
        self.kv = raw.get("kv_cache_quant_config") or {}

    def scheme(self, name: str) -> QuantScheme | None:
        if matches_any(name, self.exclude):
            return None
        forms = name_forms(name)
        for pat, scheme in self.layer:
            if any(fnmatch.fnmatch(f, pat) for f in forms):
                return scheme
        if "Linear" in self.types:
            return self.types["Linear"]
        return self.global_scheme

    def kv_cache_quantized(self) -> bool:
        return bool(self.kv)


# ---------------------------------------------------------------- DeepSeek FP8 block
class Fp8BlockConfig(QuantConfig):
    method = "fp8"

    def __init__(self, raw: dict):
        block = raw.get("weight_block_size")
        if not block or len(block) != 2:
            raise ConfigError("quantization_config: fp8 without weight_block_size (per-tensor FP8) "
                              "is not supported; expected weight_block_size [128, 128]")
        if raw.get("activation_scheme", "dynamic") != "dynamic":
            raise ConfigError("quantization_config.activation_scheme: only dynamic is supported "
                              "for FP8 block checkpoints")
        if raw.get("fmt", "e4m3") != "e4m3":
            raise ConfigError(f"quantization_config.fmt: {raw.get('fmt')!r} (e4m3 only)")
        self.ignored = list(raw.get("ignored_layers") or []) + list(
            raw.get("modules_to_not_convert") or [])
        self.s = QuantScheme(FP8_BLOCK, act="fp8_group", block=(int(block[0]), int(block[1])),
                             ue8m0=raw.get("scale_fmt") == "ue8m0")

    def scheme(self, name: str) -> QuantScheme | None:
        if name == "lm_head" or matches_any(name, self.ignored):
            return None
        return self.s


def check_requested_method(requested: str | None, raw: dict | None) -> None:
    """vLLM's `quantization` engine argument against the checkpoint's quantization_config
    (`raw`): None, or the checkpoint's own quant_method (case, "-" / "_" ignored), passes, as
    in vLLM (ModelConfig._verify_quantization); a different method, or any method for an
    unquantized checkpoint (vLLM would quantize it online; here online_quant_config does), is
    a ConfigError naming `quantization`."""
    if requested is None:
        return
    have = (raw or {}).get("quant_method")
    if have is None:
        raise ConfigError(f"quantization: {requested!r} asks for online quantization of an "
                          f"unquantized checkpoint, which this engine does through "
                          f"online_quant_config (ATOM's --online_quant_config: ptpc_fp8, "
                          f"per_block_fp8)")

    def norm(method: str) -> str:
        return str(method).strip().lower().replace("_", "-")

    if norm(requested) != norm(have):
        raise ConfigError(f"quantization: the checkpoint's quantization_config has quant_method "
                          f"{have!r}, which does not match the quantization argument "
                          f"{requested!r} (leave it unset: the checkpoint decides)")


def parse_quant_config(raw: dict | None) -> QuantConfig | None:
    """The QuantConfig of a checkpoint's quantization_config (None: unquantized)."""
    if not raw:
        return None
    method = raw.get("quant_method")
    if method == "compressed-tensors":
        return CompressedTensorsConfig(raw)
    if method == "quark":
        return QuarkConfig(raw)
    if method == "fp8":
        return Fp8BlockConfig(raw)
    raise ConfigError(f"quantization_config.quant_method: {method!r} is not supported "
                      "(supported: compressed-tensors, quark, fp8)")
