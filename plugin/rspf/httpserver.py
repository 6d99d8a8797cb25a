"""The event-driven HTTP/1.1-over-TLS server shared by the MEF and the CSE plugin's secure listener.

One asyncio loop thread owns every socket: TLS runs over pyOpenSSL memory BIOs (:class:`rspf.tls.ServerTls`),
HTTP/1.1 framing is h11's. An idle or half-open connection costs a few kilobytes and no thread. Work that may
block runs in two bounded pools of daemon threads, never on the loop: handshake steps (the PSK lookup may fetch
a key over the network) together with opening the session, and answering requests. Deadlines cover a whole
handshake, a whole request (first byte of the head to last byte of the body) and the idle time between
keep-alive requests. Admission is bounded per source address and in total; when the server is full, the oldest
connection that is doing nothing useful (handshaking, idle, or still sending its request) of the source holding
the most connections is shed to make room. Design and defaults: docs/transport.md.

Subclasses say what a session is (:meth:`TlsHttpServer.open_session`, after the handshake) and how a request is
answered (:meth:`TlsHttpServer.respond`); both run in a pool thread.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import math
import os
import re
import resource
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import h11

from . import wire
from .errors import BadRequest, RequestTimeout, RspfError, TlsError
from .ratelimit import RefusalLog
from .tls import MAX_TLS_RECORD, TLS_RECORD_HEADER, PskServer, ServerTls

log = logging.getLogger(__name__)

#: Refused peers: this many WARNING lines per interval (seconds), the rest at INFO and in one summary line
REFUSAL_LOG_BURST = 10
REFUSAL_LOG_INTERVAL = 10.0

#: Handshake bytes a client may send before the handshake completes (a ClientHello is rarely above 2 KB).
MAX_HANDSHAKE_BYTES = 64 * 1024
_READ_SIZE = 64 * 1024
#: How long a worker that has just sent an answer waits for the same client's next request before it gives the
#: connection back to the loop (docs/transport.md, "the answering worker keeps the connection"); in slices, so
#: that a job waiting for a worker is not held up for longer than one slice.
KEEP_SECONDS = 0.005
_KEEP_SLICE_MS = 1
_TLS_CONTENT_TYPES = frozenset(range(20, 25))
_HTTP_VERSIONS = (b"1.0", b"1.1")
_FRAMING_HEADERS = frozenset(("content-length", "connection", "transfer-encoding"))
#: Statuses whose answer never has a body (RFC 9110 §15.3.5, §15.4.5)
_BODILESS = frozenset((204, 304))
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class ServerLimits:
    """Every limit of the transport, in one place (the MEF derives its values from its [mef] keys).

    handshake_timeout: seconds from accept to the end of the TLS handshake (the whole handshake).
    request_timeout: seconds from a request's first byte to its last (head and body), and for sending an answer.
    idle_timeout: seconds a kept-alive connection may wait for its next request.
    max_connections: open connections in total (handshaking, idle and working).
    max_per_source: open connections from one IP address.
    max_body: request body bytes (413 / RSC 4000 above).
    workers: threads answering requests (the application calls).
    handshake_workers: threads running handshake steps and opening sessions (PSK lookups may block).
    stop_grace: seconds shutdown waits for requests in progress before closing their connections.
    """

    handshake_timeout: float = 10.0
    request_timeout: float = 30.0
    idle_timeout: float = 30.0
    max_connections: int = 4096
    max_per_source: int = 256
    max_body: int = 4 * 1024 * 1024
    workers: int = 16
    handshake_workers: int = 8
    stop_grace: float = 5.0


def raise_fd_limit(wanted: int) -> None:
    """Raise the soft RLIMIT_NOFILE toward the hard limit so ``wanted`` sockets (plus files) fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + 256
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(hard, max(need, soft))
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            target = soft
        if target < need:
            log.warning("the open-file limit (%d) is below what %d connections need; raise `ulimit -n`",
                        target, wanted)


_Job = tuple[Callable[[], Any], Callable[[Any, BaseException | None], None]]


class _Pool:
    """A fixed set of daemon threads running jobs in FIFO order; ``done(result, error)`` is called in the thread.

    The thread that went idle last takes the next job (a stack of idle threads): under a steady load one warm
    thread answers one request after another instead of each request waking the coldest thread. Daemon
    threads: a job stuck on the network cannot hold the process at exit (unlike concurrent.futures).
    """

    def __init__(self, size: int, name: str) -> None:
        self._lock = threading.Lock()
        self._backlog: collections.deque[_Job] = collections.deque()
        self._idle: list[_Worker] = []
        self._stopping = False
        self._threads = [_Worker(self, f"{name}-{i}") for i in range(size)]
        for t in self._threads:
            t.start()

    def submit(self, job: Callable[[], Any], done: Callable[[Any, BaseException | None], None]) -> None:
        with self._lock:
            if self._idle:
                self._idle.pop().hand((job, done))
            else:
                self._backlog.append((job, done))

    def has_backlog(self) -> bool:
        """Whether a job waits for a thread (read without the lock: a hint)."""
        return bool(self._backlog)

    def _next(self, worker: _Worker) -> _Job | None:
        """The next job of ``worker`` from the backlog, or None after it joined the idle stack."""
        with self._lock:
            if self._backlog:
                return self._backlog.popleft()
            if not self._stopping:
                self._idle.append(worker)
            return None  # the worker ends if the pool is stopping, else waits to be handed a job

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.hand(None)


class _Worker(threading.Thread):
    def __init__(self, pool: _Pool, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._pool = pool
        self._wake = threading.Lock()
        self._wake.acquire()  # released by hand()
        self._job: _Job | None = None

    def hand(self, job: _Job | None) -> None:
        self._job = job
        self._wake.release()

    def run(self) -> None:
        item = self._pool._next(self)
        while True:
            if item is None:
                if self._pool._stopping:  # stopped before this thread joined the idle stack
                    return
                self._wake.acquire()
                item = self._job
                if item is None:  # stopped while idle
                    return
            job, done = item
            try:
                result, error = job(), None
            except BaseException as exc:  # handed to the loop, which logs it
                result, error = None, exc
            done(result, error)
            item = self._pool._next(self)


class TlsHttpServer:
    name = "server"
    #: Whether the PSK lookup may wait on the network (the CSE fetching a key from the MEF): then the handshake
    #: step that runs it goes to the handshake pool. A server whose lookup only reads local state sets False and
    #: saves the pool round trip.
    lookup_may_block = True
    #: Whether answering a request may wait on the network (ACME's app: registrar requests, notifications): then
    #: it runs in the worker pool. A server whose work is local CPU and a local database sets False: it answers on
    #: the loop and saves two thread hand-offs per request.
    work_may_block = True

    def __init__(self, psk: PskServer, *, host: str, port: int, limits: ServerLimits) -> None:
        self.psk = psk
        self.host, self.port = host, port
        self.limits = limits
        self.refusals = RefusalLog(log, burst=REFUSAL_LOG_BURST, interval=REFUSAL_LOG_INTERVAL)
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._wake: asyncio.Event | None = None
        self._sweep_every = 0.5
        self._thread: threading.Thread | None = None
        self._conns: dict[_Connection, None] = {}
        self._by_source: dict[str, dict[_Connection, None]] = {}
        self._handshakes: _Pool | None = None
        self._workers: _Pool | None = None
        #: Where the loop reads every socket into (asyncio's default reads allocate 256 KiB per read)
        self._read_buffer = memoryview(bytearray(_READ_SIZE))
        #: TLS handshakes by result, counted on the loop thread only (read by rspf.metrics when scraped)
        self.handshakes: dict[str, int] = {"ok": 0, "refused": 0, "timeout": 0}
        #: Also told of every refusal (``reason, peer, identity, detail``; never a key): the audit log
        self.on_refusal: Callable[[str, str, str | None, str], None] | None = None

    # -- what subclasses provide (both run in a pool thread) -------------------------------------
    def open_session(self, tls: ServerTls) -> Any | None:
        """The session state of a connection whose handshake succeeded, or None to close it. Called once, in a
        worker thread, with the connection's first request (the loop does not touch ``tls`` meanwhile)."""
        raise NotImplementedError

    def respond(self, session: Any, req: wire.HttpRequest) -> tuple[wire.HttpResponse, bool]:
        """The response to one request and whether to close the connection after it."""
        raise NotImplementedError

    def check_request(self, req: h11.Request) -> None:
        """Refuse a request head before its body is read (raise an RspfError); the default accepts any."""

    # -- life cycle -----------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Whether the loop thread started by :meth:`start_background` is serving."""
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    @property
    def connections_open(self) -> int:
        """Connections open now (handshaking, idle or answering)."""
        return len(self._conns)

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
        sock.listen(min(4096, self.limits.max_connections))
        sock.setblocking(False)
        self._sock = sock
        self.port = sock.getsockname()[1]

    def serve_forever(self) -> None:
        """Serve until :meth:`request_stop`; then close idle connections, let requests in progress finish
        (up to ``limits.stop_grace`` seconds), close the rest and return."""
        if self._sock is None:
            self.bind()
        raise_fd_limit(self.limits.max_connections)
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    def start_background(self) -> threading.Thread:
        self.bind()
        t = threading.Thread(target=self.serve_forever, name=f"{self.name}-loop", daemon=True)
        self._thread = t
        t.start()
        return t

    def request_stop(self) -> None:
        """Ask the server to stop. Safe in a signal handler: it sets a flag and wakes the loop."""
        self._stop.set()
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._on_stop)
            except RuntimeError:  # the loop already ended
                pass

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop and wait up to ``timeout`` seconds for the loop to finish."""
        self.request_stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- the loop -------------------------------------------------------------------------------
    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._handshakes = _Pool(self.limits.handshake_workers, f"{self.name}-handshake")
        self._workers = _Pool(self.limits.workers, f"{self.name}-worker")
        assert self._sock is not None
        server = await loop.create_server(lambda: _Connection(self), sock=self._sock,
                                          backlog=min(4096, self.limits.max_connections))
        limits = self.limits
        self._sweep_every = max(0.05, min(0.5, min(limits.handshake_timeout, limits.request_timeout,
                                                   limits.idle_timeout) / 5))
        tick = loop.call_later(self._sweep_every, self._tick)
        try:
            if not self._stop.is_set():
                await self._wake.wait()
            server.close()
            for conn in list(self._conns):
                if conn.sheddable:
                    conn.abort()
            deadline = loop.time() + self.limits.stop_grace
            while self._conns and loop.time() < deadline:
                await asyncio.sleep(0.05)
            for conn in list(self._conns):
                conn.abort()
            await asyncio.sleep(0)  # let connection_lost run
        finally:
            tick.cancel()
            self._handshakes.stop()
            self._workers.stop()
            self.refusals.flush()

    def _on_stop(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _tick(self) -> None:
        """Deadlines: one sweep over the connections every ``_sweep_every`` s instead of a timer per request."""
        assert self._loop is not None
        now = self._loop.time()
        for conn in [c for c in self._conns if c.deadline <= now]:
            conn.expired()
        self.refusals.roll()
        if self._stop.is_set():
            self._on_stop()
        else:
            self._loop.call_later(self._sweep_every, self._tick)

    def close_where(self, predicate: Callable[[ServerTls, Any], bool], timeout: float = 5.0) -> int:
        """Close at once every connection whose handshake is done and for which ``predicate(tls, session)``
        is true (``session`` is None until the first request opened it); e.g. the connections of a revoked
        credential. Called from any thread but the loop's; runs on the loop (keep ``predicate`` cheap) and
        returns how many were closed (0 when the server is not running or did not answer in ``timeout``)."""
        loop = self._loop
        if loop is None or self._stop.is_set():
            return 0
        done = threading.Event()
        closed: list[int] = [0]

        def run() -> None:
            try:
                for conn in list(self._conns):
                    tls = conn.tls
                    if conn.state != _READING or tls is None:
                        continue
                    session = None if conn.session is _UNOPENED else conn.session
                    if predicate(tls, session):
                        conn.abort()
                        closed[0] += 1
            except Exception:
                log.exception("%s: closing connections failed", self.name)
            finally:
                done.set()

        try:
            loop.call_soon_threadsafe(run)
        except RuntimeError:  # the loop ended
            return 0
        done.wait(timeout)
        return closed[0]

    def refuse(self, reason: str, peer: str, identity: str | None = None, detail: str = "") -> None:
        """Log a refused peer: the reason, its address and the presented identity (``repr``: whatever an attacker
        put in it cannot forge a log line), never a key."""
        who = f" (psk_identity {identity[:128]!r})" if identity else ""
        self.refusals.refused("%s: %s from %s%s%s", self.name, reason, peer, who, f": {detail}" if detail else "",
                              reason=reason, source=peer.rpartition(":")[0] or peer)
        if self.on_refusal is not None:
            self.on_refusal(reason, peer, identity, detail)

    # -- admission (loop thread) ----------------------------------------------------------------
    def _admit(self, conn: _Connection) -> bool:
        src = self._by_source.get(conn.source)
        if src is not None and len(src) >= self.limits.max_per_source:
            self.refuse("connection refused: per-source limit reached", conn.peer,
                                 detail=f"{len(src)} connections open from this address")
            return False
        if len(self._conns) >= self.limits.max_connections:
            victim = self._victim()
            if victim is None:
                self.refuse("connection refused: server full", conn.peer,
                                     detail=f"{len(self._conns)} connections, all working")
                return False
            self.refuse("connection shed to admit another", victim.peer, victim.presented_identity,
                                 f"{len(self._by_source[victim.source])} connections open from that address")
            victim.abort()
        self._conns[conn] = None
        self._by_source.setdefault(conn.source, {})[conn] = None
        return True

    def _victim(self) -> _Connection | None:
        """The oldest sheddable connection of the source holding the most connections."""
        for _source, conns in sorted(self._by_source.items(), key=lambda kv: len(kv[1]), reverse=True):
            for conn in conns:
                if conn.sheddable:
                    return conn
        return None

    def _forget(self, conn: _Connection) -> None:
        if conn not in self._conns:
            return
        del self._conns[conn]
        src = self._by_source[conn.source]
        del src[conn]
        if not src:
            del self._by_source[conn.source]


_HANDSHAKE, _READING, _CLOSED = range(3)


_UNOPENED = object()  # the handshake is done; the session opens with the first request, in the same pool job


class _Connection(asyncio.BufferedProtocol):
    """One client connection, driven by the loop thread. Pool jobs never touch ``tls`` at the same time as the
    loop: while one may (``_tls_in_pool``: a handshake step that can run the PSK lookup, or the job opening the
    session) the loop only buffers ciphertext in ``_pending``.

    States: _HANDSHAKE, _READING (the session; ``_busy`` while the application answers a request), _CLOSED."""

    def __init__(self, server: TlsHttpServer) -> None:
        self.server = server
        self.limits = server.limits
        self.state = _HANDSHAKE
        self.peer = "?"
        self.source = "?"
        self.tls: ServerTls | None = None
        self._peer_address = ("?", 0)
        self.session: Any = None
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._pending = bytearray()
        self._busy = False  # the application is answering a request
        self._tls_in_pool = False
        self.deadline = math.inf  # loop time at which ``_what`` expires (checked by the server's sweep)
        self._what = ""
        self._reading_paused = False
        self._http = h11.Connection(h11.SERVER, max_incomplete_event_size=wire.MAX_HEADER_BYTES)
        self._in_request = False
        self._head: h11.Request | None = None
        self._fields: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._body_size = 0
        self._write_paused = False
        #: The socket's descriptor, for the worker that keeps the connection between answers; with ``_io_lock``
        #: held, a worker uses it only while the state is not _CLOSED (the transport closes it after that)
        self._fd = -1
        self._io_lock = threading.Lock()

    # -- asyncio callbacks ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.source = str(peer[0])
        self.peer = f"{peer[0]}:{peer[1]}"
        if not self.server._admit(self):
            self.state = _CLOSED
            transport.abort()
            return
        self._peer_address = (str(peer[0]), int(peer[1]))
        sock = transport.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else -1
        self._arm(self.limits.handshake_timeout, "handshake deadline")

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.server._read_buffer  # one per server: what is read is consumed (copied) before the next read

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self.server._read_buffer[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if self.state == _CLOSED:
            return
        if self._busy and not self._reading_paused and self.transport is not None:
            self._reading_paused = True  # the client sends more while its request is answered: wait
            self.transport.pause_reading()
        if self.state == _HANDSHAKE or self._tls_in_pool:
            self._pending += data
            if len(self._pending) > MAX_HANDSHAKE_BYTES + MAX_TLS_RECORD:
                self._refuse("too much data before the session was open")
            elif self.state == _HANDSHAKE and not self._tls_in_pool:
                self._step_handshake()
            return
        self._on_ciphertext(data)

    def eof_received(self) -> bool | None:
        if self.state != _READING:
            self.abort()
            return None
        self._http.receive_data(b"")  # a half-close after a request: answer it, then close
        if not self._busy:
            self._next_request()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        with self._io_lock:
            self.state = _CLOSED
        self._disarm()
        self.server._forget(self)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._arm(self.limits.request_timeout, "send deadline")

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.state == _READING and not self._busy:
            self._arm_wait()
            self._next_request()

    # -- state ----------------------------------------------------------------------------------
    @property
    def sheddable(self) -> bool:
        """Doing nothing a legitimate client is waiting on: handshaking, idle, or still sending a request."""
        return self.state == _HANDSHAKE or self.state == _READING and not self._busy

    @property
    def presented_identity(self) -> str | None:
        return self.tls.presented_identity if self.tls is not None else None

    def abort(self) -> None:
        if self.transport is not None and self.state != _CLOSED:
            with self._io_lock:  # a worker's read or write on the socket ends first
                self.state = _CLOSED
            self._disarm()
            self.transport.abort()
            self.server._forget(self)

    def _close(self) -> None:
        """Close after what was written is flushed."""
        if self.transport is not None and self.state != _CLOSED:
            with self._io_lock:
                self.state = _CLOSED
            self._disarm()
            self.transport.close()
            self.server._forget(self)

    def _arm(self, seconds: float, what: str) -> None:
        self.deadline = self._loop.time() + seconds
        self._what = what

    def _arm_wait(self) -> None:
        """Between answers: the request deadline if a request has begun, else the idle timeout."""
        if self._in_request:
            self._arm(self.limits.request_timeout, "request deadline")
        else:
            self._arm(self.limits.idle_timeout, "idle")

    def _disarm(self) -> None:
        self.deadline = math.inf

    def expired(self) -> None:
        what = self._what
        self._disarm()
        if self.state == _CLOSED:
            return
        if what == "idle":
            self._goodbye()
            return
        if self.state == _HANDSHAKE:
            self.server.handshakes["timeout"] += 1
        self.server.refuse(f"{what} ({self._deadline_of(what):g} s) hit", self.peer,
                                    self.presented_identity)
        if what == "request deadline" and not self._busy and self.tls is not None:
            self._send_error(RequestTimeout(f"the request did not arrive whole within "
                                            f"{self.limits.request_timeout:g} s"))
        else:
            self.abort()

    def _deadline_of(self, what: str) -> float:
        return self.limits.handshake_timeout if what == "handshake deadline" else self.limits.request_timeout

    def _refuse(self, reason: str, detail: str = "") -> None:
        self.server.refuse(reason, self.peer, self.presented_identity, detail)
        self.abort()

    def _write_tls(self) -> None:
        assert self.tls is not None and self.transport is not None
        out = self.tls.outgoing()
        if out:
            self.transport.write(out)

    # -- handshake ------------------------------------------------------------------------------
    def _step_handshake(self) -> None:
        """Advance the handshake with the complete TLS records received so far: in the handshake pool until the
        PSK lookup (which may block) has run, on the loop after it (what is left is cheap)."""
        n = _complete_records(self._pending)
        if n < 0:
            self.server.handshakes["refused"] += 1
            self._refuse("TLS handshake refused", "not a TLS record")
            return
        if n == 0:
            return
        records = bytes(self._pending[:n])
        del self._pending[:n]
        if self.tls is None:  # the first whole record: only now does the connection cost a TLS object
            self.tls = self.server.psk.accept(self._peer_address)
            sock = self.transport.get_extra_info("socket") if self.transport is not None else None
            if sock is not None:
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    pass
        tls = self.tls
        assert self.server._handshakes is not None

        def job() -> tuple[bool, bytes, TlsError | None]:
            tls.feed(records)
            try:
                done = tls.handshake_step()
            except TlsError as exc:
                return False, tls.outgoing(), exc
            return done, tls.outgoing(), None

        if tls.presented_identity is not None or not self.server.lookup_may_block:
            self._handshake_done(job(), None)
        else:
            self._tls_in_pool = True
            self.server._handshakes.submit(job, self._from_pool(self._handshake_done))

    def _from_pool(self, callback: Callable[[Any, BaseException | None], None]) \
            -> Callable[[Any, BaseException | None], None]:
        loop = self._loop

        def done(result: Any, error: BaseException | None) -> None:
            try:
                loop.call_soon_threadsafe(callback, result, error)
            except RuntimeError:  # the loop ended (shutdown)
                pass

        return done

    def _handshake_done(self, result: Any, error: BaseException | None) -> None:
        self._tls_in_pool = False
        if self.state == _CLOSED:
            return
        if error is not None:
            log.error("%s: unexpected error in a TLS handshake step", self.server.name, exc_info=error)
            self.abort()
            return
        done, out, failure = result
        assert self.transport is not None and self.tls is not None
        if failure is not None:  # counted and logged before the client can read the alert
            self.server.handshakes["refused"] += 1
            self.server.refuse("TLS handshake refused", self.peer, self.presented_identity, str(failure))
        if out:
            self.transport.write(out)
        if failure is not None:
            self.abort()
            return
        if not done:
            self._step_handshake()
            return
        self.server.handshakes["ok"] += 1
        self.session = _UNOPENED
        self.state = _READING
        self._arm(self.limits.idle_timeout, "idle")
        data = bytes(self._pending)  # records that came after the client's Finished (some may be in tls already)
        self._pending.clear()
        self._on_ciphertext(data)

    # -- requests -------------------------------------------------------------------------------
    def _on_ciphertext(self, data: bytes | memoryview) -> None:
        assert self.tls is not None
        if data:
            self.tls.feed(data)
        try:
            plain, closed = self.tls.receive()
        except ConnectionError as exc:
            self._refuse("TLS record refused", str(exc))
            return
        self._write_tls()  # alerts or key updates the records produced
        if plain:
            self._http.receive_data(plain)
            if not self._in_request:
                self._in_request = True
                self._arm(self.limits.request_timeout, "request deadline")
        if closed:
            self._http.receive_data(b"")
        if self.state == _READING and not self._busy:
            self._next_request()

    def _next_request(self) -> None:
        """Run h11 over what was received until a request is complete (then answer it) or more data is needed."""
        while self.state == _READING and not self._busy and not self._write_paused:
            try:
                event = self._http.next_event()
            except h11.RemoteProtocolError as exc:
                self._send_error(_protocol_error(exc))
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            try:
                if isinstance(event, h11.Request):
                    if self._on_head(event):
                        self._send(self._http.send(h11.InformationalResponse(status_code=100, headers=[])))
                elif isinstance(event, h11.Data):
                    self._on_body(event)
                elif isinstance(event, h11.EndOfMessage):
                    self._on_end(event)
                    self._dispatch()
                elif isinstance(event, h11.ConnectionClosed):
                    self._goodbye()
                    return
            except RspfError as exc:
                self._send_error(exc)
                return

    def _on_head(self, head: h11.Request) -> bool:
        """Check a request head; whether the client waits for ``100 Continue`` before it sends the body."""
        self._head = head
        self._fields = fields = list(head.headers)  # iterating h11's Headers is slow: once
        if head.http_version not in _HTTP_VERSIONS:
            raise wire.HttpVersionNotSupported(f"HTTP/{head.http_version.decode('ascii', 'replace')} is not "
                                               "supported; use HTTP/1.1")
        _check_fields(fields, "header")
        for name, value in fields:
            if name == b"content-length" and int(value) > self.limits.max_body:
                raise wire.PayloadTooLarge(f"the request body is {int(value)} bytes; this server accepts at "
                                           f"most {self.limits.max_body}")
        self.server.check_request(head)
        return bool(self._http.they_are_waiting_for_100_continue)

    def _on_body(self, event: h11.Data) -> None:
        self._body_size += len(event.data)
        if self._body_size > self.limits.max_body:
            raise wire.PayloadTooLarge(f"the request body is longer than {self.limits.max_body} bytes")
        self._body.append(event.data)

    def _on_end(self, event: h11.EndOfMessage) -> None:
        if event.headers:
            _check_fields(list(event.headers), "trailer")

    def _request(self) -> wire.HttpRequest:
        """The request whose head and body were received."""
        head = self._head
        assert head is not None
        try:
            req = wire.request_from_h11(head.method, head.target, self._fields, b"".join(self._body))
        except UnicodeDecodeError:
            raise BadRequest("the request head is not ASCII text") from None
        self._body, self._body_size = [], 0
        return req

    def _dispatch(self) -> None:
        assert self.server._workers is not None
        self._disarm()  # the request arrived whole
        req = self._request()
        self._busy = True
        session, server, tls = self.session, self.server, self.tls
        assert server._workers is not None and tls is not None
        if session is _UNOPENED:
            self._tls_in_pool = True

        if not server.work_may_block:
            try:
                opened = server.open_session(tls) if session is _UNOPENED else session
                result = opened, (None if opened is None else server.respond(opened, req)), None
                error = None
            except Exception as exc:  # logged by _answered, answered 5000
                result, error = None, exc
            self._answered(result, error)
            return

        def job() -> tuple[Any, tuple[wire.HttpResponse, bool] | None, _Handback | None]:
            opened = server.open_session(tls) if session is _UNOPENED else session
            if opened is None:
                return None, None, None
            self.session = opened  # seen by close_where while this worker keeps the connection
            return (opened, *self._keep(opened, server.respond(opened, req)))

        if self.transport is not None and not self._reading_paused:
            self._reading_paused = True  # the worker reads the client's next request itself (``_keep``)
            self.transport.pause_reading()
        server._workers.submit(job, self._from_pool(self._answered))

    def _answered(self, result: Any, error: BaseException | None) -> None:
        """On the loop, once a request was answered: ``(session, answer, handback)``. ``answer`` is for the loop
        to send; None when the worker sent its answers itself, and ``handback`` says how it left the connection."""
        self._busy = self._tls_in_pool = False
        if self.state == _CLOSED:
            return
        assert self.transport is not None
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()
        if error is not None:
            log.error("%s: unexpected error while answering a request", self.server.name, exc_info=error)
            self._send_error(RspfError("the server failed to answer; see its log"))
            return
        session, answer, handback = result
        if session is None:
            self._refuse("no usable credential after the handshake")
            return
        self.session = session
        http = self._http
        if answer is None:
            assert handback is not None
            self._taken_back(handback)
            return
        assert self._head is not None
        resp, close = answer
        try:
            self._reply(resp, close)
        except h11.LocalProtocolError as exc:  # e.g. a status h11 cannot send (refused before anything is sent)
            log.error("%s: the application's answer cannot be sent: %s", self.server.name, exc)
            self._send_error(RspfError("the server failed to answer; see its log"))
            return
        if http.our_state is not h11.DONE or http.their_state is not h11.DONE:
            self._goodbye()  # either side ends the connection (h11 sent Connection: close)
            return
        http.start_next_cycle()  # what the client pipelined after this request stays in h11's buffer
        self._head = None
        self._in_request = bool(http.trailing_data[0])  # a pipelined request has begun
        self._carry_on()

    def _taken_back(self, handback: _Handback) -> None:
        """The connection back from the worker that kept it (``_keep``): send what the socket did not take, act
        on what the worker met, then read on as after any answer."""
        http = self._http
        if handback.unsent:
            assert self.transport is not None
            self.transport.write(handback.unsent)
        if handback.refused is not None:
            self._refuse("TLS record refused", handback.refused)
            return
        if handback.error is not None:
            self._send_error(handback.error)
            return
        if http.our_state is not h11.IDLE and http.our_state is not h11.SEND_RESPONSE:
            self._goodbye()  # the answer ended the connection (Connection: close), or h11 cannot go on
            return
        if handback.send_continue:
            self._send(http.send(h11.InformationalResponse(status_code=100, headers=[])))
        self._in_request = self._head is not None or bool(http.trailing_data[0])
        self._carry_on()

    def _carry_on(self) -> None:
        """Read on after an answer: the next request, or the idle wait (the connection closes if the server
        is stopping)."""
        if self.server._stop.is_set():
            self._goodbye()
            return
        if self._pending:  # ciphertext that came while the session was opening
            data, self._pending = bytes(self._pending), bytearray()
            self._on_ciphertext(data)
            if self.state != _READING:
                return
        if self._write_paused:
            return  # resume_writing continues
        self._arm_wait()
        self._next_request()

    def _send(self, data: bytes | None) -> None:
        assert self.tls is not None
        if data:
            self.tls.send(data)
            self._write_tls()

    def _reply(self, resp: wire.HttpResponse, close: bool) -> None:
        """Send one answer through h11 (:meth:`_framed`)."""
        self._send(self._framed(resp, close))

    def _framed(self, resp: wire.HttpResponse, close: bool) -> bytes:
        """One answer as h11 frames it: no body after HEAD, ``Connection: close`` when either side ends the
        connection (``close``, the client's ``Connection: close``, HTTP/1.0)."""
        no_body = resp.status in _BODILESS or self._head is not None and self._head.method == b"HEAD"
        head = h11.Response(status_code=resp.status, reason=_reason(resp.status),
                            headers=_response_fields(resp, close))
        http = self._http
        data = http.send(head)
        if resp.body and not no_body:
            data += http.send(h11.Data(data=resp.body))
        return data + http.send(h11.EndOfMessage())

    # -- the answering worker keeps the connection (worker thread) -------------------------------
    def _keep(self, session: Any, answer: tuple[wire.HttpResponse, bool]) \
            -> tuple[tuple[wire.HttpResponse, bool] | None, _Handback | None]:
        """Run by the worker that produced ``answer``, while the loop does not read this connection: send the
        answer itself, wait up to KEEP_SECONDS for the client's next request and answer that too, and so on; a
        client that sends request after request is served without a thread hand-off (docs/transport.md).

        Returns ``(answer, None)`` to leave an answer to the loop (nothing of it sent), or ``(None, handback)``
        once the answers were sent and the worker stopped waiting."""
        tls, http, transport = self.tls, self._http, self.transport
        assert tls is not None and transport is not None
        while True:
            resp, close = answer
            if close or self._fd < 0 or transport.get_write_buffer_size():
                return answer, None  # the loop sends it (and what it has queued goes first)
            try:
                plain = self._framed(resp, close)
                tls.send(plain)
            except (h11.LocalProtocolError, ConnectionError):
                return answer, None  # the loop meets the same error and answers it
            data = tls.outgoing()
            with self._io_lock:
                if self.state == _CLOSED:
                    return None, _Handback()
                try:
                    sent = os.write(self._fd, data)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    return None, _Handback()  # the transport sees the failure too and closes
            if sent < len(data):
                return None, _Handback(unsent=data[sent:])
            if http.our_state is not h11.DONE or http.their_state is not h11.DONE:
                return None, _Handback()
            http.start_next_cycle()
            self._head = None
            step = self._next_kept_request()
            if isinstance(step, _Handback):
                return None, step
            answer = self.server.respond(session, step)

    def _next_kept_request(self) -> wire.HttpRequest | _Handback:
        """The client's next whole request if it arrives within KEEP_SECONDS and no other job waits for a worker;
        otherwise how the connection is left for the loop (what arrived stays in ``tls`` and h11)."""
        http, tls, server = self._http, self.tls, self.server
        assert tls is not None and server._workers is not None
        until = time.monotonic() + KEEP_SECONDS
        poller: select.poll | None = None
        while True:
            try:
                event = http.next_event()
            except h11.RemoteProtocolError as exc:
                return _Handback(error=_protocol_error(exc))
            try:
                if isinstance(event, h11.Request):
                    if self._on_head(event):
                        return _Handback(send_continue=True)
                    continue
                if isinstance(event, h11.Data):
                    self._on_body(event)
                    continue
                if isinstance(event, h11.EndOfMessage):
                    self._on_end(event)
                    return self._request()
            except RspfError as exc:
                return _Handback(error=exc)
            if event is not h11.NEED_DATA or server._workers.has_backlog() or server._stop.is_set():
                return _Handback()  # PAUSED, ConnectionClosed: the loop's part
            wait = until - time.monotonic()
            if wait <= 0:
                return _Handback()
            if poller is None:
                poller = select.poll()
                poller.register(self._fd, select.POLLIN)
            if not poller.poll(min(_KEEP_SLICE_MS, max(1, math.ceil(wait * 1000)))):
                continue
            with self._io_lock:
                if self.state == _CLOSED:
                    return _Handback()
                try:
                    data = os.read(self._fd, _READ_SIZE)
                except BlockingIOError:
                    continue
                except OSError:
                    return _Handback()
            if not data:
                http.receive_data(b"")
                return _Handback()
            tls.feed(data)
            try:
                plain, closed = tls.receive()
            except ConnectionError as exc:
                return _Handback(refused=str(exc))
            if plain:
                http.receive_data(plain)
            if closed:
                http.receive_data(b"")
            out = tls.outgoing()  # alerts or key updates the records produced
            if out or closed:
                return _Handback(unsent=out)

    def _send_error(self, exc: RspfError) -> None:
        """Answer a protocol error or a deadline as a oneM2M error, then close: what follows is not read.

        h11 frames the answer when its state allows one (nothing of an answer sent yet in this cycle, even after
        the client's protocol error); otherwise part or all of an answer is already on the wire, another would
        be read as garbage, and the connection is closed without one (docs/transport.md)."""
        head = self._head
        ri = rvi = None
        if head is not None:
            for name, value in self._fields:
                if name == b"x-m2m-ri":
                    ri = value.decode("latin-1")
                elif name == b"x-m2m-rvi":
                    rvi = value.decode("latin-1")
        self.server.refuse(f"request refused with {int(exc.rsc)}", self.peer,
                                    self.tls.psk_identity if self.tls is not None else None, str(exc))
        if self._http.our_state is h11.IDLE or self._http.our_state is h11.SEND_RESPONSE:
            try:
                self._reply(wire.error_response(exc, request_id=ri, rvi=rvi), close=True)
            except ConnectionError:
                pass
        self._goodbye()

    def _goodbye(self) -> None:
        """Send close_notify and close the connection once written."""
        if self.tls is not None and not self._tls_in_pool:
            self.tls.close_notify()
            self._write_tls()
        self._close()


@dataclass(frozen=True)
class _Handback:
    """How a worker that kept a connection (``_Connection._keep``) leaves it to the loop."""

    unsent: bytes = b""              # ciphertext the socket did not take: the loop sends it first
    refused: str | None = None       # a TLS record error: the connection is refused
    error: RspfError | None = None   # the next request is refused with this
    send_continue: bool = False      # the next request's head waits for 100 Continue


def _protocol_error(exc: h11.RemoteProtocolError) -> RspfError:
    if exc.error_status_hint == 431:
        return wire.HeaderTooLarge(f"the request head is larger than {wire.MAX_HEADER_BYTES} bytes")
    return BadRequest(f"malformed HTTP request: {exc}")


@functools.lru_cache(maxsize=512)
def _wire_name(name: str) -> bytes | None:
    """How a response header is named on the wire: the usual spelling (X-M2M-RSC, Content-Type; some oneM2M
    peers are picky about case), or None for a framing header (h11's and ours) or a name that is not a token."""
    if name.lower() in _FRAMING_HEADERS:
        return None
    if name.lower().startswith("x-m2m-"):
        spelled = "X-M2M-" + name[6:].upper()
    else:
        spelled = "-".join(part.capitalize() for part in name.split("-"))
    raw = spelled.encode("latin-1", "replace")
    return raw if _TOKEN.fullmatch(raw) else None


@functools.lru_cache(maxsize=64)
def _reason(status: int) -> bytes:
    """The reason phrase sent with a status (none for a status HTTP does not name)."""
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def _response_fields(resp: wire.HttpResponse, close: bool) -> list[tuple[bytes, bytes]]:
    """The answer's header fields for h11. A value with a control character would split the header block (and
    h11 refuses it): that header is dropped, never sent. Framing is h11's: Content-Length is computed here."""
    fields = []
    for key, value in resp.headers.items():
        name = _wire_name(key)
        if name is None:
            continue
        try:
            raw = value.strip(" ").encode("latin-1")
        except UnicodeEncodeError:
            continue
        if _CONTROL.search(raw) is None:
            fields.append((name, raw))
    if resp.status != 204:  # RFC 9110 §8.6: no Content-Length in a 204
        fields.append((b"Content-Length", b"%d" % len(resp.body)))
    if close:
        fields.append((b"Connection", b"close"))
    return fields


def _check_fields(fields: list[tuple[bytes, bytes]], what: str) -> None:
    """h11 bounds only an incomplete head; a head (or trailer) that arrives whole is bounded here."""
    if len(fields) > wire.MAX_HEADER_FIELDS:
        raise wire.HeaderTooLarge(f"more than {wire.MAX_HEADER_FIELDS} {what} fields")
    if sum(len(name) + len(value) + 4 for name, value in fields) > wire.MAX_HEADER_BYTES:
        raise wire.HeaderTooLarge(f"the {what} fields are longer than {wire.MAX_HEADER_BYTES} bytes")


def _complete_records(buf: bytearray) -> int:
    """How many leading bytes of ``buf`` form whole TLS records; -1 when it does not look like TLS."""
    pos = 0
    while len(buf) - pos >= TLS_RECORD_HEADER:
        if buf[pos] not in _TLS_CONTENT_TYPES or buf[pos + 1] != 3:
            return -1
        length = int.from_bytes(buf[pos + 3:pos + 5], "big")
        if length > MAX_TLS_RECORD:
            return -1
        if len(buf) - pos - TLS_RECORD_HEADER < length:
            break
        pos += TLS_RECORD_HEADER + length
    return pos

