"""Mutual TLS on the CSE's secure listener (certFile/keyFile/caFile), with a real ACME IN-CSE.

A client certificate names an AE-ID (subjectAltName URI //sp/cse/ae); its Credential-ID is 33-<AE-ID>.
Certificates do not come from the MEF, so the operator lists them in a <serviceSubscribedAppRule>.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .acme_harness import HOST, IN_CSE_ID, TY_AE, AcmeCse, Resp, _rsc, ae_body, new_mef
from .pki import make_pki


def _mtls_request(cse: AcmeCse, pki: Path, client: str | None, method: str, path: str, content: Any = None, *,
                  origin: str, ty: int | None = None) -> Resp:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki / "ca.pem")
    if client:
        ctx.load_cert_chain(pki / f"{client}.pem", pki / f"{client}.key")
    conn = http.client.HTTPSConnection(HOST, cse.secure_port, context=ctx, timeout=15)
    conn.sock = ctx.wrap_socket(socket.create_connection((HOST, cse.secure_port), timeout=15),
                                server_hostname="localhost")
    headers = {"X-M2M-Origin": origin, "X-M2M-RI": "mtls", "X-M2M-RVI": "3", "Accept": "application/json"}
    body = None
    if content is not None:
        body = json.dumps(content).encode()
        headers["Content-Type"] = "application/json" + (f";ty={ty}" if ty else "")
    try:
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        return Resp(r.status, _rsc(r.getheader("X-M2M-RSC")), r.read())
    finally:
        conn.close()


@pytest.fixture(scope="module")
def mtls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AcmeCse, Path]]:
    root = tmp_path_factory.mktemp("mtls")
    (root / "pki").mkdir()
    pki = make_pki(root / "pki",
                   {"cert1": f"//sp.example.com{IN_CSE_ID}/Ccert1", "cert2": f"//sp.example.com{IN_CSE_ID}/Ccert2"},
                   rogue={"rogue": f"//sp.example.com{IN_CSE_ID}/Ccert1"})
    mef, target = new_mef(root / "mef")
    mef.start()
    cse = AcmeCse(root / "acme", "in-mtls")
    try:
        cse.install(mef, "--no-enrol", "--mef-psk-identity", target.psk_identity, "--mef-psk-file",
                    target.psk_file, "--cert-file", pki / "server.pem", "--key-file", pki / "server.key",
                    "--ca-file", pki / "ca.pem")
        cse.start()
        # the operator allows the certificate credential of Ccert1 (not Ccert2) in the plugin's rule
        r = cse.request("PUT", f"/{cse.cse_name}/rspf-enrolled",
                        {"m2m:asar": {"apci": ["33-Ccert1"], "aae": ["Ccert1"]}})
        assert r.rsc == 2004, str(r)
        yield cse, pki
    finally:
        cse.stop()
        mef.stop()


def test_ae_with_a_certificate_registers_over_mutual_tls(mtls: tuple[AcmeCse, Path]) -> None:
    cse, pki = mtls
    assert cse.rspf_value("caFile") is not None
    r = _mtls_request(cse, pki, "cert1", "POST", f"/{cse.cse_name}", ae_body("Ccert1", "Ncert"),
                      origin="Ccert1", ty=TY_AE)
    assert r.rsc == 2001, str(r)
    assert cse.get("Ccert1").rsc == 2000


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
    cse, pki = mtls
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _mtls_request(cse, pki, "rogue", "GET", f"/{cse.cse_name}", origin="Ccert1")


def test_no_certificate_and_no_psk_gets_no_service(mtls: tuple[AcmeCse, Path]) -> None:
    cse, pki = mtls
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
        _mtls_request(cse, pki, None, "GET", f"/{cse.cse_name}", origin="Ccert1")
