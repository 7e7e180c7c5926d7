"""The host-known tokens of one sequence in the forms the penalties read, kept incrementally.

Building them from `Sequence.token_ids` every step (a tensor from the Python list, then
torch.unique) costs O(prompt + output) Python work per penalized row per step: tens of ms per
step at 64 rows x 2K tokens. `PenaltyTokens.update` instead walks only the tokens that became
known since the last step (usually one), keeping sorted unique numpy arrays:

- `seen`  int64 [S]: the distinct prompt + output ids (the repetition penalty's set);
- `out`   int64 [U]: the distinct output ids, `count` float32 [U] their occurrences (the
  frequency / presence penalties).

`token_ids` only grows at its end except for trailing PLACEHOLDERs (engine/sequence.py), so the
first `n` known tokens never change; should fewer be known than already walked, the state is
rebuilt (defensive: no engine path does that).
"""

from __future__ import annotations

import numpy as np

_EMPTY_IDS = np.zeros(0, dtype=np.int64)
_EMPTY_COUNTS = np.zeros(0, dtype=np.float32)
REBUILD_AT = 16  # more new tokens than this: rebuild with np.unique instead of inserting


class PenaltyTokens:
    """See the module docstring. `n`: how many leading tokens of token_ids are walked."""

    __slots__ = ("count", "n", "out", "seen")

    def __init__(self) -> None:
        self.n = 0
        self.seen = self.out = _EMPTY_IDS
        self.count = _EMPTY_COUNTS

    def update(self, token_ids: list[int], num_prompt: int, num_known: int) -> None:
        """Walk token_ids[self.n:num_known] (num_known: the tokens known on the host, i.e.
        without trailing placeholders); token_ids[:num_prompt] is the prompt."""
        if num_known < self.n or num_known - self.n > REBUILD_AT:
            self._rebuild(token_ids, num_prompt, num_known)
            return
        for j in range(self.n, num_known):
            t = token_ids[j]
            self.seen = _insert_unique(self.seen, t)
            if j >= num_prompt:
                i = int(self.out.searchsorted(t))
                if i < self.out.size and self.out[i] == t:
                    self.count[i] += 1.0
                else:
                    self.out = _put(self.out, i, t)
                    self.count = _put(self.count, i, 1.0)
        self.n = num_known

    def _rebuild(self, token_ids: list[int], num_prompt: int, num_known: int) -> None:
        ids = np.asarray(token_ids[:num_known], dtype=np.int64)
        self.seen = np.unique(ids)
        out, count = np.unique(ids[num_prompt:], return_counts=True)
        self.out, self.count = out, count.astype(np.float32)
        self.n = num_known


def _insert_unique(a: np.ndarray, t: int) -> np.ndarray:
    """Sorted unique `a` with t in it (a itself when t is there already)."""
    i = int(a.searchsorted(t))
    if i < a.size and a[i] == t:
        return a
    return _put(a, i, t)


def _put(a: np.ndarray, i: int, v) -> np.ndarray:
    """A copy of 1-d `a` with v inserted before index i (np.insert's general machinery costs
    ~20x more for one value)."""
    b = np.empty(a.size + 1, dtype=a.dtype)
    b[:i] = a[:i]
    b[i] = v
    b[i + 1:] = a[i:]
    return b
