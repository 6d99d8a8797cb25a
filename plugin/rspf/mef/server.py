"""MEF transport: the oneM2M HTTP binding over TLS-PSK, and over mutual TLS with certificates when configured
(rspf.httpserver), in front of rspf.mef.service.

Store and policy live in rspf.mef.store / rspf.mef.service; this module only maps HTTP to them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import h11

from .. import est, keys, wire
from ..audit import Action
from ..errors import RSC, EnrolmentRateLimited, OperationNotAllowed, RspfError
from ..httpserver import TlsHttpServer
from ..metrics import refusal_reason
from ..secret import Secret
from ..tls import PskServer, ServerTls
from . import protocol
from .config import MefConfig
from .service import MefService, Session

log = logging.getLogger(__name__)

_METHODS = frozenset(m.encode("ascii") for m in wire.OPERATIONS)
_SESSION_REFUSED = "session refused"


class MefServer(TlsHttpServer):
    name = "mef"
    lookup_may_block = False  # the PSK lookup reads the local store (one indexed query)
    work_may_block = False  # the service reads and writes the local store; it never waits on the network

    def __init__(self, config: MefConfig, service: MefService) -> None:
        tls = PskServer(service.psk_for, min_version=config.tls_min_version, max_version=config.tls_max_version)
        certificates = _certificate_files(config, service)
        if certificates is not None:
            tls.use_certificates(*certificates)
        super().__init__(tls, host=config.listen, port=config.port, limits=config.server_limits())
        self.config = config
        self.service = service
        self.on_refusal = self._observe_refusal

    def _observe_refusal(self, reason: str, peer: str, identity: str | None, detail: str) -> None:
        """A connection the transport refused: counted, and in the audit log (rate-limited)."""
        if reason == _SESSION_REFUSED:
            return  # the service counted and recorded it
        self.service.metrics.refusals.labels(refusal_reason(reason)).inc()
        self.service.audit.refused(Action.CONNECTION, actor=f"peer:{peer}", subject=identity or "-",
                                   cause=f"{reason}: {detail}" if detail else reason,
                                   source=peer.rpartition(":")[0] or peer)

    def serve_forever(self) -> None:
        if self._sock is None:
            self.bind()
        host, port = self.address
        self.service.est_uri = f"https://{self.config.fqdn}:{port}{est.EST_PATH}"
        log.info("MEF %s listening on %s:%d (TLS-PSK%s %s-%s)", self.config.fqdn, host, port,
                 " and certificates" if self.psk.cert_context is not None else "",
                 self.config.tls_min_version, self.config.tls_max_version)
        super().serve_forever()

    def open_session(self, tls: ServerTls) -> Session | None:
        def exporter() -> Secret:
            return tls.export_keying_material(keys.EXPORTER_LABEL_BOOTSTRAP, keys.EXPORTER_LENGTH)

        try:
            if tls.psk_identity is not None:
                session = self.service.open_session(tls.psk_identity, exporter)
            elif self.psk.cert_context is not None and tls.has_peer_certificate:
                session = self.service.open_certificate_session(tls.peer_certificate_id(), exporter, tls.peer,
                                                                tls.peer_certificate())
            else:
                return None  # no PSK and no certificate: no credential
        except RspfError as exc:
            self.refuse(_SESSION_REFUSED, tls.peer, tls.psk_identity, str(exc))
            return None
        session.est_binding = lambda: tls.export_keying_material(est.EXPORTER_LABEL_EST, est.EXPORTER_LENGTH_EST)
        log.debug("session %r from %s (%s, %s)", session, tls.peer, tls.version, tls.cipher)
        return session

    def check_request(self, req: h11.Request) -> None:
        if req.method not in _METHODS:  # case-sensitive (RFC 9110 §9.1): `get` is not GET
            raise OperationNotAllowed(f"the HTTP method {req.method[:16].decode('ascii', 'replace')!r} has no "
                                      "oneM2M operation; use GET, POST, PUT or DELETE")

    def respond(self, session: Session, req: wire.HttpRequest) -> tuple[wire.HttpResponse, bool]:
        if est.is_est_path(req.path):  # certificate provisioning: plain HTTP answers (RFC 7030)
            answer = self.service.est(session, req.method, req.path, req.body)
            headers = {"content-type": answer.content_type}
            if answer.status == 200:
                headers["content-transfer-encoding"] = "base64"
            if answer.retry_after is not None:
                headers["retry-after"] = str(answer.retry_after)
            return wire.HttpResponse(answer.status, headers, answer.body), False
        ri, rvi = req.header("x-m2m-ri"), req.header("x-m2m-rvi")  # echoed only if valid (wire checks)
        fetch = protocol.is_fetch_path(req.path)
        try:
            prim = wire.to_primitive(req)
            reply = self.service.handle(session, prim.operation, prim.to, prim.originator, prim.content)
            return wire.onem2m_response(reply.rsc, reply.content, request_id=prim.request_id,
                                        rvi=prim.rvi), reply.close
        except RspfError as exc:
            if exc.rsc is RSC.INTERNAL_SERVER_ERROR:
                log.error("request %s failed: %s", protocol.PATH_FETCH_CREDENTIALS + "/..." if fetch else req.path, exc)
            else:
                log.info("request from %s refused with %d: %s", session.principal_id, int(exc.rsc), exc)
            if fetch:  # TS-0003 Table 8.3.2.1-6
                return wire.onem2m_response(exc.rsc, protocol.fetch_error(str(exc)), request_id=ri, rvi=rvi), False
            resp = wire.error_response(exc, request_id=ri, rvi=rvi)
            if isinstance(exc, EnrolmentRateLimited):
                resp.headers["retry-after"] = str(exc.retry_after)
            return resp, False


def _certificate_files(config: MefConfig, service: MefService) -> tuple[Path, Path, Path] | None:
    """(certificate chain, key, client trust anchors) of the MEF's certificate handshake, or None (PSK only).

    The configured certificate when there is one; otherwise, with certificate provisioning, the FQDN certificate
    the MEF's CA issues it at each start. Client certificates chain to tls_client_ca_file (bootstrap
    certificates) or to the MEF's CA (the certificates it issued, for renewal): both go into one bundle."""
    ca = service.ca
    if config.tls_cert_file is None and ca is None:
        return None
    own_cert, own_key, bundle = config.own_certificate_files
    if config.tls_cert_file is not None:
        assert config.tls_key_file is not None and config.tls_client_ca_file is not None
        cert, key = config.tls_cert_file, config.tls_key_file
    else:
        assert ca is not None
        ca.write_server_certificate(config.fqdn, own_cert, own_key)
        cert, key = own_cert, own_key
    anchors = [config.tls_client_ca_file.read_bytes()] if config.tls_client_ca_file is not None else []
    if ca is not None:
        anchors.append(ca.cert_file.read_bytes())
    if len(anchors) == 1 and config.tls_client_ca_file is not None:
        return cert, key, config.tls_client_ca_file
    bundle.write_bytes(b"\n".join(anchors))
    return cert, key, bundle
