"""MEF transport: a threaded TLS-PSK server speaking the oneM2M HTTP binding.

One thread per connection (bounded by ``max_connections``); the TLS handshake runs in that thread, never
in the accept loop. Store and policy live in rspf.mef.store / rspf.mef.service.
"""

from __future__ import annotations

import logging
import socket
import threading

from .. import keys, wire
from ..errors import RSC, RspfError, TlsError
from ..tls import PskServer, TlsConnection
from .config import MefConfig
from .service import MefService

log = logging.getLogger(__name__)


class MefServer:
    def __init__(self, config: MefConfig, service: MefService) -> None:
        self.config = config
        self.service = service
        self.psk = PskServer(service.psk_for, min_version=config.tls_min_version,
                             max_version=config.tls_max_version)
        self._sock: socket.socket | None = None
        self._slots = threading.BoundedSemaphore(config.max_connections)
        self._stop = threading.Event()
        self._threads: set[threading.Thread] = set()
        self._sessions: set[TlsConnection] = set()
        self._lock = threading.Lock()

    @property
    def address(self) -> tuple[str, int]:
        assert self._sock is not None
        return self._sock.getsockname()[:2]

    def bind(self) -> None:
        family = socket.AF_INET6 if ":" in self.config.listen else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.config.listen, self.config.port))
        except OSError as exc:
            sock.close()
            raise RspfError(f"cannot listen on {self.config.listen}:{self.config.port}: {exc.strerror}") from None
        sock.listen(512)
        sock.settimeout(0.5)
        self._sock = sock

    def serve_forever(self) -> None:
        if self._sock is None:
            self.bind()
        assert self._sock is not None
        host, port = self.address
        log.info("MEF %s listening on %s:%d (TLS-PSK %s-%s)", self.config.fqdn, host, port,
                 self.config.tls_min_version, self.config.tls_max_version)
        while not self._stop.is_set():
            try:
                conn, _addr = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    break
                raise
            if not self._slots.acquire(blocking=False):
                log.warning("connection limit (%d) reached; refusing a connection", self.config.max_connections)
                conn.close()
                continue
            t = threading.Thread(target=self._run_connection, args=(conn,), daemon=True)
            with self._lock:
                self._threads.add(t)
            t.start()
        self._sock.close()

    def start_background(self) -> threading.Thread:
        self.bind()
        t = threading.Thread(target=self.serve_forever, name="mef-accept", daemon=True)
        t.start()
        return t

    def request_stop(self) -> None:
        """Ask the accept loop to end. Safe in a signal handler: it only sets a flag."""
        self._stop.set()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop accepting, close open sessions (idle keep-alive readers wake up at once), and wait up to
        ``timeout`` seconds in total for the connection threads. Call from the thread that serves."""
        import time

        self._stop.set()
        with self._lock:
            threads = list(self._threads)
            sessions = list(self._sessions)
        for tls in sessions:
            tls.interrupt()
        deadline = time.monotonic() + timeout
        for t in threads:
            if t.ident is not None:  # started
                t.join(max(0.0, deadline - time.monotonic()))

    # -- one connection -------------------------------------------------------------------------
    def _run_connection(self, sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(None)
            tls = self.psk.wrap(sock, self.config.handshake_timeout)
            try:
                tls.handshake()
            except TlsError as exc:
                log.info("TLS handshake from %s refused: %s", tls.peer, exc)
                return
            with self._lock:
                self._sessions.add(tls)
            try:
                self._serve_session(tls)
            finally:
                with self._lock:
                    self._sessions.discard(tls)
                tls.close()
        except Exception:  # a bug must not kill the server; log it without request data
            log.exception("unexpected error while serving a connection")
        finally:
            self._slots.release()
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _serve_session(self, tls: TlsConnection) -> None:
        identity = tls.psk_identity
        if identity is None:
            return
        try:
            session = self.service.open_session(
                identity, lambda: tls.export_keying_material(keys.EXPORTER_LABEL_BOOTSTRAP, keys.EXPORTER_LENGTH))
        except RspfError as exc:
            log.info("session from %s refused: %s", tls.peer, exc)
            return
        log.debug("session %r from %s (%s, %s)", session, tls.peer, tls.version, tls.cipher)
        tls.set_timeout(self.config.idle_timeout)
        reader = tls.makefile()
        while not self._stop.is_set():
            ri = rvi = None
            fetch = False
            try:
                req = wire.read_request(reader, self.config.max_body_bytes)
            except wire.PayloadTooLarge as exc:
                tls.sendall(wire.render_response(wire.error_response(exc, close=True)))
                return
            except RspfError as exc:
                tls.sendall(wire.render_response(wire.error_response(exc, close=True)))
                return
            except (TimeoutError, ConnectionError):
                return
            if req is None:
                return
            try:
                ri, rvi = req.header("x-m2m-ri"), req.header("x-m2m-rvi")
                fetch = req.path.startswith("/fetchCredentials")
                prim = wire.to_primitive(req)
                reply = self.service.handle(session, prim.operation, prim.to, prim.originator, prim.content)
                resp = wire.onem2m_response(reply.rsc, reply.content, request_id=prim.request_id, rvi=prim.rvi,
                                            close=reply.close or not req.keep_alive)
                close = reply.close or not req.keep_alive
            except RspfError as exc:
                if exc.rsc is RSC.INTERNAL_SERVER_ERROR:
                    log.error("request %s failed: %s", req.path if not fetch else "/fetchCredentials/...", exc)
                else:
                    log.info("request from %s refused with %d: %s", session.principal_id, int(exc.rsc), exc)
                if fetch:
                    resp = wire.onem2m_response(exc.rsc, {"rspf:fcRsp": {"status": False, "errorString": str(exc)}},
                                                request_id=ri, rvi=rvi, close=not req.keep_alive)
                else:
                    resp = wire.error_response(exc, request_id=ri, rvi=rvi, close=not req.keep_alive)
                close = not req.keep_alive
            try:
                tls.sendall(wire.render_response(resp))
            except (TimeoutError, ConnectionError):
                return
            if close:
                return
