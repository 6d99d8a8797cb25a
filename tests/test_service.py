"""rspf.mef.service: MEF policy driven directly (no sockets) with a fake exporter output."""

from __future__ import annotations

import base64
import datetime as dt
import logging

import pytest

from rspf import keys, profile
from rspf.errors import RSC, AccessDenied, BadRequest, NotFound, OperationNotAllowed, RspfError
from rspf.mef.protocol import INSTRUCTION_END, INSTRUCTION_RM
from rspf.mef.service import MefService, Phase, Principal
from rspf.mef.store import TargetGrant, TargetRecord
from rspf.secret import Secret

MEF_FQDN = "mef.example.com"
SP_ID = "//sp.example.com"
EXPORTER = bytes(range(48))
KE = Secret(EXPORTER[16:], "Ke")
KE_ID = f"{EXPORTER[:16].hex()}@{MEF_FQDN}"
RM_URI = "https://dm.example.com/rm"
IN_PSK_ID = "in@sp.example.com"
X_PSK_ID = "x@sp.example.com"


@pytest.fixture
def enrolee(store, make_enrolee):
    """Enrolee dev1 (/id-mn1, registrar /id-in) with a remote management server and Target /id-x for SUID 23."""
    rec, kpm = make_enrolee(1, rm_uri=RM_URI, targets=[TargetGrant("/id-x", (23, 24))])
    store.add_enrolee(rec, kpm)
    store.add_target(TargetRecord(IN_PSK_ID, "/id-in"), Secret(b"i" * 32))
    store.add_target(TargetRecord(X_PSK_ID, "//sp.example.com/id-x"), Secret(b"x" * 32))
    return rec


def enrolee_session(service, rec, exporter=EXPORTER):
    return service.open_session(rec.kpm_id, Secret(exporter, "exporter output"))


def enrolled(service, rec):
    """An enrolee session that got its profile, so its Ke is stored under KE_ID."""
    s = enrolee_session(service, rec)
    service.handle(s, "CREATE", "/securityProfile", rec.kpm_id, {"rspf:spReq": {"nodeID": rec.node_id}})
    return s


def fetch(service, session, ke_id=KE_ID, suid="22", originator="/id-in"):
    return service.handle(session, "RETRIEVE", f"/fetchCredentials/{ke_id}/{suid}", originator, None)


# ---------------------------------------------------------------------------------------------
# sessions


def test_open_session_for_an_enrolee_derives_ke_id_with_the_config_fqdn(service, enrolee):
    s = enrolee_session(service, enrolee)
    assert s.kind is Principal.ENROLEE
    assert s.ke_id == KE_ID
    assert s.ke_id == keys.make_ke_id(EXPORTER[:16], service.config.fqdn)
    assert s.enrolment_key == KE
    assert s.principal_id == SP_ID + "/id-mn1"
    assert s.phase is Phase.STARTED and not s.committed
    assert KE.reveal().hex() not in repr(s)


def test_open_session_stores_nothing(service, store, enrolee):
    enrolee_session(service, enrolee)
    assert store.get_enrolment_key(KE_ID) is None


def test_other_exporter_output_gives_other_ke_id(service, enrolee):
    other = bytes(range(100, 148))
    s = enrolee_session(service, enrolee, other)
    assert s.ke_id == f"{other[:16].hex()}@{MEF_FQDN}" != KE_ID
    assert s.enrolment_key == Secret(other[16:])


def test_open_session_for_an_ae_enrolee(service, store, make_enrolee):
    rec, kpm = make_enrolee(2, enrolee_id="Cmy-sensor")
    store.add_enrolee(rec, kpm)
    s = enrolee_session(service, rec)
    assert s.principal_id == SP_ID + "/id-in/Cmy-sensor"


def test_open_session_enrolee_without_exporter_is_refused(service, enrolee):
    with pytest.raises(RspfError):
        service.open_session(enrolee.kpm_id, None)


def test_open_session_for_a_target(service, enrolee):
    s = service.open_session(IN_PSK_ID, None)
    assert s.kind is Principal.TARGET
    assert s.principal_id == SP_ID + "/id-in"
    assert s.ke_id is None and s.enrolment_key is None


def test_open_session_unknown_identity_is_access_denied(service, enrolee):
    with pytest.raises(AccessDenied):
        service.open_session("nobody", None)


def test_psk_for(service, store, enrolee):
    assert service.psk_for(enrolee.kpm_id) == store.enrolee_psk(enrolee.kpm_id)
    assert service.psk_for(IN_PSK_ID) == Secret(b"i" * 32)
    assert service.psk_for("nobody") is None
    store.revoke_enrolee(enrolee.kpm_id)
    store.revoke_target(IN_PSK_ID)
    assert service.psk_for(enrolee.kpm_id) is None
    assert service.psk_for(IN_PSK_ID) is None


# ---------------------------------------------------------------------------------------------
# securityProfile


def test_provision_profile(service, store, enrolee):
    s = enrolee_session(service, enrolee)
    reply = service.handle(s, "CREATE", "/securityProfile", enrolee.kpm_id,
                           {"rspf:spReq": {"nodeID": enrolee.node_id, "location": "48.85,2.35"}})
    assert reply.rsc is RSC.CREATED and reply.rsc == 2001
    p = reply.content[profile.WRAPPER]
    assert set(reply.content) == {profile.WRAPPER}
    profile.validate(p)
    expected = keys.derive_usage_constrained_key(KE, 22, "id-in.sp.example.com")
    assert base64.b64decode(p["credential"]["key"]) == expected.reveal()
    assert p["credential"]["keyID"] == KE_ID
    assert p["credential"]["suid"] == 22
    assert p["registrar"] == {"cseID": "/id-in", "cseBaseURI": enrolee.registrar_uri, "fqdn": "id-in.sp.example.com"}
    assert (p["enroleeType"], p["enroleeID"], p["nodeID"]) == ("CSE", "/id-mn1", enrolee.node_id)
    assert (p["spID"], p["mefFQDN"]) == (SP_ID, MEF_FQDN)
    assert p["location"] == "48.85,2.35"
    assert p["remoteManagementURI"] == RM_URI
    issued = profile.parse_timestamp(p["issuedAt"])
    assert profile.parse_timestamp(p["expiry"]) - issued == dt.timedelta(seconds=3600)  # config default
    # Ke is now stored under its KeID with the profile's expiry
    stored = store.get_enrolment_key(KE_ID)
    assert stored is not None and stored.enrolment_key == KE and stored.kpm_id == enrolee.kpm_id
    assert profile.format_timestamp(stored.expires) == p["expiry"]
    assert s.committed


def test_profile_honours_per_enrolee_expiry_and_valid_until(service, store, make_enrolee):
    until = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(minutes=10)
    rec, kpm = make_enrolee(3, enrolment_expiry_seconds=7200, valid_until=until)
    store.add_enrolee(rec, kpm)
    p = service.provision_profile(enrolee_session(service, rec), {"rspf:spReq": {"nodeID": rec.node_id}}).content
    assert p[profile.WRAPPER]["expiry"] == profile.format_timestamp(until)
    assert "remoteManagementURI" not in p[profile.WRAPPER] and "location" not in p[profile.WRAPPER]

    rec4, kpm4 = make_enrolee(4, enrolment_expiry_seconds=7200)
    store.add_enrolee(rec4, kpm4)
    s4 = enrolee_session(service, rec4, bytes(range(1, 49)))  # another handshake, another KeID
    p = service.provision_profile(s4, {"rspf:spReq": {"nodeID": rec4.node_id}})
    body = p.content[profile.WRAPPER]
    delta = profile.parse_timestamp(body["expiry"]) - profile.parse_timestamp(body["issuedAt"])
    assert delta == dt.timedelta(seconds=7200)


def test_profile_for_an_ae_enrolee(service, store, make_enrolee):
    rec, kpm = make_enrolee(5, enrolee_id="Cmy-sensor")
    store.add_enrolee(rec, kpm)
    p = service.provision_profile(enrolee_session(service, rec), {"rspf:spReq": {"nodeID": rec.node_id}})
    assert p.content[profile.WRAPPER]["enroleeType"] == "AE"
    assert p.content[profile.WRAPPER]["enroleeID"] == "Cmy-sensor"


def test_wrong_node_id_is_access_denied_and_stores_nothing(service, store, enrolee):
    s = enrolee_session(service, enrolee)
    with pytest.raises(AccessDenied) as info:
        service.handle(s, "CREATE", "/securityProfile", enrolee.kpm_id, {"rspf:spReq": {"nodeID": "urn:dev:other"}})
    assert info.value.rsc == 4103
    assert store.get_enrolment_key(KE_ID) is None
    assert not s.committed
    assert store.get_enrolee(enrolee.kpm_id).last_enrolled is None


@pytest.mark.parametrize("content", [
    {"rspf:spReq": {"nodeID": "urn:dev:ops:001", "extra": 1}},
    {"rspf:spReq": {"nodeID": "urn:dev:ops:001"}, "other": {}},
    {"rspf:spReq": {}},
    {"rspf:spReq": {"nodeID": 5}},
    {"rspf:spReq": {"nodeID": ""}},
    {"rspf:spReq": {"nodeID": "x" * 257}},
    {"rspf:spReq": {"nodeID": "urn:dev:ops:001", "location": 5}},
    {"rspf:spReq": {"nodeID": "urn:dev:ops:001", "location": "l" * 257}},
    {"rspf:spReq": "urn:dev:ops:001"},
    {"spReq": {"nodeID": "urn:dev:ops:001"}},
    None, [], "text",
])
def test_malformed_profile_request_is_bad_request(service, store, enrolee, content):
    s = enrolee_session(service, enrolee)
    with pytest.raises(BadRequest) as info:
        service.handle(s, "CREATE", "/securityProfile", enrolee.kpm_id, content)
    assert info.value.rsc == 4000
    assert store.get_enrolment_key(KE_ID) is None


def test_unknown_elements_are_named(service, enrolee):
    s = enrolee_session(service, enrolee)
    with pytest.raises(BadRequest, match="bogus"):
        service.provision_profile(s, {"rspf:spReq": {"nodeID": enrolee.node_id, "bogus": True}})


def test_a_target_session_cannot_get_a_profile(service, enrolee):
    s = service.open_session(IN_PSK_ID, None)
    with pytest.raises(AccessDenied) as info:
        service.handle(s, "CREATE", "/securityProfile", "/id-in", {"rspf:spReq": {"nodeID": enrolee.node_id}})
    assert info.value.rsc == 4103
    with pytest.raises(AccessDenied):
        service.handle(s, "CREATE", "/enrolmentExchange", "/id-in", {"rspf:enrolReq": {}})


# ---------------------------------------------------------------------------------------------
# Enrolment Exchange


def enrol_req(rm=True, cert=False, maf=False):
    return {"rspf:enrolReq": {"certificateEnrolment": cert, "mafEnrolment": maf, "remoteManagement": rm}}


def test_exchange_with_rm_instruction_then_end(service, store, enrolee):
    s = enrolee_session(service, enrolee)
    r1 = service.handle(s, "CREATE", "/enrolmentExchange", enrolee.kpm_id, enrol_req(rm=True))
    assert r1.rsc is RSC.OK and r1.close is False
    assert r1.content == {"rspf:enrolRsp": {"instructionType": INSTRUCTION_RM, "uri": RM_URI}}
    assert s.phase is Phase.INSTRUCTED
    assert store.get_enrolment_key(KE_ID) is None  # not committed before the exchange ends
    r2 = service.handle(s, "CREATE", "/enrolmentExchange", enrolee.kpm_id,
                        {"rspf:enrolAck": {"instructionType": INSTRUCTION_RM, "success": True}})
    assert r2.rsc is RSC.OK and r2.close is True
    assert r2.content == {"rspf:enrolRsp": {"instructionType": INSTRUCTION_END, "keyID": KE_ID}}
    assert s.phase is Phase.ENDED
    assert store.get_enrolment_key(KE_ID).enrolment_key == KE


def test_failed_ack_still_ends_the_exchange(service, enrolee):
    s = enrolee_session(service, enrolee)
    service.enrolment_exchange(s, enrol_req(rm=True))
    r = service.enrolment_exchange(s, {"rspf:enrolAck": {"instructionType": INSTRUCTION_RM, "success": False}})
    assert r.content["rspf:enrolRsp"]["instructionType"] == INSTRUCTION_END and r.close


@pytest.mark.parametrize("rm_uri, remote_management", [(RM_URI, False), (None, True), (None, False)])
def test_exchange_without_instruction_ends_at_once(service, store, make_enrolee, rm_uri, remote_management):
    rec, kpm = make_enrolee(7, rm_uri=rm_uri)
    store.add_enrolee(rec, kpm)
    s = enrolee_session(service, rec)
    r = service.handle(s, "CREATE", "/enrolmentExchange", rec.kpm_id, enrol_req(rm=remote_management))
    assert r.content == {"rspf:enrolRsp": {"instructionType": INSTRUCTION_END, "keyID": KE_ID}}
    assert r.close is True
    assert store.get_enrolment_key(KE_ID) is not None


def test_cert_and_maf_requests_get_no_instruction(service, store, make_enrolee):
    rec, kpm = make_enrolee(8)
    store.add_enrolee(rec, kpm)
    s = enrolee_session(service, rec)
    r = service.enrolment_exchange(s, enrol_req(rm=True, cert=True, maf=True))
    assert r.content["rspf:enrolRsp"]["instructionType"] == INSTRUCTION_END


def test_ack_before_request_is_operation_not_allowed(service, store, enrolee):
    s = enrolee_session(service, enrolee)
    with pytest.raises(OperationNotAllowed) as info:
        service.handle(s, "CREATE", "/enrolmentExchange", enrolee.kpm_id,
                       {"rspf:enrolAck": {"instructionType": INSTRUCTION_RM, "success": True}})
    assert info.value.rsc == 4005
    assert s.phase is Phase.STARTED
    assert store.get_enrolment_key(KE_ID) is None


def test_second_enrol_req_is_operation_not_allowed(service, enrolee):
    s = enrolee_session(service, enrolee)
    service.enrolment_exchange(s, enrol_req(rm=True))
    with pytest.raises(OperationNotAllowed) as info:
        service.enrolment_exchange(s, enrol_req(rm=True))
    assert info.value.rsc == 4005
    assert s.phase is Phase.INSTRUCTED and len(s.pending) == 1  # an error never changes state


def test_wrong_ack_is_bad_request_and_keeps_state(service, enrolee):
    s = enrolee_session(service, enrolee)
    service.enrolment_exchange(s, enrol_req(rm=True))
    for ack in ({"instructionType": INSTRUCTION_END, "success": True},
                {"instructionType": INSTRUCTION_RM, "success": "yes"},
                {"instructionType": INSTRUCTION_RM}):
        with pytest.raises(BadRequest):
            service.enrolment_exchange(s, {"rspf:enrolAck": ack})
    assert s.phase is Phase.INSTRUCTED and len(s.pending) == 1
    r = service.enrolment_exchange(s, {"rspf:enrolAck": {"instructionType": INSTRUCTION_RM, "success": True}})
    assert r.close


@pytest.mark.parametrize("path, content", [
    ("/enrolmentExchange", enrol_req()),
    ("/enrolmentExchange", {"rspf:enrolAck": {"instructionType": INSTRUCTION_RM, "success": True}}),
    ("/securityProfile", {"rspf:spReq": {"nodeID": "urn:dev:ops:001"}}),
])
def test_after_end_every_request_is_operation_not_allowed(service, enrolee, path, content):
    s = enrolee_session(service, enrolee)
    service.enrolment_exchange(s, enrol_req(rm=False))
    assert s.phase is Phase.ENDED
    with pytest.raises(OperationNotAllowed) as info:
        service.handle(s, "CREATE", path, enrolee.kpm_id, content)
    assert info.value.rsc == 4005


@pytest.mark.parametrize("content", [
    {"rspf:enrolReq": {"certificateEnrolment": False, "mafEnrolment": False}},
    {"rspf:enrolReq": {"certificateEnrolment": False, "mafEnrolment": False, "remoteManagement": "true"}},
    {"rspf:enrolReq": {"certificateEnrolment": False, "mafEnrolment": False, "remoteManagement": True, "x": 1}},
    {"rspf:enrolReq": {}, "rspf:enrolAck": {}},
    {"rspf:other": {}},
    {}, None, [],
])
def test_malformed_enrol_req_is_bad_request(service, enrolee, content):
    s = enrolee_session(service, enrolee)
    with pytest.raises(BadRequest):
        service.handle(s, "CREATE", "/enrolmentExchange", enrolee.kpm_id, content)
    assert s.phase is Phase.STARTED and not s.pending


def test_profile_then_exchange_commits_once(service, store, enrolee):
    s = enrolled(service, enrolee)
    r = service.enrolment_exchange(s, enrol_req(rm=False))
    assert r.close
    assert store.get_enrolment_key(KE_ID).enrolment_key == KE


# ---------------------------------------------------------------------------------------------
# fetchCredentials


def test_fetch_credentials_registrar(service, store, enrolee):
    enrolled(service, enrolee)
    t = service.open_session(IN_PSK_ID, None)
    reply = fetch(service, t)
    assert reply.rsc is RSC.OK
    rsp = reply.content["rspf:fcRsp"]
    assert rsp["status"] is True
    assert base64.b64decode(rsp["credential"]) == \
        keys.derive_usage_constrained_key(KE, 22, "id-in.sp.example.com").reveal()
    assert rsp["enroleeID"] == "/id-mn1"
    assert rsp["lifetime"] == profile.format_timestamp(store.get_enrolment_key(KE_ID).expires)


def test_fetched_key_equals_the_profile_key(service, enrolee):
    s = enrolee_session(service, enrolee)
    p = service.provision_profile(s, {"rspf:spReq": {"nodeID": enrolee.node_id}}).content[profile.WRAPPER]
    rsp = fetch(service, service.open_session(IN_PSK_ID, None)).content["rspf:fcRsp"]
    assert rsp["credential"] == p["credential"]["key"]
    assert rsp["lifetime"] == p["expiry"]


@pytest.mark.parametrize("suid", [23, 24])
def test_fetch_credentials_extra_target(service, enrolee, suid):
    enrolled(service, enrolee)
    t = service.open_session(X_PSK_ID, None)
    for origin in ("/id-x", "//sp.example.com/id-x"):
        rsp = fetch(service, t, suid=str(suid), originator=origin).content["rspf:fcRsp"]
        assert base64.b64decode(rsp["credential"]) == \
            keys.derive_usage_constrained_key(KE, suid, "id-x.sp.example.com").reveal()


def test_fetch_accepts_upper_case_and_percent_encoded_ke_id(service, enrolee):
    enrolled(service, enrolee)
    t = service.open_session(IN_PSK_ID, None)
    rel, _ = KE_ID.split("@")
    for ke in (rel.upper() + "@" + MEF_FQDN, rel + "@MEF.Example.COM", rel + "%40" + MEF_FQDN):
        assert fetch(service, t, ke_id=ke).rsc is RSC.OK
    assert service.handle(t, "RETRIEVE", f"/fetchCredentials/{KE_ID}/22/", "/id-in", None).rsc is RSC.OK


@pytest.mark.parametrize("psk_id, suid, origin", [
    (IN_PSK_ID, "23", "/id-in"),   # the registrar only gets SUID 22
    (X_PSK_ID, "22", "/id-x"),     # /id-x is granted 23 and 24, not 22
    (X_PSK_ID, "25", "/id-x"),
])
def test_wrong_suid_is_access_denied(service, enrolee, psk_id, suid, origin):
    enrolled(service, enrolee)
    with pytest.raises(AccessDenied) as info:
        fetch(service, service.open_session(psk_id, None), suid=suid, originator=origin)
    assert info.value.rsc == 4103


def test_unlisted_target_is_access_denied(service, store, enrolee):
    store.add_target(TargetRecord("y@sp", "/id-y"), Secret(b"y" * 32))
    enrolled(service, enrolee)
    with pytest.raises(AccessDenied):
        fetch(service, service.open_session("y@sp", None), originator="/id-y")


@pytest.mark.parametrize("origin", ["/id-x", "//sp.example.com/id-x", "//other.sp/id-in", "/id-in/Cae"])
def test_originator_mismatch_is_access_denied(service, enrolee, origin):
    enrolled(service, enrolee)
    t = service.open_session(IN_PSK_ID, None)
    with pytest.raises(AccessDenied) as info:
        fetch(service, t, originator=origin)
    assert info.value.rsc == 4103


@pytest.mark.parametrize("psk_id, origin, suid", [(IN_PSK_ID, "/id-x", "23"), (X_PSK_ID, "/id-in", "22"),
                                                  (X_PSK_ID, "//sp.example.com/id-in", "22")])
def test_originator_naming_another_authorized_target_is_access_denied(service, enrolee, psk_id, origin, suid):
    """Each claimed originator IS authorized for that SUID: only the TLS identity check can refuse it."""
    enrolled(service, enrolee)
    with pytest.raises(AccessDenied) as info:
        fetch(service, service.open_session(psk_id, None), suid=suid, originator=origin)
    assert info.value.rsc == 4103


def test_unknown_ke_id_is_not_found(service, enrolee):
    enrolled(service, enrolee)
    with pytest.raises(NotFound) as info:
        fetch(service, service.open_session(IN_PSK_ID, None), ke_id="ff" * 16 + "@" + MEF_FQDN)
    assert info.value.rsc == 4004


def test_not_yet_committed_ke_id_is_not_found(service, enrolee):
    enrolee_session(service, enrolee)  # handshake only, no profile, no exchange
    with pytest.raises(NotFound):
        fetch(service, service.open_session(IN_PSK_ID, None))


def test_ke_id_of_another_mef_is_not_found_even_if_stored(service, store, enrolee):
    """A key stored under another MEF-FQDN (shared or migrated database) is not served by this MEF."""
    foreign = KE_ID.split("@")[0] + "@mef.other.example"
    now = dt.datetime.now(dt.UTC)
    store.put_enrolment_key(foreign, enrolee.kpm_id, KE, now, now + dt.timedelta(hours=1))
    with pytest.raises(NotFound) as info:
        fetch(service, service.open_session(IN_PSK_ID, None), ke_id=foreign)
    assert info.value.rsc == 4004


def test_ke_id_of_another_mef_is_not_found(service, enrolee):
    enrolled(service, enrolee)
    with pytest.raises(NotFound) as info:
        fetch(service, service.open_session(IN_PSK_ID, None), ke_id=KE_ID.split("@")[0] + "@mef.other.example")
    assert info.value.rsc == 4004


@pytest.mark.parametrize("ke_id, suid", [
    ("abc", "22"), ("zz" * 16 + "@" + MEF_FQDN, "22"), (KE_ID.split("@")[0], "22"),
    (KE_ID[:-1] + "_", "22"), ("ab" * 15 + "@" + MEF_FQDN, "22"),
    (KE_ID, "abc"), (KE_ID, "99"), (KE_ID, "-22"), (KE_ID, "0022"), (KE_ID, "2 2"), (KE_ID, "1"),
])
def test_malformed_ke_id_or_suid_is_bad_request(service, enrolee, ke_id, suid):
    enrolled(service, enrolee)
    with pytest.raises(BadRequest) as info:
        fetch(service, service.open_session(IN_PSK_ID, None), ke_id=ke_id, suid=suid)
    assert info.value.rsc == 4000


@pytest.mark.parametrize("path", ["/fetchCredentials", "/fetchCredentials/", f"/fetchCredentials/{KE_ID}",
                                  f"/fetchCredentials/{KE_ID}/22/x", "/fetchCredentials//22"])
def test_malformed_fetch_path_is_bad_request(service, enrolee, path):
    with pytest.raises(BadRequest):
        service.handle(service.open_session(IN_PSK_ID, None), "RETRIEVE", path, "/id-in", None)


@pytest.mark.parametrize("origin", ["has space", "", "Cae1", "id in"])
def test_malformed_originator_is_bad_request(service, enrolee, origin):
    enrolled(service, enrolee)
    with pytest.raises(BadRequest):
        fetch(service, service.open_session(IN_PSK_ID, None), originator=origin)


def test_revoked_enrolee_is_not_found(service, store, enrolee):
    enrolled(service, enrolee)
    t = service.open_session(IN_PSK_ID, None)
    assert fetch(service, t).rsc is RSC.OK
    store.revoke_enrolee(enrolee.kpm_id)
    with pytest.raises(NotFound) as info:
        fetch(service, t)
    assert info.value.rsc == 4004


def test_expired_ke_is_not_found(service, store, enrolee):
    s = enrolee_session(service, enrolee)
    s.created = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=2)  # 1 h lifetime
    service.provision_profile(s, {"rspf:spReq": {"nodeID": enrolee.node_id}})
    with pytest.raises(NotFound):
        fetch(service, service.open_session(IN_PSK_ID, None))


@pytest.mark.parametrize("op, path", [
    ("CREATE", f"/fetchCredentials/{KE_ID}/22"), ("DELETE", f"/fetchCredentials/{KE_ID}/22"),
    ("UPDATE", f"/fetchCredentials/{KE_ID}/22"),
    ("RETRIEVE", "/securityProfile"), ("DELETE", "/securityProfile"),
    ("RETRIEVE", "/enrolmentExchange"), ("UPDATE", "/enrolmentExchange"),
])
def test_wrong_operation_is_4005(service, enrolee, op, path):
    s = enrolee_session(service, enrolee)
    with pytest.raises(OperationNotAllowed) as info:
        service.handle(s, op, path, enrolee.kpm_id, None)
    assert info.value.rsc == 4005


@pytest.mark.parametrize("path", ["/", "", "/securityProfiles", "/fetchCredential/x/22", "/cse-in",
                                  "/securityProfile/x"])
def test_unknown_path_is_4004(service, enrolee, path):
    s = enrolee_session(service, enrolee)
    with pytest.raises(NotFound) as info:
        service.handle(s, "CREATE", path, enrolee.kpm_id, {})
    assert info.value.rsc == 4004


def test_service_is_independent_of_config_instance(tmp_path, store, enrolee):
    """The KeID uses whatever MEF-FQDN the config names (here another one)."""
    from rspf.mef.config import MefConfig

    cfg = MefConfig.from_dict({"fqdn": "MEF2.Example.ORG", "sp_id": SP_ID}, base_dir=tmp_path)
    svc = MefService(cfg, store)
    s = enrolee_session(svc, enrolee)
    assert s.ke_id == f"{EXPORTER[:16].hex()}@mef2.example.org"


# ---------------------------------------------------------------------------------------------
# key hygiene: retirement, cap, rate limit, suspended enrolees, allowed App-IDs, purge


def make_service(tmp_path, store, clock=None, **cfg):
    from rspf.mef.config import MefConfig

    config = MefConfig.from_dict({"fqdn": MEF_FQDN, "sp_id": SP_ID, "enrolment_expiry_seconds": 3600, **cfg},
                                 base_dir=tmp_path)
    return MefService(config, store, clock=clock) if clock else MefService(config, store)


def exporter(n: int) -> bytes:
    """The n-th distinct fake exporter output (its RelativeKeID is n)."""
    return n.to_bytes(16, "big") + EXPORTER[16:]


def enrol_as(service, rec, n: int):
    s = enrolee_session(service, rec, exporter(n))
    service.handle(s, "CREATE", "/securityProfile", rec.kpm_id, {"rspf:spReq": {"nodeID": rec.node_id}})
    return s.ke_id


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_re_enrolment_retires_the_previous_ke_id_after_the_grace(tmp_path, store, enrolee):
    svc = make_service(tmp_path, store, key_retirement_grace_seconds=300)
    first, second = enrol_as(svc, enrolee, 1), enrol_as(svc, enrolee, 2)
    t = svc.open_session(IN_PSK_ID, None)
    assert fetch(svc, t, ke_id=first).rsc is RSC.OK  # within the grace
    key = store.get_enrolment_key(first)
    assert key.retire_at is not None and 299 <= (key.retire_at - key.created).total_seconds() <= 301
    assert store.get_enrolment_key(second).retire_at is None
    later = key.retire_at
    assert store.get_enrolment_key(first, now=later) is None and store.get_enrolment_key(second, now=later)


def test_grace_zero_retires_at_once_and_fetch_is_refused(tmp_path, store, enrolee):
    svc = make_service(tmp_path, store, key_retirement_grace_seconds=0)
    first = enrol_as(svc, enrolee, 1)
    enrol_as(svc, enrolee, 2)
    with pytest.raises(NotFound, match="retired"):
        fetch(svc, svc.open_session(IN_PSK_ID, None), ke_id=first)


def test_live_key_cap(tmp_path, store, enrolee):
    svc = make_service(tmp_path, store, max_live_keys_per_enrolee=2)
    ke_ids = [enrol_as(svc, enrolee, n) for n in (1, 2, 3)]
    assert store.enrolment_key_ids(enrolee.kpm_id) == ke_ids[1:]
    assert [(r.ke_id, r.cause) for r in store.revocations_since(0)[0]] == [(ke_ids[0], "live-key-cap")]


def test_enrolment_rate_limit_answers_5207_with_a_retry_hint(tmp_path, store, enrolee):
    from rspf.errors import EnrolmentRateLimited

    clock = FakeClock()
    svc = make_service(tmp_path, store, clock, enrolment_rate_burst=2, enrolment_rate_interval_seconds=60)
    enrol_as(svc, enrolee, 1)
    enrol_as(svc, enrolee, 2)
    s = enrolee_session(svc, enrolee, exporter(3))
    with pytest.raises(EnrolmentRateLimited, match="try again in 60 s") as info:
        svc.handle(s, "CREATE", "/securityProfile", enrolee.kpm_id, {"rspf:spReq": {"nodeID": enrolee.node_id}})
    assert info.value.rsc == 5207 and info.value.retry_after == 60 and RSC(5207).http_status == 429
    with pytest.raises(EnrolmentRateLimited):  # the exchange is refused the same way
        svc.handle(s, "CREATE", "/enrolmentExchange", enrolee.kpm_id,
                   {"rspf:enrolReq": {"certificateEnrolment": False, "mafEnrolment": False, "remoteManagement": False}})
    assert store.get_enrolment_key(s.ke_id) is None and len(store.enrolment_key_ids(enrolee.kpm_id)) == 2
    clock.now += 45
    with pytest.raises(EnrolmentRateLimited, match="try again in 15 s"):
        svc.handle(s, "CREATE", "/securityProfile", enrolee.kpm_id, {"rspf:spReq": {"nodeID": enrolee.node_id}})
    clock.now += 15
    assert enrol_as(svc, enrolee, 4) in store.enrolment_key_ids(enrolee.kpm_id)
    # another enrolee has its own budget
    other, kpm = enrolee_record_and_kpm(2)
    store.add_enrolee(other, kpm)
    enrol_as(svc, other, 5)


def test_the_enrolment_budget_is_stored_so_a_restart_does_not_refill_it(tmp_path, store, enrolee):
    from rspf.errors import EnrolmentRateLimited

    clock = FakeClock()
    enrol_as(make_service(tmp_path, store, clock, enrolment_rate_burst=1), enrolee, 1)
    restarted = make_service(tmp_path, store, clock, enrolment_rate_burst=1)  # a new process, or another instance
    with pytest.raises(EnrolmentRateLimited, match="try again in 60 s"):
        enrol_as(restarted, enrolee, 2)
    clock.now += 60
    assert enrol_as(restarted, enrolee, 3) in store.enrolment_key_ids(enrolee.kpm_id)


def test_a_budget_spent_by_another_session_meanwhile_refuses_the_commit(tmp_path, store, enrolee):
    """Two sessions opened while one enrolment was left: the first to commit takes it, the second is refused at
    its commit (the check at the session's start read the budget before the first committed)."""
    from rspf.errors import EnrolmentRateLimited

    svc = make_service(tmp_path, store, FakeClock(), enrolment_rate_burst=1)
    first, second = enrolee_session(svc, enrolee, exporter(1)), enrolee_session(svc, enrolee, exporter(2))
    svc.handle(first, "CREATE", "/securityProfile", enrolee.kpm_id, {"rspf:spReq": {"nodeID": enrolee.node_id}})
    with pytest.raises(EnrolmentRateLimited):
        svc.handle(second, "CREATE", "/securityProfile", enrolee.kpm_id, {"rspf:spReq": {"nodeID": enrolee.node_id}})
    assert store.enrolment_key_ids(enrolee.kpm_id) == [first.ke_id]


def enrolee_record_and_kpm(n):
    from rspf.mef.store import EnroleeRecord

    return (EnroleeRecord(kpm_id=f"dev{n}@{MEF_FQDN}", enrolee_id=f"/id-mn{n}", node_id=f"urn:dev:ops:{n:03d}",
                          registrar_cse_id="/id-in", registrar_uri="https://in.example.com:8443/cse-in"),
            Secret(bytes([n]) * 32, "Kpm"))


def test_an_enrolment_that_completes_its_exchange_is_charged_once(tmp_path, store, enrolee):
    clock = FakeClock()
    svc = make_service(tmp_path, store, clock, enrolment_rate_burst=1)
    s = enrolee_session(svc, enrolee)
    svc.handle(s, "CREATE", "/securityProfile", enrolee.kpm_id, {"rspf:spReq": {"nodeID": enrolee.node_id}})
    # the same session goes on with its exchange although the budget is now spent
    reply = svc.handle(s, "CREATE", "/enrolmentExchange", enrolee.kpm_id,
                       {"rspf:enrolReq": {"certificateEnrolment": False, "mafEnrolment": False,
                                          "remoteManagement": True}})
    assert reply.rsc is RSC.OK


def test_suspended_enrolee_keys_are_not_served_and_come_back_on_resume(service, store, enrolee):
    enrolled(service, enrolee)
    t = service.open_session(IN_PSK_ID, None)
    store.suspend_enrolee(enrolee.kpm_id)
    with pytest.raises(NotFound) as info:
        fetch(service, t)
    assert info.value.rsc == 4004
    assert service.psk_for(enrolee.kpm_id) is None  # nor can it enrol
    store.resume_enrolee(enrolee.kpm_id)
    assert fetch(service, t).rsc is RSC.OK


def test_a_session_open_when_the_enrolee_is_suspended_stores_nothing(service, store, enrolee):
    s = enrolee_session(service, enrolee)
    store.suspend_enrolee(enrolee.kpm_id)
    with pytest.raises(AccessDenied, match="suspended"):
        service.handle(s, "CREATE", "/securityProfile", enrolee.kpm_id, {"rspf:spReq": {"nodeID": enrolee.node_id}})
    assert store.enrolment_key_ids(enrolee.kpm_id) == []


def test_a_session_with_the_old_kpm_stores_nothing_after_rotation(service, store, enrolee):
    s = enrolee_session(service, enrolee)
    store.rotate_kpm(enrolee.kpm_id, Secret(b"n" * 32, "Kpm"))
    with pytest.raises(AccessDenied, match="new Kpm"):
        service.handle(s, "CREATE", "/securityProfile", enrolee.kpm_id, {"rspf:spReq": {"nodeID": enrolee.node_id}})
    assert store.enrolment_key_ids(enrolee.kpm_id) == []
    assert service.psk_for(enrolee.kpm_id) == Secret(b"n" * 32)


def test_fetch_carries_the_allowed_app_ids(service, store, enrolee):
    from dataclasses import replace

    from rspf.mef.protocol import parse_fetch_response

    enrolled(service, enrolee)
    t = service.open_session(IN_PSK_ID, None)
    assert "allowedAppIDs" not in fetch(service, t).content["rspf:fcRsp"]  # not set: not sent
    store.update_enrolee(replace(store.get_enrolee(enrolee.kpm_id), allowed_app_ids=("Nmy-app", "Nx*")))
    got = parse_fetch_response(fetch(service, t).content)
    assert got.allowed_app_ids == ("Nmy-app", "Nx*")


def test_a_thousand_re_enrolments_leave_a_bounded_database(tmp_path, store, enrolee):
    """1,000 re-enrolments of one enrolee with a small grace: the keys and the log stay bounded once purged,
    and SQLite's file stops growing (freed pages are reused; PostgreSQL reclaims dead rows by autovacuum, on
    its own schedule, so there only the rows are counted)."""
    import os

    from rspf.mef.store_sqlite import SqliteStore

    svc = make_service(tmp_path, store, key_retirement_grace_seconds=0, enrolment_rate_burst=100_000)
    db = tmp_path / "mef.sqlite"

    def size() -> int:
        return sum(os.path.getsize(p) for p in tmp_path.glob("mef.sqlite*"))

    sizes = []
    for n in range(1, 1001):
        enrol_as(svc, enrolee, n)
        if n % 100 == 0:
            now = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
            svc.purge(now=now)
            store.purge(now=now + dt.timedelta(seconds=1), keep_log=dt.timedelta(0))  # the log rows, as days pass
            sizes.append(size())
    assert len(store.enrolment_key_ids(enrolee.kpm_id)) == 1
    assert store._one("SELECT count(*) FROM enrolment_keys") == (1,)
    assert store.revocations_since(0) == ([], 999)
    if isinstance(store, SqliteStore):
        assert db.exists() and max(sizes[2:]) <= sizes[1] * 1.5 + 64 * 1024, sizes


def test_key_hygiene_config_defaults_and_bounds(tmp_path):
    from rspf.errors import ConfigError
    from rspf.mef.config import EXAMPLE, MefConfig

    cfg = MefConfig.from_dict({"fqdn": MEF_FQDN, "sp_id": SP_ID}, base_dir=tmp_path)
    assert (cfg.key_retirement_grace_seconds, cfg.max_live_keys_per_enrolee, cfg.enrolment_rate_burst,
            cfg.enrolment_rate_interval_seconds, cfg.purge_interval_seconds, cfg.revocation_log_days,
            cfg.revocation_log_max_rows) == (300, 3, 5, 60.0, 10.0, 30, 1_000_000)
    for key in ("key_retirement_grace_seconds", "max_live_keys_per_enrolee", "enrolment_rate_burst",
                "enrolment_rate_interval_seconds", "purge_interval_seconds", "revocation_log_days",
                "revocation_log_max_rows"):
        assert f"\n{key} = " in EXAMPLE  # the file `mef init` writes names every key
    for key, bad in (("key_retirement_grace_seconds", -1), ("max_live_keys_per_enrolee", 0),
                     ("enrolment_rate_burst", 0), ("enrolment_rate_interval_seconds", 0),
                     ("purge_interval_seconds", 86401), ("revocation_log_days", 0), ("revocation_log_days", 1.5),
                     ("max_live_keys_per_enrolee", True), ("revocation_log_max_rows", 99)):
        with pytest.raises(ConfigError, match=f"\\[mef\\] {key}"):
            MefConfig.from_dict({"fqdn": MEF_FQDN, "sp_id": SP_ID, key: bad}, source="mef.toml")


# ---------------------------------------------------------------------------------------------
# the revocation feed (our extension)
def feed(service, session, after=None, originator="/id-in"):
    path = "/revocations" if after is None else f"/revocations/{after}"
    return service.handle(session, "RETRIEVE", path, originator, None).content["rspf:revs"]


def test_revocation_feed_gives_the_position_then_what_was_revoked_after_it(service, store, enrolee):
    t = service.open_session(IN_PSK_ID, None)
    start = feed(service, t)
    assert start == {"last": 0, "complete": True, "gap": False, "items": []}
    enrolled(service, enrolee)
    store.revoke_key(KE_ID)
    got = feed(service, t, start["last"])
    assert got["items"] == [{"seq": 1, "keID": KE_ID, "cause": "key-revoked"}] and got["last"] == 1
    assert got["complete"] and not got["gap"]
    assert feed(service, t)["last"] == 1 and feed(service, t, 1)["items"] == []


def test_revocation_feed_pages_and_reports_pruned_rows(service, store, enrolee, make_enrolee, monkeypatch):
    from rspf.mef import protocol

    monkeypatch.setattr(protocol, "MAX_REVOCATIONS_PER_ANSWER", 2)
    t = service.open_session(IN_PSK_ID, None)
    for n in range(2, 7):  # five enrolees, each enrolled once then revoked
        rec, kpm = make_enrolee(n)
        store.add_enrolee(rec, kpm)
        s = service.open_session(rec.kpm_id, Secret(bytes([n]) * 48, "exporter output"))
        service.handle(s, "CREATE", "/securityProfile", rec.kpm_id, {"rspf:spReq": {"nodeID": rec.node_id}})
        store.revoke_enrolee(rec.kpm_id)
    page = feed(service, t, 0)
    assert [i["seq"] for i in page["items"]] == [1, 2] and not page["complete"] and page["last"] == 5
    page = feed(service, t, 4)
    assert [i["seq"] for i in page["items"]] == [5] and page["complete"]
    store.purge(now=dt.datetime.now(dt.UTC) + dt.timedelta(days=400), keep_log=dt.timedelta(days=30))
    pruned = feed(service, t, 2)
    assert pruned["gap"] and pruned["items"] == [] and pruned["last"] == 5  # the numbers never go down


@pytest.mark.parametrize("psk_id, origin, rsc", [
    (IN_PSK_ID, "/id-x", 4103),       # the originator is not who the connection authenticated as
    (IN_PSK_ID, "bad origin", 4000),
])
def test_revocation_feed_refusals(service, enrolee, psk_id, origin, rsc):
    with pytest.raises(RspfError) as info:
        feed(service, service.open_session(psk_id, None), originator=origin)
    assert info.value.rsc == rsc


def test_an_enrolled_ae_cannot_read_the_revocation_feed_but_an_enrolled_cse_can(service, store, make_enrolee):
    ae, kpm = make_enrolee(7, enrolee_id="Cae7")
    store.add_enrolee(ae, kpm)
    s = service.open_session(ae.kpm_id, Secret(EXPORTER, "exporter output"))
    with pytest.raises(AccessDenied, match="only an Enrolment Target"):
        service.handle(s, "RETRIEVE", "/revocations", s.principal_id, None)
    cse, kpm = make_enrolee(8)
    store.add_enrolee(cse, kpm)
    s = service.open_session(cse.kpm_id, Secret(EXPORTER, "exporter output"))
    assert service.handle(s, "RETRIEVE", "/revocations", cse.enrolee_id, None).rsc is RSC.OK


@pytest.mark.parametrize("path", ["/revocations/x", "/revocations/-3"])
def test_malformed_feed_position_is_bad_request(service, enrolee, path):
    with pytest.raises(BadRequest):
        service.handle(service.open_session(IN_PSK_ID, None), "RETRIEVE", path, "/id-in", None)


def test_the_revocation_feed_is_read_only(service, enrolee):
    with pytest.raises(OperationNotAllowed):
        service.handle(service.open_session(IN_PSK_ID, None), "CREATE", "/revocations", "/id-in", {})


# ---------------------------------------------------------------------------------------------
# certificate sessions (issue 8): the enrolee registered by the ID its verified certificate names


def cert_enrolee(store, make_enrolee, n, **overrides):
    rec, _kpm = make_enrolee(n, kpm_id=f"/id-cmn{n}", enrolee_id=f"/id-cmn{n}", cert_id=f"/id-cmn{n}",
                             has_kpm=False, **overrides)
    store.add_enrolee(rec, None)
    return rec


def test_a_certificate_session_is_an_enrolee_session_like_a_psk_one(service, store, enrolee, make_enrolee):
    rec = cert_enrolee(store, make_enrolee, 7)
    s = service.open_certificate_session("/id-cmn7", lambda: Secret(EXPORTER, "exporter output"), "127.0.0.1:1")
    psk = enrolee_session(service, enrolee)  # the same exporter output gives the same KeID and Ke
    assert (s.kind, s.ke_id, s.enrolment_key, s.psk_identity) == (Principal.ENROLEE, psk.ke_id, psk.enrolment_key,
                                                                   rec.kpm_id)
    assert s.principal_id == "//sp.example.com/id-cmn7"
    reply = service.handle(s, "CREATE", "/securityProfile", "/id-cmn7", {"rspf:spReq": {"nodeID": rec.node_id}})
    assert reply.rsc is RSC.CREATED and reply.content["rspf:secp"]["credential"]["keyID"] == KE_ID
    assert store.get_enrolment_key(KE_ID).kpm_id == rec.kpm_id  # stored under the enrolee, like a PSK one


@pytest.mark.parametrize(("cert_id", "change", "why"), [
    (None, None, "names no oneM2M ID"),
    ("/id-nobody", None, "no Enrolee is registered with this certificate ID"),
    ("/id-cmn7", "suspend_enrolee", "the Enrolee is suspended"),
    ("/id-cmn7", "revoke_enrolee", "the Enrolee is revoked"),
    ("/id-cmn7", "expired", "past its validUntil"),
])
def test_a_certificate_session_is_refused_and_logged(service, store, make_enrolee, caplog, cert_id, change, why):
    past = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    cert_enrolee(store, make_enrolee, 7, valid_until=past if change == "expired" else None)
    if change in ("suspend_enrolee", "revoke_enrolee"):
        getattr(store, change)("/id-cmn7")
    computed = []
    with caplog.at_level(logging.WARNING, logger="rspf.mef.service"), pytest.raises(AccessDenied, match=why):
        service.open_certificate_session(cert_id, lambda: computed.append(1) or Secret(EXPORTER), "127.0.0.9:5")
    assert computed == []  # no key material derived for a refused certificate
    assert any(why in r.getMessage() and "127.0.0.9:5" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    assert store.get_enrolment_key(KE_ID) is None


def test_a_psk_handshake_naming_a_certificate_enrolee_finds_no_key(service, store, make_enrolee):
    cert_enrolee(store, make_enrolee, 7)
    assert service.psk_for("/id-cmn7", "127.0.0.1") is None
