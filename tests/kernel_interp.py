"""Run the Triton kernels' tests under the interpreter where there is no GPU.

`GPU = interpret_without_gpu("kv_store", "norm_rope")` at the top of a kernel test module, before
it imports the kernels: without a GPU it sets TRITON_INTERPRET=1 and re-decorates (reloads, in
the order given: dependencies first) those `atom_stream.kernels` modules that an earlier test
module already imported in compiled mode, since @triton.jit reads the setting at decoration
time. Returns whether a GPU is present (then nothing changes: `-m gpu` runs native).
"""

from __future__ import annotations

import importlib
import os
import sys

import torch


def interpret_without_gpu(*modules: str) -> bool:
    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ["TRITON_INTERPRET"] = "1"
        for name in modules:
            mod = sys.modules.get(f"atom_stream.kernels.{name}")
            if mod is not None:
                importlib.reload(mod)
    return gpu
