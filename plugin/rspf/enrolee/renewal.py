"""Background renewal of an enrolment that survives the network: the MEF may drop, hang, refuse and come back.

One renewal-time rule (:meth:`Enrolment.renewal_due`). A failed renewal is retried with exponential backoff
and jitter up to a ceiling, each failure logged at WARNING naming the cause; once the MEF answers again the
renewal succeeds and the normal schedule resumes. Time is injected (``now`` and ``wait``), so tests drive it
without real waits.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
from collections.abc import Callable

from ..errors import RspfError
from ..ratelimit import Backoff
from .client import Enrolee, Enrolment

log = logging.getLogger(__name__)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Renewer:
    """Renews ``enrolee``'s enrolment ``renew_before_seconds`` before expiry (see :meth:`Enrolment.renewal_due`).

    ``on_renewed(fresh, previous)`` is called with each new enrolment; ``wait(seconds)`` sleeps and returns
    True when the renewer is to stop (e.g. ``threading.Event().wait``); ``warn`` / ``info`` report.
    """

    def __init__(self, enrolee: Enrolee, renew_before_seconds: int, current: Enrolment | None, *,
                 on_renewed: Callable[[Enrolment, Enrolment | None], None], wait: Callable[[float], bool],
                 warn: Callable[[str], None] = log.warning, info: Callable[[str], None] = log.info,
                 now: Callable[[], dt.datetime] = _utcnow, backoff: Backoff = Backoff(),
                 draw: Callable[[], float] = random.random) -> None:
        self.enrolee, self.renew_before_seconds, self.current = enrolee, renew_before_seconds, current
        self._on_renewed, self._wait, self._warn, self._info = on_renewed, wait, warn, info
        self._now, self.backoff, self._draw = now, backoff, draw
        self.failures = 0

    def step(self) -> float:
        """Renew if due; return how many seconds to wait before the next step."""
        current = self.current
        if current is None or current.needs_renewal(self.renew_before_seconds, self._now()):
            try:
                fresh = self.enrolee.enrol()
            except Exception as exc:  # whatever fails, the renewal thread must go on
                self.failures += 1
                delay = self.backoff.delay(self.failures, self._draw())
                self._warn(f"securityProfile renewal failed ({_cause(exc)}); attempt {self.failures}, retrying "
                           f"in {delay:.1f} s")
                return delay
            if self.failures:
                self._info(f"securityProfile renewal succeeded after {self.failures} failed attempt(s)")
            self.failures = 0
            self.current = fresh
            self._on_renewed(fresh, current)
            current = fresh
        due = current.renewal_due(self.renew_before_seconds)
        return max(1.0, min((due - self._now()).total_seconds(), self.backoff.max_idle))

    def run(self) -> None:
        """Step until ``wait`` says stop."""
        while not self._wait(self.step()):
            pass


def _cause(exc: Exception) -> str:
    return str(exc) if isinstance(exc, RspfError) else f"{type(exc).__name__}: {exc}"
