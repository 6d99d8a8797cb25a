"""rspf.enrolee.client: the Enrolee's encrypted enrolment file and renewal logic (no network)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import stat

import pytest

from rspf.enrolee.client import Enrolee, EnroleeConfig, Enrolment
from rspf.errors import ConfigError, StoreError
from rspf.secret import Secret

UTC = dt.UTC
MEF_FQDN = "mef.example.com"
EXPORTER = bytes(range(48))
KE = Secret(EXPORTER[16:], "Ke")
KE_ID = f"{EXPORTER[:16].hex()}@{MEF_FQDN}"
KPM = Secret(b"\x5a" * 32, "Kpm")
ISSUED = dt.datetime(2026, 1, 1, tzinfo=UTC)


def config(tmp_path, kpm: Secret = KPM, kpm_id: str = "dev1@mef.example.com", **kw) -> EnroleeConfig:
    return EnroleeConfig(mef_host="127.0.0.1", mef_port=9, mef_fqdn=MEF_FQDN, kpm_id=kpm_id, kpm=kpm,
                         node_id="urn:dev:ops:001", store_path=tmp_path / "state" / "enrolment.json", **kw)


@pytest.fixture
def enrolment(make_profile) -> Enrolment:
    prof = make_profile(KE, KE_ID, issued=ISSUED, remoteManagementURI="https://dm.example.com")
    return Enrolment(KE_ID, KE, prof, [{"instructionType": "remoteManagementServer", "uri": "https://dm.example.com"}])


def test_save_load_round_trip(tmp_path, enrolment):
    e = Enrolee(config(tmp_path))
    assert e.load() is None  # nothing stored yet
    e.save(enrolment)
    back = Enrolee(config(tmp_path)).load()  # a fresh instance, same Kpm
    assert back.ke_id == KE_ID
    assert back.enrolment_key == KE
    assert back.profile == enrolment.profile
    assert back.instructions == enrolment.instructions
    assert back.registrar_key == enrolment.registrar_key
    assert back.enrolee_id == "/id-mn1"
    assert back.issued_at == ISSUED
    assert back.expiry == ISSUED + dt.timedelta(days=30)


def test_file_is_private(tmp_path, enrolment):
    old = os.umask(0)
    try:
        Enrolee(config(tmp_path)).save(enrolment)
    finally:
        os.umask(old)
    path = tmp_path / "state" / "enrolment.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["enrolment.json"]  # no temporary file left


def test_save_replaces_an_existing_file(tmp_path, enrolment, make_profile):
    e = Enrolee(config(tmp_path))
    e.save(enrolment)
    other_ke = Secret(b"\x33" * 32)
    newer = Enrolment("ff" * 16 + "@" + MEF_FQDN, other_ke, make_profile(other_ke, "ff" * 16 + "@" + MEF_FQDN))
    e.save(newer)
    assert e.load().ke_id == newer.ke_id and e.load().enrolment_key == other_ke


def test_file_never_holds_keys_in_clear(tmp_path, enrolment):
    Enrolee(config(tmp_path)).save(enrolment)
    raw = (tmp_path / "state" / "enrolment.json").read_bytes()
    registrar_b64 = enrolment.profile["credential"]["key"].encode()
    for needle in (KE.reveal(), KE.reveal().hex().encode(), base64.b64encode(KE.reveal()),
                   registrar_b64, registrar_b64[:20], enrolment.registrar_key.reveal().hex().encode(),
                   KPM.reveal(), KPM.reveal().hex().encode(), b"urn:dev:ops:001", b"/id-mn1"):
        assert needle not in raw
    doc = json.loads(raw)
    assert set(doc) == {"format", "kpmID", "salt", "sealed"}


def test_summary_and_repr_hide_keys(enrolment):
    text = json.dumps(enrolment.summary()) + repr(enrolment)
    assert enrolment.profile["credential"]["key"] not in text
    assert KE.reveal().hex() not in text
    assert KE_ID in text


def test_wrong_kpm_is_store_error(tmp_path, enrolment):
    Enrolee(config(tmp_path)).save(enrolment)
    with pytest.raises(StoreError):
        Enrolee(config(tmp_path, kpm=Secret(b"\x5b" * 32))).load()


def test_other_kpm_id_is_store_error(tmp_path, enrolment):
    Enrolee(config(tmp_path)).save(enrolment)
    with pytest.raises(StoreError, match="dev2"):
        Enrolee(config(tmp_path, kpm_id="dev2@mef.example.com")).load()


def _tamper_sealed(doc):
    blob = bytearray(base64.b64decode(doc["sealed"]))
    blob[-1] ^= 1
    doc["sealed"] = base64.b64encode(bytes(blob)).decode()


def _tamper_salt(doc):
    doc["salt"] = base64.b64encode(b"\0" * 16).decode()


def _tamper_kpm_id(doc):
    doc["kpmID"] = "dev9@mef.example.com"


@pytest.mark.parametrize("tamper", [
    _tamper_sealed, _tamper_salt, _tamper_kpm_id,
    lambda d: d.update(format=2),
    lambda d: d.pop("salt"),
    lambda d: d.update(sealed="!!not base64!!"),
    lambda d: d.update(sealed=base64.b64encode(b"\x01short").decode()),
    lambda d: d.update(salt=17),
])
def test_tampered_document_is_store_error(tmp_path, enrolment, tamper):
    e = Enrolee(config(tmp_path))
    e.save(enrolment)
    path = tmp_path / "state" / "enrolment.json"
    doc = json.loads(path.read_text())
    tamper(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(StoreError):
        e.load()


@pytest.mark.parametrize("mutate", [
    lambda b: b[:-5],                       # truncated
    lambda b: b"",                          # emptied
    lambda b: b"\xff\xfe" + b,              # not UTF-8 / not JSON
    lambda b: b.replace(b'"sealed": "', b'"sealed": "A'),
])
def test_tampered_bytes_are_store_error(tmp_path, enrolment, mutate):
    e = Enrolee(config(tmp_path))
    e.save(enrolment)
    path = tmp_path / "state" / "enrolment.json"
    path.write_bytes(mutate(path.read_bytes()))
    with pytest.raises(StoreError):
        e.load()


@pytest.mark.parametrize("content", ["[]", '"text"', "17", "null"])
def test_non_object_json_file_is_store_error(tmp_path, content):
    e = Enrolee(config(tmp_path))
    path = tmp_path / "state" / "enrolment.json"
    path.parent.mkdir()
    path.write_text(content)
    with pytest.raises(StoreError):
        e.load()


def test_ensure_returns_the_stored_enrolment_while_it_is_fresh(tmp_path, enrolment):
    """No network: mef_port 9 would refuse, so ensure() must not try to enrol."""
    e = Enrolee(config(tmp_path, renew_before_seconds=24 * 3600))
    e.save(enrolment)
    current, renewed = e.ensure(now=ISSUED + dt.timedelta(days=1))
    assert renewed is False and current.ke_id == KE_ID


# ---------------------------------------------------------------------------------------------
# needs_renewal


@pytest.mark.parametrize("offset, renew_before, expected", [
    # 30-day lifetime, renew a day before the end
    (dt.timedelta(days=0), 86400, False),
    (dt.timedelta(days=29) - dt.timedelta(seconds=1), 86400, False),
    (dt.timedelta(days=29), 86400, True),
    (dt.timedelta(days=30), 86400, True),
    (dt.timedelta(days=31), 86400, True),
    # renewal margin 0: only at expiry
    (dt.timedelta(days=30) - dt.timedelta(seconds=1), 0, False),
    (dt.timedelta(days=30), 0, True),
    # a margin longer than the lifetime is capped at half of it
    (dt.timedelta(days=15) - dt.timedelta(seconds=1), 90 * 86400, False),
    (dt.timedelta(days=15), 90 * 86400, True),
    # before issue (clock skew) with a small margin
    (-dt.timedelta(hours=1), 3600, False),
])
def test_needs_renewal(enrolment, offset, renew_before, expected):
    assert enrolment.needs_renewal(renew_before, now=ISSUED + offset) is expected


def test_needs_renewal_short_lifetime(make_profile):
    prof = make_profile(KE, KE_ID, issued=ISSUED, lifetime=dt.timedelta(hours=2))
    e = Enrolment(KE_ID, KE, prof)
    assert e.needs_renewal(86400, now=ISSUED + dt.timedelta(minutes=59, seconds=59)) is False
    assert e.needs_renewal(86400, now=ISSUED + dt.timedelta(hours=1)) is True


def test_needs_renewal_default_now_uses_the_clock(make_profile):
    now = dt.datetime.now(UTC).replace(microsecond=0)
    fresh = Enrolment(KE_ID, KE, make_profile(KE, KE_ID, issued=now, lifetime=dt.timedelta(days=30)))
    stale = Enrolment(KE_ID, KE, make_profile(KE, KE_ID, issued=now - dt.timedelta(days=60)))
    assert fresh.needs_renewal(3600) is False
    assert stale.needs_renewal(3600) is True


def test_config_repr_hides_the_kpm(tmp_path):
    text = repr(config(tmp_path))
    assert KPM.reveal().hex() not in text and "redacted" in text


# ------------------------------------------------------------------ an Enrolee with a certificate (issue 8)
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from integration.pki import make_pki
    return make_pki(tmp_path_factory.mktemp("pki"), {"dev": "//sp.example.com/id-cmn1",
                                                     "other": "//sp.example.com/id-cmn2"})


def cert_config(tmp_path, pki, name="dev", **kw) -> EnroleeConfig:
    return EnroleeConfig(mef_host="127.0.0.1", mef_port=9, mef_fqdn=MEF_FQDN, cert_file=pki / f"{name}.pem",
                         key_file=pki / f"{name}.key", trust_anchor_file=pki / "ca.pem", node_id="urn:dev:ops:001",
                         store_path=tmp_path / "state" / "enrolment.json", **kw)


def test_kpm_and_certificate_are_mutually_exclusive(tmp_path, pki):
    with pytest.raises(ConfigError, match="not both"):
        cert_config(tmp_path, pki, kpm_id="dev1@mef.example.com", kpm=KPM)
    with pytest.raises(ConfigError, match="needs a KpmID and Kpm, or a certificate"):
        EnroleeConfig(mef_host="127.0.0.1", mef_port=9, mef_fqdn=MEF_FQDN, node_id="n", store_path=tmp_path / "s",
                      cert_file=pki / "dev.pem")


def test_a_certificate_enrolee_seals_its_store_under_its_private_key(tmp_path, pki, enrolment):
    cfg = cert_config(tmp_path, pki)
    assert "BEGIN" not in repr(cfg) and "key=<file" in repr(cfg)
    e = Enrolee(cfg)
    assert e.identity == "/id-cmn1"
    e.save(enrolment)
    path = cfg.store_path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert json.loads(path.read_text())["certID"] == "/id-cmn1"
    assert KE.reveal() not in path.read_bytes() and base64.b64encode(KE.reveal()) not in path.read_bytes()
    assert Enrolee(cert_config(tmp_path, pki)).load().ke_id == KE_ID
    # another device's certificate and key do not open it
    with pytest.raises(StoreError, match="certificate ID /id-cmn2"):
        Enrolee(cert_config(tmp_path, pki, "other")).load()
    doc = json.loads(path.read_text())
    doc["certID"] = "/id-cmn2"
    path.write_text(json.dumps(doc))
    with pytest.raises(StoreError):
        Enrolee(cert_config(tmp_path, pki, "other")).load()


def test_a_private_key_readable_by_others_is_refused(tmp_path, pki):
    import shutil
    key = tmp_path / "loose.key"
    shutil.copy(pki / "dev.key", key)
    key.chmod(0o644)
    cfg = EnroleeConfig(mef_host="127.0.0.1", mef_port=9, mef_fqdn=MEF_FQDN, cert_file=pki / "dev.pem",
                        key_file=key, trust_anchor_file=pki / "ca.pem", node_id="n", store_path=tmp_path / "s")
    with pytest.raises(ConfigError, match="readable by group or others"):
        Enrolee(cfg)
