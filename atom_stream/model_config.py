"""`ModelConfig`: a checkpoint's config.json, parsed and validated.

Config is read here and in config.py (EngineConfig), nowhere else. `ModelConfig.from_dict`
accepts the DeepseekV3 family as checkpoints actually ship it:

- DeepSeek-V3/R1, Kimi-K2: a flat DeepseekV3 config (`rope_scaling` + `rope_theta`).
- transformers >= 5 re-saves: `rope_parameters` (with `rope_theta` and `rope_type` inside).
- Kimi-K2.5: `KimiK25ForConditionalGeneration` with the text model nested in `text_config`
  (`model_type: kimi_k2`, read as deepseek_v3); `quantization_config` at either level.
- `q_lora_rank: null` (no q LoRA; Moonlight / DeepSeek-V2-Lite style).
- DeepSeek-V3's MTP layer (`num_nextn_predict_layers`) is ignored: layers >= num_hidden_layers
  are never built or loaded.

Missing keys take transformers' `DeepseekV3Config` defaults (`_HF_DEFAULTS`; tests/test_config.py
checks them against the installed transformers), so a checkpoint that omits a field gives the
tokens transformers gives; `model_type: deepseek_v2` takes `DeepseekV2Config`'s
(`_HF_V2_DEFAULTS`: softmax scores, greedy top-k without a correction bias).
`attention_bias` / `mlp_bias` true are refused (the Linears have no bias).
`hf_overrides` (vLLM's `hf_overrides` / `--hf-overrides`; `apply_hf_overrides`) are applied to
the raw config.json before it is parsed and validated.
A key present with value null keeps its own meaning (`q_lora_rank:
null` is no q LoRA; `n_routed_experts: null` a dense model; `n_group` / `topk_group: null` no
group limit; `norm_topk_prob: null` false, as transformers' truthiness test reads it). The
shape fields (vocab_size, hidden_size, intermediate_size, num_hidden_layers,
num_attention_heads, kv_lora_rank, qk_*_head_dim, v_head_dim) stay required: a checkpoint
without them is malformed, and an error is better than guessing its shapes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = (
    "DeepseekV3ForCausalLM",
    "DeepseekV2ForCausalLM",
    "KimiK25ForConditionalGeneration",
    "Kimi_K25ForConditionalGeneration",  # transformers >= 5.2x's native class name
    "KimiK2ForCausalLM",
)
_TEXT_MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "kimi_k2")
# transformers' DeepseekV3Config defaults (checked against 5.x) for the optional keys read here.
# DeepSeek's own remote-code config had others (n_shared_experts None, routed_scaling_factor 1.0,
# first_k_dense_replace 0); transformers is the reference the parity tests hold us to.
_HF_DEFAULTS: dict[str, Any] = {
    "moe_intermediate_size": 2048,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "num_experts_per_tok": 8,
    "routed_scaling_factor": 2.5,
    "n_group": 8,
    "topk_group": 4,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "q_lora_rank": 1536,
    "num_nextn_predict_layers": 1,
    "rope_theta": 10000.0,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    # not DeepseekV3Config keys (its routing is always sigmoid + noaux_tc); DeepSeek's own
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
}
# transformers' DeepseekV2Config defaults where they differ (model_type deepseek_v2: DeepSeek-V2,
# V2-Lite). Its router always scores by softmax (a transformers re-save writes no scoring_func)
# and selects greedily without a correction bias; n_group / topk_group None: no group limit.
_HF_V2_DEFAULTS: dict[str, Any] = dict(
    _HF_DEFAULTS, moe_intermediate_size=1407, n_shared_experts=2, n_routed_experts=64,
    num_experts_per_tok=None, routed_scaling_factor=1.0, n_group=None, topk_group=None,
    first_k_dense_replace=0, norm_topk_prob=False, num_nextn_predict_layers=0,
    max_position_embeddings=2048, scoring_func="softmax", topk_method="greedy")


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the offending field."""


# the nested configs of a config.json (transformers' sub-configs, vLLM merges overrides into
# them) and the top-level keys of a nested (Kimi-K2.5) config that are not the text model's
_SUB_CONFIGS = ("text_config", "vision_config")
_TOP_LEVEL_ONLY = ("architectures", "model_type", "auto_map", "transformers_version",
                   *_SUB_CONFIGS)


def check_hf_overrides(overrides: Any) -> None:
    """hf_overrides is None or a dict (vLLM also takes a callable on its PretrainedConfig;
    there is no PretrainedConfig here, so that is refused)."""
    if overrides is not None and not isinstance(overrides, dict):
        kind = "a callable" if callable(overrides) else type(overrides).__name__
        raise ConfigError(f"hf_overrides: must be a dict (a JSON object) of config.json fields, "
                          f"got {kind}")


def _merge(target: dict[str, Any], updates: dict[str, Any]) -> None:
    """vLLM's `_update_nested`: a dict value merges into a dict already there, anything else
    is set."""
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def apply_hf_overrides(raw: dict[str, Any], overrides: dict[str, Any] | None
                       ) -> dict[str, Any]:
    """config.json `raw` with vLLM's `hf_overrides` applied (a new dict; `raw` is untouched).

    As vLLM (ModelConfig._apply_dict_overrides): a key naming a nested config (`text_config`,
    `vision_config`) merges into it, dicts inside merging recursively; any other key is set,
    a dict value replacing the old one (`rope_scaling`, `quantization_config`). Kimi-K2.5's
    nested layout: the text model in `text_config` is what is served, so a flat key also
    sets the text model's value (`{"num_hidden_layers": 1}` works on every checkpoint), the
    top-level-only keys (architectures, model_type, auto_map, the sub-configs) aside. A flat
    checkpoint has no `text_config`: that form merges into the top level, its text model."""
    check_hf_overrides(overrides)
    if not overrides:
        return raw
    out = copy.deepcopy(raw)
    text = out.get("text_config")
    for key, value in overrides.items():
        if key in _SUB_CONFIGS:
            if not isinstance(value, dict):
                raise ConfigError(f"hf_overrides: {key} must be a dict of its fields (it "
                                  f"merges into the checkpoint's {key}), got {value!r}")
            target = out.get(key)
            if not isinstance(target, dict):
                target = out if key == "text_config" else out.setdefault(key, {})
            _merge(target, value)
            continue
        out[key] = copy.deepcopy(value)
        if isinstance(text, dict) and key not in _TOP_LEVEL_ONLY:
            text[key] = copy.deepcopy(value)
    return out


@dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters. `factor == 1` with type "default" means plain RoPE."""

    type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _parse_rope(text: dict[str, Any], max_pos: int) -> tuple[float, RopeScaling]:
    """(rope_theta, RopeScaling) as transformers reads them (modeling_rope_utils): the rope dict
    is `rope_scaling` (legacy) or else `rope_parameters` (transformers >= 5), its rope_theta over
    the top-level one (10000 when neither). YaRN: `factor` is required (transformers rejects a
    YaRN dict without it); a missing original_max_position_embeddings is max_position_embeddings;
    beta_fast / beta_slow missing, null or 0 are 32 / 1. What layers/rotary.py cannot compute as
    transformers does is refused rather than served differently."""
    # transformers rotates interleaved pairs only when rope_interleave is truthy (the default);
    # otherwise NeoX halves, which layers/rotary.py does not implement (model_spec.md §3)
    if not text.get("rope_interleave", True):
        raise ConfigError("model: rope_interleave false (NeoX-order RoPE) is not supported; "
                          "DeepseekV3 checkpoints use interleaved RoPE")
    raw = text.get("rope_scaling") or text.get("rope_parameters") or {}
    theta = raw.get("rope_theta", text.get("rope_theta"))
    theta = float(theta if theta is not None else _HF_DEFAULTS["rope_theta"])
    rtype = raw.get("rope_type", raw.get("type", "default"))
    if rtype == "default":
        return theta, RopeScaling()
    if rtype not in ("yarn", "deepseek_yarn"):
        raise ConfigError(f"model: rope_scaling type {rtype!r} is not supported")
    if raw.get("factor") is None:
        raise ConfigError("model: rope_scaling of type yarn lacks its factor")
    if raw.get("attention_factor") is not None:
        raise ConfigError("model: rope_scaling attention_factor is not supported")
    if not raw.get("truncate", True):
        raise ConfigError("model: rope_scaling truncate false is not supported")
    # cos/sin are scaled by mscale(factor, mscale) / mscale(factor, mscale_all_dim): transformers
    # does so only when both are set and non-zero, else by mscale(factor, 1); DeepSeek's code and
    # vLLM always take the ratio (mscale 1 and mscale_all_dim 0 when missing). They agree when
    # both are set, or mscale_all_dim is unset / 0 and mscale unset / 1; anything else is refused.
    mscale, mscale_all_dim = raw.get("mscale"), raw.get("mscale_all_dim")
    if not ((mscale and mscale_all_dim) or (not mscale_all_dim and mscale in (None, 1))):
        raise ConfigError(f"model: rope_scaling mscale {mscale!r} with mscale_all_dim "
                          f"{mscale_all_dim!r} is not supported (set both, or mscale_all_dim "
                          f"unset and mscale unset or 1)")
    return theta, RopeScaling(
        type="yarn",
        factor=float(raw["factor"]),
        original_max_position_embeddings=int(raw.get("original_max_position_embeddings",
                                                      max_pos)),
        beta_fast=float(raw.get("beta_fast") or 32.0),
        beta_slow=float(raw.get("beta_slow") or 1.0),
        mscale=float(mscale if mscale is not None else 1.0),
        mscale_all_dim=float(mscale_all_dim or 0.0),
    )


def _generation_config(model_dir: str) -> dict[str, Any]:
    """generation_config.json in `model_dir` as a dict ({} when there is none)."""
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"model: {path} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


def generation_eos_ids(model_dir: str) -> tuple[int, ...]:
    """eos_token_id (an int or a list) of generation_config.json in `model_dir`, if any (read
    by ModelConfig.from_pretrained and the tokenizers' extra EOS ids)."""
    eos = _generation_config(model_dir).get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))


# transformers' GenerationConfig defaults of the sampling keys vLLM reads: its
# ModelConfig.get_diff_sampling_param takes generation_config.to_diff_dict(), which leaves out
# every value equal to these
_HF_GENERATION_DEFAULTS: dict[str, Any] = {"repetition_penalty": 1.0, "temperature": 1.0,
                                           "top_k": 50, "top_p": 1.0, "min_p": None,
                                           "max_new_tokens": None}


def generation_sampling_defaults(model: str | None) -> dict[str, Any]:
    """vLLM's `get_diff_sampling_param`: the sampling defaults a checkpoint's
    generation_config.json sets (repetition_penalty, temperature, top_k, top_p, min_p, and
    max_new_tokens as `max_tokens`), those present, not null and different from transformers'
    GenerationConfig defaults. The OpenAI routes use them for the fields a request leaves out
    (max_tokens as a cap, as vLLM's get_max_tokens), `LLM.generate` when given no params. {}
    for the demo model, bench presets, or a checkpoint without the file."""
    if not model or not os.path.isdir(model):
        return {}
    gen = _generation_config(model)
    out = {k: gen[k] for k, default in _HF_GENERATION_DEFAULTS.items()
           if gen.get(k) is not None and gen[k] != default}
    if "max_new_tokens" in out:
        out["max_tokens"] = out.pop("max_new_tokens")
    return out


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a DeepseekV3-style text model (the fields of its config.json)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    # defaults: transformers' DeepseekV3Config (`_HF_DEFAULTS`, which from_dict applies too)
    first_k_dense_replace: int = _HF_DEFAULTS["first_k_dense_replace"]
    moe_layer_freq: int = 1
    n_group: int = _HF_DEFAULTS["n_group"]
    topk_group: int = _HF_DEFAULTS["topk_group"]
    norm_topk_prob: bool = _HF_DEFAULTS["norm_topk_prob"]
    routed_scaling_factor: float = _HF_DEFAULTS["routed_scaling_factor"]
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    # DeepSeek-V3's MTP layers (in the checkpoint, not served)
    num_nextn_predict_layers: int = _HF_DEFAULTS["num_nextn_predict_layers"]
    rope_theta: float = _HF_DEFAULTS["rope_theta"]
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = _HF_DEFAULTS["max_position_embeddings"]
    rms_norm_eps: float = _HF_DEFAULTS["rms_norm_eps"]
    hidden_act: str = _HF_DEFAULTS["hidden_act"]
    tie_word_embeddings: bool = _HF_DEFAULTS["tie_word_embeddings"]
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    architecture: str = "DeepseekV3ForCausalLM"
    quantization_config: dict | None = None
    torch_dtype: str | None = None

    # ----- derived quantities -----
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values per token per layer in the latent cache: [c (kv_lora_rank) | k_pe (rope)]."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5 * mscale(factor, mscale_all_dim)^2 (applied on both MLA paths)."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs.type == "yarn" and rs.mscale_all_dim:
            m = yarn_get_mscale(rs.factor, rs.mscale_all_dim)
            scale = scale * m * m
        return scale

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    # ----- parsing -----
    @classmethod
    def from_pretrained(cls, path: str, hf_overrides: dict[str, Any] | None = None
                        ) -> ModelConfig:
        """config.json of a checkpoint directory (or the file itself), `hf_overrides` applied
        (see from_dict). `eos_token_id` is config.json's followed by generation_config.json's
        eos_token_id(s) when that file sits beside it (HF generate and vLLM stop on those:
        Kimi-K2.5 ends a turn with <|im_end|>)."""
        cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.exists(cfg_path):
            raise ConfigError(f"model: no config.json at {path!r}")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                raw = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"model: {cfg_path} is not valid JSON: {e}") from None
        try:
            cfg = cls.from_dict(raw, hf_overrides)
            gen_eos = generation_eos_ids(os.path.dirname(cfg_path))
        except ConfigError:
            raise
        except (TypeError, ValueError, AttributeError, KeyError, ZeroDivisionError) as e:
            # a field of the wrong type or shape ("abc" for a size, a string for a dict)
            raise ConfigError(f"model: {cfg_path} has a malformed field ({type(e).__name__}: "
                              f"{e})") from None
        if gen_eos:  # the engine stops on these too when it runs without a tokenizer
            cfg = dataclasses.replace(
                cfg, eos_token_id=tuple(dict.fromkeys(cfg.eos_token_id + gen_eos)))
        return cfg

    @classmethod
    def from_dict(cls, raw: dict[str, Any], hf_overrides: dict[str, Any] | None = None
                  ) -> ModelConfig:
        """Parse a raw config.json dict (flat DeepseekV3 or Kimi-K2.5 nested) with
        `hf_overrides` applied first (apply_hf_overrides), so an override that makes the config
        unsupported or malformed is the same ConfigError a checkpoint with it would get."""
        if not isinstance(raw, dict):
            raise ConfigError(f"model: config.json must be a JSON object, got "
                              f"{type(raw).__name__}")
        check_hf_overrides(hf_overrides)
        if not hf_overrides:
            return cls._parse(raw)
        raw = apply_hf_overrides(raw, hf_overrides)
        try:
            return cls._parse(raw)
        except ConfigError:
            raise
        except (TypeError, ValueError, AttributeError, KeyError, ZeroDivisionError) as e:
            shown = json.dumps(hf_overrides, default=repr)
            raise ConfigError(f"model: config.json with hf_overrides {shown} has a malformed "
                              f"field ({type(e).__name__}: {e})") from None

    @classmethod
    def _parse(cls, raw: dict[str, Any]) -> ModelConfig:
        """from_dict's parse of the (overridden) dict."""
        archs = raw.get("architectures") or []
        if isinstance(archs, str):
            archs = [archs]
        arch = archs[0] if archs else None
        text = raw
        if "text_config" in raw:
            text = dict(raw["text_config"])
            if "quantization_config" not in text and "quantization_config" in raw:
                text["quantization_config"] = raw["quantization_config"]
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if key not in text and key in raw:
                    text[key] = raw[key]
        model_type = text.get("model_type", "deepseek_v3")
        if arch is None:
            arch = "DeepseekV3ForCausalLM"
        if arch not in SUPPORTED_ARCHITECTURES or model_type not in _TEXT_MODEL_TYPES:
            raise ConfigError(
                f"model: unsupported architecture {arch!r} (model_type {model_type!r}); "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )

        def req(name: str) -> Any:
            if name not in text or text[name] is None:
                raise ConfigError(f"model: config.json lacks required field {name!r}")
            return text[name]

        defaults = _HF_V2_DEFAULTS if model_type == "deepseek_v2" else _HF_DEFAULTS

        def opt(name: str) -> Any:
            """The key's value (null included: callers give null its meaning), or, when the
            key is missing, transformers' DeepseekV3Config (DeepseekV2Config) default."""
            return text[name] if name in text else defaults[name]

        # transformers' DeepseekV3/V2 give q_a / q / kv_a / o_proj (V2: mlp_bias, the MLPs) a
        # bias when set; our Linears have none, so such a checkpoint would serve wrong tokens
        for key in ("attention_bias", "mlp_bias"):
            if text.get(key):
                raise ConfigError(f"model: {key} true (linear layers with biases) is not "
                                  f"supported; DeepseekV3 checkpoints have none")
        max_pos = int(opt("max_position_embeddings"))
        rope_theta, rope = _parse_rope(text, max_pos)
        eos = text.get("eos_token_id")
        eos_t: tuple[int, ...] = (() if eos is None else tuple(eos) if isinstance(eos, list)
                                  else (eos,))
        # transformers reads `num_mtp_layers` as an alias (attribute_map)
        mtp = (text["num_nextn_predict_layers"] if "num_nextn_predict_layers" in text
               else text.get("num_mtp_layers", defaults["num_nextn_predict_layers"]))
        cfg = cls(
            vocab_size=int(req("vocab_size")),
            hidden_size=int(req("hidden_size")),
            intermediate_size=int(req("intermediate_size")),
            moe_intermediate_size=int(opt("moe_intermediate_size") or 0),
            num_hidden_layers=int(req("num_hidden_layers")),
            num_attention_heads=int(req("num_attention_heads")),
            q_lora_rank=opt("q_lora_rank"),  # null: no q LoRA (transformers: the same)
            kv_lora_rank=int(req("kv_lora_rank")),
            qk_nope_head_dim=int(req("qk_nope_head_dim")),
            qk_rope_head_dim=int(req("qk_rope_head_dim")),
            v_head_dim=int(req("v_head_dim")),
            n_routed_experts=int(opt("n_routed_experts") or 0),  # null / 0: a dense model
            n_shared_experts=int(opt("n_shared_experts") or 0),
            num_experts_per_tok=int(opt("num_experts_per_tok") or 0),
            first_k_dense_replace=int(opt("first_k_dense_replace")),
            # not a transformers key: its MoE layers are every layer from first_k_dense_replace
            moe_layer_freq=int(text.get("moe_layer_freq", 1)),
            n_group=int(opt("n_group") or 1),  # null: no group limit
            topk_group=int(opt("topk_group") or 1),
            norm_topk_prob=bool(opt("norm_topk_prob")),  # null: false (transformers' `if`)
            routed_scaling_factor=float(opt("routed_scaling_factor")),
            # not DeepseekV3Config keys: its router always scores by sigmoid with the bias
            scoring_func=opt("scoring_func"),
            topk_method=opt("topk_method"),
            num_nextn_predict_layers=int(mtp or 0),
            rope_theta=rope_theta,
            rope_scaling=rope,
            max_position_embeddings=max_pos,
            rms_norm_eps=float(opt("rms_norm_eps")),
            hidden_act=opt("hidden_act"),
            tie_word_embeddings=bool(opt("tie_word_embeddings")),
            bos_token_id=text.get("bos_token_id"),
            eos_token_id=eos_t,
            pad_token_id=text.get("pad_token_id"),
            architecture=arch,
            quantization_config=text.get("quantization_config"),
            torch_dtype=text.get("torch_dtype") or text.get("dtype"),
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                     "qk_rope_head_dim", "v_head_dim", "max_position_embeddings",
                     "moe_layer_freq"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"model: config.json field {name} must be a positive integer "
                                  f"(got {v!r})")
        if self.q_lora_rank is not None and (
                not isinstance(self.q_lora_rank, int) or isinstance(self.q_lora_rank, bool)
                or self.q_lora_rank < 1):
            raise ConfigError(f"model: config.json field q_lora_rank must be a positive integer "
                              f"or null (got {self.q_lora_rank!r})")
        if self.quantization_config is not None and not isinstance(self.quantization_config,
                                                                   dict):
            raise ConfigError(f"model: config.json field quantization_config must be an object "
                              f"(got {self.quantization_config!r})")
        if self.n_routed_experts and self.moe_intermediate_size < 1:
            raise ConfigError("model: config.json field moe_intermediate_size must be a positive "
                              "integer with routed experts")
        # transformers' DeepseekV3 always routes with the correction bias (noaux_tc); an
        # unknown method would silently route differently here
        if self.topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
            raise ConfigError(f"model: topk_method {self.topk_method!r} is not supported "
                              f"(noaux_tc, greedy, group_limited_greedy)")
        if self.hidden_act != "silu":
            raise ConfigError(f"model: hidden_act {self.hidden_act!r} is not supported (silu only)")
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise ConfigError(f"model: scoring_func {self.scoring_func!r} is not supported")
        if self.n_routed_experts:
            if self.num_experts_per_tok <= 0 or self.num_experts_per_tok > self.n_routed_experts:
                raise ConfigError("model: num_experts_per_tok must be in [1, n_routed_experts]")
            if self.n_routed_experts % self.n_group:
                raise ConfigError("model: n_routed_experts must be divisible by n_group")
            if not 1 <= self.topk_group <= self.n_group:
                raise ConfigError("model: topk_group must be in [1, n_group]")
        if self.qk_rope_head_dim % 2:
            raise ConfigError("model: qk_rope_head_dim must be even")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
