"""The MEF's persistent store: the ONE place that touches the database (embedded SQLite).

Key material (Kpm, target PSKs, Ke) is sealed with AES-256-GCM under the MEF master key before it is
written; the database file and the master key file are created 0600. Every write is one transaction:
a batch import either lands whole or not at all.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import queue
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import Conflict, NotFound, StoreError
from ..fileutil import check_private, new_key_file, read_key_file
from ..sealing import Sealer
from ..secret import Secret

SCHEMA_VERSION = 1

_DDL = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS enrolees (
    kpm_id TEXT PRIMARY KEY,
    kpm BLOB NOT NULL,
    enrolee_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    registrar_cse_id TEXT NOT NULL,
    registrar_uri TEXT NOT NULL,
    targets TEXT NOT NULL,
    rm_uri TEXT,
    enrolment_expiry_seconds INTEGER,
    valid_until TEXT,
    revoked INTEGER NOT NULL DEFAULT 0,
    created TEXT NOT NULL,
    last_enrolled TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS enrolees_by_id ON enrolees(enrolee_id);
CREATE TABLE IF NOT EXISTS targets (
    psk_identity TEXT PRIMARY KEY,
    psk BLOB NOT NULL,
    target_id TEXT NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS enrolment_keys (
    ke_id TEXT PRIMARY KEY,
    kpm_id TEXT NOT NULL REFERENCES enrolees(kpm_id),
    ke BLOB NOT NULL,
    created TEXT NOT NULL,
    expires TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS keys_by_enrolee ON enrolment_keys(kpm_id);
"""


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _ts(when: dt.datetime | None) -> str | None:
    return when.astimezone(dt.UTC).isoformat() if when else None


def _from_ts(text: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(text) if text else None


@dataclass(frozen=True)
class TargetGrant:
    """An Enrolment Target (absolute CSE-ID / AE-ID) allowed to fetch keys for these SUIDs."""

    target_id: str
    suids: tuple[int, ...]


@dataclass
class EnroleeRecord:
    kpm_id: str
    enrolee_id: str
    node_id: str
    registrar_cse_id: str
    registrar_uri: str
    targets: list[TargetGrant] = field(default_factory=list)
    rm_uri: str | None = None
    enrolment_expiry_seconds: int | None = None
    valid_until: dt.datetime | None = None
    revoked: bool = False
    created: dt.datetime | None = None
    last_enrolled: dt.datetime | None = None

    @property
    def enrolee_type(self) -> str:
        return "CSE" if self.enrolee_id.startswith("/") else "AE"

    def public_dict(self) -> dict:
        """Everything about the enrolee except the key (for `show`, `list`, logs)."""
        return {
            "kpmID": self.kpm_id, "enroleeID": self.enrolee_id, "enroleeType": self.enrolee_type,
            "nodeID": self.node_id, "registrarCSEID": self.registrar_cse_id, "registrarURI": self.registrar_uri,
            "targets": [{"id": t.target_id, "suids": list(t.suids)} for t in self.targets],
            "remoteManagementURI": self.rm_uri, "enrolmentExpirySeconds": self.enrolment_expiry_seconds,
            "validUntil": _ts(self.valid_until), "revoked": self.revoked, "created": _ts(self.created),
            "lastEnrolled": _ts(self.last_enrolled),
        }


@dataclass
class TargetRecord:
    psk_identity: str
    target_id: str
    revoked: bool = False
    created: dt.datetime | None = None


@dataclass
class EnrolmentKeyRecord:
    ke_id: str
    kpm_id: str
    enrolment_key: Secret
    created: dt.datetime
    expires: dt.datetime


class MefStore:
    """SQLite store. Thread-safe: a pool of connections (each used by one thread at a time), WAL journal,
    short transactions serialized by one write lock."""

    def __init__(self, database: Path, master_key_file: Path, *, create: bool = True) -> None:
        self.path = Path(database)
        if not self.path.exists() and not create:
            raise StoreError(f"the MEF database {self.path} does not exist")
        key_path = Path(master_key_file)
        if key_path.exists():
            master = read_key_file(key_path, "MEF master key file")
        elif create and not self.path.exists():
            master = new_key_file(key_path)
        else:
            raise StoreError(
                f"the MEF master key file {key_path} is missing but the database {self.path} exists; "
                "without it the stored keys cannot be opened"
            )
        self._sealer = Sealer(master, b"mef store")
        self._pool: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._write_lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
        check_private(self.path, "MEF database")
        with self._write_lock, self._borrow() as db:
            db.executescript(_DDL)  # executescript commits by itself: run it outside a transaction
        with self._tx() as db:
            row = db.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise StoreError(f"{self.path} has schema version {row[0]}; this MEF reads {SCHEMA_VERSION}")
            # A sealed check value proves at open time that the master key is the one the data was sealed with.
            check = db.execute("SELECT value FROM meta WHERE name='key_check'").fetchone()
            if check is None:
                db.execute("INSERT INTO meta VALUES ('key_check', ?)",
                           (self._sealer.seal(b"onem2m-rspf key check", b"meta:key_check").hex(),))
            else:
                try:
                    self._sealer.open(bytes.fromhex(check[0]), b"meta:key_check")
                except StoreError:
                    raise StoreError(f"the master key {key_path} does not open the database {self.path} "
                                     "(wrong or replaced key file)") from None

    # -- plumbing -------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        return db

    @contextmanager
    def _borrow(self) -> Iterator[sqlite3.Connection]:
        """A pooled connection for this thread's exclusive use until the block ends."""
        try:
            db = self._pool.get_nowait()
        except queue.Empty:
            db = self._connect()
        try:
            yield db
        finally:
            self._pool.put(db)

    def _one(self, sql: str, params: tuple = ()) -> tuple | None:
        with self._borrow() as db:
            return db.execute(sql, params).fetchone()

    def _all(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._borrow() as db:
            return db.execute(sql, params).fetchall()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any exception)."""
        with self._write_lock, self._borrow() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def close(self) -> None:
        while True:
            try:
                self._pool.get_nowait().close()
            except queue.Empty:
                return

    # -- enrolees -------------------------------------------------------------------------------
    def add_enrolees(self, items: Iterable[tuple[EnroleeRecord, Secret]]) -> int:
        """Insert all enrolees in one transaction; a duplicate anywhere aborts the whole batch."""
        now = _ts(utcnow())
        n = 0
        with self._tx() as db:
            for rec, kpm in items:
                self._check_free(db, rec.kpm_id)
                if db.execute("SELECT 1 FROM enrolees WHERE enrolee_id=?", (rec.enrolee_id,)).fetchone():
                    raise Conflict(f"an enrolee with Enrolee-ID {rec.enrolee_id} already exists")
                db.execute(
                    "INSERT INTO enrolees (kpm_id, kpm, enrolee_id, node_id, registrar_cse_id, registrar_uri,"
                    " targets, rm_uri, enrolment_expiry_seconds, valid_until, revoked, created)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,0,?)",
                    (rec.kpm_id, self._sealer.seal(kpm.reveal(), b"kpm:" + rec.kpm_id.encode()), rec.enrolee_id,
                     rec.node_id, rec.registrar_cse_id, rec.registrar_uri,
                     json.dumps([[t.target_id, list(t.suids)] for t in rec.targets]), rec.rm_uri,
                     rec.enrolment_expiry_seconds, _ts(rec.valid_until), now),
                )
                n += 1
        return n

    def add_enrolee(self, rec: EnroleeRecord, kpm: Secret) -> None:
        self.add_enrolees([(rec, kpm)])

    @staticmethod
    def _check_free(db: sqlite3.Connection, identity: str) -> None:
        if db.execute("SELECT 1 FROM enrolees WHERE kpm_id=?", (identity,)).fetchone() or db.execute(
            "SELECT 1 FROM targets WHERE psk_identity=?", (identity,)
        ).fetchone():
            raise Conflict(f"the PSK identity {identity} is already registered")

    _ENROLEE_COLS = ("kpm_id, enrolee_id, node_id, registrar_cse_id, registrar_uri, targets, rm_uri,"
                     " enrolment_expiry_seconds, valid_until, revoked, created, last_enrolled")

    @staticmethod
    def _enrolee(row: tuple) -> EnroleeRecord:
        return EnroleeRecord(
            kpm_id=row[0], enrolee_id=row[1], node_id=row[2], registrar_cse_id=row[3], registrar_uri=row[4],
            targets=[TargetGrant(t, tuple(s)) for t, s in json.loads(row[5])], rm_uri=row[6],
            enrolment_expiry_seconds=row[7], valid_until=_from_ts(row[8]), revoked=bool(row[9]),
            created=_from_ts(row[10]), last_enrolled=_from_ts(row[11]),
        )

    def get_enrolee(self, kpm_id: str) -> EnroleeRecord | None:
        row = self._one(f"SELECT {self._ENROLEE_COLS} FROM enrolees WHERE kpm_id=?", (kpm_id,))
        return self._enrolee(row) if row else None

    def has_enrolee_id(self, enrolee_id: str) -> bool:
        return self._one("SELECT 1 FROM enrolees WHERE enrolee_id=?", (enrolee_id,)) is not None

    def list_enrolees(self) -> list[EnroleeRecord]:
        rows = self._all(f"SELECT {self._ENROLEE_COLS} FROM enrolees ORDER BY kpm_id")
        return [self._enrolee(r) for r in rows]

    def count_enrolees(self) -> int:
        row = self._one("SELECT count(*) FROM enrolees")
        return int(row[0]) if row else 0

    def enrolee_psk(self, kpm_id: str, now: dt.datetime | None = None) -> Secret | None:
        """Kpm of an enrolee that may enrol now (exists, not revoked, not past valid_until)."""
        found = self.enrolee_and_psk(kpm_id, now)
        return found[1] if found else None

    def enrolee_and_psk(self, kpm_id: str, now: dt.datetime | None = None) -> tuple[EnroleeRecord, Secret] | None:
        """The record and Kpm of an enrolee that may enrol now, in one query (the handshake's hot path)."""
        row = self._one(f"SELECT {self._ENROLEE_COLS}, kpm FROM enrolees WHERE kpm_id=?", (kpm_id,))
        if row is None:
            return None
        rec = self._enrolee(row)
        if rec.revoked or (rec.valid_until is not None and (now or utcnow()) >= rec.valid_until):
            return None
        return rec, Secret(self._sealer.open(row[-1], b"kpm:" + kpm_id.encode()), "Kpm")

    def revoke_enrolee(self, kpm_id: str) -> None:
        """Revoke an enrolee and every Enrolment Key it holds (fetchCredentials then answers NOT_FOUND)."""
        with self._tx() as db:
            cur = db.execute("UPDATE enrolees SET revoked=1 WHERE kpm_id=?", (kpm_id,))
            if cur.rowcount == 0:
                raise NotFound(f"no enrolee has the KpmID {kpm_id}")
            db.execute("DELETE FROM enrolment_keys WHERE kpm_id=?", (kpm_id,))

    # -- enrolment targets ----------------------------------------------------------------------
    def add_target(self, rec: TargetRecord, psk: Secret) -> None:
        with self._tx() as db:
            self._check_free(db, rec.psk_identity)
            db.execute(
                "INSERT INTO targets (psk_identity, psk, target_id, revoked, created) VALUES (?,?,?,0,?)",
                (rec.psk_identity, self._sealer.seal(psk.reveal(), b"target:" + rec.psk_identity.encode()),
                 rec.target_id, _ts(utcnow())),
            )

    def get_target(self, psk_identity: str) -> TargetRecord | None:
        row = self._one("SELECT psk_identity, target_id, revoked, created FROM targets WHERE psk_identity=?",
                        (psk_identity,))
        return TargetRecord(row[0], row[1], bool(row[2]), _from_ts(row[3])) if row else None

    def list_targets(self) -> list[TargetRecord]:
        rows = self._all("SELECT psk_identity, target_id, revoked, created FROM targets ORDER BY psk_identity")
        return [TargetRecord(r[0], r[1], bool(r[2]), _from_ts(r[3])) for r in rows]

    def target_psk(self, psk_identity: str) -> Secret | None:
        row = self._one("SELECT psk, revoked FROM targets WHERE psk_identity=?", (psk_identity,))
        if row is None or row[1]:
            return None
        return Secret(self._sealer.open(row[0], b"target:" + psk_identity.encode()), "target PSK")

    def revoke_target(self, psk_identity: str) -> None:
        with self._tx() as db:
            if db.execute("UPDATE targets SET revoked=1 WHERE psk_identity=?", (psk_identity,)).rowcount == 0:
                raise NotFound(f"no Enrolment Target has the PSK identity {psk_identity}")

    # -- enrolment keys -------------------------------------------------------------------------
    def put_enrolment_key(self, ke_id: str, kpm_id: str, ke: Secret, created: dt.datetime,
                          expires: dt.datetime) -> None:
        sealed = self._sealer.seal(ke.reveal(), b"ke:" + ke_id.encode())
        with self._tx() as db:
            try:
                db.execute("INSERT INTO enrolment_keys (ke_id, kpm_id, ke, created, expires) VALUES (?,?,?,?,?)",
                           (ke_id, kpm_id, sealed, _ts(created), _ts(expires)))
            except sqlite3.IntegrityError as exc:
                if "UNIQUE" in str(exc):
                    raise Conflict("this KeID is already in use") from None  # 2^-128 chance; never overwrite a key
                raise StoreError(f"no enrolee has the KpmID {kpm_id}") from None
            db.execute("UPDATE enrolees SET last_enrolled=? WHERE kpm_id=?", (_ts(created), kpm_id))

    def get_enrolment_key(self, ke_id: str, now: dt.datetime | None = None) -> EnrolmentKeyRecord | None:
        """A live (unexpired, enrolee not revoked) Enrolment Key, or None."""
        row = self._one("SELECT k.ke_id, k.kpm_id, k.ke, k.created, k.expires, e.revoked FROM enrolment_keys k"
            " JOIN enrolees e ON e.kpm_id = k.kpm_id WHERE k.ke_id=?", (ke_id,))
        if row is None or row[5]:
            return None
        expires = _from_ts(row[4])
        assert expires is not None
        if (now or utcnow()) >= expires:
            return None
        return EnrolmentKeyRecord(row[0], row[1], Secret(self._sealer.open(row[2], b"ke:" + row[0].encode()), "Ke"),
                                  _from_ts(row[3]), expires)  # type: ignore[arg-type]

    def purge_expired_keys(self, now: dt.datetime | None = None) -> int:
        with self._tx() as db:
            return db.execute("DELETE FROM enrolment_keys WHERE expires <= ?", (_ts(now or utcnow()),)).rowcount
