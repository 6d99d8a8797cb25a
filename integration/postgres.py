"""A real PostgreSQL server for tests of the PostgreSQL store: each test gets a schema of its own in one
database, dropped afterwards.

The server: ``RSPF_TEST_POSTGRES_URL`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``, what this
project's machines run, trust auth). Where none answers, the tests that need one are skipped with that reason,
unless ``RSPF_REQUIRE_POSTGRES=1`` (set by .ci/run), which makes them fail instead.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote

import pytest

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def server_url() -> str:
    return os.environ.get("RSPF_TEST_POSTGRES_URL", DEFAULT_URL)


def unavailable() -> str | None:
    """None when the test server answers, else why not."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install 'onem2m-rspf[postgres]')"
    try:
        with psycopg.connect(server_url(), connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"no PostgreSQL server answers at {server_url()} ({str(exc).strip().splitlines()[0]})"
    return None


def require() -> None:
    """Skip (or, with RSPF_REQUIRE_POSTGRES=1, fail) the calling test when there is no server."""
    why = unavailable()
    if why is None:
        return
    if os.environ.get("RSPF_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"RSPF_REQUIRE_POSTGRES=1 but {why}")
    pytest.skip(f"needs PostgreSQL: {why}; set RSPF_TEST_POSTGRES_URL")


def with_schema(url: str, schema: str) -> str:
    joiner = "&" if "?" in url else "?"
    return f"{url}{joiner}options={quote(f'-csearch_path={schema}')}"


@contextmanager
def fresh_schema() -> Iterator[str]:
    """A connection URL whose tables live in a new, empty schema (dropped with everything in it at the end)."""
    import psycopg

    require()
    schema = f"rspf_test_{secrets.token_hex(6)}"
    with psycopg.connect(server_url(), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield with_schema(server_url(), schema)
    finally:
        with psycopg.connect(server_url(), autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
