"""Shared fixtures for the unit tests (MEF store/service, securityProfile builder).

Everything here is in-process: no sockets, no sleeps. Tests import the INSTALLED ``rspf``.
Helpers are handed out as fixtures (never imported from this module by name), so a second conftest.py
elsewhere in the tree can never shadow them. The constants below are repeated in the test modules that
need them; keep them in step.
"""

from __future__ import annotations

import base64
import datetime as dt
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rspf import keys, profile
from rspf.mef.config import MefConfig
from rspf.mef.service import MefService
from rspf.mef.store import EnroleeRecord, MefStore
from rspf.mef.store_sqlite import SqliteStore
from rspf.secret import Secret

MEF_FQDN = "mef.example.com"
SP_ID = "//sp.example.com"
#: a fake 48-byte EXPORTER-oneM2M-Bootstrap output: RelativeKeID = 00..0f, Ke = 10..2f
EXPORTER = bytes(range(48))
KE = Secret(EXPORTER[16:], "Ke")
REL_KE_ID_HEX = EXPORTER[:16].hex()
KE_ID = f"{REL_KE_ID_HEX}@{MEF_FQDN}"


def enrolee_record(n: int = 1, **overrides: Any) -> EnroleeRecord:
    values: dict[str, Any] = dict(
        kpm_id=f"dev{n}@{MEF_FQDN}",
        enrolee_id=f"/id-mn{n}",
        node_id=f"urn:dev:ops:{n:03d}",
        registrar_cse_id="/id-in",
        registrar_uri="https://in.example.com:8443/cse-in",
    )
    values.update(overrides)
    return EnroleeRecord(**values)


def kpm_for(n: int = 1) -> Secret:
    return Secret(bytes([n]) * 32, "Kpm")


def build_profile(ke: Secret = KE, ke_id: str = KE_ID, *, issued: dt.datetime | None = None,
                  lifetime: dt.timedelta = dt.timedelta(days=30), **overrides: Any) -> dict[str, Any]:
    """A securityProfile built the way MefService.provision_profile builds one."""
    issued = issued or dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    fqdn = keys.target_fqdn(SP_ID + "/id-in")
    key = keys.derive_usage_constrained_key(ke, keys.SUID_RSPF_SAEF, fqdn)
    body: dict[str, Any] = {
        "version": 1,
        "enroleeType": "CSE",
        "enroleeID": "/id-mn1",
        "nodeID": "urn:dev:ops:001",
        "spID": SP_ID,
        "mefFQDN": MEF_FQDN,
        "registrar": {"cseID": "/id-in", "cseBaseURI": "https://in.example.com:8443/cse-in", "fqdn": fqdn},
        "credential": {"keyID": ke_id, "suid": keys.SUID_RSPF_SAEF, "key": base64.b64encode(key.reveal()).decode()},
        "issuedAt": profile.format_timestamp(issued),
        "expiry": profile.format_timestamp(issued + lifetime),
    }
    body.update(overrides)
    return body


@pytest.fixture
def mef_config(tmp_path) -> MefConfig:
    return MefConfig.from_dict(
        {"fqdn": MEF_FQDN, "sp_id": SP_ID, "database": "mef.sqlite", "master_key_file": "mef.masterkey",
         "enrolment_expiry_seconds": 3600},
        base_dir=tmp_path,
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path) -> Iterator[MefStore]:
    """The MEF store, once per implementation: SQLite, and PostgreSQL in a fresh schema of the test server
    (integration/postgres.py: skipped, or failed in CI, when none answers)."""
    if request.param == "sqlite":
        s: MefStore = SqliteStore(tmp_path / "mef.sqlite", tmp_path / "mef.masterkey")
        yield s
        s.close()
        return
    from integration.postgres import fresh_schema

    from rspf.mef.store_pg import PostgresStore

    with fresh_schema() as url:
        s = PostgresStore(url, tmp_path / "mef.masterkey", pool_size=4)
        yield s
        s.close()


@pytest.fixture
def sqlite_store(tmp_path) -> Iterator[SqliteStore]:
    """The SQLite store alone (for what only it has: its file, its schema migrations)."""
    s = SqliteStore(tmp_path / "mef.sqlite", tmp_path / "mef.masterkey")
    yield s
    s.close()


@pytest.fixture
def service(mef_config, store) -> MefService:
    return MefService(mef_config, store)


@pytest.fixture
def make_profile():
    """Factory fixture: ``make_profile(ke=..., ke_id=..., issued=..., lifetime=..., **overrides)``."""
    return build_profile


@pytest.fixture
def make_enrolee():
    """Factory fixture: ``make_enrolee(n, **overrides) -> (EnroleeRecord, Kpm)``."""
    def make(n: int = 1, **overrides: Any) -> tuple[EnroleeRecord, Secret]:
        return enrolee_record(n, **overrides), kpm_for(n)
    return make


def pytest_configure(config: pytest.Config) -> None:
    """Put the repository root on sys.path, so unit tests can share small test-only helpers with
    integration/ (integration.pki). It holds no ``rspf`` package: the installed one is still under test."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
