"""Capped exponential back-off with jitter, so nodes restarted together do not retry in step."""

import random

BACKOFF_FIRST_S = 0.5
BACKOFF_CAP_S = 10.0


class Backoff:
    """The delays of successive retries: a quarter to half a second at first, doubling to at most
    ten seconds, each drawn from the upper half of its step."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self.failures = 0  # steps taken since the last reset

    def reset(self) -> None:
        self.failures = 0

    def next_delay(self, first_at_once: bool = True) -> float:
        """The delay before the next retry. With `first_at_once`, the first retry after a reset
        is immediate."""
        step = self.failures - 1 if first_at_once else self.failures
        self.failures += 1
        if step < 0:
            return 0.0
        ceiling = min(BACKOFF_CAP_S, BACKOFF_FIRST_S * 2**step)
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)
