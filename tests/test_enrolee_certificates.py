"""The Enrolee's side of certificate provisioning (rspf.enrolee.certificates): what it accepts from the MEF and
how it keeps the key, the certificate and the CA (0600, replaced whole or not at all)."""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

import pytest

from rspf import est
from rspf.enrolee.certificates import CertificateStore, check_instruction, verified
from rspf.errors import BadRequest, StoreError
from rspf.mef.ca import MefCa
from rspf.mef.protocol import CertificateInstruction

SUBJECT = "//sp.example.com/id-in/Cae1"


@pytest.fixture
def ca(tmp_path: Path) -> MefCa:
    return MefCa.load_or_create(tmp_path / "ca.pem", tmp_path / "ca.key", "mef.example.com")


def issue(ca: MefCa, key=None, subject: str = SUBJECT, app_id: str | None = "Nlight", days: float = 30,  # noqa: ANN001,ANN201
          ago: float = 0):
    key = key or est.new_private_key()
    now = dt.datetime.now(dt.UTC) - dt.timedelta(days=ago)
    issued = ca.issue(key.public_key(), subject, app_id, is_cse=False, not_after=now + dt.timedelta(days=days),
                      now=now)
    return key, issued.certificate


def test_the_certificate_asked_for_is_accepted(ca: MefCa) -> None:
    key, cert = issue(ca)
    assert verified(cert, key, [ca.certificate], SUBJECT, "Nlight") is cert


@pytest.mark.parametrize("lie", ["another key", "another CA", "another subject", "another App-ID", "expired"])
def test_what_the_mef_did_not_issue_as_asked_is_refused(ca: MefCa, tmp_path: Path, lie: str) -> None:
    key = est.new_private_key()
    if lie == "another key":
        _, cert = issue(ca)
    elif lie == "another CA":
        other = MefCa.load_or_create(tmp_path / "o.pem", tmp_path / "o.key", "mef.example.com")
        _, cert = issue(other, key)
    elif lie == "another subject":
        _, cert = issue(ca, key, subject="//sp.example.com/id-in/Cae2")
    elif lie == "another App-ID":
        _, cert = issue(ca, key, app_id="Nother")
    else:
        _, cert = issue(ca, key, days=1, ago=10)
    with pytest.raises(BadRequest):
        verified(cert, key, [ca.certificate], SUBJECT, "Nlight")


def test_the_store_keeps_three_private_files_and_reads_them_back(ca: MefCa, tmp_path: Path) -> None:
    store = CertificateStore(tmp_path / "certs")
    assert store.load() is None
    key, cert = issue(ca)
    held = store.save(key, cert, [ca.certificate])
    for f in (held.key_file, held.cert_file, held.ca_file):
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    assert store.load() == held and held.subject == SUBJECT and held.app_id == "Nlight"
    assert str(held.key_file) in str(held.summary()) and "PRIVATE" not in str(held.summary())


def test_an_interrupted_renewal_is_undone_or_finished(ca: MefCa, tmp_path: Path) -> None:
    store = CertificateStore(tmp_path / "certs")
    key, cert = issue(ca)
    old = store.save(key, cert, [ca.certificate])
    new_key, new_cert = issue(ca)
    # a crash after the new key was written but before the certificate: the old pair stays
    (tmp_path / "certs" / "key.pem.new").write_bytes(b"half")
    assert store.load().certificate == old.certificate
    assert not (tmp_path / "certs" / "key.pem.new").exists()
    # a crash after every new file was written: the renewal is finished
    store.save(new_key, new_cert, [ca.certificate])
    assert store.load().certificate == new_cert


def test_a_key_that_does_not_match_its_certificate_is_refused(ca: MefCa, tmp_path: Path) -> None:
    store = CertificateStore(tmp_path / "certs")
    key, cert = issue(ca)
    store.save(key, cert, [ca.certificate])
    _, other = issue(ca)
    from cryptography.hazmat.primitives import serialization
    (tmp_path / "certs" / "cert.pem").write_bytes(other.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(StoreError, match="do not belong together"):
        store.load()
    (tmp_path / "certs" / "key.pem").chmod(0o644)
    with pytest.raises(Exception, match="readable by group or others"):
        store.load()


@pytest.mark.parametrize("uri", ["https://evil.example.com:8443/.well-known/est",
                                 "https://mef.example.com:9999/.well-known/est",
                                 "http://mef.example.com:8443/.well-known/est",
                                 "https://mef.example.com:8443/elsewhere"])
def test_an_est_uri_that_is_not_the_connected_mef_is_refused(uri: str) -> None:
    with pytest.raises(BadRequest, match="is not the EST server"):
        check_instruction(CertificateInstruction(uri, 3, SUBJECT), "mef.example.com", 8443)
    check_instruction(CertificateInstruction("https://MEF.example.com:8443/.well-known/est", 3, SUBJECT),
                      "mef.example.com", 8443)  # the control: the same MEF is accepted
