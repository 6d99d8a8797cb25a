"""rspf.mef.store_pg: several MEF instances on one PostgreSQL database (each test: two stores with pools of their
own on one fresh schema, as two `rspf mef serve` processes would be). Needs the test server
(integration/postgres.py)."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from integration.postgres import fresh_schema, require

from rspf.errors import AccessDenied, ConfigError, EnrolmentRateLimited, StoreError
from rspf.fileutil import new_key_file
from rspf.mef.store import EnroleeRecord
from rspf.mef.store_pg import PostgresStore, redact_url
from rspf.secret import Secret

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
KE = Secret(b"K" * 32, "Ke")


def rec(n: int) -> EnroleeRecord:
    return EnroleeRecord(kpm_id=f"dev{n}@mef.example.com", enrolee_id=f"/id-mn{n}", node_id=f"urn:dev:{n}",
                         registrar_cse_id="/id-in", registrar_uri="https://in.example.com/cse-in")


def ke(n: int) -> str:
    return f"{n:032x}@mef.example.com"


@pytest.fixture
def pair(tmp_path) -> Iterator[tuple[PostgresStore, PostgresStore]]:
    """Two instances on one schema, sharing one master key file (as the deployment docs say)."""
    with fresh_schema() as url:
        key = tmp_path / "mef.masterkey"
        a = PostgresStore(url, key, pool_size=8)
        b = PostgresStore(url, key, pool_size=8)
        yield a, b
        a.close()
        b.close()


def race(n: int, work: Callable[[int], object]) -> list[object]:
    """Run work(0..n-1) at once on n threads (released together); results or the exceptions raised."""
    gate = threading.Barrier(n)

    def one(i: int) -> object:
        gate.wait()
        try:
            return work(i)
        except Exception as exc:  # noqa: BLE001 -- collected, then asserted on by the test
            return exc
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_an_enrolee_added_on_one_instance_enrols_and_is_served_on_the_other(pair):
    a, b = pair
    a.add_enrolee(rec(1), Secret(b"\x01" * 32, "Kpm"))
    found = b.enrolee_and_psk(rec(1).kpm_id)
    assert found is not None and found[1] == Secret(b"\x01" * 32, "Kpm")
    b.put_enrolment_key(ke(1), rec(1).kpm_id, KE, T0, T0 + dt.timedelta(days=3650))
    assert a.get_enrolment_key(ke(1)).enrolment_key == KE
    a.revoke_enrolee(rec(1).kpm_id)
    assert b.get_enrolment_key(ke(1)) is None
    assert [(r.ke_id, r.cause) for r in b.revocations_since(0)[0]] == [(ke(1), "enrolee-revoked")]


def test_the_enrolment_budget_holds_across_instances(pair):
    """Twenty enrolments of one enrolee at once, half at each instance, against a budget of three: three land."""
    a, b = pair
    a.add_enrolee(rec(1), Secret(b"\x01" * 32, "Kpm"))
    burst = 3.0

    def charge(state):
        tokens = burst if state is None else state[0]
        if tokens < 1:
            raise EnrolmentRateLimited("spent", 60)
        return tokens - 1, 0.0

    results = race(20, lambda i: (a if i % 2 else b).put_enrolment_key(
        ke(i), rec(1).kpm_id, KE, T0, T0 + dt.timedelta(days=3650), charge=charge))
    assert sum(r == [] for r in results) == 3, results
    assert all(isinstance(r, EnrolmentRateLimited) for r in results if r != [])
    assert len(a.enrolment_key_ids(rec(1).kpm_id)) == 3
    assert a.get_enrolee(rec(1).kpm_id).enrolment_budget == (0.0, 0.0)


def test_the_live_key_cap_holds_across_instances(pair):
    a, b = pair
    a.add_enrolee(rec(1), Secret(b"\x01" * 32, "Kpm"))
    results = race(16, lambda i: (a if i % 2 else b).put_enrolment_key(
        ke(i), rec(1).kpm_id, KE, T0, T0 + dt.timedelta(days=3650), max_live_keys=2))
    assert not [r for r in results if isinstance(r, Exception)], results
    assert len(b.enrolment_key_ids(rec(1).kpm_id)) == 2
    rows, newest = a.revocations_since(0)
    assert len(rows) == 14 == newest and {r.cause for r in rows} == {"live-key-cap"}
    assert len({r.ke_id for r in rows}) == 14  # each dropped key logged once


def test_a_reader_of_the_revocation_log_never_misses_a_row_written_concurrently(pair):
    """Writers at both instances revoke keys while a reader follows the log from the last number it saw: it
    sees every number once, in order, with no gap (a row numbered before a smaller one would be skipped)."""
    a, b = pair
    n = 120
    for i in range(n):
        a.add_enrolee(rec(i), Secret(bytes([i % 250 + 1]) * 32, "Kpm"))
        a.put_enrolment_key(ke(i), rec(i).kpm_id, KE, T0, T0 + dt.timedelta(days=3650))
    seen: list[int] = []
    done = threading.Event()

    def follow() -> None:
        last = 0
        while not done.is_set() or last < n:
            rows, _newest = b.revocations_since(last, 50)
            seen.extend(r.seq for r in rows)
            if rows:
                last = rows[-1].seq
    reader = threading.Thread(target=follow)
    reader.start()
    results = race(12, lambda w: [(a if w % 2 else b).revoke_key(ke(i)) for i in range(w, n, 12)])
    done.set()
    reader.join(30)
    assert not reader.is_alive()
    assert not [r for r in results if isinstance(r, Exception)], results
    assert seen == list(range(1, n + 1))


def test_two_instances_purging_at_once_log_each_expired_key_once(pair):
    a, b = pair
    a.add_enrolee(rec(1), Secret(b"\x01" * 32, "Kpm"))
    for i in range(300):
        a.put_enrolment_key(ke(i), rec(1).kpm_id, KE, T0, T0 + dt.timedelta(hours=1))
    results = race(4, lambda i: (a if i % 2 else b).purge(now=T0 + dt.timedelta(hours=2)))
    assert sum(r.expired for r in results) == 300, results  # one instance purged, the others found it busy
    rows, newest = a.revocations_since(0, 1000)
    assert newest == 300 and sorted(r.ke_id for r in rows) == sorted(ke(i) for i in range(300))


def test_a_suspension_at_one_instance_stops_a_session_committing_at_the_other(pair):
    a, b = pair
    a.add_enrolee(rec(1), Secret(b"\x01" * 32, "Kpm"))
    generation = b.get_enrolee(rec(1).kpm_id).kpm_generation
    a.suspend_enrolee(rec(1).kpm_id)
    with pytest.raises(AccessDenied):
        b.put_enrolment_key(ke(1), rec(1).kpm_id, KE, T0, T0 + dt.timedelta(days=1), kpm_generation=generation)


def test_instances_starting_together_on_an_empty_database_agree_on_one_schema(tmp_path):
    with fresh_schema() as url:
        key = tmp_path / "mef.masterkey"
        new_key_file(key)
        stores = race(6, lambda i: PostgresStore(url, key, pool_size=2))
        assert all(isinstance(s, PostgresStore) for s in stores), stores
        stores[0].add_enrolee(rec(1), Secret(b"\x01" * 32, "Kpm"))
        assert all(s.get_enrolee(rec(1).kpm_id) is not None for s in stores)  # type: ignore[union-attr]
        for s in stores:
            s.close()  # type: ignore[union-attr]


def test_another_master_key_is_refused_and_a_missing_one_is_not_made_up(tmp_path):
    with fresh_schema() as url:
        PostgresStore(url, tmp_path / "one.key", pool_size=2).close()
        new_key_file(tmp_path / "other.key")
        with pytest.raises(StoreError, match="does not open the database"):
            PostgresStore(url, tmp_path / "other.key", pool_size=2)
        with pytest.raises(StoreError, match="missing"):
            PostgresStore(url, tmp_path / "absent.key", pool_size=2)
        assert not (tmp_path / "absent.key").exists()


def test_an_unreachable_server_is_a_clear_error_without_the_password(tmp_path):
    require()
    with pytest.raises(StoreError, match="cannot be reached") as info:
        PostgresStore("postgresql://mef:hunter2-secret@127.0.0.1:1/mef", tmp_path / "k", connect_timeout=1)
    assert "hunter2" not in str(info.value) and "***" in str(info.value)
    assert not (tmp_path / "k").exists()


def test_redact_url() -> None:
    assert redact_url("postgresql://mef:s3cret@db:5432/mef") == "postgresql://mef:***@db:5432/mef"
    assert redact_url("postgresql://db/mef?password=s3cret&sslmode=require") == \
        "postgresql://db/mef?password=***&sslmode=require"
    url = require()
    assert redact_url(url) == url or ":***@" in redact_url(url)


def test_a_password_in_database_url_needs_a_private_configuration_file(tmp_path: Path) -> None:
    from rspf.mef.config import MefConfig

    cfg = tmp_path / "mef.toml"
    cfg.write_text('[mef]\nfqdn = "mef.example.com"\nsp_id = "//sp.example.com"\n'
                   'database_url = "postgresql://mef:s3cret@db.example.com/mef"\n')
    cfg.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        MefConfig.load(cfg)
    cfg.chmod(0o600)
    loaded = MefConfig.load(cfg)
    assert loaded.database_url == "postgresql://mef:s3cret@db.example.com/mef"
    assert "s3cret" not in repr(loaded)
    cfg.write_text('[mef]\nfqdn = "mef.example.com"\nsp_id = "//sp.example.com"\ndatabase_url = "mysql://x/y"\n')
    with pytest.raises(ConfigError, match="PostgreSQL URL"):
        MefConfig.load(cfg)
