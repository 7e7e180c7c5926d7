"""Checkpoint loading: safetensors (single file or sharded with model.safetensors.index.json)
into the model's parameters, or dummy weights.

Name mapping (HF names; model_spec.md §2):
- Kimi-K2.5 prefixes the text model with `language_model.` (transformers-5's native Kimi_K25
  layout: `model.language_model.`); `vision_tower.*` and `mm_projector.*` are skipped without
  reading their bytes (safetensors reads a tensor only when asked).
- Per-expert tensors `mlp.experts.E.{gate,up,down}_proj.weight` are stacked expert-major into
  `mlp.experts.w13` [E, 2I, H] (gate rows then up rows) and `mlp.experts.w2` [E, H, I];
  transformers-5 fused names `mlp.experts.gate_up_proj` / `mlp.experts.down_proj` also load.
  Expert parallel: a rank stacks only its experts [start, start + E_local) at the full I; the
  other experts' per-expert tensors are skipped without reading their bytes (a fused tensor is
  read whole, then sliced).
- Layers >= num_hidden_layers (DeepSeek-V3's MTP layer 61) and rotary buffers are skipped.

Every failure raises one `CheckpointError` that names the file or tensor: a missing tensor, a
shape mismatch, an unreadable/corrupt file, no weights found, a tensor of a served layer whose
module the model lacks (config.json and checkpoint disagree), a linear bias the model has no
place for. Other unused tensors (outside the served layers, or extra attributes of a module the
model has) are logged as a warning.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator

import torch
from torch import nn

from atom_stream.layers.parallel import TPInfo, tp

logger = logging.getLogger(__name__)

SKIP_PREFIXES = ("vision_tower.", "mm_projector.", "model.vision_tower.", "model.mm_projector.")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT_RE = re.compile(
    r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(.+)$")


class CheckpointError(RuntimeError):
    """The checkpoint cannot be loaded; the message names the file or tensor."""


def normalize_name(name: str) -> str | None:
    """Map a checkpoint tensor name to our naming, or None to skip it."""
    if name.startswith(SKIP_PREFIXES) or name.startswith("language_model.vision"):
        return None
    if name.startswith("language_model."):
        name = name[len("language_model."):]
        if name.startswith(("layers.", "embed_tokens.", "norm.")):
            name = "model." + name
    elif name.startswith("model.language_model."):  # transformers-5 Kimi_K25 (native layout)
        name = "model." + name[len("model.language_model."):]
    if name.startswith(SKIP_PREFIXES):
        return None
    if "rotary_emb" in name or name.endswith(".inv_freq"):
        return None
    return name


def _served(name: str, num_layers: int | None) -> bool:
    """Whether checkpoint tensor `name` (its checkpoint spelling) belongs to the served model:
    not a skipped prefix (vision tower, projector, rotary buffers) nor a layer past
    `num_layers` (MTP). None: every layer is served."""
    norm = normalize_name(name)
    if norm is None:
        return False
    m = _LAYER_RE.match(norm)
    return num_layers is None or not m or int(m.group(1)) < num_layers


def checkpoint_files(path: str, num_layers: int | None = None) -> list[str]:
    """The safetensors files of a checkpoint directory (index order when an index exists).
    A shard the index names that is not on disk is an error naming it and one served tensor
    it holds; a missing shard with only skipped tensors (a dropped MTP / vision shard) is
    left out with a warning, as vLLM loads the shards it finds."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = {f for f in files if not os.path.exists(os.path.join(path, f))}
        for name, f in weight_map.items():
            if f in missing and _served(name, num_layers):
                raise CheckpointError(f"{path}: shard {f!r} named in the index is missing "
                                      f"(it holds {name!r})")
        if missing:
            logger.warning("%s: shards %s named in the index are missing; they hold only "
                           "tensors the served model skips", path, ", ".join(sorted(missing)))
        return [os.path.join(path, f) for f in files if f not in missing]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no .safetensors files (and no index) found")
    return [os.path.join(path, f) for f in files]


def iter_checkpoint(path: str, progress: bool = True, num_layers: int | None = None
                    ) -> Iterator[tuple[str, Callable[[], torch.Tensor], tuple, str]]:
    """Yields (normalized name, lazy tensor getter, shape, shard file basename) for each tensor
    to load (`num_layers`: the served layers, see checkpoint_files)."""
    from safetensors import safe_open

    files = checkpoint_files(path, num_layers)
    bar = None
    if progress and len(files) > 1:
        from tqdm import tqdm
        bar = tqdm(total=len(files), desc="Loading safetensors shards", unit="shard")
    for file in files:
        try:
            handle = safe_open(file, framework="pt", device="cpu")
            keys = list(handle.keys())
        except Exception as e:  # safetensors raises SafetensorError / OSError on corrupt headers
            raise CheckpointError(f"{file}: cannot read safetensors file ({e})") from None
        for key in keys:
            name = normalize_name(key)
            if name is None:
                continue

            def get(handle=handle, key=key, file=file):
                try:
                    return handle.get_tensor(key)
                except Exception as e:
                    raise CheckpointError(f"{file}: tensor {key!r} is unreadable ({e})") from None

            try:
                shape = tuple(handle.get_slice(key).get_shape())
            except Exception as e:
                raise CheckpointError(f"{file}: tensor {key!r} is unreadable ({e})") from None
            yield name, get, shape, os.path.basename(file)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()


class WeightLoader:
    """Copies checkpoint tensors into a model's parameters and checks completeness.

    Quantization methods extend `targets` (layers/quant): for a name they return the parameter
    and an optional slice to copy into, or a custom loader."""

    def __init__(self, model: nn.Module, num_layers: int, tp_info: TPInfo | None = None,
                 mtp_layers: int | None = None):
        self.model = model
        # layers num_layers .. num_layers + mtp_layers - 1: DeepSeek-V3's multi-token-prediction
        # layers, skipped quietly; layers past them are reported as unused (None: any layer
        # past num_layers is skipped quietly)
        self.mtp_layers = mtp_layers
        self.tp = tp_info or tp()
        self.num_layers = num_layers
        self.params = dict(model.named_parameters())
        self.loaded: set[str] = set()
        self.custom: list[Callable[[str, Callable, tuple], bool]] = []
        self.ignored: list[str] = []  # checkpoint tensors no part of the model takes

    def _copy(self, pname: str, tensor: torch.Tensor, index: tuple = (), src: str = "",
              part: str = "") -> None:
        param = self.params.get(pname)
        if param is None:
            raise CheckpointError(f"{src}: no parameter {pname!r} in the model")
        dst = param.data[index] if index else param.data
        if dst.dtype.is_floating_point and dst.dtype.itemsize > 1 and (
                not tensor.dtype.is_floating_point or tensor.dtype.itemsize == 1):
            # an integer / bool / 8-bit float tensor where the model holds real values: a
            # quantized checkpoint whose config.json lacks quantization_config, or a broken file
            hint = (" (quantized weights: does config.json carry its quantization_config?)"
                    if tensor.dtype.itemsize == 1 else "")
            raise CheckpointError(f"{src}: checkpoint tensor is {tensor.dtype}, the model "
                                  f"expects {dst.dtype} values{hint}")
        dim = getattr(param, "tp_dim", None)
        if self.tp.size > 1 and dim is not None and tensor.dim() > dim:
            want = list(dst.shape)
            local = want[dim]
            # the whole tensor, checked before this rank's slice (tp_full: a padded vocab dim)
            want[dim] = getattr(param, "tp_full", local * self.tp.size)
            if tuple(tensor.shape) != tuple(want):
                raise CheckpointError(
                    f"{src}: shape mismatch, checkpoint has {tuple(tensor.shape)}, model "
                    f"expects {tuple(want)} (split {self.tp.size} ways on dim {dim})")
            dst, tensor = _rank_slice(dst, tensor, dim, self.tp.rank, local)
        if tuple(dst.shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{src}: shape mismatch, checkpoint has {tuple(tensor.shape)}, "
                f"model expects {tuple(dst.shape)}")
        dst.copy_(tensor.to(dst.dtype))
        self.loaded.add(f"{pname}#{part}" if part else pname)

    def load_one(self, name: str, get: Callable[[], torch.Tensor], shape: tuple) -> None:
        m = _LAYER_RE.match(name)
        if m and int(m.group(1)) >= self.num_layers:  # not part of the served model
            if self.mtp_layers is not None and int(m.group(1)) >= (
                    self.num_layers + self.mtp_layers):
                self.ignored.append(name)  # not an MTP layer either: warned about
            return
        for hook in self.custom:
            if hook(name, get, shape):
                return
        e = _EXPERT_RE.match(name)
        if e and e.group(4) == "weight":
            base, idx, proj = e.group(1), int(e.group(2)), e.group(3)
            w13 = self.params.get(f"{base}.w13")
            if w13 is None:
                raise CheckpointError(f"{name}: no experts in the model at {base}")
            start, n_local, n_all = _expert_range(self.model, base, w13)
            if idx >= n_all:
                raise CheckpointError(f"{name}: expert {idx} out of range ({n_all} experts)")
            if not start <= idx < start + n_local:
                return  # expert parallel: another rank's expert, never read
            local = idx - start
            inter = w13.shape[1] // 2
            if proj == "down_proj":
                self._copy(f"{base}.w2", get(), (local,), name, f"{idx}.down_proj")
            else:
                rows = slice(0, inter) if proj == "gate_proj" else slice(inter, 2 * inter)
                self._copy(f"{base}.w13", get(), (local, rows), name, f"{idx}.{proj}")
            return
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            # transformers-5 fused layout: [E, 2I, H] / [E, H, I]; split into per-expert copies
            base = name.rsplit(".", 1)[0]
            full = get()
            for idx in range(full.shape[0]):
                if name.endswith("down_proj"):
                    self.load_one(f"{base}.{idx}.down_proj.weight", lambda t=full[idx]: t, ())
                else:
                    half = full.shape[1] // 2
                    for proj, rows in (("gate_proj", full[idx, :half]),
                                       ("up_proj", full[idx, half:])):
                        self.load_one(f"{base}.{idx}.{proj}.weight", lambda t=rows: t, ())
            return
        if name in self.params:
            self._copy(name, get(), (), name)
            return
        if name.endswith(("k_scale", "v_scale", "kv_scale")):
            return  # KV scales are read by the KV-cache setup, not parameters
        if 0 in shape:
            return  # an empty tensor (transformers writes [0, H] shared experts for n_shared 0)
        if name.endswith(".bias") and name[:-len("bias")] + "weight" in self.params:
            # a bias the model would silently drop: its outputs would be wrong
            raise CheckpointError(f"{name}: the checkpoint has a bias for this layer, which "
                                  f"the model does not support (config attention_bias?)")
        self.ignored.append(name)

    def has_module(self, name: str) -> bool:
        """Whether the model has parameters under the module of checkpoint tensor `name` (an
        expert's tensors count as their experts group's)."""
        m = _EXPERT_RE.match(name)
        prefix = (m.group(1) if m else name.rsplit(".", 1)[0]) + "."
        return any(p.startswith(prefix) for p in self.params)

    def check_complete(self, tie_word_embeddings: bool) -> None:
        """Raise naming the first checkpoint tensor that never arrived."""
        missing: list[str] = []
        # the routing correction bias exists only where routing uses it (noaux_tc); DeepSeek-V2
        # (greedy / softmax) checkpoints have none, and the Router's zeros stand unused
        cfg = getattr(self.model, "config", None)
        no_bias = getattr(cfg, "topk_method", "noaux_tc") != "noaux_tc"
        for pname, p in self.params.items():
            if pname in self.loaded or (tie_word_embeddings and pname == "lm_head.weight"):
                continue
            if no_bias and pname.endswith("mlp.gate.e_score_correction_bias"):
                continue
            if pname.endswith(("experts.w13", "experts.w2")):
                base = pname.rsplit(".", 1)[0]
                projs = ("gate_proj", "up_proj") if pname.endswith("w13") else ("down_proj",)
                start, n_local, _ = _expert_range(self.model, base, p)
                missing += [f"{base}.{e}.{proj}.weight" for e in range(start, start + n_local)
                            for proj in projs if f"{pname}#{e}.{proj}" not in self.loaded]
            else:
                missing.append(pname)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"checkpoint is missing tensor {missing[0]!r}{more}")


def _rank_slice(dst: torch.Tensor, full: torch.Tensor, dim: int, rank: int, local: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the part of `dst` to copy into, rank's rows [rank*local, +local) of `full` along dim).
    Rows past the end of `full` (a padded vocab dim) are zeroed in dst and left out of both."""
    start = rank * local
    n = max(0, min(local, full.shape[dim] - start))
    if n < local:
        dst.zero_()
        dst = dst.narrow(dim, 0, n)
    return dst, full.narrow(dim, min(start, full.shape[dim]), n)


def _expert_range(model: nn.Module, base: str, w13: torch.Tensor) -> tuple[int, int, int]:
    """(first global id, local count, global count) of the routed experts module at `base`
    (expert parallel: this rank's slice; else all of them)."""
    try:
        ex = model.get_submodule(base)
    except AttributeError:
        ex = None
    n = w13.shape[0]
    return (getattr(ex, "expert_start", 0), getattr(ex, "num_local_experts", n),
            getattr(ex, "num_experts", n))


def load_checkpoint(model: nn.Module, path: str, num_layers: int, tie_word_embeddings: bool,
                    mtp_layers: int | None = None,
                    extra_hooks: list | None = None) -> None:
    loader = WeightLoader(model, num_layers, mtp_layers=mtp_layers)
    loader.custom.extend(extra_hooks or [])
    n = 0
    seen: dict[str, str] = {}  # normalized name -> file
    for name, get, shape, file in iter_checkpoint(path, num_layers=num_layers):
        if name in seen:  # a stale model.safetensors beside newer shards, a repeated tensor
            raise CheckpointError(f"{path}: tensor {name!r} is in both {seen[name]} and {file}")
        seen[name] = file
        loader.load_one(name, get, shape)
        n += 1
    if n == 0:
        raise CheckpointError(f"{path}: no tensors found")
    served = [n for n in loader.ignored
              if (m := _LAYER_RE.match(n)) and int(m.group(1)) < num_layers
              and not loader.has_module(n)]
    if served:
        # a tensor of a served layer whose module the model does not have: config.json and the
        # checkpoint disagree (e.g. n_shared_experts 0 beside shared-expert weights); serving
        # without it would give wrong tokens. An extra attribute of a module the model has
        # (an unused input_scale, ...) only warns below.
        more = f" (and {len(served) - 1} more)" if len(served) > 1 else ""
        raise CheckpointError(f"{path}: checkpoint tensor {served[0]!r}{more} has no place in "
                              f"the model its config.json describes")
    if loader.ignored:
        logger.warning("%d checkpoint tensors not used by the model (e.g. %s)",
                       len(loader.ignored), ", ".join(loader.ignored[:3]))
    loader.check_complete(tie_word_embeddings)
    for hook in extra_hooks or []:  # quant hooks (layers/quant) check their own tensors arrived
        getattr(hook, "check_complete", lambda: None)()


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0, tp_info: TPInfo | None = None) -> None:
    """Random weights of the right shapes and dtypes (no files needed beyond config.json).

    Each parameter draws from its own generator (seed + crc32 of its name), as the FULL tensor,
    and a TP rank keeps its shard (an EP rank its experts), so every TP/EP size builds the same
    model. Norm weights are 1;
    linear weights N(0, 1/sqrt(in)) so activations stay O(1) at any depth; router bias small."""
    import zlib

    info = tp_info or tp()
    dev = next(model.parameters()).device
    for name, p in model.named_parameters():
        if p.dtype in (torch.int32, torch.uint8, torch.int8) or p.dtype.itemsize == 1:
            continue  # packed/quantized tensors are filled by their quant method
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
            continue
        g = torch.Generator(device=dev).manual_seed(seed + zlib.crc32(name.encode()))
        dim = getattr(p, "tp_dim", None)
        shape = list(p.shape)
        is_w13, is_w2 = name.endswith("experts.w13"), name.endswith("experts.w2")
        ep_start, ep_n, ep_all = (_expert_range(model, name.rsplit(".", 1)[0], p)
                                  if is_w13 or is_w2 else (0, 0, 0))
        shape[0] = ep_all or shape[0]  # expert parallel: draw every expert, keep ours below
        if info.size > 1 and dim is not None:
            d = 1 if is_w13 else 2 if is_w2 else dim
            shape[d] = getattr(p, "tp_full", shape[d] * info.size)
        if name.endswith("e_score_correction_bias"):
            full = torch.randn(shape, generator=g, device=dev) * 0.01
        else:
            std = 1.0 if name.endswith("embed_tokens.weight") else shape[-1] ** -0.5
            full = torch.empty(shape, dtype=torch.float32, device=dev).normal_(0.0, std,
                                                                               generator=g)
        if info.size > 1 and dim is not None:
            r = info.rank
            if is_w13:
                inter, local = shape[1] // 2, p.shape[1] // 2
                full = torch.cat([full[:, r * local:(r + 1) * local],
                                  full[:, inter + r * local:inter + (r + 1) * local]], dim=1)
            else:
                d = 2 if is_w2 else dim
                dst, full = _rank_slice(p.data, full, d, r, p.shape[d])
                dst.copy_(full)
                continue
        if ep_n != ep_all:
            full = full[ep_start:ep_start + ep_n]
        p.data.copy_(full)
