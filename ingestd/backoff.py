"""One backoff for every retry loop: the broker connection, the store, the simulator."""

from __future__ import annotations

import random


class Backoff:
    """Exponential backoff with equal jitter: half fixed, half random."""

    def __init__(self, first: float, cap: float, rng: random.Random | None = None) -> None:
        self.first, self.cap = first, cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        base: float = min(self.cap, self.first * (2.0**self.attempt))
        self.attempt = min(self.attempt + 1, 32)
        jitter: float = self._rng.uniform(0, base / 2)
        return base / 2 + jitter

    def reset(self) -> None:
        self.attempt = 0
