"""The Enrolment Target's key cache (rspf.target.KeyCache) under a flood of made-up KeIDs, with a stand-in MEF
(``_fetch`` overridden) and an injected clock: bounds, budgets, negative caching, LRU, one fetch per KeID,
and the refusal log. The same against a real MEF and ACME is bench/bench_flood.py."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable

import pytest

from rspf.client import OneM2MClient
from rspf.errors import RemoteError, TransportError
from rspf.secret import Secret
from rspf.target import FetchedCredential, KeyCache, KeyCacheLimits, MefConnections

MEF_FQDN = "mef.example.com"
KEY = bytes(range(32))
LEGIT = "0123456789abcdef0123456789abcdef@" + MEF_FQDN


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


class StandInCache(KeyCache):
    """A KeyCache whose MEF knows only ``known`` KeIDs; records every fetch."""

    def __init__(self, limits: KeyCacheLimits, clock: Clock, known: set[str] = frozenset({LEGIT}),  # type: ignore[assignment]
                 fail: Callable[[str], Exception | None] = lambda _k: None) -> None:
        super().__init__(mef_host="127.0.0.1", mef_port=1, mef_fqdn=MEF_FQDN, psk_identity="t@" + MEF_FQDN,
                         psk=Secret(bytes(32), "psk"), origin="/id-in", limits=limits, clock=clock,
                         tls_client=object())  # type: ignore[arg-type]  # never connects: _fetch is replaced
        self.known, self.fail, self.calls = known, fail, []
        self.gate: threading.Event | None = None

    def _fetch(self, ke_id: str) -> FetchedCredential:
        self.calls.append(ke_id)
        if self.gate is not None:
            self.gate.wait(10)
        exc = self.fail(ke_id)
        if exc is not None:
            raise exc
        if ke_id not in self.known:
            raise RemoteError(4004, "no live Enrolment Key has this KeID (unknown, expired or revoked)")
        return FetchedCredential(Secret(KEY, "usage-constrained key"), "Cae1", "20991231T000000")


def made_up() -> str:
    return f"{secrets.token_hex(16)}@{MEF_FQDN}"


def test_a_flood_of_made_up_keids_costs_bounded_memory_and_mef_calls() -> None:
    clock = Clock()
    lim = KeyCacheLimits(max_negative=1000, max_sources=2)
    cache = StandInCache(lim, clock)
    sources = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    peak = dict.fromkeys(cache.sizes(), 0)
    for i in range(10_000):
        clock.t += 0.01  # 10,000 handshakes in 100 s
        cred, _ = cache.lookup(made_up(), sources[i % 3])
        assert cred is None
        peak = {k: max(v, cache.sizes()[k]) for k, v in cache.sizes().items()}
    assert peak["keys"] == 0 and peak["refused"] <= lim.max_negative and peak["sources"] <= lim.max_sources
    assert peak["in_flight"] <= 1
    # three sources, each 10 at once + 0.5/s (sources dropped from the LRU start afresh: still far below 1,000),
    # and the global bucket: 50 + 5/s over 100 s = 550 at most
    assert len(cache.calls) < 1000 and len(cache.calls) <= lim.global_burst + lim.global_rate * 100 + 1
    assert cache.fetches == len(cache.calls)


def test_a_legitimate_keid_from_another_source_is_fetched_at_once_during_a_flood() -> None:
    clock = Clock()
    cache = StandInCache(KeyCacheLimits(), clock)
    for _ in range(500):  # one source spends its whole budget
        clock.t += 0.001
        cache.lookup(made_up(), "127.0.0.2")
    assert cache.lookup(made_up(), "127.0.0.2")[0] is None and cache.calls[-1] != LEGIT  # refused: rate-limited
    cred, fetched = cache.lookup(LEGIT, "127.0.0.9")
    assert cred is not None and fetched and cred.key.reveal() == KEY and cache.calls[-1] == LEGIT
    assert cache.lookup(LEGIT, "127.0.0.2") == (cred, False)  # cached: no budget needed, even from the flooder


def test_the_global_budget_bounds_many_sources() -> None:
    clock = Clock()
    lim = KeyCacheLimits(global_burst=20, global_rate=1.0)
    cache = StandInCache(lim, clock)
    for i in range(1000):  # 1,000 different addresses, each with a fresh budget, in one instant
        cache.lookup(made_up(), f"10.0.{i // 250}.{i % 250}")
    assert len(cache.calls) == 20


def test_a_refusal_is_remembered_for_negative_ttl_then_asked_again() -> None:
    clock = Clock()
    cache = StandInCache(KeyCacheLimits(negative_ttl=30), clock)
    unknown = made_up()
    assert cache.lookup(unknown, "127.0.0.2") == (None, False)
    clock.t += 29
    assert cache.lookup(unknown, "127.0.0.2") == (None, False)
    assert cache.calls == [unknown]
    clock.t += 2
    cache.lookup(unknown, "127.0.0.2")
    assert cache.calls == [unknown, unknown] and cache.sizes()["refused"] == 1


def test_an_unreachable_mef_is_not_remembered_as_a_refusal() -> None:
    clock = Clock()
    down = [True]
    cache = StandInCache(KeyCacheLimits(), clock, fail=lambda _k: TransportError("connection refused") if down[0]
                         else None)
    assert cache.lookup(LEGIT, "127.0.0.2") == (None, False)
    down[0] = False
    cred, fetched = cache.lookup(LEGIT, "127.0.0.2")  # the MEF is back: fetched at once
    assert cred is not None and fetched and cache.calls == [LEGIT, LEGIT]


def test_keys_are_evicted_least_recently_used_first_and_expire_after_max_age() -> None:
    clock = Clock()
    ids = [made_up() for _ in range(4)]
    cache = StandInCache(KeyCacheLimits(max_entries=3, max_age=300), clock, known=set(ids))
    for k in ids[:3]:
        cache.lookup(k, "127.0.0.2")
    cache.lookup(ids[0], "127.0.0.2")  # ids[0] used again: ids[1] is now the least recently used
    cache.lookup(ids[3], "127.0.0.2")
    assert cache.sizes()["keys"] == 3 and cache.cached(ids[1]) is None
    assert all(cache.cached(k) is not None for k in (ids[0], ids[2], ids[3]))
    clock.t += 301
    assert cache.cached(ids[0]) is None and cache.lookup(ids[0], "127.0.0.2")[1] is True  # fetched again


def test_one_fetch_per_keid_at_a_time() -> None:
    cache = StandInCache(KeyCacheLimits(), Clock())
    cache.gate = threading.Event()
    results: list[tuple[FetchedCredential | None, bool]] = []
    threads = [threading.Thread(target=lambda: results.append(cache.lookup(LEGIT, "127.0.0.2"))) for _ in range(8)]
    for t in threads:
        t.start()
    while not cache.calls:  # the first one is inside the (held) MEF fetch
        threading.Event().wait(0.005)
    cache.gate.set()
    for t in threads:
        t.join(10)
    assert cache.calls == [LEGIT]
    assert len(results) == 8 and all(c is not None for c, _ in results) and sum(f for _, f in results) == 1
    assert cache.sizes()["in_flight"] == 0


def test_mef_fetches_run_at_most_max_in_flight_at_once_and_the_others_wait() -> None:
    ids = [made_up() for _ in range(3)]
    cache = StandInCache(KeyCacheLimits(max_in_flight=2), Clock(), known=set(ids))
    cache.gate = threading.Event()
    results: list[tuple[FetchedCredential | None, bool]] = []
    threads = [threading.Thread(target=lambda k=k: results.append(cache.lookup(k, "127.0.0.2"))) for k in ids]
    for t in threads:
        t.start()
    while len(cache.calls) < 2:
        threading.Event().wait(0.005)
    assert len(cache.calls) == 2 and not results  # the third waits for a slot: neither fetched nor refused
    cache.gate.set()
    for t in threads:
        t.join(10)
    assert len(results) == 3 and all(c is not None for c, _ in results) and sorted(cache.calls) == sorted(ids)


def test_pending_keids_are_bounded() -> None:
    cache = StandInCache(KeyCacheLimits(max_pending=2), Clock())
    cache.gate = threading.Event()
    slow = [threading.Thread(target=cache.lookup, args=(made_up(), "127.0.0.2")) for _ in range(2)]
    for t in slow:
        t.start()
    while len(cache.calls) < 2:
        threading.Event().wait(0.005)
    assert cache.lookup(LEGIT, "127.0.0.3") == (None, False)  # refused at once: two KeIDs already pending
    assert cache.sizes()["in_flight"] == 2
    cache.gate.set()
    for t in slow:
        t.join(10)
    assert cache.lookup(LEGIT, "127.0.0.3")[0] is not None and cache.sizes()["in_flight"] == 0


def test_many_legitimate_aes_behind_one_address_all_connect_at_once() -> None:
    """Only failed fetches are paid for: 50 first contacts from one address (a NAT) all get their keys."""
    ids = [made_up() for _ in range(50)]
    cache = StandInCache(KeyCacheLimits(), Clock(), known=set(ids))
    cache.gate = threading.Event()
    results: list[tuple[FetchedCredential | None, bool]] = []
    threads = [threading.Thread(target=lambda k=k: results.append(cache.lookup(k, "127.0.0.2"))) for k in ids]
    for t in threads:
        t.start()
    cache.gate.set()
    for t in threads:
        t.join(10)
    assert len(results) == 50 and all(c is not None for c, _ in results) and len(cache.calls) == 50
    assert cache.lookup(made_up(), "127.0.0.2") == (None, False) and len(cache.calls) == 51  # budget untouched


def test_an_identity_of_another_mef_costs_nothing() -> None:
    cache = StandInCache(KeyCacheLimits(), Clock())
    assert cache.lookup("0" * 32 + "@mef.other.example", "127.0.0.2") == (None, False)
    assert cache.lookup("not-a-keid", "127.0.0.2") == (None, False)
    assert cache.calls == []


def test_refusals_are_logged_at_warning_with_reason_and_keid_and_a_flood_is_summarised(caplog) -> None:
    clock = Clock()
    lim = KeyCacheLimits(log_burst=5, log_interval=60)
    down = made_up()
    cache = StandInCache(lim, clock, fail=lambda k: TransportError("connection refused") if k == down else None)
    unknown = made_up()
    with caplog.at_level(logging.INFO, logger="rspf.target"):
        cache.lookup(unknown, "127.0.0.2")
        cache.lookup(down, "127.0.0.2")
        for _ in range(200):
            cache.lookup(made_up(), "127.0.0.2")  # the source's budget runs out: rate-limited
        clock.t += 61
        cache.lookup(made_up(), "127.0.0.5")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert unknown in warnings[0] and "the MEF answered 4004" in warnings[0] and "127.0.0.2" in warnings[0]
    assert down in warnings[1] and "unreachable" in warnings[1] and "connection refused" in warnings[1]
    assert any("rate-limited" in w for w in caplog.messages)
    assert len(warnings) == 5 + 1 + 1  # burst, the summary, then the first of the new interval
    assert "197 more refusals" in warnings[5]
    text = caplog.text
    assert KEY.hex() not in text and repr(KEY) not in text and "AAECAwQFBgc" not in text


class FakeClient:
    def __init__(self, name: str, fail: bool = False) -> None:
        self.name, self.fail, self.closed = name, fail, False
        self.last_used = 0.0
        self.reusable = True

    def close(self) -> None:
        self.closed, self.reusable = True, False


def pool_with(made: list[FakeClient], plan: list[bool], idle_limit: float = 10.0) -> MefConnections:
    def connect() -> OneM2MClient:
        c = FakeClient(f"c{len(made)}", plan.pop(0) if plan else False)
        made.append(c)
        return c  # type: ignore[return-value]

    return MefConnections(connect, size=4, idle_limit=idle_limit)


def use(client: FakeClient) -> str:
    client.last_used = time.monotonic()
    if client.fail:
        raise TransportError(f"{client.name}: the MEF closed the connection without an answer")
    return client.name


def test_a_stale_pooled_connection_is_retried_once_on_a_fresh_one() -> None:
    made: list[FakeClient] = []
    pool = pool_with(made, [False, False])
    assert pool.run(use) == "c0" and pool.run(use) == "c0"  # kept alive and reused
    made[0].fail = True  # the MEF closed both pooled connections meanwhile
    other = FakeClient("c-other", fail=True)
    other.last_used = time.monotonic()
    pool._give(other)  # taken first (last in); the retry must be a NEW connection, not the pooled c0
    assert pool.run(use) == "c1"
    assert other.closed and not made[0].closed and len(made) == 2 and not made[1].fail


def test_a_fresh_connection_that_fails_is_not_retried() -> None:
    made: list[FakeClient] = []
    pool = pool_with(made, [True, False])
    with pytest.raises(TransportError, match="without an answer"):
        pool.run(use)
    assert len(made) == 1 and made[0].closed


def test_a_connection_idle_too_long_is_discarded_not_reused() -> None:
    made: list[FakeClient] = []
    pool = pool_with(made, [], idle_limit=10.0)
    pool.run(use)
    made[0].last_used = time.monotonic() - 11
    assert pool.run(use) == "c1" and made[0].closed


def test_the_plugin_passes_the_peer_address_to_the_cache() -> None:
    from rspf.acme.plugin import RspfSecurityPlugin

    clock = Clock()
    cache = StandInCache(KeyCacheLimits(source_burst=1), clock)
    p = RspfSecurityPlugin()
    p.keycache = cache
    assert p._psk_lookup(made_up(), "127.0.0.2") is None  # the MEF refuses it: the address's one token is spent
    assert p._psk_lookup(made_up(), "127.0.0.2") is None and len(cache.calls) == 1  # rate-limited, not asked
    key = p._psk_lookup(LEGIT, "127.0.0.3")  # another address has its own budget
    assert key is not None and key.reveal() == KEY and cache.calls[-1] == LEGIT


def test_lookups_are_counted_as_hits_and_misses_once_each() -> None:
    cache = StandInCache(KeyCacheLimits(), Clock())
    assert (cache.hits, cache.misses, cache.fetches) == (0, 0, 0)
    assert cache.lookup(LEGIT, "10.0.0.1")[0] is not None  # a miss, fetched
    assert cache.lookup(LEGIT, "10.0.0.1")[0] is not None  # a hit
    assert cache.cached(LEGIT) is not None  # not a lookup: not counted
    assert cache.lookup(made_up(), "10.0.0.1")[0] is None  # a miss, refused by the MEF
    assert (cache.hits, cache.misses, cache.fetches) == (1, 2, 2)
