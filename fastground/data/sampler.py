"""Stage mixing with replay (paper 3.2.3), deterministic, sharded and resumable.

An epoch visits every sample of the current stage once, in a shuffled order, and interleaves
samples of the previous stage so that each slot of the stream is a replay with probability
alpha (independently): the expected share of replayed samples is alpha. Replay draws walk
through shuffled passes over the previous stage, so replay covers it evenly.

Indices of the previous stage are offset by n_current, which is how MixedDataset reads them.
The order is a function of (seed, epoch) only; rank r of world_size takes positions
r, r + world_size, ... of it (padded by wrapping so every rank gets the same count and
collective ops stay in step).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


class StageMixSampler(torch.utils.data.Sampler):
    def __init__(self, n_current: int, n_previous: int, alpha: float, seed: int, rank: int = 0,
                 world_size: int = 1, epoch: int = 0, drop_last: bool = False):
        if n_current <= 0:
            raise ValueError(f"n_current must be positive, got {n_current}")
        if n_previous < 0:
            raise ValueError(f"n_previous must be >= 0, got {n_previous}")
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        if alpha > 0 and n_previous == 0:
            raise ValueError(f"alpha={alpha} replays the previous stage, but it has no samples")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.n_current = int(n_current)
        self.n_previous = int(n_previous)
        self.alpha = float(alpha)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)
        self.epoch = int(epoch)
        self.position = 0
        self._cache: tuple[int, np.ndarray] | None = None

    # ------------------------------------------------------------------ order
    def global_order(self, epoch: int | None = None) -> np.ndarray:
        """The unsharded stream of an epoch (current indices, previous ones offset by n_current)."""
        epoch = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng([self.seed, epoch])
        current = rng.permutation(self.n_current)
        if self.alpha == 0.0:
            return current
        # Failures before each success of a Bernoulli(1 - alpha) stream: the replays that
        # precede each current sample.
        before = rng.negative_binomial(1, 1.0 - self.alpha, size=self.n_current)
        n_replay = int(before.sum())
        passes = -(-n_replay // self.n_previous)
        replay = np.concatenate([rng.permutation(self.n_previous) for _ in range(passes)]
                                or [np.empty(0, dtype=np.int64)])[:n_replay] + self.n_current
        order = np.empty(self.n_current + n_replay, dtype=np.int64)
        is_current = np.zeros(order.size, dtype=bool)
        is_current[np.arange(self.n_current) + np.cumsum(before)] = True
        order[is_current] = current
        order[~is_current] = replay
        return order

    def rank_order(self) -> np.ndarray:
        if self._cache is None or self._cache[0] != self.epoch:
            order = self.global_order()
            ws = self.world_size
            if self.drop_last:
                order = order[: len(order) // ws * ws]
            elif len(order) % ws:
                pad = ws - len(order) % ws
                order = np.concatenate([order, np.resize(order, pad)])
            self._cache = (self.epoch, order[self.rank::ws])
        return self._cache[1]

    def __len__(self) -> int:
        return len(self.rank_order())

    def __iter__(self) -> Iterator[int]:
        order = self.rank_order()
        while self.position < len(order):
            i = int(order[self.position])
            self.position += 1
            yield i
        # A finished pass moves on, so a loop that never calls set_epoch still reshuffles.
        self.set_epoch(self.epoch + 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.position = 0

    # ------------------------------------------------------------------ resume
    def state_dict(self, position: int | None = None) -> dict:
        """`position` = samples of this rank's epoch already consumed; defaults to those
        yielded, which runs ahead of training by the DataLoader's prefetch, so a trainer that
        resumes exactly passes the count its optimizer steps consumed."""
        return {"seed": self.seed, "epoch": self.epoch,
                "position": self.position if position is None else int(position),
                "n_current": self.n_current, "n_previous": self.n_previous,
                "alpha": self.alpha, "world_size": self.world_size, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "n_current", "n_previous", "alpha", "world_size", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"cannot resume: the saved sampler has {key}={state[key]!r}, "
                                 f"this one {getattr(self, key)!r}; the remaining order would differ")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        if not 0 <= self.position <= len(self):
            raise ValueError(f"saved position {self.position} is outside this epoch's "
                             f"{len(self)} samples")
