"""The Certificate-Based MEF handshake (issue 8 item 1): a real ``rspf mef serve`` with a certificate, enrolees
registered by the ID their certificate names, the Enrolee client (library and ``rspf enrol --cert``) and
``openssl s_client`` with a client certificate.

What is checked: a certificate enrolee gets the same session as a PSK one (KeID and Ke from the exporter: the
profile's registrar key and the key a Target fetches are derived from the Ke both ends computed); the refusals
(foreign CA, expired, unregistered ID, suspended, revoked) store nothing and are logged at WARNING with the
identity; PSK enrolees keep working on the same MEF; an impostor MEF is refused before anything is sent.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rspf import keys
from rspf.enrolee import Enrolee, EnroleeConfig
from rspf.errors import RemoteError, TlsError
from rspf.secret import Secret

from .impostors import RECORDED, CertServer
from .pki import make_pki
from .support import FQDN, HOST, REGISTRAR, REGISTRAR_URI, Cli, MefHome, read_hex
from .test_openssl_interop import KEYING_RE, http_response

SP = "//sp.example.com"
#: certificate name -> the SAN URI it carries (certificate_onem2m_id reads "/id-..." from it)
CLIENTS = {name: f"{SP}/id-{name}" for name in ("cmn1", "cmn2", "cmn3", "cmn4", "cmn5", "stranger")}
ROGUE = {"rogue": f"{SP}/id-cmn1"}       # the ID of a registered enrolee, from another CA
EXPIRED = {"stale": f"{SP}/id-cmn1"}     # the same ID from the right CA, expired yesterday


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"), CLIENTS, rogue=ROGUE, expired=EXPIRED, server_dns=FQDN)


@pytest.fixture(scope="module")
def cert_mef(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Iterator[MefHome]:
    root = tmp_path_factory.mktemp("mef")
    home = MefHome(root, Cli(root)).build_default()
    for key, file in (("tls_cert_file", "server.pem"), ("tls_key_file", "server.key"),
                      ("tls_client_ca_file", "ca.pem")):
        home.set_config(key, json.dumps(str(pki / file)))
    for n in range(1, 6):
        add_cert_enrolee(home, "--cert", pki / f"cmn{n}.pem", enrolee_id=f"/id-cmn{n}")
    home.start()
    try:
        yield home
    finally:
        home.stop()


def add_cert_enrolee(home: MefHome, *how: Any, enrolee_id: str) -> Any:
    return home.cli.ok("mef", "enrolee", "add", "-c", home.config, *how, "--enrolee-id", enrolee_id,
                       "--node-id", f"urn:dev:cert:{enrolee_id[4:]}", "--registrar-cse-id", REGISTRAR,
                       "--registrar-uri", REGISTRAR_URI)


def cert_enrolee(home: MefHome, pki: Path, name: str, tmp: Path, *, ca: str = "ca.pem") -> Enrolee:
    return Enrolee(EnroleeConfig(mef_host=HOST, mef_port=home.port, mef_fqdn=FQDN, cert_file=pki / f"{name}.pem",
                                 key_file=pki / f"{name}.key", trust_anchor_file=pki / ca,
                                 node_id=f"urn:dev:cert:{name}",
                                 store_path=tmp / f"{name}.store", timeout=10.0))


def test_the_certificate_enrolee_is_registered_by_its_certificate_id(cert_mef: MefHome) -> None:
    shown = cert_mef.show("/id-cmn1")
    assert (shown["certificateID"], shown["hasKpm"], shown["kpmID"]) == ("/id-cmn1", False, "/id-cmn1")
    res = cert_mef.cli("mef", "enrolee", "rotate-kpm", "-c", cert_mef.config, "/id-cmn1", "--print-kpm")
    assert res.rc != 0 and "has no Kpm to rotate" in res.stderr, str(res)


def test_a_certificate_enrolee_enrols_like_a_psk_one(cert_mef: MefHome, pki: Path, tmp_path: Path) -> None:
    enrolment = cert_enrolee(cert_mef, pki, "cmn1", tmp_path).enrol()
    assert enrolment.enrolee_id == "/id-cmn1" and enrolment.ke_id.endswith(f"@{FQDN}")
    # the Enrolee checked the registrar key against its own Ke; the Target gets the same key from the MEF's Ke
    out = tmp_path / "kuc.hex"
    res = cert_mef.fetch(cert_mef.targets["in"], enrolment.ke_id, key_out=out)
    assert res.rc == 0, str(res)
    assert bytes.fromhex(read_hex(out)) == enrolment.registrar_key.reveal()
    assert cert_mef.show("/id-cmn1")["lastEnrolled"] is not None
    # the store is sealed under the private key: it opens again, and is 0600
    again = cert_enrolee(cert_mef, pki, "cmn1", tmp_path).load()
    assert again is not None and again.ke_id == enrolment.ke_id
    assert (tmp_path / "cmn1.store").stat().st_mode & 0o777 == 0o600


def test_psk_enrolees_still_enrol_on_a_mef_with_certificates(cert_mef: MefHome) -> None:
    res = cert_mef.enrol(cert_mef.enrolees["dev1"])
    assert res.rc == 0, str(res)


def test_rspf_enrol_with_a_certificate(cert_mef: MefHome, pki: Path, tmp_path: Path) -> None:
    store = tmp_path / "cli.store"
    args = ["enrol", "--mef", cert_mef.address, "--mef-fqdn", FQDN, "--cert", pki / "cmn2.pem", "--key",
            pki / "cmn2.key", "--ca", pki / "ca.pem", "--node-id", "urn:dev:cert:cmn2", "--store", store, "--json"]
    res = cert_mef.cli(*args)
    assert res.rc == 0, str(res)
    assert res.json()["profile"]["enroleeID"] == "/id-cmn2" and store.exists()
    both = cert_mef.cli(*args, "--kpm-id", "x@y", "--kpm-file", pki / "ca.pem")
    assert both.rc != 0 and "not both" in both.stderr


def _refused(home: MefHome, enrolee: Enrolee, kpm_id: str | None, tmp: Path, name: str, why: str) -> None:
    before = home.log_text()
    with pytest.raises(Exception) as info:  # TlsError (handshake) or a transport error (session closed)
        enrolee.enrol()
    assert "securityProfile" not in str(info.value)
    assert not (tmp / f"{name}.store").exists()
    if kpm_id is not None:
        assert home.show(kpm_id)["lastEnrolled"] is None
    deadline = time.monotonic() + 10  # the MEF may write its log line after the client saw the refusal
    while True:
        new = home.log_text()[len(before):]
        lines = [line for line in new.splitlines() if why in line]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert lines and all("WARNING" in line for line in lines), new
    assert "BEGIN" not in new and "PRIVATE" not in new  # an identity, never a key


def test_a_certificate_from_a_foreign_ca_is_refused(cert_mef: MefHome, pki: Path, tmp_path: Path) -> None:
    _refused(cert_mef, cert_enrolee(cert_mef, pki, "rogue", tmp_path), None, tmp_path, "rogue",
             "(subject CN=rogue, chain depth 0) does not verify to the trust anchor")


def test_an_expired_certificate_is_refused(cert_mef: MefHome, pki: Path, tmp_path: Path) -> None:
    _refused(cert_mef, cert_enrolee(cert_mef, pki, "stale", tmp_path), None, tmp_path, "stale",
             "certificate has expired")


def test_a_certificate_of_no_registered_enrolee_is_refused(cert_mef: MefHome, pki: Path, tmp_path: Path) -> None:
    _refused(cert_mef, cert_enrolee(cert_mef, pki, "stranger", tmp_path), None, tmp_path, "stranger",
             "certificate '/id-stranger' from 127.0.0.1")


@pytest.mark.parametrize(("name", "change", "state"), [("cmn3", "suspend", "suspended"),
                                                       ("cmn4", "revoke", "revoked")])
def test_a_suspended_or_revoked_certificate_enrolee_is_refused(cert_mef: MefHome, pki: Path, tmp_path: Path,
                                                               name: str, change: str, state: str) -> None:
    cert_mef.cli.ok("mef", "enrolee", change, "-c", cert_mef.config, f"/id-{name}")
    _refused(cert_mef, cert_enrolee(cert_mef, pki, name, tmp_path), f"/id-{name}", tmp_path, name,
             f"the Enrolee is {state}")


@pytest.mark.parametrize(("impostor", "message"), [
    ("server-other-ca", "does not verify to the trust anchor"),
    ("server-other-name", f"names other.example.com, //sp.example.com/id-other, not the expected {FQDN}"),
])
def test_the_enrolee_refuses_an_impostor_mef_before_sending(pki: Path, tmp_path: Path, impostor: str,
                                                            message: str) -> None:
    with CertServer(pki / f"{impostor}.pem", pki / f"{impostor}.key", "1.2") as server:
        enrolee = Enrolee(EnroleeConfig(mef_host=HOST, mef_port=server.port, mef_fqdn=FQDN,
                                        cert_file=pki / "cmn5.pem", key_file=pki / "cmn5.key",
                                        trust_anchor_file=pki / "ca.pem", node_id="urn:dev:cert:cmn5",
                                        store_path=tmp_path / "cmn5.store", timeout=10.0))
        with pytest.raises(TlsError, match=message) as info:
            enrolee.enrol()
    assert "nothing was sent to it" in str(info.value)
    assert server.received == b""
    assert not (tmp_path / "cmn5.store").exists()


def test_the_enrolee_control_the_real_mef_certificate_is_accepted(pki: Path, tmp_path: Path) -> None:
    """The positive control of the impostor test: the same kind of server with the MEF's certificate gets the
    request (so the refusals above are not vacuous)."""
    with CertServer(pki / "server.pem", pki / "server.key", "1.2") as server:
        enrolee = Enrolee(EnroleeConfig(mef_host=HOST, mef_port=server.port, mef_fqdn=FQDN,
                                        cert_file=pki / "cmn5.pem", key_file=pki / "cmn5.key",
                                        trust_anchor_file=pki / "ca.pem", node_id="urn:dev:cert:cmn5",
                                        store_path=tmp_path / "cmn5.store", timeout=10.0))
        with pytest.raises(RemoteError, match=RECORDED):  # the stand-in answers 4103 to whatever it gets
            enrolee.enrol()
    assert server.received.startswith(b"POST /securityProfile HTTP/1.1\r\n")
    assert b"x-m2m-origin: /id-cmn5\r\n" in server.received  # the originator: the ID the certificate names


# ------------------------------------------------------------------------------ openssl s_client interop
OPENSSL_VERSIONS = {"1.2": ["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA256"], "1.3": ["-tls1_3"]}


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_openssl_s_client_enrols_with_a_certificate(openssl_bin: str, cert_mef: MefHome, pki: Path,
                                                   version: str) -> None:
    body = json.dumps({"rspf:spReq": {"nodeID": "urn:dev:cert:cmn5"}}).encode()
    request = (f"POST /securityProfile HTTP/1.1\r\nHost: {FQDN}\r\nX-M2M-Origin: /id-cmn5\r\nX-M2M-RI: ossl-c\r\n"
               f"X-M2M-RVI: 3\r\nContent-Type: application/json\r\nAccept: application/json\r\n"
               f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    argv = [openssl_bin, "s_client", "-connect", f"{HOST}:{cert_mef.port}", "-cert", str(pki / "cmn5.pem"),
            "-key", str(pki / "cmn5.key"), "-CAfile", str(pki / "ca.pem"), "-verify_return_error",
            "-servername", FQDN, *OPENSSL_VERSIONS[version], "-keymatexport", keys.EXPORTER_LABEL_BOOTSTRAP,
            "-keymatexportlen", str(keys.EXPORTER_LENGTH), "-ign_eof"]
    proc = subprocess.run(argv, input=request, capture_output=True, timeout=30)
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    if version == "1.2":
        assert "Cipher is ECDHE-ECDSA-AES128-SHA256" in out and "TLSv1.2" in out, out
    else:
        assert "TLSv1.3" in out, out
    found = KEYING_RE.findall(out)
    assert len(found) == 1, out
    exported = bytes.fromhex(found[0])
    status, headers, answer = http_response(proc.stdout)
    assert (status, headers.get("x-m2m-rsc")) == (201, "2001")
    prof = json.loads(answer)["rspf:secp"]
    assert prof["enroleeID"] == "/id-cmn5"
    assert prof["credential"]["keyID"] == f"{exported[:16].hex()}@{FQDN}"
    expected = keys.derive_usage_constrained_key(Secret(exported[16:], "Ke"), 22, "id-in.sp.example.com")
    assert base64.b64decode(prof["credential"]["key"]) == expected.reveal()


# ------------------------------------------------------------------------------------------ admin CLI
def test_enrolee_add_by_certificate_id_or_both_and_its_errors(cert_mef: MefHome, pki: Path) -> None:
    add_cert_enrolee(cert_mef, "--cert-id", "/id-byid", enrolee_id="/id-byid")
    assert cert_mef.show("/id-byid")["certificateID"] == "/id-byid"
    kpm = cert_mef.keygen("both.kpm")
    res = add_cert_enrolee(cert_mef, "--kpm-id", f"both@{FQDN}", "--kpm-file", kpm, "--cert-id", "/id-both",
                           enrolee_id="/id-both")
    assert f"KpmID both@{FQDN}, certificate ID /id-both" in res.stdout
    shown = cert_mef.show(f"both@{FQDN}")
    assert (shown["certificateID"], shown["hasKpm"]) == ("/id-both", True)
    cli = cert_mef.cli
    base = ["mef", "enrolee", "add", "-c", cert_mef.config, "--node-id", "urn:x", "--registrar-cse-id", REGISTRAR,
            "--registrar-uri", REGISTRAR_URI]
    for extra, message in (
            ([], "needs a Kpm (--kpm-id and --kpm-file) or a certificate"),
            (["--cert-id", "/id-byid"], "already exists"),                        # the certificate ID is taken
            (["--cert-id", "/id-x", "--cert", pki / "cmn1.pem"], "not both"),
            (["--cert-id", "has space"], "printable ASCII characters without spaces"),
            (["--cert", pki / "ca.pem", "--kpm-id", "k@x"], "--kpm-id and --kpm-file go together"),
            (["--cert", pki / "server.key"], "is not a PEM certificate")):
        res = cli(*base, "--enrolee-id", "/id-fresh", *extra)
        assert res.rc != 0 and message in res.stderr, str(res)
    assert "/id-fresh" not in {e["enroleeID"] for e in cert_mef.list_enrolees()}  # nothing was added
