"""Mutual TLS on the secure listener's context: certificates next to TLS-PSK (rspf.tls.PskServer.use_certificates).

The client side is Python's own ``ssl`` module: an independent TLS implementation of the certificate path.
"""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest
from integration.pki import make_pki
from OpenSSL import SSL

from rspf import tls
from rspf.errors import TlsError
from rspf.secret import Secret
from rspf.tls import PskClient, PskServer

PSK = Secret(bytes(range(32)), "test psk")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = make_pki(tmp_path_factory.mktemp("pki"),
                 {"ae": "//sp.example.com/id-in/Ccert1", "cse": "//sp.example.com/id-mn"},
                 rogue={"rogue": "//sp.example.com/id-in/Ccert1"})
    return {"dir": d}


class _Server:
    """One-shot-per-connection server thread recording what each handshake proved."""

    def __init__(self, psk: PskServer) -> None:
        self.psk = psk
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.results: list[tuple[str | None, str | None, str | None]] = []

    def serve_one(self) -> threading.Thread:
        def run() -> None:
            conn, _ = self.sock.accept()
            tls = self.psk.wrap(conn, 5)
            try:
                tls.handshake()
                self.results.append((tls.psk_identity, tls.peer_certificate_id(), None))
                buf = bytearray(16)
                n = tls.recv_into(buf)
                tls.sendall(bytes(buf[:n]))
            except TlsError as exc:
                self.results.append((None, None, str(exc)))
            finally:
                tls.close()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t


@pytest.fixture()
def server(pki: dict[str, Path]):
    d = pki["dir"]
    psk = PskServer(lambda ident, peer_ip: PSK if ident == "dev@mef.example.com" else None)
    psk.use_certificates(d / "server.pem", d / "server.key", d / "ca.pem")
    s = _Server(psk)
    yield s
    s.sock.close()


def _cert_client(d: Path, name: str | None, port: int, version: ssl.TLSVersion) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = version
    ctx.load_verify_locations(d / "ca.pem")
    if name:
        ctx.load_cert_chain(d / f"{name}.pem", d / f"{name}.key")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(b"ping")
            return s.recv(16)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_ae_certificate_names_its_ae_id(server: _Server, pki: dict[str, Path], version: ssl.TLSVersion) -> None:
    t = server.serve_one()
    assert _cert_client(pki["dir"], "ae", server.port, version) == b"ping"
    t.join(5)
    assert server.results == [(None, "Ccert1", None)]


def test_cse_certificate_names_its_cse_id(server: _Server, pki: dict[str, Path]) -> None:
    t = server.serve_one()
    assert _cert_client(pki["dir"], "cse", server.port, ssl.TLSVersion.TLSv1_3) == b"ping"
    t.join(5)
    assert server.results == [(None, "/id-mn", None)]


def test_certificate_from_another_ca_is_refused(server: _Server, pki: dict[str, Path]) -> None:
    t = server.serve_one()
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _cert_client(pki["dir"], "rogue", server.port, ssl.TLSVersion.TLSv1_2)
    t.join(5)
    assert len(server.results) == 1 and server.results[0][2] is not None  # the server refused the handshake


def test_no_client_certificate_gives_no_credential(server: _Server, pki: dict[str, Path]) -> None:
    t = server.serve_one()
    assert _cert_client(pki["dir"], None, server.port, ssl.TLSVersion.TLSv1_3) == b"ping"
    t.join(5)
    assert server.results == [(None, None, None)]  # handshake done, but nothing authenticated the client


def test_psk_still_works_on_the_same_context(server: _Server) -> None:
    t = server.serve_one()
    tls = PskClient(min_version="1.2", max_version="1.2").connect("127.0.0.1", server.port, "dev@mef.example.com",
                                                                 PSK, server_name="localhost")
    try:
        tls.sendall(b"psk")
        buf = bytearray(8)
        assert bytes(buf[: tls.recv_into(buf)]) == b"psk"
        assert "PSK" in tls.cipher
    finally:
        tls.close()
    t.join(5)
    assert server.results == [("dev@mef.example.com", None, None)]


def test_unusable_certificate_files_are_a_clear_error(tmp_path: Path, pki: dict[str, Path]) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    psk = PskServer(lambda ident, peer_ip: None)
    with pytest.raises(TlsError, match="certificate files"):
        psk.use_certificates(bad, bad, None)


# --------------------------------------------- the ClientHello chooses the context (TLS 1.3 PSK next to certificates)


def _client_hello(client: PskClient | tls.CertClient, cred: tuple[str, Secret] | None = None) -> bytes:
    """The ClientHello records ``client`` sends first (memory BIOs, no network). The client object must live on
    while its context is used: it holds the context's PSK callback."""
    conn = SSL.Connection(client.context, None)
    conn._rspf_client_cred = cred  # type: ignore[attr-defined]
    conn.set_connect_state()
    with pytest.raises(SSL.WantReadError):
        conn.do_handshake()
    return conn.bio_read(65536)


def test_a_tls13_psk_client_hello_is_told_from_a_certificate_one(pki: dict[str, Path]) -> None:
    d = pki["dir"]
    psk13 = _client_hello(PskClient(), ("dev@mef.example.com", PSK))
    psk12 = _client_hello(PskClient(max_version="1.2"), ("dev@mef.example.com", PSK))
    cert = _client_hello(tls.CertClient(d / "ca.pem", d / "ae.pem", d / "ae.key"))
    assert tls.offers_tls13_psk(psk13) is True
    assert tls.offers_tls13_psk(psk12) is False  # TLS 1.2 PSK suites: the certificate context does them too
    assert tls.offers_tls13_psk(cert) is False
    assert tls.offers_tls13_psk(psk13[:3]) is None and tls.offers_tls13_psk(psk13[:-1]) is None  # incomplete
    body = psk13[5:]  # the same ClientHello split over two records
    split = b"".join(psk13[:3] + len(part).to_bytes(2, "big") + part for part in (body[:40], body[40:]))
    assert tls.offers_tls13_psk(split[:50]) is None and tls.offers_tls13_psk(split) is True
    assert tls.offers_tls13_psk(b"\x17\x03\x03\x00\x01x") is False  # not a handshake record
    assert tls.offers_tls13_psk(b"GET / HTTP/1.1\r\n\r\n") is False


def _accept_one(psk: PskServer, sock: socket.socket, results: list) -> None:
    """The event-driven server's way (PskServer.accept, memory BIOs), pumped over a blocking socket."""
    conn, peer = sock.accept()
    server_tls = psk.accept(peer)
    try:
        done = False
        while not done:
            data = conn.recv(65536)
            if not data:
                results.append("closed")
                return
            server_tls.feed(data)
            try:
                done = server_tls.handshake_step()
            finally:
                conn.sendall(server_tls.outgoing())
        results.append((server_tls.psk_identity, server_tls.peer_certificate_id(), server_tls.version))
    except TlsError as exc:
        results.append(str(exc))
    finally:
        conn.close()


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_psk_clients_keep_their_psk_next_to_certificates(pki: dict[str, Path], version: str) -> None:
    d = pki["dir"]
    psk = PskServer(lambda ident, peer_ip: PSK if ident == "dev@mef.example.com" else None)
    psk.use_certificates(d / "server.pem", d / "server.key", d / "ca.pem")
    for client in ("psk", "cert"):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            results: list = []
            t = threading.Thread(target=_accept_one, args=(psk, sock, results), daemon=True)
            t.start()
            if client == "psk":
                PskClient(max_version=version).connect("127.0.0.1", sock.getsockname()[1], "dev@mef.example.com",
                                                       PSK, server_name="localhost", timeout=5).close()
            else:
                tls.CertClient(d / "ca.pem", d / "ae.pem", d / "ae.key", max_version=version).connect(
                    "127.0.0.1", sock.getsockname()[1], "localhost", timeout=5).close()
            t.join(5)
        expected = ("dev@mef.example.com", None) if client == "psk" else (None, "Ccert1")
        assert results == [(*expected, f"TLSv{version}")]


def test_a_foreign_client_certificate_is_refused_with_its_subject_and_reason(pki: dict[str, Path]) -> None:
    d = pki["dir"]
    psk = PskServer(lambda ident, peer_ip: None)
    psk.use_certificates(d / "server.pem", d / "server.key", d / "ca.pem")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        results: list = []
        t = threading.Thread(target=_accept_one, args=(psk, sock, results), daemon=True)
        t.start()
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _cert_client(d, "rogue", sock.getsockname()[1], ssl.TLSVersion.TLSv1_2)
        t.join(5)
    assert len(results) == 1 and "client certificate (subject CN=rogue, chain depth 0)" in results[0], results
    assert "does not verify to the trust anchor: unable to get local issuer certificate" in results[0]
