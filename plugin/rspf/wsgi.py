"""The CSE's secure listener: a WSGI server on the event-driven TLS transport (rspf.httpserver).

It serves any WSGI application (the ACME CSE's Flask app) and puts the credential that authenticated the
connection into every request's environ under ``rspf.credential``, so a handler knows who is talking.
The credential is established once per TLS connection by a ``resolve`` callback (in a handshake pool thread,
so it may block); keep-alive is supported. The application runs in the server's worker threads.
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
from .httpserver import ServerLimits, TlsHttpServer
from .tls import PskServer, ServerTls, TlsPeer

log = logging.getLogger(__name__)

ENVIRON_KEY = "rspf.credential"


@dataclass(frozen=True)
class PeerCredential:
    """Who authenticated a secure connection (no key material)."""

    kind: str                 # "psk" or "certificate"
    identity: str             # psk_identity (KeID / KpmID / ...) or certificate subject ID
    credential_id: str        # TS-0003 §10.4 Credential-ID, e.g. 12-<KeID>
    enrolee_id: str | None    # Enrolee-ID the MEF returned for this key, if any
    not_after: float | None = None  # POSIX time the credential expires (its connections are closed then)
    #: provisioned by the MEF (a key it derived, or a certificate its CA issued): recorded in rules, revocable
    provisioned: bool = False
    fingerprint: str | None = None  # a certificate's SHA-256 (rspf.est.fingerprint)
    app_ids: tuple[str, ...] | None = None  # a MEF-issued certificate's App-ID (None: it binds none)


Resolver = Callable[[TlsPeer], PeerCredential | None]


@dataclass(frozen=True)
class _Session:
    credential: PeerCredential
    environ: dict[str, Any]   # the per-connection part of every request's environ


class SecureWsgiServer(TlsHttpServer):
    name = "secure-listener"

    def __init__(self, app: Any, psk: PskServer, resolve: Resolver, *, host: str, port: int,
                 limits: ServerLimits = ServerLimits()) -> None:
        super().__init__(psk, host=host, port=port, limits=limits)
        self.app = app
        self.resolve = resolve

    def start(self) -> None:
        self.start_background()
        log.info("secure listener on %s:%d (TLS-PSK and certificates)", self.host, self.port)

    def stop(self) -> None:
        self.shutdown(timeout=self.limits.stop_grace + 1.0)

    def close_credentials(self, predicate: Callable[[str | None, PeerCredential | None], bool]) -> int:
        """Close the connections for which ``predicate(psk_identity, credential)`` is true (``credential`` is
        None until a connection's first request); see :meth:`TlsHttpServer.close_where`."""
        return self.close_where(lambda tls, session: predicate(
            tls.psk_identity, session.credential if isinstance(session, _Session) else None))

    def open_session(self, tls: ServerTls) -> _Session | None:
        cred = self.resolve(tls)
        if cred is None:
            return None
        host, _, port = tls.peer.rpartition(":")
        return _Session(cred, {
            "SERVER_NAME": self.host,
            "SERVER_PORT": str(self.port),
            "REMOTE_ADDR": host,
            "REMOTE_PORT": port,
            "SSL_PROTOCOL": tls.version,
            "SSL_CIPHER": tls.cipher,
            ENVIRON_KEY: cred,
        })

    def respond(self, session: _Session, req: wire.HttpRequest) -> tuple[wire.HttpResponse, bool]:
        status, headers, body = self._call_app(self._environ(req, session))
        return wire.HttpResponse(status, headers, body), False

    @staticmethod
    def _environ(req: wire.HttpRequest, session: _Session) -> dict[str, Any]:
        path, _, query = req.target.partition("?")
        env: dict[str, Any] = {
            "REQUEST_METHOD": req.method,
            "SCRIPT_NAME": "",
            "PATH_INFO": unquote(path, "latin-1"),
            "QUERY_STRING": query,
            "SERVER_PROTOCOL": "HTTP/1.1",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "https",
            "wsgi.input": io.BytesIO(req.body),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            **session.environ,
        }
        if req.body or "content-length" in req.headers or "transfer-encoding" in req.headers:
            env["CONTENT_LENGTH"] = str(len(req.body))  # PEP 3333: absent when the request has no body
        for k, v in req.headers.items():
            if k == "content-type":
                env["CONTENT_TYPE"] = v
            elif k in ("content-length", "transfer-encoding"):
                continue
            else:
                env["HTTP_" + k.upper().replace("-", "_")] = v
        return env

    def _call_app(self, env: dict[str, Any]) -> tuple[int, dict, bytes]:
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
        return result.get("status", 500), result.get("headers", {}), body
