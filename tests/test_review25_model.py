"""Model / checkpoint review (session 25): each test reproduces one gap that was found and fixed.

- A tiny FP8-block checkpoint (DeepSeek-V3 format, shapes the fused MoE kernel does not tile)
  failed the GPU engine's start-up: its MoE ran the reference loop inside the decode graph's
  capture, and the FP8 activation quant's exact division copied its divisor from the host
  (`torch.tensor(448.0, device="cuda")`), which capture forbids. The divisor is now filled on
  the device; graphs give the eager tokens. (GPU and CPU tokens of such a random model may
  part: its FP8 activation quant turns last-bit differences into FP8 rounding flips.)
"""

from __future__ import annotations

import pytest
import quant_writers as qw
import torch

PROMPTS = [torch.randint(0, 320, (n,), generator=torch.Generator().manual_seed(n)).tolist()
           for n in (3, 17, 40)]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _greedy(path: str, **kw) -> list[list[int]]:
    from atom_stream import LLM, SamplingParams

    llm = LLM(model=path, skip_tokenizer_init=True, max_model_len=128, num_kv_blocks=64,
              block_size=16, **kw)
    outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=SamplingParams(
        temperature=0, max_tokens=10, ignore_eos=True))
    return [list(o.token_ids) for o in outs]


@pytest.mark.gpu
@needs_gpu
def test_fp8_activation_quant_is_graph_capturable():
    """The FP8 activation quant-dequant the reference loops run inside graph capture: captured,
    replayed, bit-equal to the CPU's."""
    from atom_stream.layers.quant.common import fp8_qdq_group, fp8_qdq_per_token

    x = torch.randn(4, 200, generator=torch.Generator().manual_seed(0))
    xc = x.cuda()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out = fp8_qdq_group(xc)
        out_tok = fp8_qdq_per_token(xc)
    graph.replay()
    torch.testing.assert_close(out.cpu(), fp8_qdq_group(x), rtol=0, atol=0)
    torch.testing.assert_close(out_tok.cpu(), fp8_qdq_per_token(x), rtol=0, atol=0)


@pytest.mark.gpu
@needs_gpu
def test_tiny_fp8_block_checkpoint_serves_with_cuda_graphs(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "fp8")
    qw.make_tiny_hf(src, "kimi", seed=6, moe_intermediate_size=64)
    qw.write_quantized(src, dst, "fp8_block")
    graphs = _greedy(dst, device="cuda", dtype="float32")  # failed in the graph capture
    assert graphs == _greedy(dst, device="cuda", dtype="float32", enforce_eager=True)
