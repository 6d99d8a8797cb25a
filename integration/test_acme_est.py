"""The Certificate-Based RSPF end to end (issue 8 item 4): a MEF issuing certificates over EST, a real ACME
IN-CSE whose plugin trusts the MEF's CA (``mefCaFile``), and devices that obtain their certificate with
``rspf enrol --certificate-enrolment`` and then register over mutual TLS.

What is checked: the Credential-ID comes from the certificate (33-<AE-ID>, 32-<CSE-ID>) and is recorded in a
bound rule with the certificate's App-ID, with no operator rule; a registration with another App-ID, or
another AE-ID-Stem, is refused; a certificate the MEF revoked is refused and its open connection closed, its
rule removed; one signed by another CA, or expired, is refused at the handshake; a listener set to PSK only
refuses certificates and one set to certificates only refuses PSK clients.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from rspf import est
from rspf.client import OneM2MClient
from rspf.errors import RspfError, TlsError
from rspf.tls import CertClient, TlsConnection

from .acme_harness import HOST, IN_CSE_ID, TY_AE, TY_CSR, AcmeCse, Resp, ae_body, new_mef, wait_until
from .pki import make_pki
from .support import MefHome

SP = "//sp.example.com"


def _enrol(mef: MefHome, name: str) -> Path:
    folder = mef.root / f"{name}.certs"
    res = mef.enrol(mef.enrolees[name], "--certificate-enrolment", "--cert-dir", str(folder))
    assert res.rc == 0, str(res)
    return folder


def _connect(cse: AcmeCse, pki: Path, folder: Path) -> TlsConnection:
    return CertClient(pki / "ca.pem", folder / "cert.pem", folder / "key.pem").connect(
        HOST, cse.secure_port, IN_CSE_ID, timeout=15)


def _request(tls: TlsConnection, origin: str, method: str, path: str, content: Any = None,
             ty: int | None = None) -> Resp:
    conn = OneM2MClient(tls, origin, host=f"{HOST}")
    r = conn.request(method, path, content, ty=ty)
    return Resp(r.status, r.rsc, r.body)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AcmeCse, MefHome, Path]]:
    root = tmp_path_factory.mktemp("acme-est")
    (root / "pki").mkdir()
    pki = make_pki(root / "pki", {})  # the CSE's own server certificate (the operator's PKI)
    mef, target = new_mef(root / "mef")
    mef.set_config("certificate_provisioning", "true")
    for name, enrolee_id, app in (("lamp", "Clamp", "Nlamp"), ("door", "Cdoor", "Ndoor"), ("gone", "Cgone", None),
                                  ("spare", "Cspare", None)):
        mef.add_enrolee(name, "--certificates", *(["--app-id", app] if app else []), enrolee_id=enrolee_id,
                        registrar=IN_CSE_ID)
    mef.add_enrolee("mn", "--certificates", enrolee_id="/id-mncert", registrar=IN_CSE_ID)
    mef.start()
    ca_file = root / "mef-ca.pem"
    ca_file.write_text(mef.cli.ok("mef", "ca", "-c", mef.config).stdout)
    cse = AcmeCse(root / "acme", "in-est")
    try:
        cse.install(mef, "--no-enrol", "--mef-psk-identity", target.psk_identity, "--mef-psk-file",
                    target.psk_file, "--cert-file", pki / "server.pem", "--key-file", pki / "server.key",
                    "--mef-ca-file", ca_file)
        cse.start()
        yield cse, mef, pki
    finally:
        cse.stop()
        mef.stop()


def test_an_ae_with_a_mef_certificate_registers_and_its_rule_is_recorded(world: tuple[AcmeCse, MefHome, Path]) \
        -> None:
    cse, mef, pki = world
    folder = _enrol(mef, "lamp")
    tls = _connect(cse, pki, folder)
    r = _request(tls, "Clamp", "POST", f"/{cse.cse_name}", ae_body("lamp", "Nlamp"), ty=TY_AE)
    assert r.rsc == 2001, str(r)
    assert r.pc("m2m:ae")["aei"] == "Clamp"
    rules = cse.discover("fu=1&ty=19")
    bound = [cse.get(ri.split("/")[-1]).pc("m2m:asar") for ri in rules if "rspf-cred-" in ri]
    mine = [b for b in bound if b.get("apci") == ["33-Clamp"]]
    assert mine and mine[0]["aae"] == ["Clamp"] and mine[0]["aai"] == ["Nlamp"], bound
    r = _request(tls, "Clamp", "GET", f"/{cse.cse_name}/lamp")
    assert r.rsc == 2000, str(r)


def test_the_certificate_app_id_and_stem_bind_the_registration(world: tuple[AcmeCse, MefHome, Path]) -> None:
    cse, mef, pki = world
    folder = _enrol(mef, "door")
    r = _request(_connect(cse, pki, folder), "Cdoor", "POST", f"/{cse.cse_name}", ae_body("door", "Nother"),
                 ty=TY_AE)
    assert r.rsc == 4126, str(r)  # the certificate binds Ndoor
    r = _request(_connect(cse, pki, folder), "Clamp", "POST", f"/{cse.cse_name}", ae_body("door2", "Ndoor"),
                 ty=TY_AE)
    assert r.rsc == 4106, str(r)  # the certificate names Cdoor, not Clamp
    assert cse.get("door").rsc == 4004 and cse.get("door2").rsc == 4004


def test_a_revoked_certificate_is_closed_refused_and_its_rule_removed(world: tuple[AcmeCse, MefHome, Path]) \
        -> None:
    cse, mef, pki = world
    folder = _enrol(mef, "gone")
    tls = _connect(cse, pki, folder)
    assert _request(tls, "Cgone", "POST", f"/{cse.cse_name}", ae_body("gone", "Nx"), ty=TY_AE).rsc == 2001
    cert = x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())
    mef.cli.ok("mef", "cert", "revoke", "-c", mef.config, format(cert.serial_number, "x"))
    sha = est.fingerprint(cert)
    wait_until(lambda: f"certificate {sha}" in cse.log_text() and "revoked by the MEF" in cse.log_text(), 30,
               "the CSE applying the certificate revocation")
    with pytest.raises((RspfError, OSError)):  # the open connection was closed
        _request(tls, "Cgone", "GET", f"/{cse.cse_name}/gone")
    with pytest.raises((RspfError, OSError)):  # and a new one gets no service
        _request(_connect(cse, pki, folder), "Cgone", "GET", f"/{cse.cse_name}/gone")
    assert not [ri for ri in cse.discover("fu=1&ty=19") if "rspf-cred-" in ri and
                cse.get(ri.split("/")[-1]).pc("m2m:asar").get("apci") == ["33-Cgone"]]


def _forge(folder: Path, out: Path, ca_key_file: Path | None, *, expired: bool) -> Path:
    """A certificate naming the same AE: signed by a CA of its own, or by the MEF's CA but expired."""
    out.mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    real = x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())
    if ca_key_file is not None:
        issuer_key = serialization.load_pem_private_key(ca_key_file.read_bytes(), None)
        issuer = real.issuer
    else:
        issuer_key = ec.generate_private_key(ec.SECP256R1())
        issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forger")])
    now = dt.datetime.now(dt.UTC)
    start, end = (now - dt.timedelta(days=10), now - dt.timedelta(days=1)) if expired else (now, now + dt.timedelta(1))
    cert = (x509.CertificateBuilder().subject_name(real.subject).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
            .add_extension(real.extensions.get_extension_for_class(x509.SubjectAlternativeName).value, False)
            .sign(issuer_key, hashes.SHA256()))  # type: ignore[arg-type]
    (out / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    return out


@pytest.mark.parametrize("kind", ["another CA", "expired"])
def test_a_forged_or_expired_certificate_gets_no_service(world: tuple[AcmeCse, MefHome, Path], tmp_path: Path,
                                                         kind: str) -> None:
    cse, mef, pki = world
    folder = mef.root / "lamp.certs"
    if not (folder / "cert.pem").exists():
        folder = _enrol(mef, "lamp")
    forged = _forge(folder, tmp_path / "forged", mef.root / "est-ca.key" if kind == "expired" else None,
                    expired=kind == "expired")
    with pytest.raises((RspfError, OSError)):
        _request(_connect(cse, pki, forged), "Clamp", "GET", f"/{cse.cse_name}/lamp")


def test_an_mn_cse_registers_with_its_cse_id_certificate(world: tuple[AcmeCse, MefHome, Path]) -> None:
    cse, mef, pki = world
    folder = _enrol(mef, "mn")
    csr = {"m2m:csr": {"rn": "id-mncert", "cst": 2, "csi": "/id-mncert", "cb": "//sp.example.com/id-mncert/cse-mn",
                       "rr": True, "srv": ["3"], "dcse": [], "poa": [f"http://{HOST}:1"]}}
    r = _request(_connect(cse, pki, folder), "/id-mncert", "POST", f"/{cse.cse_name}", csr, ty=TY_CSR)
    assert r.rsc == 2001, str(r)
    spoof = dict(csr["m2m:csr"], rn="id-other", csi="/id-other")
    r = _request(_connect(cse, pki, folder), "/id-other", "POST", f"/{cse.cse_name}", {"m2m:csr": spoof}, ty=TY_CSR)
    assert r.rsc == 4106, str(r)


@pytest.mark.parametrize("setting", ["psk", "certificate"])
def test_the_operator_chooses_psk_certificates_or_both(world: tuple[AcmeCse, MefHome, Path], tmp_path: Path,
                                                       setting: str) -> None:
    _cse, mef, pki = world
    cse = AcmeCse(tmp_path / "acme", f"in-{setting}")
    target = mef.targets["in"]
    cse.install(mef, "--no-enrol", "--mef-psk-identity", target.psk_identity, "--mef-psk-file", target.psk_file,
                "--cert-file", pki / "server.pem", "--key-file", pki / "server.key", "--mef-ca-file",
                mef.root.parent / "mef-ca.pem", "--secure-credentials", setting)
    cse.start()
    try:
        folder = mef.root / "spare.certs"
        if not (folder / "cert.pem").exists():
            folder = _enrol(mef, "spare")
        mef.enrol(mef.enrolees["spare"])
        enrolment = mef.load_enrolment(mef.enrolees["spare"])
        from .acme_harness import secure_request
        if setting == "psk":
            with pytest.raises((RspfError, OSError)):
                _request(_connect(cse, pki, folder), "Cspare", "GET", f"/{cse.cse_name}")
            r = secure_request(cse.secure_port, enrolment.ke_id, enrolment.registrar_key, "GET", f"/{cse.cse_name}",
                               origin="Cspare")
            assert r.rsc is not None  # a oneM2M answer over TLS-PSK
        else:
            with pytest.raises((TlsError, RspfError, OSError)):
                secure_request(cse.secure_port, enrolment.ke_id, enrolment.registrar_key, "GET", f"/{cse.cse_name}",
                               origin="Cspare")
            r = _request(_connect(cse, pki, folder), "Cspare", "GET", f"/{cse.cse_name}")
            assert r.rsc is not None
        assert json.dumps(cse.rspf_value("secureCredentials")) and cse.rspf_value("secureCredentials") == setting
    finally:
        cse.stop()
