"""A threaded HTTP/1.1 server over TLS (PSK, optionally certificates): the transport shared by the MEF and
the CSE plugin's secure listener.

One thread per connection, bounded by ``max_connections``; the TLS handshake runs in that thread, never in
the accept loop. Subclasses say what a connection is (:meth:`open_session`, after the handshake) and how a
request is answered (:meth:`respond`). Shutdown closes idle keep-alive sessions so it never waits on them.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

from . import wire
from .errors import RspfError, TlsError
from .tls import PskServer, TlsConnection

log = logging.getLogger(__name__)


class TlsHttpServer:
    name = "server"

    def __init__(self, psk: PskServer, *, host: str, port: int, max_body: int, handshake_timeout: float,
                 idle_timeout: float, max_connections: int) -> None:
        self.psk = psk
        self.host, self.port = host, port
        self.max_body = max_body
        self.handshake_timeout, self.idle_timeout = handshake_timeout, idle_timeout
        self.max_connections = max_connections
        self._sock: socket.socket | None = None
        self._slots = threading.BoundedSemaphore(max_connections)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._sessions: set[TlsConnection] = set()

    # -- what subclasses provide ----------------------------------------------------------------
    def open_session(self, tls: TlsConnection) -> Any | None:
        """After a successful handshake: the session state, or None to close the connection."""
        raise NotImplementedError

    def respond(self, session: Any, tls: TlsConnection, req: wire.HttpRequest) -> tuple[wire.HttpResponse, bool]:
        """The response to one request and whether to close the connection after it."""
        raise NotImplementedError

    # -- life cycle -----------------------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        assert self._sock is not None
        return self._sock.getsockname()[:2]

    def bind(self) -> None:
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

    def serve_forever(self) -> None:
        if self._sock is None:
            self.bind()
        assert self._sock is not None
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
                log.warning("%s: connection limit (%d) reached; refusing a connection", self.name,
                            self.max_connections)
                conn.close()
                continue
            t = threading.Thread(target=self._run_connection, args=(conn,), name=self.name, daemon=True)
            with self._lock:
                self._threads.add(t)
            t.start()
        self._sock.close()

    def start_background(self) -> threading.Thread:
        self.bind()
        t = threading.Thread(target=self.serve_forever, name=f"{self.name}-accept", daemon=True)
        t.start()
        return t

    def request_stop(self) -> None:
        """Ask the accept loop to end. Safe in a signal handler: it only sets a flag."""
        self._stop.set()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop accepting, close open sessions (idle keep-alive readers wake up at once), and wait up to
        ``timeout`` seconds in total for the connection threads."""
        self._stop.set()
        with self._lock:
            threads = list(self._threads)
            sessions = list(self._sessions)
        for tls in sessions:
            tls.interrupt()
        deadline = time.monotonic() + timeout
        for t in threads:
            if t.ident is not None and t is not threading.current_thread():  # started, and not ourselves
                t.join(max(0.0, deadline - time.monotonic()))

    # -- one connection -------------------------------------------------------------------------
    def _run_connection(self, sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(None)
            tls = self.psk.wrap(sock, self.handshake_timeout)
            try:
                tls.handshake()
            except TlsError as exc:
                log.info("%s: TLS handshake from %s refused: %s", self.name, tls.peer, exc)
                return
            with self._lock:
                self._sessions.add(tls)
            try:
                session = self.open_session(tls)
                if session is not None:
                    tls.set_timeout(self.idle_timeout)
                    self._serve(session, tls)
            finally:
                with self._lock:
                    self._sessions.discard(tls)
                tls.close()
        except Exception:  # a bug must not kill the server; log it without request data
            log.exception("%s: unexpected error while serving a connection", self.name)
        finally:
            self._slots.release()
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _serve(self, session: Any, tls: TlsConnection) -> None:
        reader = tls.makefile()
        while not self._stop.is_set():
            try:
                req = wire.read_request(reader, self.max_body)
            except RspfError as exc:  # malformed or oversized: answer, then close (the stream is unusable)
                tls.sendall(wire.render_response(wire.error_response(exc, close=True)))
                return
            except (TimeoutError, ConnectionError):
                return
            if req is None:
                return
            resp, close = self.respond(session, tls, req)
            close = close or not req.keep_alive
            if close:
                resp.headers["connection"] = "close"
            try:
                tls.sendall(wire.render_response(resp))
            except (TimeoutError, ConnectionError):
                return
            if close:
                return
