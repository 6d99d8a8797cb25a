"""Certificate provisioning over EST (issue 8 item 2-3): a real ``rspf mef serve`` with its CA, enrolees entitled
to certificates, the Enrolee (``rspf enrol --certificate-enrolment``, ``rspf renew-certificate``), the admin
commands (``mef cert list/show/revoke``, ``mef ca``) and EST driven by ``openssl req`` + ``openssl s_client``.

What is checked: the instruction reaches entitled enrolees that ask, and only them; the certificate names the
enrolee (and its App-ID), holds the key made on the device, chains to the MEF's CA; renewal over mutual TLS
with the issued certificate supersedes (revokes) the old one; a revoked or foreign certificate cannot renew;
every issued certificate is listed and its revocation reaches the revocation feed; the CA key is 0600 and
never in a log.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from rspf import est
from rspf.client import OneM2MClient
from rspf.errors import RspfError, TlsError
from rspf.fileutil import read_key_file
from rspf.mef import protocol
from rspf.tls import CertClient, PskClient

from .impostors import CertServer
from .pki import make_pki
from .support import FQDN, HOST, REGISTRAR, Cli, MefHome, free_port
from .test_openssl_interop import http_response

SP = "//sp.example.com"


@pytest.fixture(scope="module")
def mef(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MefHome]:
    root = tmp_path_factory.mktemp("estmef")
    home = MefHome(root, Cli(root))
    home.init()
    home.set_config("certificate_provisioning", "true")
    home.set_config("certificate_validity_days", "30")
    home.add_enrolee("ae1", "--certificates", "--app-id", "Nlight", enrolee_id="Cae1")
    home.add_enrolee("mn1", "--certificates", enrolee_id="/id-mn1")
    home.add_enrolee("plain", enrolee_id="/id-plain")  # not entitled
    home.add_enrolee("ae2", "--certificates", enrolee_id="Cae2")
    home.add_target("in", REGISTRAR, "id-in@sp.example.com")
    home.start()
    try:
        yield home
    finally:
        home.stop()


def enrol_with_certificate(mef: MefHome, name: str, *extra: str) -> dict:
    info = mef.enrolees[name]
    res = mef.enrol(info, "--certificate-enrolment", "--cert-dir", str(mef.root / f"{name}.certs"), *extra)
    assert res.rc == 0, str(res)
    return res.json()


def test_the_ca_is_generated_private_and_printed(mef: MefHome) -> None:
    key = mef.root / "est-ca.key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    pem = mef.cli.ok("mef", "ca", "-c", mef.config).stdout
    ca = x509.load_pem_x509_certificate(pem.encode())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert key.read_text().split("\n")[1] not in mef.log_text()  # the key never reaches the log


def test_an_entitled_ae_gets_a_certificate_naming_it_and_its_app_id(mef: MefHome) -> None:
    out = enrol_with_certificate(mef, "ae1")
    held = out["certificate"]
    assert held["subject"] == f"{SP}{REGISTRAR}/Cae1" and held["appID"] == "Nlight"
    folder = mef.root / "ae1.certs"
    for name in ("key.pem", "cert.pem", "ca.pem"):
        assert stat.S_IMODE(os.stat(folder / name).st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())
    ca = x509.load_pem_x509_certificate(mef.cli.ok("mef", "ca", "-c", mef.config).stdout.encode())
    cert.verify_directly_issued_by(ca)
    assert est.names_of(cert) == ([f"{SP}{REGISTRAR}/Cae1"], "Nlight")
    listed = mef.cli.ok("mef", "cert", "list", "-c", mef.config, "--enrolee", mef.enrolees["ae1"].kpm_id,
                        "--json").json()
    assert [c["sha256"] for c in listed] == [est.fingerprint(cert)] and listed[0]["state"] == "active"
    instructions = out["instructions"]
    assert [(i["instructionType"], i["carriedOut"]) for i in instructions] == [(protocol.INSTRUCTION_CERT, True)]
    assert instructions[0]["uri"] == f"https://{FQDN}:{mef.port}{est.EST_PATH}"


def test_a_cse_gets_a_certificate_for_server_and_client_use(mef: MefHome) -> None:
    enrol_with_certificate(mef, "mn1")
    cert = x509.load_pem_x509_certificate((mef.root / "mn1.certs" / "cert.pem").read_bytes())
    assert est.names_of(cert) == ([f"{SP}/id-mn1"], None)
    usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert {x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH, x509.oid.ExtendedKeyUsageOID.SERVER_AUTH} <= usages


def test_an_enrolee_that_is_not_entitled_gets_no_instruction_and_no_certificate(mef: MefHome) -> None:
    info = mef.enrolees["plain"]
    res = mef.enrol(info, "--certificate-enrolment", "--cert-dir", str(mef.root / "plain.certs"))
    assert res.rc != 0 and "issued no certificate" in res.stderr, str(res)
    assert not (mef.root / "plain.certs" / "cert.pem").exists()
    assert mef.load_enrolment(info) is not None  # the PSK enrolment itself went through


def _holder(mef: MefHome, folder: Path) -> CertClient:
    return CertClient(folder / "ca.pem", folder / "cert.pem", folder / "key.pem")


def test_renewal_over_mutual_tls_supersedes_the_old_certificate(mef: MefHome) -> None:
    enrol_with_certificate(mef, "ae2")
    folder = mef.root / "ae2.certs"
    old = x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())
    old_key = (folder / "key.pem").read_bytes()
    res = mef.cli("renew-certificate", "--mef", mef.address, "--mef-fqdn", FQDN, "--cert-dir", folder, "--json")
    assert res.rc == 0, str(res)
    new = x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())
    assert new.serial_number != old.serial_number and (folder / "key.pem").read_bytes() != old_key  # a new key
    assert est.names_of(new) == est.names_of(old)
    shown = mef.cli.ok("mef", "cert", "show", "-c", mef.config, format(old.serial_number, "x"), "--json").json()
    assert (shown["state"], shown["cause"]) == ("revoked", "superseded")
    # the superseded certificate cannot renew again: the MEF refuses the session
    stale = mef.root / "ae2.stale"
    stale.mkdir()
    (stale / "cert.pem").write_bytes(old.public_bytes(serialization.Encoding.PEM))
    (stale / "key.pem").write_bytes(old_key)
    (stale / "ca.pem").write_bytes((folder / "ca.pem").read_bytes())
    for f in stale.iterdir():
        f.chmod(0o600)
    res = mef.cli("renew-certificate", "--mef", mef.address, "--mef-fqdn", FQDN, "--cert-dir", stale)
    assert res.rc != 0, str(res)
    assert "certificate was revoked (superseded)" in mef.log_text()


def test_a_revoked_certificate_is_in_the_feed_and_cannot_renew(mef: MefHome) -> None:
    folder = mef.root / "ae1.certs"
    if not (folder / "cert.pem").exists():
        enrol_with_certificate(mef, "ae1")
    cert = x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())
    mef.cli.ok("mef", "cert", "revoke", "-c", mef.config, format(cert.serial_number, "x"))
    again = mef.cli("mef", "cert", "revoke", "-c", mef.config, format(cert.serial_number, "x"))
    assert again.rc != 0 and "already revoked" in again.stderr
    target = mef.targets["in"]
    tls = PskClient().connect(HOST, mef.port, target.psk_identity, read_key_file(target.psk_file, "psk"),
                              timeout=10)
    feed = OneM2MClient(tls, target.target_id, host=FQDN)
    page = protocol.parse_revocations_response(feed.call("GET", protocol.revocations_path(0)))
    feed.close()
    assert est.fingerprint(cert) in [i.cert_sha256 for i in page.items]
    with pytest.raises((RspfError, TlsError)):
        tls = _holder(mef, folder).connect(HOST, mef.port, FQDN, server_name=FQDN, timeout=10)
        client = OneM2MClient(tls, "Cae1", host=FQDN)
        client.exchange("GET", est.est_path(est.OP_CACERTS), {})


def test_a_certificate_from_another_ca_cannot_renew(mef: MefHome, tmp_path: Path) -> None:
    before = len(mef.cli.ok("mef", "cert", "list", "-c", mef.config, "--json").json())
    pki = make_pki(tmp_path, {"forged": f"{SP}{REGISTRAR}/Cae2"})
    forged = tmp_path / "forged"
    forged.mkdir()
    for src, dst in (("forged.pem", "cert.pem"), ("forged.key", "key.pem")):
        (forged / dst).write_bytes((pki / src).read_bytes())
        (forged / dst).chmod(0o600)
    (forged / "ca.pem").write_bytes((mef.root / "ae2.certs" / "ca.pem").read_bytes())
    (forged / "ca.pem").chmod(0o600)
    res = mef.cli("renew-certificate", "--mef", mef.address, "--mef-fqdn", FQDN, "--cert-dir", forged)
    assert res.rc != 0, str(res)
    assert len(mef.cli.ok("mef", "cert", "list", "-c", mef.config, "--json").json()) == before  # nothing issued


def test_est_driven_by_openssl_req_and_s_client_over_the_kpm(mef: MefHome, tmp_path: Path) -> None:
    """A device without this project: the CSR from ``openssl req``, the request through ``openssl s_client``
    authenticated with the Kpm (TLS-PSK), the answer read as RFC 7030 says."""
    info = mef.add_enrolee("ossl", "--certificates", enrolee_id="Cossl")
    key, csr = tmp_path / "k.pem", tmp_path / "r.der"
    subprocess.run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-subj", "/CN=Cossl", "-addext",
                    f"subjectAltName=URI:{SP}{REGISTRAR}/Cossl", "-outform", "DER", "-out", str(csr)],
                   check=True, capture_output=True, timeout=60)
    body = base64.encodebytes(csr.read_bytes())
    request = (f"POST {est.est_path(est.OP_SIMPLEENROLL)} HTTP/1.1\r\nHost: {FQDN}\r\n"
               f"Content-Type: {est.CT_PKCS10}\r\nContent-Transfer-Encoding: base64\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    proc = subprocess.run(["openssl", "s_client", "-connect", f"{HOST}:{mef.port}", "-psk_identity", info.kpm_id,
                           "-psk", info.kpm_hex, "-tls1_2", "-cipher", "PSK-AES128-CBC-SHA256", "-quiet",
                           "-ign_eof"], input=request, capture_output=True, timeout=60)
    status, headers, answer = http_response(proc.stdout)
    assert status == 200, proc.stdout[-500:]
    assert headers.get("content-type", "").startswith("application/pkcs7-mime")
    cert = est.parse_certs_body(answer)[0]
    assert est.names_of(cert) == ([f"{SP}{REGISTRAR}/Cossl"], None)
    # a CSR naming someone else is refused with a sentence
    subprocess.run(["openssl", "req", "-new", "-key", str(key), "-subj", "/CN=x", "-addext",
                    f"subjectAltName=URI:{SP}{REGISTRAR}/Cae1", "-outform", "DER", "-out", str(csr)],
                   check=True, capture_output=True, timeout=60)
    body = base64.encodebytes(csr.read_bytes())
    request = request.split(b"\r\n\r\n")[0].replace(b"Content-Length: ", b"X-Old: ") + \
        f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    proc = subprocess.run(["openssl", "s_client", "-connect", f"{HOST}:{mef.port}", "-psk_identity", info.kpm_id,
                           "-psk", info.kpm_hex, "-tls1_2", "-cipher", "PSK-AES128-CBC-SHA256", "-quiet",
                           "-ign_eof"], input=request, capture_output=True, timeout=60)
    status, _headers, answer = http_response(proc.stdout)
    assert status == 403 and b"must name exactly" in answer, proc.stdout[-500:]


def test_the_revocation_feed_and_cert_list_are_json(mef: MefHome) -> None:
    rows = mef.cli.ok("mef", "cert", "list", "-c", mef.config, "--json").json()
    assert rows and all({"serial", "sha256", "subject", "state", "notAfter"} <= set(r) for r in rows)
    assert json.dumps(rows)  # plain JSON


def test_a_mef_without_provisioning_answers_est_with_404(tmp_path: Path) -> None:
    home = MefHome(tmp_path, Cli(tmp_path)).build_default()
    home.port = free_port()
    home.start()
    try:
        info = home.enrolees["dev1"]
        tls = PskClient().connect(HOST, home.port, info.kpm_id, read_key_file(info.kpm_file, "kpm"), timeout=10)
        client = OneM2MClient(tls, info.kpm_id, host=FQDN)
        resp = client.exchange("GET", est.est_path(est.OP_CACERTS), {})
        assert resp.status == 404 and b"certificate_provisioning" in resp.body
        client.close()
    finally:
        home.stop()


@pytest.mark.parametrize("impostor", ["another CA", "control: the MEF's own CA"])
def test_renewal_refuses_an_impostor_mef_before_sending(mef: MefHome, tmp_path: Path, impostor: str) -> None:
    """A server with a valid-looking chain naming the MEF-FQDN, but from another CA, gets nothing; the same
    server with a certificate from the MEF's CA (the control) does get the renewal request."""
    folder = mef.root / "mn1.certs"
    if not (folder / "cert.pem").exists():
        enrol_with_certificate(mef, "mn1")
    pki = make_pki(tmp_path, {}, server_dns=FQDN)
    if impostor == "another CA":
        cert, key = pki / "server.pem", pki / "server.key"
    else:  # an FQDN certificate the MEF's CA signs, as the MEF does for itself
        from rspf.mef.ca import MefCa
        ca = MefCa.load_or_create(mef.root / "est-ca.pem", mef.root / "est-ca.key", FQDN)
        cert, key = tmp_path / "fqdn.pem", tmp_path / "fqdn.key"
        ca.write_server_certificate(FQDN, cert, key)
    with CertServer(cert, key, "1.3", client_ca=mef.root / "est-ca.pem") as server:
        res = mef.cli("renew-certificate", "--mef", server.address, "--mef-fqdn", FQDN, "--cert-dir", folder)
        assert res.rc != 0, str(res)
    if impostor == "another CA":
        assert "does not verify to the trust anchor" in res.stderr and "nothing was sent" in res.stderr, str(res)
        assert server.received == b""
    else:
        assert b"/.well-known/est/" in server.received  # a request went out: the refusal above is not vacuous


def test_simplereenroll_from_pythons_ssl_with_an_openssl_csr(mef: MefHome, tmp_path: Path) -> None:
    """A plain HTTPS client (Python's ssl, not this project's TLS code) renews with the issued certificate and a
    CSR from ``openssl req``; the MEF answers RFC 7030 certs-only."""
    info = mef.add_enrolee("pyssl", "--certificates", enrolee_id="Cpyssl")
    folder = mef.root / "pyssl.certs"
    enrol_with_certificate(mef, "pyssl")
    key, csr = tmp_path / "k.pem", tmp_path / "r.der"
    subprocess.run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-subj", "/CN=Cpyssl", "-addext",
                    f"subjectAltName=URI:{SP}{REGISTRAR}/Cpyssl", "-outform", "DER", "-out", str(csr)],
                   check=True, capture_output=True, timeout=60)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(folder / "ca.pem")
    ctx.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    body = base64.encodebytes(csr.read_bytes())
    request = (f"POST {est.est_path(est.OP_SIMPLEREENROLL)} HTTP/1.1\r\nHost: {FQDN}\r\n"
               f"Content-Type: {est.CT_PKCS10}\r\nContent-Transfer-Encoding: base64\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    with ctx.wrap_socket(socket.create_connection((HOST, mef.port), timeout=15), server_hostname=FQDN) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    status, headers, answer = http_response(out)
    assert status == 200 and headers["content-transfer-encoding"] == "base64", out[-300:]
    renewed = est.parse_certs_body(answer)[0]
    assert est.names_of(renewed) == ([f"{SP}{REGISTRAR}/Cpyssl"], None)
    old = x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())
    shown = mef.cli.ok("mef", "cert", "show", "-c", mef.config, est.fingerprint(old), "--json").json()
    assert (shown["state"], shown["cause"], shown["kpmID"]) == ("revoked", "superseded", info.kpm_id)


def test_a_certificate_enrolee_at_a_mef_with_its_own_tls_certificate(tmp_path: Path) -> None:
    """A MEF with tls_cert_file from the operator's PKI and its EST CA: a bootstrap-certificate enrolee obtains a
    certificate and renews it, trusting the operator's CA for the MEF (its trust_anchor_file) besides the EST CA;
    trusting the EST CA alone (``rspf renew-certificate``) it refuses that MEF, as docs/certificates.md says."""
    from rspf.enrolee import Enrolee, EnroleeConfig

    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki", {"boot": f"{SP}/id-boot"}, server_dns=FQDN)
    home = MefHome(tmp_path / "mef", Cli(tmp_path / "mef"))
    (tmp_path / "mef").mkdir()
    home.init()
    for key, value in (("certificate_provisioning", "true"), ("tls_cert_file", json.dumps(str(pki / "server.pem"))),
                       ("tls_key_file", json.dumps(str(pki / "server.key"))),
                       ("tls_client_ca_file", json.dumps(str(pki / "ca.pem")))):
        home.set_config(key, value)
    home.cli.ok("mef", "enrolee", "add", "-c", home.config, "--cert", pki / "boot.pem", "--enrolee-id", "/id-boot",
                "--node-id", "urn:dev:boot", "--registrar-cse-id", REGISTRAR, "--registrar-uri",
                "https://in.example.com/cse-in", "--certificates")
    home.start()
    try:
        folder = tmp_path / "boot.certs"
        enrolee = Enrolee(EnroleeConfig(mef_host=HOST, mef_port=home.port, mef_fqdn=FQDN, cert_file=pki / "boot.pem",
                                        key_file=pki / "boot.key", trust_anchor_file=pki / "ca.pem",
                                        node_id="urn:dev:boot", store_path=tmp_path / "boot.store",
                                        certificate_enrolment=True, certificate_dir=folder))
        enrolment = enrolee.enrol()
        assert [i["carriedOut"] for i in enrolment.instructions] == [True]
        first = enrolee.certificates.load()
        assert first is not None and first.subject == f"{SP}/id-boot"
        renewed = enrolee.renew_certificate()
        assert renewed.certificate.serial_number != first.certificate.serial_number
        res = home.cli("renew-certificate", "--mef", home.address, "--mef-fqdn", FQDN, "--cert-dir", folder)
        assert res.rc != 0 and "does not verify to the trust anchor" in res.stderr, str(res)
    finally:
        home.stop()
