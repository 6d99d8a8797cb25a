"""rspf.profile: the securityProfile schema, validation and redaction."""

from __future__ import annotations

import base64
import copy
import datetime as dt
import json
from pathlib import Path

import pytest

import rspf
from rspf import profile
from rspf.errors import RSC, ContentsUnacceptable, ProfileInvalid

REQUIRED = ["version", "enroleeType", "enroleeID", "nodeID", "spID", "mefFQDN", "registrar", "credential",
            "issuedAt", "expiry"]
#: a distinctive bad key: it must never show up in an error text
LEAKY_KEY = "SECRETKEYVALUE+must+not+leak+0123456789/abcdefgh=="


def test_valid_profile_passes(make_profile):
    p = make_profile()
    assert profile.validate(p) is p


def test_valid_profile_with_optional_elements(make_profile):
    p = make_profile(location="48.85,2.35", remoteManagementURI="https://dm.example.com")
    profile.validate(p)
    ae = make_profile(enroleeType="AE", enroleeID="Cmy-sensor")
    profile.validate(ae)


def test_profile_built_by_the_mef_passes(service, store, make_enrolee):
    """Not just our builder: what MefService.provision_profile really produces is schema-valid."""
    from rspf.secret import Secret

    rec, kpm = make_enrolee(1, rm_uri="https://dm.example.com")
    store.add_enrolee(rec, kpm)
    session = service.open_session(rec.kpm_id, Secret(bytes(range(48))))
    reply = service.provision_profile(session, {"rspf:spReq": {"nodeID": rec.node_id, "location": "here"}})
    profile.validate(reply.content[profile.WRAPPER])


@pytest.mark.parametrize("name", REQUIRED)
def test_each_required_element_missing_fails(make_profile, name):
    p = make_profile()
    del p[name]
    with pytest.raises(ProfileInvalid) as info:
        profile.validate(p)
    assert "required" in str(info.value)


@pytest.mark.parametrize("where, name", [("registrar", "cseID"), ("registrar", "cseBaseURI"),
                                         ("credential", "keyID"), ("credential", "suid"), ("credential", "key")])
def test_each_required_nested_element_missing_fails(make_profile, where, name):
    p = make_profile()
    del p[where][name]
    with pytest.raises(ProfileInvalid, match=where):
        profile.validate(p)


@pytest.mark.parametrize("where", [None, "registrar", "credential"])
def test_extra_element_fails(make_profile, where):
    p = make_profile()
    (p if where is None else p[where])["extraElement"] = "x"
    with pytest.raises(ProfileInvalid, match="additionalProperties"):
        profile.validate(p)


@pytest.mark.parametrize("bad_key", [
    LEAKY_KEY,                                           # not the 43+'=' base64 form
    base64.b64encode(b"k" * 31).decode(),                # 31 bytes
    base64.b64encode(b"k" * 33).decode(),                # 33 bytes
    (b"k" * 32).hex(),                                   # hex instead of base64
    base64.urlsafe_b64encode(b"\xfb" * 32).decode(),     # URL-safe alphabet
    base64.b64encode(b"k" * 32).decode().rstrip("="),    # no padding
])
def test_bad_key_encoding_fails_and_names_the_element(make_profile, bad_key):
    p = make_profile()
    p["credential"]["key"] = bad_key
    with pytest.raises(ProfileInvalid) as info:
        profile.validate(p)
    assert "credential/key" in str(info.value)
    assert bad_key not in str(info.value)
    assert bad_key not in repr(info.value)


def test_invalid_message_never_contains_the_offending_value(make_profile):
    p = make_profile()
    p["credential"]["key"] = LEAKY_KEY
    p["credential"]["keyID"] = LEAKY_KEY          # several problems at once
    p["nodeID"] = 12345678901234
    with pytest.raises(ProfileInvalid) as info:
        profile.validate(p)
    text = str(info.value) + repr(info.value) + " ".join(map(str, info.value.args))
    for leak in (LEAKY_KEY, "SECRETKEYVALUE", "12345678901234"):
        assert leak not in text
    assert "more problem" in text


def test_wrong_type_key_is_not_echoed(make_profile):
    p = make_profile()
    p["credential"]["key"] = {"nested": LEAKY_KEY}
    with pytest.raises(ProfileInvalid) as info:
        profile.validate(p)
    assert LEAKY_KEY not in str(info.value)


def test_profile_invalid_is_contents_unacceptable():
    assert issubclass(ProfileInvalid, ContentsUnacceptable)
    assert ProfileInvalid("x").rsc is RSC.CONTENTS_UNACCEPTABLE


@pytest.mark.parametrize("name, value", [
    ("version", 2), ("enroleeType", "MN"), ("enroleeID", "id-mn1"), ("enroleeID", "Xsensor"), ("nodeID", ""),
    ("spID", "sp.example.com"), ("mefFQDN", "mef example"), ("issuedAt", "2026-01-01T00:00:00"),
    ("expiry", "20260101T000000Z"),
])
def test_bad_top_level_values_fail(make_profile, name, value):
    p = make_profile()
    p[name] = value
    with pytest.raises(ProfileInvalid, match=name):
        profile.validate(p)


@pytest.mark.parametrize("where, name, value", [
    ("credential", "suid", 23), ("credential", "suid", "22"), ("credential", "keyID", "abc@mef.example.com"),
    ("credential", "keyID", "000102030405060708090A0B0C0D0E0F@mef.example.com"),
    ("registrar", "cseID", "id-in"), ("registrar", "cseBaseURI", "ftp://in.example.com"),
    ("registrar", "fqdn", "id_in.sp"),
])
def test_bad_nested_values_fail(make_profile, where, name, value):
    p = make_profile()
    p[where][name] = value
    with pytest.raises(ProfileInvalid, match=f"{where}/{name}"):
        profile.validate(p)


@pytest.mark.parametrize("value", [None, [], "profile", 1])
def test_not_an_object_fails(value):
    with pytest.raises(ProfileInvalid, match="top level"):
        profile.validate(value)


def test_expiry_before_issued_at_fails(make_profile):
    p = make_profile(lifetime=dt.timedelta(seconds=-1))
    with pytest.raises(ProfileInvalid, match="expires before"):
        profile.validate(p)


def test_expiry_equal_to_issued_at_fails(make_profile):
    p = make_profile(lifetime=dt.timedelta(0))
    with pytest.raises(ProfileInvalid):
        profile.validate(p)


def test_one_second_lifetime_passes(make_profile):
    profile.validate(make_profile(lifetime=dt.timedelta(seconds=1)))


@pytest.mark.parametrize("name, value", [("issuedAt", "20261301T000000"), ("expiry", "20260230T000000")])
def test_impossible_date_is_profile_invalid(make_profile, name, value):
    p = make_profile()
    p[name] = value
    with pytest.raises(ProfileInvalid):
        profile.validate(p)


def test_timestamps_round_trip():
    when = dt.datetime(2026, 11, 27, 4, 13, 4, tzinfo=dt.UTC)
    assert profile.format_timestamp(when) == "20261127T041304"
    assert profile.parse_timestamp("20261127T041304") == when
    # a non-UTC datetime is converted, not just relabelled
    cet = dt.timezone(dt.timedelta(hours=1))
    assert profile.format_timestamp(dt.datetime(2026, 11, 27, 5, 13, 4, tzinfo=cet)) == "20261127T041304"


def test_schema_path_is_inside_the_installed_package():
    path = profile.schema_path()
    pkg_dir = Path(rspf.__file__).resolve().parent
    source_resources = Path(__file__).resolve().parents[1] / "resources"
    assert path.is_file()
    assert path.resolve().is_relative_to(pkg_dir)
    assert "site-packages" in path.resolve().parts
    assert not path.resolve().is_relative_to(source_resources.resolve())
    assert path.name == profile.SCHEMA_NAME


def test_installed_schema_matches_the_source_tree():
    """The wheel must ship the schema the source tree defines (force-include in pyproject.toml)."""
    source = Path(__file__).resolve().parents[1] / "resources" / profile.SCHEMA_NAME
    if not source.is_file():
        pytest.skip("no source tree next to the tests")
    assert json.loads(profile.schema_path().read_text()) == json.loads(source.read_text())
    assert profile.schema()["required"] == REQUIRED


def test_redacted_hides_the_key_and_leaves_the_original(make_profile):
    p = make_profile()
    original = copy.deepcopy(p)
    key = p["credential"]["key"]
    r = profile.redacted(p)
    assert r["credential"]["key"] == "<redacted>"
    assert key not in json.dumps(r)
    assert r["credential"]["keyID"] == p["credential"]["keyID"]
    assert {k: v for k, v in r.items() if k != "credential"} == {k: v for k, v in p.items() if k != "credential"}
    assert p == original  # the input is not changed


def test_redacted_tolerates_profiles_without_credential():
    assert profile.redacted({"version": 1}) == {"version": 1}
    assert profile.redacted({"credential": "x"}) == {"credential": "x"}
