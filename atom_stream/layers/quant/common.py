"""Shared pieces of the quant methods: the method interfaces, TP narrowing of checkpoint tensors,
the reference MoE loop, FP8 activation quant-dequant, and the bridge to the Triton fused MoE.

Method contracts (one instance per scheme, shared by the layers it quantizes):
- LinearMethod: `create(layer)` swaps `layer.weight` (a float Parameter) for the format's
  buffers (memory at rest = the format); `load(layer, suffix, tensor, name)` copies the checkpoint
  tensor `{layer}.{suffix}`; `dequantize(layer)` -> dense [out, in] in the layer's dtype;
  `apply(layer, x)` -> x @ W^T (the Linear module adds the TP all-reduce).
- MoEMethod: the same for the stacked routed experts (`{experts}.{e}.{proj}.{suffix}`, proj in
  gate_proj/up_proj/down_proj), `apply(experts, x, topk_weights, topk_ids)` -> [T, H].
  Buffers hold `experts.num_local_experts` experts (all of them unless expert parallel); `load`
  gets the LOCAL index (the loader hook maps global ids and skips other ranks' experts) and
  `apply` gets local top-k ids (Experts.forward remaps them).
Quantized tensors are registered as buffers, not Parameters: the generic loader and
`init_dummy_weights` see only the float parameters; the quant loader hook owns the rest and
checks that each arrived. Buffers move with the module like parameters do.

The CPU reference forward dequantizes on the fly (per forward, per chosen expert) and never
caches dense weights: memory at rest stays packed.

Platform FP8 (MI300): checkpoints store float8_e4m3fn; MI300 (gfx94x) computes in e4m3fnuz
(layers/attention.fp8_dtype decides; MI355 gfx950 and NVIDIA use e4m3fn). `fp8_to_platform`
converts at load without changing any dequantized value: the same bits read as fnuz are worth
half (exponent bias 8 instead of 7, subnormals included), so the multiplier doubles, and 0x80
(-0.0 in fn, NaN in fnuz) becomes 0x00. `force_platform_fp8(dtype)` overrides the platform
choice (CPU tests of the MI300 path).
"""

from __future__ import annotations

import logging
import zlib
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from atom_stream import envs
from atom_stream.kernels.moe_ref import exact_div
from atom_stream.layers.attention import fp8_dtype
from atom_stream.layers.moe import moe_loop  # noqa: F401  (re-exported for the formats)
from atom_stream.layers.parallel import TPInfo
from atom_stream.loader import CheckpointError

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
PROJS = ("gate_proj", "up_proj", "down_proj")


def real_device(p: torch.Tensor) -> torch.device:
    """The device a (possibly meta, deferred) parameter is meant for."""
    return getattr(p, "real_device", p.device)


def generator(name: str, device: torch.device, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed + zlib.crc32(name.encode()))


def tp_narrow(t: torch.Tensor, dim: int | None, tp: TPInfo, name: str) -> torch.Tensor:
    """This rank's slice of a full checkpoint tensor along `dim` (None: replicated)."""
    if tp.size == 1 or dim is None or t.dim() <= dim:
        return t
    n = t.shape[dim]
    if n % tp.size:
        raise CheckpointError(f"{name}: dim {dim} ({n}) is not divisible by "
                                    f"tensor_parallel_size {tp.size}")
    local = n // tp.size
    return t.narrow(dim, tp.rank * local, local)


def copy_into(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise CheckpointError(f"{name}: shape mismatch, checkpoint has {tuple(src.shape)}, "
                                    f"model expects {tuple(dst.shape)}")
    dst.copy_(src.to(dst.dtype))


def scale_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """Group/channel scales: bf16 as checkpoints ship them, float32 in a float32 model (exact)."""
    return torch.float32 if model_dtype == torch.float32 else torch.bfloat16


class LinearMethod:
    format = ""
    suffixes: tuple[str, ...] = ()   # checkpoint tensors each layer must have
    optional: tuple[str, ...] = ()   # accepted and ignored when present
    online = False  # quantizes a float checkpoint weight as it loads (online_quant_config)

    def __init__(self, scheme):
        self.scheme = scheme

    def create(self, layer: nn.Module, name: str) -> None:
        w = layer.weight
        layer.quant_dtype = w.dtype
        layer.quant_tp_dim = getattr(w, "tp_dim", None)
        device = real_device(w)
        del layer.weight
        self.create_buffers(layer, device)
        layer.quant_method = self
        self.dummy(layer, generator(name, device))

    def full_shape(self, layer) -> tuple[int, int]:
        """[out, in] of the whole (unsharded) weight."""
        out, inp, tp = layer.out_features, layer.in_features, layer.tp.size
        return (out * tp, inp) if layer.quant_tp_dim == 0 else (
            (out, inp * tp) if layer.quant_tp_dim == 1 else (out, inp))

    def create_buffers(self, layer, device) -> None:
        raise NotImplementedError

    def dummy(self, layer, gen: torch.Generator) -> None:
        """Valid random content (load_format dummy / bench presets); a checkpoint overwrites it."""
        raise NotImplementedError

    def load(self, layer, suffix: str, tensor: torch.Tensor, name: str) -> None:
        raise NotImplementedError

    def dequantize(self, layer) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(layer))


class MoEMethod:
    format = ""
    suffixes: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()

    def __init__(self, scheme):
        self.scheme = scheme

    def create(self, experts: nn.Module, name: str, tp: TPInfo) -> None:
        experts.quant_dtype = experts.w13.dtype
        experts.quant_tp = tp.moe_tp  # the intermediate split (a single rank under EP)
        device = real_device(experts.w13)
        del experts.w13, experts.w2
        self.create_buffers(experts, device)
        experts.quant_method = self
        self.dummy(experts, generator(name, device))

    def create_buffers(self, experts, device) -> None:
        raise NotImplementedError

    def dummy(self, experts, gen: torch.Generator) -> None:
        raise NotImplementedError

    def load(self, experts, idx: int, proj: str, suffix: str, tensor: torch.Tensor,
             name: str) -> None:
        raise NotImplementedError

    def apply(self, experts, x, topk_weights, topk_ids) -> torch.Tensor:
        raise NotImplementedError


def proj_rows(experts, proj: str) -> slice:
    """Rows of w13 that hold gate_proj (first I) or up_proj (next I)."""
    inter = experts.inter
    return slice(0, inter) if proj == "gate_proj" else slice(inter, 2 * inter)


def narrow_expert(t: torch.Tensor, proj: str, experts, name: str) -> torch.Tensor:
    """TP slice of a per-expert tensor: rows of gate/up, columns of down (2-D tensors only;
    per-row vectors of gate/up are narrowed too, per-row vectors of down and scalars are not)."""
    tp = experts.quant_tp
    if t.dim() == 0:
        return t
    if proj == "down_proj":
        return tp_narrow(t, 1, tp, name) if t.dim() == 2 else t
    return tp_narrow(t, 0, tp, name)


def swiglu_expert(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, act_qdq=None):
    """down(silu(gate(x)) * up(x)); `act_qdq` quant-dequantizes the inputs of both GEMMs."""
    inter = w2.shape[-1]
    if act_qdq is not None:
        x = act_qdq(x)
    h = F.linear(x, w13)
    a = F.silu(h[:, :inter]) * h[:, inter:]
    if act_qdq is not None:
        a = act_qdq(a)
    return F.linear(a, w2)


# ---------------------------------------------------------------- platform FP8 (e4m3fnuz)
FNUZ = torch.float8_e4m3fnuz
_forced_fp8: list[torch.dtype] = []


def platform_fp8_dtype() -> torch.dtype:
    """The FP8 dtype FP8 weights are kept in here: e4m3fnuz on MI300, else e4m3fn (or the dtype
    of the innermost `force_platform_fp8`)."""
    return _forced_fp8[-1] if _forced_fp8 else fp8_dtype()


@contextmanager
def force_platform_fp8(dtype: torch.dtype):
    """Make platform_fp8_dtype() return `dtype` inside the block (tests: the MI300 conversion on
    a CPU). Affects quantized layers created and tensors loaded inside it."""
    if dtype not in (FP8, FNUZ):
        raise ValueError(f"force_platform_fp8: {dtype} is not float8_e4m3fn/fnuz")
    _forced_fp8.append(dtype)
    try:
        yield
    finally:
        _forced_fp8.pop()


def e4m3fn_to_fnuz(w: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn -> float8_e4m3fnuz with the same bits (value / 2, exactly), except 0x80
    (-0.0, NaN in fnuz) -> 0x00 (+0). fn NaNs (0x7F/0xFF) become +-240: checkpoints have none."""
    if w.dtype != FP8:
        raise TypeError(f"e4m3fn_to_fnuz: expected float8_e4m3fn, got {w.dtype}")
    bits = w.view(torch.uint8)
    bits = torch.where(bits == 0x80, torch.zeros_like(bits), bits)
    return bits.view(FNUZ)


def fp8_scale_to_platform(scale: torch.Tensor, target: torch.dtype | None = None) -> torch.Tensor:
    """The multiplier that goes with `fp8_to_platform`'s weight: doubled on e4m3fnuz (exact)."""
    return scale * 2.0 if (target or platform_fp8_dtype()) == FNUZ else scale


def fp8_to_platform(w: torch.Tensor, scale: torch.Tensor | None = None,
                    target: torch.dtype | None = None):
    """(e4m3fn weight, its multiplier: value = w * scale) -> the same values in the platform's
    FP8: unchanged on e4m3fn platforms, (e4m3fn_to_fnuz(w), scale * 2) on MI300. `scale` may be
    None (convert the scale separately with fp8_scale_to_platform). Returns (w, scale).

    Call it wherever a checkpoint FP8 tensor (or one re-quantized to e4m3fn at load, as W4A8
    does) is stored into a buffer of dtype platform_fp8_dtype()."""
    target = target or platform_fp8_dtype()
    if target == FP8:
        return w, scale
    w = e4m3fn_to_fnuz(w)
    return w, (None if scale is None else fp8_scale_to_platform(scale, target))


# ---------------------------------------------------------------- FP8 activation quant-dequant
def fp8_qdq_per_token(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token FP8 e4m3: s = amax(row)/448, x -> fp8(x/s) * s."""
    xf = x.float()
    s = exact_div(xf.abs().amax(-1, keepdim=True), FP8_MAX).clamp(min=1e-12)
    q = (xf / s).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return (q.float() * s).to(x.dtype)


def fp8_qdq_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static per-tensor FP8 e4m3 with the checkpoint's input scale."""
    s = scale.float()
    q = (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return (q.float() * s).to(x.dtype)


def fp8_qdq_group(x: torch.Tensor, group: int = 128, ue8m0: bool = False) -> torch.Tensor:
    """DeepSeek FP8 activations (model_spec §4a): per token, per `group` channels,
    s = max(amax, 1e-4)/448 (rounded up to a power of two when ue8m0)."""
    n = x.shape[-1]
    pad = (-n) % group
    xf = F.pad(x.float(), (0, pad)).unflatten(-1, (-1, group))
    s = exact_div(xf.abs().amax(-1, keepdim=True).clamp(min=1e-4), FP8_MAX)
    if ue8m0:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    q = (xf / s).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return (q.float() * s).flatten(-2)[..., :n].to(x.dtype)


# ---------------------------------------------------------------- GPU bridge
_fused = None
_warned: set[str] = set()


def log_once(key: str, msg: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.info(msg, *args)


def fused_moe_kernel():
    """kernels/fused_moe.fused_moe when that module exists (None otherwise)."""
    global _fused
    if _fused is None:
        try:
            from atom_stream.kernels.fused_moe import fused_moe
            _fused = fused_moe
        except ImportError:
            _fused = False
    return _fused or None


def try_fused_moe(x, w13, w2, topk_weights, topk_ids, quant: str, **kw):
    """Run the Triton fused MoE on CUDA/ROCm tensors when available; None -> use the reference.

    Calls `fused_moe(hidden, w13, w2, topk_weights, topk_ids, quant=quant, **kw)` with
    quant in {"int4_g32" (w*_scale: group scales), "mxfp4" (w*_scale: e8m0 uint8, act_quant),
    "fp8_tensor" (w*_scale [E] fp32, a*_scale static or None = dynamic per token),
    "fp8_block" (w*_scale_inv block scales)}."""
    if not x.is_cuda:
        return None
    fn = fused_moe_kernel()
    if fn is None:
        log_once(f"nofused:{quant}", "fused_moe kernel unavailable: %s experts run the torch "
                 "reference path (dequantize per forward)", quant)
        return None
    try:
        return fn(x, w13, w2, topk_weights, topk_ids, quant=quant, **kw)
    except (TypeError, NotImplementedError) as e:  # kernel without this quant mode
        log_once(f"fusedfail:{quant}", "fused_moe does not take quant=%s (%s); using the torch "
                 "reference path", quant, e)
        return None


def _repack_chunked(repack, w: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """repack(w) over `chunk` experts at a time: the repack unpacks nibbles into wide integer
    temporaries (a whole K2.5 layer's w13 at once peaked ~36 GB above the weights on the H200),
    so the transient stays ~chunk/E of that."""
    out = None
    for i in range(0, w.shape[0], chunk):
        r = repack(w[i:i + chunk])
        if out is None:
            out = torch.empty((w.shape[0],) + tuple(r.shape[1:]), dtype=r.dtype, device=r.device)
        out[i:i + chunk] = r
    return out


def w13_tile_rows() -> int:
    """ATOM_STREAM_MOE_W13_TILE: rows per tile of the repacked 4-bit gate_up weights and scales
    (kernels/fused_moe.tile_w13; 1 = row-major). Read at load time. Default 16: decode step
    k25-tp8-rank int4 B=16 16.67 -> 14.84 ms, B=64 32.27 -> 27.24, B=256 52.35 -> 46.04 in one
    H200 run (bench/RESULTS.md session 5)."""
    t = envs.integer("ATOM_STREAM_MOE_W13_TILE")
    if t < 1 or t & (t - 1):
        raise ValueError(f"ATOM_STREAM_MOE_W13_TILE={t}: a power of 2 >= 1")
    return t


def repack_for_kernel(experts, w13_name: str, w2_name: str, repack,
                      w13_scale_name: str | None = None) -> None:
    """On GPUs, replace the checkpoint-layout 4-bit expert tensors by the fused-MoE kernel's
    layout (still 4 bits/weight; kernels/fused_moe.repack_*_moe), one layer at a time so the
    peak stays one layer's experts. The CPU keeps the checkpoint layout (reference path).
    With w13_scale_name and w13_tile_rows() = T > 1 (dividing 2I), the gate_up words and that
    scale buffer are then row-tiled in place of the row-major ones (kernels/fused_moe.tile_w13;
    no extra memory kept)."""
    w13 = getattr(experts, w13_name)
    if not w13.is_cuda or fused_moe_kernel() is None:
        return
    try:  # both first: a shape the kernel layout cannot tile leaves the layer untouched
        packed = [_repack_chunked(repack, getattr(experts, name)) for name in (w13_name, w2_name)]
    except ValueError as e:  # K not a multiple of 128 (tiny test models): the torch path
        logger.info("experts kept in the checkpoint layout: %s", e)
        return
    T = w13_tile_rows() if w13_scale_name else 1
    if T > 1 and packed[0].shape[1] % T == 0:
        from atom_stream.kernels.fused_moe import tile_w13
        packed[0], scale = tile_w13(packed[0], getattr(experts, w13_scale_name), T)
        setattr(experts, w13_scale_name, scale)
    for name, p in zip((w13_name, w2_name), packed):
        setattr(experts, name, None)
        experts.register_buffer(name + "_kernel", p)
    experts.kernel_layout = True
