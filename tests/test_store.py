"""rspf.mef.store: the MEF's SQLite store (sealed keys, atomic batches, revocation, expiry)."""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import stat

import pytest

from rspf.errors import ConfigError, Conflict, NotFound, StoreError
from rspf.fileutil import new_key_file
from rspf.mef.store import EnroleeRecord, MefStore, TargetGrant, TargetRecord
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


def test_db_and_master_key_created_0600_even_with_open_umask(paths):
    db, mk = paths
    old = os.umask(0)
    try:
        s = MefStore(db, mk)
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
        MefStore(*paths, create=False)
    assert not paths[0].exists() and not paths[1].exists()


def test_group_readable_database_is_refused(paths):
    MefStore(*paths).close()
    os.chmod(paths[0], 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        MefStore(*paths)


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
    assert got.revoked is False and got.created is not None and got.last_enrolled is None
    assert store.get_enrolee(r2.kpm_id).enrolee_type == "AE"
    assert [e.kpm_id for e in store.list_enrolees()] == sorted([r1.kpm_id, r2.kpm_id])
    assert store.count_enrolees() == 2
    assert store.has_enrolee_id("Csensor") and not store.has_enrolee_id("/id-nope")
    assert store.get_enrolee("nobody") is None
    assert store.enrolee_psk(r1.kpm_id) == kpm(1)
    assert store.enrolee_psk(r2.kpm_id) == kpm(2)
    assert store.enrolee_psk("nobody") is None
    assert "kpm" not in {k.lower() for k in got.public_dict()}


def test_keys_are_not_stored_in_plaintext(store, tmp_path):
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
    assert store.get_enrolee(rec(1).kpm_id).revoked is True
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
    assert store.purge_expired_keys(now=t0 + dt.timedelta(hours=2)) == 1
    assert store.get_enrolment_key("02" * 16 + "@x.example", now=t0) is not None


def test_store_survives_reopen(paths):
    s = MefStore(*paths)
    s.add_enrolee(rec(1, targets=[TargetGrant("/id-x", (23,))]), kpm(1))
    s.add_target(TargetRecord("in@sp.example.com", "/id-in"), PSK_MARK)
    t0 = dt.datetime.now(UTC).replace(microsecond=0)
    s.put_enrolment_key("ab" * 16 + "@mef.example.com", rec(1).kpm_id, KE_MARK, t0, t0 + dt.timedelta(days=1))
    s.close()
    s2 = MefStore(*paths, create=False)
    assert s2.get_enrolee(rec(1).kpm_id).targets == [TargetGrant("/id-x", (23,))]
    assert s2.enrolee_psk(rec(1).kpm_id) == kpm(1)
    assert s2.target_psk("in@sp.example.com") == PSK_MARK
    assert s2.get_enrolment_key("ab" * 16 + "@mef.example.com").enrolment_key == KE_MARK
    s2.close()


def _replace_master_key(mk) -> None:
    mk.unlink()
    new_key_file(mk)


def test_different_master_key_cannot_open_the_keys(paths):
    s = MefStore(*paths)
    s.add_enrolee(rec(1), kpm(1))
    s.add_target(TargetRecord("in@sp.example.com", "/id-in"), PSK_MARK)
    s.close()
    _replace_master_key(paths[1])
    # the replaced key is refused when the store opens, before any sealed row could be misread
    with pytest.raises(StoreError, match="does not open the database"):
        MefStore(*paths)


def test_opening_with_a_different_master_key_is_store_error(paths):
    s = MefStore(*paths)
    s.add_enrolee(rec(1), kpm(1))
    s.close()
    _replace_master_key(paths[1])
    with pytest.raises(StoreError):
        MefStore(*paths)


def test_missing_master_key_with_existing_db_is_store_error(paths):
    MefStore(*paths).close()
    paths[1].unlink()
    with pytest.raises(StoreError, match="master key"):
        MefStore(*paths)
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
