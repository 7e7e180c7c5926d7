"""Every environment variable atom-stream reads, in one place (DESIGN.md: config is read in one
place, no environment-variable sprawl).

Serving is configured by EngineConfig and the CLI flags, never by these. What is here:
- developer switches: A/B toggles of kernel and model paths that bench/gpu_session.sh flips to
  measure a default before changing it (README "Environment switches" lists each with its
  measurement), and a debug check;
- conventions other tools own: TRITON_INTERPRET (Triton's interpreter: kernels pick their
  interpreter-safe forms), MASTER_ADDR / MASTER_PORT (torch.distributed's rendezvous defaults
  for multi-node CLI flags), OPENAI_API_KEY (the serving benchmark's client key).

Modules ask through `flag` / `integer` / `text` with the variable's name; each call reads the
environment then (modules that keep a module-level constant read it when imported, so a test or a
bench that changes a switch sets it before the import or reloads the module). Asking for a name
not registered in VARS is a KeyError: a new switch is added here, with its default and meaning.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: str | None
    doc: str


VARS: dict[str, EnvVar] = {v.name: v for v in (
    EnvVar("ATOM_STREAM_SIDE_STREAM", "0", "shared expert's first half on a side stream"),
    EnvVar("ATOM_STREAM_FUSED_PROLOGUE", "1",
           "MLA q_a/kv_a norms, k_pe RoPE and KV store in one launch"),
    EnvVar("ATOM_STREAM_MLA_DECODE", "auto",
           "MLA decode variant the model's 'auto' resolves to: auto (measured default) | v1 | v3 "
           "| v5"),
    EnvVar("ATOM_STREAM_MLA_Q_ABSORB_MAX_B", "128",
           "most decode rows (decode-only steps) with q_nope @ W_UK + q_pe RoPE in one launch"),
    EnvVar("ATOM_STREAM_MLA_MERGE_UV_MAX_B", "4",
           "most decode rows with W_UV folded into the MLA decode's merge launch (0 off)"),
    EnvVar("ATOM_STREAM_QB_GEMV_MAX_M", "2", "most rows of q_b run by the Triton GEMV (0: cuBLAS)"),
    EnvVar("ATOM_STREAM_QKV_GEMV_MAX_M", "1",
           "most rows of the fused q_a + kv_a GEMM run by the Triton GEMV (0: cuBLAS)"),
    EnvVar("ATOM_STREAM_QKV_SPLITK_MAX_M", "32",
           "most rows of the fused q_a + kv_a GEMM run by the Triton split-K GEMM (0: cuBLAS)"),
    EnvVar("ATOM_STREAM_ROUTER_SPLITK_MAX_M", "16",
           "most rows of the fused router + shared gate/up GEMM run by the Triton split-K GEMM "
           "(0: cuBLAS)"),
    EnvVar("ATOM_STREAM_O_PROJ_GEMV_MAX_M", "1",
           "most rows of the attention's o_proj run by the Triton GEMV (0: cuBLAS)"),
    EnvVar("ATOM_STREAM_ROUTER_GEMV_MAX_M", "2",
           "most rows of the fused router + shared gate/up GEMM run by the Triton GEMV (0: cuBLAS)"),
    EnvVar("ATOM_STREAM_QB_PROLOGUE", "1",
           "one-token steps: the MLA prologue's kv part and the q_a norm ride in the q_b GEMV "
           "launch (kernels/mla_prologue.qb_prologue)"),
    EnvVar("ATOM_STREAM_NORM_GEMV", "1",
           "one-row decode steps: each layer's add + RMSNorm folded into the GEMV that reads it "
           "(q_a + kv_a, router + shared gate/up)"),
    EnvVar("ATOM_STREAM_SHARED_DOWN_GEMV_MAX_M", "1",
           "most rows of the shared expert's down GEMM (+ routed output) run by the Triton GEMV"),
    EnvVar("ATOM_STREAM_ABSORB_QB", "1", "decode-only steps: q_b with W_UK folded in, one GEMM"),
    EnvVar("ATOM_STREAM_ABSORB_QB_MIN_B", "8",
           "fewest rows of a decode-only step that take the folded q_b GEMM (ABSORB_QB)"),
    EnvVar("ATOM_STREAM_FUSE_ROUTER_SHARED", "1",
           "router GEMM and shared expert gate/up GEMM as one GEMM"),
    EnvVar("ATOM_STREAM_MOE_SMALL_M_MAX", "4", "largest M of the 4-bit small-M MoE path"),
    EnvVar("ATOM_STREAM_MOE_M1_KERNEL", "1", "M = 1: the one-launch per-pair gate_up"),
    EnvVar("ATOM_STREAM_MOE_W13_TILE", "16", "rows per tile of the 4-bit gate_up weights"),
    EnvVar("ATOM_STREAM_MOE_PAIR_M_MAX", "8", "largest M of the per-pair 4-bit gate_up"),
    EnvVar("ATOM_STREAM_MOE_ALIGN_PAR", "1", "MoE align in its parallel one-launch form"),
    EnvVar("ATOM_STREAM_MOE_CFG", None, "JSON object of fused-MoE config keys over the defaults"),
    EnvVar("ATOM_STREAM_SYMM_ALLREDUCE", "1",
           "TP on GPUs: one-shot symmetric-memory all-reduce for decode-sized tensors"),
    EnvVar("ATOM_STREAM_CHECK_TABLES", "0", "debug: check block tables on every gather"),
    EnvVar("TRITON_INTERPRET", "0", "Triton's interpreter (CPU tensors)"),
    EnvVar("MASTER_ADDR", None, "torch.distributed rendezvous address (CLI default)"),
    EnvVar("MASTER_PORT", None, "torch.distributed rendezvous port (CLI default)"),
    EnvVar("OPENAI_API_KEY", None, "the serving benchmark's API key"),
)}


def text(name: str) -> str | None:
    """The variable's value now, or its registered default (None: unset and no default)."""
    return os.environ.get(name, VARS[name].default)


def flag(name: str) -> bool:
    """A 0/1 switch: True when the value (or default) is "1"."""
    return text(name) == "1"


def integer(name: str) -> int:
    """An integer switch; a value that is not an integer is a ValueError naming the variable."""
    value = text(name)
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def triton_interpreted() -> bool:
    """TRITON_INTERPRET=1: Triton runs kernels in its interpreter (CPU tensors)."""
    return flag("TRITON_INTERPRET")
