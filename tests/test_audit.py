"""rspf.audit: the append-only JSON-lines audit log, and the MEF service's records in it."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import stat
import threading
from pathlib import Path

import pytest
from test_keycache import Clock

from rspf import keys, profile
from rspf.audit import Action, AuditLog, Result, operator
from rspf.errors import AccessDenied, ConfigError, NotFound
from rspf.mef import protocol
from rspf.mef.service import MefService
from rspf.mef.store import TargetRecord
from rspf.secret import Secret

FIELDS = {"time", "actor", "action", "subject", "result", "cause"}


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_are_json_lines_with_every_field_in_a_0600_file(tmp_path):
    path = tmp_path / "sub" / "audit.jsonl"
    audit = AuditLog(path)
    audit.record(Action.ENROLEE_REVOKE, actor="operator:alice", subject="dev1@mef.example.com", details={"keys": 2})
    audit.record(Action.FETCH, actor="target://sp/id-in", subject="ab@mef", result=Result.REFUSED, cause="4004 gone")
    audit.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    first, second = lines(path)
    assert FIELDS <= set(first) and FIELDS <= set(second)
    assert first["action"] == "enrolee.revoke" and first["result"] == "ok" and first["details"] == {"keys": 2}
    assert (second["actor"], second["result"], second["cause"]) == ("target://sp/id-in", "refused", "4004 gone")
    when = dt.datetime.fromisoformat(first["time"])
    assert when.utcoffset() == dt.timedelta(0) and first["time"].endswith("Z")
    assert abs((dt.datetime.now(dt.UTC) - when).total_seconds()) < 60


def test_lines_are_appended_never_rewritten(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_text('{"kept": true}\n')
    path.chmod(0o600)
    one, two = AuditLog(path), AuditLog(path)  # two processes' worth of file descriptors
    one.record(Action.TARGET_ADD, actor="operator:a", subject="x")
    two.record(Action.TARGET_REVOKE, actor="operator:b", subject="x")
    one.close()
    two.close()
    assert [entry.get("action") for entry in lines(path)] == [None, "target.add", "target.revoke"]


@pytest.mark.parametrize("value", [Secret(b"k" * 32), b"raw bytes", 3.5, None, ["list"]])
def test_key_material_and_untyped_values_are_refused_before_anything_is_written(tmp_path, value):
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    for kwargs in ({"subject": value}, {"cause": value}, {"actor": value}, {"details": {"key": value}}):
        call = {"actor": "operator:a", "subject": "s", "cause": "c", **kwargs}
        with pytest.raises(TypeError, match="never written"):
            audit.record(Action.KEY_REVOKE, **call)
        with pytest.raises(TypeError, match="never written"):
            audit.refused(Action.KEY_REVOKE, **call)
    audit.close()
    assert path.read_text() == ""


def test_action_and_result_must_be_the_typed_values(tmp_path):
    audit = AuditLog(None)  # off: still checked, so a mistake shows in every configuration
    with pytest.raises(TypeError):
        audit.record("enrolee.add", actor="a", subject="s")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        audit.record(Action.ENROLEE_ADD, actor="a", subject="s", result="ok")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        audit.record(Action.ENROLEE_ADD, actor="a", subject=Secret(b"x" * 16))  # type: ignore[arg-type]
    assert not audit.enabled


def test_long_and_hostile_values_stay_on_one_line(tmp_path):
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    audit.record(Action.AUTHENTICATE, actor="peer:1.2.3.4", subject="evil\n{\"forged\": 1}\r\x00é" + "x" * 5000)
    audit.close()
    (entry,) = lines(path)
    assert entry["subject"].startswith("evil\n") and len(entry["subject"]) == 512


def test_an_existing_file_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_text("")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        AuditLog(path)


@pytest.mark.parametrize("make", ["directory", "symlink", "under-a-file", "unwritable"])
def test_a_bad_path_is_a_clear_config_error(tmp_path, make):
    path = tmp_path / "audit.jsonl"
    if make == "directory":
        path.mkdir()
    elif make == "symlink":
        (tmp_path / "elsewhere").write_text("")
        path.symlink_to(tmp_path / "elsewhere")
    elif make == "under-a-file":
        (tmp_path / "plain").write_text("")
        path = tmp_path / "plain" / "audit.jsonl"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes anywhere")
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        path = locked / "audit.jsonl"
    with pytest.raises(ConfigError, match="audit log") as info:
        AuditLog(path)
    assert str(path) in str(info.value)


def test_refusals_past_the_burst_are_counted_in_one_summary_line(tmp_path):
    path = tmp_path / "audit.jsonl"
    clock = Clock()
    audit = AuditLog(path, burst=3, interval=10.0, clock=clock)
    for i in range(1000):
        audit.refused(Action.AUTHENTICATE, actor=f"peer:10.0.0.{i % 2}", subject=f"id{i}", cause="unknown identity",
                      source=f"10.0.0.{i % 2}")
    assert len(lines(path)) == 3  # the flood cost three lines so far
    clock.t += 11
    audit.roll()
    entries = lines(path)
    assert len(entries) == 4
    summary = entries[-1]
    assert summary["action"] == "refusals.summary" and summary["result"] == "refused"
    assert "997 more refusals" in summary["cause"] and "unknown identity" in summary["cause"]
    assert "10.0.0.0 (499)" in summary["cause"] or "10.0.0.1 (499)" in summary["cause"]
    audit.refused(Action.AUTHENTICATE, actor="peer:x", subject="y", cause="again")  # a new interval: in full
    assert lines(path)[-1]["subject"] == "y"


def test_close_writes_the_summary_of_the_interval_in_progress(tmp_path):
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, burst=1, interval=60.0, clock=Clock())
    for _ in range(5):
        audit.refused(Action.CONNECTION, actor="peer:x", subject="-", cause="TLS handshake refused")
    audit.close()
    assert [e["action"] for e in lines(path)] == ["connection", "refusals.summary"]
    assert "4 more refusals" in lines(path)[-1]["cause"]


def test_concurrent_writers_never_tear_a_line(tmp_path):
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)

    def write(n: int) -> None:
        for i in range(200):
            audit.record(Action.FETCH, actor=f"target:{n}", subject="k" * 300, details={"i": i})

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    audit.close()
    entries = lines(path)
    assert len(entries) == 1600
    assert sorted((e["actor"], e["details"]["i"]) for e in entries) == sorted(
        (f"target:{n}", i) for n in range(8) for i in range(200))


# ---------------------------------------------------------------------------------------------
# the MEF service's records

EXPORTER = bytes(range(48))
IN_PSK = Secret(b"i" * 32)


def test_mef_enrolment_fetch_and_refusals_are_audited_without_any_key(tmp_path, mef_config, store, make_enrolee):
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    service = MefService(mef_config, store, audit=audit)
    rec, kpm = make_enrolee(1)
    store.add_enrolee(rec, kpm)
    store.add_target(TargetRecord("in@sp.example.com", "/id-in"), IN_PSK)
    session = service.open_session(rec.kpm_id, Secret(EXPORTER, "exporter output"))
    reply = service.handle(session, "CREATE", "/securityProfile", rec.kpm_id, {"rspf:spReq": {"nodeID": rec.node_id}})
    issued = base64.b64decode(reply.content[profile.WRAPPER]["credential"]["key"])
    target = service.open_session("in@sp.example.com", None)
    got = service.handle(target, "RETRIEVE", f"/fetchCredentials/{session.ke_id}/22", "/id-in", None)
    fetched = protocol.parse_fetch_response(got.content).key
    with pytest.raises(NotFound):
        service.handle(target, "RETRIEVE", f"/fetchCredentials/{'0' * 32}@{mef_config.fqdn}/22", "/id-in", None)
    with pytest.raises(AccessDenied):
        service.handle(target, "RETRIEVE", f"/fetchCredentials/{session.ke_id}/22", "/id-other", None)
    assert service.psk_for("nobody@x", "192.0.2.7") is None
    audit.close()

    entries = lines(path)
    by_action = {}
    for e in entries:
        by_action.setdefault(e["action"], []).append(e)
    (stored,) = by_action["enrolment.key-stored"]
    assert (stored["actor"], stored["subject"], stored["result"]) == (f"enrolee:{rec.kpm_id}", session.ke_id, "ok")
    (prof,) = by_action["enrolment.profile"]
    assert prof["details"]["enroleeID"] == rec.enrolee_id
    ok, unknown, denied = by_action["fetch-credentials"]
    assert (ok["actor"], ok["subject"], ok["result"], ok["details"]["suid"]) == (
        "target://sp.example.com/id-in", session.ke_id, "ok", 22)
    assert (unknown["result"], unknown["details"]["rsc"], unknown["details"]["suid"]) == ("refused", 4004, 22)
    assert denied["result"] == "refused" and "originator" in denied["cause"]
    (auth,) = by_action["authenticate"]
    assert (auth["actor"], auth["subject"], auth["result"]) == ("peer:192.0.2.7", "nobody@x", "refused")

    text = path.read_text()
    ke = session.enrolment_key.reveal()
    secrets = [kpm.reveal(), IN_PSK.reveal(), ke, issued, fetched, EXPORTER,
               keys.derive_usage_constrained_key(Secret(ke), 22, "id-in.sp.example.com").reveal()]
    for secret in secrets:
        for form in (secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode(),
                     base64.urlsafe_b64encode(secret).decode().rstrip("=")):
            assert form not in text
    registry = service.metrics.registry
    assert registry.get_sample_value("rspf_mef_enrolments_total", {"result": "ok"}) == 1
    assert registry.get_sample_value("rspf_mef_fetches_total", {"result": "ok"}) == 1
    assert registry.get_sample_value("rspf_mef_fetches_total", {"result": "refused"}) == 2
    assert registry.get_sample_value("rspf_mef_refusals_total", {"reason": "unknown identity"}) == 1
    assert registry.get_sample_value("rspf_mef_refusals_total", {"reason": "fetch-credentials 4004"}) == 1


def test_operator_is_the_real_user_and_who_ran_sudo(monkeypatch):
    import pwd
    me = pwd.getpwuid(os.getuid()).pw_name
    monkeypatch.setenv("USER", "someone-else")
    monkeypatch.setenv("LOGNAME", "someone-else")
    monkeypatch.delenv("SUDO_USER", raising=False)
    assert operator() == f"operator:{me}"  # the environment cannot rename the actor
    monkeypatch.setenv("SUDO_USER", "alice")
    assert operator() == f"operator:{me} (sudo by alice)"
