"""A small threaded WSGI server over TLS-PSK (and optionally certificates): the CSE's secure listener.

It serves any WSGI application (the ACME CSE's Flask app) and puts the credential that authenticated the
connection into every request's environ under ``rspf.credential``, so a handler knows who is talking.
The credential is established once per TLS connection by a ``resolve`` callback; keep-alive is supported.
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from . import wire
from .httpserver import TlsHttpServer
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


class SecureWsgiServer(TlsHttpServer):
    name = "secure-listener"

    def __init__(self, app: Any, psk: PskServer, resolve: Resolver, *, host: str, port: int,
                 max_body: int = 4 * 1024 * 1024, handshake_timeout: float = 10.0, idle_timeout: float = 60.0,
                 max_connections: int = 256) -> None:
        super().__init__(psk, host=host, port=port, max_body=max_body, handshake_timeout=handshake_timeout,
                         idle_timeout=idle_timeout, max_connections=max_connections)
        self.app = app
        self.resolve = resolve

    def start(self) -> None:
        self.start_background()
        log.info("secure listener on %s:%d (TLS-PSK and certificates)", self.host, self.port)

    def stop(self) -> None:
        self.shutdown(timeout=2.0)

    def open_session(self, tls: TlsConnection) -> PeerCredential | None:
        cred = self.resolve(tls)
        if cred is None:
            log.info("secure listener: no usable credential from %s; closing", tls.peer)
        return cred

    def respond(self, session: PeerCredential, tls: TlsConnection,
                req: wire.HttpRequest) -> tuple[wire.HttpResponse, bool]:
        status, headers, body = self._call_app(req, tls, session)
        return wire.HttpResponse(status, headers, body), False

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
