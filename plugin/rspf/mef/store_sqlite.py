"""The embedded SQLite implementation of the MEF store (the default): one database file, 0600, for ONE MEF
process. Connections are pooled (each used by one thread at a time); WAL journal; short write transactions
serialized by one lock. The queries are in rspf.mef.store."""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import StoreError
from ..fileutil import check_private
from .store import SCHEMA_VERSION, Db, MefStore, load_master_key, schema_statements

log = logging.getLogger(__name__)

#: The types of the shared schema (rspf.mef.store.schema_statements) in SQLite; keys are ordered by rowid
_DIALECT = {"blob": "BLOB", "bigint": "INTEGER", "real": "REAL", "key_order": "", "key_order_index": "kpm_id"}


class SqliteStore(MefStore):
    """The MEF store in one SQLite file (created 0600 with its master key file when both are absent)."""

    _INTEGRITY_ERRORS = (sqlite3.IntegrityError,)

    def __init__(self, database: Path, master_key_file: Path, *, create: bool = True) -> None:
        self.path = Path(database)
        self.where = str(self.path)
        if not self.path.exists() and not create:
            raise StoreError(f"the MEF database {self.path} does not exist")
        key_path = Path(master_key_file)
        super().__init__(load_master_key(key_path, may_create=create and not self.path.exists(), where=self.where))
        self._pool: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._write_lock = threading.Lock()
        self._exclusive: dict[str, threading.Lock] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
        check_private(self.path, "MEF database")
        with self._tx() as db:
            db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
            row = db.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
            version = int(row[0]) if row else None
            if version is not None and version not in (1, 2, 3, 4, SCHEMA_VERSION):
                raise StoreError(f"{self.path} has schema version {version}; this MEF reads {SCHEMA_VERSION}")
            self._check_master_key(db, key_path)
            if version == SCHEMA_VERSION:
                return
            newest = self._autoincrement_newest(db)
            if version == 1:
                self._migrate_v1(db)
            if version in (1, 2):
                self._migrate_v2(db)
            if version in (1, 2, 3):
                self._migrate_v3(db)
            if version in (1, 2, 3, 4):
                db.execute("ALTER TABLE enrolees ADD COLUMN budget_tokens REAL")
                db.execute("ALTER TABLE enrolees ADD COLUMN budget_stamp REAL")
            for statement in schema_statements(_DIALECT):
                db.execute(statement)
            db.execute("INSERT INTO counters (name, value) VALUES ('revocations', ?) ON CONFLICT (name) DO NOTHING",
                       (newest,))
            self._set_meta(db, "schema_version", str(SCHEMA_VERSION))
            if version is not None:
                log.info("migrated the MEF database %s from schema version %d to %d", self.path, version,
                         SCHEMA_VERSION)

    @staticmethod
    def _autoincrement_newest(db: Db) -> int:
        """Before schema 5, the newest revocation sequence number ever written was SQLite's AUTOINCREMENT
        counter; from 5 on it is the ``counters`` row (rspf.mef.store.MefStore._log)."""
        if db.execute("SELECT 1 FROM sqlite_master WHERE name='sqlite_sequence'").fetchone() is None:
            return 0
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name='revocations'").fetchone()
        return int(row[0]) if row else 0

    def _migrate_v1(self, db: Db) -> None:
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

    @staticmethod
    def _migrate_v2(db: Db) -> None:
        """Schema 2 -> 3: the enrolees' certificate IDs (none yet; the unique index on them is created by the
        DDL). Every existing enrolee keeps its Kpm."""
        db.execute("ALTER TABLE enrolees ADD COLUMN cert_id TEXT")

    @staticmethod
    def _migrate_v3(db: Db) -> None:
        """Schema 3 -> 4: the enrolees' certificate entitlement (none), and revocation log rows that name a KeID
        or an issued certificate (the log is copied with its sequence numbers). The certificates table is
        created by the DDL."""
        db.execute("ALTER TABLE enrolees ADD COLUMN may_certify INTEGER NOT NULL DEFAULT 0")
        if db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='revocations'").fetchone() is None:
            return  # a version 1 database: the DDL creates the log
        db.execute("ALTER TABLE revocations RENAME TO revocations_v3")
        db.execute("DROP INDEX IF EXISTS revocations_by_time")
        for statement in schema_statements(_DIALECT):
            if "revocations" in statement:
                db.execute(statement)
        db.execute("INSERT INTO revocations (seq, ke_id, enrolee_id, cause, time) SELECT seq, ke_id, enrolee_id,"
                   " cause, time FROM revocations_v3")
        db.execute("DROP TABLE revocations_v3")

    # -- plumbing -------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        return db

    @contextmanager
    def _borrow(self) -> Iterator[Db]:
        try:
            db = self._pool.get_nowait()
        except queue.Empty:
            db = self._connect()
        try:
            yield db
        finally:
            self._pool.put(db)

    @contextmanager
    def _tx(self) -> Iterator[Db]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on any exception), one writer at a time."""
        with self._write_lock, self._borrow() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @contextmanager
    def _snapshot(self) -> Iterator[Db]:
        with self._borrow() as db:
            db.execute("BEGIN")
            try:
                yield db
            finally:
                db.execute("COMMIT")

    @contextmanager
    def exclusive(self, name: str) -> Iterator[bool]:
        """Within this process (an SQLite database serves one MEF process)."""
        lock = self._exclusive.setdefault(name, threading.Lock())
        mine = lock.acquire(blocking=False)
        try:
            yield mine
        finally:
            if mine:
                lock.release()

    def pages(self, table: str, columns: str, size: int) -> Iterator[list[tuple]]:
        """Every row of ``table`` (these ``columns``) in insertion order, ``size`` rows at a time (for
        rspf.mef.store_pg.migrate; one read snapshot)."""
        with self._snapshot() as db:
            last = -1
            while True:
                rows = db.execute(f"SELECT rowid, {columns} FROM {table} WHERE rowid > ? ORDER BY rowid LIMIT ?",
                                  (last, size)).fetchall()
                if not rows:
                    return
                last = rows[-1][0]
                yield [tuple(r[1:]) for r in rows]

    def close(self) -> None:
        while True:
            try:
                self._pool.get_nowait().close()
            except queue.Empty:
                return

    def write_problem(self, timeout: float = 2.0) -> str | None:
        """Nothing is written: the probe begins a write transaction and rolls it back."""
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
