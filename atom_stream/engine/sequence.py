"""Sequence state and the step contract between the scheduler and the model runner.

A `Sequence` is one generation stream (one choice of one request). Its tokens are
`token_ids = prompt + outputs`; `num_computed_tokens` of them have their latent KV in the cache
(prefix-cache hits included). The scheduler hands the runner a `ScheduledBatch`: for each sequence,
the next `num_new_tokens` tokens starting at `num_computed_tokens`. The runner returns one sampled
token for each sequence whose chunk reaches the end of its known tokens (`sample[i]`).

Async scheduling (engine/pipeline.py): a launched step is committed at once (its tokens counted
in `num_computed_tokens`, each token it samples appended as a `PLACEHOLDER` entry), so the next
step is scheduled before this one's sampled ids reach the host. `token_ids` may therefore end in
`num_placeholders` (0-2) placeholders, the oldest first; postprocessing overwrites the oldest
one with the real id. Everything that counts tokens (block allocation, seeded output index,
max_tokens) counts them; nothing reads their values on the host (the runner takes them from the
previous step's device tensor).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from atom_stream.sampling_params import SamplingParams

PLACEHOLDER = -1  # token_ids entry of a sampled token still on the device (never a real id)


class SequenceStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


class Sequence:
    """Mutable per-stream state. Owned by the engine core; not thread-safe."""

    __slots__ = (
        "request_id", "token_ids", "num_prompt_tokens", "params", "block_table",
        "num_computed_tokens", "num_cached_tokens", "status", "finish_reason", "stop_reason",
        "arrival_time", "max_tokens", "num_preemptions", "block_hashes", "logprobs",
        "first_token_time", "last_token_time", "eos_token_ids", "num_registered_blocks",
        "num_placeholders", "num_uncollected", "final_token_pending", "table_epoch",
        "stop_token_set", "min_tokens_bans", "guide", "penalty_tokens",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        eos_token_ids: tuple[int, ...] = (),
    ):
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.max_tokens = max_tokens  # resolved: min(params.max_tokens, max_model_len - prompt)
        self.eos_token_ids = eos_token_ids
        # built once (params and EOS ids never change for a sequence): the stop check's set of
        # params.stop_token_ids, and what rows below min_tokens ban (vLLM's all_stop_token_ids:
        # stop_token_ids and the EOS ids, whatever ignore_eos says; empty without min_tokens)
        self.stop_token_set = frozenset(params.stop_token_ids)
        self.min_tokens_bans: tuple[int, ...] = (
            tuple(self.stop_token_set.union(eos_token_ids)) if params.min_tokens else ())
        self.block_table: list[int] = []
        # bumped by BlockManager.free (table cleared): lets the runner's persistent block-table
        # copy detect a reset even if the table regrew before its next step
        self.table_epoch = 0
        self.block_hashes: list = []  # chained content hashes of this sequence's full blocks
        self.num_registered_blocks = 0  # leading blocks of block_table known to the prefix cache
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
        self.stop_reason: int | str | None = None
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.num_preemptions = 0
        self.logprobs: list | None = None
        # async scheduling (see the module docstring); all 0/False on the synchronous path
        self.num_placeholders = 0  # trailing PLACEHOLDER entries of token_ids
        self.num_uncollected = 0  # of num_computed_tokens: fed by launched, uncollected steps
        self.final_token_pending = False  # the launched step samples its last token (by count)
        # structured outputs: the request's walk through its grammar (structured.GuideState;
        # set by the engine when params carry a compiled grammar)
        self.guide = None
        # the penalties' view of the host-known tokens (layers/penalty_tokens.py), made and
        # kept current by the sampler's metadata while the request asks for penalties
        self.penalty_tokens = None

    def drop_placeholders(self) -> None:
        """Forget sampled-but-uncollected tokens (the request ended; they are wasted)."""
        if self.num_placeholders:
            del self.token_ids[-self.num_placeholders:]
            self.num_placeholders = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def num_pending_tokens(self) -> int:
        """Known tokens whose KV is not yet computed (prompt remainder, or 1 when decoding)."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, status={self.status.name})"
        )


@dataclass
class ScheduledBatch:
    """One engine step. Decodes come first, then prefill chunks.

    For sequence i the runner feeds tokens
    `seqs[i].token_ids[seqs[i].num_computed_tokens : seqs[i].num_computed_tokens + num_new_tokens[i]]`
    at those positions, writes their latent KV to the slots given by `seqs[i].block_table`, and
    samples a next token when `sample[i]` (the chunk reaches the last known token).
    """

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    sample: list[bool] = field(default_factory=list)
    num_decodes: int = 0  # the first num_decodes entries are single-token decodes
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


@dataclass
class StepOutput:
    """What the runner returns for a ScheduledBatch: one entry per sampled sequence, in order.

    `token_ids[j]` is the token sampled for the j-th sequence with `sample[i]` true.
    `logprobs[j]` (when that sequence asked for them) is `(sampled_logprob, [(id, logprob), ...])`.
    `prompt_logprobs` maps a sequence index to the logprobs of the chunk's tokens (echo), and
    `prompt_logprob_ranks` (when the runner computes them) to those tokens' ranks, aligned;
    `logprob_ranks[j]` is the sampled token's rank (vLLM's Logprob.rank) where `logprobs[j]` is.
    """

    token_ids: list[int]
    logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None
    prompt_logprobs: dict[int, list] | None = None
    prompt_logprob_ranks: dict[int, list[int]] | None = None
    logprob_ranks: list[int | None] | None = None
