"""Device time for simulated pumps: the wall clock, or a faster one that starts in the past."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

__all__ = ["SimClock"]


class SimClock:
    """Runs `speed` times faster than the wall clock from `start`, but never ahead of it.

    The contract rejects device times in the future, so a fast clock has to start in the past;
    once it catches up with the wall clock it runs at real time.
    """

    def __init__(
        self,
        start: datetime | None = None,
        speed: float = 1.0,
        *,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if speed <= 0:
            raise ValueError("speed must be > 0")
        self._wall = wall
        self._monotonic = monotonic
        self.start = (start or wall()).astimezone(UTC)
        self.speed = speed
        self._t0 = monotonic()

    def __call__(self) -> datetime:
        elapsed = (self._monotonic() - self._t0) * self.speed
        return min(self.start + timedelta(seconds=elapsed), self._wall())
