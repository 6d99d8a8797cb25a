"""MEF policy: who may do what, the Enrolment Exchange state machine, profile issuing, fetchCredentials.

No sockets here. The transport (rspf.mef.server) authenticates a TLS-PSK connection and calls
:meth:`MefService.open_session` with the proven psk_identity and the exporter output - or a mutual-TLS
connection and calls :meth:`MefService.open_certificate_session` with the ID its verified certificate names -
then hands each oneM2M request to :meth:`MefService.handle`.

Resources and messages (project-defined; TS-0032 is not available): rspf.mef.protocol and
docs/mef-interface.md.
"""

from __future__ import annotations

import base64
import datetime as dt
import enum
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .. import est, ids, keys, profile
from ..audit import Action, AuditLog
from ..errors import RSC, AccessDenied, BadRequest, EnrolmentRateLimited, NotFound, OperationNotAllowed, RspfError
from ..metrics import MefMetrics
from ..ratelimit import Clock, RefusalLog, TokenBucket
from ..secret import Secret
from . import protocol
from .ca import MefCa
from .config import MefConfig
from .store import ACTIVE, CERT_ACTIVE, BudgetState, EnroleeRecord, MefStore, PurgeCounts, utcnow

log = logging.getLogger(__name__)

#: Enrolee records kept between a handshake and its session (one per handshake in progress; the oldest go first)
HANDOVER_SIZE = 1024

#: A sequence number above any the revocation log will write (asks the store for its newest number only)
_BEYOND_ANY_SEQ = 2**62


class Principal(enum.Enum):
    ENROLEE = "enrolee"
    TARGET = "target"
    HOLDER = "holder"  # authenticated with a certificate this MEF's CA issued: EST only (renewal)


class Phase(enum.Enum):
    """Enrolment Exchange states of one Enrolee session."""

    STARTED = "started"            # handshake done; Ke, KeID derived, nothing stored yet
    INSTRUCTED = "instructed"      # an instruction was sent; waiting for the Enrolee's acknowledgement
    ENDED = "ended"                # end of the exchange sent; the MEF closes the session


@dataclass
class Session:
    """One authenticated connection (TLS-PSK, or mutual TLS with a certificate for an Enrolee)."""

    kind: Principal
    psk_identity: str                  # the credential's handle: psk_identity, or an enrolee's (see EnroleeRecord)
    principal_id: str                  # absolute CSE-ID / AE-ID of whoever authenticated
    enrolee: EnroleeRecord | None = None
    ke_id: str | None = None
    enrolment_key: Secret | None = None
    created: dt.datetime = field(default_factory=utcnow)
    phase: Phase = Phase.STARTED
    committed: bool = False
    pending: list[dict[str, Any]] = field(default_factory=list)
    #: the channel binding of a CSR sent in this session (rspf.est.EXPORTER_LABEL_EST), computed when needed
    est_binding: Callable[[], Secret] | None = None
    #: for a HOLDER: the issued certificate that authenticated the session
    certificate: x509.Certificate | None = None

    def __repr__(self) -> str:
        return f"<Session {self.kind.value} {self.psk_identity} ke_id={self.ke_id} phase={self.phase.value}>"


@dataclass
class Reply:
    rsc: RSC
    content: Any = None
    close: bool = False


@dataclass(frozen=True)
class EstReply:
    """An EST answer (RFC 7030): plain HTTP, not a oneM2M primitive."""

    status: int
    content_type: str
    body: bytes
    retry_after: int | None = None  # seconds, for a rate-limited request (HTTP Retry-After)

    @classmethod
    def refused(cls, status: int, sentence: str, retry_after: int | None = None) -> EstReply:
        return cls(status, "text/plain; charset=utf-8", sentence.encode() + b"\n", retry_after)


class MefService:
    def __init__(self, config: MefConfig, store: MefStore, *, clock: Clock = time.time,
                 audit: AuditLog | None = None, metrics: MefMetrics | None = None, ca: MefCa | None = None) -> None:
        self.config = config
        self.store = store
        #: the CA behind the EST server (None: no certificate provisioning) and where the EST server is
        self.ca = ca
        self.est_uri = f"https://{config.fqdn}:{config.port}{est.EST_PATH}"
        self.audit = audit or AuditLog(None)  # every enrolment, fetch and refusal (docs/observability.md)
        self.metrics = metrics or MefMetrics()
        self.refusals = RefusalLog(log)  # every refusal, with the identity and the reason (never a key)
        self._handover: dict[str, EnroleeRecord] = {}  # enrolee records read at the handshake, by identity
        self._handover_lock = threading.Lock()
        self._clock = clock  # wall-clock seconds: enrolment budgets are stored and shared by every instance

    # -- authentication -------------------------------------------------------------------------
    def psk_for(self, identity: str, peer_ip: str | None = None) -> Secret | None:
        """The PSK for a presented psk_identity: an enrolee's Kpm (KpmID) or a Target's PSK. ``peer_ip`` (the
        client's address, from the transport's PSK lookup) is named when the identity is refused.

        The enrolee record read with the key is kept (a bounded handover, the most recent first) for
        :meth:`open_session`, which follows in another thread: a session costs one query, not two.
        """
        found = self.store.enrolee_and_psk(identity)
        if found is not None:
            with self._handover_lock:
                self._handover[identity] = found[0]
                while len(self._handover) > HANDOVER_SIZE:
                    self._handover.pop(next(iter(self._handover)))
            return found[1]
        psk = self.store.target_psk(identity)
        if psk is None:
            self.refusals.refused("TLS-PSK identity %r from %s refused: no Enrolee (KpmID) or Enrolment Target has "
                                  "it, or it is revoked or expired", identity, peer_ip or "?")
            self.metrics.refusals.labels("unknown identity").inc()
            self.audit.refused(Action.AUTHENTICATE, actor=f"peer:{peer_ip or '?'}", subject=identity,
                               cause="no Enrolee (KpmID) or Enrolment Target has this TLS-PSK identity, or it is "
                                     "revoked or expired", source=peer_ip)
        return psk

    def absolute_id(self, any_id: str, registrar_cse_id: str | None = None) -> str:
        """Absolute form //sp/... of a CSE-ID (/id) or an AE-ID (C..., S... under its registrar)."""
        return ids.absolute_id(any_id, self.config.sp_id, registrar_cse_id)

    def open_session(self, psk_identity: str,
                     exporter_output: Secret | Callable[[], Secret] | None) -> Session:
        """Start a session for an authenticated psk_identity. ``exporter_output`` (or a function computing it,
        called only for an Enrolee) is the session's ``EXPORTER-oneM2M-Bootstrap`` output."""
        with self._handover_lock:
            enrolee = self._handover.pop(psk_identity, None)
        if enrolee is None:
            enrolee = self.store.get_enrolee(psk_identity)
        if enrolee is not None:
            if callable(exporter_output):
                exporter_output = exporter_output()
            if exporter_output is None:
                raise RspfError("an enrolee session needs the exporter output")
            return self._enrolee_session(enrolee, exporter_output)
        target = self.store.get_target(psk_identity)
        if target is None:  # removed between handshake and now
            self.refusals.refused("session of psk_identity %r refused: the credential is no longer registered",
                                  psk_identity)
            self.metrics.refusals.labels("credential removed").inc()
            self.audit.refused(Action.AUTHENTICATE, actor="peer:?", subject=psk_identity,
                               cause="the credential is no longer registered")
            raise AccessDenied("the presented credential is no longer registered")
        return Session(Principal.TARGET, psk_identity, self.absolute_id(target.target_id))

    def open_certificate_session(self, cert_id: str | None, exporter_output: Callable[[], Secret],
                                 peer: str = "?", certificate: x509.Certificate | None = None) -> Session:
        """Start an Enrolee session for a client whose certificate chain OpenSSL verified to the configured trust
        anchor; ``cert_id`` is the oneM2M ID it names (rspf.tls.certificate_onem2m_id). The enrolee registered
        with that certificate ID must be active and within its validity; otherwise AccessDenied, logged.

        A certificate this MEF's CA issued (``certificate``) opens a HOLDER session instead: EST only (renewal),
        while that certificate is recorded active and its enrolee is active."""
        if certificate is not None and self.ca is not None and self.ca.issued_here(certificate):
            return self._holder_session(certificate, peer)
        enrolee = self.store.enrolee_by_certificate(cert_id) if cert_id else None
        why = ("the certificate names no oneM2M ID" if not cert_id else
               "no Enrolee is registered with this certificate ID" if enrolee is None else
               f"the Enrolee is {enrolee.state}" if enrolee.state != ACTIVE else
               "the Enrolee is past its validUntil" if not enrolee.may_enrol() else None)
        if why is not None:
            self.refusals.refused("certificate %r from %s refused: %s", cert_id, peer, why)
            self.metrics.refusals.labels("certificate refused").inc()
            self.audit.refused(Action.AUTHENTICATE, actor=f"peer:{peer}", subject=cert_id or "-", cause=why,
                               source=peer.rpartition(":")[0] or peer)
            raise AccessDenied(f"the certificate is not accepted: {why}")
        assert enrolee is not None
        return self._enrolee_session(enrolee, exporter_output)

    def _holder_session(self, certificate: x509.Certificate, peer: str) -> Session:
        sha256 = est.fingerprint(certificate)
        record = self.store.get_certificate(sha256)
        enrolee = self.store.get_enrolee(record.kpm_id) if record is not None else None
        why = ("this MEF has no record of the certificate" if record is None else
               f"the certificate was revoked ({record.cause})" if record.state != CERT_ACTIVE else
               "its enrolee no longer exists" if enrolee is None else
               f"its enrolee is {enrolee.state}" if not enrolee.may_enrol() else None)
        if why is not None:
            self.refusals.refused("issued certificate %s from %s refused: %s", sha256, peer, why)
            self.metrics.refusals.labels("certificate refused").inc()
            self.audit.refused(Action.AUTHENTICATE, actor=f"peer:{peer}", subject=f"certificate {sha256}", cause=why,
                               source=peer.rpartition(":")[0] or peer)
            raise AccessDenied(f"the certificate is not accepted: {why}")
        assert enrolee is not None
        return Session(Principal.HOLDER, enrolee.kpm_id,
                       self.absolute_id(enrolee.enrolee_id, enrolee.registrar_cse_id), enrolee,
                       certificate=certificate)

    def _enrolee_session(self, enrolee: EnroleeRecord, exporter_output: Secret | Callable[[], Secret]) -> Session:
        """An Enrolee session: KeID and Ke from the session's exporter output, whatever authenticated it."""
        if callable(exporter_output):
            exporter_output = exporter_output()
        material = keys.split_exporter_output(exporter_output)
        ke_id = keys.make_ke_id(material.relative_ke_id, self.config.fqdn)
        return Session(Principal.ENROLEE, enrolee.kpm_id,
                       self.absolute_id(enrolee.enrolee_id, enrolee.registrar_cse_id), enrolee, ke_id,
                       material.enrolment_key)

    # -- dispatch -------------------------------------------------------------------------------
    def handle(self, session: Session, operation: str, to: str, originator: str, content: Any) -> Reply:
        try:
            return self._dispatch(session, operation, to, originator, content)
        except RspfError as exc:
            if exc.rsc is not RSC.INTERNAL_SERVER_ERROR:
                self.refusals.refused("%s %r from %s (psk_identity %r, originator %r) refused with %d: %s",
                                      operation, to[:200], session.principal_id, session.psk_identity,
                                      originator[:100], int(exc.rsc), exc)
            self._observe_refusal(session, operation, to, originator, exc)
            raise

    def _observe_refusal(self, session: Session, operation: str, to: str, originator: str,
                         exc: RspfError) -> None:
        """Count a refused (or failed) request and write it to the audit log."""
        path = to.rstrip("/") or "/"
        subject = path[:200]
        details: dict[str, str | int | bool] = {"operation": operation[:16], "originator": originator[:100],
                                                "principal": session.principal_id, "rsc": int(exc.rsc)}
        failed = exc.rsc is RSC.INTERNAL_SERVER_ERROR
        if protocol.is_fetch_path(path):
            action = Action.FETCH
            self.metrics.fetches.labels("failed" if failed else "refused").inc()
            try:
                subject, suid = protocol.parse_fetch_path(path)
                details["suid"] = suid
            except RspfError:
                pass
        elif protocol.is_revocations_path(path):
            action = Action.REVOCATION_FEED
        elif path in (protocol.PATH_SECURITY_PROFILE, protocol.PATH_ENROLMENT_EXCHANGE):
            action = Action.ENROLMENT
            self.metrics.enrolments.labels("rate_limited" if isinstance(exc, EnrolmentRateLimited) else
                                           "failed" if failed else "refused").inc()
        else:
            action = Action.REQUEST
        if failed:
            return  # not a refusal: the operator's log has the error
        self.metrics.refusals.labels(f"{action.value} {int(exc.rsc)}").inc()
        self.audit.refused(action, actor=f"{session.kind.value}:{session.psk_identity}", subject=subject,
                           cause=str(exc), details=details)

    def _dispatch(self, session: Session, operation: str, to: str, originator: str, content: Any) -> Reply:
        path = to.rstrip("/") or "/"
        if protocol.is_fetch_path(path):
            if operation != "RETRIEVE":
                raise OperationNotAllowed("fetchCredentials accepts only RETRIEVE (HTTP GET)")
            return self.fetch_credentials(session, path, originator)
        if protocol.is_revocations_path(path):
            if operation != "RETRIEVE":
                raise OperationNotAllowed("the revocation feed accepts only RETRIEVE (HTTP GET)")
            return self.revocations(session, path, originator)
        if path == protocol.PATH_SECURITY_PROFILE:
            if operation != "CREATE":
                raise OperationNotAllowed("securityProfile accepts only CREATE (HTTP POST)")
            return self.provision_profile(session, content)
        if path == protocol.PATH_ENROLMENT_EXCHANGE:
            if operation != "CREATE":
                raise OperationNotAllowed("enrolmentExchange accepts only CREATE (HTTP POST)")
            return self.enrolment_exchange(session, content)
        raise NotFound(f"the MEF has no resource {to!r}; see docs/mef-interface.md")

    # -- enrolee side ---------------------------------------------------------------------------
    def _require_enrolee(self, session: Session) -> EnroleeRecord:
        if session.kind is not Principal.ENROLEE or session.enrolee is None:
            raise AccessDenied("only an Enrolee authenticated with its KpmID or its certificate may use this resource")
        if session.phase is Phase.ENDED:
            raise OperationNotAllowed("the Enrolment Exchange of this session has ended")
        if not session.committed:
            self._check_enrolment_budget(session.enrolee.enrolment_budget)
        return session.enrolee

    def _budget(self, state: BudgetState) -> tuple[TokenBucket, float]:
        """An enrolee's enrolment budget (``enrolment_rate_burst`` enrolments back to back, then one more every
        ``enrolment_rate_interval_seconds``) from its stored state, and the time now."""
        now = self._clock()
        bucket = TokenBucket(1.0 / self.config.enrolment_rate_interval_seconds, self.config.enrolment_rate_burst, now)
        if state is not None:
            bucket.tokens, bucket.stamp = state[0], min(state[1], now)  # (another host's clock may be ahead)
        return bucket, now

    def _check_enrolment_budget(self, state: BudgetState) -> None:
        """Refuse (5207, with a retry hint) an enrolee that spent its enrolment budget."""
        bucket, now = self._budget(state)
        if bucket.available(now):
            return
        wait = max(1, math.ceil((1.0 - bucket.tokens) / bucket.rate))
        raise EnrolmentRateLimited(
            f"this enrolee has enrolled too often ({self.config.enrolment_rate_burst} enrolments, then one every "
            f"{self.config.enrolment_rate_interval_seconds:g} s); try again in {wait} s", wait)

    def _charge_enrolment(self, state: BudgetState) -> tuple[float, float]:
        """The store calls this with the enrolee's row locked (rspf.mef.store.BudgetCharge): the budget holds
        across MEF instances, whichever one each session reaches."""
        self._check_enrolment_budget(state)
        bucket, now = self._budget(state)
        bucket.charge(now)
        return bucket.tokens, bucket.stamp

    def _expiry(self, session: Session) -> dt.datetime:
        rec = session.enrolee
        assert rec is not None
        seconds = rec.enrolment_expiry_seconds or self.config.enrolment_expiry_seconds
        expires = session.created + dt.timedelta(seconds=seconds)
        if rec.valid_until is not None:
            expires = min(expires, rec.valid_until)
        return expires

    def _commit(self, session: Session) -> None:
        """Store Ke under its KeID (once per session): from now on Targets can fetch keys for it."""
        if session.committed:
            return
        assert session.ke_id and session.enrolment_key and session.enrolee
        cfg = self.config
        retired = self.store.put_enrolment_key(
            session.ke_id, session.psk_identity, session.enrolment_key, session.created, self._expiry(session),
            kpm_generation=session.enrolee.kpm_generation,
            retire_after=dt.timedelta(seconds=cfg.key_retirement_grace_seconds),
            max_live_keys=cfg.max_live_keys_per_enrolee, charge=self._charge_enrolment)
        session.committed = True
        self.metrics.enrolments.labels("ok").inc()
        self.audit.record(Action.ENROLMENT_KEY, actor=f"enrolee:{session.psk_identity}", subject=session.ke_id,
                          details={"enroleeID": session.enrolee.enrolee_id,
                                   "expires": profile.format_timestamp(self._expiry(session)),
                                   "retiredNow": ",".join(retired)})
        log.info("enrolee %s (KpmID %s) enrolled: KeID %s, expires %s; its earlier KeIDs retire in %d s",
                 session.enrolee.enrolee_id, session.psk_identity, session.ke_id, self._expiry(session).isoformat(),
                 cfg.key_retirement_grace_seconds)
        if retired:
            log.info("enrolee %s holds more than %d live KeIDs: retired %s at once", session.enrolee.enrolee_id,
                     cfg.max_live_keys_per_enrolee, ", ".join(retired))

    def registrar_key(self, session: Session) -> tuple[Secret, str]:
        rec = session.enrolee
        assert rec is not None and session.enrolment_key is not None
        fqdn = keys.target_fqdn(self.absolute_id(rec.registrar_cse_id))
        return keys.derive_usage_constrained_key(session.enrolment_key, keys.SUID_RSPF_SAEF, fqdn), fqdn

    def provision_profile(self, session: Session, content: Any) -> Reply:
        rec = self._require_enrolee(session)
        req = protocol.ProfileRequest.from_body(content)
        node_id, location = req.node_id, req.location
        if node_id != rec.node_id:
            raise AccessDenied("the M2M-Node-ID in the request is not the one registered for this KpmID")
        key, fqdn = self.registrar_key(session)
        body: dict[str, Any] = {
            "version": 1,
            "enroleeType": rec.enrolee_type,
            "enroleeID": rec.enrolee_id,
            "nodeID": rec.node_id,
            "spID": self.config.sp_id,
            "mefFQDN": self.config.fqdn,
            "registrar": {"cseID": rec.registrar_cse_id, "cseBaseURI": rec.registrar_uri, "fqdn": fqdn},
            "credential": {"keyID": session.ke_id, "suid": keys.SUID_RSPF_SAEF,
                           "key": base64.b64encode(key.reveal()).decode()},
            "issuedAt": profile.format_timestamp(session.created),
            "expiry": profile.format_timestamp(self._expiry(session)),
        }
        if location:
            body["location"] = location
        if rec.rm_uri:
            body["remoteManagementURI"] = rec.rm_uri
        try:
            profile.validate(body)
        except RspfError:
            log.error("refusing to send a securityProfile that fails the schema (enrolee %s)", rec.enrolee_id)
            raise RspfError("the MEF produced an invalid securityProfile; nothing was provisioned") from None
        self._commit(session)
        self.metrics.profiles.inc()
        assert session.ke_id is not None
        self.audit.record(Action.ENROLMENT_PROFILE, actor=f"enrolee:{session.psk_identity}", subject=session.ke_id,
                          details={"enroleeID": rec.enrolee_id, "nodeID": rec.node_id,
                                   "registrar": rec.registrar_cse_id})
        return Reply(RSC.CREATED, {profile.WRAPPER: body})

    def enrolment_exchange(self, session: Session, content: Any) -> Reply:
        rec = self._require_enrolee(session)
        name, value = protocol.exchange_message(content)
        if name == protocol.ENROL_REQ:
            if session.phase is not Phase.STARTED:
                raise OperationNotAllowed("the initial Enrolment Exchange request was already sent in this session")
            flags = protocol.parse_enrol_request(value)
            # A certificate is instructed to an entitled Enrolee that asks (docs/certificates.md); this MEF runs
            # no MAF (not in this release). A remote management server is instructed when one is registered and
            # the Enrolee is ready.
            if flags["certificateEnrolment"]:
                instruction = self.certificate_instruction(rec)
                if instruction is not None:
                    session.pending.append(instruction.to_instruction())
                else:
                    log.info("enrolee %s asked for a certificate but is not entitled to one (or this MEF issues "
                             "none); not instructing it", rec.enrolee_id)
            if rec.rm_uri and flags["remoteManagement"]:
                session.pending.append({"instructionType": protocol.INSTRUCTION_RM, "uri": rec.rm_uri})
            elif rec.rm_uri:
                log.info("enrolee %s is not prepared for remote management; not instructing it", rec.enrolee_id)
            return self._next_instruction(session)
        if session.phase is not Phase.INSTRUCTED:
            raise OperationNotAllowed("there is no instruction to acknowledge")
        expected = session.pending[0]["instructionType"]
        success = protocol.parse_enrol_ack(value, expected)
        session.pending.pop(0)
        if not success:
            log.warning("enrolee %s reports that instruction %s failed", rec.enrolee_id, expected)
        return self._next_instruction(session)

    def _next_instruction(self, session: Session) -> Reply:
        if session.pending:
            session.phase = Phase.INSTRUCTED
            return Reply(RSC.OK, protocol.enrol_response(session.pending[0]))
        self._commit(session)
        session.phase = Phase.ENDED
        assert session.ke_id is not None
        return Reply(RSC.OK, protocol.end_of_exchange(session.ke_id), close=True)

    # -- certificate provisioning (EST, RFC 7030) ----------------------------------------------
    def certificate_instruction(self, rec: EnroleeRecord) -> protocol.CertificateInstruction | None:
        """What the certificateEnrolment instruction tells ``rec``, or None when it gets no certificate."""
        if self.ca is None or not rec.may_certify:
            return None
        return protocol.CertificateInstruction(self.est_uri, est.subject_type(rec.enrolee_id),
                                               self._subject(rec), self._bound_app_id(rec))

    def _subject(self, rec: EnroleeRecord) -> str:
        return est.subject_uri(self.config.sp_id, rec.enrolee_id, rec.registrar_cse_id)

    @staticmethod
    def _bound_app_id(rec: EnroleeRecord) -> str | None:
        """The App-ID an AE's certificate binds: its one allowed App-ID when that is a single literal ID."""
        apps = rec.allowed_app_ids
        if rec.enrolee_type != "AE" or not apps or len(apps) != 1 or "*" in apps[0]:
            return None
        return apps[0]

    def est(self, session: Session, method: str, path: str, body: bytes) -> EstReply:
        """One EST request of an authenticated session; refusals are counted, logged and audited."""
        try:
            return self._est(session, method, path, body)
        except _EstRefusal as exc:
            self.refusals.refused("EST %s %r from %s (%s) refused with %d: %s", method[:8], path[:100],
                                  session.principal_id, session.psk_identity, exc.status, exc.sentence)
            self.metrics.certificates.labels("refused").inc()
            self.audit.refused(Action.EST, actor=f"{session.kind.value}:{session.psk_identity}",
                               subject=path[:200], cause=exc.sentence, details={"status": exc.status})
            return EstReply.refused(exc.status, exc.sentence, exc.retry_after)

    def _est(self, session: Session, method: str, path: str, body: bytes) -> EstReply:
        if self.ca is None:
            raise _EstRefusal(404, "this MEF does not provision certificates (certificate_provisioning = false)")
        try:
            op = est.parse_est_path(path)
        except BadRequest as exc:
            raise _EstRefusal(404, str(exc)) from None
        wanted = "GET" if op in (est.OP_CACERTS, est.OP_CSRATTRS) else "POST"
        if method != wanted:
            raise _EstRefusal(405, f"{est.est_path(op)} accepts only {wanted}")
        if op == est.OP_CACERTS:
            return EstReply(200, est.CT_CACERTS, est.certs_body([self.ca.certificate]))
        if session.kind is Principal.TARGET:
            raise _EstRefusal(403, "an Enrolment Target may read the CA certificates only")
        if op == est.OP_CSRATTRS:
            return EstReply(200, est.CT_CSRATTRS, est.csr_attributes_body())
        if op == est.OP_SIMPLEENROLL and session.kind is not Principal.ENROLEE:
            raise _EstRefusal(403, "simpleenroll needs a session authenticated with the enrolee's Kpm or bootstrap "
                                   "certificate; renew an issued certificate with simplereenroll")
        if op == est.OP_SIMPLEREENROLL and session.kind is not Principal.HOLDER:
            raise _EstRefusal(403, "simplereenroll needs a session authenticated with the certificate it renews")
        rec = session.enrolee
        assert rec is not None
        if not rec.may_certify:
            raise _EstRefusal(403, f"the enrolee {rec.enrolee_id} is not entitled to a certificate")
        try:
            self._check_enrolment_budget(rec.enrolment_budget)
        except EnrolmentRateLimited as exc:
            raise _EstRefusal(429, str(exc), exc.retry_after) from None
        try:
            csr = est.parse_csr_body(body)
        except BadRequest as exc:
            raise _EstRefusal(400, str(exc)) from None
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != "secp256r1":
            raise _EstRefusal(400, "the certificate signing request's key must be an ECDSA P-256 key "
                                   "(TS-0003 §10.2.3: ECDHE_ECDSA)")
        subject, app_id = self._subject(rec), self._bound_app_id(rec)
        names, asked_app = est.names_of(csr)
        if names != [subject]:
            raise _EstRefusal(403, f"the request must name exactly {subject} as a subjectAltName URI "
                                   f"(it names {', '.join(names)[:300] or 'none'})")
        if asked_app is not None and asked_app != app_id:
            raise _EstRefusal(403, f"the request names the App-ID {asked_app[:64]!r}, but this enrolee's certificate "
                                   f"binds {app_id!r}")
        if session.est_binding is not None and est.csr_binding_matches(csr, session.est_binding()) is False:
            raise _EstRefusal(403, "the request's challengePassword is not this TLS session's channel binding "
                                   "(a CSR made for another session)")
        renewed = session.certificate
        now = utcnow()
        limit = now + dt.timedelta(days=self.config.certificate_validity_days)
        if rec.valid_until is not None:
            limit = min(limit, rec.valid_until)
        issued = self.ca.issue(public_key, subject, app_id, is_cse=rec.enrolee_type == "CSE", not_after=limit,
                               now=now)
        cert = issued.certificate
        try:
            self.store.record_certificate(rec.kpm_id, issued.serial, issued.sha256, subject, app_id,
                                          cert.not_valid_before_utc, cert.not_valid_after_utc,
                                          cert.public_bytes(serialization.Encoding.DER),
                                          supersedes=est.fingerprint(renewed) if renewed is not None else None,
                                          now=now, charge=self._charge_enrolment)
        except AccessDenied as exc:  # the enrolee or the renewed certificate was revoked during this session
            raise _EstRefusal(403, str(exc)) from None
        except EnrolmentRateLimited as exc:  # spent meanwhile, by a session at this or another instance
            raise _EstRefusal(429, str(exc), exc.retry_after) from None
        result = "renewed" if renewed is not None else "issued"
        self.metrics.certificates.labels(result).inc()
        self.audit.record(Action.CERTIFICATE_ISSUED, actor=f"{session.kind.value}:{session.psk_identity}",
                          subject=issued.serial, details={"enroleeID": rec.enrolee_id, "sha256": issued.sha256,
                                                          "notAfter": profile.format_timestamp(issued.not_after),
                                                          "renewal": renewed is not None})
        log.info("EST: %s a certificate for %s (serial %s, SHA-256 %s, until %s)", result, subject, issued.serial,
                 issued.sha256, issued.not_after.isoformat())
        return EstReply(200, est.CT_CERTS_ONLY, est.certs_body([cert]))

    # -- target side ----------------------------------------------------------------------------
    def revocations(self, session: Session, path: str, originator: str) -> Reply:
        """The revocation feed (our extension, docs/mef-interface.md): KeIDs that stopped being usable after a
        sequence number, oldest first, for Enrolment Targets (a Target's credential, or an enrolled CSE)."""
        after = protocol.parse_revocations_path(path)
        if not ids.ORIGINATOR_RE.fullmatch(originator):
            raise BadRequest("the originator is not a CSE-ID or AE-ID")
        if self.absolute_id(originator) != session.principal_id:
            raise AccessDenied("the originator is not the identity this connection authenticated as")
        if session.kind is not Principal.TARGET and not (session.enrolee is not None
                                                         and ids.is_cse_id(session.enrolee.enrolee_id)):
            raise AccessDenied("only an Enrolment Target (a Target credential or an enrolled CSE) may read the "
                               "revocation feed")
        if after is None:
            _rows, newest = self.store.revocations_since(_BEYOND_ANY_SEQ, 1)
            return Reply(RSC.OK, protocol.revocations_response(protocol.RevocationPage(newest, (), True, False)))
        rows, newest = self.store.revocations_since(after, protocol.MAX_REVOCATIONS_PER_ANSWER)
        items = tuple(protocol.Revocation(r.seq, r.ke_id, r.cause, r.cert_sha256) for r in rows)
        gap = after < newest and (not rows or rows[0].seq > after + 1)  # rows after ``after`` were pruned
        complete = not rows or rows[-1].seq >= newest
        return Reply(RSC.OK, protocol.revocations_response(protocol.RevocationPage(newest, items, complete, gap)))

    def fetch_credentials(self, session: Session, path: str, originator: str) -> Reply:
        ke_id, suid = protocol.parse_fetch_path(path)
        if not ids.ORIGINATOR_RE.fullmatch(originator):
            raise BadRequest("the originator is not a CSE-ID or AE-ID")
        target = self.absolute_id(originator)
        if target != session.principal_id:
            raise AccessDenied("the originator is not the identity this connection authenticated as")
        if ke_id.rsplit("@", 1)[1] != self.config.fqdn:
            raise NotFound("this KeID was not issued by this MEF")
        record = self.store.get_enrolment_key(ke_id)
        if record is None:
            raise NotFound("no live Enrolment Key has this KeID (unknown, expired or revoked; or retired by a "
                           "re-enrolment, or its enrolee is suspended)")
        enrolee = self.store.get_enrolee(record.kpm_id)
        if enrolee is None:  # deleted between the two reads
            raise NotFound("no live Enrolment Key has this KeID (its enrolee was just deleted)")
        if not self._authorized(enrolee, target, suid):
            raise AccessDenied(f"{target} is not an authorized Enrolment Target of this Enrolee for SUID {suid}")
        kuc = keys.derive_usage_constrained_key(record.enrolment_key, suid, keys.target_fqdn(target))
        log.info("fetchCredentials: Target %s fetched the SUID %d key of KeID %s (enrolee %s)", target, suid, ke_id,
                 enrolee.enrolee_id)
        self.metrics.fetches.labels("ok").inc()
        self.audit.record(Action.FETCH, actor=f"target:{target}", subject=ke_id,
                          details={"suid": suid, "enroleeID": enrolee.enrolee_id,
                                   "pskIdentity": session.psk_identity})
        return Reply(RSC.OK, protocol.fetch_response(kuc.reveal(), enrolee.enrolee_id,
                                                     profile.format_timestamp(record.expires),
                                                     allowed_app_ids=enrolee.allowed_app_ids))

    def _authorized(self, enrolee: EnroleeRecord, target: str, suid: int) -> bool:
        grants: list[tuple[str, tuple[int, ...]]] = [(self.absolute_id(enrolee.registrar_cse_id),
                                                       (keys.SUID_RSPF_SAEF,))]
        grants += [(self.absolute_id(t.target_id), t.suids) for t in enrolee.targets]
        return any(t == target and suid in s for t, s in grants)

    # -- housekeeping ---------------------------------------------------------------------------
    def purge(self, now: dt.datetime | None = None) -> PurgeCounts:
        """Delete expired and retired keys and old revocation log rows (``rspf mef serve`` runs it every
        ``purge_interval_seconds``), so the database stays bounded."""
        counts = self.store.purge(now, dt.timedelta(days=self.config.revocation_log_days),
                                  self.config.revocation_log_max_rows)
        if counts.expired or counts.retired or counts.log_rows:
            log.info("purged %d expired and %d retired Enrolment Keys and %d revocation log rows", counts.expired,
                     counts.retired, counts.log_rows)
        return counts


class _EstRefusal(Exception):
    def __init__(self, status: int, sentence: str, retry_after: int | None = None) -> None:
        super().__init__(sentence)
        self.status, self.sentence, self.retry_after = status, sentence, retry_after
