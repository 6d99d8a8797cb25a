"""Servers that lie about who they are, for the client-authentication tests (unit and integration).

Each server listens on a free 127.0.0.1 port, runs in one thread started and stopped by the test (``with``),
and handles connections one after another. After a completed handshake it records the application data it
receives (:attr:`TlsServer.received`) and answers any request with a fixed oneM2M error (RSC 4103, text
:data:`RECORDED`): a client that reached it reports ``RemoteError(4103)``. The same servers with the right
credential are the positive controls, so a test of a refusal cannot pass because nothing was ever sent.

* :class:`CertServer` -- Python's ``ssl`` module: a certificate server, TLS 1.3 or TLS 1.2 with certificate
  suites only; with ``client_ca`` it asks for a client certificate from that CA (mutual TLS).
* :class:`PskImpostor` -- pyOpenSSL with the project's PSK server context: the given psk_identity with the
  given key (a wrong key makes the impostor; the right key the control).
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
from pathlib import Path
from typing import Any

from OpenSSL import SSL

from rspf.secret import Secret
from rspf.tls import PskServer

HANDSHAKE_TIMEOUT = 10.0
RECORDED = "recorded by the test server"
ANSWER = (b"HTTP/1.1 403 Forbidden\r\nX-M2M-RSC: 4103\r\nX-M2M-RI: test\r\nContent-Type: application/json\r\n"
          b"Connection: close\r\nContent-Length: %d\r\n\r\n%s")
TLS12_CERT_SUITES = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES128-SHA256:ECDHE-RSA-AES128-GCM-SHA256"


def _answer() -> bytes:
    body = b'{"m2m:dbg":"%s"}' % RECORDED.encode()
    return ANSWER % (len(body), body)


class TlsServer:
    """Accept loop on 127.0.0.1:<free port>; subclasses run the handshake in :meth:`_handshake`."""

    def __init__(self) -> None:
        self._lsock = socket.create_server(("127.0.0.1", 0))
        self._lsock.settimeout(0.1)  # lets the loop see the stop flag; no test waits on it
        self.port = self._lsock.getsockname()[1]
        self.connections = 0
        self.handshakes = 0
        self.received = b""
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=type(self).__name__, daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> TlsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(HANDSHAKE_TIMEOUT + 5)
        self._lsock.close()
        assert not self._thread.is_alive(), f"{type(self).__name__} did not stop"

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            sock.settimeout(None)  # blocking, as pyOpenSSL needs; the kernel bounds each wait instead
            tv = struct.pack("ll", int(HANDSHAKE_TIMEOUT), 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
            try:
                self._serve(sock)
            except Exception as exc:  # the client refused us: that is what most tests expect
                self.failures.append(f"{type(exc).__name__}: {exc}")
            finally:
                sock.close()

    def _serve(self, sock: socket.socket) -> None:
        conn = self._handshake(sock)
        self.handshakes += 1
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = conn.recv(65536)
            if not chunk:
                break
            request += chunk
            self.received += chunk
        if request:
            conn.sendall(_answer())

    def _handshake(self, sock: socket.socket) -> Any:
        raise NotImplementedError


class CertServer(TlsServer):
    """A certificate-authenticated server (Python's ``ssl``): ``version`` "1.3", or "1.2" with certificate
    suites only; ``client_ca`` asks for (and requires) a client certificate from that CA."""

    def __init__(self, cert: Path, key: Path, version: str = "1.3", *, client_ca: Path | None = None) -> None:
        super().__init__()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        v = ssl.TLSVersion.TLSv1_3 if version == "1.3" else ssl.TLSVersion.TLSv1_2
        ctx.minimum_version = ctx.maximum_version = v
        if version == "1.2":
            ctx.set_ciphers(TLS12_CERT_SUITES)
        ctx.load_cert_chain(cert, key)
        if client_ca is not None:
            ctx.load_verify_locations(client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        self._ctx = ctx

    def _handshake(self, sock: socket.socket) -> Any:
        return self._ctx.wrap_socket(sock, server_side=True)


class PskImpostor(TlsServer):
    """A TLS-PSK server that knows ``identity`` (None: any identity) with ``key`` (TLS ``version`` "1.2" or
    "1.3")."""

    def __init__(self, identity: str | None, key: Secret, version: str = "1.3") -> None:
        super().__init__()
        # ``*_`` accepts whatever else the server context passes to its lookup (e.g. the peer address)
        self._psk = PskServer(lambda ident, *_: key if identity in (None, ident) else None,
                              min_version=version, max_version=version)

    def _handshake(self, sock: socket.socket) -> Any:
        conn = SSL.Connection(self._psk.context, sock)
        conn.set_accept_state()
        conn.do_handshake()
        return _PyOpenSSLStream(conn)


class _PyOpenSSLStream:
    def __init__(self, conn: SSL.Connection) -> None:
        self._conn = conn

    def recv(self, n: int) -> bytes:
        try:
            return self._conn.recv(n)
        except (SSL.ZeroReturnError, SSL.SysCallError):
            return b""

    def sendall(self, data: bytes) -> None:
        self._conn.sendall(data)
