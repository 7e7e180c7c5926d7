"""KimiK25ForConditionalGeneration: the text backbone of Kimi-K2.5.

The checkpoint wraps a DeepseekV3 text model as `language_model.*` beside a MoonViT vision tower
(`vision_tower.*`) and a projector (`mm_projector.*`). atom-stream serves the text backbone: the
config's nested `text_config` is parsed as DeepseekV3 (config.ModelConfig.from_dict), the
`language_model.` prefix is stripped and the vision and projector tensors are skipped without
reading their bytes (loader.normalize_name). The model itself is DeepseekV3ForCausalLM.
"""

from __future__ import annotations

from atom_stream.models.deepseek_v3 import DeepseekV3ForCausalLM

KimiK25ForConditionalGeneration = DeepseekV3ForCausalLM
SKIP_WEIGHT_PREFIXES = ("vision_tower.", "mm_projector.")
