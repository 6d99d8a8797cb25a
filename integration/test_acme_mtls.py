"""Mutual TLS on the CSE's secure listener (certFile/keyFile/caFile), with a real ACME IN-CSE.

A client certificate names an AE-ID (subjectAltName URI //sp/cse/ae); its Credential-ID is 33-<AE-ID>.
Certificates do not come from the MEF, so the operator lists them in a <serviceSubscribedAppRule>.
The clients are the project's own (rspf.tls.CertClient, rspf.ae.SecureAE, ``rspf ae register --cert``): they
check in turn that the CSE's certificate chains to the test CA and names the CSE-ID /id-in.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rspf.ae import SecureAE
from rspf.client import OneM2MClient
from rspf.errors import RspfError, TlsError
from rspf.tls import CertClient

from .acme_harness import HOST, IN_CSE_ID, TY_AE, AcmeCse, Resp, ae_body, new_mef
from .pki import make_pki
from .support import run_cli


def _client(pki: Path, name: str) -> CertClient:
    return CertClient(pki / "ca.pem", pki / f"{name}.pem", pki / f"{name}.key")


def _mtls_request(cse: AcmeCse, pki: Path, client: str, method: str, path: str, content: Any = None, *,
                  origin: str, ty: int | None = None) -> Resp:
    tls = _client(pki, client).connect(HOST, cse.secure_port, IN_CSE_ID, timeout=15)
    conn = OneM2MClient(tls, origin, host=f"{HOST}:{cse.secure_port}")
    try:
        r = conn.request(method, path, content, ty=ty)
    finally:
        conn.close()
    return Resp(r.status, r.rsc, r.body)


@pytest.fixture(scope="module")
def mtls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AcmeCse, Path]]:
    root = tmp_path_factory.mktemp("mtls")
    (root / "pki").mkdir()
    pki = make_pki(root / "pki",
                   {"cert1": f"//sp.example.com{IN_CSE_ID}/Ccert1", "cert2": f"//sp.example.com{IN_CSE_ID}/Ccert2",
                    "cert3": f"//sp.example.com{IN_CSE_ID}/Ccert3"},
                   rogue={"rogue": f"//sp.example.com{IN_CSE_ID}/Ccert1"})
    mef, target = new_mef(root / "mef")
    mef.start()
    cse = AcmeCse(root / "acme", "in-mtls")
    try:
        cse.install(mef, "--no-enrol", "--mef-psk-identity", target.psk_identity, "--mef-psk-file",
                    target.psk_file, "--cert-file", pki / "server.pem", "--key-file", pki / "server.key",
                    "--ca-file", pki / "ca.pem")
        cse.start()
        # the operator allows the certificate credentials of Ccert1 and Ccert3 (not Ccert2) in the plugin's rule
        r = cse.request("PUT", f"/{cse.cse_name}/rspf-enrolled",
                        {"m2m:asar": {"apci": ["33-Ccert1", "33-Ccert3"], "aae": ["Ccert1", "Ccert3"]}})
        assert r.rsc == 2004, str(r)
        yield cse, pki
    finally:
        cse.stop()
        mef.stop()


def test_ae_with_a_certificate_registers_over_mutual_tls(mtls: tuple[AcmeCse, Path]) -> None:
    cse, pki = mtls
    assert cse.rspf_value("caFile") is not None
    ae = SecureAE.with_certificate(cse.secure_uri, _client(pki, "cert1"), expected_peer=IN_CSE_ID)
    assert ae.ae_id == "Ccert1"  # named by the certificate
    with ae.session() as session:
        created = session.register("Ncert")
        assert created["m2m:ae"]["aei"] == "Ccert1"
        session.create_container("readings")
        assert session.retrieve("Ccert1/readings")["m2m:cnt"]["rn"] == "readings"
    assert cse.get("Ccert1").rsc == 2000


def test_rspf_ae_register_with_a_certificate(mtls: tuple[AcmeCse, Path], tmp_path: Path) -> None:
    cse, pki = mtls
    res = run_cli("ae", "register", "--cert", pki / "cert3.pem", "--key", pki / "cert3.key", "--ca", pki / "ca.pem",
                  "--registrar", cse.secure_uri, "--registrar-name", IN_CSE_ID, "--app-id", "Ncert",
                  "--container", "readings", cwd=tmp_path)
    assert res.rc == 0, str(res)
    assert f"registered <AE> Ccert3 (aei Ccert3) at {HOST}:{cse.secure_port}/{cse.cse_name} over mutual TLS" \
        in res.stdout, str(res)
    assert "created and retrieved <container> Ccert3/readings" in res.stdout
    assert cse.get("Ccert3/readings").rsc == 2000


def test_the_cse_must_carry_the_expected_name(mtls: tuple[AcmeCse, Path]) -> None:
    """The real CSE is refused when the AE expects another registrar: its certificate names /id-in."""
    cse, pki = mtls
    ae = SecureAE.with_certificate(cse.secure_uri, _client(pki, "cert1"), expected_peer="/id-other")
    with pytest.raises(TlsError, match="it names localhost, 127.0.0.1, //sp.example.com/id-in, not the expected "
                                       "/id-other; nothing was sent to it"):
        with ae.session():
            pass


def test_certificate_not_in_any_rule_is_4126(mtls: tuple[AcmeCse, Path]) -> None:
    cse, pki = mtls
    r = _mtls_request(cse, pki, "cert2", "POST", f"/{cse.cse_name}", ae_body("Ccert2", "Ncert"),
                      origin="Ccert2", ty=TY_AE)
    assert r.rsc == 4126, str(r)
    assert cse.get("Ccert2").rsc == 4004


def test_certificate_binds_the_originator(mtls: tuple[AcmeCse, Path]) -> None:
    cse, pki = mtls
    r = _mtls_request(cse, pki, "cert2", "POST", f"/{cse.cse_name}", ae_body("Cspoof", "Ncert"),
                      origin="Ccert1", ty=TY_AE)  # the certificate names Ccert2
    assert r.rsc == 4106, str(r)


def test_certificate_from_another_ca_is_refused(mtls: tuple[AcmeCse, Path]) -> None:
    """The CSE refuses the client certificate (in TLS 1.3 the client learns it on its first read)."""
    cse, pki = mtls
    with pytest.raises((OSError, RspfError)):
        _mtls_request(cse, pki, "rogue", "GET", f"/{cse.cse_name}", origin="Ccert1")


def test_no_certificate_and_no_psk_gets_no_service(mtls: tuple[AcmeCse, Path]) -> None:
    """A client with no credential at all (Python's ssl, trusting the CA, presenting nothing)."""
    cse, pki = mtls
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki / "ca.pem")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with ctx.wrap_socket(socket.create_connection((HOST, cse.secure_port), timeout=15),
                             server_hostname="localhost") as s:
            s.sendall(f"GET /{cse.cse_name} HTTP/1.1\r\nHost: x\r\nX-M2M-Origin: Ccert1\r\n\r\n".encode())
            if not s.recv(1):
                raise ConnectionError("closed without an answer")
