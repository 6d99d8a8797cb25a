"""End-to-end enrolment through the ``rspf`` CLI against a real ``rspf mef serve`` process.

Every negative case checks the exit code, the RSC or message, and that nothing changed (no store file,
``mef enrolee show`` lastEnrolled unchanged, no key file written).
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import re
import secrets
import stat
import time
from pathlib import Path

import pytest

from rspf import keys, profile
from rspf.enrolee import Enrolment
from rspf.secret import Secret

from .support import FQDN, REGISTRAR_FQDN, EnroleeInfo, MefHome, enrolee_client, read_hex

KEID_RE = re.compile(r"^[0-9a-f]{32}@" + re.escape(FQDN) + r"$")
TLS_REFUSED = "refused the TLS-PSK handshake"


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


_names = itertools.count(1)


@pytest.fixture
def home(module_mef: MefHome) -> MefHome:
    """The module's shared MEF: every test registers and uses its own enrolees, so they do not interfere."""
    assert module_mef.proc is not None and module_mef.proc.poll() is None, "the shared MEF died"
    return module_mef


def new_enrolee(home: MefHome, *extra, **kw) -> EnroleeInfo:
    n = next(_names)
    return home.add_enrolee(f"e{n}", *extra, **kw)


def enrol_ok(mef: MefHome, enrolee: EnroleeInfo, *extra) -> dict:
    res = mef.enrol(enrolee, *extra)
    assert res.rc == 0, str(res)
    data = res.json()
    assert KEID_RE.match(data["keID"]), data
    return data


def fetched_key(mef: MefHome, ke_id: str, suid: int = 22, target: str = "in", out_name: str | None = None) -> bytes:
    out = mef.root / (out_name or f"fetched-{secrets.token_hex(4)}.hex")
    res = mef.fetch(mef.targets[target], ke_id, suid, key_out=out)
    assert res.rc == 0, str(res)
    assert mode(out) == 0o600
    hex_key = read_hex(out)
    assert hex_key not in res.output.lower(), "fetch-credentials printed the key"
    return bytes.fromhex(hex_key)


def assert_refused(res, rsc: int, text: str | None = None) -> None:
    assert res.rc == 1, str(res)
    assert f"error: the peer answered {rsc}:" in res.stderr, str(res)
    if text:
        assert text in res.stderr, str(res)


# ----------------------------------------------------------------------------------------- happy path
def test_full_enrolment_reuse_force_and_target_fetch(home: MefHome) -> None:
    dev = new_enrolee(home)
    assert home.show(dev.kpm_id)["lastEnrolled"] is None

    first = enrol_ok(home, dev)
    assert first["enrolled"] is True
    assert first["profile"]["credential"]["key"] == "<redacted>"
    assert first["profile"]["credential"]["keyID"] == first["keID"]
    assert first["profile"]["enroleeID"] == dev.enrolee_id
    assert first["profile"]["nodeID"] == dev.node_id
    assert first["profile"]["registrar"] == {"cseID": "/id-in", "cseBaseURI": "https://127.0.0.1:8443/cse-in",
                                             "fqdn": REGISTRAR_FQDN}
    assert dev.store.is_file()
    assert mode(dev.store) == 0o600
    enrolled_at = home.show(dev.kpm_id)["lastEnrolled"]
    assert enrolled_at is not None

    # the stored enrolment, opened in-process, matches what the CLI reported
    enrolment = home.load_enrolment(dev)
    assert enrolment is not None and enrolment.ke_id == first["keID"]
    registrar_key = enrolment.registrar_key.reveal()
    assert len(registrar_key) == 32
    assert registrar_key == keys.derive_usage_constrained_key(enrolment.enrolment_key, 22, REGISTRAR_FQDN).reveal()

    # the registrar (Enrolment Target /id-in) fetches the same key from the MEF
    assert fetched_key(home, first["keID"]) == registrar_key

    # a second run reuses the stored, still valid enrolment without contacting the MEF
    again = home.enrol(dev, as_json=False)
    assert again.rc == 0, str(again)
    assert "stored enrolment still valid" in again.stdout
    assert first["keID"] in again.stdout
    assert home.load_enrolment(dev).ke_id == first["keID"]
    again_json = enrol_ok(home, dev)
    assert again_json["enrolled"] is False and again_json["keID"] == first["keID"]
    assert home.show(dev.kpm_id)["lastEnrolled"] == enrolled_at

    # --force enrols again: a new KeID, a new registrar key, served to the Target
    forced = enrol_ok(home, dev, "--force")
    assert forced["enrolled"] is True
    assert forced["keID"] != first["keID"]
    renewed = home.load_enrolment(dev)
    assert renewed.ke_id == forced["keID"]
    assert renewed.registrar_key.reveal() != registrar_key
    assert fetched_key(home, forced["keID"]) == renewed.registrar_key.reveal()
    assert mode(dev.store) == 0o600

    # show-enrolment prints the stored enrolment with the key redacted
    shown = home.cli("show-enrolment", "--mef", home.address, "--mef-fqdn", FQDN, "--kpm-id", dev.kpm_id,
                     "--kpm-file", dev.kpm_file, "--store", dev.store)
    assert shown.rc == 0, str(shown)
    assert shown.json()["keID"] == forced["keID"]
    assert shown.json()["profile"]["credential"]["key"] == "<redacted>"


def test_extra_target_gets_its_own_usage_constrained_keys(home: MefHome) -> None:
    x = home.target("x", "/id-x")
    dev = new_enrolee(home, "--target", "/id-x:22,23")
    data = enrol_ok(home, dev)
    ke = home.load_enrolment(dev).enrolment_key
    for suid in (22, 23):
        expected = keys.derive_usage_constrained_key(ke, suid, "id-x.sp.example.com").reveal()
        assert fetched_key(home, data["keID"], suid, target="x") == expected
    # /id-x has no grant for 24; the registrar /id-in only for 22
    out = home.root / f"nope-{dev.kpm_id}.hex"
    assert_refused(home.fetch(x, data["keID"], 24, key_out=out), 4103)
    assert_refused(home.fetch(home.targets["in"], data["keID"], 23, key_out=out), 4103)
    assert not out.exists()


def test_remote_management_instruction(home: MefHome) -> None:
    dev = new_enrolee(home, "--rm-uri", "https://dm.example.com")
    data = enrol_ok(home, dev)
    assert data["instructions"] == [{"instructionType": "remoteManagementServer", "uri": "https://dm.example.com",
                                     "carriedOut": True}]
    assert data["profile"]["remoteManagementURI"] == "https://dm.example.com"
    assert home.load_enrolment(dev).instructions == data["instructions"]
    # a device that cannot follow RM instructions is not instructed, but still enrolled
    plain = enrol_ok(home, dev, "--force", "--no-remote-management")
    assert plain["instructions"] == []
    assert home.load_enrolment(dev).ke_id == plain["keID"]


def test_valid_until_caps_the_profile_expiry(home: MefHome) -> None:
    until = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)).replace(microsecond=0)
    dev = new_enrolee(home, "--valid-until", until.isoformat())
    data = enrol_ok(home, dev)
    assert data["profile"]["expiry"] == profile.format_timestamp(until)


# ------------------------------------------------------------------------------------- negative cases
def test_wrong_kpm_fails_the_handshake(home: MefHome) -> None:
    dev = new_enrolee(home)
    wrong = home.keygen(f"wrong-{dev.kpm_id}.kpm")
    log_before = len(home.log_text())
    res = home.enrol(dev, kpm_file=wrong)
    assert res.rc == 1, str(res)
    assert TLS_REFUSED in res.stderr
    assert not dev.store.exists()
    assert home.show(dev.kpm_id)["lastEnrolled"] is None
    assert "TLS handshake refused from" in home.log_text()[log_before:]


def test_unknown_kpm_id_fails_the_handshake(home: MefHome) -> None:
    dev = new_enrolee(home)
    res = home.enrol(dev, kpm_id=f"nobody@{FQDN}")
    assert res.rc == 1, str(res)
    assert TLS_REFUSED in res.stderr and "nobody@" in res.stderr
    assert not dev.store.exists()
    assert home.show(dev.kpm_id)["lastEnrolled"] is None


def test_a_target_credential_cannot_enrol(home: MefHome) -> None:
    """The Target's psk_identity authenticates, but it is no enrolee: the MEF refuses the profile (4103)."""
    target = home.targets["in"]
    store = home.root / "target-as-enrolee.store"
    res = home.cli("enrol", "--mef", home.address, "--mef-fqdn", FQDN, "--kpm-id", target.psk_identity,
                   "--kpm-file", target.psk_file, "--node-id", "urn:dev:ops:001", "--store", store)
    assert_refused(res, 4103)
    assert not store.exists()


def test_revoked_enrolee_cannot_enrol_and_its_keys_are_gone(home: MefHome) -> None:
    dev = new_enrolee(home)
    data = enrol_ok(home, dev)
    before = dev.store.read_bytes()
    last = home.show(dev.kpm_id)["lastEnrolled"]
    fetched_key(home, data["keID"])  # served before the revocation

    home.revoke(dev.kpm_id)
    res = home.enrol(dev, "--force")
    assert res.rc == 1, str(res)
    assert TLS_REFUSED in res.stderr
    assert dev.store.read_bytes() == before, "a failed enrolment changed the store"
    shown = home.show(dev.kpm_id)
    assert shown["state"] == "revoked" and shown["lastEnrolled"] == last

    out = home.root / f"revoked-{dev.kpm_id}.hex"
    assert_refused(home.fetch(home.targets["in"], data["keID"], key_out=out), 4004)
    assert not out.exists()


def test_wrong_node_id_is_refused(home: MefHome) -> None:
    dev = new_enrolee(home)
    res = home.enrol(dev, node_id="urn:dev:ops:999")
    assert_refused(res, 4103, "M2M-Node-ID")
    assert not dev.store.exists()
    assert home.show(dev.kpm_id)["lastEnrolled"] is None


def test_target_not_authorized_for_suid(home: MefHome) -> None:
    dev = new_enrolee(home)
    data = enrol_ok(home, dev)
    out = home.root / f"k23-{dev.kpm_id}.hex"
    assert_refused(home.fetch(home.targets["in"], data["keID"], 23, key_out=out), 4103, "not an authorized")
    assert not out.exists()
    # a registered Target that is not among this enrolee's Targets at all
    y = home.target("y", "/id-y")
    assert_refused(home.fetch(y, data["keID"], 22, key_out=out), 4103, "not an authorized")
    assert not out.exists()


def test_originator_spoofing_is_refused(home: MefHome) -> None:
    # /id-x is a registered Target with a grant; /id-in must not obtain /id-x's key by claiming to be it
    home.target("x", "/id-x")
    dev = new_enrolee(home, "--target", "/id-x:22,23")
    data = enrol_ok(home, dev)
    out = home.root / f"spoof-{dev.kpm_id}.hex"
    for origin in ("/id-x", "//sp.example.com/id-x"):
        res = home.fetch(home.targets["in"], data["keID"], 23, origin=origin, key_out=out)
        assert_refused(res, 4103, "originator")
    assert not out.exists()
    # the genuine /id-x gets it
    fetched_key(home, data["keID"], 23, target="x")


def test_ke_id_is_matched_case_insensitively(home: MefHome) -> None:
    dev = new_enrolee(home)
    data = enrol_ok(home, dev)
    rel, fqdn = data["keID"].split("@")
    expected = home.load_enrolment(dev).registrar_key.reveal()
    for variant in (f"{rel.upper()}@{fqdn}", f"{rel}@{fqdn.upper()}"):
        out = home.root / f"case-{secrets.token_hex(4)}.hex"
        res = home.fetch(home.targets["in"], variant, key_out=out)
        assert res.rc == 0, str(res)
        assert bytes.fromhex(read_hex(out)) == expected


def test_location_is_reported_in_the_profile(home: MefHome) -> None:
    dev = new_enrolee(home)
    data = enrol_ok(home, dev, "--location", "48.85,2.35")
    assert data["profile"]["location"] == "48.85,2.35"


def test_kpm_file_readable_by_others_is_refused_locally(home: MefHome) -> None:
    dev = new_enrolee(home)
    os.chmod(dev.kpm_file, 0o644)
    res = home.enrol(dev)
    assert res.rc == 2, str(res)
    assert "readable by group or others" in res.stderr and "chmod 600" in res.stderr
    assert not dev.store.exists()
    assert home.show(dev.kpm_id)["lastEnrolled"] is None


def test_duplicate_registrations_are_refused(home: MefHome) -> None:
    dev = new_enrolee(home)
    before = home.list_enrolees()
    for kpm_id in (dev.kpm_id, home.targets["in"].psk_identity):
        res = home.cli("mef", "enrolee", "add", "-c", home.config, "--kpm-id", kpm_id, "--kpm-file", dev.kpm_file,
                       "--enrolee-id", "/id-dup", "--node-id", "urn:dup", "--registrar-cse-id", "/id-in",
                       "--registrar-uri", "https://127.0.0.1:8443/cse-in")
        assert res.rc == 2, str(res)
        assert "already registered" in res.stderr
    res = home.cli("mef", "target", "add", "-c", home.config, "--psk-identity", dev.kpm_id, "--psk-file",
                   dev.kpm_file, "--target-id", "/id-dup")
    assert res.rc == 2 and "already registered" in res.stderr, str(res)
    assert home.list_enrolees() == before
    for cmd in ("show", "revoke"):
        res = home.cli("mef", "enrolee", cmd, "-c", home.config, f"nobody@{FQDN}")
        assert res.rc == 2 and "no enrolee has the KpmID" in res.stderr, str(res)


def test_unknown_ke_id_is_not_found(home: MefHome) -> None:
    out = home.root / "unknown.hex"
    assert_refused(home.fetch(home.targets["in"], f"{secrets.token_hex(16)}@{FQDN}", key_out=out), 4004)
    assert_refused(home.fetch(home.targets["in"], f"{secrets.token_hex(16)}@other-mef.example.com", key_out=out),
                   4004)
    assert not out.exists()


def test_malformed_ke_id_or_suid_is_a_usage_error(home: MefHome) -> None:
    """The CLI refuses a malformed KeID / SUID itself (exit 2) and sends nothing; raw requests: test_raw_requests."""
    out = home.root / "malformed.hex"
    log_before = len(home.log_text())
    for ke_id in ("0123@mef.example.com", "not-a-keid", "g" * 32 + "@mef.example.com",
                  "00112233445566778899aabbccddeeff@bad_fqdn!"):
        res = home.fetch(home.targets["in"], ke_id, key_out=out)
        assert res.rc == 2, str(res)
        assert "KeID" in res.stderr or "FQDN" in res.stderr, str(res)
    res = home.fetch(home.targets["in"], f"{secrets.token_hex(16)}@{FQDN}", 99, key_out=out)
    assert res.rc == 2, str(res)
    assert "m2m:suid" in res.stderr
    assert not out.exists()
    assert "fetchCredentials" not in home.log_text()[log_before:]
    assert "refused with" not in home.log_text()[log_before:]


def test_enrolee_past_valid_until_cannot_enrol(home: MefHome) -> None:
    dev = new_enrolee(home, "--valid-until", "2020-01-01T00:00:00Z")
    res = home.enrol(dev)
    assert res.rc == 1, str(res)
    assert TLS_REFUSED in res.stderr
    assert not dev.store.exists()
    assert home.show(dev.kpm_id)["lastEnrolled"] is None


# -------------------------------------------------------------------------------------- persistence
def test_keys_survive_a_mef_restart(mef: MefHome) -> None:
    dev1 = mef.enrolees["dev1"]
    data = enrol_ok(mef, dev1)
    key_before = fetched_key(mef, data["keID"])

    rc = mef.stop()
    assert rc == 0, f"rspf mef serve exited with {rc} on SIGTERM"
    assert "MEF stopped" in mef.log_text()
    mef.start()
    assert mef.starts == 2

    assert fetched_key(mef, data["keID"]) == key_before
    assert mef.load_enrolment(dev1).registrar_key.reveal() == key_before
    reuse = enrol_ok(mef, dev1)
    assert reuse["enrolled"] is False and reuse["keID"] == data["keID"]
    forced = enrol_ok(mef, dev1, "--force")
    assert forced["keID"] != data["keID"]
    assert fetched_key(mef, forced["keID"]) == mef.load_enrolment(dev1).registrar_key.reveal()


# ------------------------------------------------------------------------------------------ renewal
def _age_stored_enrolment(mef: MefHome, info: EnroleeInfo, seconds: int) -> Enrolment:
    """Move the stored profile's issuedAt/expiry ``seconds`` into the past (as if that much time passed)."""
    client = enrolee_client(mef, info)
    current = client.load()
    assert current is not None
    prof = dict(current.profile)
    shift = dt.timedelta(seconds=seconds)
    prof["issuedAt"] = profile.format_timestamp(current.issued_at - shift)
    prof["expiry"] = profile.format_timestamp(current.expiry - shift)
    aged = Enrolment(current.ke_id, Secret(current.enrolment_key.reveal(), "Ke"), prof, current.instructions)
    client.save(aged)
    assert client.load().profile["expiry"] == prof["expiry"]
    return aged


def _lifetime(data: dict) -> float:
    p = data["profile"]
    return (profile.parse_timestamp(p["expiry"]) - profile.parse_timestamp(p["issuedAt"])).total_seconds()


def test_re_enrolment_near_expiry(home: MefHome) -> None:
    dev = new_enrolee(home, "--expiry-seconds", "120")
    first = enrol_ok(home, dev, "--renew-before", "100")
    assert first["enrolled"] is True
    assert _lifetime(first) == 120

    # immediately afterwards the profile still has ~120 s to live: outside a 100 s renewal window
    second = enrol_ok(home, dev, "--renew-before", "100")
    assert second["enrolled"] is False and second["keID"] == first["keID"]

    # 70 s later only ~50 s are left: inside the window -> a new enrolment and a new KeID
    _age_stored_enrolment(home, dev, 70)
    third = enrol_ok(home, dev, "--renew-before", "100")
    assert third["enrolled"] is True
    assert third["keID"] != first["keID"]
    assert _lifetime(third) == 120
    assert fetched_key(home, third["keID"]) == home.load_enrolment(dev).registrar_key.reveal()


def test_renewal_window_is_capped_at_half_the_lifetime(home: MefHome) -> None:
    """Documented behaviour (rspf enrol --help, docs): the window is min(--renew-before, lifetime/2), so a
    short-lived profile is not re-enrolled on every run."""
    dev = new_enrolee(home, "--expiry-seconds", "120")
    first = enrol_ok(home, dev, "--renew-before", "100")
    _age_stored_enrolment(home, dev, 30)  # ~90 s left: inside 100 s, outside the 60 s cap -> kept
    second = enrol_ok(home, dev, "--renew-before", "100")
    assert second["enrolled"] is False and second["keID"] == first["keID"]
    _age_stored_enrolment(home, dev, 35)  # ~55 s left: inside the capped window -> re-enrolled
    third = enrol_ok(home, dev, "--renew-before", "100")
    assert third["enrolled"] is True and third["keID"] != first["keID"]


# ------------------------------------------------------------------------------ operator lifecycle
def mef_request(home: MefHome, identity: str, key_file: Path, origin: str, method: str, path: str,
                content: object = None):
    """One raw oneM2M request over a fresh TLS-PSK session (the answer's HTTP headers are kept)."""
    from rspf.client import OneM2MClient
    from rspf.fileutil import read_key_file
    from rspf.tls import PskClient

    tls = PskClient().connect(home.host, home.port, identity, read_key_file(key_file), server_name=FQDN, timeout=10)
    client = OneM2MClient(tls, origin, host=FQDN, deadline=10)
    try:
        return client.request(method, path, content)
    finally:
        client.close()


def fetched(home: MefHome, ke_id: str, target: str = "in"):
    """The parsed fetchCredentials answer for the registrar (FetchedKey, with allowedAppIDs)."""
    from rspf.mef import protocol

    t = home.targets[target]
    resp = mef_request(home, t.psk_identity, t.psk_file, t.target_id, "GET", protocol.fetch_path(ke_id, 22))
    assert resp.rsc == 2000, (resp.status, resp.body)
    return protocol.parse_fetch_response(resp.json())


def mef_ok(home: MefHome, group: str, command: str, *rest) -> str:
    return home.cli.ok("mef", group, command, "-c", home.config, *rest).stdout


def test_suspended_enrolee_cannot_enrol_nor_be_fetched_until_resumed(home: MefHome) -> None:
    dev = new_enrolee(home)
    data = enrol_ok(home, dev)
    fetched_key(home, data["keID"])
    before = dev.store.read_bytes()
    assert "suspended" in mef_ok(home, "enrolee", "suspend", dev.kpm_id)
    assert home.show(dev.kpm_id)["state"] == "suspended"
    res = home.enrol(dev, "--force")
    assert res.rc == 1 and TLS_REFUSED in res.stderr, str(res)
    assert dev.store.read_bytes() == before
    out = home.root / f"suspended-{dev.kpm_id}.hex"
    assert_refused(home.fetch(home.targets["in"], data["keID"], key_out=out), 4004, "suspended")
    assert not out.exists()
    again = home.cli("mef", "enrolee", "suspend", "-c", home.config, dev.kpm_id)
    assert again.rc == 2 and "only an active enrolee can be suspended" in again.stderr, str(again)

    mef_ok(home, "enrolee", "resume", dev.kpm_id)
    assert home.show(dev.kpm_id)["state"] == "active"
    fetched_key(home, data["keID"])  # its unexpired key is served again
    enrol_ok(home, dev, "--force")


def test_rotate_kpm(home: MefHome) -> None:
    dev = new_enrolee(home)
    data = enrol_ok(home, dev)
    gen = home.show(dev.kpm_id)["kpmGeneration"]
    # refusals change nothing
    for extra in ([], ["--kpm-out", home.root / "x.kpm", "--print-kpm"], ["--kpm-out", dev.kpm_file]):
        res = home.cli("mef", "enrolee", "rotate-kpm", "-c", home.config, dev.kpm_id, *extra)
        assert res.rc == 2 and res.stderr.startswith("error: "), str(res)
    assert not (home.root / "x.kpm").exists()
    assert home.show(dev.kpm_id)["kpmGeneration"] == gen
    missing = home.cli("mef", "enrolee", "rotate-kpm", "-c", home.config, f"nobody@{FQDN}", "--kpm-out",
                       home.root / "nobody.kpm")
    assert missing.rc == 2 and not (home.root / "nobody.kpm").exists(), str(missing)

    new_kpm = home.root / f"{dev.kpm_id}.new.kpm"
    res = home.cli.ok("mef", "enrolee", "rotate-kpm", "-c", home.config, dev.kpm_id, "--kpm-out", new_kpm)
    assert mode(new_kpm) == 0o600 and read_hex(new_kpm) not in res.output
    assert home.show(dev.kpm_id)["kpmGeneration"] == gen + 1
    assert home.show(dev.kpm_id)["keyIDs"] == []
    old = home.enrol(dev, "--force")
    assert old.rc == 1 and TLS_REFUSED in old.stderr, str(old)  # the old Kpm at once
    assert_refused(home.fetch(home.targets["in"], data["keID"], key_out=home.root / "old.hex"), 4004)
    res = home.enrol(dev, "--force", kpm_file=new_kpm)
    assert res.rc == 0, str(res)

    printed = home.cli.ok("mef", "enrolee", "rotate-kpm", "-c", home.config, dev.kpm_id, "--print-kpm")
    assert re.fullmatch(r"[0-9a-f]{64}\n", printed.stdout), printed.stdout
    assert "rotated" in printed.stderr

    # a revoked enrolee gets no new Kpm, and no key file is left behind
    mef_ok(home, "enrolee", "revoke", dev.kpm_id)
    refused = home.cli("mef", "enrolee", "rotate-kpm", "-c", home.config, dev.kpm_id, "--kpm-out",
                       home.root / "after-revoke.kpm")
    assert refused.rc == 2 and "revoked" in refused.stderr, str(refused)
    assert not (home.root / "after-revoke.kpm").exists()


def test_revoke_one_key(home: MefHome) -> None:
    dev = new_enrolee(home)
    data = enrol_ok(home, dev)
    res = home.cli("mef", "enrolee", "revoke-key", "-c", home.config, f"{secrets.token_hex(16)}@{FQDN}")
    assert res.rc == 2 and "no stored Enrolment Key" in res.stderr, str(res)
    fetched_key(home, data["keID"])
    home.cli.ok("mef", "enrolee", "revoke-key", "-c", home.config, data["keID"].upper())
    assert_refused(home.fetch(home.targets["in"], data["keID"], key_out=home.root / "rk.hex"), 4004)
    assert home.show(dev.kpm_id)["state"] == "active"
    enrol_ok(home, dev, "--force")  # the enrolee itself may enrol again


def test_delete_enrolee(home: MefHome) -> None:
    dev = new_enrolee(home)
    enrol_ok(home, dev)
    res = home.cli("mef", "enrolee", "delete", "-c", home.config, dev.kpm_id)
    assert res.rc == 2 and "--yes" in res.stderr, str(res)
    assert home.show(dev.kpm_id)["state"] == "active"
    home.cli.ok("mef", "enrolee", "delete", "-c", home.config, dev.kpm_id, "--yes")
    gone = home.cli("mef", "enrolee", "show", "-c", home.config, dev.kpm_id)
    assert gone.rc == 2 and "no enrolee has the KpmID" in gone.stderr
    res = home.enrol(dev, "--force")
    assert res.rc == 1 and TLS_REFUSED in res.stderr, str(res)
    # both identifiers are free again
    home.cli.ok("mef", "enrolee", "add", "-c", home.config, "--kpm-id", dev.kpm_id, "--kpm-file", dev.kpm_file,
                "--enrolee-id", dev.enrolee_id, "--node-id", dev.node_id, "--registrar-cse-id", "/id-in",
                "--registrar-uri", "https://127.0.0.1:8443/cse-in")


def test_allowed_app_ids_reach_the_target_and_update(home: MefHome) -> None:
    dev = new_enrolee(home, "--app-id", "Nmy-app", "--app-id", "Nother*")
    assert home.show(dev.kpm_id)["allowedAppIDs"] == ["Nmy-app", "Nother*"]
    data = enrol_ok(home, dev)
    assert fetched(home, data["keID"]).allowed_app_ids == ("Nmy-app", "Nother*")
    home.cli.ok("mef", "enrolee", "update", "-c", home.config, dev.kpm_id, "--app-id", "Nnew")
    assert fetched(home, data["keID"]).allowed_app_ids == ("Nnew",)
    home.cli.ok("mef", "enrolee", "update", "-c", home.config, dev.kpm_id, "--clear-app-ids")
    assert fetched(home, data["keID"]).allowed_app_ids is None
    bad = home.cli("mef", "enrolee", "update", "-c", home.config, dev.kpm_id, "--app-id", "x" * 257)
    assert bad.rc == 2 and "longer than 256" in bad.stderr, str(bad)
    assert home.show(dev.kpm_id)["allowedAppIDs"] is None


def test_update_changes_the_named_fields_and_refuses_bad_values(home: MefHome) -> None:
    dev = new_enrolee(home, "--rm-uri", "https://dm.example.com")
    before = home.show(dev.kpm_id)
    home.cli.ok("mef", "enrolee", "update", "-c", home.config, dev.kpm_id, "--valid-until", "2031-01-01T00:00:00Z",
                "--clear-rm-uri", "--target", "/id-x:22")
    after = home.show(dev.kpm_id)
    assert after["validUntil"] == "2031-01-01T00:00:00+00:00" and after["remoteManagementURI"] is None
    assert after["targets"] == [{"id": "/id-x", "suids": [22]}]
    assert {k: v for k, v in after.items() if k not in ("validUntil", "remoteManagementURI", "targets")} == \
        {k: v for k, v in before.items() if k not in ("validUntil", "remoteManagementURI", "targets")}
    for extra, text in ((["--registrar-uri", "http://in.example.com/cse-in"], "https://"),
                        (["--valid-until", "soon"], "ISO 8601"), ([], "nothing to change"),
                        (["--rm-uri", "https://x.example.com", "--clear-rm-uri"], "not both")):
        res = home.cli("mef", "enrolee", "update", "-c", home.config, dev.kpm_id, *extra)
        assert res.rc == 2 and text in res.stderr, str(res)
    assert home.show(dev.kpm_id) == after
    res = home.cli("mef", "enrolee", "update", "-c", home.config, f"nobody@{FQDN}", "--node-id", "x")
    assert res.rc == 2 and "no enrolee has the KpmID" in res.stderr, str(res)


def test_add_checks_https_registrar_and_warns(home: MefHome) -> None:
    before = home.list_enrolees()
    refused = home.cli("mef", "enrolee", "add", "-c", home.config, "--kpm-id", f"h@{FQDN}", "--kpm-file",
                       home.keygen(f"h{next(_names)}.kpm"), "--enrolee-id", "/id-h", "--node-id", "urn:h",
                       "--registrar-cse-id", "/id-in", "--registrar-uri", "http://127.0.0.1:8080/cse-in")
    assert refused.rc == 2 and "registrar_uri must be the https://" in refused.stderr, str(refused)
    assert home.list_enrolees() == before
    # a registrar with no Target credential: registered, with a warning
    n = next(_names)
    kpm = home.keygen(f"w{n}.kpm")
    added = home.cli.ok("mef", "enrolee", "add", "-c", home.config, "--kpm-id", f"w{n}@{FQDN}", "--kpm-file", kpm,
                        "--enrolee-id", f"/id-w{n}", "--node-id", "urn:dev:ops:001", "--registrar-cse-id", "/id-nope",
                        "--registrar-uri", "https://127.0.0.1:8443/cse-nope")
    assert "warning: the registrar /id-nope has no Enrolment Target credential" in added.stderr
    assert "warning: its Node-ID urn:dev:ops:001 is also registered for dev1@" in added.stderr
    # the same Kpm again: a warning naming the other enrolee (never the key)
    m = next(_names)
    again = home.cli.ok("mef", "enrolee", "add", "-c", home.config, "--kpm-id", f"w{m}@{FQDN}", "--kpm-file", kpm,
                        "--enrolee-id", f"/id-w{m}", "--node-id", f"urn:dev:ops:w{m}", "--registrar-cse-id", "/id-in",
                        "--registrar-uri", "https://127.0.0.1:8443/cse-in")
    assert f"warning: its Kpm is also the Kpm of w{n}@{FQDN}" in again.stderr
    assert "registrar /id-in" not in again.stderr  # /id-in has a Target credential
    assert read_hex(kpm) not in again.output


def test_list_filters_paging_and_json(mef_home: MefHome) -> None:
    home = mef_home
    infos = home.import_batch("ls", 5)
    mef_ok(home, "enrolee", "suspend", infos[1].kpm_id)
    mef_ok(home, "enrolee", "revoke", infos[2].kpm_id)
    home.cli.ok("mef", "enrolee", "update", "-c", home.config, infos[3].kpm_id, "--valid-until", "2030-01-01T00:00:00Z",
                "--registrar-cse-id", "/id-in2")

    def listed(*args) -> list[str]:
        return [e["kpmID"] for e in home.cli.ok("mef", "enrolee", "list", "-c", home.config, "--json", *args).json()]

    assert listed("--state", "suspended") == [infos[1].kpm_id]
    assert listed("--state", "revoked") == [infos[2].kpm_id]
    assert listed("--registrar", "/id-in2") == [infos[3].kpm_id]
    assert listed("--expiring-before", "2030-06-01T00:00:00Z") == [infos[3].kpm_id]
    assert listed("--expiring-before", "2029-06-01") == []
    everything = listed()
    assert len(everything) == 6 and everything == sorted(everything)
    assert listed("--limit", "2") + listed("--limit", "2", "--offset", "2") + listed("--offset", "4") == everything
    table = home.cli.ok("mef", "enrolee", "list", "-c", home.config, "--state", "active", "--limit", "2").stdout
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["KpmID", "Enrolee-ID", "Node-ID"] and "state" in lines[0]
    assert lines[-1] == "1-2 of 4 enrolee(s)" and len(lines) == 4
    bad = home.cli("mef", "enrolee", "list", "-c", home.config, "--expiring-before", "tomorrow")
    assert bad.rc == 2 and "ISO 8601" in bad.stderr, str(bad)
    bad = home.cli("mef", "enrolee", "list", "-c", home.config, "--state", "sleeping")
    assert bad.rc == 2, str(bad)
    shown = home.cli.ok("mef", "enrolee", "show", "-c", home.config, infos[0].kpm_id).stdout
    assert shown.splitlines()[0].split() == ["kpmID", infos[0].kpm_id] and "state" in shown


def test_target_commands(mef_home: MefHome) -> None:
    home = mef_home
    for cmd in ("add", "list", "show", "revoke"):
        helped = home.cli.ok("mef", "target", cmd, "--help").stdout
        assert len(helped.split("\n\n")[1].strip()) > 20, helped  # a sentence, not just the usage line
    table = home.cli.ok("mef", "target", "list", "-c", home.config).stdout.splitlines()
    assert table[0].split()[:4] == ["PSK", "identity", "Target-ID", "state"]
    assert table[1].split()[:3] == ["id-in@sp.example.com", "/id-in", "active"]
    assert table[-1] == "1 Target credential(s)"
    listed = home.cli.ok("mef", "target", "list", "-c", home.config, "--json").json()
    assert [(t["pskIdentity"], t["targetID"], t["state"]) for t in listed] == [("id-in@sp.example.com", "/id-in",
                                                                                "active")]
    assert home.targets["in"].psk_hex not in json.dumps(listed)
    shown = home.cli.ok("mef", "target", "show", "-c", home.config, "id-in@sp.example.com", "--json").json()
    assert shown == listed[0]
    missing = home.cli("mef", "target", "show", "-c", home.config, "nobody")
    assert missing.rc == 2 and "no Enrolment Target" in missing.stderr


# ------------------------------------------------------------------- key hygiene on a running MEF
def test_retired_ke_id_is_refused_after_the_grace_and_purged(mef_home: MefHome) -> None:
    home = mef_home
    home.set_config("key_retirement_grace_seconds", "2")
    home.set_config("purge_interval_seconds", "0.5")
    home.start()
    dev = home.enrolees["dev1"]
    first = enrol_ok(home, dev)["keID"]
    second = enrol_ok(home, dev, "--force")["keID"]
    fetched_key(home, first)  # within the grace the previous KeID still works
    deadline = time.monotonic() + 20
    while first in home.show(dev.kpm_id)["keyIDs"]:  # retired after 2 s, then purged by the running MEF
        assert time.monotonic() < deadline, "the retired KeID was never purged"
        time.sleep(0.2)
    assert_refused(home.fetch(home.targets["in"], first, key_out=home.root / "first.hex"), 4004)
    fetched_key(home, second)
    assert "purged 0 expired and 1 retired Enrolment Keys" in home.log_text()


def test_enrolment_rate_limit_is_answered_with_5207_and_retry_after(mef_home: MefHome) -> None:
    home = mef_home
    home.set_config("enrolment_rate_burst", "2")
    home.set_config("enrolment_rate_interval_seconds", "3600")
    home.start()
    dev = home.enrolees["dev1"]
    enrol_ok(home, dev)
    enrol_ok(home, dev, "--force")
    before = dev.store.read_bytes()
    res = home.enrol(dev, "--force")
    assert_refused(res, 5207, "enrolled too often")
    assert re.search(r"try again in (\d+) s", res.stderr), str(res)
    assert dev.store.read_bytes() == before
    resp = mef_request(home, dev.kpm_id, dev.kpm_file, dev.enrolee_id, "POST", "/securityProfile",
                       {"rspf:spReq": {"nodeID": dev.node_id}})
    assert (resp.status, resp.rsc) == (429, 5207)
    assert 3500 <= int(resp.header("retry-after") or 0) <= 3600, resp.headers
    assert len(home.show(dev.kpm_id)["keyIDs"]) == 2


def test_live_key_cap_on_a_running_mef(mef_home: MefHome) -> None:
    home = mef_home
    home.set_config("max_live_keys_per_enrolee", "2")
    home.start()
    dev = home.enrolees["dev1"]
    ke_ids = [enrol_ok(home, dev, *(["--force"] if n else []))["keID"] for n in range(3)]
    assert home.show(dev.kpm_id)["keyIDs"] == ke_ids[1:]
    assert_refused(home.fetch(home.targets["in"], ke_ids[0], key_out=home.root / "capped.hex"), 4004)
