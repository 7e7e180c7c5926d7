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
        skip_nested_lang_patches()
        for name in modules:
            mod = sys.modules.get(f"atom_stream.kernels.{name}")
            if mod is not None:
                importlib.reload(mod)
    return gpu


def skip_nested_lang_patches() -> None:
    """Make Triton's interpreter patch triton.language once per launch, not once per call.

    Its InterpretedFunction.__call__ (a @triton.jit helper called from a kernel) re-runs
    `_patch_lang` (inspect.getmembers over tl, tl.tensor, tl.math, ...) at every call in every
    program: a quarter of the interpreted kernels' CPU time in this suite. Inside a launch the
    kernel's own patch is in force until the launch restores it, so a nested patch of modules
    whose builtins are already replaced is skipped (an empty scope stands for it). Nothing
    changes in compiled mode, or if this Triton lacks the private names (then: no-op).
    """
    try:
        import triton.language as tl
        from triton.runtime import interpreter
        original, empty_scope = interpreter._patch_lang, interpreter._LangPatchScope
    except (ImportError, AttributeError):
        return
    if getattr(original, "skips_nested", False):
        return

    def patch_lang(fn):
        langs = [v for v in fn.__globals__.values() if v is tl or v is tl.core]
        if langs and not any(tl.core.is_builtin(getattr(m, "load", None)) for m in langs):
            return empty_scope()  # this launch's patch already covers these modules
        return original(fn)

    patch_lang.skips_nested = True
    interpreter._patch_lang = patch_lang
    _memoize_np_dtype(interpreter, tl)


def _memoize_np_dtype(interpreter, tl) -> None:
    """The interpreter's `_get_np_dtype` builds its 17-entry dict at every call (once per
    interpreted op): memoized per element type."""
    original = getattr(interpreter, "_get_np_dtype", None)
    if original is None or getattr(original, "memoized", False):
        return
    cache: dict = {}

    def get_np_dtype(tt_dtype):
        element = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
        if isinstance(element, tl.pointer_type):
            return original(element)
        try:
            return cache[element]
        except KeyError:
            return cache.setdefault(element, original(element))

    get_np_dtype.memoized = True
    interpreter._get_np_dtype = get_np_dtype
