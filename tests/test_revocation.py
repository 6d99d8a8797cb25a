"""Revocation at the Enrolment Target: the feed's wire format (rspf.mef.protocol), the key cache forgetting a
revoked KeID (also when its fetch was still running), the follower's steps against a stand-in feed that pages,
prunes, restarts and fails, and the secure listener closing the connections of a revoked credential."""

from __future__ import annotations

import threading

import pytest
from test_keycache import LEGIT, MEF_FQDN, Clock, StandInCache

from rspf.errors import BadRequest, RemoteError, TransportError
from rspf.mef import protocol as p
from rspf.ratelimit import Backoff
from rspf.target import KeyCacheLimits, RevocationFollower

OTHER = "fedcba9876543210fedcba9876543210@" + MEF_FQDN


# -- wire format ----------------------------------------------------------------------------------
def test_revocation_paths() -> None:
    assert p.revocations_path() == "/revocations" and p.parse_revocations_path("/revocations") is None
    assert p.parse_revocations_path(p.revocations_path(42)) == 42
    assert p.is_revocations_path("/revocations/7") and not p.is_revocations_path("/revocationsX")
    with pytest.raises(BadRequest):
        p.revocations_path(-1)


@pytest.mark.parametrize("path", ["/revocations/", "/revocations/-1", "/revocations/1x", "/revocations/1/2",
                                  "/revocations/" + "9" * 19])
def test_malformed_revocation_paths_are_refused(path: str) -> None:
    with pytest.raises(BadRequest, match="sequence number"):
        p.parse_revocations_path(path)


def test_revocation_page_round_trip_normalises_keids() -> None:
    page = p.RevocationPage(9, (p.Revocation(3, LEGIT.upper().replace("@" + MEF_FQDN.upper(), "@" + MEF_FQDN),
                                             "key-revoked"), p.Revocation(9, OTHER, "retired")), True, False)
    got = p.parse_revocations_response(p.revocations_response(page))
    assert got.last == 9 and got.complete and not got.gap
    assert [(r.seq, r.ke_id, r.cause) for r in got.items] == [(3, LEGIT, "key-revoked"), (9, OTHER, "retired")]


def _answer(**over: object) -> dict:
    rsp = {"last": 5, "complete": True, "gap": False, "items": [{"seq": 4, "keID": LEGIT, "cause": "retired"}]}
    rsp.update(over)
    return {p.REVS: rsp}


@pytest.mark.parametrize("data", [
    None, {}, {p.REVS: []},
    _answer(last=-1), _answer(last=True), _answer(complete="yes"), _answer(gap=None), _answer(items={}),
    _answer(items=[{"seq": 6, "keID": LEGIT, "cause": "retired"}]),          # beyond ``last``
    _answer(items=[{"seq": 4, "keID": LEGIT, "cause": "retired"}] * 2),      # not increasing
    _answer(items=[{"seq": 4, "keID": "not-a-keid", "cause": "retired"}]),
    _answer(items=[{"seq": 4, "keID": LEGIT, "cause": "x" * 33}]),
    _answer(items=[{"seq": i, "keID": LEGIT, "cause": "retired"} for i in range(1, 258)], last=300),
])
def test_malformed_feed_answers_are_refused(data: object) -> None:
    with pytest.raises(BadRequest):
        p.parse_revocations_response(data)


# -- the key cache --------------------------------------------------------------------------------
def test_a_revoked_keid_is_dropped_and_refused_without_asking_the_mef() -> None:
    cache = StandInCache(KeyCacheLimits(), Clock())
    assert cache.lookup(LEGIT, "127.0.0.2")[0] is not None
    assert cache.revoke({LEGIT, OTHER}) == 1  # one of the two was held
    assert cache.cached(LEGIT) is None and cache.is_revoked(LEGIT)
    calls = len(cache.calls)
    assert cache.lookup(LEGIT, "127.0.0.2") == (None, False)
    assert len(cache.calls) == calls  # no MEF request for a KeID the feed revoked


def test_a_fetch_running_when_its_keid_is_revoked_is_discarded() -> None:
    cache = StandInCache(KeyCacheLimits(), Clock())
    cache.gate = threading.Event()
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(cache.lookup(LEGIT, "127.0.0.2")))
    t.start()
    while not cache.calls:  # the fetch is running (held at the gate)
        threading.Event().wait(0.001)
    cache.revoke([LEGIT])
    cache.gate.set()
    t.join(10)
    assert result == [(None, False)] and cache.cached(LEGIT) is None


def test_revoked_keids_remembered_are_bounded_and_flush_forgets_every_key() -> None:
    cache = StandInCache(KeyCacheLimits(max_revoked=3), Clock())
    cache.lookup(LEGIT, None)
    cache.revoke([f"{i:032x}@{MEF_FQDN}" for i in range(10)])
    assert len(cache._revoked) == 3
    assert cache.flush() == 1 and cache.cached(LEGIT) is None
    assert cache.lookup(LEGIT, None)[0] is not None  # not revoked: fetched again


# -- the follower ---------------------------------------------------------------------------------
class Feed:
    """A stand-in MEF feed: ``log`` of (seq, KeID, cause); ``pruned_below`` rows were deleted."""

    def __init__(self) -> None:
        self.log: list[p.Revocation] = []
        self.newest = 0
        self.pruned_below = 1
        self.page_size = 2
        self.fail: Exception | None = None
        self.asked: list[int | None] = []

    def add(self, ke_id: str, cause: str = "key-revoked") -> None:
        self.newest += 1
        self.log.append(p.Revocation(self.newest, ke_id, cause))

    def __call__(self, after: int | None) -> p.RevocationPage:
        self.asked.append(after)
        if self.fail is not None:
            raise self.fail
        if after is None:
            return p.RevocationPage(self.newest, (), True, False)
        rows = [r for r in self.log if r.seq > after and r.seq >= self.pruned_below][:self.page_size]
        gap = after < self.newest and (not rows or rows[0].seq > after + 1)
        complete = not rows or rows[-1].seq >= self.newest
        return p.RevocationPage(self.newest, tuple(rows), complete, gap)


class Recorder:
    def __init__(self) -> None:
        self.revoked: list[str] = []
        self.gaps = 0
        self.warnings: list[str] = []
        self.infos: list[str] = []

    def follower(self, feed: Feed) -> RevocationFollower:
        return RevocationFollower(feed, lambda items: self.revoked.extend(i.ke_id for i in items), self.gap,
                                  interval=2.0, backoff=Backoff(first=1.0, ceiling=8.0), draw=lambda: 1.0,
                                  warn=self.warnings.append, info=self.infos.append)

    def gap(self) -> None:
        self.gaps += 1


def test_follower_starts_at_the_feeds_position_then_applies_every_page() -> None:
    feed, rec = Feed(), Recorder()
    feed.add(OTHER)  # revoked before this Target followed: nothing of it is cached here
    f = rec.follower(feed)
    assert f.step() == 2.0 and f.position == 1 and rec.revoked == [] and rec.gaps == 1
    for i in range(5):
        feed.add(f"{i:032x}@{MEF_FQDN}")
    assert f.step() == 2.0
    assert rec.revoked == [f"{i:032x}@{MEF_FQDN}" for i in range(5)] and f.position == 6
    assert feed.asked[-3:] == [1, 3, 5]  # three pages of two
    assert f.step() == 2.0 and len(rec.revoked) == 5 and rec.gaps == 1  # nothing new: nothing applied twice


def test_follower_that_fell_behind_pruning_starts_afresh() -> None:
    feed, rec = Feed(), Recorder()
    f = rec.follower(feed)
    f.step()
    for i in range(6):
        feed.add(f"{i:032x}@{MEF_FQDN}")
    feed.pruned_below = 4  # rows 1-3 are gone before the follower read them
    feed.page_size = 10
    f.step()
    assert rec.gaps == 2 and f.position == 6
    assert rec.revoked == [f"{i:032x}@{MEF_FQDN}" for i in (3, 4, 5)]  # what is still there is applied too
    assert any("lost track" in m for m in rec.infos)


def test_follower_notices_a_feed_that_restarted() -> None:
    feed, rec = Feed(), Recorder()
    for _ in range(5):
        feed.add(OTHER)
    f = rec.follower(feed)
    f.step()
    feed.log, feed.newest = [], 0  # the MEF's database was replaced by an empty one
    f.step()
    assert rec.gaps == 2 and f.position == 0


def test_follower_backs_off_while_the_mef_fails_and_recovers() -> None:
    feed, rec = Feed(), Recorder()
    f = rec.follower(feed)
    f.step()
    feed.fail = TransportError("the MEF at 127.0.0.1:1 did not answer")
    assert [f.step() for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert len(rec.warnings) == 5 and "age limit" in rec.warnings[0] and "did not answer" in rec.warnings[0]
    feed.fail = RemoteError(4004, "the MEF has no resource '/revocations/0'")
    assert f.step() == 8.0
    feed.fail = None
    feed.add(LEGIT)
    assert f.step() == 2.0 and rec.revoked == [LEGIT] and f.failures == 0
    assert any("answers again" in m for m in rec.infos)


def test_a_feed_that_never_completes_cannot_hold_the_follower() -> None:
    rec = Recorder()

    def endless(after: int | None) -> p.RevocationPage:
        return p.RevocationPage(10**9, (), False, False) if after is not None else p.RevocationPage(0, (), True,
                                                                                                    False)

    f = rec.follower(endless)  # type: ignore[arg-type]
    f.step()
    assert f.step() == 1.0 and "more items follow but sent none" in rec.warnings[0]


def test_follower_reports_how_long_ago_it_read_the_feed_and_its_failures() -> None:
    feed, rec = Feed(), Recorder()
    f = rec.follower(feed)
    assert f.seconds_since_read() is None and f.failures == 0  # never read: the health endpoint says so
    f.step()
    since = f.seconds_since_read()
    assert since is not None and 0 <= since < 5
    feed.fail = TransportError("the MEF at 127.0.0.1:1 is unreachable")
    f.step()
    f.step()
    assert f.failures == 2 and "unreachable" in f.last_error
    assert f.seconds_since_read() >= since  # a failed read does not count as a read
    feed.fail = None
    f.step()
    assert f.failures == 0 and f.seconds_since_read() < 5


# -- the plugin's side (no ACME running: a stand-in listener and rule store) ----------------------
class StandInListener:
    """What the plugin's secure listener offers it: closing connections by credential."""

    def __init__(self, conns: list[tuple[str | None, object]]) -> None:
        self.conns = conns

    def close_credentials(self, predicate) -> int:  # type: ignore[no-untyped-def]
        closing = [c for c in self.conns if predicate(*c)]
        self.conns = [c for c in self.conns if c not in closing]
        return len(closing)


@pytest.fixture(autouse=True)
def _an_in_cse(monkeypatch: pytest.MonkeyPatch) -> None:
    from rspf.acme import host

    monkeypatch.setattr(host, "is_in_cse", lambda: True)  # where the rules live (see the MN-CSE test below)


def plugin_with_listener(conns: list[tuple[str | None, object]]):  # type: ignore[no-untyped-def]
    from rspf.acme.plugin import RspfSecurityPlugin

    plugin = RspfSecurityPlugin()
    plugin.listener = StandInListener(conns)  # type: ignore[assignment]
    plugin.keycache = StandInCache(KeyCacheLimits(), Clock())
    forgotten: list[str] = []
    plugin.forget_credential = lambda cid: forgotten.append(cid) or True  # type: ignore[method-assign]
    return plugin, forgotten


def test_the_plugin_closes_expired_credentials_and_drops_their_rules() -> None:
    import time

    from rspf.wsgi import PeerCredential

    old = PeerCredential("psk", LEGIT, "12-" + LEGIT, "Cae1", time.time() - 1)
    live = PeerCredential("psk", OTHER, "12-" + OTHER, "Cae2", time.time() + 3600)
    unopened = (LEGIT, None)  # no request yet: its credential is not known to the listener
    plugin, forgotten = plugin_with_listener([(LEGIT, old), (OTHER, live), unopened])
    plugin._close_expired()
    assert plugin.listener.conns == [(OTHER, live), unopened]  # type: ignore[union-attr]
    assert forgotten == ["12-" + LEGIT]


def test_the_plugin_applies_revocations_to_keys_connections_and_rules() -> None:
    plugin, forgotten = plugin_with_listener([(LEGIT.upper().replace(MEF_FQDN.upper(), MEF_FQDN), None),
                                        (OTHER, None), ("not a keid", None)])
    assert plugin.keycache is not None and plugin.keycache.lookup(LEGIT, None)[0] is not None
    plugin._revoked([p.Revocation(7, LEGIT, "key-revoked")])
    assert plugin.keycache.cached(LEGIT) is None and plugin.keycache.is_revoked(LEGIT)
    assert [c[0] for c in plugin.listener.conns] == [OTHER, "not a keid"]  # type: ignore[union-attr]  # any spelling
    assert forgotten == ["12-" + LEGIT]
    plugin._lost_track()
    assert plugin.listener.conns == []  # type: ignore[union-attr]  # every TLS-PSK connection is checked again


def test_an_mn_cse_leaves_the_rule_to_the_in_cse_which_follows_the_same_feed(monkeypatch) -> None:
    """No request to the IN-CSE per revocation (most are for credentials this MN-CSE never saw): the IN-CSE
    removes the rule itself; the MN-CSE forgets that it recorded it, so it records it again if need be."""
    from rspf.acme import host

    monkeypatch.setattr(host, "is_in_cse", lambda: False)
    plugin, forgotten = plugin_with_listener([(LEGIT, None)])
    plugin._recorded["12-" + LEGIT] = object()  # type: ignore[assignment]
    plugin._revoked([p.Revocation(7, LEGIT, "key-revoked")])
    assert forgotten == [] and "12-" + LEGIT not in plugin._recorded
    assert plugin.listener.conns == []  # type: ignore[union-attr]  # its connections close all the same


def test_a_follower_started_from_a_kept_position_applies_what_it_missed_without_starting_afresh() -> None:
    feed, rec = Feed(), Recorder()
    feed.add(OTHER)   # seq 1: applied before the restart
    feed.add(LEGIT)   # seq 2: revoked while this Target was down
    f = RevocationFollower(feed, lambda items: rec.revoked.extend(i.ke_id for i in items), rec.gap, position=1)
    assert f.step() == 2.0
    assert rec.revoked == [LEGIT] and rec.gaps == 0 and f.position == 2 and feed.asked == [1]
