"""The MEF tells the operator why it refused, at WARNING, with the identity and never a key; a flood of
refusals is summarised (rspf.ratelimit.RefusalLog)."""

from __future__ import annotations

import base64
import logging

import pytest

from rspf.errors import AccessDenied, BadRequest, NotFound
from rspf.mef.store import TargetGrant, TargetRecord
from rspf.secret import Secret

MEF_FQDN = "mef.example.com"
EXPORTER = bytes(range(48))
KE_ID = f"{EXPORTER[:16].hex()}@{MEF_FQDN}"
IN_PSK_ID = "in@sp.example.com"
X_PSK_ID = "x@sp.example.com"
IN_PSK, X_PSK = b"i" * 32, b"x" * 32


@pytest.fixture
def enrolee(store, make_enrolee):
    rec, kpm = make_enrolee(1, targets=[TargetGrant("/id-x", (23,))])
    store.add_enrolee(rec, kpm)
    store.add_target(TargetRecord(IN_PSK_ID, "/id-in"), Secret(IN_PSK))
    store.add_target(TargetRecord(X_PSK_ID, "//sp.example.com/id-x"), Secret(X_PSK))
    return rec


def enrolled(service, rec):
    s = service.open_session(rec.kpm_id, Secret(EXPORTER, "exporter output"))
    service.handle(s, "CREATE", "/securityProfile", rec.kpm_id, {"rspf:spReq": {"nodeID": rec.node_id}})
    return s


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "rspf.mef.service"]


def assert_no_keys(caplog, kpm: Secret) -> None:
    text = caplog.text
    for secret in (kpm.reveal(), EXPORTER[16:], IN_PSK, X_PSK):
        assert secret.hex() not in text and base64.b64encode(secret).decode() not in text
        assert repr(secret) not in text


@pytest.mark.parametrize("path,psk_id,origin,error,words", [
    (f"/fetchCredentials/{'f' * 32}@{MEF_FQDN}/22", IN_PSK_ID, "/id-in", NotFound, "unknown, expired or revoked"),
    (f"/fetchCredentials/{KE_ID}/22", X_PSK_ID, "/id-x", AccessDenied, "not an authorized Enrolment Target"),
    (f"/fetchCredentials/{KE_ID}/99999", IN_PSK_ID, "/id-in", BadRequest, "SUID"),
    (f"/fetchCredentials/{KE_ID}/22", IN_PSK_ID, "/id-x", AccessDenied, "not the identity this connection"),
])
def test_fetch_credentials_refusals_are_warnings_naming_identity_and_reason(
        service, enrolee, make_enrolee, caplog, path, psk_id, origin, error, words) -> None:
    enrolled(service, enrolee)
    t = service.open_session(psk_id, None)
    with caplog.at_level(logging.INFO), pytest.raises(error):
        service.handle(t, "RETRIEVE", path, origin, None)
    (msg,) = warnings_of(caplog)
    assert words in msg and psk_id in msg and path in msg and origin in msg
    assert_no_keys(caplog, make_enrolee(1)[1])


def test_a_revoked_keid_is_refused_with_a_warning(service, store, enrolee, make_enrolee, caplog) -> None:
    enrolled(service, enrolee)
    store.revoke_enrolee(enrolee.kpm_id)
    t = service.open_session(IN_PSK_ID, None)
    with caplog.at_level(logging.INFO), pytest.raises(NotFound):
        service.handle(t, "RETRIEVE", f"/fetchCredentials/{KE_ID}/22", "/id-in", None)
    (msg,) = warnings_of(caplog)
    assert KE_ID in msg and "revoked" in msg
    assert_no_keys(caplog, make_enrolee(1)[1])


def test_an_unknown_or_revoked_kpm_id_at_the_handshake_is_a_warning(service, store, enrolee, make_enrolee,
                                                                   caplog) -> None:
    with caplog.at_level(logging.INFO):
        assert service.psk_for("nobody@mef.example.com") is None
        store.revoke_enrolee(enrolee.kpm_id)
        assert service.psk_for(enrolee.kpm_id) is None
    msgs = warnings_of(caplog)
    assert len(msgs) == 2 and "'nobody@mef.example.com'" in msgs[0] and repr(enrolee.kpm_id) in msgs[1]
    assert all("revoked" in m for m in msgs)
    assert_no_keys(caplog, make_enrolee(1)[1])


def test_a_wrong_node_id_is_a_warning(service, enrolee, make_enrolee, caplog) -> None:
    s = service.open_session(enrolee.kpm_id, Secret(EXPORTER, "exporter output"))
    with caplog.at_level(logging.INFO), pytest.raises(AccessDenied):
        service.handle(s, "CREATE", "/securityProfile", enrolee.kpm_id, {"rspf:spReq": {"nodeID": "urn:other"}})
    (msg,) = warnings_of(caplog)
    assert enrolee.kpm_id in msg and "M2M-Node-ID" in msg
    assert_no_keys(caplog, make_enrolee(1)[1])


def test_a_flood_of_refusals_does_not_flood_the_warnings(service, caplog) -> None:
    with caplog.at_level(logging.INFO):
        for i in range(500):
            service.psk_for(f"made-up-{i}@mef.example.com")
    assert len(warnings_of(caplog)) == 20  # the rest went to INFO; the next interval starts with a count
    assert sum("made-up-" in r.getMessage() for r in caplog.records) == 500
