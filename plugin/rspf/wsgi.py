"""A small threaded WSGI server over TLS-PSK (and optionally certificates): the CSE's secure listener.

It serves any WSGI application (the ACME CSE's Flask app) and puts the credential that authenticated the
connection into every request's environ under ``rspf.credential``, so a handler knows who is talking.
The credential is established once per TLS connection by a ``resolve`` callback; keep-alive is supported.
"""

from __future__ import annotations

import io
import logging
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from . import wire
from .errors import BadRequest, RspfError, TlsError
from .tls import PskServer, TlsConnection

log = logging.getLogger(__name__)

ENVIRON_KEY = "rspf.credential"


@dataclass(frozen=True)
class PeerCredential:
    """Who authenticated a secure connection (no key material)."""

    kind: str                 # "psk" or "certificate"
    identity: str             # psk_identity (KeID / KpmID / ...) or certificate subject ID
    credential_id: str        # TS-0003 §10.4 Credential-ID, e.g. 12-<KeID>
    enrolee_id: str | None    # Enrolee-ID the MEF returned for this key, if any


Resolver = Callable[[TlsConnection], PeerCredential | None]


class SecureWsgiServer:
    def __init__(self, app: Any, psk: PskServer, resolve: Resolver, *, host: str, port: int,
                 max_body: int = 4 * 1024 * 1024, handshake_timeout: float = 10.0, idle_timeout: float = 60.0,
                 max_connections: int = 256, server_name: str = "rspf-secure") -> None:
        self.app = app
        self.psk = psk
        self.resolve = resolve
        self.host, self.port = host, port
        self.max_body = max_body
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.server_name = server_name
        self._slots = threading.BoundedSemaphore(max_connections)
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise RspfError(f"cannot listen on {self.host}:{self.port}: {exc.strerror}") from None
        sock.listen(512)
        sock.settimeout(0.5)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name="rspf-secure-accept", daemon=True)
        self._thread.start()
        log.info("secure listener on %s:%d (TLS-PSK and certificates)", self.host, self.port)

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(2)

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            if not self._slots.acquire(blocking=False):
                conn.close()
                continue
            threading.Thread(target=self._connection, args=(conn,), name="rspf-secure", daemon=True).start()
        self._sock.close()

    def _connection(self, sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(None)
            tls = self.psk.wrap(sock, self.handshake_timeout)
            try:
                tls.handshake()
            except TlsError as exc:
                log.info("secure listener: handshake from %s refused: %s", tls.peer, exc)
                return
            try:
                cred = self.resolve(tls)
                if cred is None:
                    log.info("secure listener: no usable credential from %s; closing", tls.peer)
                    return
                tls.set_timeout(self.idle_timeout)
                self._serve(tls, cred)
            finally:
                tls.close()
        except Exception:
            log.exception("secure listener: unexpected error on a connection")
        finally:
            self._slots.release()

    def _serve(self, tls: TlsConnection, cred: PeerCredential) -> None:
        reader = tls.makefile()
        while not self._stop.is_set():
            try:
                req = wire.read_request(reader, self.max_body)
            except BadRequest as exc:
                tls.sendall(wire.render_response(wire.error_response(exc, close=True)))
                return
            except (TimeoutError, ConnectionError):
                return
            if req is None:
                return
            status, headers, body = self._call_app(req, tls, cred)
            close = not req.keep_alive
            if close:
                headers["connection"] = "close"
            try:
                tls.sendall(wire.render_response(wire.HttpResponse(status, headers, body)))
            except (TimeoutError, ConnectionError):
                return
            if close:
                return

    def _environ(self, req: wire.HttpRequest, tls: TlsConnection, cred: PeerCredential) -> dict[str, Any]:
        path, _, query = req.target.partition("?")
        peer_host, _, peer_port = tls.peer.rpartition(":")
        env: dict[str, Any] = {
            "REQUEST_METHOD": req.method,
            "SCRIPT_NAME": "",
            "PATH_INFO": unquote(path, "latin-1"),
            "QUERY_STRING": query,
            "SERVER_NAME": self.host,
            "SERVER_PORT": str(self.port),
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": peer_host,
            "REMOTE_PORT": peer_port,
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "https",
            "wsgi.input": io.BytesIO(req.body),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "CONTENT_LENGTH": str(len(req.body)),
            ENVIRON_KEY: cred,
            "SSL_PROTOCOL": tls.version,
            "SSL_CIPHER": tls.cipher,
        }
        for k, v in req.headers.items():
            if k == "content-type":
                env["CONTENT_TYPE"] = v
            elif k in ("content-length", "transfer-encoding"):
                continue
            else:
                env["HTTP_" + k.upper().replace("-", "_")] = v
        return env

    def _call_app(self, req: wire.HttpRequest, tls: TlsConnection, cred: PeerCredential) -> tuple[int, dict, bytes]:
        env = self._environ(req, tls, cred)
        result: dict[str, Any] = {}

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable:
            result["status"] = int(status.split(" ", 1)[0])
            result["headers"] = {k.lower(): v for k, v in headers}
            return lambda data: None

        try:
            chunks: Iterable[bytes] = self.app(env, start_response)
            try:
                body = b"".join(chunks)
            finally:
                close = getattr(chunks, "close", None)
                if close:
                    close()
        except Exception:
            log.exception("secure listener: the application failed")
            return 500, {"x-m2m-rsc": "5000"}, b""
        headers = result.get("headers", {})
        headers.pop("content-length", None)
        headers.pop("transfer-encoding", None)
        headers.pop("connection", None)
        return result.get("status", 500), headers, body
