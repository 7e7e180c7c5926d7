"""ATOM's --online_quant_config (EngineConfig.online_quant_config; layers/quant/online.py and
ptpc_fp8.py), CPU, float32, on tiny random DeepseekV3 checkpoints (tests/quant_writers.py):

- ptpc_fp8 on the attention projections (ATOM's Kimi-K2.5 recipe: `"*self_attn*"`): those
  Linears hold FP8 e4m3 weights with one fp32 scale per output channel after load, equal to the
  test's own per-channel quantization of the checkpoint weights; every other layer is untouched.
- The engine's logits equal (relative L2 < 1e-5) those of the model carrying the test's
  quant-dequantized weights with the test's own per-token FP8 activation quant-dequant hooked in
  front of the same Linears; greedy tokens stay close to the unquantized model's.
- TP=2 (gloo): the same FP8 weights on every rank (row scales over whole rows) and the TP=1
  tokens.
- per_block_fp8 (128x128 weight blocks, activations per token per 128 channels) likewise.
- A checkpoint-quantized layer (MXFP4 experts) keeps its method.
- CLI: `--online_quant_config JSON` reaches EngineConfig (kebab and snake case) and is not
  logged as a no-op; `LLM(online_quant_config=...)` takes a dict or JSON text; bad JSON, unknown
  keys/formats and ATOM's mxfp4 / mxfp8 targets are start-up errors naming them.
- The GPU path (kernels/fp8_linear under the Triton interpreter) gives the torch path's output.
"""

from __future__ import annotations

import logging
import os
import shlex
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from kernel_interp import interpret_without_gpu

GPU = interpret_without_gpu("kv_store", "norm_rope", "fp8_linear")  # before the kernels load

import quant_writers as qw
from atom_stream import cli
from atom_stream.config import ConfigError, EngineConfig
from atom_stream.engine.model_runner import ModelRunner
from atom_stream.layers.linear import Linear
from atom_stream.layers.quant import fp8_block, mxfp4, ptpc_fp8
from test_quant_formats import rel, run

FN = torch.float8_e4m3fn
ATTN = {"layer_quant_config": {"*self_attn*": "ptpc_fp8"}, "exclude_layer": ["lm_head"]}
NO_ROW = {"layer_quant_config": {"*self_attn*": "ptpc_fp8"}, "exclude_layer": ["*.o_proj"]}
ATTN_PROJ = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
PROMPT = torch.randint(0, 320, (19,), generator=torch.Generator().manual_seed(25)).tolist()


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("oq_src"))
    qw.make_tiny_hf(path, "kimi", seed=25)
    return path


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """Dense MLPs and realistic init (0.02): the MoE test model's discrete routing amplifies any
    perturbation (one FP8 linear moves its logits ~13%), this one's stay smooth."""
    path = str(tmp_path_factory.mktemp("oq_dense"))
    qw.make_tiny_hf(path, "kimi", seed=25, first_k_dense_replace=3, initializer_range=0.02)
    return path


def build(path: str, tp_info=None, **kw) -> ModelRunner:
    return ModelRunner(EngineConfig(model=path, device="cpu", dtype="float32", num_kv_blocks=32,
                                    block_size=4, **kw), tp_info=tp_info)


def checkpoint(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


def channel_qdq(w: torch.Tensor) -> torch.Tensor:
    """The test's per-output-channel FP8: s = amax(row) / 448."""
    s = (w.float().abs().amax(-1, keepdim=True) / 448.0).clamp(min=1e-12)
    return (w.float() / s).clamp(-448, 448).to(FN).float() * s


def token_qdq(x: torch.Tensor) -> torch.Tensor:
    """The test's per-token FP8 activations: s = max(amax(row), 1e-4) / 448."""
    s = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-4) / 448.0
    return ((x.float() / s).clamp(-448, 448).to(FN).float() * s).to(x.dtype)


def attn_linears(r: ModelRunner):
    for i, layer in enumerate(r.model.model.layers):
        for p in ATTN_PROJ:
            yield f"model.layers.{i}.self_attn.{p}", getattr(layer.self_attn, p)


def reference(src: str, tmp: str, weight_qdq, act_qdq) -> ModelRunner:
    """The unquantized model carrying weight_qdq(W) for the attention projections, with act_qdq
    applied to those Linears' inputs (forward pre-hooks)."""
    deq = {n: weight_qdq(w) for n, w in checkpoint(src).items()
           if n.endswith(".weight") and ".self_attn." in n and "layernorm" not in n}
    qw.write_reference(src, tmp, deq)
    r = build(tmp)
    for _, lin in attn_linears(r):
        lin.register_forward_pre_hook(lambda _m, args: (act_qdq(args[0]),))
    return r


def test_ptpc_attention_weights_are_fp8_after_load(src):
    r = build(src, online_quant_config=ATTN)
    ckpt = checkpoint(src)
    fp8 = 0
    for name, lin in attn_linears(r):
        assert isinstance(lin.quant_method, ptpc_fp8.PtpcFp8LinearMethod), name
        assert "weight" not in dict(lin.named_parameters())  # no float copy kept
        assert lin.weight.dtype == FN and lin.weight_scale.dtype == torch.float32
        assert lin.weight_scale.shape == (lin.out_features, 1)
        deq = lin.weight.float() * lin.weight_scale
        assert torch.equal(deq, channel_qdq(ckpt[name + ".weight"]))
        fp8 += 1
    assert fp8 == 15
    others = [(n, m) for n, m in r.model.named_modules()
              if isinstance(m, Linear) and ".self_attn." not in n]
    assert others and all(m.quant_method is None for _, m in others)
    for n, m in others:
        assert m.weight.dtype == torch.float32 and torch.equal(m.weight, ckpt[n + ".weight"])
    ex = r.model.model.layers[1].mlp.experts
    assert ex.quant_method is None and ex.w13.dtype == torch.float32


def test_ptpc_logits_equal_reference(src, tmp_path):
    got_logits, got = run(build(src, online_quant_config=ATTN), PROMPT, n_decode=10)
    ref_logits, ref = run(reference(src, str(tmp_path / "ref"), channel_qdq, token_qdq),
                          PROMPT, n_decode=10)
    assert got == ref and rel(got_logits, ref_logits) < 1e-5
    plain_logits, _ = run(build(src), PROMPT, n_decode=10)
    assert rel(got_logits, plain_logits) > 1e-3  # the quantization is real


def test_greedy_tokens_close_to_unquantized(dense):
    got_logits, got = run(build(dense, online_quant_config=ATTN), PROMPT, n_decode=10)
    plain_logits, plain = run(build(dense), PROMPT, n_decode=10)
    assert 1e-3 < rel(got_logits, plain_logits) < 6e-2 and got == plain


def test_global_config_with_atom_excludes_selects_the_same_layers(src):
    """ATOM's recipe form: global ptpc_fp8 minus lm_head, the router and the experts."""
    cfg = {"global_quant_config": "PTPC_FP8",
           "exclude_layer": ["lm_head", "*.gate.*", "*expert*", "re:.*\\.mlp\\..*"]}
    r = build(src, online_quant_config=cfg)
    quantized = {n for n, m in r.model.named_modules()
                 if isinstance(m, Linear) and m.quant_method is not None}
    assert quantized == {n for n, _ in attn_linears(r)}


def _tp_worker(rank, world, init, path, out):
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    from atom_stream.layers.parallel import TPInfo
    try:
        r = build(path, TPInfo(rank, world), online_quant_config=ATTN)
        o = r.model.model.layers[0].self_attn.o_proj
        no_row = build(path, TPInfo(rank, world), online_quant_config=NO_ROW)
        torch.save((run(r, PROMPT, n_decode=10), o.weight.float() * o.weight_scale,
                    run(no_row, PROMPT, n_decode=4)[0]), f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_tp2_gives_tp1_tokens(dense):
    """The same FP8 weights on every rank and the TP=1 tokens. Row-parallel layers (o_proj)
    quantize each rank's share of the activations per token (as ATOM and vLLM do: no extra
    collective), so their logits differ from TP=1 by FP8 rounding; without a row-parallel
    online layer they agree to float32 rounding."""
    r1 = build(dense, online_quant_config=ATTN)
    o1 = r1.model.model.layers[0].self_attn.o_proj
    w1 = o1.weight.float() * o1.weight_scale
    logits1, toks1 = run(r1, PROMPT, n_decode=10)
    no_row1 = run(build(dense, online_quant_config=NO_ROW), PROMPT, n_decode=4)[0]
    tmp = tempfile.mkdtemp()
    mp.start_processes(_tp_worker, args=(2, f"file://{tmp}/rendezvous", dense, f"{tmp}/out"),
                       nprocs=2, join=True, start_method="spawn")
    cols = w1.shape[1] // 2
    for rank in range(2):
        (logits, toks), w, no_row = torch.load(f"{tmp}/out.{rank}")
        assert toks == toks1, f"rank {rank} of TP=2 diverges"
        assert rel(logits, logits1) < 4e-2 and rel(no_row, no_row1) < 1e-5
        # row-parallel o_proj: this rank's columns of the TP=1 FP8 weight, scales included
        assert torch.equal(w, w1[:, rank * cols:(rank + 1) * cols])


def test_per_block_fp8_matches_reference(src, tmp_path):
    cfg = {"layer_quant_config": {"*self_attn*": "per_block_fp8"}}
    r = build(src, online_quant_config=cfg)
    q_b = r.model.model.layers[0].self_attn.q_b_proj
    assert isinstance(q_b.quant_method, fp8_block.Fp8BlockLinearMethod)
    assert q_b.weight.dtype == FN and q_b.weight_scale_inv.shape == (1, 1)
    got_logits, got = run(r, PROMPT, n_decode=6)
    ref = reference(src, str(tmp_path / "ref"),
                    lambda w: qw.fp8_block_dequant(*qw.fp8_block_quantize(w)), qw.fp8_group_qdq)
    ref_logits, ref_toks = run(ref, PROMPT, n_decode=6)
    assert got == ref_toks and rel(got_logits, ref_logits) < 1e-5


def test_checkpoint_quantized_layers_keep_their_method(src, tmp_path):
    """Kimi-K2.5 layout: MXFP4 experts (Quark), attention excluded by the checkpoint and
    quantized online to ptpc_fp8 by the global target."""
    path = str(tmp_path / "mxfp4")
    qw.write_quantized(src, path, "mxfp4")
    r = build(path, online_quant_config={"global_quant_config": "ptpc_fp8"})
    layer = r.model.model.layers[1]
    assert isinstance(layer.mlp.experts.quant_method, mxfp4.Mxfp4MoEMethod)
    assert isinstance(layer.mlp.shared_experts.gate_proj.quant_method, mxfp4.Mxfp4LinearMethod)
    assert isinstance(layer.self_attn.o_proj.quant_method, ptpc_fp8.PtpcFp8LinearMethod)
    assert r.model.lm_head.quant_method is None
    run(r, PROMPT, n_decode=2)


def _engine(line: str):
    args = cli.serve_parser(atom_ports=True).parse_args(shlex.split(line))
    return cli.engine_config_from_args(args)


@pytest.mark.parametrize("flag", ["--online_quant_config", "--online-quant-config"])
def test_cli_flag_reaches_engine_config(flag, caplog):
    caplog.set_level(logging.INFO, logger="atom_stream.cli")
    engine = _engine(f"{flag} '{{\"layer_quant_config\": {{\"*self_attn*\": \"ptpc_fp8\"}}}}'")
    assert engine.online_quant_config == {"layer_quant_config": {"*self_attn*": "ptpc_fp8"}}
    assert not any("online-quant-config accepted" in r.getMessage() for r in caplog.records)
    assert _engine(f"{flag} '{{}}'").online_quant_config is None


def test_llm_kwarg_takes_dict_or_json_text():
    text = '{"global_quant_config": "ptpc_fp8", "exclude_layer": "lm_head"}'
    cfg = EngineConfig.from_kwargs(model="demo", online_quant_config=text)
    assert cfg.online_quant_config == {"global_quant_config": "ptpc_fp8",
                                       "exclude_layer": "lm_head"}
    assert EngineConfig(online_quant_config={"global_quant_config": "per_block_fp8"})


@pytest.mark.parametrize("value,words", [
    ({"global_quant_config": "mxfp8"}, ("global_quant_config", "mxfp8", "not supported")),
    ({"layer_quant_config": {"*expert*": "mxfp4"}}, ("*expert*", "mxfp4", "not supported")),
    ({"global_quant_config": "int8"}, ("unknown format", "'int8'")),
    ({"global_quant": "ptpc_fp8"}, ("unknown key", "global_quant")),
    ({"global_quant_config": "ptpc_fp8", "exclude_layer": 7}, ("exclude_layer",)),
    ("{not json", ("not valid JSON",)),
])
def test_bad_configs_are_clear_errors(value, words):
    with pytest.raises(ConfigError) as e:
        EngineConfig(online_quant_config=value)
    assert str(e.value).startswith("online_quant_config") and all(w in str(e.value)
                                                                 for w in words)


def test_cli_errors_name_the_flag(capsys):
    with pytest.raises(ConfigError) as e:
        _engine("--online_quant_config '{\"global_quant_config\": \"mxfp8\"}'")
    assert str(e.value).startswith("--online-quant-config") and "mxfp8" in str(e.value)
    with pytest.raises(SystemExit):
        _engine("--online_quant_config '{\"global_quant_config\": ptpc}'")
    assert "not valid JSON" in capsys.readouterr().err


@pytest.mark.skipif(GPU, reason="interpreter test: runs where there is no GPU")
@pytest.mark.parametrize("n,k", [(48, 64), (40, 96)])
def test_gpu_kernel_path_matches_torch_path(n, k):
    """The same PtpcFp8LinearMethod forward through kernels/fp8_linear (w8a8, block (1, Kp))
    as the GPU takes it, under the Triton interpreter, vs its CPU torch path."""
    from atom_stream.layers.parallel import TPInfo, tp_context
    with tp_context(TPInfo()):
        lin = Linear(k, n, dtype=torch.float32)
    torch.nn.init.normal_(lin.weight, std=k ** -0.5)
    w = lin.weight.detach().clone()
    method = ptpc_fp8.PtpcFp8LinearMethod(None)
    method.create(lin, "t.ptpc")
    method.load(lin, "weight", w, "t.ptpc.weight")
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(n))
    torch_y = lin(x)
    assert rel(torch_y, token_qdq(x) @ channel_qdq(w).T) < 1e-5
    from atom_stream.models import kernel_path
    with kernel_path.force_kernels(True):
        assert method.kernel_mode(x) == "w8a8"
        assert rel(lin(x), torch_y) < 1e-5


def test_mi300_fnuz_weights_dequantize_the_same():
    """On e4m3fnuz platforms (MI300) the weight is stored as fnuz with the scale doubled: the
    same dequantized values, no NaN bytes."""
    from atom_stream.layers.parallel import TPInfo, tp_context
    from atom_stream.layers.quant import common
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(3))
    w[0, 0] = -1e-9  # rounds to -0.0 in e4m3fn (0x80: NaN in fnuz)
    deq = {}
    for dt in (FN, torch.float8_e4m3fnuz):
        with common.force_platform_fp8(dt), tp_context(TPInfo()):
            lin = Linear(40, 24, dtype=torch.float32)
            ptpc_fp8.PtpcFp8LinearMethod(None).create(lin, "t")
            lin.quant_method.load(lin, "weight", w, "t.weight")
        assert lin.weight.dtype == dt and not torch.isnan(lin.weight.float()).any()
        deq[dt] = lin.quant_method.dequantize(lin)
    assert torch.equal(deq[FN], deq[torch.float8_e4m3fnuz])
    assert torch.equal(deq[FN], channel_qdq(w))


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a GPU")
def test_ptpc_on_the_gpu_matches_the_cpu(dense):
    """The GPU path (kernels/fp8_linear in w8a8 mode, the weights quantized at load on the
    device) gives the CPU path's logits and tokens on the same checkpoint and config."""
    gpu = ModelRunner(EngineConfig(model=dense, device="cuda", dtype="float32",
                                   num_kv_blocks=32, block_size=4, enforce_eager=True,
                                   online_quant_config=ATTN))
    lin = gpu.model.model.layers[0].self_attn.o_proj
    assert isinstance(lin.quant_method, ptpc_fp8.PtpcFp8LinearMethod)
    assert lin.weight.dtype == FN and lin.weight.is_cuda
    got_logits, got = run(gpu, PROMPT, n_decode=10)
    ref_logits, ref = run(build(dense, online_quant_config=ATTN), PROMPT, n_decode=10)
    assert got == ref and rel(got_logits.cpu(), ref_logits) < 2e-3
