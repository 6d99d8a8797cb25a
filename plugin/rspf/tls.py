"""TLS-PSK for oneM2M (TS-0003 §10.2.2): the ONE module that touches pyOpenSSL and its cffi bindings.

pyOpenSSL has no public PSK API. ``cryptography`` still carries OpenSSL's raw PSK bindings, which this
module drives through ``OpenSSL._util``: ``SSL_CTX_set_psk_server_callback`` and
``SSL_CTX_set_psk_client_callback`` (TLS 1.2 RFC 4279 and, through OpenSSL's compatibility path,
TLS 1.3 external PSK with a SHA-256 suite). These are private hooks: :func:`check_psk_support` fails
loudly, naming what is missing, when a dependency upgrade removes one of them, and a unit test calls it.

What the rest of the project sees: :class:`PskServer` / :class:`PskClient` (TLS-PSK contexts),
:class:`CertClient` (the client side of mutual TLS), :class:`TlsConnection` (the authenticated peer identity,
the RFC 5705 exporter, socket-like I/O) and, for the event-driven server (rspf.httpserver),
:class:`ServerTls`: the same peer view over memory BIOs, no socket.

Clients authenticate the server before a byte of application data leaves them: a :class:`PskClient`
handshake completes only when the server proved the pre-shared key (a TLS 1.2 PSK suite, or TLS 1.3 with the
external PSK negotiated; a server certificate is refused), and a :class:`CertClient` handshake only when the
server's chain verifies to the configured trust anchor and its certificate names the expected peer.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

from .errors import TlsError
from .secret import Secret

log = logging.getLogger(__name__)

#: TLS 1.2 PSK suites offered/accepted. PSK-AES128-CBC-SHA256 is the one TS-0003 §10.2.2 mandates;
#: the GCM and ECDHE-PSK (forward secrecy, RFC 4279 §7.1 advice) suites are extras.
TLS12_PSK_CIPHERS = (
    "ECDHE-PSK-AES128-CBC-SHA256:PSK-AES128-GCM-SHA256:PSK-AES256-GCM-SHA384:PSK-AES128-CBC-SHA256"
)
MANDATED_TLS12_CIPHER = "PSK-AES128-CBC-SHA256"
#: Certificate suites. TS-0003 §10.2.3 mandates TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256, which OpenSSL names
#: ECDHE-ECDSA-AES128-SHA256 (:data:`MANDATED_TLS12_CERT_CIPHER`); GCM and RSA as extras.
MANDATED_TLS12_CERT_CIPHER = "ECDHE-ECDSA-AES128-SHA256"
CERT_CIPHERS = MANDATED_TLS12_CERT_CIPHER + ":ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256"
#: TLS 1.3 external PSK through OpenSSL's old-style callbacks needs a SHA-256 suite.
TLS13_CIPHERSUITES = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256"

#: Seconds by which a socket timeout may differ from the one asked for before it is set again (TlsConnection).
TIMEOUT_SLACK = 0.05
MAX_PSK_IDENTITY = 128  # RFC 4279 allows up to 2^16-1; OpenSSL caps at PSK_MAX_IDENTITY_LEN (256)
VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}

_REQUIRED_LIB = (
    "Cryptography_HAS_PSK",
    "SSL_CTX_set_psk_server_callback",
    "SSL_CTX_set_psk_client_callback",
    "SSL_CTX_use_psk_identity_hint",
    "SSL_session_reused",
    "X509_verify_cert_error_string",
    "BIO_get_mem_data",
)
_REQUIRED_CONN = ("export_keying_material", "_reverse_mapping", "set_tlsext_host_name")

#: ``lookup(identity, peer_ip)``: the PSK for a presented psk_identity, or None. ``peer_ip`` is the client's
#: address (None when unknown), for per-source limits. It may block (the CSE fetches unknown KeIDs from the MEF).
PskLookup = Callable[[str, "str | None"], "Secret | None"]
#: A TLS record header: content type (20-24), protocol major version 3, minor, 2-byte length.
TLS_RECORD_HEADER = 5
MAX_TLS_RECORD = 16384 + 2048


def check_psk_support() -> None:
    """Raise :class:`TlsError` naming every private hook this module relies on that is missing."""
    missing = [f"OpenSSL._util.lib.{n}" for n in _REQUIRED_LIB if not hasattr(_lib, n)]
    missing += [f"OpenSSL.SSL.Connection.{n}" for n in _REQUIRED_CONN if not hasattr(SSL.Connection, n)]
    if hasattr(_lib, "Cryptography_HAS_PSK") and not _lib.Cryptography_HAS_PSK:
        missing.append("PSK support in the OpenSSL that cryptography is built with")
    probe = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    if not hasattr(probe, "_ssl"):
        missing.append("OpenSSL.SSL.Connection._ssl (the SSL* that SSL_session_reused inspects)")
    for bio in ("_into_ssl", "_from_ssl"):  # the memory BIOs whose pending bytes ServerTls reads
        if not hasattr(probe, bio):
            missing.append(f"OpenSSL.SSL.Connection.{bio} (a memory BIO of ServerTls)")
    if missing:
        raise TlsError(
            "the installed pyOpenSSL/cryptography no longer provide what TLS-PSK needs: "
            + ", ".join(missing)
            + ". Pin the versions in pyproject.toml or port rspf/tls.py."
        )


def _conn_of(ssl_ptr: Any) -> SSL.Connection | None:
    return SSL.Connection._reverse_mapping.get(ssl_ptr)


def _context(min_version: str, max_version: str) -> SSL.Context:
    if min_version not in VERSIONS or max_version not in VERSIONS:
        raise TlsError("TLS versions are '1.2' or '1.3'")
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(VERSIONS[min_version])
    ctx.set_max_proto_version(VERSIONS[max_version])
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_TICKET)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    return ctx


def _base_context(min_version: str, max_version: str) -> SSL.Context:
    check_psk_support()
    ctx = _context(min_version, max_version)
    ctx.set_cipher_list(TLS12_PSK_CIPHERS.encode())
    if hasattr(ctx, "set_ciphersuites"):
        ctx.set_ciphersuites(TLS13_CIPHERSUITES.encode())
    return ctx


class PskServer:
    """Server-side TLS-PSK context. ``lookup(identity, peer_ip)`` returns the PSK for a psk_identity, or None.

    The identity the client presented and that the handshake proved is available afterwards as
    :attr:`TlsConnection.psk_identity` / :attr:`ServerTls.psk_identity`. ``lookup`` runs inside OpenSSL's
    callback: it must not raise (an exception is logged without detail and the handshake fails).
    """

    def __init__(
        self,
        lookup: PskLookup,
        *,
        min_version: str = "1.2",
        max_version: str = "1.3",
        ciphers: str | None = None,
        identity_hint: str | None = None,
    ) -> None:
        self._lookup = lookup
        self._versions = (min_version, max_version)
        self._identity_hint = identity_hint
        self._callback = _ffi.callback(
            "unsigned int (*)(SSL *, const char *, unsigned char *, unsigned int)", self._on_psk
        )
        self.context = self._psk_context()
        if ciphers:
            self.context.set_cipher_list(ciphers.encode())
        #: the context of clients that offer no TLS 1.3 pre-shared key, once :meth:`use_certificates` made one
        self.cert_context: SSL.Context | None = None

    def _psk_context(self) -> SSL.Context:
        ctx = _base_context(*self._versions)
        if self._identity_hint:
            _lib.SSL_CTX_use_psk_identity_hint(ctx._context, self._identity_hint.encode())
        _lib.SSL_CTX_set_psk_server_callback(ctx._context, self._callback)
        return ctx

    def use_certificates(self, cert_chain: str | Path, private_key: str | Path, ca_file: str | Path | None) -> None:
        """Also accept certificate-based handshakes (mutual TLS when ``ca_file`` is given).

        A client that offers a PSK still gets the PSK handshake; one that does not is asked for a
        certificate issued by ``ca_file``, which OpenSSL verifies (TS-0003 §10.2.3 suites first). A client
        without a certificate completes no PSK and presents no certificate: it has no credential.

        OpenSSL 3.0 does not take a TLS 1.3 external PSK (old-style callback) on a context that has a
        certificate: it answers with the certificate. So the certificate context is a second one
        (:attr:`cert_context`, also doing the TLS 1.2 PSK suites), and :meth:`accept` gives a client whose
        ClientHello carries a pre_shared_key extension the PSK-only :attr:`context` (:class:`ServerTls`).
        The blocking :meth:`wrap` (tests, benches) uses the certificate context for every client.
        """
        ctx = self._psk_context()
        try:
            ctx.use_certificate_chain_file(str(cert_chain))
            ctx.use_privatekey_file(str(private_key))
            ctx.check_privatekey()
            if ca_file:
                ctx.load_verify_locations(str(ca_file))
                ctx.set_verify(SSL.VERIFY_PEER, _note_verify_error)
        except SSL.Error as exc:
            raise TlsError(f"cannot use the certificate files: {_describe(exc)}") from None
        ctx.set_cipher_list((CERT_CIPHERS + ":" + TLS12_PSK_CIPHERS).encode())
        self.cert_context = ctx

    def _on_psk(self, ssl_ptr: Any, identity_ptr: Any, psk_out: Any, max_len: int) -> int:
        try:
            if identity_ptr == _ffi.NULL:
                return 0
            raw = _ffi.string(identity_ptr)
            if not raw or len(raw) > MAX_PSK_IDENTITY:
                return 0
            identity = raw.decode("utf-8")
            conn = _conn_of(ssl_ptr)
            if conn is not None:
                conn._rspf_presented = identity  # type: ignore[attr-defined]
            key = self._lookup(identity, getattr(conn, "_rspf_peer_ip", None))
            if key is None:
                log.debug("TLS-PSK: no key for the presented identity; handshake refused")
                return 0
            value = key.reveal()
            if len(value) > max_len or not value:
                return 0
            _ffi.memmove(psk_out, value, len(value))
            if conn is not None:
                conn._rspf_psk_identity = identity  # type: ignore[attr-defined]
            return len(value)
        except Exception as exc:  # never let an exception cross the C boundary
            log.error("TLS-PSK server callback failed (%s)", type(exc).__name__)
            return 0

    def wrap(self, sock: socket.socket, timeout: float | None = 30.0) -> TlsConnection:
        """A blocking server connection on a socket (tests and the bench's reference server)."""
        conn = SSL.Connection(self.cert_context or self.context, sock)
        conn._rspf_peer_ip = _peer_name(sock).rpartition(":")[0] or None  # type: ignore[attr-defined]
        conn.set_accept_state()
        return TlsConnection(conn, sock, timeout)

    def accept(self, peer: tuple[str, int]) -> ServerTls:
        """A server connection over memory BIOs for a client at ``peer`` (the event-driven server)."""
        return ServerTls(self.context, peer, self.cert_context)


class PskClient:
    """Client-side TLS-PSK context; identity and key are given per connection to :meth:`connect`.

    A handshake completes only when the server proved the same pre-shared key. TLS 1.2 offers PSK suites
    only. In TLS 1.3 a server that does not take the external PSK would authenticate with a certificate
    instead: any server certificate is refused in the verification step, and after the handshake the
    session must be PSK-authenticated (``SSL_session_reused`` for TLS 1.3 - tickets and the session cache
    are off, so only the external PSK can set it - or a PSK suite for TLS 1.2, and no peer certificate).
    """

    def __init__(self, *, min_version: str = "1.2", max_version: str = "1.3", ciphers: str | None = None) -> None:
        self.context = _base_context(min_version, max_version)
        if ciphers:
            self.context.set_cipher_list(ciphers.encode())
        self.context.set_verify(SSL.VERIFY_PEER, _refuse_certificate)
        self._callback = _ffi.callback(
            "unsigned int (*)(SSL *, const char *, char *, unsigned int, unsigned char *, unsigned int)",
            self._on_psk,
        )
        _lib.SSL_CTX_set_psk_client_callback(self.context._context, self._callback)

    @staticmethod
    def _on_psk(ssl_ptr: Any, hint: Any, identity_out: Any, max_id: int, psk_out: Any, max_psk: int) -> int:
        try:
            conn = _conn_of(ssl_ptr)
            cred = getattr(conn, "_rspf_client_cred", None)
            if cred is None:
                return 0
            identity, key = cred
            ident = identity.encode("utf-8")
            value = key.reveal()
            if len(ident) + 1 > max_id or len(value) > max_psk:
                return 0
            _ffi.memmove(identity_out, ident + b"\0", len(ident) + 1)
            _ffi.memmove(psk_out, value, len(value))
            return len(value)
        except Exception as exc:
            log.error("TLS-PSK client callback failed (%s)", type(exc).__name__)
            return 0

    def connect(
        self,
        host: str,
        port: int,
        identity: str,
        key: Secret,
        *,
        server_name: str | None = None,
        timeout: float | None = 30.0,
    ) -> TlsConnection:
        """Open TCP, run the TLS-PSK handshake with ``psk_identity = identity``; return the connection.

        Raises :class:`TlsError` - before any application data is sent - unless the server proved ``key``.
        ``server_name`` (default ``host``) is sent as SNI and named in the error as the peer expected.
        """
        if not identity or len(identity.encode("utf-8")) > MAX_PSK_IDENTITY:
            raise TlsError(f"a psk_identity is 1 to {MAX_PSK_IDENTITY} bytes")
        where, expected = f"{host}:{port}", server_name or host
        tls = _open_client(self.context, host, port, server_name, timeout)
        conn = tls._conn
        conn._rspf_client_cred = (identity, key)  # type: ignore[attr-defined]
        try:
            tls.handshake()
        except TlsError as exc:
            subject = getattr(conn, "_rspf_refused_certificate", None)
            if subject is not None:
                raise TlsError(
                    f"the server at {where} answered with a certificate ({subject}) instead of proving the "
                    f"pre-shared key for psk_identity {identity!r}: it is not the expected {expected}; "
                    "nothing was sent to it") from None
            if isinstance(exc, _HandshakeInterrupted):  # a network fault, not a refusal: worth retrying
                raise TlsError(f"the TLS-PSK handshake with {where} did not complete ({exc}); nothing was sent "
                               "to it") from None
            raise TlsError(
                f"the server at {where} refused the TLS-PSK handshake for psk_identity {identity!r} "
                f"({exc}). A server that does not know this identity, holds another key or offers no "
                f"pre-shared-key cipher suite fails this way: it is not proven to be {expected}; nothing was "
                "sent to it") from None
        finally:
            conn._rspf_client_cred = None  # type: ignore[attr-defined]
        if not _psk_negotiated(conn):
            version, cipher = tls.version, tls.cipher
            tls.close()
            raise TlsError(
                f"the server at {where} completed a {version} handshake ({cipher}) without proving the pre-shared "
                f"key for psk_identity {identity!r}: it is not the expected {expected}; nothing was sent to it")
        tls.psk_identity = identity
        return tls


def _refuse_certificate(conn: SSL.Connection, cert: Any, _errno: int, _depth: int, _ok: int) -> bool:
    """Verify callback of a PSK client: a server that shows a certificate did not take the PSK."""
    conn._rspf_refused_certificate = _subject(cert)  # type: ignore[attr-defined]
    return False


def _psk_negotiated(conn: SSL.Connection) -> bool:
    """Whether an established session was authenticated by the external PSK (and by nothing else)."""
    if conn.get_peer_certificate() is not None:
        return False
    if conn.get_protocol_version_name() == "TLSv1.3":
        return bool(_lib.SSL_session_reused(conn._ssl))  # type: ignore[attr-defined]
    return "PSK" in (conn.get_cipher_name() or "").split("-")


class CertClient:
    """Client side of mutual TLS (TS-0003 §10.2.3 suites): presents ``cert_file`` / ``key_file``.

    A handshake completes only when the server's chain verifies to ``trust_anchor_file`` (the system's
    trust store is never consulted) and its certificate names the peer the caller expects
    (:func:`certificate_names`); otherwise :meth:`connect` raises :class:`TlsError` before any application
    data is sent. :attr:`own_id` is the oneM2M ID this client's own certificate names.
    """

    def __init__(self, trust_anchor_file: str | Path, cert_file: str | Path, key_file: str | Path, *,
                 min_version: str = "1.2", max_version: str = "1.3") -> None:
        check_psk_support()  # the verification messages use a private hook too
        self.trust_anchor_file = Path(trust_anchor_file)
        ctx = _context(min_version, max_version)
        try:
            ctx.load_verify_locations(str(trust_anchor_file))
            ctx.use_certificate_chain_file(str(cert_file))
            ctx.use_privatekey_file(str(key_file))
            ctx.check_privatekey()
            own = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
        except SSL.Error as exc:
            raise TlsError(f"cannot use the certificate files: {_describe(exc)}") from None
        except (OSError, ValueError) as exc:
            raise TlsError(f"cannot use the certificate file {cert_file}: "
                           f"{getattr(exc, 'strerror', None) or exc}") from None
        ctx.set_cipher_list(CERT_CIPHERS.encode())
        ctx.set_verify(SSL.VERIFY_PEER, _note_verify_error)
        self.context = ctx
        self.own_id = certificate_onem2m_id(own)

    def connect(self, host: str, port: int, expected_peer: str | None = None, *, server_name: str | None = None,
                timeout: float | None = 30.0) -> TlsConnection:
        """Open TCP and run the mutual-TLS handshake; ``expected_peer`` (default ``server_name`` or ``host``)
        is what the server's certificate must name (see :func:`certificate_names`)."""
        where, expected = f"{host}:{port}", expected_peer or server_name or host
        tls = _open_client(self.context, host, port, server_name, timeout)
        conn = tls._conn
        try:
            tls.handshake()
        except TlsError as exc:
            failure = getattr(conn, "_rspf_verify_error", None)
            if failure is not None:
                reason, depth, subject = failure
                raise TlsError(
                    f"the server at {where} presented a certificate ({subject}, chain depth {depth}) that does not "
                    f"verify to the trust anchor {self.trust_anchor_file}: {reason}. It is not proven to be "
                    f"{expected}; nothing was sent to it") from None
            raise TlsError(f"the mutual-TLS handshake with {where} failed ({exc}); nothing was sent to it") from None
        leaf = conn.get_peer_certificate()
        cert = leaf.to_cryptography() if leaf is not None else None
        if cert is None or not certificate_names(cert, expected):
            tls.close()
            named = ", ".join(_names_of(cert)) if cert is not None else "no certificate"
            raise TlsError(
                f"the server at {where} has a certificate from the trust anchor, but it names {named or 'nothing'}, "
                f"not the expected {expected}; nothing was sent to it")
        return tls


def _note_verify_error(conn: SSL.Connection, cert: Any, errno: int, depth: int, ok: int) -> bool:
    """Verify callback of a certificate client: OpenSSL decides; the first reason it gives is kept for the message."""
    if not ok and getattr(conn, "_rspf_verify_error", None) is None:
        reason = _ffi.string(_lib.X509_verify_cert_error_string(errno)).decode("ascii", "replace")
        conn._rspf_verify_error = (reason, depth, _subject(cert))  # type: ignore[attr-defined]
    return bool(ok)


def _open_client(context: SSL.Context, host: str, port: int, server_name: str | None,
                 timeout: float | None) -> TlsConnection:
    """TCP connection to ``host:port`` wrapped for a client handshake (SNI = ``server_name`` or ``host``)."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise TlsError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = SSL.Connection(context, sock)
    sni = server_name or host
    if sni and not _is_ip(sni):
        conn.set_tlsext_host_name(sni.encode("idna"))
    conn.set_connect_state()
    return TlsConnection(conn, sock, timeout)


def _subject(cert: Any) -> str:
    try:
        return "subject " + (cert.to_cryptography().subject.rfc4514_string() or "empty")
    except Exception:
        return "an unreadable certificate"


def certificate_onem2m_id(cert: x509.Certificate) -> str | None:
    """The oneM2M ID a certificate (``cryptography`` X.509) names, or None.

    Project decision (docs/acme-plugin.md): a subjectAltName URI holding an absolute oneM2M ID
    ``//sp/cse-id`` or ``//sp/cse-id/ae-id`` names ``/cse-id`` or ``ae-id``; otherwise the subject CN.
    """
    for uri in _san_values(cert, x509.UniformResourceIdentifier):
        if uri.startswith("//"):
            parts = uri[2:].split("/")
            if len(parts) == 2 and parts[1]:
                return "/" + parts[1]
            if len(parts) == 3 and parts[2]:
                return parts[2]
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else None


def certificate_names(cert: x509.Certificate, expected: str) -> bool:
    """Whether a server certificate names ``expected``.

    * an IP address: one of its IP-address subjectAltNames;
    * an absolute oneM2M ID ``//sp/cse-id``: one of its URI subjectAltNames, exactly;
    * a CSE-ID ``/cse-id``: :func:`certificate_onem2m_id` (the ``//sp/cse-id`` URI form);
    * anything else, a host name: one of its DNS subjectAltNames (case-insensitive, no wildcards).
    """
    if _is_ip(expected):
        return ipaddress.ip_address(expected) in _san_values(cert, x509.IPAddress)
    if expected.startswith("//"):
        return expected in _san_values(cert, x509.UniformResourceIdentifier)
    if expected.startswith("/"):
        return certificate_onem2m_id(cert) == expected
    return expected.rstrip(".").lower() in (d.lower() for d in _san_values(cert, x509.DNSName))


def _san_values(cert: x509.Certificate, kind: Any) -> list[Any]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                    .get_values_for_type(kind))
    except x509.ExtensionNotFound:
        return []


def _names_of(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [cert.subject.rfc4514_string()]
    return [str(getattr(name, "value", name)) for name in san]


def _is_ip(host: str) -> bool:
    for fam in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(fam, host)
            return True
        except OSError:
            pass
    return False


def _set_timeout(sock: socket.socket, timeout: float | None) -> None:
    """Socket-level timeouts keep the fd blocking (what pyOpenSSL expects) yet bound every wait."""
    t = 0.0 if timeout is None else max(timeout, 0.001)
    tv = struct.pack("ll", int(t), int((t - int(t)) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


class TlsPeer:
    """What a connection proved, common to :class:`TlsConnection` and :class:`ServerTls`."""

    _conn: SSL.Connection
    psk_identity: str | None
    peer: str  #: the peer's address, host:port

    @property
    def version(self) -> str:
        return self._conn.get_protocol_version_name()

    @property
    def cipher(self) -> str:
        return self._conn.get_cipher_name() or ""

    @property
    def has_peer_certificate(self) -> bool:
        """Whether the peer presented a certificate (verified, or the handshake would have failed)."""
        return self._conn.get_peer_certificate() is not None

    def peer_certificate(self) -> x509.Certificate | None:
        """The verified peer certificate (mutual TLS), or None."""
        cert = self._conn.get_peer_certificate()
        return None if cert is None else cert.to_cryptography()

    def peer_certificate_id(self) -> str | None:
        """The oneM2M ID a verified peer certificate names (mutual TLS; :func:`certificate_onem2m_id`), or None."""
        cert = self.peer_certificate()
        return None if cert is None else certificate_onem2m_id(cert)

    def export_keying_material(self, label: str, length: int) -> Secret:
        """RFC 5705 exporter, no context value (what ``openssl s_client -keymatexport`` computes)."""
        return Secret(self._conn.export_keying_material(label.encode("ascii"), length, None), "exporter output")


class _HandshakeInterrupted(TlsError):
    """A client handshake that ended without the server's verdict (timeout, connection closed or reset)."""


class TlsConnection(TlsPeer):
    """An established (or establishing) TLS connection with socket-like I/O."""

    def __init__(self, conn: SSL.Connection, sock: socket.socket, timeout: float | None) -> None:
        self._conn = conn
        self._sock = sock
        self.psk_identity: str | None = None
        self.peer = _peer_name(sock)
        self._timeout = timeout
        _set_timeout(sock, timeout)

    def set_timeout(self, timeout: float | None) -> None:
        """Bound each later wait by ``timeout`` seconds. A change of less than TIMEOUT_SLACK is not applied (two
        system calls per change): a deadline counted down per read may then be overrun by that much."""
        last = self._timeout
        if timeout is not None and last is not None and abs(timeout - last) < TIMEOUT_SLACK:
            return
        self._timeout = timeout
        _set_timeout(self._sock, timeout)

    def handshake(self) -> None:
        try:
            self._conn.do_handshake()
        except SSL.WantReadError:
            self.close()
            raise _HandshakeInterrupted("TLS handshake timed out") from None
        except SSL.SysCallError as exc:  # the peer closed or reset the connection: no TLS alert, no verdict
            self.close()
            raise _HandshakeInterrupted(f"the connection broke during the TLS handshake: {_describe(exc)}") from None
        except SSL.Error as exc:
            self.close()
            raise TlsError(f"TLS handshake failed: {_describe(exc)}") from None
        except OSError as exc:
            self.close()
            raise _HandshakeInterrupted(f"the connection broke during the TLS handshake: "
                                        f"{exc.strerror or type(exc).__name__}") from None
        ident = getattr(self._conn, "_rspf_psk_identity", None)
        if ident is not None:
            self.psk_identity = ident

    def recv(self, size: int) -> bytes:
        """Up to ``size`` decrypted bytes; b"" at the end of the stream. TimeoutError, ConnectionError."""
        try:
            return self._conn.recv(size)
        except SSL.ZeroReturnError:
            return b""
        except SSL.WantReadError:
            raise TimeoutError("TLS read timed out") from None
        except SSL.SysCallError as exc:
            if exc.args and exc.args[0] in (-1, 0):  # unexpected EOF
                return b""
            raise ConnectionError(_describe(exc)) from None
        except SSL.Error as exc:
            raise ConnectionError(f"TLS record error: {_describe(exc)}") from None

    def recv_into(self, buf: memoryview | bytearray) -> int:
        data = self.recv(len(buf))
        n = len(data)
        buf[:n] = data
        return n

    def sendall(self, data: bytes) -> None:
        try:
            self._conn.sendall(data)
        except SSL.WantWriteError:
            raise TimeoutError("TLS write timed out") from None
        except SSL.Error as exc:
            raise ConnectionError(f"TLS write failed: {_describe(exc)}") from None

    def makefile(self) -> io.BufferedReader:
        return io.BufferedReader(_RawTls(self), 16384)

    def close(self) -> None:
        try:
            self._conn.shutdown()
        except Exception:
            pass
        try:
            self._sock.close()
        except OSError:
            pass

    def __repr__(self) -> str:
        return f"<TlsConnection peer={self.peer} psk_identity={self.psk_identity!r}>"


class ServerTls(TlsPeer):
    """A server-side TLS connection over memory BIOs: the caller moves bytes between its socket and
    :meth:`feed` / :meth:`outgoing`, so nothing here waits on the network. One thread at a time.

    With a ``cert_context`` (:meth:`PskServer.use_certificates`), the first bytes are held until the ClientHello
    is complete: one that offers a TLS 1.3 pre-shared key gets ``context``, any other ``cert_context``."""

    def __init__(self, context: SSL.Context, peer: tuple[str, int], cert_context: SSL.Context | None = None) -> None:
        self.peer_ip = peer[0]
        self.peer = f"{peer[0]}:{peer[1]}"
        self.psk_identity: str | None = None
        self._conn = self._connection(context)
        self._cert_context = cert_context
        self._held: bytearray | None = bytearray() if cert_context is not None else None

    def _connection(self, context: SSL.Context) -> SSL.Connection:
        conn = SSL.Connection(context, None)
        conn._rspf_peer_ip = self.peer_ip  # type: ignore[attr-defined]
        conn.set_accept_state()
        return conn

    @property
    def presented_identity(self) -> str | None:
        """The psk_identity the client offered, proved or not (for refusal logs; never a key)."""
        return getattr(self._conn, "_rspf_presented", None)

    def feed(self, data: bytes | memoryview) -> None:
        """Bytes received from the client."""
        if self._held is None:
            self._conn.bio_write(data)
            return
        self._held += data
        verdict = offers_tls13_psk(bytes(self._held))
        if verdict is None and len(self._held) < MAX_CLIENT_HELLO:
            return  # the ClientHello is not complete yet
        if not verdict:
            assert self._cert_context is not None
            self._conn = self._connection(self._cert_context)
        held, self._held = bytes(self._held), None
        self._conn.bio_write(held)

    def outgoing(self) -> bytes:
        """Bytes to send to the client (handshake flights, records, alerts), possibly empty."""
        n = _mem_pending(self._conn._from_ssl)  # type: ignore[attr-defined]
        return self._conn.bio_read(n) if n else b""

    def handshake_step(self) -> bool:
        """Advance the handshake with what was fed; True once complete. May run the PSK lookup (which may
        block). Raises :class:`TlsError` when the handshake fails (an alert may wait in :meth:`outgoing`)."""
        if self._held is not None:
            return False  # the context is chosen once the ClientHello is complete
        try:
            self._conn.do_handshake()
        except SSL.WantReadError:
            return False
        except SSL.Error as exc:
            failure = getattr(self._conn, "_rspf_verify_error", None)
            if failure is not None:
                reason, depth, subject = failure
                raise TlsError(f"the client certificate ({subject}, chain depth {depth}) does not verify to the "
                               f"trust anchor: {reason}") from None
            raise TlsError(f"TLS handshake failed: {_describe(exc)}") from None
        self.psk_identity = getattr(self._conn, "_rspf_psk_identity", None)
        return True

    def receive(self) -> tuple[bytes, bool]:
        """Decrypt what was fed: (plaintext, the client sent close_notify). ConnectionError on a bad record."""
        out: list[bytes] = []
        conn = self._conn
        while True:
            try:
                data = conn.recv(65536)
            except SSL.WantReadError:
                return b"".join(out), False
            except SSL.ZeroReturnError:
                return b"".join(out), True
            except SSL.Error as exc:
                raise ConnectionError(f"TLS record error: {_describe(exc)}") from None
            if not data:
                return b"".join(out), False
            out.append(data)
            if not conn.pending() and not _mem_pending(conn._into_ssl):  # type: ignore[attr-defined]
                return b"".join(out), False  # nothing more to decrypt: spare the call that would say so

    def send(self, data: bytes) -> None:
        """Encrypt ``data``; the records are then in :meth:`outgoing`."""
        try:
            self._conn.sendall(data)
        except SSL.Error as exc:
            raise ConnectionError(f"TLS write failed: {_describe(exc)}") from None

    def close_notify(self) -> None:
        """Queue a close_notify alert (in :meth:`outgoing`) if the session got that far."""
        try:
            self._conn.shutdown()
        except SSL.Error:
            pass

    def __repr__(self) -> str:
        return f"<ServerTls peer={self.peer} psk_identity={self.psk_identity!r}>"


#: Bytes of TLS records held to read a ClientHello before giving up and letting OpenSSL judge them
MAX_CLIENT_HELLO = 16384 + 5
_HANDSHAKE_RECORD, _CLIENT_HELLO, _EXT_PRE_SHARED_KEY = 22, 1, 41


def offers_tls13_psk(data: bytes) -> bool | None:
    """Whether the ClientHello at the start of ``data`` (TLS records) has a pre_shared_key extension (RFC 8446
    §4.2.11: the client offers a TLS 1.3 PSK); None while it is incomplete. Anything else is False (OpenSSL
    then judges the bytes)."""
    hello = bytearray()
    pos, size = 0, None
    while size is None or len(hello) < size:
        if len(data) < pos + TLS_RECORD_HEADER:
            return None
        length = int.from_bytes(data[pos + 3:pos + 5], "big")
        if data[pos] != _HANDSHAKE_RECORD:
            return False
        if len(data) < pos + TLS_RECORD_HEADER + length:
            return None
        hello += data[pos + TLS_RECORD_HEADER:pos + TLS_RECORD_HEADER + length]
        pos += TLS_RECORD_HEADER + length
        if size is None and len(hello) >= 4:
            if hello[0] != _CLIENT_HELLO:
                return False
            size = 4 + int.from_bytes(hello[1:4], "big")
        if size is None and not length:
            return False  # an empty record: no ClientHello starts like this
    body = bytes(hello[4:size])
    try:
        p = 2 + 32                                     # legacy_version, random
        p += 1 + body[p]                               # legacy_session_id
        p += 2 + int.from_bytes(body[p:p + 2], "big")  # cipher_suites
        p += 1 + body[p]                               # legacy_compression_methods
        end = min(len(body), p + 2 + int.from_bytes(body[p:p + 2], "big"))
        p += 2
        while p + 4 <= end:
            if int.from_bytes(body[p:p + 2], "big") == _EXT_PRE_SHARED_KEY:
                return True
            p += 4 + int.from_bytes(body[p + 2:p + 4], "big")
    except IndexError:
        return False
    return False


class _RawTls(io.RawIOBase):
    def __init__(self, tls: TlsConnection) -> None:
        self._tls = tls

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        return self._tls.recv_into(memoryview(b).cast("B"))


def _mem_pending(bio: Any) -> int:
    """Bytes waiting in a memory BIO (OpenSSL's BIO_get_mem_data: their count for a memory BIO)."""
    return int(_lib.BIO_get_mem_data(bio, _ffi.NULL))


def _peer_name(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"


def _describe(exc: Exception) -> str:
    """A short, key-free description of an OpenSSL error."""
    args: tuple[Any, ...] = tuple(getattr(exc, "args", ()))
    if args and isinstance(args[0], list) and args[0]:
        parts = []
        for item in args[0]:
            if isinstance(item, tuple) and len(item) >= 3:
                parts.append(str(item[2]))
        if parts:
            return "; ".join(parts)
    if args and isinstance(args[0], tuple) or len(args) == 2:
        return str(args[-1])
    return type(exc).__name__
