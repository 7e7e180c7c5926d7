"""Small tokenizer checkpoints written by the tests themselves (no downloads).

- `write_kimi_tokenizer(dir)`: a Kimi-format directory: `tiktoken.model` (all 256 bytes plus a few
  merges, base64 rank lines like the real file) and `tokenizer_config.json` whose
  `added_tokens_decoder` names the special slots at the offsets of model_spec §5.
- `write_hf_tokenizer(dir)`: a byte-level BPE `PreTrainedTokenizerFast` saved with
  `save_pretrained`, with a ChatML-like chat template.
"""

from __future__ import annotations

import base64
import json
import os

# model_spec §5 ids minus 163584 (the first special slot)
KIMI_SPECIAL_OFFSETS = {
    "[BOS]": 0, "[EOS]": 1, "<|im_end|>": 2, "<|im_user|>": 3, "<|im_assistant|>": 4,
    "<|start_header_id|>": 6, "<|end_header_id|>": 7, "[EOT]": 9, "<|im_system|>": 10,
    "<|tool_calls_section_begin|>": 11, "<|tool_calls_section_end|>": 12,
    "<|tool_call_begin|>": 13, "<|tool_call_argument_begin|>": 14, "<|tool_call_end|>": 15,
    "<|im_middle|>": 17, "<|media_begin|>": 18, "<|media_content|>": 19, "<|media_end|>": 20,
    "<|media_pad|>": 21, "<think>": 22, "</think>": 23, "[UNK]": 254, "[PAD]": 255,
}

# Words whose byte prefixes become merges (so BPE can build each word as one token).
KIMI_WORDS = ["he", "ll", "hello", " world", "你", "好", "你好", "你a", "12", "123", "1234",
              "b1", "ab", "abc", "😀", "é", "\r\n", "  ", "Ġx"]


def kimi_ranks(words: list[str] = KIMI_WORDS) -> dict[bytes, int]:
    ranks = {bytes([i]): i for i in range(256)}
    for w in words:
        b = w.encode()
        for k in range(2, len(b) + 1):
            ranks.setdefault(b[:k], len(ranks))
    return ranks


def write_kimi_tokenizer(path: str, *, think: bool = True, special_flags: dict | None = None,
                         chat_template: str | None = None,
                         generation_eos: list[int] | None = None) -> str:
    """Write a Kimi-format tokenizer into `path` (created); returns `path`."""
    os.makedirs(path, exist_ok=True)
    ranks = kimi_ranks()
    with open(os.path.join(path, "tiktoken.model"), "wb") as f:
        f.writelines(base64.b64encode(b) + b" " + str(r).encode() + b"\n" for b, r in ranks.items())
    n = len(ranks)
    added = {}
    for name, off in KIMI_SPECIAL_OFFSETS.items():
        if not think and name in ("<think>", "</think>"):
            continue
        special = (special_flags or {}).get(name, True)
        added[str(n + off)] = {"content": name, "lstrip": False, "normalized": False,
                               "rstrip": False, "single_word": False, "special": special}
    cfg = {
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_end|>", "<|im_user|>", "<|im_assistant|>",
                                      "<|start_header_id|>", "<|end_header_id|>", "[EOT]",
                                      "<|im_system|>", "<|im_middle|>"],
        "bos_token": "[BOS]", "eos_token": "[EOS]", "unk_token": "[UNK]", "pad_token": "[PAD]",
        "tokenizer_class": "TikTokenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
    }
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if generation_eos is not None:
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": generation_eos}, f)
    return path


HF_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|start|>assistant\n{% endif %}")


def write_hf_tokenizer(path: str, *, generation_eos: list[int] | None = None,
                       add_bos: bool = False) -> str:
    """A byte-level BPE tokenizer (256 byte tokens + merges for "he", "ll", "hello", " world")
    with bos <s>, eos </s> and extra specials <|start|>, <|end|>; saved with save_pretrained.
    add_bos: a post-processor prepends <s> when special tokens are asked for (as DeepSeek-V3's
    tokenizer, add_bos_token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from atom_stream.tokenizer import BYTE_TO_UNICODE, bytes_to_token_str

    vocab = {BYTE_TO_UNICODE[b]: b for b in range(256)}
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w"), ("o", "r"),
              ("Ġw", "or"), ("l", "d"), ("Ġwor", "ld")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    assert bytes_to_token_str(b" ") == "Ġ"
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=["<|start|>", "<|end|>"])
    if add_bos:
        fast.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", fast.bos_token_id)])
    fast.chat_template = HF_CHAT_TEMPLATE
    fast.save_pretrained(path)
    if generation_eos is not None:
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": generation_eos}, f)
    return path
