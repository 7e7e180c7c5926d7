"""Model registry: architecture name -> model class (all of this family share one file)."""

from __future__ import annotations

from atom_stream.models.deepseek_v3 import DeepseekV3ForCausalLM
from atom_stream.models.kimi_k25 import KimiK25ForConditionalGeneration

MODEL_REGISTRY = {
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
    "DeepseekV2ForCausalLM": DeepseekV3ForCausalLM,
    "KimiK2ForCausalLM": DeepseekV3ForCausalLM,
    "KimiK25ForConditionalGeneration": KimiK25ForConditionalGeneration,
    # transformers >= 5.2x's native class name (a checkpoint it re-saved)
    "Kimi_K25ForConditionalGeneration": KimiK25ForConditionalGeneration,
}
