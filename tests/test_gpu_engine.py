"""GPU engine checks (run on the device with `pytest -m gpu`): graph replay gives the eager
tokens; the GPU engine in float32 gives the CPU reference's greedy tokens on the tiny parity
checkpoints; bf16 agrees with float32 on top-1 for >= 99% of positions (teacher-forced) on a
tiny checkpoint with peaked, trained-like outputs (see test_bf16_top1_agrees_with_fp32)."""

from __future__ import annotations

import pytest
import torch

from hf_checkpoints import FLAVOURS, write_hf_checkpoint

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a GPU", allow_module_level=True)


def _prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(k),), generator=g).tolist()
            for k in torch.randint(3, 40, (n,), generator=g)]


def _greedy(llm, prompts, n=24):
    from atom_stream import SamplingParams
    outs = llm.generate(prompt_token_ids=prompts,
                        sampling_params=SamplingParams(temperature=0, max_tokens=n,
                                                       ignore_eos=True))
    return [list(o.token_ids) for o in outs]


def test_graph_replay_matches_eager_on_demo():
    from atom_stream import LLM
    prompts = _prompts(12, 0)
    kw = dict(model="demo", device="cuda", dtype="float32", num_kv_blocks=256,
              max_model_len=512, max_num_seqs=16)
    eager = _greedy(LLM(enforce_eager=True, **kw), prompts)
    graphs = _greedy(LLM(**kw), prompts)
    assert graphs == eager


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_gpu_float32_matches_cpu_reference(flavour, tmp_path):
    from atom_stream import LLM
    write_hf_checkpoint(str(tmp_path), flavour, seed=2)
    prompts = _prompts(6, 1)
    kw = dict(model=str(tmp_path), dtype="float32", num_kv_blocks=128, max_model_len=256,
              max_num_seqs=8, block_size=16, skip_tokenizer_init=True)
    cpu = _greedy(LLM(device="cpu", **kw), prompts)
    gpu = _greedy(LLM(device="cuda", **kw), prompts)
    assert gpu == cpu


def _write_peaked_checkpoint(path: str, seed: int, emb_std: float = 0.25) -> None:
    """The "kimi" tiny checkpoint with a trained-like, peaked output: embeddings N(0, emb_std)
    (HF's init: 0.08) and lm_head = embeddings / emb_std (tied structure). The residual stream
    then carries the current token's embedding strongly, so the logits have one clear winner
    (mean fp32 top-1 logprob ~ -0.04, like a trained model's confident positions) while the
    layers still decide the winner at ~5-8% of positions (checked in the test)."""
    from hf_checkpoints import make_hf_model
    model = make_hf_model("kimi", seed)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.normal_(0.0, emb_std, generator=torch.Generator().manual_seed(seed + 7))
        model.lm_head.weight.copy_(emb / emb_std)
    model.save_pretrained(path, safe_serialization=True)


def test_bf16_top1_agrees_with_fp32(tmp_path):
    """Teacher-forced over prompt + fp32 greedy continuation: at every position the bf16
    engine's top-1 equals the fp32 engine's top-1 (no cascading after one flip), >= 99%.

    Why a peaked checkpoint: a tiny RANDOM model's logits are near-uniform (mean top-1 logprob
    ~ -4 of log(1/320) = -5.8), so the top-2 are often within bf16 noise and agreement measured
    0.951 on an H200 -- a property of random weights, not of the engine. A trained model is
    confident at most positions; _write_peaked_checkpoint gives that shape (CPU reference:
    0.995-0.998 over 16 prompts and three seeds). To keep the check meaningful the test also
    requires that the layers, not only the current token, decide the fp32 top-1 at >= 3% of
    positions, and that bf16's top-1 logprobs stay close to fp32's (mean abs diff <= 0.05;
    CPU reference 0.002-0.005)."""
    from atom_stream import LLM, SamplingParams
    _write_peaked_checkpoint(str(tmp_path), seed=5)
    prompts = _prompts(16, 5)
    kw = dict(model=str(tmp_path), device="cuda", num_kv_blocks=256, max_model_len=256,
              max_num_seqs=16, skip_tokenizer_init=True, enable_prefix_caching=False)
    llm32 = LLM(dtype="float32", **kw)
    full = [p + c for p, c in zip(prompts, _greedy(llm32, prompts, 32))]
    sp = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    tops, lps = [], []
    for llm in (llm32, LLM(dtype="bfloat16", **kw)):
        outs = llm.generate(prompt_token_ids=full, sampling_params=sp)
        tops.append([[e[1][0][0] for e in o.engine_prompt_logprobs] for o in outs])
        lps.append([lp for o in outs for e in o.engine_prompt_logprobs for lp in [e[1][0][1]]])
    pairs = [(a, b) for r32, r16 in zip(*tops) for a, b in zip(r32, r16)]
    assert len(pairs) > 600
    # entry i predicts full[i + 1] from full[:i + 1]: "copy" = top-1 is the current token
    ctx = sum(t != f[i] for f, r in zip(full, tops[0]) for i, t in enumerate(r)) / len(pairs)
    assert ctx >= 0.03, f"layers decide only {ctx:.3f} of the top-1s: the check is vacuous"
    dlp = sum(abs(a - b) for a, b in zip(*lps)) / len(lps[0])
    assert dlp <= 0.05, f"bf16 top-1 logprobs differ from fp32 by {dlp:.3f} on average"
    agree = sum(a == b for a, b in pairs) / len(pairs)
    assert agree >= 0.99, f"bf16 top-1 agreement {agree:.3f}"


def test_moe_reference_loop_under_graph_capture_matches_eager():
    """Experts without a kernel layout (hidden % 128 != 0) run the reference loop; under graph
    capture it takes its dense, capturable form: same sums as the eager loop (fresh inputs)."""
    import torch.nn.functional as F

    from atom_stream.layers.moe import experts_ref

    g = torch.Generator(device="cuda").manual_seed(5)
    T, H, inter, E, k = 9, 64, 32, 8, 3
    x = torch.randn(T, H, device="cuda", generator=g)
    w13 = torch.randn(E, 2 * inter, H, device="cuda", generator=g) / 8
    w2 = torch.randn(E, H, inter, device="cuda", generator=g) / 6
    ids = torch.stack([torch.randperm(E, device="cuda", generator=g)[:k] for _ in range(T)])
    wts = F.softmax(torch.randn(T, k, device="cuda", generator=g), -1)
    want = experts_ref(x, w13, w2, wts, ids)
    out = torch.full_like(want, float("nan"))  # poisoned: the replay must write every element
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out.copy_(experts_ref(x, w13, w2, wts, ids))
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
