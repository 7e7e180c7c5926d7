"""Batch-vectorized token sampler: penalties, greedy, temperature, top-k, top-p, min-p, seeds.

Contract (ModelRunner.execute, rank 0, once per step):
    md = SamplingMetadata.from_sequences(seqs, vocab_size, device)  # host work, once per step
    out = sampler(logits, md)                   # logits [B, V] any float dtype, row i = seqs[i]
    out.token_ids  [B] int64 on logits.device
    out.logprobs   None, or (sampled [B] f32, top_ids [B, k] int64, top_lps [B, k] f32), k = the
                   largest `params.logprobs` in the batch (a row asking j <= k takes the first j)

Semantics (vLLM's), all in float32:
  1. Logprobs are of the RAW model distribution (log_softmax of the unmodified logits, vLLM's
     default "raw_logprobs"): the sampled token's, and the top k sorted by value.
  2. Logit processing in vLLM's order (v1 Sampler.apply_logits_processors): allowed_token_ids
     (every other id -inf); bad words (vLLM's apply_bad_words: for each token-id sequence of
     `params.bad_words_token_ids`, its last id is -inf when the row's OUTPUT tokens end with the
     rest of it; a one-token sequence always; prompt tokens never count); rows below
     `min_tokens` get their stop tokens (`seq.eos_token_ids`,
     whatever ignore_eos says, as vLLM's all_stop_token_ids, and stop_token_ids) set to -inf;
     logit_bias (added); then the penalties: repetition (tokens in prompt or output: positive
     logits divided by r, others multiplied; it scales the biased logit), frequency
     (- count * f) and presence (- p if count > 0) over OUTPUT tokens. Greedy rows included.
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

from atom_stream.engine.sequence import Sequence

GREEDY_TEMPERATURE = 1e-5
_MASK64 = (1 << 64) - 1
_NEG_INF = float("-inf")
_TINY = torch.finfo(torch.float32).tiny


def needs_host_tokens(p) -> bool:
    """Whether sampling for params `p` reads the values of earlier tokens (the penalties, bad
    words of more than one token), so an async-scheduled step must wait until the previous
    step's token is on the host."""
    return (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
            or p.repetition_penalty != 1.0
            or (p._bad_words_token_ids is not None
                and any(len(w) > 1 for w in p._bad_words_token_ids)))


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
    of rows below min_tokens.
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
    def from_sequences(cls, seqs: list[Sequence], vocab_size: int,
                       device: torch.device | str) -> SamplingMetadata:
        V = vocab_size
        floats: list[list[float]] = [[] for _ in range(6)]  # T, top_p, min_p, pres, freq, rep
        top_k: list[int] = []
        greedy: list[bool] = []
        random_rows: list[int] = []
        seeded: list[tuple[int, int]] = []
        out_rows: list[Tensor] = []
        seen_rows: list[Tensor] = []
        banned: list[int] = []
        bad: list[int] = []
        bias_pos: list[int] = []
        bias_val: list[float] = []
        allow_rows: list[int] = []
        allow_pos: list[int] = []
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
            if seq.num_placeholders and needs_host_tokens(p):
                # async scheduling drains the pipeline first (engine/pipeline.py); a placeholder
                # (-1) here would silently penalize the previous row's last token
                raise ValueError(f"{seq.request_id}: penalties over a token still on the device")
            if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
                out_rows.append(torch.tensor(seq.output_token_ids, dtype=torch.int64) + i * V)
            if p.repetition_penalty != 1.0:
                seen_rows.append(torch.tensor(seq.token_ids, dtype=torch.int64) + i * V)
            bw = p._bad_words_token_ids
            if bw:
                bad.extend(i * V + t for t in bad_word_bans(seq.token_ids,
                                                            seq.num_output_tokens, bw))
            if seq.num_output_tokens < p.min_tokens:
                # vLLM bans all_stop_token_ids: the EOS ids even under ignore_eos
                stops = set(p.stop_token_ids) | set(seq.eos_token_ids)
                banned.extend(i * V + t for t in stops if t < V)
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
        out_tokens = [t for t in out_rows if t.numel()]
        if out_tokens:
            pos, count = torch.unique(torch.cat(out_tokens), return_counts=True)
            md.out_pos, md.out_count = dev(pos), dev(count.to(torch.float32))
        if seen_rows:
            md.seen_pos = dev(torch.cat(seen_rows))
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
        md.no_penalties = (md.out_pos is None and md.seen_pos is None and md.banned_pos is None
                           and md.bias_pos is None and md.allow_rows is None
                           and md.bad_pos is None)
        return md


@dataclass
class SamplerOutput:
    token_ids: Tensor  # [B] int64
    logprobs: tuple[Tensor, Tensor, Tensor] | None = None  # sampled [B], top ids [B,k], lps [B,k]


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
        sampled = logits.gather(1, tokens[:, None])[:, 0].float() - lse
        return SamplerOutput(tokens, (sampled, top_ids, top_lps))

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
    if md.seen_pos is not None:
        # duplicates in seen_pos are harmless: every copy writes the same value
        r = md.repetition_penalty[md.seen_pos // V]
        v = flat[md.seen_pos]
        flat[md.seen_pos] = torch.where(v > 0, v / r, v * r)
    if md.out_pos is not None:
        row = md.out_pos // V
        flat[md.out_pos] -= md.frequency_penalty[row] * md.out_count + md.presence_penalty[row]


def _top_p_cut(vals: Tensor, thr_k: Tensor, lse: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
    """vals [R, n] sorted descending; returns (threshold [R], mass of all n [R]) under the
    distribution exp(x - lse) restricted to x >= thr_k."""
    probs = (vals.masked_fill(vals < thr_k[:, None], _NEG_INF) - lse[:, None]).exp_()
    cum = probs.cumsum_(-1)
    n_keep = 1 + (cum[:, :-1] < p[:, None]).sum(-1)  # ranks whose preceding mass is < top_p
    return vals.gather(1, (n_keep - 1)[:, None])[:, 0], cum[:, -1]


