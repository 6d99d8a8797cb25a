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
