"""rspf.tls: TLS-PSK through pyOpenSSL's private hooks, tested over a real loopback connection.

Each test runs one in-process server thread on 127.0.0.1 (port 0), joins it, and never sleeps.
"""

from __future__ import annotations

import socket
import struct
import threading

import pytest
from OpenSSL import SSL
from OpenSSL._util import lib as openssl_lib

from rspf import keys, tls
from rspf.errors import TlsError
from rspf.secret import Secret

IDENTITY = "dev1@mef.example.com"
KEY = Secret(bytes.fromhex("5eC1e7".lower() + "a5" * 29), "Kpm")   # 32 bytes, distinctive
KEY_HEX = KEY.reveal().hex()
WRONG = Secret(b"\x42" * 32, "wrong")
TIMEOUT = 10.0


class LoopbackServer:
    """Accepts ONE connection, runs the TLS-PSK handshake, exports keying material, echoes one message."""

    def __init__(self, psk_server: tls.PskServer) -> None:
        self.psk_server = psk_server
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(1)
        self.lsock.settimeout(TIMEOUT)
        self.port = self.lsock.getsockname()[1]
        self.error: BaseException | None = None
        self.identity: str | None = None
        self.exporter: Secret | None = None
        self.version = self.cipher = None
        self.received = b""
        self.thread = threading.Thread(target=self._run, name="tls-loopback", daemon=True)

    def _run(self) -> None:
        try:
            conn, _ = self.lsock.accept()
        except OSError as exc:
            self.error = exc
            return
        conn.settimeout(None)
        t = self.psk_server.wrap(conn, timeout=TIMEOUT)
        try:
            t.handshake()
            self.identity = t.psk_identity
            self.version, self.cipher = t.version, t.cipher
            self.exporter = t.export_keying_material(keys.EXPORTER_LABEL_BOOTSTRAP, keys.EXPORTER_LENGTH)
            buf = bytearray(256)
            n = t.recv_into(buf)
            self.received = bytes(buf[:n])
            t.sendall(b"pong:" + self.received)
            t.recv_into(buf)  # wait for the client's close_notify / EOF
        except BaseException as exc:  # recorded for the test to inspect
            self.error = exc
        finally:
            t.close()

    def __enter__(self) -> LoopbackServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.thread.join(TIMEOUT)
        self.lsock.close()
        assert not self.thread.is_alive(), "the server thread did not finish"


def lookup_for(table: dict[str, Secret]):
    return lambda identity, peer_ip: table.get(identity)


def run_ok(server: tls.PskServer, client: tls.PskClient, identity: str = IDENTITY, key: Secret = KEY):
    """Handshake, exchange one message, close; return (client connection info, server)."""
    with LoopbackServer(server) as srv:
        conn = client.connect("127.0.0.1", srv.port, identity, key, server_name="mef.example.com", timeout=TIMEOUT)
        try:
            info = {"version": conn.version, "cipher": conn.cipher, "identity": conn.psk_identity, "repr": repr(conn),
                    "exporter": conn.export_keying_material(keys.EXPORTER_LABEL_BOOTSTRAP, keys.EXPORTER_LENGTH)}
            conn.sendall(b"ping")
            buf = bytearray(64)
            n = conn.recv_into(buf)
            info["reply"] = bytes(buf[:n])
        finally:
            conn.close()
    assert srv.error is None, repr(srv.error)
    return info, srv


# ---------------------------------------------------------------------------------------------
# the private hooks


def test_check_psk_support_passes():
    tls.check_psk_support()


def test_private_hooks_exist():
    """Fails loudly when a pyOpenSSL/cryptography upgrade removes what rspf/tls.py drives."""
    for name in ("SSL_CTX_set_psk_server_callback", "SSL_CTX_set_psk_client_callback",
                 "SSL_CTX_use_psk_identity_hint", "Cryptography_HAS_PSK"):
        assert hasattr(openssl_lib, name), f"OpenSSL._util.lib.{name} is gone"
    assert openssl_lib.Cryptography_HAS_PSK
    assert callable(SSL.Connection.export_keying_material)
    assert hasattr(SSL.Connection, "_reverse_mapping")
    assert hasattr(SSL.Connection, "set_tlsext_host_name")
    assert SSL.Connection._reverse_mapping is not None
    # tls.py hands the raw SSL_CTX* of a Context to the callbacks' setters
    assert SSL.Context(SSL.TLS_METHOD)._context is not None


def test_check_psk_support_names_what_is_missing(monkeypatch):
    monkeypatch.delattr(SSL.Connection, "export_keying_material")
    with pytest.raises(TlsError, match="OpenSSL.SSL.Connection.export_keying_material"):
        tls.check_psk_support()


def test_check_psk_support_names_a_missing_memory_bio(monkeypatch):
    made = SSL.Connection.__init__

    def without_bio(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        made(self, *args, **kwargs)
        del self._into_ssl

    monkeypatch.setattr(SSL.Connection, "__init__", without_bio)
    with pytest.raises(TlsError, match="_into_ssl"):
        tls.check_psk_support()


# ---------------------------------------------------------------------------------------------
# handshakes


def test_tls12_mandated_cipher_suite():
    server = tls.PskServer(lookup_for({IDENTITY: KEY}), max_version="1.2", ciphers=tls.MANDATED_TLS12_CIPHER)
    client = tls.PskClient(min_version="1.2", max_version="1.2", ciphers=tls.MANDATED_TLS12_CIPHER)
    info, srv = run_ok(server, client)
    assert tls.MANDATED_TLS12_CIPHER == "PSK-AES128-CBC-SHA256"
    assert info["cipher"] == "PSK-AES128-CBC-SHA256" == srv.cipher
    assert info["version"] == "TLSv1.2" == srv.version
    assert srv.identity == IDENTITY
    assert info["identity"] == IDENTITY
    assert srv.received == b"ping" and info["reply"] == b"pong:ping"
    assert info["exporter"] == srv.exporter and len(info["exporter"]) == 48


def test_tls12_mandated_cipher_against_the_default_server():
    """A client offering only the mandated suite is served by the MEF's default context."""
    server = tls.PskServer(lookup_for({IDENTITY: KEY}))
    client = tls.PskClient(max_version="1.2", ciphers="PSK-AES128-CBC-SHA256")
    info, srv = run_ok(server, client)
    assert info["cipher"] == "PSK-AES128-CBC-SHA256"
    assert info["version"] == "TLSv1.2"


def test_tls12_gcm():
    server = tls.PskServer(lookup_for({IDENTITY: KEY}), max_version="1.2")
    client = tls.PskClient(max_version="1.2", ciphers="PSK-AES128-GCM-SHA256")
    info, srv = run_ok(server, client)
    assert info["cipher"] == "PSK-AES128-GCM-SHA256" == srv.cipher
    assert info["exporter"] == srv.exporter


def test_tls13():
    server = tls.PskServer(lookup_for({IDENTITY: KEY}))
    client = tls.PskClient(min_version="1.3", max_version="1.3")
    info, srv = run_ok(server, client)
    assert info["version"] == "TLSv1.3" == srv.version
    assert info["cipher"] in ("TLS_AES_128_GCM_SHA256", "TLS_CHACHA20_POLY1305_SHA256")
    assert srv.identity == IDENTITY
    assert info["reply"] == b"pong:ping"


def test_default_contexts_negotiate_tls13():
    info, srv = run_ok(tls.PskServer(lookup_for({IDENTITY: KEY})), tls.PskClient())
    assert info["version"] == "TLSv1.3"


@pytest.mark.parametrize("max_version", ["1.2", "1.3"])
def test_both_sides_export_the_same_keying_material(max_version):
    server = tls.PskServer(lookup_for({IDENTITY: KEY}), max_version=max_version)
    info, srv = run_ok(server, tls.PskClient(max_version=max_version))
    assert isinstance(info["exporter"], Secret)
    assert info["exporter"] == srv.exporter
    assert len(srv.exporter.reveal()) == keys.EXPORTER_LENGTH
    assert srv.exporter.reveal() != b"\0" * 48
    # a second handshake with the same PSK gives fresh key material (new RelativeKeID, new Ke)
    info2, srv2 = run_ok(tls.PskServer(lookup_for({IDENTITY: KEY}), max_version=max_version),
                         tls.PskClient(max_version=max_version))
    assert info2["exporter"] != info["exporter"]


def test_server_sees_the_presented_identity_among_several():
    other = Secret(b"\x07" * 32)
    table = {IDENTITY: KEY, "in@sp.example.com": other}
    info, srv = run_ok(tls.PskServer(lookup_for(table)), tls.PskClient(max_version="1.2"),
                       identity="in@sp.example.com", key=other)
    assert srv.identity == "in@sp.example.com"


def run_fail(server: tls.PskServer, client: tls.PskClient, identity: str = IDENTITY, key: Secret = KEY):
    with LoopbackServer(server) as srv:
        with pytest.raises(TlsError) as info:
            client.connect("127.0.0.1", srv.port, identity, key, server_name="mef.example.com", timeout=TIMEOUT)
    assert srv.identity is None and srv.exporter is None
    return info.value, srv


@pytest.mark.parametrize("max_version", ["1.2", "1.3"])
def test_wrong_key_is_tls_error(max_version):
    exc, srv = run_fail(tls.PskServer(lookup_for({IDENTITY: KEY})), tls.PskClient(max_version=max_version),
                        key=WRONG)
    assert isinstance(srv.error, TlsError)
    assert IDENTITY in str(exc)
    for text in (str(exc), repr(exc), str(srv.error)):
        assert KEY_HEX not in text and WRONG.reveal().hex() not in text


@pytest.mark.parametrize("max_version", ["1.2", "1.3"])
def test_unknown_identity_is_tls_error(max_version):
    seen = []

    def lookup(identity, peer_ip):
        seen.append(identity)
        return None

    exc, srv = run_fail(tls.PskServer(lookup), tls.PskClient(max_version=max_version), identity="nobody@x")
    assert isinstance(srv.error, TlsError)
    assert "nobody@x" in seen
    assert KEY_HEX not in str(exc)


def test_lookup_that_raises_fails_the_handshake_quietly():
    def lookup(identity, peer_ip):
        raise RuntimeError(f"boom {KEY_HEX}")

    exc, srv = run_fail(tls.PskServer(lookup), tls.PskClient(max_version="1.2"))
    assert KEY_HEX not in str(exc) and KEY_HEX not in str(srv.error)


def test_version_mismatch_is_tls_error():
    run_fail(tls.PskServer(lookup_for({IDENTITY: KEY}), min_version="1.3"), tls.PskClient(max_version="1.2"))


def test_texts_never_contain_the_key():
    info, srv = run_ok(tls.PskServer(lookup_for({IDENTITY: KEY})), tls.PskClient())
    assert IDENTITY in info["repr"]
    assert KEY_HEX not in info["repr"]
    assert KEY_HEX not in repr(info["exporter"]) and info["exporter"].reveal().hex() not in repr(info["exporter"])
    assert KEY_HEX not in f"{KEY}" and KEY_HEX not in repr(KEY)


@pytest.mark.parametrize("identity", ["", "x" * (tls.MAX_PSK_IDENTITY + 1)])
def test_bad_identity_is_refused_before_connecting(identity):
    with pytest.raises(TlsError, match="psk_identity"):
        tls.PskClient().connect("127.0.0.1", 9, identity, KEY)


def test_connection_refused_is_tls_error():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nobody listens there now
    with pytest.raises(TlsError, match="cannot connect"):
        tls.PskClient().connect("127.0.0.1", port, IDENTITY, KEY, timeout=TIMEOUT)


@pytest.mark.parametrize("kw", [{"min_version": "1.1"}, {"max_version": "2"}])
def test_bad_versions_are_refused(kw):
    with pytest.raises(TlsError):
        tls.PskClient(**kw)
    with pytest.raises(TlsError):
        tls.PskServer(lookup_for({}), **kw)


@pytest.mark.parametrize("hangup", ["close", "reset"])
def test_a_server_that_hangs_up_is_a_network_fault_not_a_refusal(hangup):
    """A server that closes or resets the connection gave no verdict on the key: the message says the handshake did
    not complete (worth retrying), not that the identity or key was refused."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        conn.recv(4096)  # the ClientHello
        if hangup == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with pytest.raises(TlsError) as info:
            tls.PskClient().connect("127.0.0.1", port, IDENTITY, KEY, timeout=10)
    finally:
        t.join(10)
        listener.close()
    assert "did not complete" in str(info.value) and "refused" not in str(info.value)
    assert KEY_HEX not in str(info.value)


def test_socket_timeouts_are_set_only_when_they_change_by_more_than_the_slack():
    listener = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(listener.getsockname())
    b, _ = listener.accept()
    listener.close()
    try:
        conn = tls.TlsConnection(SSL.Connection(SSL.Context(SSL.TLS_METHOD), a), a, 5.0)

        def applied() -> float:
            sec, usec = struct.unpack("ll", a.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16))
            return sec + usec / 1e6

        assert applied() == pytest.approx(5.0)
        conn.set_timeout(5.0 - tls.TIMEOUT_SLACK / 2)  # a deadline counted down by a few ms: not applied
        assert applied() == pytest.approx(5.0)
        conn.set_timeout(2.0)
        assert applied() == pytest.approx(2.0)
        conn.set_timeout(None)  # no timeout: always applied
        assert applied() == 0.0
    finally:
        a.close()
        b.close()
