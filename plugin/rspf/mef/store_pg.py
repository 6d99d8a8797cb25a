"""The PostgreSQL implementation of the MEF store: several ``rspf mef serve`` processes on one database serve
one population (docs/scale.md). psycopg 3 with a connection pool; the schema is created, or migrated, at open
under an advisory lock, so instances may start together. The queries are in rspf.mef.store; what makes them
safe with several writers at once:

* a write that changes an enrolee first locks its row (``SELECT ... FOR UPDATE``): its key cap and its
  enrolment budget hold whichever instance the sessions reach;
* revocation log rows are numbered from one counter row, updated last in their transaction, so a reader never
  sees a sequence number before a smaller one;
* the purge runs on one instance at a time (a session advisory lock).

Nothing secret is in a connection URL this module logs or puts in an error: the password is cut out.
"""

from __future__ import annotations

import functools
import logging
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, Conflict, StoreError
from .store import SCHEMA_VERSION, Db, MefStore, load_master_key, schema_statements

if TYPE_CHECKING:
    from .store_sqlite import SqliteStore

log = logging.getLogger(__name__)

try:
    import psycopg
    import psycopg_pool
except ImportError:  # pragma: no cover - the extra is installed by scripts/bootstrap.sh
    psycopg = None  # type: ignore[assignment]
    psycopg_pool = None  # type: ignore[assignment]



#: The types and key order column of the shared schema (rspf.mef.store.schema_statements) in PostgreSQL
_DIALECT = {"blob": "BYTEA", "bigint": "BIGINT", "real": "DOUBLE PRECISION", "key_order": "id BIGSERIAL NOT NULL,",
            "key_order_index": "kpm_id, id"}


def redact_url(url: str) -> str:
    """A PostgreSQL connection URL with any password replaced by ``***`` (for messages and logs)."""
    url = re.sub(r"(postgres(?:ql)?://[^:/@?#]*:)[^@/?#]*@", r"\1***@", url)
    return re.sub(r"(?i)(password=)[^&\s]*", r"\1***", url)


@functools.lru_cache(maxsize=512)
def _pg_sql(sql: str) -> str:
    """The store's ``?`` placeholders as psycopg's ``%s`` (no query has a literal ``?`` or ``%``)."""
    return sql.replace("?", "%s")


def _scalar(conn: Any, sql: str, params: Sequence[Any] = ()) -> Any:
    row = conn.execute(sql, params).fetchone()
    return row[0] if row is not None else None


class _PgDb:
    """A pooled psycopg connection behind the store's Db interface."""

    __slots__ = ("conn",)

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> Any:
        return self.conn.execute(_pg_sql(sql), params)

    def executemany(self, sql: str, params: Iterable[Sequence[Any]], /) -> Any:
        cur = self.conn.cursor()
        cur.executemany(_pg_sql(sql), params)
        return cur


class PostgresStore(MefStore):
    """The MEF store in a PostgreSQL database (``url``: a libpq connection URL; a password is better given by
    ``PGPASSWORD`` or a ``~/.pgpass`` file than in the URL). ``pool_size``: most connections this instance
    holds."""

    _FOR_UPDATE = " FOR UPDATE"
    _LOCK_KEYS = " FOR UPDATE OF k"
    _KEY_ORDER = "k.id"
    _ANALYZE_STAGING = True

    def __init__(self, url: str, master_key_file: Path, *, pool_size: int = 8, create: bool = True,
                 connect_timeout: float = 10.0) -> None:
        if psycopg is None or psycopg_pool is None:
            raise ConfigError("database_url needs the PostgreSQL driver: pip install 'onem2m-rspf[postgres]'")
        self.where = redact_url(url)
        self._INTEGRITY_ERRORS = (psycopg.errors.IntegrityError,)
        self._pool = psycopg_pool.ConnectionPool(url, min_size=1, max_size=max(2, pool_size),
                                                 kwargs={"autocommit": True}, open=False, timeout=connect_timeout,
                                                 name="rspf-mef")
        try:
            self._pool.open(wait=True, timeout=connect_timeout)
        except psycopg_pool.PoolTimeout:
            self._pool.close()
            raise StoreError(f"the MEF database {self.where} cannot be reached (no connection within "
                             f"{connect_timeout:g} s)") from None
        key_path = Path(master_key_file)
        try:
            with self._pool.connection() as conn:
                # housekeeping locks are per population: per database and schema
                self._lock_space = str(_scalar(conn, "SELECT current_database() || '.' || current_schema()"))
                has_data = bool(_scalar(conn, "SELECT to_regclass('meta') IS NOT NULL"))
                if has_data:
                    has_data = conn.execute("SELECT 1 FROM meta WHERE name='key_check'").fetchone() is not None
            if not has_data and not create:
                raise StoreError(f"the MEF database {self.where} holds no MEF data")
            super().__init__(load_master_key(key_path, may_create=create and not has_data, where=self.where))
            with self._tx() as db:
                db.execute("SELECT pg_advisory_xact_lock(?)", (zlib.crc32(f"onem2m-rspf {self._lock_space}".encode()),))
                db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
                row = db.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
                version = int(row[0]) if row else None
                if version is not None and version != SCHEMA_VERSION:
                    raise StoreError(f"the MEF database {self.where} has schema version {version}; this MEF reads "
                                     f"{SCHEMA_VERSION}")
                self._check_master_key(db, key_path)
                if version is None:
                    for statement in schema_statements(_DIALECT):
                        db.execute(statement)
                    db.execute("INSERT INTO counters (name, value) VALUES ('revocations', 0)"
                               " ON CONFLICT (name) DO NOTHING")
                    self._set_meta(db, "schema_version", str(SCHEMA_VERSION))
                    log.info("created the MEF schema (version %d) in %s", SCHEMA_VERSION, self.where)
        except BaseException:
            self._pool.close()
            raise

    # -- plumbing -------------------------------------------------------------------------------
    @contextmanager
    def _connection(self) -> Iterator[Any]:
        assert psycopg is not None and psycopg_pool is not None
        try:
            with self._pool.connection() as conn:
                yield conn
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            # the detail goes to the MEF's log; a client that gets the error hears nothing about the database
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.error("the MEF database %s is unavailable: %s", self.where, redact_url(reason))
            raise StoreError("the MEF cannot use its database at the moment; try again later") from None

    @contextmanager
    def _borrow(self) -> Iterator[Db]:
        with self._connection() as conn:
            yield _PgDb(conn)

    @contextmanager
    def _tx(self) -> Iterator[Db]:
        with self._connection() as conn, conn.transaction():
            yield _PgDb(conn)

    @contextmanager
    def _snapshot(self) -> Iterator[Db]:
        with self._connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield _PgDb(conn)

    @contextmanager
    def exclusive(self, name: str) -> Iterator[bool]:
        """A session advisory lock, held on one pooled connection for the block."""
        key = zlib.crc32(f"onem2m-rspf {self._lock_space} {name}".encode())
        with self._connection() as conn:
            mine = bool(_scalar(conn, "SELECT pg_try_advisory_lock(%s)", (key,)))
            try:
                yield mine
            finally:
                if mine:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (key,))

    def close(self) -> None:
        self._pool.close()

    def write_problem(self, timeout: float = 2.0) -> str | None:
        assert psycopg is not None and psycopg_pool is not None
        try:
            with self._pool.connection(timeout=timeout) as conn:
                if _scalar(conn, "SELECT pg_is_in_recovery()"):
                    return f"the MEF database {self.where} is a read-only standby"
                if _scalar(conn, "SHOW transaction_read_only") == "on":
                    return f"the MEF database {self.where} accepts no writes (transaction_read_only is on)"
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return f"the MEF database {self.where} cannot be reached: {redact_url(reason)}"
        return None


#: The tables `rspf mef migrate` copies, with their columns (the sealed values are copied as they are: the
#: same master key opens them), in an order the foreign keys accept
_COPIED = (
    ("enrolees", "kpm_id, kpm, kpm_fingerprint, kpm_generation, enrolee_id, node_id, registrar_cse_id,"
                 " registrar_uri, targets, rm_uri, enrolment_expiry_seconds, valid_until, state, allowed_app_ids,"
                 " created, last_enrolled, cert_id, may_certify, budget_tokens, budget_stamp"),
    ("targets", "psk_identity, psk, target_id, revoked, created"),
    ("enrolment_keys", "ke_id, kpm_id, ke, created, expires, retire_at"),
    ("revocations", "seq, ke_id, enrolee_id, cause, time, cert_sha256"),
    ("certificates", "serial, sha256, kpm_id, enrolee_id, subject, app_id, not_before, not_after, issued, state,"
                     " revoked_at, cause, der"),
)
_COPY_PAGE = 5000


def migrate(source: SqliteStore, target: PostgresStore,
            progress: Callable[[str, int], None] | None = None) -> dict[str, int]:
    """Copy every row of an SQLite MEF store into an empty PostgreSQL one, in one transaction (all or nothing),
    keeping the revocation sequence numbers and the order of each enrolee's keys. Both stores must be opened
    with the same master key (each checks it at open). Returns the rows copied per table."""
    copied: dict[str, int] = {}
    with target._tx() as db:
        db.execute("LOCK TABLE enrolees, targets, enrolment_keys, revocations, certificates IN EXCLUSIVE MODE")
        for table, _columns in _COPIED:
            if db.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is not None:
                raise Conflict(f"the PostgreSQL database {target.where} already holds MEF data (table {table}); "
                               "migrate into an empty database")
        for table, columns in _COPIED:
            marks = ",".join("?" * (columns.count(",") + 1))
            copied[table] = 0
            for page in source.pages(table, columns, _COPY_PAGE):
                db.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", page)
                copied[table] += len(page)
                if progress:
                    progress(table, copied[table])
        newest = source.stats().revocation_newest
        db.execute("UPDATE counters SET value=? WHERE name='revocations'", (newest,))
        for table, _columns in _COPIED:  # a last check inside the transaction: every row arrived
            n = int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
            if n != copied[table]:
                raise StoreError(f"the copy of {table} holds {n} rows, not {copied[table]}; nothing was migrated")
    return copied
