"""The sampler's per-step inputs and its logit processing (layers/sampler.py's module
docstring states the semantics, vLLM's, and the order; Sampler re-exports these names).

- `SamplingMetadata.from_sequences(seqs, vocab_size, device, prev_ids, prev_rows, prev_host)`:
  the per-step tensors of the B sampled rows, built on the host once per step (sparse COO
  positions for the penalties, from each sequence's incrementally kept PenaltyTokens, bans and
  biases; flags that let the sampler skip what no row asks for). Under async
  scheduling a row's last token may still be on the device (a PLACEHOLDER): the penalties
  gather it from the previous step's sampled ids on the device (`prev_ids[prev_rows[seq]]`, no
  host sync); a grammar or a multi-token bad word reads it from their host copy (`prev_host`).
  Neither drains the pipeline.
- `apply_guides(x, md)`: the structured-output grammars' masks (before everything else).
- `apply_penalties(x, md)`: allowed_token_ids, bad words, min_tokens bans, logit_bias, then the
  repetition / frequency / presence penalties on x [B, V] float32, in place.
- `seed_key(seed, output_index)`: a seeded row's generator seed for one output position.
- `needs_host_tokens(params)` / `bad_word_bans(...)`: helpers of the async pipeline and of the
  bad-words ban.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from atom_stream.engine.sequence import Sequence
from atom_stream.layers.penalty_tokens import PenaltyTokens
from atom_stream.sampling_params import SAMPLING_EPS

GREEDY_TEMPERATURE = SAMPLING_EPS  # a temperature below it is greedy (SamplingParams.greedy)
_MASK64 = (1 << 64) - 1
_NEG_INF = float("-inf")


def needs_host_tokens(p) -> bool:
    """Whether sampling for params `p` reads the values of earlier tokens ON THE HOST (bad words
    of more than one token, a structured-output grammar): an async-scheduled step then waits
    for the previous step's ids (`from_sequences`' prev_host) after enqueuing its forward. The
    penalties read the token on the device (see `SamplingMetadata.ph_pos`)."""
    return p.structured_outputs is not None or (
        p._bad_words_token_ids is not None and any(len(w) > 1 for w in p._bad_words_token_ids))


def bad_word_bans(token_ids: list[int], num_output: int, words: list[list[int]]) -> list[int]:
    """The token ids that bad words ban next for a sequence whose tokens are `token_ids` (prompt
    + the last `num_output` outputs): vLLM's _apply_bad_words_single_batch. A word's last id is
    banned when the outputs end with the rest of the word (a one-token word: always); the
    prompt never completes a prefix. Repeats are possible (harmless: each writes -inf)."""
    n = len(token_ids)
    bans = []
    for w in words:
        k = len(w) - 1
        if k == 0 or (k <= num_output and token_ids[n - k:] == w[:k]):
            bans.append(w[k])
    return bans


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def seed_key(seed: int, output_index: int) -> int:
    """Generator seed (63-bit) for output token `output_index` of a request seeded `seed`."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ output_index) >> 1


@dataclass
class SamplingMetadata:
    """Per-step tensors for the B sampled rows (on the logits' device) and host-side flags.

    Sparse penalties use flat positions `row * V + token` (a COO form of the [B, V] tensors):
    `out_pos`/`out_count` are the distinct output tokens of rows with frequency/presence penalties
    and their counts; `seen_pos` the prompt + output tokens of rows with a repetition penalty
    (duplicates allowed); `bad_pos` the tokens bad words ban now; `banned_pos` the stop tokens
    of rows below min_tokens. Those cover the tokens known on the host; `ph_pos` [P] (on the
    device) are the flat positions of the penalized rows' last tokens still on the device
    (rows `ph_rows`), applied by `apply_penalties` as if they were in `seen_pos` / `out_pos`.
    """

    vocab_size: int
    temperature: Tensor  # [B] f32; 1.0 on greedy rows
    top_p: Tensor  # [B] f32; 1.0 = off
    top_k: Tensor  # [B] int64; 0 = off (-1, 0 and k >= V are stored as 0)
    min_p: Tensor  # [B] f32; 0 = off
    presence_penalty: Tensor  # [B] f32
    frequency_penalty: Tensor  # [B] f32
    repetition_penalty: Tensor  # [B] f32
    greedy: Tensor  # [B] bool
    random_rows: Tensor | None  # [R] int64: the sampling rows when greedy rows are mixed in
    seeded: list[tuple[int, int]]  # (index among the sampling rows, generator seed)
    out_pos: Tensor | None = None
    out_count: Tensor | None = None  # [U] f32
    seen_pos: Tensor | None = None
    bad_pos: Tensor | None = None
    banned_pos: Tensor | None = None
    bias_pos: Tensor | None = None  # logit_bias: flat positions and their values [N] f32
    bias_val: Tensor | None = None
    allow_rows: Tensor | None = None  # rows with allowed_token_ids, and their allowed positions
    allow_pos: Tensor | None = None
    guide_rows: Tensor | None = None  # [G] rows with a structured-output grammar, and their
    guide_bits: Tensor | None = None  # [G, ceil(V / 8)] uint8 allowed tokens (little bit order)
    ph_rows: Tensor | None = None  # [P] int64 rows whose last token is on the device, and
    ph_pos: Tensor | None = None  # [P] its flat position row * V + token (computed on the device)
    all_greedy: bool = False
    all_random: bool = True
    no_penalties: bool = True  # nothing in 2. (bad words and min_tokens bans included)
    no_temperature: bool = True  # every sampling row has temperature 1
    no_top_k: bool = True  # these three flags look at sampling rows only
    no_top_p: bool = True
    no_min_p: bool = True
    max_top_k: int = 0
    max_logprobs: int | None = None
    logprob_rows: Tensor | None = None  # [L] rows asking logprobs, when not all do
    top_p_rows: Tensor | None = None  # [P] sampling-row indices with top_p < 1, when not all

    @classmethod
    def from_sequences(cls, seqs: list[Sequence], vocab_size: int, device: torch.device | str,
                       prev_ids: Tensor | None = None,
                       prev_rows: Mapping[Sequence, int] | None = None,
                       prev_host: Callable[[], Tensor] | None = None) -> SamplingMetadata:
        """For sequences holding a PLACEHOLDER (async scheduling: one at most, sampled by the
        previous step): `prev_ids` [R] int64 on `device` are that step's sampled ids and
        `prev_rows` a sequence's row in them (the penalties read the token there);
        `prev_host()` returns them on the host, waiting for that step (a grammar or a
        multi-token bad word walks the token there; the caller has enqueued this step's
        forward already, so the device keeps working meanwhile)."""
        V = vocab_size
        host: list[Tensor] = []  # prev_host()'s result, fetched at most once

        def prev_row(seq: Sequence) -> int:
            if (seq.num_placeholders != 1 or prev_ids is None or prev_rows is None
                    or seq not in prev_rows):
                raise ValueError(f"{seq.request_id}: sampling over a token that no previous "
                                 "step sampled")
            return prev_rows[seq]

        def resolved(seq: Sequence) -> list[int]:
            """seq.token_ids with its placeholder replaced by the sampled id (a copy)."""
            row = prev_row(seq)
            if prev_host is None:
                raise ValueError(f"{seq.request_id}: a grammar or bad words over a token "
                                 "still on the device")
            if not host:
                host.append(prev_host())
            return seq.token_ids[:-1] + [int(host[0][row])]

        floats: list[list[float]] = [[] for _ in range(6)]  # T, top_p, min_p, pres, freq, rep
        top_k: list[int] = []
        greedy: list[bool] = []
        random_rows: list[int] = []
        seeded: list[tuple[int, int]] = []
        out_rows: list[np.ndarray] = []  # flat positions (row * V + id) of distinct ids,
        out_counts: list[np.ndarray] = []  # their counts,
        seen_rows: list[np.ndarray] = []  # from each row's PenaltyTokens
        banned: list[int] = []
        bad: list[int] = []
        bias_pos: list[int] = []
        bias_val: list[float] = []
        allow_rows: list[int] = []
        allow_pos: list[int] = []
        guide_rows: list[int] = []
        guide_bits: list = []
        ph_rows: list[int] = []
        ph_src: list[int] = []
        max_lp = None
        lp_rows: list[int] = []
        for i, seq in enumerate(seqs):
            p = seq.params
            g = p.temperature < GREEDY_TEMPERATURE
            greedy.append(g)
            k = p.top_k if 0 < p.top_k < V else 0
            top_k.append(k)
            for col, v in zip(floats, (1.0 if g else p.temperature, p.top_p, p.min_p,
                                       p.presence_penalty, p.frequency_penalty,
                                       p.repetition_penalty)):
                col.append(v)
            if not g:
                if p.seed is not None:
                    seeded.append((len(random_rows), seed_key(p.seed, seq.num_output_tokens)))
                random_rows.append(i)
            ph = seq.num_placeholders
            # (a placeholder (-1) read as a token would silently ban / penalize the wrong one)
            tokens = resolved(seq) if ph and needs_host_tokens(p) else seq.token_ids
            if p.uses_penalties:
                if ph:  # the last token is read on the device
                    ph_src.append(prev_row(seq))
                    ph_rows.append(i)
                st = seq.penalty_tokens
                if st is None:
                    st = seq.penalty_tokens = PenaltyTokens()
                st.update(seq.token_ids, seq.num_prompt_tokens, len(seq.token_ids) - ph)
                if (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0) and st.out.size:
                    out_rows.append(st.out + i * V)
                    out_counts.append(st.count)
                if p.repetition_penalty != 1.0:
                    seen_rows.append(st.seen + i * V)
            bw = p._bad_words_token_ids
            if bw:
                bad.extend(i * V + t for t in bad_word_bans(tokens, seq.num_output_tokens, bw))
            g = seq.guide
            bits = g.bits(tokens, seq.num_prompt_tokens) if g is not None else None
            if bits is not None:
                guide_rows.append(i)
                guide_bits.append(bits)
            if seq.num_output_tokens < p.min_tokens and not (bits is not None and g.only_stops):
                # (a complete grammar that allows only the stop ids wins over min_tokens)
                # vLLM bans all_stop_token_ids (the EOS ids even under ignore_eos), built once
                # per sequence
                banned.extend(i * V + t for t in seq.min_tokens_bans if t < V)
            if p.logit_bias:
                bias_pos.extend(i * V + t for t in p.logit_bias)
                bias_val.extend(float(v) for v in p.logit_bias.values())
            if p.allowed_token_ids:
                allow_rows.append(i)
                allow_pos.extend(i * V + t for t in p.allowed_token_ids)
            if p.logprobs is not None:
                lp_rows.append(i)
                max_lp = p.logprobs if max_lp is None else max(max_lp, p.logprobs)

        def dev(t: Tensor) -> Tensor:
            return t.to(device, non_blocking=True)

        f = dev(torch.tensor(floats, dtype=torch.float32).reshape(6, len(seqs)))
        samp = [seqs[i].params for i in random_rows]
        md = cls(
            vocab_size=V, temperature=f[0], top_p=f[1], min_p=f[2], presence_penalty=f[3],
            frequency_penalty=f[4], repetition_penalty=f[5],
            top_k=dev(torch.tensor(top_k, dtype=torch.int64)),
            greedy=dev(torch.tensor(greedy, dtype=torch.bool)),
            random_rows=None, seeded=seeded,
            all_greedy=not random_rows, all_random=len(random_rows) == len(seqs),
            no_temperature=all(p.temperature == 1.0 for p in samp),
            no_top_k=not any(top_k[i] for i in random_rows),
            no_top_p=all(p.top_p >= 1.0 for p in samp),
            no_min_p=all(p.min_p <= 0.0 for p in samp),
            max_top_k=max((top_k[i] for i in random_rows), default=0),
            max_logprobs=max_lp,
        )
        if random_rows and not md.all_random:
            md.random_rows = dev(torch.tensor(random_rows, dtype=torch.int64))
        p_rows = [j for j, p in enumerate(samp) if p.top_p < 1.0]
        if p_rows and len(p_rows) < len(samp):
            md.top_p_rows = dev(torch.tensor(p_rows, dtype=torch.int64))
        if lp_rows and len(lp_rows) < len(seqs):
            md.logprob_rows = dev(torch.tensor(lp_rows, dtype=torch.int64))
        if out_rows:  # sorted: each row's ids are, and rows are offset by row * V
            md.out_pos = dev(torch.from_numpy(np.concatenate(out_rows)))
            md.out_count = dev(torch.from_numpy(np.concatenate(out_counts)))
        if seen_rows:
            md.seen_pos = dev(torch.from_numpy(np.concatenate(seen_rows)))
        if bad:
            md.bad_pos = dev(torch.tensor(bad, dtype=torch.int64))
        if banned:
            md.banned_pos = dev(torch.tensor(banned, dtype=torch.int64))
        if bias_pos:
            md.bias_pos = dev(torch.tensor(bias_pos, dtype=torch.int64))
            md.bias_val = dev(torch.tensor(bias_val, dtype=torch.float32))
        if allow_rows:
            md.allow_rows = dev(torch.tensor(allow_rows, dtype=torch.int64))
            md.allow_pos = dev(torch.tensor(allow_pos, dtype=torch.int64))
        if guide_rows:
            md.guide_rows = dev(torch.tensor(guide_rows, dtype=torch.int64))
            md.guide_bits = dev(torch.from_numpy(np.stack(guide_bits)))
        if ph_rows:
            md.ph_rows = dev(torch.tensor(ph_rows, dtype=torch.int64))
            last = prev_ids.index_select(0, dev(torch.tensor(ph_src, dtype=torch.int64)))
            md.ph_pos = md.ph_rows * V + last.to(torch.int64)
        md.no_penalties = (md.guide_rows is None and md.out_pos is None and md.ph_pos is None
                           and md.seen_pos is None and md.banned_pos is None
                           and md.bias_pos is None and md.allow_rows is None
                           and md.bad_pos is None)
        return md



def apply_guides(x: Tensor, md: SamplingMetadata) -> None:
    """In place: -inf on x [B, V] wherever a guided row's grammar does not allow the token.
    First of all logit processing (vLLM applies the grammar bitmask before its sampler), so
    logprobs are those of the masked distribution, as vLLM's."""
    bits = md.guide_bits
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    allowed = ((bits.unsqueeze(-1) >> shifts) & 1).view(bits.shape[0], -1)[:, : x.shape[1]]
    rows = md.guide_rows
    x[rows] = x[rows].masked_fill_(allowed == 0, _NEG_INF)


def apply_penalties(x: Tensor, md: SamplingMetadata) -> None:
    """In-place allowed_token_ids, bad words, min_tokens bans, logit_bias, then the repetition,
    frequency and presence penalties on x [B, V] float32: vLLM's order (see the module
    docstring). Only the repetition penalty does not commute with the others (it scales the
    biased logit); a banned -inf stays -inf through all of them."""
    V = x.shape[1]
    flat = x.view(-1)
    if md.allow_rows is not None:
        kept = flat[md.allow_pos]
        x[md.allow_rows] = _NEG_INF
        flat[md.allow_pos] = kept
    if md.bad_pos is not None:
        flat[md.bad_pos] = _NEG_INF
    if md.banned_pos is not None:
        flat[md.banned_pos] = _NEG_INF
    if md.bias_pos is not None:
        flat.index_add_(0, md.bias_pos, md.bias_val)
    seen = md.seen_pos
    if md.ph_pos is not None:  # (a row without a repetition penalty has 1.0: no change)
        seen = md.ph_pos if seen is None else torch.cat((seen, md.ph_pos))
    if seen is not None:
        # duplicates in seen are harmless: every copy writes the same value
        r = md.repetition_penalty[seen // V]
        v = flat[seen]
        flat[seen] = torch.where(v > 0, v / r, v * r)
    new = None  # device tokens not among their row's host-known outputs: [P] bool
    count = md.out_count
    if md.ph_pos is not None and md.out_pos is not None:
        # out_pos is sorted and unique (PenaltyTokens): a found device token counts once more
        # there, in the one subtraction the synchronous path makes (bitwise the same result).
        # Static shapes throughout: no host sync.
        i = torch.searchsorted(md.out_pos, md.ph_pos).clamp_(max=md.out_pos.numel() - 1)
        new = md.out_pos[i] != md.ph_pos
        count = count.index_add(0, i, (~new).to(count.dtype))
    if md.out_pos is not None:
        row = md.out_pos // V
        flat[md.out_pos] -= md.frequency_penalty[row] * count + md.presence_penalty[row]
    if md.ph_pos is not None:  # a new token: count 1 (a found one adds -0.0: no change)
        row = md.ph_rows
        cut = md.frequency_penalty[row] + md.presence_penalty[row]
        flat.index_add_(0, md.ph_pos, -(cut if new is None else torch.where(new, cut, 0.0)))
