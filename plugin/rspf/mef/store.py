"""The MEF's persistent store: the ONE place that touches the database (embedded SQLite).

Key material (Kpm, target PSKs, Ke) is sealed with AES-256-GCM under the MEF master key before it is
written; the database file and the master key file are created 0600. Every write is one transaction:
a batch import either lands whole or not at all.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AccessDenied, BadRequest, Conflict, NotFound, StoreError
from ..fileutil import check_private, new_key_file, read_key_file
from ..sealing import Sealer
from ..secret import Secret

log = logging.getLogger(__name__)

SCHEMA_VERSION = 4

#: The ``kpm`` and ``kpm_fingerprint`` of an enrolee that has no Kpm (it authenticates by certificate only)
NO_KPM = b""

#: Enrolee states: ``active`` enrols and its keys are served; ``suspended`` neither (until resumed; its keys
#: stay stored and are served again after resume if still live); ``revoked`` is final (its keys are deleted).
ACTIVE, SUSPENDED, REVOKED = "active", "suspended", "revoked"
STATES = (ACTIVE, SUSPENDED, REVOKED)

#: Causes written to the revocation log (why a KeID stopped being usable)
CAUSE_ENROLEE_REVOKED = "enrolee-revoked"
CAUSE_KEY_REVOKED = "key-revoked"
CAUSE_SUSPENDED = "enrolee-suspended"
CAUSE_DELETED = "enrolee-deleted"
CAUSE_KPM_ROTATED = "kpm-rotated"
CAUSE_RETIRED = "retired"              # replaced by a re-enrolment, after the grace
CAUSE_LIVE_KEY_CAP = "live-key-cap"    # replaced by a re-enrolment beyond the cap of live keys, at once
CAUSE_EXPIRED = "expired"
CAUSE_CERT_REVOKED = "certificate-revoked"  # an issued certificate revoked by the operator
CAUSE_SUPERSEDED = "superseded"            # an issued certificate replaced by its renewal (simplereenroll)

#: States of an issued certificate
CERT_ACTIVE, CERT_REVOKED = "active", "revoked"

_DDL = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS enrolees (
    kpm_id TEXT PRIMARY KEY,
    kpm BLOB NOT NULL,
    kpm_fingerprint BLOB NOT NULL,
    kpm_generation INTEGER NOT NULL DEFAULT 1,
    enrolee_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    registrar_cse_id TEXT NOT NULL,
    registrar_uri TEXT NOT NULL,
    targets TEXT NOT NULL,
    rm_uri TEXT,
    enrolment_expiry_seconds INTEGER,
    valid_until TEXT,
    state TEXT NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'suspended', 'revoked')),
    allowed_app_ids TEXT,
    created TEXT NOT NULL,
    last_enrolled TEXT,
    cert_id TEXT,
    may_certify INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS enrolees_by_id ON enrolees(enrolee_id);
CREATE UNIQUE INDEX IF NOT EXISTS enrolees_by_cert ON enrolees(cert_id) WHERE cert_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS enrolees_by_node ON enrolees(node_id);
CREATE INDEX IF NOT EXISTS enrolees_by_kpm ON enrolees(kpm_fingerprint);
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
    expires TEXT NOT NULL,
    retire_at TEXT
);
CREATE INDEX IF NOT EXISTS keys_by_enrolee ON enrolment_keys(kpm_id);
CREATE INDEX IF NOT EXISTS keys_by_expiry ON enrolment_keys(expires);
CREATE INDEX IF NOT EXISTS keys_by_retirement ON enrolment_keys(retire_at) WHERE retire_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS revocations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ke_id TEXT,
    enrolee_id TEXT NOT NULL,
    cause TEXT NOT NULL,
    time TEXT NOT NULL,
    cert_sha256 TEXT,
    CHECK ((ke_id IS NULL) != (cert_sha256 IS NULL))
);
CREATE INDEX IF NOT EXISTS revocations_by_time ON revocations(time);
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL UNIQUE,
    kpm_id TEXT NOT NULL,
    enrolee_id TEXT NOT NULL,
    subject TEXT NOT NULL,
    app_id TEXT,
    not_before TEXT NOT NULL,
    not_after TEXT NOT NULL,
    issued TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'revoked')),
    revoked_at TEXT,
    cause TEXT,
    der BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS certificates_by_enrolee ON certificates(kpm_id);
CREATE INDEX IF NOT EXISTS certificates_by_expiry ON certificates(not_after);
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
    #: the enrolee's handle at this MEF: its KpmID (the psk_identity of its Kpm), or for an enrolee without a
    #: Kpm its certificate ID
    kpm_id: str
    enrolee_id: str
    node_id: str
    registrar_cse_id: str
    registrar_uri: str
    targets: list[TargetGrant] = field(default_factory=list)
    rm_uri: str | None = None
    enrolment_expiry_seconds: int | None = None
    valid_until: dt.datetime | None = None
    state: str = ACTIVE
    #: App-ID patterns this enrolee may register with (sent to Targets with its keys); None: not set
    allowed_app_ids: tuple[str, ...] | None = None
    created: dt.datetime | None = None
    last_enrolled: dt.datetime | None = None
    #: 1 for the Kpm the enrolee was registered with, +1 at each rotation (a session proves which one it used)
    kpm_generation: int = 1
    #: the oneM2M ID its certificate names (rspf.tls.certificate_onem2m_id), when it may authenticate with one
    cert_id: str | None = None
    #: whether it holds a Kpm (False: certificate only)
    has_kpm: bool = True
    #: whether the MEF's CA may issue it a certificate (certificate provisioning, docs/certificates.md)
    may_certify: bool = False

    def may_enrol(self, now: dt.datetime | None = None) -> bool:
        """Active and not past ``valid_until``."""
        return self.state == ACTIVE and (self.valid_until is None or (now or utcnow()) < self.valid_until)

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
            "validUntil": _ts(self.valid_until), "state": self.state,
            "allowedAppIDs": list(self.allowed_app_ids) if self.allowed_app_ids is not None else None,
            "kpmGeneration": self.kpm_generation, "created": _ts(self.created),
            "lastEnrolled": _ts(self.last_enrolled), "certificateID": self.cert_id, "hasKpm": self.has_kpm,
            "certificates": self.may_certify,
        }


@dataclass
class TargetRecord:
    psk_identity: str
    target_id: str
    revoked: bool = False
    created: dt.datetime | None = None

    def public_dict(self) -> dict:
        """Everything about the Target credential except its PSK."""
        return {"pskIdentity": self.psk_identity, "targetID": self.target_id,
                "state": "revoked" if self.revoked else "active", "created": _ts(self.created)}


@dataclass
class EnrolmentKeyRecord:
    ke_id: str
    kpm_id: str
    enrolment_key: Secret
    created: dt.datetime
    expires: dt.datetime
    retire_at: dt.datetime | None = None


@dataclass(frozen=True)
class Revocation:
    """One row of the revocation log: KeID ``ke_id`` -- or the issued certificate ``cert_sha256`` -- of
    ``enrolee_id`` stopped being usable at ``time``."""

    seq: int
    ke_id: str | None
    enrolee_id: str
    cause: str
    time: dt.datetime
    cert_sha256: str | None = None


@dataclass(frozen=True)
class CertificateRecord:
    """A certificate the MEF's CA issued (rspf.mef.ca), as recorded."""

    serial: str
    sha256: str
    kpm_id: str
    enrolee_id: str
    subject: str
    app_id: str | None
    not_before: dt.datetime
    not_after: dt.datetime
    issued: dt.datetime
    state: str
    revoked_at: dt.datetime | None
    cause: str | None
    der: bytes

    def public_dict(self) -> dict:
        return {"serial": self.serial, "sha256": self.sha256, "kpmID": self.kpm_id, "enroleeID": self.enrolee_id,
                "subject": self.subject, "appID": self.app_id, "notBefore": _ts(self.not_before),
                "notAfter": _ts(self.not_after), "issued": _ts(self.issued), "state": self.state,
                "revokedAt": _ts(self.revoked_at), "cause": self.cause}


@dataclass(frozen=True)
class StoreStats:
    """How much the database holds (for metrics): enrolees by state, Enrolment Keys usable now and stored
    (usable or waiting for the purge), revocation log rows and the newest sequence number ever written."""

    enrolees: dict[str, int]
    keys_live: int
    keys_stored: int
    revocation_rows: int
    revocation_newest: int


@dataclass(frozen=True)
class PurgeCounts:
    expired: int = 0
    retired: int = 0
    log_rows: int = 0


#: Most rows one purge transaction deletes (the write lock is released between batches)
PURGE_BATCH = 2000
#: Most rows one revocations_since call returns
MAX_REVOCATIONS_PAGE = 10_000


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
        # keyed fingerprints find a repeated Kpm without unsealing every stored one (and say nothing without the key)
        self._fingerprint_key = Secret(hmac.new(master.reveal(), b"onem2m-rspf mef kpm fingerprint",
                                                hashlib.sha256).digest(), "fingerprint key")
        self._pool: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._write_lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
        check_private(self.path, "MEF database")
        with self._tx() as db:
            db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
            row = db.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
            version = int(row[0]) if row else None
            if version is not None and version not in (1, 2, 3, SCHEMA_VERSION):
                raise StoreError(f"{self.path} has schema version {version}; this MEF reads {SCHEMA_VERSION}")
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
            if version == SCHEMA_VERSION:
                return
            if version == 1:
                self._migrate_v1(db)
            if version in (1, 2):
                self._migrate_v2(db)
            if version in (1, 2, 3):
                self._migrate_v3(db)
            for statement in _DDL.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    def _migrate_v1(self, db: sqlite3.Connection) -> None:
        """Schema 1 -> 2 in place, inside the opening transaction: enrolee state (from ``revoked``), allowed
        App-IDs, Kpm generation and fingerprint; key retirement times; the revocation log (created by the DDL)."""
        db.execute("ALTER TABLE enrolees ADD COLUMN kpm_fingerprint BLOB NOT NULL DEFAULT x''")
        db.execute("ALTER TABLE enrolees ADD COLUMN kpm_generation INTEGER NOT NULL DEFAULT 1")
        db.execute("ALTER TABLE enrolees ADD COLUMN state TEXT NOT NULL DEFAULT 'active'"
                   " CHECK (state IN ('active', 'suspended', 'revoked'))")
        db.execute("ALTER TABLE enrolees ADD COLUMN allowed_app_ids TEXT")
        db.execute("UPDATE enrolees SET state='revoked' WHERE revoked != 0")
        db.execute("ALTER TABLE enrolees DROP COLUMN revoked")
        for kpm_id, sealed in db.execute("SELECT kpm_id, kpm FROM enrolees").fetchall():
            kpm = self._sealer.open(sealed, b"kpm:" + kpm_id.encode())
            db.execute("UPDATE enrolees SET kpm_fingerprint=? WHERE kpm_id=?", (self._fingerprint(kpm), kpm_id))
        db.execute("ALTER TABLE enrolment_keys ADD COLUMN retire_at TEXT")
        log.info("migrated the MEF database %s from schema version 1 to 2", self.path)

    def _migrate_v2(self, db: sqlite3.Connection) -> None:
        """Schema 2 -> 3 in place, inside the opening transaction: the enrolees' certificate IDs (none yet; the
        unique index on them is created by the DDL). Every existing enrolee keeps its Kpm."""
        db.execute("ALTER TABLE enrolees ADD COLUMN cert_id TEXT")
        log.info("migrated the MEF database %s from schema version 2 to 3", self.path)

    def _migrate_v3(self, db: sqlite3.Connection) -> None:
        """Schema 3 -> 4 in place, inside the opening transaction: the enrolees' certificate entitlement (none),
        and revocation log rows that name a KeID or an issued certificate (the log is copied with its sequence
        numbers, and the newest number ever written is kept). The certificates table is created by the DDL."""
        db.execute("ALTER TABLE enrolees ADD COLUMN may_certify INTEGER NOT NULL DEFAULT 0")
        if db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='revocations'").fetchone() is None:
            log.info("migrated the MEF database %s to schema version %d", self.path, SCHEMA_VERSION)
            return  # a version 1 database: the DDL creates the log
        newest = db.execute("SELECT seq FROM sqlite_sequence WHERE name='revocations'").fetchone()
        db.execute("ALTER TABLE revocations RENAME TO revocations_v3")
        db.execute("DROP INDEX IF EXISTS revocations_by_time")
        for statement in _DDL.split(";"):
            if "revocations" in statement and statement.strip():
                db.execute(statement)
        db.execute("INSERT INTO revocations (seq, ke_id, enrolee_id, cause, time) SELECT seq, ke_id, enrolee_id,"
                   " cause, time FROM revocations_v3")
        db.execute("DROP TABLE revocations_v3")
        if newest is not None:
            db.execute("UPDATE sqlite_sequence SET seq=? WHERE name='revocations'", (int(newest[0]),))
            if db.execute("SELECT changes()").fetchone()[0] == 0:
                db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('revocations', ?)", (int(newest[0]),))
        log.info("migrated the MEF database %s from schema version 3 to %d", self.path, SCHEMA_VERSION)

    def _fingerprint(self, kpm: bytes) -> bytes:
        return hmac.new(self._fingerprint_key.reveal(), kpm, hashlib.sha256).digest()

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
    def add_enrolees(self, items: Iterable[tuple[EnroleeRecord, Secret | None]]) -> int:
        """Insert all enrolees in one transaction; a duplicate anywhere aborts the whole batch. An enrolee without
        a Kpm (None) must have a certificate ID."""
        now = _ts(utcnow())
        n = 0
        with self._tx() as db:
            for rec, kpm in items:
                if kpm is None and rec.cert_id is None:
                    raise BadRequest(f"the enrolee {rec.kpm_id} needs a Kpm or a certificate ID")
                if rec.cert_id is not None and db.execute("SELECT 1 FROM enrolees WHERE cert_id=?",
                                                          (rec.cert_id,)).fetchone():
                    raise Conflict(f"an enrolee with the certificate ID {rec.cert_id} already exists")
                self._check_free(db, rec.kpm_id)
                if db.execute("SELECT 1 FROM enrolees WHERE enrolee_id=?", (rec.enrolee_id,)).fetchone():
                    raise Conflict(f"an enrolee with Enrolee-ID {rec.enrolee_id} already exists")
                sealed, fingerprint = ((NO_KPM, NO_KPM) if kpm is None else
                                       (self._seal_kpm(rec.kpm_id, kpm), self._fingerprint(kpm.reveal())))
                db.execute(
                    "INSERT INTO enrolees (kpm_id, kpm, kpm_fingerprint, enrolee_id, node_id, registrar_cse_id,"
                    " registrar_uri, targets, rm_uri, enrolment_expiry_seconds, valid_until, state, allowed_app_ids,"
                    " may_certify, created, cert_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,'active',?,?,?,?)",
                    (rec.kpm_id, sealed, fingerprint, rec.enrolee_id, *self._mutable_values(rec), now, rec.cert_id),
                )
                n += 1
        return n

    def add_enrolee(self, rec: EnroleeRecord, kpm: Secret | None) -> None:
        self.add_enrolees([(rec, kpm)])

    def _seal_kpm(self, kpm_id: str, kpm: Secret) -> bytes:
        return self._sealer.seal(kpm.reveal(), b"kpm:" + kpm_id.encode())

    @staticmethod
    def _mutable_values(rec: EnroleeRecord) -> tuple:
        """node_id ... may_certify, in the column order of add_enrolees and update_enrolee."""
        return (rec.node_id, rec.registrar_cse_id, rec.registrar_uri,
                json.dumps([[t.target_id, list(t.suids)] for t in rec.targets]), rec.rm_uri,
                rec.enrolment_expiry_seconds, _ts(rec.valid_until),
                json.dumps(list(rec.allowed_app_ids)) if rec.allowed_app_ids is not None else None,
                int(rec.may_certify))

    def update_enrolee(self, rec: EnroleeRecord) -> None:
        """Write the changeable fields of an enrolee (everything but its KpmID, Kpm, Enrolee-ID and state)."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE enrolees SET node_id=?, registrar_cse_id=?, registrar_uri=?, targets=?, rm_uri=?,"
                " enrolment_expiry_seconds=?, valid_until=?, allowed_app_ids=?, may_certify=? WHERE kpm_id=?",
                (*self._mutable_values(rec), rec.kpm_id))
            if cur.rowcount == 0:
                raise NotFound(f"no enrolee has the KpmID {rec.kpm_id}")

    @staticmethod
    def _check_free(db: sqlite3.Connection, identity: str) -> None:
        if db.execute("SELECT 1 FROM enrolees WHERE kpm_id=?", (identity,)).fetchone() or db.execute(
            "SELECT 1 FROM targets WHERE psk_identity=?", (identity,)
        ).fetchone():
            raise Conflict(f"the PSK identity {identity} is already registered")

    _ENROLEE_COLS = ("kpm_id, enrolee_id, node_id, registrar_cse_id, registrar_uri, targets, rm_uri,"
                     " enrolment_expiry_seconds, valid_until, state, allowed_app_ids, created, last_enrolled,"
                     " kpm_generation, cert_id, length(kpm) > 0, may_certify")

    @staticmethod
    def _enrolee(row: tuple) -> EnroleeRecord:
        return EnroleeRecord(
            kpm_id=row[0], enrolee_id=row[1], node_id=row[2], registrar_cse_id=row[3], registrar_uri=row[4],
            targets=[TargetGrant(t, tuple(s)) for t, s in json.loads(row[5])], rm_uri=row[6],
            enrolment_expiry_seconds=row[7], valid_until=_from_ts(row[8]), state=row[9],
            allowed_app_ids=tuple(json.loads(row[10])) if row[10] is not None else None,
            created=_from_ts(row[11]), last_enrolled=_from_ts(row[12]), kpm_generation=row[13], cert_id=row[14],
            has_kpm=bool(row[15]), may_certify=bool(row[16]),
        )

    def get_enrolee(self, kpm_id: str) -> EnroleeRecord | None:
        row = self._one(f"SELECT {self._ENROLEE_COLS} FROM enrolees WHERE kpm_id=?", (kpm_id,))
        return self._enrolee(row) if row else None

    def enrolee_by_certificate(self, cert_id: str) -> EnroleeRecord | None:
        """The enrolee registered with this certificate ID (in any state), or None."""
        row = self._one(f"SELECT {self._ENROLEE_COLS} FROM enrolees WHERE cert_id=?", (cert_id,))
        return self._enrolee(row) if row else None

    def has_enrolee_id(self, enrolee_id: str) -> bool:
        return self._one("SELECT 1 FROM enrolees WHERE enrolee_id=?", (enrolee_id,)) is not None

    @staticmethod
    def _where(conditions: list[tuple[str, Any]]) -> tuple[str, tuple]:
        """A WHERE clause of the conditions (``"column=?"``, value) whose value is not None, and its parameters."""
        used = [(clause, value) for clause, value in conditions if value is not None]
        return (" WHERE " + " AND ".join(c for c, _ in used) if used else ""), tuple(v for _, v in used)

    @classmethod
    def _filters(cls, state: str | None, registrar: str | None,
                 expiring_before: dt.datetime | None) -> tuple[str, tuple]:
        return cls._where([("state=?", state), ("registrar_cse_id=?", registrar),
                           ("valid_until IS NOT NULL AND valid_until < ?", _ts(expiring_before))])

    def list_enrolees(self, *, state: str | None = None, registrar: str | None = None,
                      expiring_before: dt.datetime | None = None, limit: int | None = None,
                      offset: int = 0) -> list[EnroleeRecord]:
        """Enrolees ordered by KpmID, optionally only those in ``state``, with registrar CSE-ID ``registrar``, or
        whose ``valid_until`` is before ``expiring_before``; ``limit`` and ``offset`` page through them."""
        where, params = self._filters(state, registrar, expiring_before)
        rows = self._all(f"SELECT {self._ENROLEE_COLS} FROM enrolees{where} ORDER BY kpm_id LIMIT ? OFFSET ?",
                         (*params, -1 if limit is None else limit, offset))
        return [self._enrolee(r) for r in rows]

    def count_enrolees(self, *, state: str | None = None, registrar: str | None = None,
                       expiring_before: dt.datetime | None = None) -> int:
        where, params = self._filters(state, registrar, expiring_before)
        row = self._one(f"SELECT count(*) FROM enrolees{where}", params)
        return int(row[0]) if row else 0

    def enrolees_with_kpm(self, kpm: Secret) -> list[str]:
        """KpmIDs of the enrolees that hold this very Kpm (found by keyed fingerprint)."""
        return [r[0] for r in self._all("SELECT kpm_id FROM enrolees WHERE kpm_fingerprint=? ORDER BY kpm_id",
                                        (self._fingerprint(kpm.reveal()),))]

    def enrolees_with_node_id(self, node_id: str) -> list[str]:
        return [r[0] for r in self._all("SELECT kpm_id FROM enrolees WHERE node_id=? ORDER BY kpm_id", (node_id,))]

    def enrolee_psk(self, kpm_id: str, now: dt.datetime | None = None) -> Secret | None:
        """Kpm of an enrolee that may enrol now (exists, active, not past valid_until)."""
        found = self.enrolee_and_psk(kpm_id, now)
        return found[1] if found else None

    def enrolee_and_psk(self, kpm_id: str, now: dt.datetime | None = None) -> tuple[EnroleeRecord, Secret] | None:
        """The record and Kpm of an enrolee that may enrol now, in one query (the handshake's hot path)."""
        row = self._one(f"SELECT {self._ENROLEE_COLS}, kpm FROM enrolees WHERE kpm_id=?", (kpm_id,))
        if row is None:
            return None
        rec = self._enrolee(row)
        if not rec.has_kpm or not rec.may_enrol(now):
            return None
        return rec, Secret(self._sealer.open(row[-1], b"kpm:" + kpm_id.encode()), "Kpm")

    def _state(self, db: sqlite3.Connection, kpm_id: str) -> str:
        row = db.execute("SELECT state FROM enrolees WHERE kpm_id=?", (kpm_id,)).fetchone()
        if row is None:
            raise NotFound(f"no enrolee has the KpmID {kpm_id}")
        return str(row[0])

    @staticmethod
    def _drop_keys(db: sqlite3.Connection, where: str, params: tuple, cause: str, now: dt.datetime,
                   *, delete: bool = True, limit: int = -1) -> int:
        """Write a revocation log row for each enrolment key matching ``where`` (and delete those keys)."""
        rows = db.execute("SELECT k.ke_id, e.enrolee_id FROM enrolment_keys k JOIN enrolees e ON e.kpm_id = k.kpm_id"
                          f" WHERE {where} ORDER BY k.rowid LIMIT ?", (*params, limit)).fetchall()
        when = _ts(now)
        db.executemany("INSERT INTO revocations (ke_id, enrolee_id, cause, time) VALUES (?,?,?,?)",
                       [(ke_id, enrolee_id, cause, when) for ke_id, enrolee_id in rows])
        if delete:
            db.executemany("DELETE FROM enrolment_keys WHERE ke_id=?", [(r[0],) for r in rows])
        return len(rows)

    _USABLE = "k.expires > ? AND (k.retire_at IS NULL OR k.retire_at > ?)"

    def revoke_enrolee(self, kpm_id: str, now: dt.datetime | None = None) -> int:
        """Revoke an enrolee for good and delete every Enrolment Key it holds (fetchCredentials then answers
        NOT_FOUND). Returns how many keys were deleted."""
        now = now or utcnow()
        with self._tx() as db:
            if self._state(db, kpm_id) == REVOKED:
                raise Conflict(f"the enrolee {kpm_id} is already revoked")
            db.execute("UPDATE enrolees SET state='revoked' WHERE kpm_id=?", (kpm_id,))
            self._revoke_certificates(db, "kpm_id=?", (kpm_id,), CAUSE_ENROLEE_REVOKED, now)
            return self._drop_keys(db, "k.kpm_id=?", (kpm_id,), CAUSE_ENROLEE_REVOKED, now)

    def suspend_enrolee(self, kpm_id: str, now: dt.datetime | None = None) -> int:
        """Stop an active enrolee: no enrolment, its keys are not served (they stay stored, for resume). Returns
        how many usable keys it held (each gets a revocation log row)."""
        now = now or utcnow()
        with self._tx() as db:
            state = self._state(db, kpm_id)
            if state != ACTIVE:
                raise Conflict(f"the enrolee {kpm_id} is {state}; only an active enrolee can be suspended")
            db.execute("UPDATE enrolees SET state='suspended' WHERE kpm_id=?", (kpm_id,))
            self._revoke_certificates(db, "kpm_id=?", (kpm_id,), CAUSE_SUSPENDED, now)
            return self._drop_keys(db, f"k.kpm_id=? AND {self._USABLE}", (kpm_id, _ts(now), _ts(now)),
                                   CAUSE_SUSPENDED, now, delete=False)

    def resume_enrolee(self, kpm_id: str) -> None:
        """Make a suspended enrolee active again (its keys still live are served again)."""
        with self._tx() as db:
            state = self._state(db, kpm_id)
            if state != SUSPENDED:
                raise Conflict(f"the enrolee {kpm_id} is {state}; only a suspended enrolee can be resumed")
            db.execute("UPDATE enrolees SET state='active' WHERE kpm_id=?", (kpm_id,))

    def delete_enrolee(self, kpm_id: str, now: dt.datetime | None = None) -> int:
        """Delete an enrolee and its keys (its KpmID and Enrolee-ID become free). Returns the keys deleted."""
        now = now or utcnow()
        with self._tx() as db:
            self._state(db, kpm_id)
            n = self._drop_keys(db, "k.kpm_id=?", (kpm_id,), CAUSE_DELETED, now)
            self._revoke_certificates(db, "kpm_id=?", (kpm_id,), CAUSE_DELETED, now)
            db.execute("DELETE FROM enrolees WHERE kpm_id=?", (kpm_id,))
            return n

    def rotate_kpm(self, kpm_id: str, kpm: Secret, now: dt.datetime | None = None) -> int:
        """Replace an enrolee's Kpm: the old one stops working at once (also for a session already open with
        it), and so do the Enrolment Keys made with it. Returns how many keys were deleted."""
        now = now or utcnow()
        with self._tx() as db:
            if self._state(db, kpm_id) == REVOKED:
                raise Conflict(f"the enrolee {kpm_id} is revoked; a revoked enrolee gets no new Kpm")
            if db.execute("SELECT length(kpm) = 0 FROM enrolees WHERE kpm_id=?", (kpm_id,)).fetchone()[0]:
                raise Conflict(f"the enrolee {kpm_id} authenticates by certificate and has no Kpm to rotate")
            db.execute("UPDATE enrolees SET kpm=?, kpm_fingerprint=?, kpm_generation=kpm_generation+1"
                       " WHERE kpm_id=?", (self._seal_kpm(kpm_id, kpm), self._fingerprint(kpm.reveal()), kpm_id))
            return self._drop_keys(db, "k.kpm_id=?", (kpm_id,), CAUSE_KPM_ROTATED, now)

    # -- issued certificates --------------------------------------------------------------------
    @staticmethod
    def _revoke_certificates(db: sqlite3.Connection, where: str, params: tuple, cause: str,
                             now: dt.datetime) -> int:
        """Revoke the active certificates matching ``where`` (a revocation log row each). How many."""
        rows = db.execute(f"SELECT sha256, enrolee_id FROM certificates WHERE state='active' AND {where}",
                          params).fetchall()
        when = _ts(now)
        db.executemany("UPDATE certificates SET state='revoked', revoked_at=?, cause=? WHERE sha256=?",
                       [(when, cause, sha) for sha, _ in rows])
        db.executemany("INSERT INTO revocations (cert_sha256, enrolee_id, cause, time) VALUES (?,?,?,?)",
                       [(sha, enrolee_id, cause, when) for sha, enrolee_id in rows])
        return len(rows)

    def record_certificate(self, kpm_id: str, serial: str, sha256: str, subject: str, app_id: str | None,
                           not_before: dt.datetime, not_after: dt.datetime, der: bytes, *,
                           supersedes: str | None = None, now: dt.datetime | None = None) -> None:
        """Record a certificate the CA issued to enrolee ``kpm_id``; the one it renews (``supersedes``, a SHA-256)
        is revoked in the same transaction. The enrolee must still be active."""
        now = now or utcnow()
        with self._tx() as db:
            row = db.execute("SELECT enrolee_id, state FROM enrolees WHERE kpm_id=?", (kpm_id,)).fetchone()
            if row is None or row[1] != ACTIVE:
                raise AccessDenied(f"the enrolee {kpm_id} is no longer active; no certificate was issued")
            if supersedes is not None and not self._revoke_certificates(db, "sha256=?", (supersedes,),
                                                                         CAUSE_SUPERSEDED, now):
                raise AccessDenied("the certificate being renewed was revoked meanwhile; no certificate was issued")
            db.execute("INSERT INTO certificates (serial, sha256, kpm_id, enrolee_id, subject, app_id, not_before,"
                       " not_after, issued, der) VALUES (?,?,?,?,?,?,?,?,?,?)",
                       (serial, sha256, kpm_id, row[0], subject, app_id, _ts(not_before), _ts(not_after), _ts(now),
                        der))

    _CERT_COLS = ("serial, sha256, kpm_id, enrolee_id, subject, app_id, not_before, not_after, issued, state,"
                  " revoked_at, cause, der")

    @staticmethod
    def _certificate(row: tuple) -> CertificateRecord:
        return CertificateRecord(row[0], row[1], row[2], row[3], row[4], row[5], _from_ts(row[6]) or utcnow(),
                                 _from_ts(row[7]) or utcnow(), _from_ts(row[8]) or utcnow(), row[9],
                                 _from_ts(row[10]), row[11], bytes(row[12]))

    def get_certificate(self, serial_or_sha256: str) -> CertificateRecord | None:
        """An issued certificate by its serial number (hex) or its SHA-256 (hex)."""
        key = serial_or_sha256.strip().lower().replace(":", "").lstrip("0") or "0"
        row = self._one(f"SELECT {self._CERT_COLS} FROM certificates WHERE serial=? OR sha256=?",
                        (key, serial_or_sha256.strip().lower()))
        return self._certificate(row) if row else None

    def list_certificates(self, *, kpm_id: str | None = None, state: str | None = None, limit: int | None = None,
                          offset: int = 0) -> list[CertificateRecord]:
        where, params = self._where([("kpm_id=?", kpm_id), ("state=?", state)])
        rows = self._all(f"SELECT {self._CERT_COLS} FROM certificates{where} ORDER BY issued, serial LIMIT ? OFFSET ?",
                         (*params, -1 if limit is None else limit, offset))
        return [self._certificate(r) for r in rows]

    def revoke_certificate(self, serial_or_sha256: str, now: dt.datetime | None = None) -> CertificateRecord:
        """Revoke one issued certificate (it goes out in the revocation feed)."""
        found = self.get_certificate(serial_or_sha256)
        if found is None:
            raise NotFound(f"no issued certificate has the serial number or SHA-256 {serial_or_sha256[:80]!r}")
        with self._tx() as db:
            if not self._revoke_certificates(db, "sha256=?", (found.sha256,), CAUSE_CERT_REVOKED, now or utcnow()):
                raise Conflict(f"the certificate {found.serial} is already revoked")
        revoked = self.get_certificate(found.sha256)
        assert revoked is not None
        return revoked

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
    def put_enrolment_key(self, ke_id: str, kpm_id: str, ke: Secret, created: dt.datetime, expires: dt.datetime,
                          *, kpm_generation: int | None = None, retire_after: dt.timedelta | None = None,
                          max_live_keys: int | None = None) -> list[str]:
        """Store a new Enrolment Key of an active enrolee, in one transaction with what re-enrolment does to its
        other keys: with ``retire_after`` they stop being usable that long after ``created`` (the grace), and
        with ``max_live_keys`` the oldest usable ones beyond that many (the new one included) stop at once.
        ``kpm_generation`` (the Kpm the session proved) must still be the enrolee's. Returns the KeIDs retired
        at once."""
        sealed = self._sealer.seal(ke.reveal(), b"ke:" + ke_id.encode())
        with self._tx() as db:
            row = db.execute("SELECT state, kpm_generation FROM enrolees WHERE kpm_id=?", (kpm_id,)).fetchone()
            if row is None:
                raise StoreError(f"no enrolee has the KpmID {kpm_id}")
            if row[0] != ACTIVE or (kpm_generation is not None and row[1] != kpm_generation):
                raise AccessDenied("the enrolee was suspended, revoked or given a new Kpm during this session; "
                                   "no Enrolment Key was stored")
            try:
                db.execute("INSERT INTO enrolment_keys (ke_id, kpm_id, ke, created, expires) VALUES (?,?,?,?,?)",
                           (ke_id, kpm_id, sealed, _ts(created), _ts(expires)))
            except sqlite3.IntegrityError:
                raise Conflict("this KeID is already in use") from None  # 2^-128 chance; never overwrite a key
            db.execute("UPDATE enrolees SET last_enrolled=? WHERE kpm_id=?", (_ts(created), kpm_id))
            if retire_after is not None:
                at = _ts(created + retire_after)
                db.execute("UPDATE enrolment_keys SET retire_at=? WHERE kpm_id=? AND ke_id != ?"
                           " AND (retire_at IS NULL OR retire_at > ?)", (at, kpm_id, ke_id, at))
            if max_live_keys is None:
                return []
            now = _ts(created)
            usable = db.execute(f"SELECT k.ke_id FROM enrolment_keys k WHERE k.kpm_id=? AND {self._USABLE}"
                                " ORDER BY k.rowid DESC", (kpm_id, now, now)).fetchall()
            over = [r[0] for r in usable[max_live_keys:]]
            if over:
                marks = ",".join("?" * len(over))
                self._drop_keys(db, f"k.ke_id IN ({marks})", tuple(over), CAUSE_LIVE_KEY_CAP, created)
            return over

    def get_enrolment_key(self, ke_id: str, now: dt.datetime | None = None) -> EnrolmentKeyRecord | None:
        """A usable Enrolment Key (not expired, not retired, its enrolee active), or None."""
        when = _ts(now or utcnow())
        row = self._one("SELECT k.ke_id, k.kpm_id, k.ke, k.created, k.expires, k.retire_at FROM enrolment_keys k"
                        " JOIN enrolees e ON e.kpm_id = k.kpm_id"
                        f" WHERE k.ke_id=? AND e.state='active' AND {self._USABLE}", (ke_id, when, when))
        if row is None:
            return None
        created, expires = _from_ts(row[3]), _from_ts(row[4])
        assert created is not None and expires is not None
        return EnrolmentKeyRecord(row[0], row[1], Secret(self._sealer.open(row[2], b"ke:" + row[0].encode()), "Ke"),
                                  created, expires, _from_ts(row[5]))

    def enrolment_key_ids(self, kpm_id: str) -> list[str]:
        """Every stored KeID of an enrolee, usable or not yet purged, oldest first."""
        return [r[0] for r in self._all("SELECT ke_id FROM enrolment_keys WHERE kpm_id=? ORDER BY rowid", (kpm_id,))]

    def revoke_key(self, ke_id: str, now: dt.datetime | None = None) -> str:
        """Delete one Enrolment Key at once (revocation log cause key-revoked). Returns its enrolee's KpmID."""
        with self._tx() as db:
            row = db.execute("SELECT kpm_id FROM enrolment_keys WHERE ke_id=?", (ke_id,)).fetchone()
            if row is None:
                raise NotFound(f"no stored Enrolment Key has the KeID {ke_id}")
            self._drop_keys(db, "k.ke_id=?", (ke_id,), CAUSE_KEY_REVOKED, now or utcnow())
            return str(row[0])

    def purge(self, now: dt.datetime | None = None, keep_log: dt.timedelta = dt.timedelta(days=30),
              keep_rows: int | None = None) -> PurgeCounts:
        """Delete the keys whose retirement or expiry has come (each with its revocation log row) and the
        revocation log rows older than ``keep_log`` or beyond the newest ``keep_rows``, in transactions of at
        most PURGE_BATCH rows."""
        now = now or utcnow()
        when = _ts(now)
        counts = {"expired": 0, "retired": 0, "log_rows": 0}
        work = (("retired", "k.retire_at <= ? AND k.retire_at < k.expires", CAUSE_RETIRED),
                ("expired", "k.expires <= ?", CAUSE_EXPIRED))
        for name, where, cause in work:
            while True:
                with self._tx() as db:
                    n = self._drop_keys(db, where, (when,), cause, now, limit=PURGE_BATCH)
                counts[name] += n
                if n < PURGE_BATCH:
                    break
        cutoff = _ts(now - keep_log)
        with self._tx() as db:  # records of certificates expired longer ago than the log is kept
            db.execute("DELETE FROM certificates WHERE rowid IN (SELECT rowid FROM certificates WHERE not_after < ?"
                       " LIMIT ?)", (cutoff, PURGE_BATCH))
        while True:
            with self._tx() as db:
                newest = db.execute("SELECT seq FROM sqlite_sequence WHERE name='revocations'").fetchone()
                below = int(newest[0]) - keep_rows + 1 if newest and keep_rows is not None else 0
                n = db.execute("DELETE FROM revocations WHERE seq IN (SELECT seq FROM revocations WHERE time < ?"
                               " OR seq < ? ORDER BY seq LIMIT ?)", (cutoff, below, PURGE_BATCH)).rowcount
            counts["log_rows"] += n
            if n < PURGE_BATCH:
                break
        return PurgeCounts(**counts)

    # -- revocation log -------------------------------------------------------------------------
    def revocations_since(self, seq: int, limit: int = 1000) -> tuple[list[Revocation], int]:
        """The revocation log rows after sequence number ``seq`` (oldest first, at most ``limit``) and the newest
        sequence number ever written (0 before the first; it never goes down, pruning or not). A reader that
        keeps the last ``seq`` it saw and finds the oldest row it gets above ``seq + 1`` has missed pruned rows."""
        if not 1 <= limit <= MAX_REVOCATIONS_PAGE:
            raise BadRequest(f"limit must be between 1 and {MAX_REVOCATIONS_PAGE}")
        with self._borrow() as db:
            db.execute("BEGIN")  # one snapshot for the rows and the newest number
            try:
                rows = db.execute("SELECT seq, ke_id, enrolee_id, cause, time, cert_sha256 FROM revocations"
                                  " WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)).fetchall()
                newest = db.execute("SELECT seq FROM sqlite_sequence WHERE name='revocations'").fetchone()
            finally:
                db.execute("COMMIT")
        return ([Revocation(r[0], r[1], r[2], r[3], _from_ts(r[4]) or utcnow(), r[5]) for r in rows],
                int(newest[0]) if newest else 0)

    # -- monitoring -----------------------------------------------------------------------------
    def stats(self, now: dt.datetime | None = None) -> StoreStats:
        """Counts for the metrics endpoint (one read snapshot; nothing secret)."""
        when = _ts(now or utcnow())
        with self._borrow() as db:
            db.execute("BEGIN")
            try:
                states = dict.fromkeys(STATES, 0)
                states.update({str(s): int(n) for s, n in
                               db.execute("SELECT state, COUNT(*) FROM enrolees GROUP BY state").fetchall()})
                live = db.execute(f"SELECT COUNT(*) FROM enrolment_keys k WHERE {self._USABLE}",
                                  (when, when)).fetchone()[0]
                stored = db.execute("SELECT COUNT(*) FROM enrolment_keys").fetchone()[0]
                rows = db.execute("SELECT COUNT(*) FROM revocations").fetchone()[0]
                newest = db.execute("SELECT seq FROM sqlite_sequence WHERE name='revocations'").fetchone()
            finally:
                db.execute("COMMIT")
        return StoreStats(states, int(live), int(stored), int(rows), int(newest[0]) if newest else 0)

    def write_problem(self, timeout: float = 2.0) -> str | None:
        """None when a write transaction can start now, else why not (a sentence for the health endpoint).
        Nothing is written: the probe begins a write transaction and rolls it back."""
        for path, what in ((self.path, "database file"), (self.path.parent, "database directory")):
            if not os.access(path, os.W_OK):
                return f"the MEF {what} {path} is not writable"
        try:
            db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
            try:
                db.execute("BEGIN IMMEDIATE")
                db.execute("ROLLBACK")
            finally:
                db.close()
        except sqlite3.Error as exc:
            return f"the MEF database {self.path} cannot be written: {exc}"
        return None
