"""A real PostgreSQL server for tests of the PostgreSQL store: each test gets a schema of its own in one
database, dropped afterwards.

The server: ``RSPF_TEST_POSTGRES_URL`` if set; else the one this project's machines run
(``postgresql://postgres@127.0.0.1:5432/postgres``, trust auth) if it answers; else, where PostgreSQL's
``initdb`` and ``postgres`` programs are installed and the tests do not run as root (which PostgreSQL refuses),
a private server the tests start in a temporary folder on a free port, and stop by its PID when they end. Where
none of these works, the tests that need one are skipped with the reason, unless ``RSPF_REQUIRE_POSTGRES=1``
(set by .ci/run), which makes them fail instead.
"""

from __future__ import annotations

import atexit
import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote

import pytest

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
_found: list[str | None] = []  # the resolved server URL (None: no server), once per test session
_why: list[str] = []


def _answers(url: str) -> str | None:
    """None when a server answers at ``url``, else why not."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install 'onem2m-rspf[postgres]')"
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"no PostgreSQL server answers at {url} ({str(exc).strip().splitlines()[0]})"
    return None


def _program(name: str) -> str | None:
    return shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)),
                                      None)


def _private_server() -> str | None:
    """Start a throw-away server (trust auth, 127.0.0.1, a free port); its URL, or None when it cannot be."""
    initdb, postgres = _program("initdb"), _program("postgres")
    if initdb is None or postgres is None:
        _why.append("PostgreSQL's initdb/postgres programs are not installed")
        return None
    if os.geteuid() == 0:
        _why.append("a private server cannot be started as root")
        return None
    data = tempfile.mkdtemp(prefix="rspf-test-pg-")
    subprocess.run([initdb, "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([postgres, "-D", data, "-p", str(port), "-k", data, "-c", "listen_addresses=127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(data, ignore_errors=True)
    atexit.register(stop)
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    deadline = time.monotonic() + 30
    while _answers(url) is not None:
        if proc.poll() is not None or time.monotonic() > deadline:
            _why.append(f"the private server did not start (exit {proc.poll()})")
            return None
        time.sleep(0.1)
    return url


def server_url() -> str | None:
    """The test server's URL (found or started once per session), or None when there is none."""
    if not _found:
        configured = os.environ.get("RSPF_TEST_POSTGRES_URL")
        if configured is not None:
            why = _answers(configured)
            _found.append(None if why else configured)
            _why.extend([why] if why else [])
        elif (why := _answers(DEFAULT_URL)) is None:
            _found.append(DEFAULT_URL)
        else:
            _why.append(why)
            _found.append(_private_server())
    return _found[0]


def require() -> str:
    """The test server's URL; skips (or, with RSPF_REQUIRE_POSTGRES=1, fails) the calling test without one."""
    url = server_url()
    if url is not None:
        return url
    why = "; ".join(_why)
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

    server = require()
    schema = f"rspf_test_{secrets.token_hex(6)}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield with_schema(server, schema)
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
