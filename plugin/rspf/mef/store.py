"""The MEF's persistent store: the ONE place that touches the database.

:class:`MefStore` is the interface and holds every query; two implementations supply the connections and the
schema: :class:`rspf.mef.store_sqlite.SqliteStore` (embedded SQLite, the default) and
:class:`rspf.mef.store_pg.PostgresStore` (PostgreSQL, shared by several MEF instances; docs/scale.md).
:func:`open_store` picks one from the configuration.

Key material (Kpm, target PSKs, Ke) is sealed with AES-256-GCM under the MEF master key before it is
written; the master key file is created 0600 and never leaves the MEF host. Every write is one transaction:
a batch import either lands whole or not at all.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import AccessDenied, BadRequest, Conflict, NotFound, StoreError
from ..fileutil import new_key_file, read_key_file
from ..sealing import Sealer
from ..secret import Secret

if TYPE_CHECKING:
    from .config import MefConfig

log = logging.getLogger(__name__)

#: The schema both implementations write (each migrates older versions of its own in place)
SCHEMA_VERSION = 5

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



def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _ts(when: dt.datetime | None) -> str | None:
    return when.astimezone(dt.UTC).isoformat() if when else None


def _from_ts(text: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(text) if text else None


#: The schema (version SCHEMA_VERSION) of both implementations; {blob}, {bigint}, {real}: the dialect's types;
#: {key_order}: a column that orders enrolment keys by insertion where the database has no rowid (_KEY_ORDER)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value {bigint} NOT NULL);
CREATE TABLE IF NOT EXISTS enrolees (
    kpm_id TEXT PRIMARY KEY,
    kpm {blob} NOT NULL,
    kpm_fingerprint {blob} NOT NULL,
    kpm_generation INTEGER NOT NULL DEFAULT 1,
    enrolee_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    registrar_cse_id TEXT NOT NULL,
    registrar_uri TEXT NOT NULL,
    targets TEXT NOT NULL,
    rm_uri TEXT,
    enrolment_expiry_seconds {bigint},
    valid_until TEXT,
    state TEXT NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'suspended', 'revoked')),
    allowed_app_ids TEXT,
    created TEXT NOT NULL,
    last_enrolled TEXT,
    cert_id TEXT,
    may_certify INTEGER NOT NULL DEFAULT 0,
    budget_tokens {real},
    budget_stamp {real}
);
CREATE UNIQUE INDEX IF NOT EXISTS enrolees_by_id ON enrolees(enrolee_id);
CREATE UNIQUE INDEX IF NOT EXISTS enrolees_by_cert ON enrolees(cert_id) WHERE cert_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS enrolees_by_node ON enrolees(node_id);
CREATE INDEX IF NOT EXISTS enrolees_by_kpm ON enrolees(kpm_fingerprint);
CREATE INDEX IF NOT EXISTS enrolees_by_registrar ON enrolees(registrar_cse_id);
CREATE TABLE IF NOT EXISTS targets (
    psk_identity TEXT PRIMARY KEY,
    psk {blob} NOT NULL,
    target_id TEXT NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS enrolment_keys (
    ke_id TEXT PRIMARY KEY,
    {key_order}
    kpm_id TEXT NOT NULL REFERENCES enrolees(kpm_id),
    ke {blob} NOT NULL,
    created TEXT NOT NULL,
    expires TEXT NOT NULL,
    retire_at TEXT
);
CREATE INDEX IF NOT EXISTS keys_by_enrolee ON enrolment_keys({key_order_index});
CREATE INDEX IF NOT EXISTS keys_by_expiry ON enrolment_keys(expires);
CREATE INDEX IF NOT EXISTS keys_by_retirement ON enrolment_keys(retire_at) WHERE retire_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS revocations (
    seq {bigint} PRIMARY KEY,
    ke_id TEXT,
    enrolee_id TEXT NOT NULL,
    cause TEXT NOT NULL,
    time TEXT NOT NULL,
    cert_sha256 TEXT,
    CHECK ((ke_id IS NULL) <> (cert_sha256 IS NULL))
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
    der {blob} NOT NULL
);
CREATE INDEX IF NOT EXISTS certificates_by_enrolee ON certificates(kpm_id);
CREATE INDEX IF NOT EXISTS certificates_by_expiry ON certificates(not_after)
"""


def schema_statements(dialect: dict[str, str]) -> list[str]:
    """The CREATE statements of the schema in one database's types (each implementation's ``_DIALECT``)."""
    return [statement.strip() for statement in _SCHEMA.format(**dialect).split(";")]


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
    #: its enrolment rate budget as stored (tokens, stamp in wall-clock seconds); None: never charged
    enrolment_budget: tuple[float, float] | None = None

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
#: LIMIT of a query that wants every row (both databases take a plain number)
NO_LIMIT = 2**62


class Db(Protocol):
    """A connection borrowed from a store's pool: SQL with ``?`` placeholders (both implementations)."""

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Any: ...

    def executemany(self, sql: str, params: Iterable[Sequence[Any]], /) -> Any: ...


#: (tokens, stamp) of an enrolee's enrolment budget as stored; None: never charged (a full bucket)
BudgetState = tuple[float, float] | None
#: Charges one enrolment to a stored budget: returns the new state, or raises (rate limited). Called inside the
#: transaction that stores the Enrolment Key, with the enrolee's row locked: the budget holds across instances.
BudgetCharge = Callable[[BudgetState], tuple[float, float]]


def open_store(config: MefConfig, *, create: bool = True) -> MefStore:
    """The store a MEF configuration names: PostgreSQL at ``database_url`` when set, else the SQLite file
    ``database``; with the master key ``master_key_file`` either way."""
    if config.database_url:
        from .store_pg import PostgresStore
        return PostgresStore(config.database_url, config.master_key_file, pool_size=config.database_pool_size,
                             create=create)
    from .store_sqlite import SqliteStore
    return SqliteStore(config.database, config.master_key_file, create=create)


def load_master_key(key_path: Path, *, may_create: bool, where: str) -> Secret:
    """The MEF master key from its file; a new one (0600) when ``may_create`` and the file is absent."""
    if key_path.exists():
        return read_key_file(key_path, "MEF master key file")
    if may_create:
        return new_key_file(key_path)
    raise StoreError(f"the MEF master key file {key_path} is missing but the database {where} exists; "
                     "without it the stored keys cannot be opened")


@dataclass(frozen=True)
class ImportCheck:
    """What a batch import found (rspf.mef.store.MefStore.import_enrolees): how many enrolees it wrote (for a
    dry run: would write), (line, sentence) errors and warnings (at most ``max_reports`` of each, the first by
    line) and how many there were in all."""

    written: int
    errors: list[tuple[int, str]]
    error_count: int
    warnings: list[tuple[int, str]]
    warning_count: int


#: Rows an import stages per round trip
IMPORT_CHUNK = 2000


class MefStore(ABC):
    """The store interface, and every query. Implementations supply pooled connections (:meth:`_borrow`), write
    transactions (:meth:`_tx`) and the few dialect details below. Thread-safe."""

    #: appended to a SELECT of one enrolee row that a write transaction goes on to change (a row lock)
    _FOR_UPDATE = ""
    #: appended to a SELECT of enrolment keys (alias ``k``) that are about to be logged and deleted
    _LOCK_KEYS = ""
    #: the column that orders enrolment keys by insertion (alias ``k``)
    _KEY_ORDER = "k.rowid"
    #: the exception class(es) a unique-constraint violation raises
    _INTEGRITY_ERRORS: tuple[type[BaseException], ...] = ()

    def __init__(self, master: Secret) -> None:
        self._sealer = Sealer(master, b"mef store")
        # keyed fingerprints find a repeated Kpm without unsealing every stored one (and say nothing without the key)
        self._fingerprint_key = Secret(hmac.new(master.reveal(), b"onem2m-rspf mef kpm fingerprint",
                                                hashlib.sha256).digest(), "fingerprint key")

    # -- what an implementation supplies --------------------------------------------------------
    @abstractmethod
    def _borrow(self) -> AbstractContextManager[Db]:
        """A pooled connection for this thread's exclusive use until the block ends (each statement commits)."""

    @abstractmethod
    def _tx(self) -> AbstractContextManager[Db]:
        """One write transaction (committed at the end of the block, rolled back on any exception)."""

    @abstractmethod
    def _snapshot(self) -> AbstractContextManager[Db]:
        """One read-only transaction: every statement in the block sees the same committed state."""

    @abstractmethod
    def exclusive(self, name: str) -> AbstractContextManager[bool]:
        """True inside the block if no other MEF instance sharing this database is inside a block of the same
        ``name`` (then this one holds it), else False at once (housekeeping runs on one instance at a time)."""

    @abstractmethod
    def write_problem(self, timeout: float = 2.0) -> str | None:
        """None when a write transaction can start now, else why not (a sentence for the health endpoint)."""

    @abstractmethod
    def close(self) -> None:
        """Close every pooled connection."""

    #: where the data lives, for messages (a path, or a database URL without its password)
    where: str = ""

    # -- shared schema steps --------------------------------------------------------------------
    def _check_master_key(self, db: Db, key_path: Path) -> None:
        """A sealed check value proves at open time that the master key is the one the data was sealed with."""
        check = db.execute("SELECT value FROM meta WHERE name='key_check'").fetchone()
        if check is None:
            db.execute("INSERT INTO meta (name, value) VALUES ('key_check', ?)",
                       (self._sealer.seal(b"onem2m-rspf key check", b"meta:key_check").hex(),))
            return
        try:
            self._sealer.open(bytes.fromhex(check[0]), b"meta:key_check")
        except StoreError:
            raise StoreError(f"the master key {key_path} does not open the database {self.where} "
                             "(wrong or replaced key file)") from None

    @staticmethod
    def _set_meta(db: Db, name: str, value: str) -> None:
        db.execute("INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value=excluded.value",
                   (name, value))

    def _fingerprint(self, kpm: bytes) -> bytes:
        return hmac.new(self._fingerprint_key.reveal(), kpm, hashlib.sha256).digest()

    def _one(self, sql: str, params: tuple = ()) -> tuple | None:
        with self._borrow() as db:
            row = db.execute(sql, params).fetchone()
            return tuple(row) if row is not None else None

    def _all(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._borrow() as db:
            return [tuple(r) for r in db.execute(sql, params).fetchall()]

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
                try:
                    db.execute(f"INSERT INTO enrolees ({self._INSERT_COLS}) VALUES ({self._INSERT_MARKS})",
                               self._insert_values(rec, kpm, now))
                except self._INTEGRITY_ERRORS:  # another instance added the same one meanwhile
                    raise Conflict(f"the enrolee {rec.kpm_id} (or its Enrolee-ID or certificate ID) was registered "
                                   "meanwhile") from None
                n += 1
        return n

    def add_enrolee(self, rec: EnroleeRecord, kpm: Secret | None) -> None:
        self.add_enrolees([(rec, kpm)])

    _INSERT_COLS = ("kpm_id, kpm, kpm_fingerprint, enrolee_id, node_id, registrar_cse_id, registrar_uri, targets,"
                    " rm_uri, enrolment_expiry_seconds, valid_until, allowed_app_ids, may_certify, state, created,"
                    " cert_id")
    _INSERT_MARKS = ",".join("?" * 16)

    def _insert_values(self, rec: EnroleeRecord, kpm: Secret | None, now: str | None) -> tuple:
        """The values of _INSERT_COLS for a new enrolee (its Kpm sealed, its fingerprint keyed)."""
        sealed, fingerprint = ((NO_KPM, NO_KPM) if kpm is None else
                               (self._seal_kpm(rec.kpm_id, kpm), self._fingerprint(kpm.reveal())))
        return (rec.kpm_id, sealed, fingerprint, rec.enrolee_id, *self._mutable_values(rec), ACTIVE, now, rec.cert_id)

    def _seal_kpm(self, kpm_id: str, kpm: Secret) -> bytes:
        return self._sealer.seal(kpm.reveal(), b"kpm:" + kpm_id.encode())

    @staticmethod
    def _mutable_values(rec: EnroleeRecord) -> tuple:
        """node_id ... may_certify, in the column order of _INSERT_COLS and update_enrolee."""
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
    def _check_free(db: Db, identity: str) -> None:
        if db.execute("SELECT 1 FROM enrolees WHERE kpm_id=?", (identity,)).fetchone() or db.execute(
            "SELECT 1 FROM targets WHERE psk_identity=?", (identity,)
        ).fetchone():
            raise Conflict(f"the PSK identity {identity} is already registered")

    _ENROLEE_COLS = ("kpm_id, enrolee_id, node_id, registrar_cse_id, registrar_uri, targets, rm_uri,"
                     " enrolment_expiry_seconds, valid_until, state, allowed_app_ids, created, last_enrolled,"
                     " kpm_generation, cert_id, length(kpm) > 0, may_certify, budget_tokens, budget_stamp")

    @staticmethod
    def _enrolee(row: Sequence[Any]) -> EnroleeRecord:
        return EnroleeRecord(
            kpm_id=row[0], enrolee_id=row[1], node_id=row[2], registrar_cse_id=row[3], registrar_uri=row[4],
            targets=[TargetGrant(t, tuple(s)) for t, s in json.loads(row[5])], rm_uri=row[6],
            enrolment_expiry_seconds=row[7], valid_until=_from_ts(row[8]), state=row[9],
            allowed_app_ids=tuple(json.loads(row[10])) if row[10] is not None else None,
            created=_from_ts(row[11]), last_enrolled=_from_ts(row[12]), kpm_generation=row[13], cert_id=row[14],
            has_kpm=bool(row[15]), may_certify=bool(row[16]),
            enrolment_budget=(float(row[17]), float(row[18])) if row[17] is not None else None,
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
                         (*params, NO_LIMIT if limit is None else limit, offset))
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
        return rec, Secret(self._sealer.open(bytes(row[-1]), b"kpm:" + kpm_id.encode()), "Kpm")

    def _state(self, db: Db, kpm_id: str) -> str:
        """The enrolee's state, its row locked until the transaction ends."""
        row = db.execute(f"SELECT state FROM enrolees WHERE kpm_id=?{self._FOR_UPDATE}", (kpm_id,)).fetchone()
        if row is None:
            raise NotFound(f"no enrolee has the KpmID {kpm_id}")
        return str(row[0])

    # -- revocation log writes ------------------------------------------------------------------
    @staticmethod
    def _log(db: Db, rows: list[tuple[str | None, str | None, str, str, dt.datetime]]) -> None:
        """Append (ke_id, cert_sha256, enrolee_id, cause, time) rows to the revocation log. The sequence numbers
        come from one counter row, updated last in the transaction: a second writer waits for this one to commit
        before it numbers its rows, so readers never see a number before a smaller one (with several instances
        too)."""
        if not rows:
            return
        db.execute("UPDATE counters SET value = value + ? WHERE name='revocations'", (len(rows),))
        newest = int(db.execute("SELECT value FROM counters WHERE name='revocations'").fetchone()[0])
        first = newest - len(rows) + 1
        db.executemany("INSERT INTO revocations (seq, ke_id, cert_sha256, enrolee_id, cause, time)"
                       " VALUES (?,?,?,?,?,?)",
                       [(first + i, ke, cert, eid, cause, _ts(when))
                        for i, (ke, cert, eid, cause, when) in enumerate(rows)])

    def _drop_keys(self, db: Db, where: str, params: tuple, cause: str, now: dt.datetime,
                   *, delete: bool = True, limit: int = NO_LIMIT) -> list[tuple]:
        """The revocation log rows of the enrolment keys matching ``where`` (which are deleted unless not
        ``delete``); the caller writes them with :meth:`_log` at the end of its transaction."""
        rows = db.execute("SELECT k.ke_id, e.enrolee_id FROM enrolment_keys k JOIN enrolees e ON e.kpm_id = k.kpm_id"
                          f" WHERE {where} ORDER BY {self._KEY_ORDER} LIMIT ?{self._LOCK_KEYS}",
                          (*params, limit)).fetchall()
        if delete:
            db.executemany("DELETE FROM enrolment_keys WHERE ke_id=?", [(r[0],) for r in rows])
        return [(ke_id, None, enrolee_id, cause, now) for ke_id, enrolee_id in rows]

    _USABLE = "k.expires > ? AND (k.retire_at IS NULL OR k.retire_at > ?)"

    def revoke_enrolee(self, kpm_id: str, now: dt.datetime | None = None) -> int:
        """Revoke an enrolee for good and delete every Enrolment Key it holds (fetchCredentials then answers
        NOT_FOUND). Returns how many keys were deleted."""
        now = now or utcnow()
        with self._tx() as db:
            if self._state(db, kpm_id) == REVOKED:
                raise Conflict(f"the enrolee {kpm_id} is already revoked")
            db.execute("UPDATE enrolees SET state='revoked' WHERE kpm_id=?", (kpm_id,))
            dropped = self._drop_keys(db, "k.kpm_id=?", (kpm_id,), CAUSE_ENROLEE_REVOKED, now)
            self._log(db, dropped + self._revoke_certificates(db, "kpm_id=?", (kpm_id,), CAUSE_ENROLEE_REVOKED, now))
            return len(dropped)

    def suspend_enrolee(self, kpm_id: str, now: dt.datetime | None = None) -> int:
        """Stop an active enrolee: no enrolment, its keys are not served (they stay stored, for resume). Returns
        how many usable keys it held (each gets a revocation log row)."""
        now = now or utcnow()
        with self._tx() as db:
            state = self._state(db, kpm_id)
            if state != ACTIVE:
                raise Conflict(f"the enrolee {kpm_id} is {state}; only an active enrolee can be suspended")
            db.execute("UPDATE enrolees SET state='suspended' WHERE kpm_id=?", (kpm_id,))
            dropped = self._drop_keys(db, f"k.kpm_id=? AND {self._USABLE}", (kpm_id, _ts(now), _ts(now)),
                                      CAUSE_SUSPENDED, now, delete=False)
            self._log(db, dropped + self._revoke_certificates(db, "kpm_id=?", (kpm_id,), CAUSE_SUSPENDED, now))
            return len(dropped)

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
            dropped = self._drop_keys(db, "k.kpm_id=?", (kpm_id,), CAUSE_DELETED, now)
            self._log(db, dropped + self._revoke_certificates(db, "kpm_id=?", (kpm_id,), CAUSE_DELETED, now))
            db.execute("DELETE FROM enrolees WHERE kpm_id=?", (kpm_id,))
            return len(dropped)

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
            dropped = self._drop_keys(db, "k.kpm_id=?", (kpm_id,), CAUSE_KPM_ROTATED, now)
            self._log(db, dropped)
            return len(dropped)

    # -- issued certificates --------------------------------------------------------------------
    def _revoke_certificates(self, db: Db, where: str, params: tuple, cause: str, now: dt.datetime) -> list[tuple]:
        """Revoke the active certificates matching ``where``; their revocation log rows (for :meth:`_log`)."""
        rows = db.execute(f"SELECT sha256, enrolee_id FROM certificates WHERE state='active' AND {where}"
                          f"{self._FOR_UPDATE}", params).fetchall()
        when = _ts(now)
        db.executemany("UPDATE certificates SET state='revoked', revoked_at=?, cause=? WHERE sha256=?",
                       [(when, cause, sha) for sha, _ in rows])
        return [(None, sha, enrolee_id, cause, now) for sha, enrolee_id in rows]

    def record_certificate(self, kpm_id: str, serial: str, sha256: str, subject: str, app_id: str | None,
                           not_before: dt.datetime, not_after: dt.datetime, der: bytes, *,
                           supersedes: str | None = None, now: dt.datetime | None = None,
                           charge: BudgetCharge | None = None) -> None:
        """Record a certificate the CA issued to enrolee ``kpm_id``; the one it renews (``supersedes``, a SHA-256)
        is revoked in the same transaction. The enrolee must still be active; ``charge`` takes the issue from its
        enrolment budget (or refuses it)."""
        now = now or utcnow()
        with self._tx() as db:
            row = db.execute("SELECT enrolee_id, state, budget_tokens, budget_stamp FROM enrolees WHERE kpm_id=?"
                             f"{self._FOR_UPDATE}", (kpm_id,)).fetchone()
            if row is None or row[1] != ACTIVE:
                raise AccessDenied(f"the enrolee {kpm_id} is no longer active; no certificate was issued")
            self._spend(db, kpm_id, row[2], row[3], charge)
            superseded = [] if supersedes is None else self._revoke_certificates(db, "sha256=?", (supersedes,),
                                                                                 CAUSE_SUPERSEDED, now)
            if supersedes is not None and not superseded:
                raise AccessDenied("the certificate being renewed was revoked meanwhile; no certificate was issued")
            db.execute("INSERT INTO certificates (serial, sha256, kpm_id, enrolee_id, subject, app_id, not_before,"
                       " not_after, issued, der) VALUES (?,?,?,?,?,?,?,?,?,?)",
                       (serial, sha256, kpm_id, row[0], subject, app_id, _ts(not_before), _ts(not_after), _ts(now),
                        der))
            self._log(db, superseded)

    _CERT_COLS = ("serial, sha256, kpm_id, enrolee_id, subject, app_id, not_before, not_after, issued, state,"
                  " revoked_at, cause, der")

    @staticmethod
    def _certificate(row: Sequence[Any]) -> CertificateRecord:
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
                         (*params, NO_LIMIT if limit is None else limit, offset))
        return [self._certificate(r) for r in rows]

    def revoke_certificate(self, serial_or_sha256: str, now: dt.datetime | None = None) -> CertificateRecord:
        """Revoke one issued certificate (it goes out in the revocation feed)."""
        found = self.get_certificate(serial_or_sha256)
        if found is None:
            raise NotFound(f"no issued certificate has the serial number or SHA-256 {serial_or_sha256[:80]!r}")
        with self._tx() as db:
            rows = self._revoke_certificates(db, "sha256=?", (found.sha256,), CAUSE_CERT_REVOKED, now or utcnow())
            if not rows:
                raise Conflict(f"the certificate {found.serial} is already revoked")
            self._log(db, rows)
        revoked = self.get_certificate(found.sha256)
        assert revoked is not None
        return revoked

    # -- enrolment targets ----------------------------------------------------------------------
    def add_target(self, rec: TargetRecord, psk: Secret) -> None:
        with self._tx() as db:
            self._check_free(db, rec.psk_identity)
            try:
                db.execute(
                    "INSERT INTO targets (psk_identity, psk, target_id, revoked, created) VALUES (?,?,?,0,?)",
                    (rec.psk_identity, self._sealer.seal(psk.reveal(), b"target:" + rec.psk_identity.encode()),
                     rec.target_id, _ts(utcnow())),
                )
            except self._INTEGRITY_ERRORS:
                raise Conflict(f"the PSK identity {rec.psk_identity} was registered meanwhile") from None

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
        return Secret(self._sealer.open(bytes(row[0]), b"target:" + psk_identity.encode()), "target PSK")

    def revoke_target(self, psk_identity: str) -> None:
        with self._tx() as db:
            if db.execute("UPDATE targets SET revoked=1 WHERE psk_identity=?", (psk_identity,)).rowcount == 0:
                raise NotFound(f"no Enrolment Target has the PSK identity {psk_identity}")

    # -- enrolment keys -------------------------------------------------------------------------
    def put_enrolment_key(self, ke_id: str, kpm_id: str, ke: Secret, created: dt.datetime, expires: dt.datetime,
                          *, kpm_generation: int | None = None, retire_after: dt.timedelta | None = None,
                          max_live_keys: int | None = None, charge: BudgetCharge | None = None) -> list[str]:
        """Store a new Enrolment Key of an active enrolee, in one transaction with what re-enrolment does to its
        other keys: with ``retire_after`` they stop being usable that long after ``created`` (the grace), and
        with ``max_live_keys`` the oldest usable ones beyond that many (the new one included) stop at once.
        ``kpm_generation`` (the Kpm the session proved) must still be the enrolee's; ``charge`` takes the
        enrolment from the enrolee's stored budget (or refuses it). Returns the KeIDs retired at once."""
        sealed = self._sealer.seal(ke.reveal(), b"ke:" + ke_id.encode())
        with self._tx() as db:
            row = db.execute("SELECT state, kpm_generation, budget_tokens, budget_stamp FROM enrolees WHERE kpm_id=?"
                             f"{self._FOR_UPDATE}", (kpm_id,)).fetchone()
            if row is None:
                raise StoreError(f"no enrolee has the KpmID {kpm_id}")
            if row[0] != ACTIVE or (kpm_generation is not None and row[1] != kpm_generation):
                raise AccessDenied("the enrolee was suspended, revoked or given a new Kpm during this session; "
                                   "no Enrolment Key was stored")
            self._spend(db, kpm_id, row[2], row[3], charge)
            try:
                db.execute("INSERT INTO enrolment_keys (ke_id, kpm_id, ke, created, expires) VALUES (?,?,?,?,?)",
                           (ke_id, kpm_id, sealed, _ts(created), _ts(expires)))
            except self._INTEGRITY_ERRORS:
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
                                f" ORDER BY {self._KEY_ORDER} DESC", (kpm_id, now, now)).fetchall()
            over = [r[0] for r in usable[max_live_keys:]]
            if over:
                marks = ",".join("?" * len(over))
                self._log(db, self._drop_keys(db, f"k.ke_id IN ({marks})", tuple(over), CAUSE_LIVE_KEY_CAP, created))
            return over

    @staticmethod
    def _spend(db: Db, kpm_id: str, tokens: float | None, stamp: float | None, charge: BudgetCharge | None) -> None:
        """Charge the enrolee's stored budget (its row is locked by the caller's SELECT ... FOR UPDATE)."""
        if charge is None:
            return
        new = charge((float(tokens), float(stamp)) if tokens is not None and stamp is not None else None)
        db.execute("UPDATE enrolees SET budget_tokens=?, budget_stamp=? WHERE kpm_id=?", (*new, kpm_id))

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
        return EnrolmentKeyRecord(row[0], row[1], Secret(self._sealer.open(bytes(row[2]), b"ke:" + row[0].encode()),
                                                         "Ke"), created, expires, _from_ts(row[5]))

    def enrolment_key_ids(self, kpm_id: str) -> list[str]:
        """Every stored KeID of an enrolee, usable or not yet purged, oldest first."""
        return [r[0] for r in self._all(f"SELECT k.ke_id FROM enrolment_keys k WHERE k.kpm_id=?"
                                        f" ORDER BY {self._KEY_ORDER}", (kpm_id,))]

    def revoke_key(self, ke_id: str, now: dt.datetime | None = None) -> str:
        """Delete one Enrolment Key at once (revocation log cause key-revoked). Returns its enrolee's KpmID."""
        with self._tx() as db:
            row = db.execute("SELECT kpm_id FROM enrolment_keys WHERE ke_id=?", (ke_id,)).fetchone()
            if row is None:
                raise NotFound(f"no stored Enrolment Key has the KeID {ke_id}")
            dropped = self._drop_keys(db, "k.ke_id=?", (ke_id,), CAUSE_KEY_REVOKED, now or utcnow())
            if not dropped:
                raise NotFound(f"the Enrolment Key {ke_id} was deleted meanwhile")
            self._log(db, dropped)
            return str(row[0])

    def purge(self, now: dt.datetime | None = None, keep_log: dt.timedelta = dt.timedelta(days=30),
              keep_rows: int | None = None) -> PurgeCounts:
        """Delete the keys whose retirement or expiry has come (each with its revocation log row) and the
        revocation log rows older than ``keep_log`` or beyond the newest ``keep_rows``, in transactions of at
        most PURGE_BATCH rows. With several instances on one database, one purges at a time (the others
        return zero counts at once)."""
        now = now or utcnow()
        when = _ts(now)
        counts = {"expired": 0, "retired": 0, "log_rows": 0}
        work = (("retired", "k.retire_at <= ? AND k.retire_at < k.expires", CAUSE_RETIRED),
                ("expired", "k.expires <= ?", CAUSE_EXPIRED))
        with self.exclusive("purge") as mine:
            if not mine:
                return PurgeCounts()
            for name, where, cause in work:
                while True:
                    with self._tx() as db:
                        dropped = self._drop_keys(db, where, (when,), cause, now, limit=PURGE_BATCH)
                        self._log(db, dropped)
                    counts[name] += len(dropped)
                    if len(dropped) < PURGE_BATCH:
                        break
            cutoff = _ts(now - keep_log)
            with self._tx() as db:  # records of certificates expired longer ago than the log is kept
                db.execute("DELETE FROM certificates WHERE serial IN (SELECT serial FROM certificates"
                           " WHERE not_after < ? LIMIT ?)", (cutoff, PURGE_BATCH))
            while True:
                with self._tx() as db:
                    newest = int(db.execute("SELECT value FROM counters WHERE name='revocations'").fetchone()[0])
                    below = newest - keep_rows + 1 if keep_rows is not None else 0
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
            # the newest number first: every row up to it is committed (rspf.mef.store.MefStore._log)
            newest = int(db.execute("SELECT value FROM counters WHERE name='revocations'").fetchone()[0])
            rows = db.execute("SELECT seq, ke_id, enrolee_id, cause, time, cert_sha256 FROM revocations"
                              " WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?", (seq, newest, limit)).fetchall()
        return ([Revocation(r[0], r[1], r[2], r[3], _from_ts(r[4]) or utcnow(), r[5]) for r in rows], newest)

    # -- monitoring -----------------------------------------------------------------------------
    def stats(self, now: dt.datetime | None = None) -> StoreStats:
        """Counts for the metrics endpoint (one read snapshot; nothing secret)."""
        when = _ts(now or utcnow())
        with self._snapshot() as db:
            states = dict.fromkeys(STATES, 0)
            states.update({str(s): int(n) for s, n in
                           db.execute("SELECT state, COUNT(*) FROM enrolees GROUP BY state").fetchall()})
            live = db.execute(f"SELECT COUNT(*) FROM enrolment_keys k WHERE {self._USABLE}",
                              (when, when)).fetchone()[0]
            stored = db.execute("SELECT COUNT(*) FROM enrolment_keys").fetchone()[0]
            rows = db.execute("SELECT COUNT(*) FROM revocations").fetchone()[0]
            newest = db.execute("SELECT value FROM counters WHERE name='revocations'").fetchone()[0]
        return StoreStats(states, int(live), int(stored), int(rows), int(newest))

    # -- batch import ---------------------------------------------------------------------------
    #: whether to refresh the planner's statistics of the staged rows before checking them
    _ANALYZE_STAGING = False

    def import_enrolees(self, rows: Iterable[tuple[int, EnroleeRecord, Secret | None]], *, dry_run: bool = False,
                        max_reports: int = 1000, rejected: Callable[[], bool] = lambda: False) -> ImportCheck:
        """Import (line, record, Kpm) rows in one transaction, in bounded memory: the rows are staged in a
        temporary table :data:`IMPORT_CHUNK` at a time, checked there all at once (a KpmID, Enrolee-ID or
        certificate ID repeated in the batch or already registered is an error; a Kpm or Node-ID repeated or
        already registered is a warning), and written only when no row is in error, not ``dry_run``, and
        ``rejected()`` (asked once every row is staged: the caller found rows it could not parse) is False."""
        now = _ts(utcnow())
        staged = 0
        try:
            with self._tx() as db:
                # a temporary table with a line number and the enrolees' columns, dropped before commit (and with
                # a rollback, its creation is undone)
                db.execute("CREATE TEMP TABLE import_rows AS SELECT 0 AS line, * FROM enrolees LIMIT 0")
                sql = f"INSERT INTO import_rows (line, {self._INSERT_COLS}) VALUES (?, {self._INSERT_MARKS})"
                chunk: list[tuple] = []
                for line, rec, kpm in rows:
                    chunk.append((line, *self._insert_values(rec, kpm, now)))
                    if len(chunk) >= IMPORT_CHUNK:
                        db.executemany(sql, chunk)
                        staged += len(chunk)
                        chunk = []
                if chunk:
                    db.executemany(sql, chunk)
                    staged += len(chunk)
                if self._ANALYZE_STAGING:
                    db.execute("ANALYZE import_rows")
                errors, error_count = self._findings(db, _IMPORT_ERRORS, max_reports, one_per_line=True)
                warnings, warning_count = self._findings(db, _IMPORT_WARNINGS, max_reports)
                check = ImportCheck(0 if error_count else staged, errors, error_count, warnings, warning_count)
                if error_count or dry_run or not staged or rejected():
                    raise _RollBack(check)
                db.execute(f"INSERT INTO enrolees ({self._INSERT_COLS}) SELECT {self._INSERT_COLS} FROM import_rows")
                db.execute("DROP TABLE import_rows")
        except _RollBack as back:
            return back.check
        except self._INTEGRITY_ERRORS:  # another instance registered one of them between the checks and the insert
            raise Conflict("an enrolee of the batch was registered meanwhile by someone else; nothing was imported"
                           " (run the import again to see which)") from None
        return check

    @staticmethod
    def _findings(db: Db, queries: tuple[tuple[str, str], ...], limit: int, *,
                  one_per_line: bool = False) -> tuple[list[tuple[int, str]], int]:
        """Run (SELECT line, a, b ..., sentence with {} for a, b) queries: the first ``limit`` findings by line,
        and how many there are in all; ``one_per_line``: only the first query's finding for a line, counting
        lines."""
        found: list[tuple[int, int, str]] = []
        for n, (sql, sentence) in enumerate(queries):
            found += [(int(r[0]), n, sentence.format(*r[1:]))
                      for r in db.execute(f"{sql} ORDER BY 1 LIMIT ?", (limit,)).fetchall()]
        found.sort()
        if one_per_line:
            union = " UNION ".join(f"SELECT line FROM ({sql}) q{n}" for n, (sql, _) in enumerate(queries))
            total = int(db.execute(f"SELECT count(*) FROM ({union}) f").fetchone()[0])
            found = [f for i, f in enumerate(found) if i == 0 or found[i - 1][0] != f[0]]
        else:
            total = sum(int(db.execute(f"SELECT count(*) FROM ({sql}) f").fetchone()[0]) for sql, _ in queries)
        return [(line, text) for line, _n, text in found[:limit]], total


class _RollBack(Exception):  # noqa: N818 -- a signal, not an error: undo the import's transaction
    def __init__(self, check: ImportCheck) -> None:
        self.check = check


def _repeats(column: str, *, shown: bool = True, also: str = "") -> str:
    """A column value repeated in the batch: each later line, (the value,) and the first line that holds it."""
    return (f"SELECT line,{' v,' if shown else ''} first FROM (SELECT line, {column} AS v, MIN(line) OVER"
            f" (PARTITION BY {column}) AS first FROM import_rows WHERE {column} IS NOT NULL{also}) t"
            " WHERE line > first")


#: A row's first error is reported (in this order), and rows in error are counted
_IMPORT_ERRORS = (
    (_repeats("cert_id"), "cert_id {} repeats the one on line {}"),
    ("SELECT i.line, i.cert_id FROM import_rows i WHERE i.cert_id IS NOT NULL AND EXISTS (SELECT 1 FROM enrolees e"
     " WHERE e.cert_id = i.cert_id)", "cert_id {} is already registered"),
    (_repeats("kpm_id"), "kpm_id {} repeats the one on line {}"),
    (_repeats("enrolee_id"), "enrolee_id {} repeats the one on line {}"),
    ("SELECT i.line, i.kpm_id FROM import_rows i WHERE EXISTS (SELECT 1 FROM enrolees e WHERE e.kpm_id = i.kpm_id)"
     " OR EXISTS (SELECT 1 FROM targets t WHERE t.psk_identity = i.kpm_id)", "kpm_id {} is already registered"),
    ("SELECT i.line, i.enrolee_id FROM import_rows i WHERE EXISTS (SELECT 1 FROM enrolees e"
     " WHERE e.enrolee_id = i.enrolee_id)", "enrolee_id {} is already registered"),
)
_IMPORT_WARNINGS = (
    (_repeats("kpm_fingerprint", shown=False, also=" AND length(kpm_fingerprint) > 0"),
     "its Kpm is also the Kpm of the enrolee on line {}"),
    ("SELECT i.line, e.kpm_id FROM import_rows i JOIN enrolees e ON e.kpm_fingerprint = i.kpm_fingerprint"
     " WHERE length(i.kpm_fingerprint) > 0", "its Kpm is also the Kpm of {}: every Kpm should be unique"),
    (_repeats("node_id"), "its Node-ID {} repeats the one on line {}"),
    ("SELECT i.line, i.node_id, e.kpm_id FROM import_rows i JOIN enrolees e ON e.node_id = i.node_id",
     "its Node-ID {} is also registered for {}"),
)
