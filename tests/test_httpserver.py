"""rspf.httpserver: the event-driven TLS transport, in-process, over real loopback sockets.

Deadlines are set short (fractions of a second) so the tests are quick; no test asserts how long anything
took: a connection the server should close is read with a generous socket timeout, and a server that does
not close it makes the read time out and the test fail. Sources 127.0.0.2, 127.0.0.3 are other loopback
addresses (Linux routes all of 127/8 to lo).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from integration.support import closed_now
from OpenSSL import SSL
from rawhttp import read_response

from rspf import httpserver, wire
from rspf.errors import TlsError
from rspf.httpserver import ServerLimits, TlsHttpServer
from rspf.ratelimit import RefusalLog
from rspf.secret import Secret
from rspf.tls import PskClient, PskServer, ServerTls, TlsConnection
from rspf.wsgi import ENVIRON_KEY, PeerCredential, SecureWsgiServer

KEY = Secret(b"\x5a" * 32, "test PSK")
IDENTITY = "dev@mef.example.com"
#: Our closes reset the connection: a TIME_WAIT on 127.0.0.x:port would make a later bind('', port) fail for
#: other programs on this machine (ACME checks its port that way).
LINGER_0 = struct.pack("ii", 1, 0)
WAIT = 20.0  # generous bound for anything the server must do "soon"
FAST = ServerLimits(handshake_timeout=0.5, request_timeout=0.5, idle_timeout=0.5, max_connections=64,
                    max_per_source=32, max_body=1024, workers=2, handshake_workers=2, stop_grace=1.0)


class EchoServer(TlsHttpServer):
    """Answers every request with what the transport framed (method, target, headers, body)."""

    name = "echo"

    def __init__(self, limits: ServerLimits, lookup: Any = None) -> None:
        self.seen: list[tuple[str, str | None]] = []
        super().__init__(PskServer(lookup or self.lookup), host="127.0.0.1", port=0, limits=limits)

    def lookup(self, identity: str, peer_ip: str | None) -> Secret | None:
        self.seen.append((identity, peer_ip))
        return KEY if identity == IDENTITY else None

    def open_session(self, tls: ServerTls) -> str | None:
        return tls.psk_identity

    def respond(self, session: str, req: wire.HttpRequest) -> tuple[wire.HttpResponse, bool]:
        body = json.dumps({"session": session, "method": req.method, "target": req.target,
                           "headers": req.headers, "body": req.body.decode("latin-1")}).encode()
        return wire.HttpResponse(200, {"x-m2m-rsc": "2000", "content-type": "application/json"}, body), \
            req.path == "/close"


def start(server: TlsHttpServer) -> TlsHttpServer:
    server.start_background()
    return server


@pytest.fixture
def server() -> Iterator[EchoServer]:
    s = EchoServer(FAST)
    start(s)
    yield s
    s.shutdown(WAIT)


def connect(server: TlsHttpServer, identity: str = IDENTITY, key: Secret = KEY) -> TlsConnection:
    return PskClient().connect("127.0.0.1", server.port, identity, key, timeout=WAIT)


def tcp(server: TlsHttpServer, source: str = "127.0.0.1") -> socket.socket:
    s = socket.socket()
    s.settimeout(WAIT)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)  # closed with a reset: no TIME_WAIT left behind
    s.bind((source, 0))
    s.connect(("127.0.0.1", server.port))
    return s


def client_hello() -> bytes:
    """The first flight of a real TLS-PSK client (to trickle it byte by byte)."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        pass
    return conn.bio_read(65536)


def closed(sock: socket.socket) -> bool:
    """True once the server closed ``sock`` (EOF or reset); a read timeout fails the test."""
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True


def tls_closed(tls: TlsConnection) -> bool:
    buf = bytearray(4096)
    try:
        while tls.recv_into(buf):
            pass
        return True
    except ConnectionError:
        return True


def exchange(tls: TlsConnection, data: bytes) -> wire.HttpResponse:
    tls.sendall(data)
    return read_response(tls.makefile())


def get(target: str = "/x", extra: str = "", body: bytes = b"", method: str = "GET") -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if body else ""
    return (f"{method} {target} HTTP/1.1\r\nHost: h\r\nX-M2M-RI: ri-1\r\n{extra}{length}\r\n").encode() + body


# ------------------------------------------------------------------------------------- sessions and framing
def test_keep_alive_session_serves_several_requests(server: EchoServer) -> None:
    tls = connect(server)
    reader = tls.makefile()
    for i in range(3):
        body = f'{{"n":{i}}}'
        tls.sendall(get(f"/r{i}", body=body.encode(), method="POST"))
        seen = read_response(reader).json()
        assert (seen["session"], seen["method"], seen["target"], seen["body"]) == (IDENTITY, "POST", f"/r{i}", body)
    tls.close()
    assert server.seen[0] == (IDENTITY, "127.0.0.1")  # the lookup got the identity and the peer's address


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_request_sent_with_the_finished_message_is_answered(server: EchoServer, version: str) -> None:
    tls = PskClient(max_version=version).connect("127.0.0.1", server.port, IDENTITY, KEY, timeout=WAIT)
    assert exchange(tls, get("/first")).json()["target"] == "/first"
    tls.close()


def test_pipelined_requests_are_answered_in_order(server: EchoServer) -> None:
    tls = connect(server)
    tls.sendall(get("/a") + get("/b") + get("/close"))
    reader = tls.makefile()
    assert [read_response(reader).json()["target"] for _ in range(3)] == ["/a", "/b", "/close"]
    assert tls_closed(tls)


def test_chunked_body_and_trailer(server: EchoServer) -> None:
    tls = connect(server)
    chunked = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nX-Trailer: y\r\n\r\n"
    resp = exchange(tls, get("/c", "Transfer-Encoding: chunked\r\n", method="POST") + chunked + get("/next"))
    assert resp.json()["body"] == "Wikipedia"
    assert read_response(tls.makefile()).json()["target"] == "/next"  # the trailer did not leak


@pytest.mark.parametrize("name", ["X-M2M-RI", "x-m2m-ri", "X-M2M-Origin", "X-M2M-RVI", "Host"])
def test_duplicate_critical_header_is_refused(server: EchoServer, name: str) -> None:
    tls = connect(server)
    resp = exchange(tls, get(extra=f"X-M2M-Origin: o\r\nX-M2M-RVI: 3\r\n{name}: again\r\n"))
    assert (resp.status, resp.rsc) == (400, 4000)
    assert "twice" in resp.json()["m2m:dbg"] or "multiple" in resp.json()["m2m:dbg"]


def test_repeated_ordinary_header_is_joined(server: EchoServer) -> None:
    tls = connect(server)
    resp = exchange(tls, get(extra="Accept: application/json\r\nAccept: text/plain\r\n"))
    assert resp.json()["headers"]["accept"] == "application/json, text/plain"


@pytest.mark.parametrize("head", [
    b"GET /\r\n\r\n",                                   # no version
    b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n",              # two spaces
    b"G(T / HTTP/1.1\r\nHost: h\r\n\r\n",               # not a token
    b"GET / HTTP/1.1\r\nHost: h\r\nNo colon\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nBad Name: x\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",                          # HTTP/1.1 without Host
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: abc\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: \xb2\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n" + b"x" * 2000,
])
def test_malformed_requests_are_4000_and_close(server: EchoServer, head: bytes) -> None:
    tls = connect(server)
    resp = exchange(tls, head + get("/never"))
    assert resp.status >= 400 and resp.rsc == 4000, (resp.status, resp.headers)
    assert resp.header("connection") == "close"
    assert tls_closed(tls), "the request after the malformed one was answered"


@pytest.mark.parametrize("version, status", [("HTTP/1.9", 505), ("HTTP/2.0", 505), ("HTTP/1.0", 200)])
def test_http_versions(server: EchoServer, version: str, status: int) -> None:
    tls = connect(server)
    resp = exchange(tls, get().replace(b"HTTP/1.1", version.encode(), 1))
    assert resp.status == status


@pytest.mark.parametrize("extra", [
    "".join(f"X-Pad-{i}: {'a' * 100}\r\n" for i in range(200)),  # ~22 KiB of short lines
    "X-Pad: " + "a" * (wire.MAX_HEADER_BYTES + 10) + "\r\n",      # one long line
    "".join(f"X-F{i}: 1\r\n" for i in range(wire.MAX_HEADER_FIELDS + 1)),
])
def test_header_block_limits(server: EchoServer, extra: str) -> None:
    tls = connect(server)
    resp = exchange(tls, get(extra=extra))
    assert (resp.status, resp.rsc) == (431, 4000)
    assert tls_closed(tls)


def test_many_trailer_lines_are_refused(server: EchoServer) -> None:
    tls = connect(server)
    trailer = b"".join(b"T%d: x\r\n" % i for i in range(2000))
    resp = exchange(tls, get(extra="Transfer-Encoding: chunked\r\n", method="POST") + b"1\r\nx\r\n0\r\n" + trailer
                    + b"\r\n")
    assert resp.rsc == 4000 and resp.status in (400, 431)


def test_body_limit_is_inclusive_and_413_above(server: EchoServer) -> None:
    tls = connect(server)
    assert exchange(tls, get(body=b"y" * 1024, method="POST")).json()["body"] == "y" * 1024
    tls.sendall(get(method="POST", extra="Content-Length: 1025\r\n"))  # the head alone: refused before the body
    resp = read_response(tls.makefile())
    assert (resp.status, resp.rsc) == (413, 4000)
    assert tls_closed(tls)


def test_chunked_body_over_the_limit_is_413(server: EchoServer) -> None:
    tls = connect(server)
    chunks = b"".join(b"200\r\n" + b"z" * 0x200 + b"\r\n" for _ in range(4)) + b"0\r\n\r\n"
    resp = exchange(tls, get(extra="Transfer-Encoding: chunked\r\n", method="POST") + chunks)
    assert (resp.status, resp.rsc) == (413, 4000)


def expect_continue(tls: TlsConnection) -> None:
    """A request with Expect: 100-continue gets the 100 before it sends its body, then its answer."""
    tls.sendall(get(method="POST", extra="Expect: 100-continue\r\nContent-Length: 2\r\n"))
    reader = tls.makefile()
    assert reader.readline().startswith(b"HTTP/1.1 100 ")
    assert reader.readline() == b"\r\n"
    tls.sendall(b"ok")
    assert read_response(reader).json()["body"] == "ok"


def test_expect_100_continue(server: EchoServer) -> None:
    expect_continue(connect(server))


def test_response_header_with_control_character_is_dropped() -> None:
    class Injecting(EchoServer):
        def respond(self, session: str, req: wire.HttpRequest) -> tuple[wire.HttpResponse, bool]:
            return wire.HttpResponse(200, {"x-m2m-rsc": "2000", "x-bad": "a\r\nX-Injected: 1"}, b""), False

    s = start(Injecting(FAST))
    try:
        tls = connect(s)
        resp = exchange(tls, get())
        assert resp.rsc == 2000 and resp.header("x-bad") is None and resp.header("x-injected") is None
    finally:
        s.shutdown(WAIT)


def raw_head(reader: Any) -> list[bytes]:
    """The status line and header lines of the next answer, as sent."""
    lines = []
    while (line := reader.readline()) not in (b"\r\n", b""):
        lines.append(line.rstrip(b"\r\n"))
    return lines


def test_answers_are_framed_with_canonical_names_and_a_reason(server: EchoServer) -> None:
    tls = connect(server)
    tls.sendall(get())
    reader = tls.makefile()
    lines = raw_head(reader)
    assert lines[0] == b"HTTP/1.1 200 OK"
    assert b"X-M2M-RSC: 2000" in lines and b"Content-Type: application/json" in lines  # oneM2M peers' spelling
    length = [line for line in lines if line.startswith(b"Content-Length: ")]
    assert len(length) == 1
    assert json.loads(reader.read(int(length[0].split(b": ")[1])))["target"] == "/x"
    assert exchange(tls, get("/again")).json()["target"] == "/again"  # kept alive, the next cycle is framed too


def test_head_answer_has_the_length_but_no_body(server: EchoServer) -> None:
    tls = connect(server)
    reader = tls.makefile()
    tls.sendall(get("/h", method="HEAD") + get("/after"))
    lines = raw_head(reader)
    assert lines[0] == b"HTTP/1.1 200 OK"
    length = [int(line.split(b": ")[1]) for line in lines if line.startswith(b"Content-Length: ")]
    assert length and length[0] > 0  # what a GET would carry ...
    assert read_response(reader).json()["target"] == "/after"  # ... but no body: the next answer follows at once


def test_application_headers_that_cannot_be_sent_are_dropped_and_framing_is_ours() -> None:
    class Odd(EchoServer):
        def respond(self, session: str, req: wire.HttpRequest) -> tuple[wire.HttpResponse, bool]:
            if req.path == "/204":
                return wire.HttpResponse(204, {"x-m2m-rsc": "2002"}, b"stray"), False
            headers = {"x-m2m-rsc": "2000", "bad name": "x", "x-euro": "\u20ac", "x-tab": "a\tb", "x-del": "a\x7f",
                       "x-pad": "  padded  ", "content-length": "999", "transfer-encoding": "chunked",
                       "connection": "keep-alive"}
            return wire.HttpResponse(200, headers, b"body"), False

    s = start(Odd(FAST))
    try:
        tls = connect(s)
        reader = tls.makefile()
        tls.sendall(get())
        lines = raw_head(reader)
        assert sorted(lines[1:]) == [b"Content-Length: 4", b"X-M2M-RSC: 2000", b"X-Pad: padded"], lines
        assert reader.read(4) == b"body"
        tls.sendall(get("/204"))
        lines = raw_head(reader)
        assert lines == [b"HTTP/1.1 204 No Content", b"X-M2M-RSC: 2002"]  # no length, no body (RFC 9110)
        assert exchange(tls, get("/204")).rsc == 2002  # the stray body was not sent: the connection is in step
    finally:
        s.shutdown(WAIT)


@pytest.mark.parametrize("status", [99, 1000])
def test_a_status_http_cannot_carry_is_5000(status: int) -> None:
    class Strange(EchoServer):
        def respond(self, session: str, req: wire.HttpRequest) -> tuple[wire.HttpResponse, bool]:
            return wire.HttpResponse(status, {"x-m2m-rsc": "2000"}, b""), False

    s = start(Strange(FAST))
    try:
        tls = connect(s)
        resp = exchange(tls, get())
        assert (resp.status, resp.rsc, resp.header("connection")) == (500, 5000, "close")
        assert tls_closed(tls)
    finally:
        s.shutdown(WAIT)


@pytest.mark.parametrize("request_bytes", [
    get(extra="Connection: close\r\n"),
    get().replace(b"HTTP/1.1", b"HTTP/1.0", 1),
    get(extra="Connection: keep-alive\r\n").replace(b"HTTP/1.1", b"HTTP/1.0", 1),  # h11 keeps no 1.0 connection
])
def test_client_that_ends_the_connection_gets_connection_close(server: EchoServer, request_bytes: bytes) -> None:
    tls = connect(server)
    tls.sendall(request_bytes + get("/never"))
    resp = read_response(tls.makefile())
    assert resp.json()["target"] == "/x" and resp.header("connection") == "close"
    assert tls_closed(tls), "the request after the last one was answered"


def test_application_failure_is_5000_and_the_server_lives_on() -> None:
    class Failing(EchoServer):
        def respond(self, session: str, req: wire.HttpRequest) -> tuple[wire.HttpResponse, bool]:
            if req.path == "/boom":
                raise RuntimeError("bug")
            return super().respond(session, req)

    s = start(Failing(FAST))
    try:
        assert exchange(connect(s), get("/boom")).rsc == 5000
        assert exchange(connect(s), get("/fine")).json()["target"] == "/fine"
    finally:
        s.shutdown(WAIT)


# --------------------------------------------------------------------------------------------- deadlines
def test_trickled_client_hello_is_closed_at_the_handshake_deadline(server: EchoServer) -> None:
    hello = client_hello()
    sock = tcp(server)
    stop = threading.Event()

    def trickle() -> None:
        for b in hello:
            if stop.wait(0.1):
                return
            try:
                sock.send(bytes([b]))
            except OSError:
                return

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        assert closed(sock)
    finally:
        stop.set()
        t.join(WAIT)
        sock.close()
    assert len(hello) > 100  # the trickle could not have finished before the deadline (0.1 s a byte)


def test_silent_tcp_client_is_closed(server: EchoServer) -> None:
    assert closed(tcp(server))


def test_slow_headers_after_the_handshake_get_4008_and_close(server: EchoServer) -> None:
    tls = connect(server)
    tls.sendall(b"GET /slow HTTP/1.1\r\nHost: h\r\nX-M2M-RI: slow-1\r\n")  # the head never ends
    resp = read_response(tls.makefile())
    assert (resp.status, resp.rsc) == (408, 4008)
    assert tls_closed(tls)


def test_slow_body_gets_4008(server: EchoServer) -> None:
    tls = connect(server)
    tls.sendall(get(method="POST", extra="Content-Length: 100\r\n") + b"only a part")
    assert read_response(tls.makefile()).rsc == 4008


def test_idle_keep_alive_session_is_closed(server: EchoServer) -> None:
    tls = connect(server)
    assert exchange(tls, get()).status == 200
    assert tls_closed(tls)


def test_blocking_psk_lookup_does_not_stall_other_clients() -> None:
    """On the CSE an unknown KeID makes the lookup fetch the key over the network: others are served meanwhile."""
    release = threading.Event()
    entered = threading.Event()

    def lookup(identity: str, peer_ip: str | None) -> Secret | None:
        if identity == "slow@mef.example.com":
            entered.set()
            release.wait(WAIT)
            return None
        return KEY if identity == IDENTITY else None

    s = start(EchoServer(ServerLimits(handshake_timeout=WAIT, workers=2, handshake_workers=2), lookup))
    slow_result: list[BaseException] = []

    def slow_client() -> None:
        try:
            connect(s, "slow@mef.example.com")
        except BaseException as exc:  # the refusal, expected
            slow_result.append(exc)

    t = threading.Thread(target=slow_client, daemon=True)
    t.start()
    try:
        assert entered.wait(WAIT)
        assert exchange(connect(s), get("/meanwhile")).json()["target"] == "/meanwhile"
    finally:
        release.set()
        t.join(WAIT)
        s.shutdown(WAIT)
    assert slow_result, "the slow identity should have been refused"


# --------------------------------------------------------------------------------------------- admission
def test_per_source_limit_refuses_that_source_only() -> None:
    s = start(EchoServer(ServerLimits(max_per_source=3, handshake_timeout=WAIT)))
    held = [tcp(s, "127.0.0.2") for _ in range(3)]
    try:
        extra = tcp(s, "127.0.0.2")
        assert closed(extra)  # the fourth from 127.0.0.2 is refused
        for sock in held:
            sock.settimeout(0.2)
            with pytest.raises(TimeoutError):  # ...and the three held ones are still open
                sock.recv(1)
        assert exchange(connect(s), get("/legit")).json()["target"] == "/legit"  # 127.0.0.1 is served
    finally:
        for sock in held:
            sock.close()
        s.shutdown(WAIT)


def test_full_server_sheds_the_heaviest_source_for_a_legitimate_client(caplog) -> None:
    s = start(EchoServer(ServerLimits(max_connections=40, max_per_source=100, handshake_timeout=WAIT)))
    held = [tcp(s, "127.0.0.2") for _ in range(30)] + [tcp(s, "127.0.0.3") for _ in range(10)]
    caplog.set_level(logging.WARNING, "rspf.httpserver")
    try:
        for _ in range(3):  # each legitimate connection sheds one idle connection of 127.0.0.2
            assert exchange(connect(s), get("/legit")).json()["target"] == "/legit"
        shed = [sock for sock in held[:30] if closed_now(sock)]
        assert len(shed) >= 1
        assert not any(closed_now(sock) for sock in held[30:]), "the lighter source was shed"
    finally:
        for sock in held:
            sock.close()
        s.shutdown(WAIT)
    assert "connection shed to admit another from 127.0.0.2" in caplog.text




def test_legitimate_clients_are_served_while_a_thousand_idle_connections_are_held() -> None:
    s = start(EchoServer(ServerLimits(max_connections=1100, max_per_source=300, handshake_timeout=WAIT)))
    held: list[socket.socket] = []
    try:
        for i in range(1050):
            held.append(tcp(s, f"127.0.0.{2 + i // 300}"))
        for i in range(5):
            assert exchange(connect(s), get(f"/legit{i}")).json()["target"] == f"/legit{i}"
    finally:
        for sock in held:
            sock.close()
        s.shutdown(WAIT)


def test_shutdown_with_many_idle_connections_is_prompt() -> None:
    s = EchoServer(ServerLimits(handshake_timeout=WAIT, idle_timeout=WAIT, stop_grace=WAIT))
    thread = s.start_background()
    held = [tcp(s) for _ in range(200)]
    sessions = [connect(s) for _ in range(3)]
    try:
        assert exchange(sessions[0], get()).status == 200
        s.request_stop()
        thread.join(WAIT)
        assert not thread.is_alive(), "idle connections held the server after request_stop"
        assert all(tls_closed(t) for t in sessions)
    finally:
        for sock in held:
            sock.close()


# ------------------------------------------------------------------------------------------ refusal log
def test_refusal_log_is_rate_limited_and_names_identity_not_key(server: EchoServer, caplog) -> None:
    caplog.set_level(logging.WARNING, "rspf.httpserver")
    server.refusals = RefusalLog(logging.getLogger("rspf.httpserver"), burst=3, interval=3600)
    for i in range(500):
        server.refuse("TLS handshake refused", f"127.0.0.2:{1000 + i}", "evil\r\nid@mef.example.com")
    server.refusals.flush()
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 4
    assert "'evil\\r\\nid@mef.example.com'" in lines[0]  # repr: the attacker's CR LF cannot forge a log line
    assert "497 more refusals" in lines[-1] and "497 TLS handshake refused" in lines[-1]
    assert "127.0.0.2 (497)" in lines[-1]


def test_wrong_key_is_logged_with_the_identity(server: EchoServer, caplog) -> None:
    caplog.set_level(logging.WARNING, "rspf.httpserver")
    with pytest.raises(TlsError):
        connect(server, IDENTITY, Secret(b"\x01" * 32))
    # the client may see the failure before the server's loop has logged it: poll for the line
    deadline = time.monotonic() + WAIT
    while "TLS handshake refused from 127.0.0.1" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.01)
    server.refusals.flush()
    assert "TLS handshake refused from 127.0.0.1" in caplog.text and IDENTITY in caplog.text
    assert KEY.reveal().hex() not in caplog.text


# ------------------------------------------------------------------------------------------ WSGI server
def test_wsgi_server_passes_the_credential_and_keeps_alive() -> None:
    calls: list[dict[str, Any]] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        calls.append(environ)
        body = json.dumps({"cred": environ[ENVIRON_KEY].identity, "path": environ["PATH_INFO"],
                           "query": environ["QUERY_STRING"], "input": environ["wsgi.input"].read().decode(),
                           "origin": environ.get("HTTP_X_M2M_ORIGIN")}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("X-M2M-RSC", "2000")])
        return [body]

    def resolve(tls: Any) -> PeerCredential | None:
        return PeerCredential("psk", tls.psk_identity, "12-x", "Cae1") if tls.psk_identity else None

    s = SecureWsgiServer(app, PskServer(lambda i, ip: KEY if i == IDENTITY else None), resolve,
                         host="127.0.0.1", port=0, limits=FAST)
    s.start()
    try:
        tls = connect(s)
        reader = tls.makefile()
        for i in range(2):
            tls.sendall(get(f"/cse-in/a%20b?rcn={i}", "X-M2M-Origin: Cae1\r\n", b"{}", "POST"))
            resp = read_response(reader)
            assert resp.rsc == 2000
            assert resp.json() == {"cred": IDENTITY, "path": "/cse-in/a b", "query": f"rcn={i}", "input": "{}",
                                   "origin": "Cae1"}
        assert calls[0]["REMOTE_ADDR"] == "127.0.0.1" and calls[0]["SSL_PROTOCOL"].startswith("TLS")
        # the transport's own refusals are oneM2M answers too
        tls.sendall(b"GET / HTTP/1.9\r\nHost: h\r\n\r\n")
        assert read_response(reader).rsc == 4000
    finally:
        s.stop()


def test_close_credentials_closes_only_the_matching_connections_opened_or_not() -> None:
    other = "dev2@mef.example.com"
    keys_ = {IDENTITY: KEY, other: KEY}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("X-M2M-RSC", "2000")])
        return [b""]

    s = SecureWsgiServer(app, PskServer(lambda i, ip: keys_.get(i)),
                         lambda tls: PeerCredential("psk", tls.psk_identity, "12-" + tls.psk_identity, "Cae1"),
                         host="127.0.0.1", port=0, limits=FAST)
    s.start()
    try:
        used, fresh, kept = connect(s), connect(s), connect(s, other)
        assert exchange(used, get()).rsc == 2000  # a session opened by a request
        assert exchange(kept, get()).rsc == 2000
        seen: list[tuple[str | None, str | None]] = []

        def revoked(identity: str | None, cred: PeerCredential | None) -> bool:
            seen.append((identity, cred.identity if cred else None))
            return identity == IDENTITY

        assert s.close_credentials(revoked) == 2  # ``fresh`` has no session yet: matched by its TLS identity
        assert (IDENTITY, None) in seen and (IDENTITY, IDENTITY) in seen
        assert tls_closed(used) and tls_closed(fresh)
        assert exchange(kept, get()).rsc == 2000  # another credential's connection is untouched
    finally:
        s.stop()
    assert s.close_credentials(lambda i, c: True) == 0  # a stopped server has nothing to close


# -- the worker pool ------------------------------------------------------------------------------
def _pool_run(pool: Any, job: Any) -> tuple[Any, BaseException | None]:
    done = threading.Event()
    out: list[tuple[Any, BaseException | None]] = []

    def finished(result: Any, error: BaseException | None) -> None:
        out.append((result, error))
        done.set()

    pool.submit(job, finished)
    assert done.wait(10)
    return out[0]


def test_pool_hands_the_next_job_to_the_thread_that_went_idle_last() -> None:
    from rspf.httpserver import _Pool

    pool = _Pool(4, "t")
    try:
        names = [_pool_run(pool, lambda: threading.current_thread().name)[0] for _ in range(20)]
        assert len(set(names)) == 1  # one warm thread under a sequential load, not a round over all four
        result, error = _pool_run(pool, lambda: 1 / 0)
        assert result is None and isinstance(error, ZeroDivisionError)  # a failing job reaches ``done``
    finally:
        pool.stop()


def test_pool_runs_a_backlog_in_order_and_stop_ends_every_thread() -> None:
    from rspf.httpserver import _Pool

    pool = _Pool(2, "t")
    gate = threading.Event()
    order: list[int] = []
    all_done = threading.Event()

    def blocked() -> None:
        assert gate.wait(10)

    def record(i: int) -> Any:
        def job() -> None:
            order.append(i)
        return job

    def finished(_result: Any, _error: BaseException | None) -> None:
        if len(order) == 5:
            all_done.set()

    for _ in range(2):
        pool.submit(blocked, lambda r, e: None)  # both threads busy: what follows waits in the backlog
    for i in range(5):
        pool.submit(record(i), finished)
    gate.set()
    assert all_done.wait(10)
    assert sorted(order) == list(range(5)) and order[0] in (0, 1)  # taken from the backlog first-in first-out
    pool.stop()
    for t in pool._threads:
        t.join(5)
        assert not t.is_alive()


# -- the worker that answered keeps the connection ----------------------------------------------------------
class KeepingServer(EchoServer):
    """An echo server whose connections come back to the loop only when a worker stops keeping one."""

    handbacks = 0


@pytest.fixture
def kept(monkeypatch: pytest.MonkeyPatch) -> Iterator[KeepingServer]:
    """A server whose answering worker waits far longer than any test for the client's next request: every
    request after the first on a connection is read and answered by that worker, unless it gives way."""
    monkeypatch.setattr(httpserver, "KEEP_SECONDS", 3 * WAIT)
    answered = httpserver._Connection._answered

    def counting(self: Any, result: Any, error: BaseException | None) -> None:
        KeepingServer.handbacks += 1
        answered(self, result, error)

    monkeypatch.setattr(httpserver._Connection, "_answered", counting)
    KeepingServer.handbacks = 0
    s = KeepingServer(FAST)
    start(s)
    yield s
    s.shutdown(WAIT)


def primed(server: TlsHttpServer) -> TlsConnection:
    """A connection whose first request was answered: its worker now keeps it."""
    tls = connect(server)
    assert exchange(tls, get("/first")).json()["target"] == "/first"
    return tls


def test_requests_after_the_first_are_answered_by_the_worker_that_keeps_the_connection(
        kept: KeepingServer) -> None:
    tls = primed(kept)
    reader = tls.makefile()
    for i in range(30):
        tls.sendall(get(f"/r{i}", body=b"b%d" % i, method="POST"))
        seen = read_response(reader).json()
        assert (seen["target"], seen["body"], seen["session"]) == (f"/r{i}", f"b{i}", IDENTITY)
    tls.sendall(get("/a") + get("/b"))  # pipelined: the second waits in h11's buffer, then is answered
    assert [read_response(reader).json()["target"] for _ in range(2)] == ["/a", "/b"]
    assert KeepingServer.handbacks == 0, "a request went back to the loop between answers"


@pytest.mark.parametrize("second, status, rsc", [
    (b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: abc\r\n\r\n", 400, 4000),
    (get(extra="X-Pad: " + "a" * (wire.MAX_HEADER_BYTES + 10) + "\r\n"), 431, 4000),
    (get(method="POST", extra="Content-Length: 1025\r\n"), 413, 4000),
    (get().replace(b"HTTP/1.1", b"HTTP/1.9", 1), 505, None),
])
def test_a_bad_request_on_a_kept_connection_is_refused_and_closes_it(kept: KeepingServer, second: bytes,
                                                                     status: int, rsc: int | None) -> None:
    tls = primed(kept)
    resp = exchange(tls, second + get("/never"))
    assert resp.status == status and (rsc is None or resp.rsc == rsc), (resp.status, resp.headers)
    assert tls_closed(tls), "the request after the refused one was answered"


def test_expect_100_continue_on_a_kept_connection(kept: KeepingServer) -> None:
    expect_continue(primed(kept))


def test_a_forged_record_on_a_kept_connection_closes_it(kept: KeepingServer) -> None:
    tls = primed(kept)
    tls._sock.sendall(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)  # application data the session did not encrypt
    assert tls_closed(tls)
    assert exchange(primed(kept), get("/after")).json()["target"] == "/after"  # the server lives on


def test_closing_a_credential_reaches_a_kept_connection(kept: KeepingServer) -> None:
    tls = primed(kept)
    assert kept.close_where(lambda _tls, session: session == IDENTITY) == 1
    assert tls_closed(tls)


def test_a_kept_connection_gives_way_to_a_request_waiting_for_a_worker(kept: KeepingServer) -> None:
    held = [primed(kept) for _ in range(FAST.workers)]  # every worker keeps a connection (for 3 x WAIT)
    late = connect(kept)  # answered within WAIT only if a keeping worker lets its connection go
    assert exchange(late, get("/late")).json()["target"] == "/late"
    assert all(exchange(t, get("/again")).status == 200 for t in held)


def test_stopping_does_not_wait_for_kept_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpserver, "KEEP_SECONDS", 3 * WAIT)
    s = EchoServer(dataclasses.replace(FAST, stop_grace=3 * WAIT))  # a busy connection would be waited for
    thread = s.start_background()
    tls = primed(s)
    s.request_stop()
    thread.join(WAIT)
    assert not thread.is_alive(), "a kept connection held the server after request_stop"
    assert tls_closed(tls)


def test_a_request_that_stalls_after_a_kept_answer_meets_the_request_deadline(server: EchoServer) -> None:
    tls = primed(server)
    tls.sendall(b"GET /slow HTTP/1.1\r\nHo")  # then nothing: the worker gives the connection back, the loop waits
    resp = read_response(tls.makefile())
    assert (resp.status, resp.rsc) == (408, 4008)
    assert tls_closed(tls)
