"""Interoperability with an independent TLS-PSK client: ``openssl s_client`` against the real MEF.

openssl derives EXPORTER-oneM2M-Bootstrap itself (-keymatexport) and, on that same session, POSTs
/securityProfile. The profile the MEF returns must name KeID = hex(first 16 bytes)@MEF-FQDN and carry the
registrar key HMAC-derived from the last 32 bytes (Ke), i.e. both ends computed the same exporter output.
The other way round, ``rspf enrol`` refuses an ``openssl s_server`` that has a certificate and no PSK.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import socket
import subprocess
import time
from pathlib import Path

import pytest

from rspf import keys
from rspf.secret import Secret

from .pki import make_pki
from .support import FQDN, HOST, EnroleeInfo, MefHome, free_port, read_hex, stop_process

KEYING_RE = re.compile(r"Keying material:\s*([0-9A-Fa-f]+)")
VERSIONS = {"1.2": ["-tls1_2", "-cipher", "PSK-AES128-CBC-SHA256"], "1.3": ["-tls1_3"]}


def sp_request(enrolee: EnroleeInfo) -> bytes:
    body = json.dumps({"rspf:spReq": {"nodeID": enrolee.node_id}}).encode()
    head = (f"POST /securityProfile HTTP/1.1\r\nHost: {FQDN}\r\nX-M2M-Origin: {enrolee.kpm_id}\r\n"
            f"X-M2M-RI: openssl-1\r\nX-M2M-RVI: 3\r\nContent-Type: application/json\r\nAccept: application/json\r\n"
            f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def s_client(openssl_bin: str, mef: MefHome, enrolee: EnroleeInfo, version: str, psk_hex: str,
             ) -> subprocess.CompletedProcess:
    argv = [openssl_bin, "s_client", "-connect", f"{HOST}:{mef.port}", "-psk", psk_hex,
            "-psk_identity", enrolee.kpm_id, *VERSIONS[version],
            "-keymatexport", keys.EXPORTER_LABEL_BOOTSTRAP, "-keymatexportlen", str(keys.EXPORTER_LENGTH),
            "-servername", FQDN, "-ign_eof"]
    return subprocess.run(argv, input=sp_request(enrolee), capture_output=True, timeout=30)


def http_response(out: bytes) -> tuple[int, dict[str, str], bytes]:
    start = out.find(b"HTTP/1.1 ")
    assert start >= 0, f"no HTTP response in the openssl output:\n{out.decode(errors='replace')}"
    end = out.index(b"\r\n\r\n", start)
    lines = out[start:end].decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    n = int(headers["content-length"])
    body = out[end + 4:end + 4 + n]
    assert len(body) == n
    return int(lines[0].split(" ")[1]), headers, body


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_openssl_s_client_enrols_and_agrees_on_the_exporter(openssl_bin: str, module_mef: MefHome,
                                                          version: str) -> None:
    mef = module_mef
    enrolee = mef.add_enrolee(f"ossl{version.replace('.', '')}")
    proc = s_client(openssl_bin, mef, enrolee, version, enrolee.kpm_hex)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    proto = {"1.2": b"TLSv1.2", "1.3": b"TLSv1.3"}[version]
    assert proto in out
    if version == "1.2":
        assert b"PSK-AES128-CBC-SHA256" in out

    found = KEYING_RE.findall(out.decode(errors="replace"))
    assert len(found) == 1, out.decode(errors="replace")
    exported = bytes.fromhex(found[0])
    assert len(exported) == 48
    relative_ke_id, ke = exported[:16], Secret(exported[16:], "Ke")

    status, headers, body = http_response(out)
    assert (status, headers.get("x-m2m-rsc"), headers.get("x-m2m-ri")) == (201, "2001", "openssl-1")
    prof = json.loads(body)["rspf:secp"]
    assert prof["credential"]["keyID"] == f"{relative_ke_id.hex()}@{FQDN}"
    assert prof["credential"]["suid"] == 22
    expected = keys.derive_usage_constrained_key(ke, 22, "id-in.sp.example.com").reveal()
    assert base64.b64decode(prof["credential"]["key"]) == expected

    # the MEF stored that Ke under that KeID: the registrar Target gets the same key
    out_file = mef.root / f"ossl-{version}.hex"
    res = mef.fetch(mef.targets["in"], prof["credential"]["keyID"], key_out=out_file)
    assert res.rc == 0, str(res)
    assert bytes.fromhex(read_hex(out_file)) == expected
    assert mef.show(enrolee.kpm_id)["lastEnrolled"] is not None


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_openssl_s_client_with_a_wrong_key_fails(openssl_bin: str, module_mef: MefHome, version: str) -> None:
    mef = module_mef
    enrolee = mef.add_enrolee(f"osslbad{version.replace('.', '')}")
    proc = s_client(openssl_bin, mef, enrolee, version, secrets.token_hex(32))
    assert proc.returncode != 0
    assert b"HTTP/1.1" not in proc.stdout  # (openssl may still print its own, useless, keying material)
    assert b"alert" in proc.stderr, proc.stderr.decode(errors="replace")
    assert mef.show(enrolee.kpm_id)["lastEnrolled"] is None


def test_openssl_s_client_unknown_identity_fails(openssl_bin: str, module_mef: MefHome) -> None:
    mef = module_mef
    ghost = EnroleeInfo(f"ghost@{FQDN}", mef.root / "none", "/id-ghost", "urn:ghost", mef.root / "none.store")
    proc = s_client(openssl_bin, mef, ghost, "1.2", secrets.token_hex(32))
    assert proc.returncode != 0
    assert b"HTTP/1.1" not in proc.stdout


def test_tls_min_version_is_enforced(openssl_bin: str, mef_home: MefHome) -> None:
    mef_home.set_config("tls_min_version", '"1.3"')
    mef_home.start()
    dev1 = mef_home.enrolees["dev1"]
    old = s_client(openssl_bin, mef_home, dev1, "1.2", dev1.kpm_hex)
    assert old.returncode != 0 and b"HTTP/1.1" not in old.stdout
    assert mef_home.show(dev1.kpm_id)["lastEnrolled"] is None
    new = s_client(openssl_bin, mef_home, dev1, "1.3", dev1.kpm_hex)
    assert new.returncode == 0, new.stderr.decode(errors="replace")
    assert http_response(new.stdout)[0] == 201


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_rspf_enrol_refuses_an_openssl_s_server_with_a_certificate_and_no_psk(
        openssl_bin: str, module_mef: MefHome, tmp_path: Path, version: str) -> None:
    """An independent TLS server that has only a certificate (self-signed) and knows no Kpm: the Enrolee
    must not complete the handshake, send its request or store anything."""
    pki = make_pki(tmp_path, {})
    port = free_port()
    out = tmp_path / "s_server.out"
    with open(out, "wb") as sink:
        server = subprocess.Popen([openssl_bin, "s_server", "-accept", f"{HOST}:{port}", "-cert",
                                   str(pki / "self-signed.pem"), "-key", str(pki / "self-signed.key"),
                                   {"1.2": "-tls1_2", "1.3": "-tls1_3"}[version]],
                                  stdin=subprocess.PIPE, stdout=sink, stderr=subprocess.STDOUT)
    try:
        _wait_listening(server, port)
        dev = module_mef.enrolees["dev1"]
        store = tmp_path / "dev1.store"
        res = module_mef.cli("enrol", "--mef", f"{HOST}:{port}", "--mef-fqdn", FQDN, "--kpm-id", dev.kpm_id,
                             "--kpm-file", dev.kpm_file, "--node-id", dev.node_id, "--store", store)
    finally:
        stop_process(server)
    assert res.rc == 1, str(res)
    expected = {"1.3": "answered with a certificate (subject CN=impostor) instead of proving the pre-shared key",
                "1.2": "refused the TLS-PSK handshake"}[version]
    assert f"error: the server at {HOST}:{port} {expected} for psk_identity '{dev.kpm_id}'" in res.stderr, str(res)
    assert "nothing was sent to it" in res.stderr
    assert not store.exists()
    assert b"securityProfile" not in out.read_bytes()


def _wait_listening(proc: subprocess.Popen, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "openssl s_server exited"
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"openssl s_server did not listen on {port} within {timeout:g} s")
