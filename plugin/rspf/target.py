"""Enrolment Target side: fetch a usage-constrained key from the MEF (TS-0003 §8.3.2.1 steps f-g), and the
bounded key cache a CSE consults inside its TLS-PSK handshakes.

The cache is exposed to anyone who can open a TCP connection: every psk_identity a client presents may cost
a MEF request. So everything it keeps is bounded (keys, refusals, fetches in flight, source budgets), and MEF
fetches for KeIDs it does not hold are rate-limited per source address and globally (docs/acme-plugin.md).
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from . import keys
from .client import OneM2MClient
from .errors import BadRequest, RemoteError, RspfError, TransportError
from .fileutil import check_private, write_private
from .mef import protocol
from .profile import parse_timestamp
from .ratelimit import Backoff, Clock, FetchBudget, RefusalLog
from .secret import Secret
from .tls import PskClient

log = logging.getLogger(__name__)
_default_client: PskClient | None = None
T = TypeVar("T")


@dataclass(frozen=True)
class FetchedCredential:
    key: Secret
    enrolee_id: str
    lifetime: str  # m2m:timestamp of expiry
    allowed_app_ids: tuple[str, ...] | None = None  # as the MEF sent them; None: the MEF set none

    @property
    def expires_at(self) -> float | None:
        """POSIX time of :attr:`lifetime`; None when the MEF sent a timestamp that cannot be read."""
        try:
            return parse_timestamp(self.lifetime).timestamp()
        except ValueError:
            return None


@dataclass(frozen=True)
class KeyCacheLimits:
    """Every bound of the key cache and of the Target's MEF connections, in one place (docs/acme-plugin.md)."""

    max_entries: int = 10_000       # keys held; the least recently used goes first
    max_age: float = 300.0          # seconds a key is trusted before the MEF is asked again ([rspf] keyCacheSeconds)
    negative_ttl: float = 30.0      # seconds a MEF refusal (unknown, revoked, not authorized) is remembered
    max_negative: int = 4_096       # refusals remembered; the oldest goes first
    max_pending: int = 1_024        # distinct KeIDs waiting for or in a MEF fetch; beyond, refused at once
    max_in_flight: int = 32         # MEF fetches running at one time; others wait for a slot up to `timeout`
    source_burst: float = 10.0      # failed MEF fetches (refused or unreachable) a source address may cause at once
    source_rate: float = 0.5        # ... and per second after that; a fetch that yields a key costs nothing
    max_sources: int = 4_096        # source addresses with a budget; the least recently seen goes first
    global_burst: float = 50.0      # failed MEF fetches all sources together may cause at once ...
    global_rate: float = 5.0        # ... and per second after that
    pool_size: int = 4              # kept-alive connections to the MEF
    pool_idle: float = 10.0         # a pooled connection idle longer is discarded (below the MEF's idle_timeout, 30 s)
    timeout: float = 10.0           # connect + handshake, and the whole-response deadline, of one MEF request
    revocation_poll: float = 2.0    # seconds between two reads of the MEF's revocation feed
    max_revoked: int = 65_536       # revoked KeIDs remembered (a fetch that was running when one was revoked
                                    # is then discarded; the MEF refuses later fetches of it anyway)
    log_burst: int = 20             # refusals logged at WARNING per log_interval; the rest at INFO
    log_interval: float = 60.0


def fetch_credentials(host: str, port: int, mef_fqdn: str, psk_identity: str, psk: Secret, origin: str,
                      ke_id: str, suid: int, *, tls_client: PskClient | None = None,
                      timeout: float = 15.0) -> FetchedCredential:
    """RETRIEVE /fetchCredentials/<KeID>/<SUID> over TLS-PSK authenticated with the Target's own credential."""
    global _default_client
    protocol.fetch_path(ke_id, suid)  # checks both before anything is sent
    if tls_client is None:
        if _default_client is None:
            _default_client = PskClient()
        tls_client = _default_client
    tls = tls_client.connect(host, port, psk_identity, psk, server_name=mef_fqdn, timeout=timeout)
    client = OneM2MClient(tls, origin, host=mef_fqdn, deadline=timeout)
    try:
        return request_credentials(client, ke_id, suid)
    finally:
        client.close()


def request_credentials(client: OneM2MClient, ke_id: str, suid: int) -> FetchedCredential:
    """The fetchCredentials request on an open, authenticated connection to the MEF."""
    got = protocol.parse_fetch_response(client.call("GET", protocol.fetch_path(ke_id, suid)))
    return FetchedCredential(Secret(got.key, "usage-constrained key"), got.enrolee_id, got.lifetime,
                             got.allowed_app_ids)


class MefConnections:
    """Kept-alive, authenticated connections from the Target to the MEF.

    A connection idle longer than ``idle_limit`` is closed instead of reused (the MEF has probably closed it
    already). When a request on a reused connection fails in transport, it is retried once on a FRESH
    connection, never on another pooled one; a fresh connection that fails is not retried.
    """

    def __init__(self, connect: Callable[[], OneM2MClient], *, size: int, idle_limit: float) -> None:
        self._connect, self._size, self._idle_limit = connect, size, idle_limit
        self._lock = threading.Lock()
        self._idle: list[OneM2MClient] = []

    def __len__(self) -> int:
        return len(self._idle)

    def _take(self) -> OneM2MClient | None:
        stale: list[OneM2MClient] = []
        found = None
        with self._lock:
            while self._idle:
                client = self._idle.pop()
                if time.monotonic() - client.last_used <= self._idle_limit and client.reusable:
                    found = client
                    break
                stale.append(client)
        for client in stale:
            client.close()
        return found

    def _give(self, client: OneM2MClient) -> None:
        with self._lock:
            if client.reusable and len(self._idle) < self._size:
                self._idle.append(client)
                return
        client.close()

    def run(self, request: Callable[[OneM2MClient], T]) -> T:
        client = self._take()
        reused = client is not None
        for attempt in (1, 2):
            if client is None:
                client = self._connect()
            try:
                result = request(client)
            except TransportError as exc:
                client.close()
                if not (reused and attempt == 1):
                    raise
                log.info("a kept-alive connection to the MEF failed (%s); retrying on a new one", exc)
                client = None
                continue
            except RemoteError:
                self._give(client)  # the MEF answered: the connection is fine
                raise
            except BaseException:
                client.close()
                raise
            self._give(client)
            return result
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for client in idle:
            client.close()


@dataclass
class _InFlight:
    lock: threading.Lock
    users: int = 0


class KeyCache:
    """Keys an Enrolment Target fetched from the MEF, by KeID; bounded in size and age.

    ``lookup`` is safe to call from many threads (and from inside a TLS-PSK callback). A KeID the cache does
    not hold costs a MEF fetch only when: no fetch of it is already running (one per KeID at a time; others
    wait for its result), the MEF did not refuse it in the last ``negative_ttl`` seconds, fewer than
    ``max_pending`` KeIDs are pending, and the source address and the whole cache still have budget for a
    failed fetch (a fetch that yields a key is free). At most ``max_in_flight`` fetches run at once.
    A key is kept until its lifetime ends or ``max_age`` seconds pass, whichever is first; at most
    ``max_entries`` keys are kept (least recently used dropped first). Every refusal is logged with the KeID
    and the reason, rate-limited (:class:`rspf.ratelimit.RefusalLog`).
    """

    def __init__(self, *, mef_host: str, mef_port: int, mef_fqdn: str, psk_identity: str, psk: Secret,
                 origin: str, suid: int = keys.SUID_RSPF_SAEF, limits: KeyCacheLimits | None = None,
                 tls_client: PskClient | None = None, clock: Clock = time.time) -> None:
        self.mef_host, self.mef_port, self.mef_fqdn = mef_host, mef_port, mef_fqdn.lower()
        self._psk_identity, self._psk = psk_identity, psk
        self.origin, self.suid = origin, suid
        self.limits = lim = limits or KeyCacheLimits()
        self._clock = clock
        self._tls = tls_client or PskClient()
        self._lock = threading.Lock()
        self._in_flight: dict[str, _InFlight] = {}  # per-KeID locks of pending lookups (at most max_pending)
        self._fetch_slots = threading.BoundedSemaphore(lim.max_in_flight)
        self._entries: OrderedDict[str, tuple[FetchedCredential, float]] = OrderedDict()
        self._refused: OrderedDict[str, float] = OrderedDict()
        self._revoked: OrderedDict[str, None] = OrderedDict()
        self._budget = FetchBudget(source_rate=lim.source_rate, source_burst=lim.source_burst,
                                   global_rate=lim.global_rate, global_burst=lim.global_burst,
                                   max_sources=lim.max_sources, clock=clock)
        self._refusals = RefusalLog(log, burst=lim.log_burst, interval=lim.log_interval, clock=clock)
        self._pool = MefConnections(self._connect, size=lim.pool_size, idle_limit=lim.pool_idle)
        self.fetches = 0  # MEF requests made (successful or not)
        self.hits = self.misses = 0  # lookups answered from the cache, and not (counted under _lock)

    def __repr__(self) -> str:
        return f"<KeyCache mef={self.mef_fqdn} entries={len(self._entries)}>"

    def sizes(self) -> dict[str, int]:
        """How many entries each bounded structure holds (for tests and monitoring)."""
        return {"keys": len(self._entries), "refused": len(self._refused), "in_flight": len(self._in_flight),
                "sources": len(self._budget), "pool": len(self._pool)}

    def _connect(self) -> OneM2MClient:
        tls = self._tls.connect(self.mef_host, self.mef_port, self._psk_identity, self._psk,
                                server_name=self.mef_fqdn, timeout=self.limits.timeout)
        return OneM2MClient(tls, self.origin, host=self.mef_fqdn, deadline=self.limits.timeout)

    def _fetch(self, ke_id: str) -> FetchedCredential:
        """One fetchCredentials request to the MEF (the test seam: a stand-in MEF overrides this)."""
        def request(client: OneM2MClient) -> FetchedCredential:
            client.originator = self.origin
            return request_credentials(client, ke_id, self.suid)

        return self._pool.run(request)

    def close(self) -> None:
        self._pool.close()

    def revocation_page(self, after: int | None) -> protocol.RevocationPage:
        """One answer of the MEF's revocation feed (docs/mef-interface.md) on a pooled connection."""
        def request(client: OneM2MClient) -> protocol.RevocationPage:
            client.originator = self.origin
            return protocol.parse_revocations_response(client.call("GET", protocol.revocations_path(after)))

        return self._pool.run(request)

    def revoke(self, ke_ids: Iterable[str]) -> int:
        """Forget the keys of ``ke_ids`` and refuse them from now on, also when a fetch of one that was running
        ends later. Returns how many keys were held."""
        dropped = 0
        with self._lock:
            for ke_id in ke_ids:
                if self._entries.pop(ke_id, None) is not None:
                    dropped += 1
                self._revoked.pop(ke_id, None)
                self._revoked[ke_id] = None
                while len(self._revoked) > self.limits.max_revoked:
                    self._revoked.popitem(last=False)
        return dropped

    def is_revoked(self, ke_id: str) -> bool:
        with self._lock:
            return ke_id in self._revoked

    def flush(self) -> int:
        """Forget every key (the revocation feed lost track: each key is fetched again, and so re-checked)."""
        with self._lock:
            n = len(self._entries)
            self._entries.clear()
        return n

    def is_mef_key_id(self, identity: str) -> bool:
        try:
            _rel, fqdn = keys.parse_ke_id(identity)
        except BadRequest:
            return False
        return fqdn.lower() == self.mef_fqdn

    def cached(self, ke_id: str, *, count: bool = False) -> FetchedCredential | None:
        """The key held for ``ke_id``, or None; ``count``: a lookup, counted as a hit or a miss."""
        with self._lock:
            entry = self._entries.get(ke_id)
            if entry is not None and entry[1] <= self._clock():
                del self._entries[ke_id]
                entry = None
            if count:
                if entry is None:
                    self.misses += 1
                else:
                    self.hits += 1
            if entry is None:
                return None
            self._entries.move_to_end(ke_id)
            return entry[0]

    def _recently_refused(self, ke_id: str) -> bool:
        with self._lock:
            now = self._clock()
            while self._refused and next(iter(self._refused.values())) <= now:
                self._refused.popitem(last=False)  # same TTL for all: the oldest expire first
            return ke_id in self._refused

    def _remember_refusal(self, ke_id: str) -> None:
        with self._lock:
            self._refused.pop(ke_id, None)
            self._refused[ke_id] = self._clock() + self.limits.negative_ttl
            while len(self._refused) > self.limits.max_negative:
                self._refused.popitem(last=False)

    def _store(self, ke_id: str, cred: FetchedCredential) -> bool:
        """Keep a fetched key; False (not kept) when it was revoked while the fetch ran."""
        now = self._clock()
        expires = cred.expires_at or now
        with self._lock:
            if ke_id in self._revoked:
                return False
            self._entries[ke_id] = (cred, min(expires, now + self.limits.max_age))
            self._entries.move_to_end(ke_id)
            while len(self._entries) > self.limits.max_entries:
                self._entries.popitem(last=False)
        return True

    def _enter(self, ke_id: str) -> _InFlight | None:
        with self._lock:
            slot = self._in_flight.get(ke_id)
            if slot is None:
                if len(self._in_flight) >= self.limits.max_pending:
                    return None
                slot = self._in_flight[ke_id] = _InFlight(threading.Lock())
            slot.users += 1
            return slot

    def _leave(self, ke_id: str, slot: _InFlight) -> None:
        with self._lock:
            slot.users -= 1
            if slot.users == 0:
                del self._in_flight[ke_id]

    def lookup(self, ke_id: str, source: str | None = None) -> tuple[FetchedCredential | None, bool]:
        """(credential, fetched_now) for a presented psk_identity; None when there is no key to use.

        ``source`` is the client's IP address: MEF fetches are budgeted per source (None: only the global
        budget applies).
        """
        if not self.is_mef_key_id(ke_id):
            self._refusals.refused("TLS-PSK identity %r from %s refused: not a KeID of MEF %s", ke_id[:140],
                                   source or "?", self.mef_fqdn)
            return None, False
        ke_id = keys.normalise_ke_id(ke_id)
        known = self._known(ke_id, source, count=True)
        if known is not None:
            return known
        slot = self._enter(ke_id)
        if slot is None:
            self._refusals.refused("KeID %s from %s refused: %d KeIDs are already waiting for the MEF",
                                   ke_id, source or "?", self.limits.max_pending)
            return None, False
        try:
            if not slot.lock.acquire(timeout=2 * self.limits.timeout):
                self._refusals.refused("KeID %s from %s refused: the fetch already running for it did not end",
                                       ke_id, source or "?")
                return None, False
            try:
                return self._lookup_locked(ke_id, source)
            finally:
                slot.lock.release()
        finally:
            self._leave(ke_id, slot)

    def _known(self, ke_id: str, source: str | None,
               count: bool = False) -> tuple[FetchedCredential | None, bool] | None:
        """What the cache already knows of ``ke_id``: its key, or a refusal the MEF gave recently; None if nothing.
        ``count``: count the lookup as a cache hit or miss."""
        hit = self.cached(ke_id, count=count)
        if hit:
            return hit, False
        if self.is_revoked(ke_id):
            self._refusals.refused("KeID %s from %s refused: the MEF revoked it", ke_id, source or "?")
            return None, False
        if self._recently_refused(ke_id):
            self._refusals.refused("KeID %s from %s refused: the MEF refused it less than %g s ago", ke_id,
                                   source or "?", self.limits.negative_ttl)
            return None, False
        return None

    def _lookup_locked(self, ke_id: str, source: str | None) -> tuple[FetchedCredential | None, bool]:
        known = self._known(ke_id, source)  # fetched or refused meanwhile, by the thread we waited for
        if known is not None:
            return known
        exhausted = self._budget.allowed(source)
        if exhausted:
            budget = f"source {source}" if exhausted == "source" else "all sources together"
            self._refusals.refused("KeID %s from %s refused: rate-limited (the budget of failed MEF fetches of %s "
                                   "is spent)", ke_id, source or "?", budget)
            return None, False
        if not self._fetch_slots.acquire(timeout=self.limits.timeout):
            self._refusals.refused("KeID %s from %s refused: %d MEF fetches were running for %g s", ke_id,
                                   source or "?", self.limits.max_in_flight, self.limits.timeout)
            return None, False
        try:
            with self._lock:
                self.fetches += 1
            cred = self._fetch(ke_id)
        except RemoteError as exc:
            self._budget.charge(source)
            self._remember_refusal(ke_id)
            self._refusals.refused("KeID %s from %s refused: the MEF answered %d: %s", ke_id, source or "?",
                                   exc.remote_rsc, exc)
            return None, False
        except TransportError as exc:  # not remembered: the key is fetched as soon as the MEF is back
            self._budget.charge(source)
            self._refusals.refused("KeID %s from %s refused: the MEF at %s:%d is unreachable: %s", ke_id,
                                   source or "?", self.mef_host, self.mef_port, exc)
            return None, False
        except RspfError as exc:
            self._budget.charge(source)
            self._remember_refusal(ke_id)
            self._refusals.refused("KeID %s from %s refused: %s", ke_id, source or "?", exc)
            return None, False
        finally:
            self._fetch_slots.release()
        if not self._store(ke_id, cred):
            self._refusals.refused("KeID %s from %s refused: the MEF revoked it while it was fetched", ke_id,
                                   source or "?")
            return None, False
        return cred, True


class RevocationFollower:
    """Follows the MEF's revocation feed (docs/mef-interface.md), so a revoked or expired KeID stops working at
    this Target within seconds: each :meth:`step` reads what was revoked since the last one and hands it to
    ``on_revoked``; ``on_gap`` is called when the follower cannot know everything it missed (the MEF pruned
    past its position, or its log restarted), and should forget every key so each is fetched, and so checked,
    again. Returns the seconds to wait before the next step: ``interval``, or a growing backoff while the MEF
    is unreachable (then the key cache's age limit, ``keyCacheSeconds``, is what bounds a revoked key's use).
    """

    #: Pages read in one step at most (a feed that never says "complete" cannot hold the follower).
    MAX_PAGES = 64

    def __init__(self, fetch_page: Callable[[int | None], protocol.RevocationPage],
                 on_revoked: Callable[[list[protocol.Revocation]], None], on_gap: Callable[[], None], *,
                 interval: float = 2.0, backoff: Backoff = Backoff(first=1.0, ceiling=30.0),
                 draw: Callable[[], float] = random.random, warn: Callable[[str], None] = log.warning,
                 info: Callable[[str], None] = log.info, position: int | None = None) -> None:
        self._fetch, self._on_revoked, self._on_gap = fetch_page, on_revoked, on_gap
        self.interval, self.backoff, self._draw, self._warn, self._info = interval, backoff, draw, warn, info
        #: the newest sequence number applied here; given at start (a position saved before a restart), the
        #: follower goes on from it: what was revoked meanwhile is applied, as long as the MEF still has it
        self.position = position
        self.failures = 0
        self.last_error = ""
        self._read_at: float | None = None  # time.monotonic() of the last whole read

    def seconds_since_read(self) -> float | None:
        """Seconds since the feed was last read whole; None before the first read."""
        return None if self._read_at is None else time.monotonic() - self._read_at

    def step(self) -> float:
        try:
            for _ in range(self.MAX_PAGES):
                page = self._fetch(self.position)
                if self.position is None or page.gap or page.last < self.position:
                    # first contact (keys fetched before it were never checked against the feed), items
                    # pruned before this follower read them, or the MEF's log restarted: start afresh
                    self._on_gap()
                    if self.position is not None:
                        self._info(f"revocation feed: lost track at position {self.position} (the MEF is at "
                                   f"{page.last}); every key held here is fetched again")
                if page.items:
                    self._on_revoked(list(page.items))
                if page.complete:
                    self.position = page.last
                    break
                if not page.items:
                    raise BadRequest("the MEF's revocation feed said more items follow but sent none")
                self.position = page.items[-1].seq
        except RspfError as exc:
            self.failures += 1
            self.last_error = str(exc)
            delay = self.backoff.delay(self.failures, self._draw())
            self._warn(f"revocation feed: the MEF could not be read ({exc}); attempt {self.failures}, retrying in "
                       f"{delay:.1f} s; until then a revoked key stays usable here for at most the key cache's "
                       "age limit")
            return delay
        self._read_at = time.monotonic()
        if self.failures:
            self._info(f"revocation feed: the MEF answers again after {self.failures} failed attempt(s)")
            self.failures = 0
        return self.interval


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class RevokedCertificates:
    """SHA-256 fingerprints (rspf.est.fingerprint) of MEF-issued certificates the revocation feed named: a
    certificate cannot be asked about at the MEF the way a key is fetched, so the CSE keeps what the feed said,
    in a 0600 file (one fingerprint per line), at most ``limit`` of them (the oldest go first)."""

    def __init__(self, path: Path, limit: int = 100_000) -> None:
        self.path, self.limit = Path(path), limit
        self._lock = threading.Lock()
        self._seen: OrderedDict[str, None] = OrderedDict()
        if self.path.exists():
            check_private(self.path, "the revoked-certificates file")
            for line in self.path.read_text(encoding="ascii", errors="replace").split():
                if _SHA256_HEX.fullmatch(line):
                    self._seen[line] = None
            while len(self._seen) > limit:
                self._seen.popitem(last=False)

    def __contains__(self, sha256: object) -> bool:
        return sha256 in self._seen

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, fingerprints: Iterable[str]) -> None:
        with self._lock:
            for sha in fingerprints:
                self._seen[sha] = None
                self._seen.move_to_end(sha)
            while len(self._seen) > self.limit:
                self._seen.popitem(last=False)
            write_private(self.path, "".join(f"{sha}\n" for sha in self._seen).encode("ascii"))
