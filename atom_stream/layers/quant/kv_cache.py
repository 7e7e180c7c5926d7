"""FP8 KV cache scales (model_spec §4e): checkpoint `k_scale` per layer -> MLA.k_scale.

MLA caches one latent entry [c | k_pe] per token, so only k_scale applies (value = fp8 * k_scale,
default 1.0; Kimi-K2.5 ships `kv_cache_scheme: null`). Accepted names: any
`model.layers.N.self_attn[.<sub>].{k_scale,kv_scale}` (vLLM/NVFP4 exports put them under
`self_attn`, `self_attn.attn` or `self_attn.k_proj`); a per-head vector is reduced to its max.
`v_scale` is read and dropped (no separate V cache). Scales are calibrated for e4m3fn (max 448);
on e4m3fnuz platforms (MI300, max 240; common.platform_fp8_dtype, which tests may force) a
checkpoint k_scale is doubled, as vLLM does (x / (2 k) stays within 224 < 240); the default 1.0
is not (vLLM neither).
"""

from __future__ import annotations

import logging
import re

from torch import nn

from atom_stream.layers.quant.common import FNUZ, platform_fp8_dtype

logger = logging.getLogger(__name__)

_KV_RE = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(?:[\w.]+\.)?(k_scale|kv_scale|v_scale)$")


class KvScaleHook:
    """Loader hook: `hook(name, get, shape) -> bool` (True: the tensor was handled)."""

    def __init__(self, model: nn.Module):
        self.attn: dict[int, nn.Module] = {}
        for name, module in model.named_modules():
            m = re.match(r"^model\.layers\.(\d+)\.self_attn$", name)
            if m and hasattr(module, "k_scale"):
                self.attn[int(m.group(1))] = module
        self.loaded: dict[int, float] = {}

    def __call__(self, name: str, get, shape) -> bool:
        m = _KV_RE.match(name)
        if not m:
            return False
        if m.group(2) == "v_scale":
            return True
        layer = self.attn.get(int(m.group(1)))
        if layer is None:
            return True  # a layer we do not serve (MTP)
        scale = float(get().float().reshape(-1).max())
        if platform_fp8_dtype() == FNUZ:
            scale *= 2.0
        layer.k_scale = scale
        self.loaded[int(m.group(1))] = scale
        return True

    def check_complete(self) -> None:
        if self.loaded:
            logger.info("KV cache k_scale loaded for %d layers (min %.4g, max %.4g)",
                        len(self.loaded), min(self.loaded.values()), max(self.loaded.values()))
