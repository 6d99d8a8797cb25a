"""rspf.mef.store: the MEF's SQLite store (sealed keys, atomic batches, revocation, expiry)."""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import stat

import pytest

from rspf.errors import AccessDenied, BadRequest, ConfigError, Conflict, NotFound, StoreError
from rspf.fileutil import new_key_file
from rspf.mef.store import EnroleeRecord, TargetGrant, TargetRecord
from rspf.mef.store_sqlite import SqliteStore
from rspf.secret import Secret

UTC = dt.UTC
#: distinctive key values, easy to find in raw file bytes if they were ever stored in the clear
KPM_MARK = Secret(b"KPM-MARKER-do-not-store-0123456!", "Kpm")
PSK_MARK = Secret(b"TARGET-PSK-MARKER-never-in-db-42", "psk")
KE_MARK = Secret(b"KE-MARKER-enrolment-key-9876543!", "Ke")


def rec(n: int = 1, **kw) -> EnroleeRecord:
    values = dict(kpm_id=f"dev{n}@mef.example.com", enrolee_id=f"/id-mn{n}", node_id=f"urn:dev:{n}",
                  registrar_cse_id="/id-in", registrar_uri="https://in.example.com/cse-in")
    values.update(kw)
    return EnroleeRecord(**values)


def kpm(n: int = 1) -> Secret:
    return Secret(bytes([n]) * 32, "Kpm")


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def raw_bytes(tmp_path) -> bytes:
    """Every byte of the database, its WAL and shared-memory files."""
    return b"".join(p.read_bytes() for p in sorted(tmp_path.iterdir()) if p.name.startswith("mef.sqlite"))


@pytest.fixture
def paths(tmp_path):
    return tmp_path / "mef.sqlite", tmp_path / "mef.masterkey"


def test_keys_are_not_stored_in_plaintext_in_postgresql(tmp_path):
    """Every row of every table, as PostgreSQL prints it (bytea in hex), holds no key in the clear."""
    from integration.postgres import fresh_schema

    from rspf.mef.store_pg import PostgresStore

    with fresh_schema() as url:
        store = PostgresStore(url, tmp_path / "mef.masterkey", pool_size=2)
        try:
            store.add_enrolee(rec(1), KPM_MARK)
            store.add_target(TargetRecord("in@sp.example.com", "/id-in"), PSK_MARK)
            now = dt.datetime.now(UTC)
            store.put_enrolment_key("00" * 16 + "@mef.example.com", rec(1).kpm_id, KE_MARK, now,
                                    now + dt.timedelta(hours=1))
            dump = " ".join(str(row) for table in ("meta", "enrolees", "targets", "enrolment_keys")
                            for row in store._all(f"SELECT t::text FROM {table} t"))
        finally:
            store.close()
    assert "dev1@mef.example.com" in dump  # sanity: we are looking at the data
    for mark in (KPM_MARK, PSK_MARK, KE_MARK):
        assert mark.reveal().hex() not in dump and mark.reveal().decode() not in dump


def test_db_and_master_key_created_0600_even_with_open_umask(paths):
    db, mk = paths
    old = os.umask(0)
    try:
        s = SqliteStore(db, mk)
        s.add_enrolee(rec(), kpm())  # also makes SQLite create its -wal/-shm files
    finally:
        os.umask(old)
    assert mode(db) == 0o600
    assert mode(mk) == 0o600
    for side in db.parent.glob("mef.sqlite-*"):
        assert mode(side) & 0o077 == 0, side.name
    s.close()


def test_create_false_refuses_a_missing_database(paths):
    with pytest.raises(StoreError, match="does not exist"):
        SqliteStore(*paths, create=False)
    assert not paths[0].exists() and not paths[1].exists()


def test_group_readable_database_is_refused(paths):
    SqliteStore(*paths).close()
    os.chmod(paths[0], 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        SqliteStore(*paths)


def test_add_get_list_enrolees(store):
    r1 = rec(1, targets=[TargetGrant("/id-x", (22, 23))], rm_uri="https://dm.example.com",
             enrolment_expiry_seconds=600, valid_until=dt.datetime(2030, 1, 1, tzinfo=UTC))
    r2 = rec(2, enrolee_id="Csensor")
    assert store.add_enrolees([(r2, kpm(2)), (r1, kpm(1))]) == 2
    got = store.get_enrolee(r1.kpm_id)
    assert got.enrolee_id == "/id-mn1" and got.enrolee_type == "CSE"
    assert got.node_id == "urn:dev:1"
    assert got.registrar_cse_id == "/id-in"
    assert got.registrar_uri == "https://in.example.com/cse-in"
    assert got.targets == [TargetGrant("/id-x", (22, 23))]
    assert got.rm_uri == "https://dm.example.com"
    assert got.enrolment_expiry_seconds == 600
    assert got.valid_until == dt.datetime(2030, 1, 1, tzinfo=UTC)
    assert got.state == "active" and got.allowed_app_ids is None
    assert got.created is not None and got.last_enrolled is None
    assert store.get_enrolee(r2.kpm_id).enrolee_type == "AE"
    assert [e.kpm_id for e in store.list_enrolees()] == sorted([r1.kpm_id, r2.kpm_id])
    assert store.count_enrolees() == 2
    assert store.has_enrolee_id("Csensor") and not store.has_enrolee_id("/id-nope")
    assert store.get_enrolee("nobody") is None
    assert store.enrolee_psk(r1.kpm_id) == kpm(1)
    assert store.enrolee_psk(r2.kpm_id) == kpm(2)
    assert store.enrolee_psk("nobody") is None
    assert "kpm" not in {k.lower() for k in got.public_dict()}


def test_keys_are_not_stored_in_plaintext(sqlite_store, tmp_path):
    store = sqlite_store
    store.add_enrolee(rec(1), KPM_MARK)
    store.add_target(TargetRecord("in@sp.example.com", "/id-in"), PSK_MARK)
    now = dt.datetime.now(UTC)
    store.put_enrolment_key("00" * 16 + "@mef.example.com", rec(1).kpm_id, KE_MARK, now, now + dt.timedelta(hours=1))
    blob = raw_bytes(tmp_path)
    assert b"dev1@mef.example.com" in blob  # sanity: we are looking at the data
    for secret in (KPM_MARK, PSK_MARK, KE_MARK):
        value = secret.reveal()
        assert value not in blob
        assert value[:12] not in blob
        assert value.hex().encode() not in blob
        assert value.hex().upper().encode() not in blob
    # and after a checkpoint into the main file
    store.close()
    db = sqlite3.connect(tmp_path / "mef.sqlite")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    blob = (tmp_path / "mef.sqlite").read_bytes()
    assert b"dev1@mef.example.com" in blob
    for secret in (KPM_MARK, PSK_MARK, KE_MARK):
        assert secret.reveal() not in blob and secret.reveal().hex().encode() not in blob


def test_duplicate_kpm_id_is_conflict(store):
    store.add_enrolee(rec(1), kpm(1))
    with pytest.raises(Conflict):
        store.add_enrolee(rec(1, enrolee_id="/id-other"), kpm(2))
    assert store.enrolee_psk(rec(1).kpm_id) == kpm(1)  # the original is untouched


def test_duplicate_enrolee_id_is_conflict(store):
    store.add_enrolee(rec(1), kpm(1))
    with pytest.raises(Conflict, match="Enrolee-ID"):
        store.add_enrolee(rec(2, enrolee_id="/id-mn1"), kpm(2))
    assert store.get_enrolee(rec(2).kpm_id) is None


@pytest.mark.parametrize("bad", ["existing-kpm-id", "existing-enrolee-id", "dup-in-batch-kpm", "dup-in-batch-eid"])
def test_batch_add_is_all_or_nothing(store, bad):
    store.add_enrolee(rec(1), kpm(1))
    batch = [(rec(2), kpm(2)), (rec(3), kpm(3))]
    if bad == "existing-kpm-id":
        batch.append((rec(4, kpm_id=rec(1).kpm_id), kpm(4)))
    elif bad == "existing-enrolee-id":
        batch.append((rec(4, enrolee_id="/id-mn1"), kpm(4)))
    elif bad == "dup-in-batch-kpm":
        batch.append((rec(4, kpm_id=rec(2).kpm_id), kpm(4)))
    else:
        batch.append((rec(4, enrolee_id="/id-mn3"), kpm(4)))
    with pytest.raises(Conflict):
        store.add_enrolees(batch)
    assert [e.kpm_id for e in store.list_enrolees()] == [rec(1).kpm_id]
    assert store.enrolee_psk(rec(2).kpm_id) is None
    # the store is still usable afterwards (the transaction and lock were released)
    assert store.add_enrolees([(rec(2), kpm(2))]) == 1


def test_revoke_enrolee(store):
    store.add_enrolee(rec(1), kpm(1))
    store.add_enrolee(rec(2), kpm(2))
    now = dt.datetime.now(UTC)
    later = now + dt.timedelta(hours=1)
    store.put_enrolment_key("11" * 16 + "@mef.example.com", rec(1).kpm_id, KE_MARK, now, later)
    store.put_enrolment_key("22" * 16 + "@mef.example.com", rec(1).kpm_id, KE_MARK, now, later)
    store.put_enrolment_key("33" * 16 + "@mef.example.com", rec(2).kpm_id, KE_MARK, now, later)
    store.revoke_enrolee(rec(1).kpm_id)
    assert store.enrolee_psk(rec(1).kpm_id) is None
    assert store.get_enrolee(rec(1).kpm_id).state == "revoked"
    assert store.get_enrolment_key("11" * 16 + "@mef.example.com") is None
    rows = store._one("SELECT count(*) FROM enrolment_keys WHERE kpm_id=?", (rec(1).kpm_id,))
    assert rows[0] == 0  # removed, not just hidden
    # the other enrolee is unaffected
    assert store.enrolee_psk(rec(2).kpm_id) == kpm(2)
    assert store.get_enrolment_key("33" * 16 + "@mef.example.com").enrolment_key == KE_MARK
    with pytest.raises(NotFound):
        store.revoke_enrolee("nobody")


def test_valid_until(store):
    until = dt.datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
    store.add_enrolee(rec(1, valid_until=until), kpm(1))
    assert store.enrolee_psk(rec(1).kpm_id, now=until - dt.timedelta(seconds=1)) == kpm(1)
    assert store.enrolee_psk(rec(1).kpm_id, now=until) is None
    assert store.enrolee_psk(rec(1).kpm_id, now=until + dt.timedelta(days=1)) is None


def test_valid_until_in_the_past(store):
    store.add_enrolee(rec(1, valid_until=dt.datetime.now(UTC) - dt.timedelta(minutes=1)), kpm(1))
    assert store.enrolee_psk(rec(1).kpm_id) is None


def test_enrolment_key_put_get_and_expiry(store):
    store.add_enrolee(rec(1), kpm(1))
    created = dt.datetime(2026, 1, 1, tzinfo=UTC)
    expires = created + dt.timedelta(hours=1)
    ke_id = "ab" * 16 + "@mef.example.com"
    store.put_enrolment_key(ke_id, rec(1).kpm_id, KE_MARK, created, expires)
    got = store.get_enrolment_key(ke_id, now=created + dt.timedelta(minutes=59))
    assert got.ke_id == ke_id and got.kpm_id == rec(1).kpm_id
    assert got.enrolment_key == KE_MARK
    assert got.created == created and got.expires == expires
    assert store.get_enrolee(rec(1).kpm_id).last_enrolled == created
    assert store.get_enrolment_key(ke_id, now=expires) is None
    assert store.get_enrolment_key(ke_id, now=expires + dt.timedelta(seconds=1)) is None
    assert store.get_enrolment_key("cd" * 16 + "@mef.example.com", now=created) is None
    with pytest.raises(Conflict):  # never overwrite a key
        store.put_enrolment_key(ke_id, rec(1).kpm_id, Secret(b"x" * 32), created, expires)
    assert store.get_enrolment_key(ke_id, now=created).enrolment_key == KE_MARK


def test_enrolment_key_really_expired_now(store):
    store.add_enrolee(rec(1), kpm(1))
    now = dt.datetime.now(UTC)
    store.put_enrolment_key("ee" * 16 + "@x.example", rec(1).kpm_id, KE_MARK, now - dt.timedelta(hours=2),
                            now - dt.timedelta(hours=1))
    assert store.get_enrolment_key("ee" * 16 + "@x.example") is None


def test_enrolment_key_needs_a_registered_enrolee(store):
    now = dt.datetime.now(UTC)
    with pytest.raises(StoreError, match="no enrolee"):
        store.put_enrolment_key("ff" * 16 + "@x.example", "nobody", KE_MARK, now, now + dt.timedelta(hours=1))


def test_purge_expired_keys(store):
    store.add_enrolee(rec(1), kpm(1))
    t0 = dt.datetime(2026, 1, 1, tzinfo=UTC)
    store.put_enrolment_key("01" * 16 + "@x.example", rec(1).kpm_id, KE_MARK, t0, t0 + dt.timedelta(hours=1))
    store.put_enrolment_key("02" * 16 + "@x.example", rec(1).kpm_id, KE_MARK, t0, t0 + dt.timedelta(hours=3))
    assert store.purge(now=t0 + dt.timedelta(hours=2)).expired == 1
    assert store.get_enrolment_key("02" * 16 + "@x.example", now=t0) is not None


def test_store_survives_reopen(paths):
    s = SqliteStore(*paths)
    s.add_enrolee(rec(1, targets=[TargetGrant("/id-x", (23,))]), kpm(1))
    s.add_target(TargetRecord("in@sp.example.com", "/id-in"), PSK_MARK)
    t0 = dt.datetime.now(UTC).replace(microsecond=0)
    s.put_enrolment_key("ab" * 16 + "@mef.example.com", rec(1).kpm_id, KE_MARK, t0, t0 + dt.timedelta(days=1))
    s.close()
    s2 = SqliteStore(*paths, create=False)
    assert s2.get_enrolee(rec(1).kpm_id).targets == [TargetGrant("/id-x", (23,))]
    assert s2.enrolee_psk(rec(1).kpm_id) == kpm(1)
    assert s2.target_psk("in@sp.example.com") == PSK_MARK
    assert s2.get_enrolment_key("ab" * 16 + "@mef.example.com").enrolment_key == KE_MARK
    s2.close()


def _replace_master_key(mk) -> None:
    mk.unlink()
    new_key_file(mk)


def test_different_master_key_cannot_open_the_keys(paths):
    s = SqliteStore(*paths)
    s.add_enrolee(rec(1), kpm(1))
    s.add_target(TargetRecord("in@sp.example.com", "/id-in"), PSK_MARK)
    s.close()
    _replace_master_key(paths[1])
    # the replaced key is refused when the store opens, before any sealed row could be misread
    with pytest.raises(StoreError, match="does not open the database"):
        SqliteStore(*paths)


def test_opening_with_a_different_master_key_is_store_error(paths):
    s = SqliteStore(*paths)
    s.add_enrolee(rec(1), kpm(1))
    s.close()
    _replace_master_key(paths[1])
    with pytest.raises(StoreError):
        SqliteStore(*paths)


def test_missing_master_key_with_existing_db_is_store_error(paths):
    SqliteStore(*paths).close()
    paths[1].unlink()
    with pytest.raises(StoreError, match="master key"):
        SqliteStore(*paths)
    assert not paths[1].exists()  # no fresh key was silently created


def test_targets_add_psk_revoke(store):
    store.add_target(TargetRecord("in@sp.example.com", "/id-in"), PSK_MARK)
    store.add_target(TargetRecord("asn@sp.example.com", "//sp.example.com/id-asn"), Secret(b"p" * 32))
    t = store.get_target("in@sp.example.com")
    assert (t.psk_identity, t.target_id, t.revoked) == ("in@sp.example.com", "/id-in", False)
    assert t.created is not None
    assert [x.psk_identity for x in store.list_targets()] == ["asn@sp.example.com", "in@sp.example.com"]
    assert store.target_psk("in@sp.example.com") == PSK_MARK
    assert store.target_psk("nobody") is None
    assert store.get_target("nobody") is None
    store.revoke_target("in@sp.example.com")
    assert store.target_psk("in@sp.example.com") is None
    assert store.get_target("in@sp.example.com").revoked is True
    assert store.target_psk("asn@sp.example.com") == Secret(b"p" * 32)
    with pytest.raises(NotFound):
        store.revoke_target("nobody")
    with pytest.raises(Conflict):
        store.add_target(TargetRecord("asn@sp.example.com", "/id-other"), Secret(b"q" * 32))


def test_kpm_id_equal_to_a_target_identity_is_conflict(store):
    store.add_target(TargetRecord("shared-id", "/id-in"), PSK_MARK)
    with pytest.raises(Conflict):
        store.add_enrolee(rec(1, kpm_id="shared-id"), kpm(1))
    assert store.get_enrolee("shared-id") is None
    assert store.target_psk("shared-id") == PSK_MARK


def test_target_identity_equal_to_a_kpm_id_is_conflict(store):
    store.add_enrolee(rec(1), kpm(1))
    with pytest.raises(Conflict):
        store.add_target(TargetRecord(rec(1).kpm_id, "/id-in"), PSK_MARK)
    assert store.get_target(rec(1).kpm_id) is None
    assert store.enrolee_psk(rec(1).kpm_id) == kpm(1)


def test_sealed_rows_cannot_be_swapped(store):
    """The AAD binds each sealed Kpm to its KpmID: copying one row's blob to another is detected."""
    store.add_enrolee(rec(1), kpm(1))
    store.add_enrolee(rec(2), kpm(2))
    with store._borrow() as db:
        blob = db.execute("SELECT kpm FROM enrolees WHERE kpm_id=?", (rec(1).kpm_id,)).fetchone()[0]
        db.execute("UPDATE enrolees SET kpm=? WHERE kpm_id=?", (blob, rec(2).kpm_id))
    with pytest.raises(StoreError):
        store.enrolee_psk(rec(2).kpm_id)


# ------------------------------------------------------------------------- schema 2: migration from 1
V1_DDL = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE enrolees (kpm_id TEXT PRIMARY KEY, kpm BLOB NOT NULL, enrolee_id TEXT NOT NULL, node_id TEXT NOT NULL,
    registrar_cse_id TEXT NOT NULL, registrar_uri TEXT NOT NULL, targets TEXT NOT NULL, rm_uri TEXT,
    enrolment_expiry_seconds INTEGER, valid_until TEXT, revoked INTEGER NOT NULL DEFAULT 0, created TEXT NOT NULL,
    last_enrolled TEXT);
CREATE UNIQUE INDEX enrolees_by_id ON enrolees(enrolee_id);
CREATE TABLE targets (psk_identity TEXT PRIMARY KEY, psk BLOB NOT NULL, target_id TEXT NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0, created TEXT NOT NULL);
CREATE TABLE enrolment_keys (ke_id TEXT PRIMARY KEY, kpm_id TEXT NOT NULL REFERENCES enrolees(kpm_id),
    ke BLOB NOT NULL, created TEXT NOT NULL, expires TEXT NOT NULL);
CREATE INDEX keys_by_enrolee ON enrolment_keys(kpm_id);
"""


def make_v1_database(paths) -> str:
    """A schema-1 database as the previous release wrote it: two enrolees (dev2 revoked), a Target, a key."""
    from rspf.sealing import Sealer

    db_path, mk = paths
    sealer = Sealer(new_key_file(mk), b"mef store")
    fd = os.open(db_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    db = sqlite3.connect(db_path)
    db.executescript(V1_DDL)
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db.execute("INSERT INTO meta VALUES ('key_check', ?)",
               (sealer.seal(b"onem2m-rspf key check", b"meta:key_check").hex(),))
    for n, revoked in ((1, 0), (2, 1)):
        kpm_id = rec(n).kpm_id
        db.execute("INSERT INTO enrolees VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                   (kpm_id, sealer.seal(kpm(n).reveal(), b"kpm:" + kpm_id.encode()), f"/id-mn{n}", f"urn:dev:{n}",
                    "/id-in", "https://in.example.com/cse-in", '[["/id-x", [23]]]', None, 600, None, revoked,
                    "2026-01-01T00:00:00+00:00", None))
    db.execute("INSERT INTO targets VALUES (?,?,?,0,?)", ("in@sp.example.com",
               sealer.seal(PSK_MARK.reveal(), b"target:in@sp.example.com"), "/id-in", "2026-01-01T00:00:00+00:00"))
    ke_id = "ab" * 16 + "@mef.example.com"
    db.execute("INSERT INTO enrolment_keys VALUES (?,?,?,?,?)", (ke_id, rec(1).kpm_id,
               sealer.seal(KE_MARK.reveal(), b"ke:" + ke_id.encode()), "2026-01-01T00:00:00+00:00",
               "2099-01-01T00:00:00+00:00"))
    db.commit()
    db.close()
    return ke_id


def test_a_version_1_database_is_upgraded_in_place(paths):
    ke_id = make_v1_database(paths)
    s = SqliteStore(*paths)
    assert s._one("SELECT value FROM meta WHERE name='schema_version'") == ("5",)  # through 2 and 3, in one go
    one, two = s.get_enrolee(rec(1).kpm_id), s.get_enrolee(rec(2).kpm_id)
    assert (one.state, two.state) == ("active", "revoked")
    assert one.targets == [TargetGrant("/id-x", (23,))] and one.enrolment_expiry_seconds == 600
    assert one.allowed_app_ids is None and one.kpm_generation == 1
    assert s.enrolee_psk(rec(1).kpm_id) == kpm(1) and s.enrolee_psk(rec(2).kpm_id) is None
    assert s.enrolees_with_kpm(kpm(1)) == [rec(1).kpm_id]  # fingerprints were computed for the old rows
    assert s.get_enrolment_key(ke_id).enrolment_key == KE_MARK
    assert s.target_psk("in@sp.example.com") == PSK_MARK
    columns = {r[1] for r in s._all("PRAGMA table_info(enrolees)")}
    assert "revoked" not in columns and {"state", "allowed_app_ids", "kpm_fingerprint"} <= columns
    assert s.revocations_since(0) == ([], 0)
    s.suspend_enrolee(rec(1).kpm_id)  # the new features work on the upgraded file
    assert s.revocations_since(0)[1] == 1
    s.close()
    s2 = SqliteStore(*paths, create=False)  # and it opens again as version 3, without migrating twice
    assert s2.get_enrolee(rec(1).kpm_id).state == "suspended"
    s2.close()


def test_a_failed_migration_changes_nothing(paths):
    make_v1_database(paths)
    db = sqlite3.connect(paths[0])
    db.execute("UPDATE enrolees SET kpm=x'00' WHERE kpm_id=?", (rec(1).kpm_id,))  # a damaged sealed Kpm
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="damaged"):
        SqliteStore(*paths)
    db = sqlite3.connect(paths[0])
    assert db.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone() == ("1",)
    assert "revoked" in {r[1] for r in db.execute("PRAGMA table_info(enrolees)")}
    db.close()


def test_an_unknown_schema_version_is_refused(paths):
    SqliteStore(*paths).close()
    db = sqlite3.connect(paths[0])
    db.execute("UPDATE meta SET value='6' WHERE name='schema_version'")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema version 6"):
        SqliteStore(*paths)


# ------------------------------------------------------------------- schema 3: certificate enrolees
def make_v2_database(paths) -> str:
    """A schema-2 database (what the previous release wrote: schema 3 without enrolees.cert_id and its index)
    holding enrolee 1 with a key, and enrolee 2 suspended."""
    s = SqliteStore(*paths)
    s.add_enrolee(rec(1), kpm(1))
    s.add_enrolee(rec(2), kpm(2))
    s.suspend_enrolee(rec(2).kpm_id)
    ke_id = "cd" * 16 + "@mef.example.com"
    s.put_enrolment_key(ke_id, rec(1).kpm_id, KE_MARK, T0, T0 + dt.timedelta(days=3650))
    s.close()
    db = sqlite3.connect(paths[0])
    downgrade_to_v3(db)
    db.execute("DROP INDEX enrolees_by_cert")
    db.execute("ALTER TABLE enrolees DROP COLUMN cert_id")
    db.execute("UPDATE meta SET value='2' WHERE name='schema_version'")
    db.commit()
    db.close()
    return ke_id


def downgrade_to_v4(db: sqlite3.Connection) -> None:
    """Turn a schema-5 file into what schema 4 was: no stored enrolment budgets, and the newest revocation
    sequence number kept by SQLite's AUTOINCREMENT instead of the counters table."""
    db.execute("ALTER TABLE enrolees DROP COLUMN budget_tokens")
    db.execute("ALTER TABLE enrolees DROP COLUMN budget_stamp")
    newest = db.execute("SELECT value FROM counters WHERE name='revocations'").fetchone()[0]
    db.execute("DROP TABLE counters")
    db.execute("ALTER TABLE revocations RENAME TO r5")
    db.execute("DROP INDEX revocations_by_time")
    db.execute("CREATE TABLE revocations (seq INTEGER PRIMARY KEY AUTOINCREMENT, ke_id TEXT, enrolee_id TEXT NOT"
               " NULL, cause TEXT NOT NULL, time TEXT NOT NULL, cert_sha256 TEXT, CHECK ((ke_id IS NULL) !="
               " (cert_sha256 IS NULL)))")
    db.execute("CREATE INDEX revocations_by_time ON revocations(time)")
    db.execute("INSERT INTO revocations SELECT * FROM r5")
    db.execute("DROP TABLE r5")
    db.execute("DELETE FROM sqlite_sequence WHERE name='revocations'")
    db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('revocations', ?)", (newest,))
    db.execute("UPDATE meta SET value='4' WHERE name='schema_version'")


def three_revocations_logged(paths) -> sqlite3.Connection:
    """A current-schema file whose revocation log holds three rows (1..3) of one enrolee; returns a raw
    connection to it for a test to turn into an older schema."""
    s = SqliteStore(*paths)
    s.add_enrolee(rec(1), kpm(1))
    for n in range(3):
        s.put_enrolment_key(f"{n:02x}" * 16 + "@mef.example.com", rec(1).kpm_id, KE_MARK, T0,
                            T0 + dt.timedelta(days=3650))
    s.revoke_enrolee(rec(1).kpm_id)
    s.close()
    return sqlite3.connect(paths[0])


def test_a_version_4_database_is_upgraded_in_place_keeping_the_newest_sequence_number(paths):
    db = three_revocations_logged(paths)
    db.execute("DELETE FROM revocations WHERE seq > 1")  # pruned from the top: the counter still says 3
    downgrade_to_v4(db)
    db.commit()
    db.close()
    s = SqliteStore(*paths)
    assert s._one("SELECT value FROM meta WHERE name='schema_version'") == ("5",)
    assert s.revocations_since(0)[1] == 3 and s.get_enrolee(rec(1).kpm_id).enrolment_budget is None
    s.add_enrolee(rec(2), kpm(2))
    s.put_enrolment_key("ff" * 16 + "@mef.example.com", rec(2).kpm_id, KE_MARK, T0, T0 + dt.timedelta(days=1),
                        charge=lambda state: (4.0, 100.0))
    assert s.get_enrolee(rec(2).kpm_id).enrolment_budget == (4.0, 100.0)
    s.revoke_enrolee(rec(2).kpm_id)
    assert [r.seq for r in s.revocations_since(1)[0]] == [4]
    s.close()


def downgrade_to_v3(db: sqlite3.Connection) -> None:
    """Turn a schema-5 file into what schema 3 was: no certificate entitlement, no certificates table, and a
    revocation log of KeIDs only (its rows and sequence numbers kept)."""
    downgrade_to_v4(db)
    db.execute("ALTER TABLE enrolees DROP COLUMN may_certify")
    db.execute("DROP TABLE certificates")
    newest = db.execute("SELECT seq FROM sqlite_sequence WHERE name='revocations'").fetchone()
    db.execute("ALTER TABLE revocations RENAME TO r4")
    db.execute("DROP INDEX revocations_by_time")
    db.execute("CREATE TABLE revocations (seq INTEGER PRIMARY KEY AUTOINCREMENT, ke_id TEXT NOT NULL, enrolee_id"
               " TEXT NOT NULL, cause TEXT NOT NULL, time TEXT NOT NULL)")
    db.execute("CREATE INDEX revocations_by_time ON revocations(time)")
    db.execute("INSERT INTO revocations SELECT seq, ke_id, enrolee_id, cause, time FROM r4")
    db.execute("DROP TABLE r4")
    if newest is not None:
        db.execute("UPDATE sqlite_sequence SET seq=? WHERE name='revocations'", newest)
    db.execute("UPDATE meta SET value='3' WHERE name='schema_version'")


def test_a_version_3_database_is_upgraded_in_place_keeping_the_revocation_log(paths):
    db = three_revocations_logged(paths)
    db.execute("DELETE FROM revocations WHERE seq < 3")  # pruned: only seq 3 is left
    downgrade_to_v3(db)
    db.commit()
    db.close()
    s = SqliteStore(*paths)
    assert s._one("SELECT value FROM meta WHERE name='schema_version'") == ("5",)
    rows, newest = s.revocations_since(0)
    assert [(r.seq, r.cert_sha256) for r in rows] == [(3, None)] and newest == 3  # the newest number is kept
    assert s.get_enrolee(rec(1).kpm_id).may_certify is False
    s.add_enrolee(rec(2), kpm(2))
    s.record_certificate(rec(2).kpm_id, "1f", "ab" * 32, "//sp/id-in/C2", None, T0, T0 + dt.timedelta(days=1),
                         b"der")
    s.revoke_certificate("1f")
    rows, newest = s.revocations_since(3)
    assert [(r.seq, r.ke_id, r.cert_sha256) for r in rows] == [(4, None, "ab" * 32)] and newest == 4
    s.close()


def test_a_version_2_database_is_upgraded_in_place(paths):
    ke_id = make_v2_database(paths)
    s = SqliteStore(*paths)
    assert s._one("SELECT value FROM meta WHERE name='schema_version'") == ("5",)
    one, two = s.get_enrolee(rec(1).kpm_id), s.get_enrolee(rec(2).kpm_id)
    assert (one.state, two.state) == ("active", "suspended")
    assert (one.cert_id, one.has_kpm, two.cert_id) == (None, True, None)
    assert s.enrolee_psk(rec(1).kpm_id) == kpm(1)
    assert s.get_enrolment_key(ke_id).enrolment_key == KE_MARK
    assert s.revocations_since(0)[1] == 0  # the log is as it was (dev2 held no key)
    s.add_enrolee(rec(3, cert_id="/id-mn3"), None)  # certificate enrolees work on the upgraded file
    assert s.enrolee_by_certificate("/id-mn3").kpm_id == rec(3).kpm_id
    with pytest.raises(Conflict, match="certificate ID"):
        s.add_enrolee(rec(4, cert_id="/id-mn3"), None)
    s.close()
    s2 = SqliteStore(*paths, create=False)
    assert s2.enrolee_by_certificate("/id-mn3") is not None
    s2.close()


def test_a_failed_version_2_migration_changes_nothing(paths):
    make_v2_database(paths)
    db = sqlite3.connect(paths[0])
    db.execute("CREATE TABLE enrolees_by_cert (x)")  # the index name is taken: creating it fails mid-migration
    db.commit()
    db.close()
    with pytest.raises(sqlite3.Error):
        SqliteStore(*paths)
    db = sqlite3.connect(paths[0])
    assert db.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone() == ("2",)
    assert "cert_id" not in {r[1] for r in db.execute("PRAGMA table_info(enrolees)")}
    db.close()


def test_certificate_enrolees_have_no_kpm(store):
    s = store
    s.add_enrolee(rec(1, kpm_id="/id-mn1", cert_id="/id-mn1"), None)
    s.add_enrolee(rec(2, cert_id="/id-mn2"), kpm(2))  # both ways
    one, two = s.get_enrolee("/id-mn1"), s.enrolee_by_certificate("/id-mn2")
    assert (one.has_kpm, one.public_dict()["certificateID"], one.public_dict()["hasKpm"]) == (False, "/id-mn1", False)
    assert two.kpm_id == rec(2).kpm_id and two.has_kpm
    assert s.enrolee_psk("/id-mn1") is None  # a PSK handshake naming it finds no key
    assert s.enrolee_psk(rec(2).kpm_id) == kpm(2)
    assert s.enrolees_with_kpm(Secret(b"", "Kpm")) == []
    with pytest.raises(Conflict, match="no Kpm"):
        s.rotate_kpm("/id-mn1", kpm(5))
    with pytest.raises(BadRequest, match="Kpm or a certificate ID"):
        s.add_enrolee(rec(3), None)
    assert s.get_enrolee(rec(3).kpm_id) is None
    assert s.enrolee_by_certificate("/id-nobody") is None


# ------------------------------------------------------------------------------------ lifecycle
T0 = dt.datetime(2026, 1, 1, tzinfo=UTC)
HOUR = dt.timedelta(hours=1)


def ke(n: int) -> str:
    return f"{n:032x}@mef.example.com"


def causes(store) -> list[tuple[str, str, str]]:
    return [(r.ke_id, r.enrolee_id, r.cause) for r in store.revocations_since(0, 10_000)[0]]


def test_suspend_and_resume(store):
    store.add_enrolee(rec(1), kpm(1))
    store.put_enrolment_key(ke(1), rec(1).kpm_id, KE_MARK, T0, T0 + 24 * HOUR)
    store.put_enrolment_key(ke(2), rec(1).kpm_id, KE_MARK, T0, T0 + HOUR)  # expired at T0+1h
    assert store.suspend_enrolee(rec(1).kpm_id, now=T0 + 2 * HOUR) == 1
    assert store.get_enrolee(rec(1).kpm_id).state == "suspended"
    assert store.enrolee_psk(rec(1).kpm_id) is None  # no enrolment
    assert store.get_enrolment_key(ke(1), now=T0 + 2 * HOUR) is None  # its key is not served
    assert causes(store) == [(ke(1), "/id-mn1", "enrolee-suspended")]  # only the key that was still usable
    with pytest.raises(AccessDenied):  # a session opened before the suspension stores nothing
        store.put_enrolment_key(ke(3), rec(1).kpm_id, KE_MARK, T0, T0 + HOUR)
    assert store.enrolment_key_ids(rec(1).kpm_id) == [ke(1), ke(2)]
    with pytest.raises(Conflict, match="only an active"):
        store.suspend_enrolee(rec(1).kpm_id)
    store.resume_enrolee(rec(1).kpm_id)
    assert store.enrolee_psk(rec(1).kpm_id) == kpm(1)
    assert store.get_enrolment_key(ke(1), now=T0 + 2 * HOUR).enrolment_key == KE_MARK
    with pytest.raises(Conflict, match="only a suspended"):
        store.resume_enrolee(rec(1).kpm_id)
    with pytest.raises(NotFound):
        store.suspend_enrolee("nobody")


def test_revoked_is_final(store):
    store.add_enrolee(rec(1), kpm(1))
    store.put_enrolment_key(ke(1), rec(1).kpm_id, KE_MARK, T0, T0 + HOUR)
    assert store.revoke_enrolee(rec(1).kpm_id, now=T0) == 1
    assert causes(store) == [(ke(1), "/id-mn1", "enrolee-revoked")]
    for change in (store.revoke_enrolee, store.resume_enrolee, store.suspend_enrolee):
        with pytest.raises(Conflict, match="revoked"):
            change(rec(1).kpm_id)
    with pytest.raises(Conflict, match="revoked"):
        store.rotate_kpm(rec(1).kpm_id, kpm(9))
    assert store.get_enrolee(rec(1).kpm_id).state == "revoked"
    assert store.enrolees_with_kpm(kpm(9)) == []


def test_delete_frees_the_ids_and_logs_the_keys(store):
    store.add_enrolee(rec(1), kpm(1))
    store.put_enrolment_key(ke(1), rec(1).kpm_id, KE_MARK, T0, T0 + HOUR)
    assert store.delete_enrolee(rec(1).kpm_id, now=T0) == 1
    assert store.get_enrolee(rec(1).kpm_id) is None and not store.has_enrolee_id("/id-mn1")
    assert store._one("SELECT count(*) FROM enrolment_keys") == (0,)
    assert causes(store) == [(ke(1), "/id-mn1", "enrolee-deleted")]
    store.add_enrolee(rec(1), kpm(2))  # both IDs can be registered again
    with pytest.raises(NotFound):
        store.delete_enrolee("nobody")


def test_rotate_kpm(store):
    store.add_enrolee(rec(1), kpm(1))
    store.put_enrolment_key(ke(1), rec(1).kpm_id, KE_MARK, T0, T0 + HOUR)
    old = store.get_enrolee(rec(1).kpm_id)
    assert store.rotate_kpm(rec(1).kpm_id, kpm(7), now=T0) == 1
    assert store.enrolee_psk(rec(1).kpm_id) == kpm(7)  # the new Kpm at once, the old one never again
    assert store.enrolees_with_kpm(kpm(1)) == [] and store.enrolees_with_kpm(kpm(7)) == [rec(1).kpm_id]
    assert store.get_enrolee(rec(1).kpm_id).kpm_generation == old.kpm_generation + 1
    assert store.get_enrolment_key(ke(1), now=T0) is None
    assert causes(store) == [(ke(1), "/id-mn1", "kpm-rotated")]
    # a session that authenticated with the old Kpm (generation 1) cannot store a key afterwards
    with pytest.raises(AccessDenied, match="new Kpm"):
        store.put_enrolment_key(ke(2), rec(1).kpm_id, KE_MARK, T0, T0 + HOUR, kpm_generation=old.kpm_generation)
    assert store.enrolment_key_ids(rec(1).kpm_id) == []
    store.put_enrolment_key(ke(2), rec(1).kpm_id, KE_MARK, T0, T0 + HOUR, kpm_generation=old.kpm_generation + 1)
    with pytest.raises(NotFound):
        store.rotate_kpm("nobody", kpm(8))


def test_update_enrolee(store):
    store.add_enrolee(rec(1), kpm(1))
    changed = rec(1, registrar_cse_id="/id-in2", registrar_uri="https://in2.example.com/cse-in",
                  targets=[TargetGrant("/id-x", (22,))], allowed_app_ids=("Nmy-app", "Nother*"),
                  valid_until=T0, node_id="urn:dev:new")
    store.update_enrolee(changed)
    got = store.get_enrolee(rec(1).kpm_id)
    assert (got.registrar_cse_id, got.registrar_uri, got.targets, got.allowed_app_ids, got.valid_until,
            got.node_id) == ("/id-in2", "https://in2.example.com/cse-in", [TargetGrant("/id-x", (22,))],
                             ("Nmy-app", "Nother*"), T0, "urn:dev:new")
    assert got.public_dict()["allowedAppIDs"] == ["Nmy-app", "Nother*"]
    assert store.enrolee_psk(rec(1).kpm_id) is None  # valid_until T0 is past: no enrolment
    assert store.enrolees_with_node_id("urn:dev:new") == [rec(1).kpm_id]
    with pytest.raises(NotFound):
        store.update_enrolee(rec(2))


def test_revoke_one_key(store):
    store.add_enrolee(rec(1), kpm(1))
    store.put_enrolment_key(ke(1), rec(1).kpm_id, KE_MARK, T0, T0 + HOUR)
    store.put_enrolment_key(ke(2), rec(1).kpm_id, KE_MARK, T0, T0 + HOUR)
    assert store.revoke_key(ke(1), now=T0) == rec(1).kpm_id
    assert store.get_enrolment_key(ke(1), now=T0) is None
    assert store.get_enrolment_key(ke(2), now=T0) is not None
    assert causes(store) == [(ke(1), "/id-mn1", "key-revoked")]
    with pytest.raises(NotFound):
        store.revoke_key(ke(1))
    assert len(causes(store)) == 1


def test_re_enrolment_retires_earlier_keys_after_the_grace(store):
    store.add_enrolee(rec(1), kpm(1))
    grace = dt.timedelta(seconds=300)
    store.put_enrolment_key(ke(1), rec(1).kpm_id, KE_MARK, T0, T0 + 24 * HOUR, retire_after=grace)
    t1 = T0 + dt.timedelta(seconds=10)
    assert store.put_enrolment_key(ke(2), rec(1).kpm_id, KE_MARK, t1, t1 + 24 * HOUR, retire_after=grace) == []
    assert store.get_enrolment_key(ke(1), now=t1 + grace - dt.timedelta(seconds=1)) is not None  # in the grace
    assert store.get_enrolment_key(ke(1), now=t1 + grace) is None  # retired
    assert store.get_enrolment_key(ke(2), now=t1 + grace) is not None  # the new one is not
    # a third enrolment does not push the first key's retirement back
    t2 = t1 + dt.timedelta(seconds=100)
    store.put_enrolment_key(ke(3), rec(1).kpm_id, KE_MARK, t2, t2 + 24 * HOUR, retire_after=grace)
    assert store.get_enrolment_key(ke(1), now=t1 + grace) is None
    assert causes(store) == []  # nothing logged until the purge removes it
    counts = store.purge(now=t1 + grace)
    assert (counts.retired, counts.expired) == (1, 0)
    assert causes(store) == [(ke(1), "/id-mn1", "retired")]
    assert store.enrolment_key_ids(rec(1).kpm_id) == [ke(2), ke(3)]


def test_live_key_cap_retires_the_oldest_at_once(store):
    store.add_enrolee(rec(1), kpm(1))
    grace = dt.timedelta(seconds=300)
    for n in (1, 2):
        assert store.put_enrolment_key(ke(n), rec(1).kpm_id, KE_MARK, T0, T0 + HOUR, retire_after=grace,
                                       max_live_keys=2) == []
    assert store.put_enrolment_key(ke(3), rec(1).kpm_id, KE_MARK, T0, T0 + HOUR, retire_after=grace,
                                   max_live_keys=2) == [ke(1)]
    assert store.get_enrolment_key(ke(1), now=T0) is None
    assert store.get_enrolment_key(ke(2), now=T0) is not None and store.get_enrolment_key(ke(3), now=T0) is not None
    assert causes(store) == [(ke(1), "/id-mn1", "live-key-cap")]
    assert store.enrolment_key_ids(rec(1).kpm_id) == [ke(2), ke(3)]


def test_purge_logs_expiry_and_prunes_the_log(store):
    store.add_enrolee(rec(1), kpm(1))
    store.put_enrolment_key(ke(1), rec(1).kpm_id, KE_MARK, T0, T0 + HOUR)
    counts = store.purge(now=T0 + HOUR)
    assert (counts.expired, counts.retired, counts.log_rows) == (1, 0, 0)
    rows, newest = store.revocations_since(0)
    assert [(r.ke_id, r.cause, r.time) for r in rows] == [(ke(1), "expired", T0 + HOUR)] and newest == 1
    assert store.purge(now=T0 + HOUR + dt.timedelta(days=30), keep_log=dt.timedelta(days=30)).log_rows == 0
    assert store.purge(now=T0 + HOUR + dt.timedelta(days=30, seconds=1), keep_log=dt.timedelta(days=30)).log_rows == 1
    assert store.revocations_since(0) == ([], 1)  # the newest number survives the pruning


def test_purge_keeps_at_most_the_newest_rows_of_the_log(store, monkeypatch):
    import rspf.mef.store as store_module

    monkeypatch.setattr(store_module, "PURGE_BATCH", 3)  # the cap holds across batches too
    store.add_enrolee(rec(1), kpm(1))
    for n in range(1, 11):
        store.put_enrolment_key(ke(n), rec(1).kpm_id, KE_MARK, T0, T0 + HOUR)
    store.purge(now=T0 + HOUR)  # ten expiries: ten log rows, all recent
    assert store.purge(now=T0 + HOUR, keep_rows=4).log_rows == 6
    rows, newest = store.revocations_since(0)
    assert [r.seq for r in rows] == [7, 8, 9, 10] and newest == 10  # the newest four stay
    assert store.purge(now=T0 + HOUR, keep_rows=4).log_rows == 0


def test_purge_works_in_batches(store, monkeypatch):
    import rspf.mef.store as store_module

    monkeypatch.setattr(store_module, "PURGE_BATCH", 3)
    store.add_enrolee(rec(1), kpm(1))
    for n in range(1, 11):
        store.put_enrolment_key(ke(n), rec(1).kpm_id, KE_MARK, T0, T0 + HOUR)
    assert store.purge(now=T0 + HOUR).expired == 10
    assert store.enrolment_key_ids(rec(1).kpm_id) == []
    assert [r.ke_id for r in store.revocations_since(0)[0]] == [ke(n) for n in range(1, 11)]


def test_revocations_since_pages_in_order(store):
    store.add_enrolee(rec(1), kpm(1))
    store.add_enrolee(rec(2), kpm(2))
    for n in range(1, 6):
        store.put_enrolment_key(ke(n), rec(1 + n % 2).kpm_id, KE_MARK, T0, T0 + HOUR)
    for n in range(1, 6):
        store.revoke_key(ke(n), now=T0)
    first, newest = store.revocations_since(0, limit=2)
    assert [r.seq for r in first] == [1, 2] and newest == 5
    rest, newest = store.revocations_since(first[-1].seq, limit=100)
    assert [r.seq for r in rest] == [3, 4, 5] and [r.ke_id for r in first + rest] == [ke(n) for n in range(1, 6)]
    assert [r.enrolee_id for r in first + rest] == ["/id-mn2", "/id-mn1", "/id-mn2", "/id-mn1", "/id-mn2"]
    assert store.revocations_since(5) == ([], 5)
    for bad in (0, -1, 10_001):
        with pytest.raises(BadRequest):
            store.revocations_since(0, limit=bad)


def test_revocation_numbers_are_never_reused_after_pruning(store):
    store.add_enrolee(rec(1), kpm(1))
    store.put_enrolment_key(ke(1), rec(1).kpm_id, KE_MARK, T0, T0 + HOUR)
    store.revoke_key(ke(1), now=T0)
    store.purge(now=T0 + dt.timedelta(days=60))
    assert store.revocations_since(0) == ([], 1)
    store.put_enrolment_key(ke(2), rec(1).kpm_id, KE_MARK, T0, T0 + 100 * 24 * HOUR)
    store.revoke_key(ke(2))
    rows, newest = store.revocations_since(0)
    assert [r.seq for r in rows] == [2] and newest == 2


def test_revocations_since_is_an_indexed_range_scan(sqlite_store):
    plan = " ".join(str(r[-1]) for r in sqlite_store._all(
        "EXPLAIN QUERY PLAN SELECT seq, ke_id, enrolee_id, cause, time FROM revocations WHERE seq > ?"
        " ORDER BY seq LIMIT ?", (0, 10)))
    assert "SEARCH revocations USING INTEGER PRIMARY KEY (rowid>?)" in plan, plan
    assert "TEMP B-TREE" not in plan, plan


def test_list_filters_and_paging(store):
    store.add_enrolee(rec(1), kpm(1))
    store.add_enrolee(rec(2, registrar_cse_id="/id-in2", valid_until=T0), kpm(2))
    store.add_enrolee(rec(3, valid_until=T0 + 48 * HOUR), kpm(3))
    store.suspend_enrolee(rec(3).kpm_id)
    assert [e.kpm_id for e in store.list_enrolees(state="suspended")] == [rec(3).kpm_id]
    assert [e.kpm_id for e in store.list_enrolees(registrar="/id-in2")] == [rec(2).kpm_id]
    assert [e.kpm_id for e in store.list_enrolees(expiring_before=T0 + HOUR)] == [rec(2).kpm_id]
    assert [e.kpm_id for e in store.list_enrolees(expiring_before=T0 + 72 * HOUR)] == [rec(2).kpm_id, rec(3).kpm_id]
    assert [e.kpm_id for e in store.list_enrolees(limit=2)] == [rec(1).kpm_id, rec(2).kpm_id]
    assert [e.kpm_id for e in store.list_enrolees(limit=2, offset=2)] == [rec(3).kpm_id]
    assert store.count_enrolees(state="active") == 2 and store.count_enrolees(registrar="/id-in2", state="active") == 1


def test_duplicate_kpm_and_node_id_lookups(store):
    store.add_enrolee(rec(1), kpm(1))
    store.add_enrolee(rec(2, node_id="urn:dev:1"), kpm(1))
    assert store.enrolees_with_kpm(kpm(1)) == [rec(1).kpm_id, rec(2).kpm_id]
    assert store.enrolees_with_kpm(kpm(3)) == []
    assert store.enrolees_with_node_id("urn:dev:1") == [rec(1).kpm_id, rec(2).kpm_id]
    # the fingerprint is keyed: the stored value is not a plain hash of the Kpm
    import hashlib

    stored = store._all("SELECT kpm_fingerprint FROM enrolees")
    assert all(row[0] != hashlib.sha256(kpm(1).reveal()).digest() for row in stored)
