"""rspf.mef.protocol: the MEF wire format, built and checked in one place (both directions)."""

from __future__ import annotations

import base64

import pytest

from rspf.errors import BadRequest
from rspf.mef import protocol as p

KE_ID = "0123456789abcdef0123456789abcdef@mef.example.com"


def test_profile_request_round_trip() -> None:
    body = p.ProfileRequest("urn:dev:1", "room 1").to_body()
    assert body == {"rspf:spReq": {"nodeID": "urn:dev:1", "location": "room 1"}}
    assert p.ProfileRequest.from_body(body) == p.ProfileRequest("urn:dev:1", "room 1")
    assert p.ProfileRequest("urn:dev:1").to_body() == {"rspf:spReq": {"nodeID": "urn:dev:1"}}


@pytest.mark.parametrize("body,words", [
    ({"rspf:spReq": {}}, "nodeID"),
    ({"rspf:spReq": {"nodeID": 5}}, "nodeID"),
    ({"rspf:spReq": {"nodeID": "x" * 257}}, "nodeID"),
    ({"rspf:spReq": {"nodeID": "n", "location": 1}}, "location"),
    ({"rspf:spReq": {"nodeID": "n", "evil": 1}}, "unknown element"),
    ({"rspf:spReq": {"nodeID": "n"}, "extra": {}}, "single element"),
    ([], "single element"),
])
def test_profile_request_refusals(body: object, words: str) -> None:
    with pytest.raises(BadRequest, match=words):
        p.ProfileRequest.from_body(body)


def test_enrol_request_and_ack() -> None:
    body = p.enrol_request({"remoteManagement": True})
    assert body == {"rspf:enrolReq": {"certificateEnrolment": False, "mafEnrolment": False, "remoteManagement": True}}
    name, value = p.exchange_message(body)
    assert name == p.ENROL_REQ and p.parse_enrol_request(value)["remoteManagement"] is True
    name, value = p.exchange_message(p.enrol_ack(p.INSTRUCTION_RM, False))
    assert name == p.ENROL_ACK and p.parse_enrol_ack(value, p.INSTRUCTION_RM) is False
    with pytest.raises(BadRequest, match="instructionType"):
        p.parse_enrol_ack(value, p.INSTRUCTION_CERT)


@pytest.mark.parametrize("body", [{}, {"rspf:other": {}}, {"rspf:enrolReq": {}, "rspf:enrolAck": {}}, "x"])
def test_exchange_message_refusals(body: object) -> None:
    with pytest.raises(BadRequest, match="one element"):
        p.exchange_message(body)


def test_enrol_request_flags_checked() -> None:
    with pytest.raises(BadRequest, match="true or false"):
        p.parse_enrol_request({"certificateEnrolment": "yes", "mafEnrolment": False, "remoteManagement": False})
    with pytest.raises(BadRequest, match="unknown"):
        p.parse_enrol_request({"certificateEnrolment": False, "mafEnrolment": False, "remoteManagement": False,
                               "x": True})


def test_enrol_response() -> None:
    assert p.parse_enrol_response(p.end_of_exchange(KE_ID)) == {"instructionType": "endOfExchange", "keyID": KE_ID}
    for bad in (None, {}, {"rspf:enrolRsp": {"instructionType": 3}}):
        with pytest.raises(BadRequest, match="malformed"):
            p.parse_enrol_response(bad)


def test_fetch_path_round_trip() -> None:
    path = p.fetch_path(KE_ID, 22)
    assert path == f"/fetchCredentials/{KE_ID}/22"
    assert p.is_fetch_path(path) and p.is_fetch_path("/fetchCredentials") and not p.is_fetch_path("/fetchCredentialsX")
    upper = KE_ID.replace("abcdef", "ABCDEF").replace("mef.example.com", "MEF.example.com")
    assert p.parse_fetch_path(f"/fetchCredentials/{upper}/22") == (KE_ID, 22)


@pytest.mark.parametrize("path,words", [
    ("/fetchCredentials", "the target must be"),
    (f"/fetchCredentials/{KE_ID}", "the target must be"),
    (f"/fetchCredentials/{KE_ID}/22/x", "the target must be"),
    (f"/fetchCredentials/{KE_ID}/abc", "SUID must be"),
    (f"/fetchCredentials/{KE_ID}/99", "m2m:suid"),
    ("/fetchCredentials/nothex@mef.example.com/22", "KeID"),
    (f"/other/{KE_ID}/22", "the target must be"),
])
def test_fetch_path_refusals(path: str, words: str) -> None:
    with pytest.raises(BadRequest, match=words):
        p.parse_fetch_path(path)


def test_fetch_response_round_trip_and_redacted_repr() -> None:
    key = bytes(range(32))
    got = p.parse_fetch_response(p.fetch_response(key, "Cae1", "20991231T000000"))
    assert (got.key, got.enrolee_id, got.lifetime) == (key, "Cae1", "20991231T000000")
    assert key.hex() not in repr(got) and "redacted" in repr(got)
    assert got.allowed_app_ids is None


def test_fetch_response_carries_allowed_app_ids() -> None:
    got = p.parse_fetch_response(p.fetch_response(bytes(32), "Cae1", "20991231T000000", ("Nmeter", "Nfleet*")))
    assert got.allowed_app_ids == ("Nmeter", "Nfleet*")


@pytest.mark.parametrize("data", [
    None,
    p.fetch_error("no"),
    {"rspf:fcRsp": {"status": True}},
    {"rspf:fcRsp": {"status": True, "credential": "!!", "enroleeID": "C", "lifetime": "t"}},
    {"rspf:fcRsp": {"status": True, "credential": base64.b64encode(b"short").decode(), "enroleeID": "C",
                    "lifetime": "t"}},
    {"rspf:fcRsp": {"status": True, "credential": base64.b64encode(bytes(32)).decode(), "enroleeID": "C",
                    "lifetime": "t", "allowedAppIDs": "Nmeter"}},
    {"rspf:fcRsp": {"status": True, "credential": base64.b64encode(bytes(32)).decode(), "enroleeID": "C",
                    "lifetime": "t", "allowedAppIDs": [""]}},
    {"rspf:fcRsp": {"status": True, "credential": base64.b64encode(bytes(32)).decode(), "enroleeID": "C",
                    "lifetime": "t", "allowedAppIDs": ["N"] * 65}},
])
def test_fetch_response_refusals(data: object) -> None:
    with pytest.raises(BadRequest):
        p.parse_fetch_response(data)


def test_error_text() -> None:
    assert p.error_text({"m2m:dbg": "why"}) == "why"
    assert p.error_text(p.fetch_error("unknown KeID")) == "unknown KeID"
    assert p.error_text({"x": 1}) is None and p.error_text("x") is None
