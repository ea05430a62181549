"""Teacher pairs as training batches: a resumable loader for reflow and distillation (DESIGN §11).

A pair folder (:mod:`pixelflow_jax.pairs`) holds, for every image i the teacher drew,
the x it ended each stage with; the x it started each stage from is rebuilt inside
the training step (``pairs.stage_starts_jax``) from the teacher's seed, i and the
previous stage's end. :class:`PairLoader` turns it into the trainer's batches
with the guarantees of :class:`pixelflow_jax.data.Loader`: the stream is a pure
function of (seed, pairs), epoch ``e`` visits ``default_rng([seed, e, 2]).permutation(N)``,
and :meth:`PairLoader.state` (two integers) resumes on exactly the next batch.

A batch is G pair groups (G = global batch / S): group g is pair ``order[k G + g]`` at
step k of the epoch, and the trainer's row j = g S + s trains stage s of group g
(the stage grouping of DESIGN §5). Each host reads only the groups its devices hold.
"""

from __future__ import annotations

import collections
import concurrent.futures
from typing import Any

import numpy as np

from pixelflow_jax.data import PrefetchingLoader
from pixelflow_jax.errors import UserError


class PairLoader(PrefetchingLoader):
    """An infinite, deterministic, resumable stream of pair batches for one host.

    Args:
      pairs: an opened pair folder (``pixelflow_jax.pairs.open_pairs``).
      groups: G, pair groups per global batch.
      host_groups: the positions in 0..G-1 this host reads, in order (all of them on
        one host).
      seed: the training seed (the order of the pairs).
      state: a saved :meth:`state`, or None to start at the beginning.
      prefetch: batches read ahead in a background thread (0: read in ``next()``).
    """

    def __init__(self, pairs: Any, groups: int, host_groups: np.ndarray, *, seed: int = 0,
                 state: dict | None = None, prefetch: int = 2):
        if groups < 1:
            raise UserError(f"pair groups per batch must be >= 1, got {groups}")
        if pairs.num < groups:
            raise UserError(f"the pair folder holds {pairs.num} images, fewer than the "
                            f"{groups} a global batch needs (global batch / stages)")
        self.pairs = pairs
        self.groups = groups
        self.host_groups = np.asarray(host_groups, np.int64)
        self.seed = seed
        self.steps_per_epoch = pairs.num // groups
        self._epoch, self._pos = _check_state(state, self.steps_per_epoch)
        self._orders: dict[int, np.ndarray] = {}
        self._labels = np.asarray(pairs.labels, np.int32)
        self._queue: collections.deque = collections.deque()
        self._prefetch = prefetch
        self._pool = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pixelflow-pairs")
                      if prefetch else None)
        self._closed = False
        self._fill()

    @property
    def skipped(self) -> int:
        """Always 0 (pairs are arrays; nothing is skipped). For the trainer's progress line."""
        return 0

    def state(self) -> dict[str, int]:
        """Where the batches returned so far end: ``{"epoch", "position"}`` (position in steps)."""
        return {"epoch": self._epoch, "position": self._pos}

    def indices(self, epoch: int, position: int) -> np.ndarray:
        """This host's pair indices of step ``position`` of ``epoch``."""
        order = self._order(epoch)
        return order[position * self.groups + self.host_groups]

    def next(self) -> dict[str, Any]:
        """The next batch: ``labels`` int32 [h], ``indices`` int32 [h] (pair numbers) and
        ``ends``, a tuple of float32 [h, R_s, R_s, C] per stage (h = this host's groups)."""
        if self._closed:
            raise RuntimeError("PairLoader is closed")
        at = (self._epoch, self._pos)
        while self._queue and self._queue[0][0] < at:
            self._queue.popleft()[1].cancel()
        if self._queue and self._queue[0][0] == at:
            batch = self._queue.popleft()[1].result()
        else:
            batch = self._load(*at)
        self._pos += 1
        if self._pos == self.steps_per_epoch:
            self._epoch, self._pos = self._epoch + 1, 0
        self._fill()
        return batch

    # -- internals

    def _order(self, epoch: int) -> np.ndarray:
        order = self._orders.get(epoch)
        if order is None:
            for old in [e for e in self._orders if e < self._epoch]:
                del self._orders[old]
            # The trailing 2 keeps this order apart from the image loader's [seed, epoch].
            order = self._orders[epoch] = np.random.default_rng(
                [self.seed, epoch, 2]).permutation(self.pairs.num)
        return order

    def _load(self, epoch: int, position: int) -> dict[str, Any]:
        idx = self.indices(epoch, position)
        S = len(self.pairs.resolutions)
        return {"labels": self._labels[idx], "indices": idx.astype(np.int32),
                "ends": tuple(np.asarray(self.pairs.ends(s, idx), np.float32)
                              for s in range(S))}

    def _fill(self) -> None:
        if self._pool is None:
            return
        last = self._queue[-1][0] if self._queue else None
        nxt = (self._epoch, self._pos) if last is None else _advance(last, self.steps_per_epoch)
        while len(self._queue) < self._prefetch:
            self._queue.append((nxt, self._pool.submit(self._load, *nxt)))
            nxt = _advance(nxt, self.steps_per_epoch)


def _advance(at: tuple[int, int], steps_per_epoch: int) -> tuple[int, int]:
    epoch, pos = at
    return (epoch + 1, 0) if pos + 1 == steps_per_epoch else (epoch, pos + 1)


def _check_state(state: dict | None, steps_per_epoch: int) -> tuple[int, int]:
    """(epoch, position) from a saved :meth:`PairLoader.state`, or zeros."""
    if state is None:
        return 0, 0
    try:
        epoch, pos = state["epoch"], state["position"]
    except (KeyError, TypeError):
        raise UserError(f"pair loader state must have epoch and position, got {state!r}") \
            from None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (epoch, pos)):
        raise UserError(f"pair loader state must hold non-negative integers, got {state!r}")
    if pos >= steps_per_epoch:
        raise UserError(f"pair loader state position {pos} is past the end of an epoch "
                        f"({steps_per_epoch} steps); was it saved for other pairs?")
    return epoch, pos
