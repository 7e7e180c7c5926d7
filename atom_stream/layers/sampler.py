"""Batch-vectorized token sampler: penalties, greedy, temperature, top-k, top-p, min-p, seeds.

Contract (ModelRunner.execute, rank 0, once per step):
    md = SamplingMetadata.from_sequences(seqs, vocab_size, device)  # host work, once per step
    out = sampler(logits, md)                   # logits [B, V] any float dtype, row i = seqs[i]
    out.token_ids  [B] int64 on logits.device
    out.logprobs   None, or (sampled [B] f32, top_ids [B, k] int64, top_lps [B, k] f32,
                   ranks [B] int64: the sampled token's vLLM Logprob.rank), k = the largest
                   `params.logprobs` in the batch (a row asking j <= k takes the first j)

Semantics (vLLM's), all in float32:
  1. Logprobs are of the RAW model distribution (log_softmax of the unmodified logits, vLLM's
     default "raw_logprobs"): the sampled token's, and the top k sorted by value.
  2. Logit processing in vLLM's order: a structured-output grammar's mask first (vLLM applies
     its bitmask before its sampler, so the logprobs of 1. are of the masked logits there;
     the sampled token's rank stays on the raw logits); then (v1
     Sampler.apply_logits_processors) allowed_token_ids (every other id -inf); bad words
     (vLLM's apply_bad_words: for each token-id sequence of `params.bad_words_token_ids`,
     its last id is -inf when the row's OUTPUT tokens end with the rest of it; a one-token
     sequence always; prompt tokens never count); rows below `min_tokens` get their stop
     tokens (`seq.eos_token_ids`, whatever ignore_eos says, as vLLM's all_stop_token_ids,
     and stop_token_ids) set to -inf; logit_bias (added); then the penalties: repetition
     (tokens in prompt or output: positive logits divided by r, others multiplied; it scales
     the biased logit), frequency (- count * f) and presence (- p if count > 0) over OUTPUT
     tokens. Greedy rows included.
  3. Greedy rows (temperature < 1e-5): argmax of the processed logits (first index on ties).
  4. Other rows: logits / temperature, then one keep-threshold per row (values equal to it are
     kept, so ties never split), in vLLM's order: min-p (prob >= min_p * max prob), top-k
     (>= the k-th largest), then top-p on the distribution renormalized over what min-p and
     top-k kept (rank r is kept iff the mass of the ranks before it is < top_p: the smallest
     prefix with mass >= top_p; the top token always). The kept set is the intersection.
  5. Exponential race: token = argmax_i p_i / E_i with E_i ~ Exp(1) i.i.d. draws exactly from p
     (p = exp(x - max) needs no normalization). Unseeded rows draw E in one batched call on the
     sampler's generator; a seeded row draws its own [V] vector (indexed by token id) from a
     generator seeded with mix(seed, num_output_tokens). Its token thus depends only on its logits
     and (seed, output index): the same alone, at any batch position or size, and after a
     preemption + recompute. Only the top-p cut sums floats (cumsum), so a cut within an ulp of
     top_p could differ with batch shape on some backends; the logits themselves are not
     batch-invariant either.

Two policies for the thresholds (`Sampler(candidates=...)`):
  - int (CPU default, 1024): take the top K0 = max(candidates, max_k + 1) values once; top-k, top-p
    and min-p are cut on them, and rows whose kept set lies inside them are sampled on [R, K0]
    instead of [R, V]. Rows where it does not (a flat distribution) fall back to a full sort/[R, V]
    race: data-dependent branches, which cost nothing on the CPU.
  - None (accelerator default): sync-free. top-k via topk(max_k), top-p via a full sort of the
    sampling rows, the race on [R, V]. Every branch depends only on host-side metadata.
On the CPU the [B, V] float32 buffers are reused across steps (fresh 100+ MB allocations are mmap'd
and page-faulted every time, which costs more than the math).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from atom_stream.layers.sampling_metadata import (  # noqa: F401 (re-exported: the API)
    _MASK64,
    GREEDY_TEMPERATURE,
    SamplingMetadata,
    apply_guides,
    apply_penalties,
    bad_word_bans,
    needs_host_tokens,
    seed_key,
)

_NEG_INF = float("-inf")
_TINY = torch.finfo(torch.float32).tiny


@dataclass
class SamplerOutput:
    token_ids: Tensor  # [B] int64
    # sampled [B], top ids [B, k], top logprobs [B, k], the sampled token's rank [B] (vLLM's
    # Logprob.rank: entries of the raw distribution >= its own)
    logprobs: tuple[Tensor, Tensor, Tensor, Tensor] | None = None


class Sampler:
    """Stateless apart from its generators (unseeded rows) and, on the CPU, reused buffers.

    `seed` seeds the generator of unseeded rows (EngineConfig.seed); None = nondeterministic.
    `candidates`: see the module docstring; "auto" = 1024 on the CPU, None elsewhere.
    """

    def __init__(self, seed: int | None = None, candidates: int | None | str = "auto"):
        if candidates != "auto" and candidates is not None and int(candidates) < 1:
            raise ValueError("candidates must be >= 1, None or 'auto'")
        self.seed = seed
        self.candidates = candidates
        self._generators: dict[torch.device, torch.Generator] = {}
        self._row_generators: dict[torch.device, torch.Generator] = {}
        self._buffers: dict[str, Tensor] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device)
            if self.seed is None:
                g.seed()
            else:
                g.manual_seed(self.seed & _MASK64)
        return g

    def _num_candidates(self, device: torch.device) -> int | None:
        if self.candidates == "auto":
            return 1024 if device.type == "cpu" else None
        return self.candidates

    def _buffer(self, name: str, shape: tuple[int, int], device: torch.device) -> Tensor:
        """An uninitialized f32 tensor; on the CPU a view of storage kept across calls."""
        if device.type != "cpu":
            return torch.empty(shape, dtype=torch.float32, device=device)
        n = shape[0] * shape[1]
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n:
            buf = self._buffers[name] = torch.empty(n, dtype=torch.float32)
        return buf[:n].view(shape)

    def _take_rows(self, x: Tensor, rows: Tensor, name: str) -> Tensor:
        """x[rows] for x [n, V]. On the CPU a gather into a reused buffer: index_select and
        advanced indexing take up to 100x longer there on [>100, 163840] float32 rows."""
        if x.device.type != "cpu":
            return x.index_select(0, rows)
        out = self._buffer(name, (rows.numel(), x.shape[1]), x.device)
        return torch.gather(x, 0, rows[:, None].expand(-1, x.shape[1]), out=out)

    @torch.inference_mode()
    def __call__(self, logits: Tensor, md: SamplingMetadata) -> SamplerOutput:
        B, V = logits.shape
        if V != md.vocab_size:
            raise ValueError(f"logits have {V} columns, metadata vocab_size {md.vocab_size}")
        dev = logits.device
        fast_greedy = md.all_greedy and md.no_penalties and md.max_logprobs is None
        if fast_greedy and (logits.dtype == torch.float32 or dev.type != "cpu"):
            return SamplerOutput(logits.argmax(-1))  # nothing modifies the logits: no copy
        # our own float32 copy: the caller's logits (a graph's output buffer) stay intact
        x = self._buffer("x", (B, V), dev).copy_(logits)
        if md.guide_rows is not None:
            apply_guides(x, md)
        lp = self._raw_logprobs(x, md) if md.max_logprobs is not None else None
        if not md.no_penalties:
            apply_penalties(x, md)
        if md.all_greedy:
            tokens = x.argmax(-1)
        elif md.all_random:
            tokens = self._sample(x, md, None)
        else:
            greedy_tokens = x.argmax(-1)
            rows = md.random_rows
            xr = self._take_rows(x, rows, "xr")
            tokens = greedy_tokens.index_copy_(0, rows, self._sample(xr, md, rows))
        if lp is None:
            return SamplerOutput(tokens)
        lse, top_ids, top_lps = lp
        chosen = logits.gather(1, tokens[:, None])
        sampled = chosen[:, 0].float() - lse
        # the rank on the raw logits: the same order as the raw logprobs, no [B, V] float copy
        ranks = token_ranks(logits, chosen[:, 0])
        return SamplerOutput(tokens, (sampled, top_ids, top_lps, ranks))

    def _raw_logprobs(self, x: Tensor, md: SamplingMetadata) -> tuple[Tensor, Tensor, Tensor]:
        """(logsumexp [B], top ids [B, k], top logprobs [B, k]) of the raw logits x. Only the rows
        that asked are computed; the others hold NaN / -1."""
        rows = md.logprob_rows
        xl = x if rows is None else self._take_rows(x, rows, "logprobs")
        lse = self._row_lse(xl, None)
        top = xl.topk(md.max_logprobs, dim=-1)
        lps = top.values.sub_(lse[:, None])
        if rows is None:
            return lse, top.indices, lps
        B, k = x.shape[0], md.max_logprobs
        return (x.new_full((B,), float("nan")).index_copy_(0, rows, lse),
                top.indices.new_full((B, k), -1).index_copy_(0, rows, top.indices),
                x.new_full((B, k), float("nan")).index_copy_(0, rows, lps))

    def _row_lse(self, x: Tensor, thr: Tensor | None) -> Tensor:
        """logsumexp of each row of x [n, V] over the values >= thr [n] (all if None); x is kept.
        On the CPU through a reused buffer (torch.logsumexp allocates [n, V] temporaries)."""
        if x.device.type != "cpu":
            if thr is not None:
                x = x.masked_fill(x < thr[:, None], _NEG_INF)
            return x.logsumexp(-1)
        m = x.amax(-1, keepdim=True)  # the row max is always kept
        e = torch.sub(x, m, out=self._buffer("lse", tuple(x.shape), x.device)).exp_()
        if thr is not None:
            e.masked_fill_(x < thr[:, None], 0.0)
        return e.sum(-1).log_().add_(m[:, 0])

    def keep_mask(self, logits: Tensor, md: SamplingMetadata) -> Tensor:
        """[B, V] bool: the tokens each row may sample (greedy rows: the argmax ties). For tests
        and debugging; `__call__` never builds it."""
        with torch.inference_mode():
            x = logits.to(torch.float32, copy=True)
            if md.guide_rows is not None:
                apply_guides(x, md)
            if not md.no_penalties:
                apply_penalties(x, md)
            mask = x == x.amax(-1, keepdim=True)
            if not md.all_greedy:
                rows = md.random_rows
                xr = x if rows is None else x[rows]
                thr = self._thresholds(xr, md, rows)[0]
                keep = xr >= thr[:, None] if thr is not None else torch.ones_like(xr, dtype=bool)
                mask = keep if rows is None else mask.index_copy_(0, rows, keep)
            return mask

    def _thresholds(self, x: Tensor, md: SamplingMetadata, rows: Tensor | None
                    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Scale the sampling rows x [R, V] by 1/temperature in place; return the keep-threshold
        [R] (None: no filter) and, under the candidates policy, the top-K0 values and ids."""
        R, V = x.shape

        def sel(t: Tensor) -> Tensor:
            return t if rows is None else t[rows]

        if not md.no_temperature:
            x.div_(sel(md.temperature)[:, None])
        if md.no_top_k and md.no_top_p and md.no_min_p:
            return None, None, None
        ncand = self._num_candidates(x.device)
        vals = idx = None
        if ncand is not None:
            vals, idx = x.topk(min(V, max(ncand, md.max_top_k + 1)), dim=-1)
        elif not md.no_top_k:
            vals = x.topk(md.max_top_k, dim=-1).values

        thr = torch.full((R,), _NEG_INF, device=x.device)
        if not md.no_min_p:  # before top-p (vLLM): top-p's mass is over what min-p keeps
            row_max = vals[:, 0] if vals is not None else x.amax(-1)
            thr = row_max + sel(md.min_p).log()  # min_p 0: -inf
        if not md.no_top_k:
            k = sel(md.top_k)
            kth = vals.gather(1, (k - 1).clamp(0, vals.shape[1] - 1)[:, None])[:, 0]
            thr = torch.where(k > 0, torch.maximum(thr, kth), thr)
        if not md.no_top_p:
            p = sel(md.top_p)
            if ncand is not None:
                thr = torch.maximum(thr, self._top_p_threshold(x, vals, thr, p))
            else:  # sync-free: fully sort the rows that use top-p (known on the host)
                pr = md.top_p_rows
                xs, tk, ps = (x, thr, p) if pr is None else (x[pr], thr[pr], p[pr])
                sv = xs.sort(dim=-1, descending=True).values
                tp = torch.maximum(tk, self._top_p_threshold(xs, sv, tk, ps))
                thr = tp if pr is None else thr.index_copy(0, pr, tp)
        return thr, vals, idx

    def _sample(self, x: Tensor, md: SamplingMetadata, rows: Tensor | None) -> Tensor:
        """Tokens [R] for the sampling rows x [R, V] (penalized; modified in place)."""
        R, V = x.shape
        seeded = dict(md.seeded)
        thr, vals, idx = self._thresholds(x, md, rows)
        if thr is None or idx is None:
            return self._race_full(x, thr, seeded)
        if vals.shape[1] == V:
            return self._race_candidates(vals, idx, thr, seeded, V)
        # data-dependent split (CPU): rows whose kept set fits in the candidates race on them
        compact = vals[:, -1] < thr
        if bool(compact.all()):
            return self._race_candidates(vals, idx, thr, seeded, V)
        if not bool(compact.any()):
            return self._race_full(x, thr, seeded)
        tokens = torch.empty(R, dtype=torch.int64, device=x.device)
        for mask, full in ((compact, False), (~compact, True)):
            sub = mask.nonzero()[:, 0]
            where = {r: j for j, r in enumerate(sub.tolist())}
            sub_seeded = {where[r]: key for r, key in seeded.items() if r in where}
            if full:
                tokens[sub] = self._race_full(self._take_rows(x, sub, "split"), thr[sub],
                                              sub_seeded)
            else:
                tokens[sub] = self._race_candidates(vals[sub], idx[sub], thr[sub],
                                                    sub_seeded, V)
        return tokens

    def _top_p_threshold(self, x: Tensor, vals: Tensor, thr_k: Tensor, p: Tensor) -> Tensor:
        """Top-p keep-threshold [R] (-inf where top_p >= 1) for x [R, V] after min-p and top-k
        (thr_k: their combined threshold).
        vals [R, K0]: the K0 largest values of each row, sorted; K0 < V needs the CPU policy."""
        R, V = x.shape
        K0 = vals.shape[1]
        on = p < 1.0
        lse = vals.masked_fill(vals < thr_k[:, None], _NEG_INF).logsumexp(-1)
        if K0 < V:
            # the normalizer needs the whole kept top-k set; rows whose set is not inside the
            # candidates (no top-k, or ties at the k-th value) take it from the full row
            wide = (on & ~(vals[:, -1] < thr_k)).nonzero()[:, 0]
            if wide.numel():
                xs = x if wide.numel() == R else self._take_rows(x, wide, "wide")
                tk = thr_k[wide]
                lse[wide] = self._row_lse(xs, tk if bool((tk > _NEG_INF).any()) else None)
        thr, mass = _top_p_cut(vals, thr_k, lse, p)
        if K0 < V:
            # rows whose candidates hold less than top_p of the mass: cut on the fully sorted row
            short = (on & (mass < p)).nonzero()[:, 0]
            if short.numel():
                full = x[short].sort(dim=-1, descending=True).values
                thr[short] = _top_p_cut(full, thr_k[short], lse[short], p[short])[0]
        return torch.where(on, thr, torch.full_like(thr, _NEG_INF))

    def _noise(self, out: Tensor, seeded: dict[int, int], V: int,
               idx: Tensor | None = None) -> Tensor:
        """Fill out [R, n] with -E (E ~ Exp(1), as log U): one batched draw, then seeded rows from
        their own [V] draw (gathered at the candidate token ids idx when given)."""
        out.uniform_(generator=self.generator(out.device))
        if seeded:
            g = self._row_generators.get(out.device)
            if g is None:
                g = self._row_generators[out.device] = torch.Generator(device=out.device)
            for j, key in seeded.items():
                g.manual_seed(key)
                row = torch.empty(V, device=out.device).uniform_(generator=g)
                out[j] = row if idx is None else row[idx[j]]
        # log U <= -tiny: U == 1 (some backends) would divide by zero and U == 0 gives -inf (-0 p)
        return out.log_().clamp_(max=-_TINY)

    def _race_full(self, x: Tensor, thr: Tensor | None, seeded: dict[int, int]) -> Tensor:
        R, V = x.shape
        if thr is not None:
            x.masked_fill_(x < thr[:, None], _NEG_INF)
        x.sub_(x.amax(-1, keepdim=True)).exp_()
        noise = self._noise(self._buffer("noise", (R, V), x.device), seeded, V)
        return x.div_(noise).argmin(-1)  # p / -E: the most negative is the largest p / E

    def _race_candidates(self, vals: Tensor, idx: Tensor, thr: Tensor,
                         seeded: dict[int, int], V: int) -> Tensor:
        """vals/idx [R, K0]: each row's largest values (descending) and their token ids."""
        p = vals.masked_fill(vals < thr[:, None], _NEG_INF).sub_(vals[:, :1]).exp_()
        noise = self._noise(torch.empty_like(p), seeded, V, idx)
        return idx.gather(1, p.div_(noise).argmin(-1, keepdim=True))[:, 0]


def token_ranks(logprobs: Tensor, token_logprobs: Tensor) -> Tensor:
    """vLLM's Logprob.rank of one token per row: how many entries of logprobs [N, V] are >= the
    token's logprob [N] (vLLM's batched_count_greater_than, v1/sample/ops/logprobs.py): 1 + the
    entries strictly greater when nothing ties with it; a tie counts the tied entries too.
    int64 [N]."""
    return (logprobs >= token_logprobs[:, None]).sum(-1)


def _top_p_cut(vals: Tensor, thr_k: Tensor, lse: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
    """vals [R, n] sorted descending; returns (threshold [R], mass of all n [R]) under the
    distribution exp(x - lse) restricted to x >= thr_k."""
    probs = (vals.masked_fill(vals < thr_k[:, None], _NEG_INF) - lse[:, None]).exp_()
    cum = probs.cumsum_(-1)
    n_keep = 1 + (cum[:, :-1] < p[:, None]).sum(-1)  # ranks whose preceding mass is < top_p
    return vals.gather(1, (n_keep - 1)[:, None])[:, 0], cum[:, -1]


