"""The benchmark's random dataset, built as ATOM's `sample_random_requests` builds it.

Contract (same RNG call order as ATOM, so a seed gives the same lengths as ATOM's script):
    np.random.seed(seed)                                   # done by the caller (main)
    prefix   = randint(0, vocab, prefix_len)
    in_lens  = randint(int(ISL * ratio), ISL + 1, n)       # uniform in [int(L*ratio), L]
    out_lens = randint(int(OSL * ratio), OSL + 1, n)
    offsets  = randint(0, vocab, n)
    ids_i    = prefix + [allowed[(offsets[i] + i + j) % len(allowed)] for j in range(in_lens[i])]

Differences from ATOM, all chosen so that the input length is exact in the model's tokens:
- `allowed` is the vocabulary minus the tokenizer's special ids (vLLM's newer RandomDataset does
  the same): a random `<|im_end|>` inside a prompt would otherwise change what the server does.
- Requests carry their token ids. Backends that accept ids (/v1/completions with a list-of-int
  prompt, the WebSocket `prompt_token_ids`) send them, so `prompt_len` is exact by construction.
  Text backends (openai-chat, or `--prompt-as-text`) send `decode(ids)` after ATOM's
  decode/encode repair loop; `prompt_len` is then the re-encoded length, as in ATOM.
- Lengths are clamped to >= 1 (ATOM would ask for `max_tokens=0` when ratio is 0).

`use_chat_template` (ATOM's `--use-chat-template`): the template's length, len(encode(
apply_chat_template([user "a"], add_generation_prompt=True))) - 1, is taken off ISL before the
lengths are drawn; each prompt is then wrapped as one user message with the generation prompt.
Text prompts: the wrapped text, its ids re-encoded (special tokens included), as ATOM. Id prompts:
encode(template before the content) + the drawn ids + encode(template after it), so the drawn
ids are sent as drawn (re-encoding their decoded text could change them). `prompt_len` is the
count of the ids; the length statistics compare it with prefix_len + the drawn (reduced) length.

Tokenizers come from `atom_stream.tokenizer.load_tokenizer`; `--model demo` (or a name with "demo"
in it that is not a local directory, with no --tokenizer) uses the embedded demo tokenizer. A
Hugging Face hub id (`--model moonshotai/Kimi-K2.5`) is resolved to its snapshot as the server
resolves it (config.resolve_model_path: the cache, else a download of the non-weight files).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEMO_NAMES = ("demo", "atom-stream-demo")


@dataclass
class SampleRequest:
    """One benchmark request. `prompt_len` is what enters total_input_tokens."""

    prompt: str
    prompt_token_ids: list[int]
    prompt_len: int
    expected_output_len: int
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_tokenizer_path(model: str, tokenizer: str | None) -> str | None:
    """Path handed to load_tokenizer: None means the demo tokenizer."""
    name = tokenizer if tokenizer is not None else model
    if name is None or name.lower() in DEMO_NAMES:
        return None
    # A served name such as "demo-model" that is not on this disk: the demo model is the only one
    # we can tokenize without a checkpoint. A real path that is missing is an error later.
    if tokenizer is None and "demo" in name.lower() and not os.path.isdir(os.path.expanduser(name)):
        return None
    return os.path.expanduser(name)


def get_tokenizer(model: str, tokenizer: str | None = None, *, trust_remote_code: bool = False):
    from atom_stream.config import resolve_model_path
    from atom_stream.tokenizer import load_tokenizer, preset_tokenizer

    preset = preset_tokenizer(model) if tokenizer is None else None
    if preset is not None:  # dummy-weight bench preset: the server's own tokenizer
        return preset
    path = resolve_tokenizer_path(model, tokenizer)
    if path is not None and not os.path.exists(path):
        # a hub id ("moonshotai/Kimi-K2.5", as the server was given it): its snapshot, found
        # the way the server finds it (HF cache first, then a download of the small files)
        path = resolve_model_path(path, load_format="dummy")
    return load_tokenizer(path, trust_remote_code=trust_remote_code)


def encode(tokenizer, text: str) -> list[int]:
    # Our tokenizer's encode never adds BOS unless asked; HF tokenizers take the keyword.
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:
        return list(tokenizer.encode(text))


def allowed_token_ids(tokenizer) -> np.ndarray:
    special = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or ())}
    vocab = int(tokenizer.vocab_size)
    ids = np.array([i for i in range(vocab) if i not in special], dtype=np.int64)
    if ids.size == 0:
        raise ValueError("the tokenizer has no non-special token ids")
    return ids


def sample_uniform_lengths(length: int, range_ratio: float, n: int) -> list[int]:
    """ATOM's sample_uniform: integers uniform in [int(L*ratio), L], clamped to >= 1."""
    lower = int(length * range_ratio)
    lens = np.random.randint(lower, length + 1, size=n).tolist()
    return [max(1, int(x)) for x in lens]


def sample_random_requests(
    *,
    prefix_len: int,
    input_len: int,
    output_len: int,
    num_prompts: int,
    range_ratio: float,
    tokenizer,
    as_text: bool = False,
    use_chat_template: bool = False,
    verbose: bool = True,
) -> list[SampleRequest]:
    """Random requests; see the module docstring. Call np.random.seed(seed) first."""
    if not 0.0 <= range_ratio <= 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1], got {range_ratio}")
    if input_len < 1 or output_len < 1:
        raise ValueError("--random-input-len and --random-output-len must be >= 1")
    if use_chat_template:  # ATOM: the template's own tokens count towards ISL
        input_len = max(1, input_len - (len(encode(tokenizer, _chat_wrap(tokenizer, "a"))) - 1))
    vocab = int(tokenizer.vocab_size)
    allowed = allowed_token_ids(tokenizer)
    prefix_ids = allowed[np.random.randint(0, vocab, size=prefix_len) % len(allowed)].tolist()
    input_lens = sample_uniform_lengths(input_len, range_ratio, num_prompts)
    output_lens = sample_uniform_lengths(output_len, range_ratio, num_prompts)
    offsets = np.random.randint(0, vocab, size=num_prompts)

    requests: list[SampleRequest] = []
    mismatches: list[int] = []
    for i in range(num_prompts):
        target = prefix_len + input_lens[i]
        idx = (int(offsets[i]) + i + np.arange(input_lens[i])) % len(allowed)
        ids = prefix_ids + allowed[idx].tolist()
        prompt = tokenizer.decode(ids)
        prompt_len = target
        if as_text:
            prompt, ids = _repair_text_prompt(tokenizer, prompt, target, vocab, allowed)
            prompt_len = len(ids)
        if use_chat_template:
            if as_text:
                prompt = _chat_wrap(tokenizer, prompt)
                ids = encode(tokenizer, prompt)
            else:
                pre, post = _chat_halves(tokenizer)
                prompt = pre + prompt + post
                ids = encode(tokenizer, pre) + ids + encode(tokenizer, post)
            prompt_len = len(ids)
        mismatches.append(prompt_len - target)
        requests.append(SampleRequest(prompt, ids, prompt_len, output_lens[i]))

    if verbose:
        _print_length_stats(requests, mismatches)
    return requests


def _chat_wrap(tokenizer, text: str) -> str:
    """`text` as one user message plus the generation prompt (ATOM's apply_chat_template)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                         add_generation_prompt=True)


_SPLIT = "\x00atom-stream-bench-content\x00"


def _chat_halves(tokenizer) -> tuple[str, str]:
    """The wrapped prompt's text before and after the user content."""
    pre, sep, post = _chat_wrap(tokenizer, _SPLIT).partition(_SPLIT)
    if not sep:
        raise ValueError("the chat template does not show the user message's content verbatim")
    return pre, post


def _repair_text_prompt(tokenizer, prompt: str, target: int, vocab: int, allowed: np.ndarray):
    """ATOM's loop: re-encode, pad with random ids or truncate, decode; at most 10 rounds."""
    ids = encode(tokenizer, prompt)
    for _ in range(10):
        if len(ids) < target:
            extra = np.random.randint(0, vocab, size=target - len(ids)) % len(allowed)
            ids = ids + allowed[extra].tolist()
        elif len(ids) > target:
            ids = ids[:target]
        else:
            break
        prompt = tokenizer.decode(ids)
        ids = encode(tokenizer, prompt)
    return prompt, ids


def _print_length_stats(requests: list[SampleRequest], mismatches: list[int]) -> None:
    header = f'{"-" * 19}  Input/Output Length Statistics  {"-" * 19}'
    ins = [r.prompt_len for r in requests]
    outs = [r.expected_output_len for r in requests]
    print(header)
    print(
        f" input_lens : min={min(ins):<4d}  max={max(ins):<4d}  mean={np.mean(ins):<7.2f}  "
        f"avg_token_mismatch={np.mean(mismatches):<5.2f} "
    )
    print(f" output_lens: min={min(outs):<4d}  max={max(outs):<4d}  mean={np.mean(outs):<7.2f} ")
    print("-" * len(header), "\n")
