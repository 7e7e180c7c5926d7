"""The paged latent-KV pool's storage: one zeroed [blocks, block_size, kv_dim] tensor per layer.

Zeroed, not empty: attention over a partly filled block multiplies masked-out (zero-weight)
slots' values, and 0 x NaN garbage would be NaN.

On the CPU the pool comes from calloc (numpy.zeros), whose fresh pages the OS maps as zero
and commits only when first written: an engine starts in milliseconds instead of filling the
whole pool (torch.zeros writes every page: 0.3-5 s for the 512 MB CPU default), and its
resident memory grows with the blocks actually used. On a GPU it is torch.zeros.
"""

from __future__ import annotations

import numpy as np
import torch

_ALIGN = 64  # bytes: a cache line, so every layer's rows start aligned as torch's own would


def zeroed_host_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A contiguous CPU tensor of `shape` / `dtype`, all zero, its pages committed lazily."""
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = torch.from_numpy(np.zeros(nbytes + _ALIGN, dtype=np.uint8))
    start = -raw.data_ptr() % _ALIGN
    return raw[start:start + nbytes].view(dtype).view(shape)


def allocate_kv_caches(num_layers: int, shape: tuple[int, ...], dtype: torch.dtype,
                       device: torch.device) -> list[torch.Tensor]:
    """`num_layers` zeroed KV tensors of `shape` ([blocks + 1, block_size, kv_dim]) on `device`."""
    if device.type == "cpu":
        return [zeroed_host_tensor(shape, dtype) for _ in range(num_layers)]
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
