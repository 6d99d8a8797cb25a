"""Several `rspf mef serve` processes on one PostgreSQL database serve one population (docs/scale.md): what one
instance (or an admin command at either) writes, the other serves; budgets hold across them; a `kill -9` of one
under load loses no committed enrolment while the other carries on; `rspf mef migrate` moves an SQLite MEF
over. Needs the PostgreSQL test server (integration/postgres.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rspf.client import OneM2MClient
from rspf.errors import RemoteError
from rspf.fileutil import read_key_file
from rspf.target import KeyCache, fetch_credentials, request_credentials
from rspf.tls import PskClient

from .postgres import fresh_schema
from .proxy import FaultProxy
from .support import FQDN, HOST, REGISTRAR, Cli, EnroleeInfo, MefHome, TargetInfo, enrolee_client, free_port


def home(root: Path, url: str | None) -> MefHome:
    root.mkdir()
    mef = MefHome(root, Cli(root))
    mef.init()
    if url is not None:
        mef.set_config("database_url", json.dumps(url))
    return mef


def share_key(source: MefHome, other: MefHome) -> None:
    """Every instance of one population holds the same master key file."""
    key = other.root / "mef.masterkey"
    shutil.copyfile(source.root / "mef.masterkey", key)
    os.chmod(key, 0o600)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[MefHome, MefHome]]:
    with fresh_schema() as url:
        a, b = home(tmp_path / "a", url), home(tmp_path / "b", url)
        share_key(a, b)
        a.add_target("in", REGISTRAR, "id-in@sp.example.com")
        b.targets = a.targets
        try:
            yield a, b
        finally:
            a.stop()
            b.stop()


def fetch(mef: MefHome, target: TargetInfo, ke_id: str) -> bytes:
    got = fetch_credentials(HOST, mef.port, FQDN, target.psk_identity, read_key_file(target.psk_file), REGISTRAR,
                            ke_id, 22, timeout=10)
    return got.key.reveal()


def test_what_either_instance_or_its_admin_writes_the_other_serves(pair: tuple[MefHome, MefHome]) -> None:
    a, b = pair
    one = a.add_enrolee("dev1", enrolee_id="/id-mn1")
    two = b.add_enrolee("dev2", enrolee_id="/id-mn2")  # the admin command of the other instance, same database
    a.start()
    b.start()
    first = enrolee_client(a, one).enrol()  # enrols at A ...
    assert fetch(b, a.targets["in"], first.ke_id) == fetch(a, a.targets["in"], first.ke_id)  # ... served by B
    second = enrolee_client(b, two).enrol()
    assert len(fetch(a, a.targets["in"], second.ke_id)) == 32
    assert {e["kpmID"] for e in a.list_enrolees()} == {one.kpm_id, two.kpm_id}
    assert a.show(one.kpm_id)["keyIDs"] == [first.ke_id]
    b.revoke(one.kpm_id)  # revoked with B's configuration: A refuses the key, and A's feed names it
    res = a.fetch(a.targets["in"], first.ke_id)
    assert res.rc != 0 and "4004" in res.output, str(res)
    cache = KeyCache(mef_host=HOST, mef_port=a.port, mef_fqdn=FQDN, psk_identity=a.targets["in"].psk_identity,
                     psk=read_key_file(a.targets["in"].psk_file), origin=REGISTRAR)
    try:
        page = cache.revocation_page(0)
    finally:
        cache.close()
    assert [r.ke_id for r in page.items] == [first.ke_id]
    assert len(fetch(b, a.targets["in"], second.ke_id)) == 32  # the other enrolee is untouched


def test_the_enrolment_budget_holds_across_instances(pair: tuple[MefHome, MefHome]) -> None:
    a, b = pair
    for mef in (a, b):
        mef.set_config("enrolment_rate_burst", "2")
        mef.set_config("enrolment_rate_interval_seconds", "3600")
    dev = a.add_enrolee("dev1", enrolee_id="/id-mn1")
    a.start()
    b.start()
    assert a.enrol(dev, "--force").rc == 0 and b.enrol(dev, "--force").rc == 0
    for mef in (a, b):  # both spent, whichever instance is asked
        res = mef.enrol(dev, "--force")
        assert res.rc != 0 and "too often" in res.output, str(res)


def test_kill_9_of_one_instance_under_load_loses_no_committed_enrolment(pair: tuple[MefHome, MefHome]) -> None:
    """Four clients enrol different enrolees, alternating between the instances, with no pause. One instance is
    killed with SIGKILL mid-load; its clients move to the other. Every enrolment a client saw complete (its
    KeID returned) is then served by the survivor, and the survivor went on enrolling after the kill."""
    a, b = pair
    infos = a.import_batch("load", 400)
    a.start()
    b.start()
    committed: list[tuple[str, float]] = []
    failures: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    killed = threading.Event()
    queue = list(infos)

    def client(n: int) -> None:
        turn = n
        while not stop.is_set():
            with lock:
                if not queue:
                    return
                info: EnroleeInfo = queue.pop()
            mef = a if turn % 2 and not killed.is_set() else b
            turn += 1
            try:
                done = enrolee_client(mef, info).enrol()
            except Exception as exc:  # noqa: BLE001 -- a session cut by the kill: counted, not committed
                with lock:
                    failures.append(f"{mef.port}: {exc}")
                continue
            with lock:
                committed.append((done.ke_id, time.monotonic()))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(committed) < 60 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert a.proc is not None
    os.kill(a.proc.pid, signal.SIGKILL)  # mid-load: sessions at A are cut wherever they are
    killed_at = time.monotonic()
    killed.set()
    a.proc.wait(10)
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert a.proc.returncode == -signal.SIGKILL
    after = [ke for ke, when in committed if when > killed_at]
    assert len(after) > 50, (len(committed), failures[:5])  # the survivor carried on
    target = a.targets["in"]
    lost = [ke for ke, _ in committed if len(fetch(b, target, ke)) != 32]
    assert not lost
    assert len({ke for ke, _ in committed}) == len(committed)


def test_migrate_moves_an_sqlite_mef_to_postgresql(tmp_path: Path) -> None:
    mef = home(tmp_path / "m", None)
    mef.add_target("in", REGISTRAR, "id-in@sp.example.com")
    dev = mef.add_enrolee("dev1", enrolee_id="/id-mn1")
    other = mef.add_enrolee("dev2", enrolee_id="/id-mn2")
    mef.start()
    first = enrolee_client(mef, dev).enrol()
    gone = enrolee_client(mef, other).enrol()
    key_before = fetch(mef, mef.targets["in"], first.ke_id)
    mef.stop()
    mef.cli.ok("mef", "enrolee", "revoke-key", "-c", mef.config, gone.ke_id)  # revocation log row 1
    with fresh_schema() as url:
        res = mef.cli.ok("mef", "migrate", "-c", mef.config, "--to", url)
        assert "2 enrolees" in res.stdout and "1 enrolment_keys" in res.stdout and "1 revocations" in res.stdout
        again = mef.cli("mef", "migrate", "-c", mef.config, "--to", url)
        assert again.rc == 2 and "already holds MEF data" in again.output, str(again)
        mef.set_config("database_url", json.dumps(url))
        mef.database.unlink()  # from now on the SQLite file is not read at all
        mef.start()
        assert fetch(mef, mef.targets["in"], first.ke_id) == key_before  # the sealed key, opened by the same key
        newer = enrolee_client(mef, dev).enrol()
        assert newer.ke_id != first.ke_id
        mef.cli.ok("mef", "enrolee", "revoke-key", "-c", mef.config, newer.ke_id)
        cache = KeyCache(mef_host=HOST, mef_port=mef.port, mef_fqdn=FQDN,
                         psk_identity=mef.targets["in"].psk_identity,
                         psk=read_key_file(mef.targets["in"].psk_file), origin=REGISTRAR)
        try:
            page = cache.revocation_page(0)
        finally:
            cache.close()
        assert [(r.seq, r.ke_id) for r in page.items] == [(1, gone.ke_id), (2, newer.ke_id)]
        mef.stop()


def test_the_database_going_away_and_coming_back(tmp_path: Path) -> None:
    """While PostgreSQL is unreachable the MEF stays up, refuses what needs the database with a sentence that
    names nothing of it (the detail is in its log), and /health says so; once it is back, the MEF works again
    without a restart."""
    from urllib.parse import urlsplit, urlunsplit

    with fresh_schema() as url:
        parts = urlsplit(url)
        assert parts.hostname == HOST, "the proxy forwards to the test server on this host"
        proxy = FaultProxy(parts.port or 5432)
        via_proxy = urlunsplit(parts._replace(netloc=f"{parts.username}@{HOST}:{proxy.port}"
                                              if parts.username else f"{HOST}:{proxy.port}"))
        mef = home(tmp_path / "m", via_proxy)
        metrics_port = free_port()
        mef.set_config("metrics_listen", json.dumps(f"{HOST}:{metrics_port}"))
        mef.add_target("in", REGISTRAR, "id-in@sp.example.com")
        dev = mef.add_enrolee("dev1", enrolee_id="/id-mn1")
        try:
            mef.start()
            first = enrolee_client(mef, dev).enrol()
            assert health(metrics_port) == 200
            target = mef.targets["in"]
            tls = PskClient().connect(HOST, mef.port, target.psk_identity, read_key_file(target.psk_file),
                                      server_name=FQDN, timeout=10)
            open_conn = OneM2MClient(tls, REGISTRAR, host=FQDN, deadline=10)  # opened while the database was up
            assert len(request_credentials(open_conn, first.ke_id, 22).key.reveal()) == 32  # (its session too)
            proxy.set_mode("refuse")  # the database goes away, with every connection to it
            proxy.cut()
            with pytest.raises(RemoteError) as info:
                request_credentials(open_conn, first.ke_id, 22)
            open_conn.close()
            assert info.value.remote_rsc == 5000 and "try again later" in str(info.value), info.value
            assert "5432" not in str(info.value) and str(proxy.port) not in str(info.value)
            res = mef.fetch(target, first.ke_id)  # a new connection: the Target's PSK cannot be read
            assert res.rc != 0 and "refused the TLS-PSK handshake" in res.output, str(res)
            assert mef.enrol(dev, "--force").rc != 0
            assert health(metrics_port) == 503
            assert mef.proc is not None and mef.proc.poll() is None  # still serving
            proxy.set_mode("forward")
            deadline = time.monotonic() + 30
            while mef.enrol(dev, "--force").rc != 0:
                assert time.monotonic() < deadline, "the MEF did not recover once the database was back"
                time.sleep(0.5)
            assert len(fetch(mef, mef.targets["in"], first.ke_id)) == 32  # nothing was lost
            assert "is unavailable" in mef.log_text()  # the detail, for the operator
        finally:
            mef.stop()
            proxy.stop()


def health(port: int) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_init_with_a_database_url_creates_the_schema_in_postgresql(tmp_path: Path) -> None:
    import psycopg

    with fresh_schema() as url:
        cli = Cli(tmp_path)
        res = cli.ok("mef", "init", tmp_path / "mef.toml", "--fqdn", FQDN, "--sp-id", "//sp.example.com",
                     "--database-url", url)
        assert "database postgresql://" in res.stdout and not (tmp_path / "mef.sqlite").exists()
        assert f"database_url = {json.dumps(url)}" in (tmp_path / "mef.toml").read_text()
        assert (tmp_path / "mef.toml").stat().st_mode & 0o077 == 0
        with psycopg.connect(url) as conn:
            tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}
        assert {"meta", "enrolees", "enrolment_keys", "revocations", "counters"} <= tables
        assert cli.ok("mef", "enrolee", "list", "-c", tmp_path / "mef.toml", "--json").json() == []
