"""Clients that survive the network: every transport fault is a TransportError with a readable message; the
Target's stale kept-alive MEF connection is replaced by a fresh one; background renewal survives a MEF that
drops, hangs, refuses and resets, and succeeds when it is back.

Servers are started here on free 127.0.0.1 ports and stopped at the end: a scripted TLS-PSK server (one
behaviour per test), a fault-injecting TCP proxy in front of a real ``rspf mef serve`` (the ``mef`` fixture).
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from rspf.client import OneM2MClient
from rspf.enrolee import Backoff, Renewer
from rspf.errors import TransportError
from rspf.fileutil import read_key_file
from rspf.secret import Secret
from rspf.target import KeyCache, KeyCacheLimits
from rspf.tls import PskClient, PskServer

from .proxy import FaultProxy, close_listener
from .support import FQDN, HOST, MefHome, enrolee_client, free_port

KEY = Secret(bytes(range(32)), "test PSK")
IDENTITY = "scripted-client"


class ScriptedServer:
    """A TLS-PSK server that reads one request head per connection and then does ``behaviour``."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.psk = PskServer(lambda identity, *_peer: KEY if identity == IDENTITY else None)
        self.sock = socket.create_server((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.stopping = threading.Event()
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            tls = self.psk.wrap(sock, 5.0)
            tls.handshake()
            reader = tls.makefile()
            while True:
                while reader.readline(65536) not in (b"\r\n", b""):
                    pass
                if self.behaviour == "eof":
                    tls.close()
                elif self.behaviour == "reset":
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.close()
                elif self.behaviour == "hang":
                    tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nX-M2M-RSC: 2000\r\n\r\npartial")
                    self.stopping.wait(30)
                elif self.behaviour == "trickle":  # every read gets a byte in time, the answer never ends
                    for byte in b"HTTP/1.1 200 OK\r\nX-M2M-RSC: 2000\r\n" + b"X-Pad: a\r\n" * 1000:
                        if self.stopping.wait(0.02):
                            break
                        tls.sendall(bytes([byte]))
                elif self.behaviour == "malformed":
                    tls.sendall(b"SPDY/9 what\r\n\r\n")
                elif self.behaviour in ("ok", "once"):
                    tls.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-M2M-RSC: 2000\r\n'
                                b'Content-Type: application/json\r\n\r\n{}')
                    if self.behaviour == "once":  # keep-alive promised, then closed (as after an idle timeout)
                        tls.close()
                    continue
                return
        except Exception:
            sock.close()

    def stop(self) -> None:
        self.stopping.set()
        close_listener(self.sock)
        for s in self.conns:
            try:
                s.close()
            except OSError:
                pass
        self.thread.join(5)


@pytest.fixture
def scripted(request: pytest.FixtureRequest) -> Iterator[ScriptedServer]:
    server = ScriptedServer(request.param)
    try:
        yield server
    finally:
        server.stop()


def client_of(server: ScriptedServer, deadline: float = 1.0) -> OneM2MClient:
    tls = PskClient().connect(HOST, server.port, IDENTITY, KEY, timeout=5)
    return OneM2MClient(tls, "Cclient", host="scripted", deadline=deadline)


@pytest.mark.parametrize("scripted,words", [
    ("eof", "closed the connection without an answer"),
    ("reset", "failed while reading"),
    ("hang", "did not answer within 0.5 s"),
    ("trickle", "did not answer within 0.5 s"),  # a deadline for the whole response, not per read
    ("malformed", "malformed HTTP response"),
], indirect=["scripted"])
def test_every_transport_fault_is_a_transport_error(scripted: ScriptedServer, words: str) -> None:
    client = client_of(scripted, deadline=0.5)
    try:
        with pytest.raises(TransportError) as info:
            client.call("GET", "/anything")
    finally:
        client.close()
    text = str(info.value)
    assert words in text and f"{HOST}:{scripted.port}" in text and int(info.value.rsc) == 5103
    assert not client.reusable


@pytest.mark.parametrize("scripted", ["once"], indirect=True)
def test_a_kept_alive_connection_the_server_closed_fails_as_a_transport_error(scripted: ScriptedServer) -> None:
    client = client_of(scripted)
    try:
        assert client.call("GET", "/first") == {} and client.reusable
        with pytest.raises(TransportError, match="closed the connection|failed while"):
            client.call("GET", "/second")
    finally:
        client.close()


@pytest.mark.parametrize("scripted", ["ok"], indirect=True)
def test_connect_refused_and_a_wrong_key_are_transport_errors(scripted: ScriptedServer) -> None:
    with pytest.raises(TransportError, match="cannot connect"):
        PskClient().connect(HOST, free_port(), IDENTITY, KEY, timeout=5)
    with pytest.raises(TransportError, match=f"{HOST}:{scripted.port}"):
        PskClient().connect(HOST, scripted.port, IDENTITY, Secret(bytes(32), "wrong"), timeout=5)
    client = client_of(scripted)  # the right key works, on a connection kept alive for several requests
    try:
        assert [client.call("GET", f"/r{i}") for i in range(3)] == [{}, {}, {}] and client.reusable
    finally:
        client.close()


# --------------------------------------------------------------------- the Target's pooled connections
def test_a_stale_pooled_mef_connection_is_replaced_by_a_fresh_one(mef: MefHome, caplog) -> None:
    dev1 = mef.enrolees["dev1"]
    target = mef.targets["in"]
    cache = KeyCache(mef_host=HOST, mef_port=mef.port, mef_fqdn=FQDN, psk_identity=target.psk_identity,
                     psk=read_key_file(target.psk_file, "psk"), origin=target.target_id, limits=KeyCacheLimits())
    try:
        first = enrolee_client(mef, dev1).enrol(store=False)
        assert cache.lookup(first.ke_id, HOST)[1] is True and cache.sizes()["pool"] == 1
        mef.restart()  # the pooled connection is now dead on the MEF side, as after its idle timeout
        second = enrolee_client(mef, dev1).enrol(store=False)
        with caplog.at_level(logging.INFO, logger="rspf.target"):
            cred, fetched = cache.lookup(second.ke_id, HOST)
        assert cred is not None and fetched and cred.key.reveal() == second.registrar_key.reveal()
        assert any("retrying on a new one" in r.getMessage() for r in caplog.records)
        assert cache.fetches == 2
    finally:
        cache.close()


# --------------------------------------------------------------------------------- background renewal
def test_renewal_survives_a_mef_that_drops_hangs_refuses_and_resets_then_comes_back(mef: MefHome, caplog) -> None:
    dev1 = mef.enrolees["dev1"]
    proxy = FaultProxy(mef.port)
    try:
        enrolee = enrolee_client(mef, dev1, timeout=0.5)
        enrolee.config.mef_port = proxy.port
        script = ["hang", "refuse", "reset", "forward"]
        proxy.set_mode("drop")
        waits: list[float] = []
        renewed = []

        def wait(seconds: float) -> bool:  # injected time: no real sleeping; the MEF changes between attempts
            waits.append(seconds)
            if renewed:
                return True
            proxy.set_mode(script.pop(0))
            return False

        renewer = Renewer(enrolee, 3600, None, on_renewed=lambda fresh, _old: renewed.append(fresh), wait=wait,
                          backoff=Backoff(first=1.0, ceiling=4.0), draw=lambda: 1.0)
        with caplog.at_level(logging.INFO, logger="rspf.enrolee.renewal"):
            renewer.run()
    finally:
        proxy.stop()
    assert len(renewed) == 1 and renewer.current is renewed[0] and renewed[0].enrolee_id == dev1.enrolee_id
    assert waits[:4] == [1.0, 2.0, 4.0, 4.0]  # backoff doubles up to the ceiling (jitter drawn at its top)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4 and all("securityProfile renewal failed" in w for w in warnings)
    assert all(f"127.0.0.1:{proxy.port}" in w for w in warnings), warnings  # each names the MEF and the cause
    assert "cannot connect" in warnings[2] and "timed out" in warnings[1]
    assert any("succeeded after 4 failed attempt(s)" in r.getMessage() for r in caplog.records)
    assert dev1.kpm_hex not in caplog.text
