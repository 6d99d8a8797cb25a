"""Bounded budgets against floods: token buckets (one global, one per source address) and a log that says
why something was refused without letting a flood fill the log; and the one retry backoff of the clients.

Every structure here has a fixed maximum size; time comes from an injectable clock (seconds, monotonic).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]
#: Where a :class:`RefusalLog` writes: ``emit(logging level, text)``
Emit = Callable[[int, str], None]


class TokenBucket:
    """Up to ``burst`` tokens, refilled at ``rate`` per second; the balance may go down to ``-burst`` (a debt
    paid back by the refill). Not thread-safe: callers hold their own lock."""

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

    def charge(self, now: float) -> None:
        self._refill(now)
        self.tokens = max(-self.burst, self.tokens - 1.0)


class FetchBudget:
    """How many expensive operations that turn out to be wasted (MEF fetches the MEF refuses, or that fail)
    may be started: a bucket per source address plus a global one.

    :meth:`allowed` says whether an operation may start: the source's bucket AND the global bucket must hold a
    token. Only a wasted operation is paid for (:meth:`charge`, from both buckets), so a source whose operations
    succeed (legitimate AEs fetching real keys) never runs out, however many arrive at once. Operations that
    start together before the first is charged can overdraw a bucket; the caller bounds how many run at once.
    At most ``max_sources`` source buckets are kept (least recently used dropped first: a dropped source starts
    again with a full bucket, and the global bucket still bounds the total).
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

    def _bucket(self, source: str, now: float) -> TokenBucket:
        bucket = self._sources.get(source)
        if bucket is None:
            bucket = self._sources[source] = TokenBucket(self._source_rate, self._source_burst, now)
            while len(self._sources) > self._max_sources:
                self._sources.popitem(last=False)
        else:
            self._sources.move_to_end(source)
        return bucket

    def allowed(self, source: str | None) -> str | None:
        """None when an operation may start, else which budget is spent ("source" or "global")."""
        with self._lock:
            now = self._clock()
            if source is not None and not self._bucket(source, now).available(now):
                return "source"
            return None if self._global.available(now) else "global"

    def charge(self, source: str | None) -> None:
        """Pay for one wasted operation."""
        with self._lock:
            now = self._clock()
            if source is not None:
                self._bucket(source, now).charge(now)
            self._global.charge(now)


class RefusalLog:
    """Refusal reasons for the operator, the one rate-limited refusal log of the project (MEF, transport, key
    cache, ACME plugin): the first ``burst`` refusals per ``interval`` seconds at WARNING, the rest at INFO,
    counted by reason and by source address when the caller names them. When the interval is over (at the
    next refusal, or when the owner calls :meth:`roll`, e.g. from a timer) one WARNING line gives the count,
    the commonest reasons and the busiest sources. So a flood costs at most ``burst + 1`` WARNING lines per
    interval, and a log at INFO still shows every refusal.

    ``target`` is a logger, or ``emit(level, text)`` for a host with a log of its own (the ACME plugin).
    ``summary(text)``, when given, receives the summary lines instead of ``target`` (the audit log writes them
    as records of their own). Messages must never carry key material; values an attacker chose belong in
    ``repr`` form."""

    def __init__(self, target: logging.Logger | Emit, *, burst: int = 20, interval: float = 60.0,
                 clock: Clock = time.monotonic, summary: Callable[[str], None] | None = None) -> None:
        if isinstance(target, logging.Logger):
            logger = target
            self._emit: Emit = lambda level, text: logger.log(level, "%s", text)
        else:
            self._emit = target
        self._summary: Callable[[str], None] = summary or (lambda text: self._emit(logging.WARNING, text))
        self._burst, self._interval, self._clock = burst, interval, clock
        self._lock = threading.Lock()
        self._start = clock()
        self._count = 0
        self._demoted = 0
        self._reasons: Counter[str] = Counter()
        self._sources: Counter[str] = Counter()

    def refused(self, message: str, *args: object, reason: str | None = None, source: str | None = None) -> None:
        """Log one refusal (``message % args``); ``reason`` and ``source`` feed the summary of a flood."""
        with self._lock:
            summary = self._roll(self._clock())
            self._count += 1
            level = logging.WARNING if self._count <= self._burst else logging.INFO
            if level == logging.INFO:
                self._demoted += 1
                if reason:
                    self._reasons[reason] += 1
                if source:
                    self._sources[source] += 1
        if summary:
            self._summary(summary)
        self._emit(level, message % args if args else message)

    def roll(self) -> None:
        """Write the summary of an interval that is over (a flood that stopped still gets its count)."""
        with self._lock:
            summary = self._roll(self._clock())
        if summary:
            self._summary(summary)

    def flush(self) -> None:
        """Write the summary now (at shutdown)."""
        with self._lock:
            summary = self._roll(self._clock(), force=True)
        if summary:
            self._summary(summary)

    def _roll(self, now: float, force: bool = False) -> str | None:
        if not force and now - self._start < self._interval:
            return None
        summary = None
        if self._demoted:
            summary = f"{self._demoted} more refusals in the previous {self._interval:g} s were logged at INFO only"
            if self._reasons:
                summary += " (" + ", ".join(f"{n} {r}" for r, n in self._reasons.most_common(5)) + ")"
            if self._sources:
                summary += "; most from " + ", ".join(f"{ip} ({n})" for ip, n in self._sources.most_common(3))
        self._start, self._count, self._demoted = now, 0, 0
        self._reasons.clear()
        self._sources.clear()
        return summary


@dataclass(frozen=True)
class Backoff:
    """Retry delays: ``first`` seconds, doubling up to ``ceiling``; each delay is drawn in [d/2, d]."""

    first: float = 1.0
    ceiling: float = 300.0
    #: longest sleep between checks while nothing is due (a changed clock or profile is noticed within it)
    max_idle: float = 3600.0

    def delay(self, failures: int, draw: float) -> float:
        d = min(self.ceiling, self.first * 2 ** max(0, failures - 1))
        return d / 2 + d / 2 * draw
