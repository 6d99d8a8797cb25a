"""Bounded budgets against floods: token buckets (one global, one per source address) and a log that says
why something was refused without letting a flood fill the log.

Every structure here has a fixed maximum size; time comes from an injectable clock (seconds, monotonic).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

Clock = Callable[[], float]


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second. Not thread-safe: callers hold their own lock."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.stamp = now

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def available(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= 1.0

    def take(self, now: float) -> None:
        self._refill(now)
        self.tokens -= 1.0


class FetchBudget:
    """How many expensive operations (MEF fetches) may start: a bucket per source address plus a global one.

    A source must have a token in its own bucket AND the global bucket must have one; both are spent
    together. At most ``max_sources`` source buckets are kept (least recently used dropped first: a dropped
    source starts again with a full bucket, and the global bucket still bounds the total).
    """

    def __init__(self, *, source_rate: float, source_burst: float, global_rate: float, global_burst: float,
                 max_sources: int, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._source_rate, self._source_burst, self._max_sources = source_rate, source_burst, max_sources
        self._global = TokenBucket(global_rate, global_burst, clock())
        self._sources: OrderedDict[str, TokenBucket] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sources)

    def try_spend(self, source: str | None) -> str | None:
        """Spend one token; None on success, else which budget is exhausted ("source" or "global")."""
        with self._lock:
            now = self._clock()
            bucket = None
            if source is not None:
                bucket = self._sources.get(source)
                if bucket is None:
                    bucket = TokenBucket(self._source_rate, self._source_burst, now)
                    self._sources[source] = bucket
                    while len(self._sources) > self._max_sources:
                        self._sources.popitem(last=False)
                else:
                    self._sources.move_to_end(source)
                if not bucket.available(now):
                    return "source"
            if not self._global.available(now):
                return "global"
            self._global.take(now)
            if bucket is not None:
                bucket.take(now)
            return None


class RefusalLog:
    """Refusal reasons for the operator: the first ``burst`` per ``interval`` seconds at WARNING, the rest at
    INFO; when a new interval starts after some were demoted, one WARNING says how many. So a flood costs at
    most ``burst + 1`` WARNING lines per interval, and a log at INFO still shows every refusal."""

    def __init__(self, logger: logging.Logger, *, burst: int = 20, interval: float = 60.0,
                 clock: Clock = time.monotonic) -> None:
        self._log, self._burst, self._interval, self._clock = logger, burst, interval, clock
        self._lock = threading.Lock()
        self._start = clock()
        self._count = 0
        self._demoted = 0

    def refused(self, message: str, *args: object) -> None:
        with self._lock:
            now = self._clock()
            summary = 0
            if now - self._start >= self._interval:
                summary, self._demoted, self._count, self._start = self._demoted, 0, 0, now
            self._count += 1
            level = logging.WARNING if self._count <= self._burst else logging.INFO
            if level == logging.INFO:
                self._demoted += 1
        if summary:
            self._log.warning("%d more refusals in the previous %g s were logged at INFO only", summary,
                              self._interval)
        self._log.log(level, message, *args)
