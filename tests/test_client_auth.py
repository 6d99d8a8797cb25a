"""Every client authenticates its server before it sends a byte (issue 6 item 1): impostor servers of each kind.

The TLS-PSK clients (the Enrolee to the MEF, the Enrolment Target to the MEF, an AE to its registrar) must
refuse a server with a certificate only (TLS 1.3), certificate suites only (TLS 1.2) and the right
psk_identity with a wrong key; the mutual-TLS client a chain from another CA, the right CA naming another
peer, and an expired certificate. Each family has a positive control: the same kind of server with the
right credential receives the request (and answers RSC 4103), so a refusal cannot pass vacuously.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from integration.impostors import RECORDED, CertServer, PskImpostor, TlsServer
from integration.pki import make_pki
from OpenSSL import SSL

from rspf import keys, tls
from rspf.ae import SecureAE
from rspf.enrolee import Enrolee, EnroleeConfig, Enrolment
from rspf.errors import RemoteError, TlsError
from rspf.secret import Secret
from rspf.target import fetch_credentials

MEF_FQDN = "mef.example.com"
KPM_ID = f"dev1@{MEF_FQDN}"
KPM = Secret(bytes(range(1, 33)), "Kpm")
WRONG = Secret(b"\x42" * 32, "wrong key")
TARGET_ID = "id-in@sp.example.com"
TARGET_PSK = Secret(bytes(range(100, 132)), "Target PSK")
KE_ID = f"{'00' * 16}@{MEF_FQDN}"
KE = Secret(bytes(range(16, 48)), "Ke")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"), {"ae": "//sp.example.com/id-in/Cae1"},
                    rogue={"rogue-ae": "//sp.example.com/id-in/Cae1"})


def psk_impostors(pki: Path, identity: str) -> dict[str, Callable[[], TlsServer]]:
    """The three kinds of server that must not get a PSK client's request."""
    return {
        "certificate only, TLS 1.3": lambda: CertServer(pki / "self-signed.pem", pki / "self-signed.key", "1.3"),
        "certificate suites only, TLS 1.2": lambda: CertServer(pki / "self-signed.pem", pki / "self-signed.key",
                                                               "1.2"),
        "right identity, wrong key, TLS 1.3": lambda: PskImpostor(identity, WRONG, "1.3"),
        "right identity, wrong key, TLS 1.2": lambda: PskImpostor(identity, WRONG, "1.2"),
    }


#: what the message says for each kind (a person must be able to tell what was wrong)
PSK_MESSAGES = {
    "certificate only, TLS 1.3": r"answered with a certificate \(subject CN=impostor\) instead of proving the "
                                 r"pre-shared key for psk_identity '{ident}': it is not the expected {peer}; "
                                 r"nothing was sent to it",
    "certificate suites only, TLS 1.2": r"refused the TLS-PSK handshake for psk_identity '{ident}' .*"
                                        r"offers no pre-shared-key cipher suite .*not proven to be {peer}",
    "right identity, wrong key, TLS 1.3": r"refused the TLS-PSK handshake for psk_identity '{ident}' .*"
                                          r"holds another key.*not proven to be {peer}",
    "right identity, wrong key, TLS 1.2": r"refused the TLS-PSK handshake for psk_identity '{ident}' .*"
                                          r"holds another key.*not proven to be {peer}",
}
KINDS = list(PSK_MESSAGES)


def refused(server: TlsServer, call: Callable[[], Any], ident: str, peer: str, kind: str) -> TlsError:
    """Run ``call`` against ``server``: it must raise TlsError with the kind's message, and the server must
    have seen a connection but no application data."""
    with server:
        with pytest.raises(TlsError) as info:
            call()
    assert server.connections == 1
    assert server.handshakes == 0
    assert server.received == b"", "the client sent application data to an impostor"
    msg = str(info.value)
    assert server.address in msg
    pattern = PSK_MESSAGES[kind].format(ident=re.escape(ident), peer=re.escape(peer))
    assert re.search(pattern, msg), msg
    return info.value


# ----------------------------------------------------------------------------------------- PskClient


@pytest.mark.parametrize("kind", KINDS)
def test_psk_client_refuses_impostor(pki: Path, kind: str) -> None:
    server = psk_impostors(pki, KPM_ID)[kind]()
    client = tls.PskClient()
    refused(server, lambda: client.connect("127.0.0.1", server.port, KPM_ID, KPM, server_name=MEF_FQDN),
            KPM_ID, MEF_FQDN, kind)


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_psk_client_control_the_right_key_is_accepted(version: str) -> None:
    with PskImpostor(KPM_ID, KPM, version) as server:
        conn = tls.PskClient().connect("127.0.0.1", server.port, KPM_ID, KPM, server_name=MEF_FQDN)
        try:
            assert conn.version == {"1.2": "TLSv1.2", "1.3": "TLSv1.3"}[version]
            assert conn.psk_identity == KPM_ID
            conn.sendall(b"GET / HTTP/1.1\r\n\r\n")
            assert conn.makefile().readline().startswith(b"HTTP/1.1 403")
        finally:
            conn.close()
    assert server.handshakes == 1 and server.received == b"GET / HTTP/1.1\r\n\r\n"


def test_psk_check_after_the_handshake_catches_a_certificate_session(pki: Path) -> None:
    """Second barrier: even if a server certificate were let through the verification step, a TLS 1.3
    session the external PSK did not authenticate is closed before anything is sent."""
    client = tls.PskClient()
    client.context.set_verify(SSL.VERIFY_NONE)  # switch off the first barrier
    server = CertServer(pki / "self-signed.pem", pki / "self-signed.key", "1.3")
    with server:
        with pytest.raises(TlsError) as info:
            client.connect("127.0.0.1", server.port, KPM_ID, KPM, server_name=MEF_FQDN)
    assert server.received == b""
    assert re.search(r"completed a TLSv1\.3 handshake \(.*\) without proving the pre-shared key for psk_identity "
                     rf"'{re.escape(KPM_ID)}': it is not the expected {MEF_FQDN}", str(info.value)), str(info.value)


def test_session_reused_tells_psk_from_certificate_sessions(pki: Path) -> None:
    """What the after-handshake check relies on: OpenSSL reports an external-PSK TLS 1.3 session as reused
    and a certificate one as not (a change in that meaning would open the second barrier)."""
    with PskImpostor(KPM_ID, KPM, "1.3") as server:
        conn = tls.PskClient().connect("127.0.0.1", server.port, KPM_ID, KPM)
        try:
            assert tls._psk_negotiated(conn._conn)
        finally:
            conn.close()
    client = tls.PskClient()
    client.context.set_verify(SSL.VERIFY_NONE)
    with CertServer(pki / "self-signed.pem", pki / "self-signed.key", "1.3") as server:
        sock = tls._open_client(client.context, "127.0.0.1", server.port, None, 10.0)
        try:
            sock.handshake()
            assert sock._conn.get_peer_certificate() is not None
            assert not tls._lib.SSL_session_reused(sock._conn._ssl)
            assert not tls._psk_negotiated(sock._conn)
        finally:
            sock.close()


# ------------------------------------------------------------------------------- Enrolee -> MEF (library)


def enrolee(tmp_path: Path, port: int) -> Enrolee:
    return Enrolee(EnroleeConfig(mef_host="127.0.0.1", mef_port=port, mef_fqdn=MEF_FQDN, kpm_id=KPM_ID, kpm=KPM,
                                 node_id="urn:dev:ops:001", store_path=tmp_path / "dev1.store", timeout=10.0))


@pytest.mark.parametrize("kind", KINDS)
def test_enrolee_refuses_impostor_mef_and_stores_nothing(pki: Path, tmp_path: Path, kind: str) -> None:
    server = psk_impostors(pki, KPM_ID)[kind]()
    refused(server, lambda: enrolee(tmp_path, server.port).enrol(), KPM_ID, MEF_FQDN, kind)
    assert not (tmp_path / "dev1.store").exists()


def test_enrolee_control_a_server_with_kpm_gets_the_request(tmp_path: Path) -> None:
    with PskImpostor(KPM_ID, KPM, "1.3") as server:
        with pytest.raises(RemoteError, match=RECORDED) as info:
            enrolee(tmp_path, server.port).enrol()
    assert info.value.remote_rsc == 4103
    assert server.received.startswith(b"POST /securityProfile HTTP/1.1\r\n")
    assert not (tmp_path / "dev1.store").exists()


# ---------------------------------------------------------------------- Enrolment Target -> MEF (library)


def fetch(port: int) -> Any:
    return fetch_credentials("127.0.0.1", port, MEF_FQDN, TARGET_ID, TARGET_PSK, "/id-in", KE_ID, 22, timeout=10.0)


@pytest.mark.parametrize("kind", KINDS)
def test_target_refuses_impostor_mef_and_sends_no_request(pki: Path, kind: str) -> None:
    server = psk_impostors(pki, TARGET_ID)[kind]()
    refused(server, lambda: fetch(server.port), TARGET_ID, MEF_FQDN, kind)


def test_target_control_a_server_with_the_target_psk_gets_the_request() -> None:
    with PskImpostor(TARGET_ID, TARGET_PSK, "1.2") as server:
        with pytest.raises(RemoteError, match=RECORDED):
            fetch(server.port)
    assert server.received.startswith(f"GET /fetchCredentials/{KE_ID}/22 HTTP/1.1\r\n".encode())


# -------------------------------------------------------------------------- AE -> registrar over TLS-PSK


def ae_enrolment(make_profile: Any, port: int) -> Enrolment:
    prof = make_profile(KE, KE_ID, enroleeType="AE", enroleeID="Cae1")
    prof["registrar"]["cseBaseURI"] = f"https://127.0.0.1:{port}/cse-in"
    return Enrolment(KE_ID, KE, prof)


@pytest.mark.parametrize("kind", KINDS)
def test_secure_ae_refuses_impostor_registrar(pki: Path, make_profile: Any, kind: str) -> None:
    server = psk_impostors(pki, KE_ID)[kind]()
    ae = SecureAE.from_enrolment(ae_enrolment(make_profile, server.port))

    def register() -> None:
        with ae.session() as cse:
            cse.register("Nmy-app")

    refused(server, register, KE_ID, "127.0.0.1", kind)


def test_secure_ae_control_the_registrar_with_the_key_gets_the_registration(make_profile: Any) -> None:
    registrar_key = keys.derive_usage_constrained_key(KE, keys.SUID_RSPF_SAEF, "id-in.sp.example.com")
    with PskImpostor(KE_ID, registrar_key, "1.3") as server:
        ae = SecureAE.from_enrolment(ae_enrolment(make_profile, server.port))
        assert (ae.ae_id, ae.security) == ("Cae1", "TLS-PSK")
        with pytest.raises(RemoteError, match=RECORDED):
            with ae.session() as cse:
                cse.register("Nmy-app")
    assert server.received.startswith(b"POST /cse-in HTTP/1.1\r\n")
    assert b"Cae1" in server.received


# ---------------------------------------------------------------------------------- CertClient (mutual TLS)


def cert_client(pki: Path, name: str = "ae") -> tls.CertClient:
    return tls.CertClient(pki / "ca.pem", pki / f"{name}.pem", pki / f"{name}.key")


CERT_IMPOSTORS = {
    "chain from another CA": ("server-other-ca", r"presented a certificate \(subject CN=localhost, chain depth \d\) "
                                                 r"that does not verify to the trust anchor .*ca\.pem: "
                                                 r"unable to get local issuer certificate\. It is not proven to be "),
    "right CA, another peer name": ("server-other-name", r"has a certificate from the trust anchor, but it names "
                                                         r"other\.example\.com, //sp\.example\.com/id-other, not the "
                                                         r"expected "),
    "expired certificate": ("server-expired", r"presented a certificate \(subject CN=localhost, chain depth 0\) that "
                                              r"does not verify to the trust anchor .*ca\.pem: certificate has "
                                              r"expired\. It is not proven to be "),
}


@pytest.mark.parametrize("version", ["1.2", "1.3"])
@pytest.mark.parametrize("kind", list(CERT_IMPOSTORS))
@pytest.mark.parametrize("expected", ["/id-in", "localhost", "127.0.0.1", "//sp.example.com/id-in"])
def test_cert_client_refuses_impostor(pki: Path, kind: str, version: str, expected: str) -> None:
    name, pattern = CERT_IMPOSTORS[kind]
    server = CertServer(pki / f"{name}.pem", pki / f"{name}.key", version, client_ca=pki / "ca.pem")
    with server:
        with pytest.raises(TlsError) as info:
            cert_client(pki).connect("127.0.0.1", server.port, expected)
    assert server.connections == 1 and server.received == b""
    msg = str(info.value)
    assert re.search(pattern + re.escape(expected), msg), msg
    assert msg.endswith("nothing was sent to it")


@pytest.mark.parametrize("version", ["1.2", "1.3"])
@pytest.mark.parametrize("expected", ["/id-in", "localhost", "LOCALHOST", "127.0.0.1", "//sp.example.com/id-in", None])
def test_cert_client_control_the_real_server_is_accepted(pki: Path, version: str, expected: str | None) -> None:
    with CertServer(pki / "server.pem", pki / "server.key", version, client_ca=pki / "ca.pem") as server:
        conn = cert_client(pki).connect("127.0.0.1", server.port, expected)
        try:
            conn.sendall(b"GET / HTTP/1.1\r\n\r\n")
            assert conn.makefile().readline().startswith(b"HTTP/1.1 403")
        finally:
            conn.close()
    assert server.handshakes == 1 and server.received == b"GET / HTTP/1.1\r\n\r\n"


def test_cert_client_does_not_trust_the_system_store(pki: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trust anchor is the only one: with OpenSSL's default store pointed at the test CA (SSL_CERT_FILE),
    a client anchored elsewhere still refuses the test CA's server; the control shows that a context that did
    load the default store would have accepted it."""
    monkeypatch.setenv("SSL_CERT_FILE", str(pki / "ca.pem"))
    def client() -> tls.CertClient:
        return tls.CertClient(pki / "self-signed.pem", pki / "ae.pem", pki / "ae.key")

    with CertServer(pki / "server.pem", pki / "server.key", "1.3") as server:
        with pytest.raises(TlsError, match="does not verify to the trust anchor .*self-signed.pem"):
            client().connect("127.0.0.1", server.port, "localhost")
        trusting = client()
        trusting.context.set_default_verify_paths()  # control: what trusting the default store would do
        trusting.connect("127.0.0.1", server.port, "localhost").close()
    assert server.handshakes == 1


def test_cert_client_own_id_and_unusable_files(pki: Path, tmp_path: Path) -> None:
    assert cert_client(pki).own_id == "Cae1"
    with pytest.raises(TlsError, match="cannot use the certificate files"):
        tls.CertClient(pki / "ca.pem", pki / "ae.pem", pki / "server.key")  # key of another certificate
    with pytest.raises(TlsError, match="cannot use the certificate"):
        tls.CertClient(pki / "ca.pem", tmp_path / "missing.pem", pki / "ae.key")


@pytest.mark.parametrize(("expected", "named"), [
    ("localhost", True), ("LocalHost.", True), ("127.0.0.1", True), ("/id-in", True),
    ("//sp.example.com/id-in", True), ("other.example.com", False), ("127.0.0.2", False), ("::1", False),
    ("/id-other", False), ("//sp.other.com/id-in", False), ("id-in", False), ("*.example.com", False),
])
def test_certificate_names_each_form(pki: Path, expected: str, named: bool) -> None:
    cert = x509.load_pem_x509_certificate((pki / "server.pem").read_bytes())
    assert tls.certificate_names(cert, expected) is named


# -------------------------------------------------------------------------------- AE -> registrar over mTLS


@pytest.mark.parametrize("kind", list(CERT_IMPOSTORS))
def test_secure_ae_with_certificate_refuses_impostor_registrar(pki: Path, kind: str) -> None:
    name, pattern = CERT_IMPOSTORS[kind]
    with CertServer(pki / f"{name}.pem", pki / f"{name}.key", "1.3", client_ca=pki / "ca.pem") as server:
        ae = SecureAE.with_certificate(f"https://127.0.0.1:{server.port}/cse-in", cert_client(pki),
                                       expected_peer="/id-in")
        with pytest.raises(TlsError) as info:
            with ae.session() as cse:
                cse.register("Nmy-app")
    assert server.received == b""
    assert re.search(pattern + "/id-in", str(info.value)), str(info.value)


def test_secure_ae_with_certificate_control(pki: Path) -> None:
    with CertServer(pki / "server.pem", pki / "server.key", "1.3", client_ca=pki / "ca.pem") as server:
        ae = SecureAE.with_certificate(f"https://127.0.0.1:{server.port}/cse-in", cert_client(pki),
                                       expected_peer="/id-in")
        assert (ae.ae_id, ae.security) == ("Cae1", "mutual TLS")
        with pytest.raises(RemoteError, match=RECORDED):
            with ae.session() as cse:
                cse.register("Nmy-app")
    assert server.received.startswith(b"POST /cse-in HTTP/1.1\r\n")


def test_registrar_uri_must_be_https(pki: Path) -> None:
    from rspf.errors import BadRequest
    with pytest.raises(BadRequest, match="must be https://host:port/<CSEBase>"):
        SecureAE.with_certificate("http://127.0.0.1:1/cse-in", cert_client(pki))


def test_texts_never_contain_a_key(pki: Path, tmp_path: Path) -> None:
    server = PskImpostor(KPM_ID, WRONG, "1.3")
    with server:
        with pytest.raises(TlsError) as info:
            enrolee(tmp_path, server.port).enrol()
    for secret in (KPM, WRONG):
        for form in (secret.reveal().hex(), base64.b64encode(secret.reveal()).decode()):
            assert form not in str(info.value) and form not in repr(info.value)
