"""Observability against real processes: the audit log, /metrics and /health of ``rspf mef serve`` and of the
CSE plugin in a real ACME (docs/observability.md). Every process is started on free 127.0.0.1 ports and stopped
by its PID; servers are polled, never waited for with a fixed sleep.
"""

from __future__ import annotations

import http.client
import json
import os
import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rspf.fileutil import read_key_file
from rspf.secret import Secret
from rspf.tls import PskClient

from .acme_harness import (
    HOST,
    IN_CSE_ID,
    TY_AE,
    AcmeCse,
    ae_body,
    key_forms,
    new_mef,
    secure_request,
    wait_until,
)
from .support import FQDN, MefHome, enrolee_client, free_port, read_hex

# ------------------------------------------------------------------------------------------------ helpers


def http_get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = http_get(port, "/metrics")
    assert status == 200, body
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def health(port: int) -> tuple[int, dict[str, Any]]:
    status, body = http_get(port, "/health")
    return status, json.loads(body)


def health_is(port: int, status: int) -> tuple[int, dict[str, Any]] | None:
    """For polling: the health answer when its status is ``status``, else None (also while nothing answers)."""
    try:
        got = health(port)
    except OSError:
        return None
    return got if got[0] == status else None


def audit_entries(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def find(entries: list[dict[str, Any]], action: str, **fields: Any) -> list[dict[str, Any]]:
    return [e for e in entries if e["action"] == action and all(e.get(k) == v for k, v in fields.items())]


def assert_no_key_in(path: Path, secrets: dict[str, bytes]) -> None:
    text = path.read_text()
    for name, secret in secrets.items():
        for form, shown in key_forms(secret).items():
            assert shown not in text, f"{name} ({form}) is in {path}"


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ============================================================================================ the MEF
@pytest.fixture
def observed_mef(mef_home: MefHome) -> MefHome:
    """The default MEF home with metrics on a free port (its audit log is on by default), running."""
    mef_home.metrics_port = free_port()  # type: ignore[attr-defined]
    mef_home.set_config("metrics_listen", f'"{HOST}:{mef_home.metrics_port}"')  # type: ignore[attr-defined]
    mef_home.start()
    return mef_home


def test_mef_enrolment_fetch_and_admin_commands_reach_the_audit_log_and_the_metrics(observed_mef: MefHome) -> None:
    mef, port = observed_mef, observed_mef.metrics_port  # type: ignore[attr-defined]
    audit = mef.root / "audit.jsonl"
    dev1, target = mef.enrolees["dev1"], mef.targets["in"]
    assert health(port) == (200, {"status": "ok", "problems": []})
    before = scrape(port)
    assert value(before, "rspf_mef_enrolees", state="active") == 1
    assert value(before, "rspf_mef_enrolment_keys_live") == 0

    res = mef.enrol(dev1)
    assert res.rc == 0, str(res)
    ke_id = res.json()["keID"]
    out = mef.root / "fetched.hex"
    res = mef.fetch(target, ke_id, 22, key_out=out)
    assert res.rc == 0, str(res)
    res = mef.fetch(target, f"{'0' * 32}@{FQDN}", 22)  # an unknown KeID: refused
    assert res.rc == 1, str(res)
    mef.cli.ok("mef", "enrolee", "suspend", "-c", mef.config, dev1.kpm_id)
    mef.cli.ok("mef", "enrolee", "resume", "-c", mef.config, dev1.kpm_id)
    res = mef.cli("mef", "enrolee", "resume", "-c", mef.config, dev1.kpm_id)  # already active: refused
    assert res.rc == 2, str(res)
    mef.cli.ok("mef", "enrolee", "revoke-key", "-c", mef.config, ke_id)

    after = scrape(port)
    assert value(after, "rspf_mef_enrolments_total", result="ok") == 1
    assert value(after, "rspf_mef_profiles_provisioned_total") == 1
    assert value(after, "rspf_mef_fetches_total", result="ok") == 1
    assert value(after, "rspf_mef_fetches_total", result="refused") == 1
    assert value(after, "rspf_mef_refusals_total", reason="fetch-credentials 4004") == 1
    assert value(after, "rspf_mef_refusals_total", reason="unknown identity") >= 1  # the harness's readiness probe
    assert value(after, "rspf_mef_handshakes_total", result="ok") >= 2
    assert value(after, "rspf_mef_revocation_log_rows") >= 1  # revoke-key wrote its row
    assert value(after, "rspf_mef_enrolment_keys_live") == 0
    assert "rspf_mef_connections_open" in {name for name, _ in after}

    entries = audit_entries(audit)
    assert mode(audit) == 0o600
    assert all({"time", "actor", "action", "subject", "result", "cause"} <= set(e) for e in entries)
    me = entries[0]["actor"]
    assert me.startswith("operator:")
    assert find(entries, "enrolee.add", subject=dev1.kpm_id, result="ok", actor=me)
    assert find(entries, "target.add", subject=target.psk_identity, result="ok")
    assert find(entries, "enrolment.key-stored", subject=ke_id, actor=f"enrolee:{dev1.kpm_id}")
    assert find(entries, "enrolment.profile", subject=ke_id)
    (fetched,) = find(entries, "fetch-credentials", subject=ke_id, result="ok")
    assert fetched["actor"] == "target://sp.example.com/id-in" and fetched["details"]["suid"] == 22
    (unknown,) = find(entries, "fetch-credentials", result="refused")
    assert unknown["details"]["rsc"] == 4004
    assert find(entries, "enrolee.suspend", subject=dev1.kpm_id, result="ok", actor=me)
    assert find(entries, "enrolee.resume", subject=dev1.kpm_id, result="ok")
    (refused,) = find(entries, "enrolee.resume", result="refused")
    assert refused["cause"]
    assert find(entries, "key.revoke", subject=ke_id, result="ok")
    assert find(entries, "authenticate", subject="readiness-probe", result="refused")

    enrolment = enrolee_client(mef, dev1).load()
    assert_no_key_in(audit, {"Kpm": bytes.fromhex(dev1.kpm_hex), "Target PSK": bytes.fromhex(target.psk_hex),
                             "fetched key": bytes.fromhex(read_hex(out)),
                             "registrar key": enrolment.registrar_key.reveal(),
                             "master key": read_key_file(mef.root / "mef.masterkey", "master key").reveal()})


def test_mef_health_is_degraded_while_the_database_cannot_be_written(observed_mef: MefHome) -> None:
    port = observed_mef.metrics_port  # type: ignore[attr-defined]
    assert health(port)[0] == 200
    db = sqlite3.connect(observed_mef.database, timeout=1, isolation_level=None)
    try:
        db.execute("BEGIN EXCLUSIVE")  # another writer holds the database
        status, body = health(port)
        assert status == 503 and body["status"] == "degraded"
        assert any("cannot be written" in p for p in body["problems"]), body
    finally:
        db.execute("ROLLBACK")
        db.close()
    assert health(port) == (200, {"status": "ok", "problems": []})


def test_an_unusable_audit_log_stops_serve_and_admin_commands_before_they_change_anything(mef_home: MefHome) -> None:
    (mef_home.root / "a-directory").mkdir()
    mef_home.set_config("audit_log", '"a-directory"')
    res = mef_home.cli("mef", "serve", "-c", mef_home.config, "--port", free_port(), timeout=30)
    assert res.rc == 2 and "audit_log" in res.stderr and "a-directory" in res.stderr, str(res)
    kpm_id = mef_home.enrolees["dev1"].kpm_id
    res = mef_home.cli("mef", "enrolee", "revoke", "-c", mef_home.config, kpm_id)
    assert res.rc == 2 and "audit_log" in res.stderr, str(res)
    assert mef_home.show(kpm_id)["state"] == "active"  # nothing changed


@pytest.mark.parametrize("listen", ['"localhost:9464"', '"127.0.0.1"', '"127.0.0.1:99999"', "9464"])
def test_a_bad_metrics_listen_stops_serve_naming_the_key(mef_home: MefHome, listen: str) -> None:
    mef_home.set_config("metrics_listen", listen)
    res = mef_home.cli("mef", "serve", "-c", mef_home.config, "--port", free_port(), timeout=30)
    assert res.rc == 2 and "metrics_listen" in res.stderr, str(res)


def test_audit_log_false_writes_none(mef_home: MefHome) -> None:
    audit = mef_home.root / "audit.jsonl"
    audit.unlink()  # written by the admin commands that built the home
    mef_home.set_config("audit_log", "false")
    mef_home.cli.ok("mef", "enrolee", "suspend", "-c", mef_home.config, mef_home.enrolees["dev1"].kpm_id)
    assert not audit.exists()


# ===================================================================================== the CSE plugin
def test_plugin_audit_log_metrics_and_health_in_a_real_acme(tmp_path: Path) -> None:
    mef, target = new_mef(tmp_path / "mef")
    mef.start()
    cse = AcmeCse(tmp_path, "in")
    metrics_port = free_port()
    try:
        cse.install(mef, "--no-enrol", "--mef-psk-identity", target.psk_identity, "--mef-psk-file", target.psk_file)
        cse.set_rspf("metricsListen", f"{HOST}:{metrics_port}", add=True)
        cse.start()
        audit = cse.base / "data" / "rspf-audit.jsonl"
        wait_until(lambda: health_is(metrics_port, 200), what="the plugin's health to be ok (feed read)")

        info = mef.add_enrolee("obs1", enrolee_id="Cobs1", registrar=IN_CSE_ID, registrar_uri=cse.secure_uri)
        enrolment = enrolee_client(mef, info).enrol()
        r = secure_request(cse.secure_port, enrolment.ke_id, enrolment.registrar_key, "POST", f"/{cse.cse_name}",
                           ae_body("Cobs1", "Nobs"), origin="Cobs1", ty=TY_AE)
        assert r.rsc == 2001, str(r)
        r = secure_request(cse.secure_port, enrolment.ke_id, enrolment.registrar_key, "POST", f"/{cse.cse_name}",
                           ae_body("Cobs2", "Nobs"), origin="Cobs2", ty=TY_AE)  # another AE's name: refused
        assert r.rsc == 4106, str(r)
        with pytest.raises(Exception, match="refused the TLS-PSK handshake"):  # a made-up KeID
            PskClient().connect(HOST, cse.secure_port, f"{'1' * 32}@{FQDN}", Secret(bytes(32)), timeout=15).close()

        # the server counts a refused handshake once it has sent its alert: the client may see the alert first
        def refusal_counted() -> Any:
            got = scrape(metrics_port)
            return got if value(got, "rspf_cse_secure_handshakes_total", result="refused") >= 1 else None

        m = wait_until(refusal_counted, what="the refused handshake to be counted")
        assert value(m, "rspf_cse_registrations_total", result="admitted") == 1
        assert value(m, "rspf_cse_credentials_recorded_total") == 1
        assert value(m, "rspf_cse_refusals_total", where="secure_listener") >= 1
        assert value(m, "rspf_cse_secure_handshakes_total", result="ok") >= 2
        assert value(m, "rspf_cse_secure_handshakes_total", result="refused") >= 1
        assert value(m, "rspf_cse_mef_fetches_total") >= 2  # the real KeID and the made-up one
        assert value(m, "rspf_cse_key_cache_misses_total") >= 2
        assert value(m, "rspf_cse_key_cache_hits_total") >= 1  # the second connection of the same KeID
        assert value(m, "rspf_cse_key_cache_keys") == 1

        mef.cli.ok("mef", "enrolee", "revoke", "-c", mef.config, info.kpm_id)
        applied = wait_until(lambda: find(audit_entries(audit), "revocation.applied", subject=enrolment.ke_id),
                             what="the revocation to be applied at the CSE")
        assert applied[0]["cause"] == "enrolee-revoked" and applied[0]["actor"] == "cse:/id-in"
        m = scrape(metrics_port)
        assert value(m, "rspf_cse_revocations_applied_total") >= 1
        assert value(m, "rspf_cse_revocation_feed_position") >= 1
        assert 0 <= value(m, "rspf_cse_revocation_feed_lag_seconds") < 30

        entries = audit_entries(audit)
        assert mode(audit) == 0o600
        assert find(entries, "registration", subject="Cobs1", result="ok", actor=f"credential:{enrolment.ke_id}")
        assert find(entries, "credential.recorded", subject=f"12-{enrolment.ke_id}")
        assert [e for e in find(entries, "request", result="refused") if e["details"]["rsc"] == 4106]
        assert [e for e in find(entries, "connection", result="refused") if e["subject"].startswith("1111")]

        mef.stop()  # the MEF goes away: the plugin's health says so within a few feed polls
        status, body = wait_until(lambda: health_is(metrics_port, 503), what="the plugin's health to turn degraded")
        assert body["status"] == "degraded" and any("MEF is unreachable" in p for p in body["problems"]), body
        assert_no_key_in(audit, {"registrar key": enrolment.registrar_key.reveal(),
                                 "Target PSK": bytes.fromhex(target.psk_hex), "Kpm": bytes.fromhex(info.kpm_hex)})
    finally:
        cse.stop()
        mef.stop()


def test_plugin_with_an_unusable_audit_log_does_not_start(tmp_path: Path) -> None:
    mef, target = new_mef(tmp_path / "mef")
    cse = AcmeCse(tmp_path, "in")
    try:
        cse.install(mef, "--no-enrol", "--mef-psk-identity", target.psk_identity, "--mef-psk-file", target.psk_file)
        (cse.base / "not-a-file").mkdir()
        cse.set_rspf("auditLog", "not-a-file", add=True)
        cse.start(wait=False)
        assert cse.proc is not None
        rc = cse.proc.wait(60)
        assert rc != 0
        assert "auditLog" in cse.log_text() and "not-a-file" in cse.log_text()
    finally:
        cse.stop()
