"""MEF policy: who may do what, the Enrolment Exchange state machine, profile issuing, fetchCredentials.

No sockets here. The transport (rspf.mef.server) authenticates a TLS-PSK connection, calls
:meth:`MefService.open_session` with the proven psk_identity and the exporter output, then hands each
oneM2M request to :meth:`MefService.handle`.

Resources (project-defined; TS-0032 is not available, see docs/mef-interface.md):

* ``POST /securityProfile``          Enrolee: securityProfile provisioning (Msce, seed CR 0055)
* ``POST /enrolmentExchange``        Enrolee: Enrolment Exchange (TS-0003 Tables 8.3.2.1-1..-4)
* ``GET  /fetchCredentials/<KeID>/<SUID>``  Enrolment Target (Tables 8.3.2.1-5/-6)
"""

from __future__ import annotations

import base64
import datetime as dt
import enum
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from .. import keys, profile
from ..errors import RSC, AccessDenied, BadRequest, NotFound, OperationNotAllowed, RspfError
from ..secret import Secret
from .config import MefConfig
from .store import EnroleeRecord, MefStore, utcnow

log = logging.getLogger(__name__)

_ID_RE = re.compile(r"^[A-Za-z0-9._~/-]{1,256}$")


class Principal(enum.Enum):
    ENROLEE = "enrolee"
    TARGET = "target"


class Phase(enum.Enum):
    """Enrolment Exchange states of one Enrolee session."""

    STARTED = "started"            # handshake done; Ke, KeID derived, nothing stored yet
    INSTRUCTED = "instructed"      # an instruction was sent; waiting for the Enrolee's acknowledgement
    ENDED = "ended"                # end of the exchange sent; the MEF closes the session


INSTRUCTION_END = "endOfExchange"
INSTRUCTION_CERT = "certificateEnrolment"
INSTRUCTION_MAF = "mafEnrolment"
INSTRUCTION_RM = "remoteManagementServer"


@dataclass
class Session:
    """One authenticated TLS-PSK connection."""

    kind: Principal
    psk_identity: str
    principal_id: str                  # absolute CSE-ID / AE-ID of whoever authenticated
    enrolee: EnroleeRecord | None = None
    ke_id: str | None = None
    enrolment_key: Secret | None = None
    created: dt.datetime = field(default_factory=utcnow)
    phase: Phase = Phase.STARTED
    committed: bool = False
    pending: list[dict[str, Any]] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"<Session {self.kind.value} {self.psk_identity} ke_id={self.ke_id} phase={self.phase.value}>"


@dataclass
class Reply:
    rsc: RSC
    content: Any = None
    close: bool = False


class MefService:
    def __init__(self, config: MefConfig, store: MefStore) -> None:
        self.config = config
        self.store = store

    # -- authentication -------------------------------------------------------------------------
    def psk_for(self, identity: str, peer_ip: str | None = None) -> Secret | None:
        """The PSK for a presented psk_identity: an enrolee's Kpm (KpmID) or a Target's PSK. ``peer_ip`` (the
        transport's PSK lookup signature) is not used: the MEF answers from its own store.

        Runs in a handshake thread of the transport; the session opens later in a worker thread
        (:meth:`open_session` reads the enrolee again, so a record changed in between is seen).
        """
        found = self.store.enrolee_and_psk(identity)
        if found is not None:
            return found[1]
        return self.store.target_psk(identity)

    def absolute_id(self, any_id: str, registrar_cse_id: str | None = None) -> str:
        """Absolute form //sp/... of a CSE-ID (/id) or an AE-ID (C..., S... under its registrar)."""
        if any_id.startswith("//"):
            return any_id
        if any_id.startswith("/"):
            return self.config.sp_id + any_id
        if registrar_cse_id:
            return self.config.sp_id + registrar_cse_id + "/" + any_id
        raise BadRequest(f"{any_id!r} is neither an SP-relative nor an absolute ID")

    def open_session(self, psk_identity: str,
                     exporter_output: Secret | Callable[[], Secret] | None) -> Session:
        """Start a session for an authenticated psk_identity. ``exporter_output`` (or a function computing it,
        called only for an Enrolee) is the session's ``EXPORTER-oneM2M-Bootstrap`` output."""
        enrolee = self.store.get_enrolee(psk_identity)
        if enrolee is not None:
            if callable(exporter_output):
                exporter_output = exporter_output()
            if exporter_output is None:
                raise RspfError("an enrolee session needs the exporter output")
            material = keys.split_exporter_output(exporter_output)
            ke_id = keys.make_ke_id(material.relative_ke_id, self.config.fqdn)
            return Session(Principal.ENROLEE, psk_identity,
                           self.absolute_id(enrolee.enrolee_id, enrolee.registrar_cse_id), enrolee, ke_id,
                           material.enrolment_key)
        target = self.store.get_target(psk_identity)
        if target is None:  # removed between handshake and now
            raise AccessDenied("the presented credential is no longer registered")
        return Session(Principal.TARGET, psk_identity, self.absolute_id(target.target_id))

    # -- dispatch -------------------------------------------------------------------------------
    def handle(self, session: Session, operation: str, to: str, originator: str, content: Any) -> Reply:
        path = to.rstrip("/") or "/"
        if path.startswith("/fetchCredentials/") or path == "/fetchCredentials":
            if operation != "RETRIEVE":
                raise OperationNotAllowed("fetchCredentials accepts only RETRIEVE (HTTP GET)")
            return self.fetch_credentials(session, path, originator)
        if path == "/securityProfile":
            if operation != "CREATE":
                raise OperationNotAllowed("securityProfile accepts only CREATE (HTTP POST)")
            return self.provision_profile(session, content)
        if path == "/enrolmentExchange":
            if operation != "CREATE":
                raise OperationNotAllowed("enrolmentExchange accepts only CREATE (HTTP POST)")
            return self.enrolment_exchange(session, content)
        raise NotFound(f"the MEF has no resource {to!r}; see docs/mef-interface.md")

    # -- enrolee side ---------------------------------------------------------------------------
    def _require_enrolee(self, session: Session) -> EnroleeRecord:
        if session.kind is not Principal.ENROLEE or session.enrolee is None:
            raise AccessDenied("only an Enrolee authenticated with its KpmID may use this resource")
        if session.phase is Phase.ENDED:
            raise OperationNotAllowed("the Enrolment Exchange of this session has ended")
        return session.enrolee

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
        self.store.put_enrolment_key(session.ke_id, session.psk_identity, session.enrolment_key, session.created,
                                     self._expiry(session))
        session.committed = True
        log.info("enrolee %s (KpmID %s) enrolled: KeID %s, expires %s", session.enrolee.enrolee_id,
                 session.psk_identity, session.ke_id, self._expiry(session).isoformat())

    def registrar_key(self, session: Session) -> tuple[Secret, str]:
        rec = session.enrolee
        assert rec is not None and session.enrolment_key is not None
        fqdn = keys.target_fqdn(self.absolute_id(rec.registrar_cse_id))
        return keys.derive_usage_constrained_key(session.enrolment_key, keys.SUID_RSPF_SAEF, fqdn), fqdn

    def provision_profile(self, session: Session, content: Any) -> Reply:
        rec = self._require_enrolee(session)
        req = _element(content, "rspf:spReq")
        node_id = req.get("nodeID")
        if not isinstance(node_id, str) or not node_id or len(node_id) > 256:
            raise BadRequest("rspf:spReq/nodeID (the M2M-Node-ID) is required and must be a string")
        location = req.get("location")
        if location is not None and (not isinstance(location, str) or len(location) > 256):
            raise BadRequest("rspf:spReq/location must be a string of at most 256 characters")
        unknown = set(req) - {"nodeID", "location"}
        if unknown:
            raise BadRequest(f"rspf:spReq has unknown element(s): {', '.join(sorted(unknown))}")
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
        return Reply(RSC.CREATED, {profile.WRAPPER: body})

    def enrolment_exchange(self, session: Session, content: Any) -> Reply:
        rec = self._require_enrolee(session)
        if not isinstance(content, dict) or len(content) != 1:
            raise BadRequest("the body must be one element: rspf:enrolReq or rspf:enrolAck")
        (name, value), = content.items()
        if name == "rspf:enrolReq":
            if session.phase is not Phase.STARTED:
                raise OperationNotAllowed("the initial Enrolment Exchange request was already sent in this session")
            req = _element(content, "rspf:enrolReq")
            flags = {}
            for key in ("certificateEnrolment", "mafEnrolment", "remoteManagement"):
                v = req.get(key)
                if not isinstance(v, bool):
                    raise BadRequest(f"rspf:enrolReq/{key} must be true or false")
                flags[key] = v
            unknown = set(req) - set(flags)
            if unknown:
                raise BadRequest(f"rspf:enrolReq has unknown element(s): {', '.join(sorted(unknown))}")
            # This MEF provisions no certificates and runs no MAF (not in this release): it never instructs
            # those. A remote management server is instructed when one is registered and the Enrolee is ready.
            if rec.rm_uri and flags["remoteManagement"]:
                session.pending.append({"instructionType": INSTRUCTION_RM, "uri": rec.rm_uri})
            elif rec.rm_uri:
                log.info("enrolee %s is not prepared for remote management; not instructing it", rec.enrolee_id)
            return self._next_instruction(session)
        if name == "rspf:enrolAck":
            if session.phase is not Phase.INSTRUCTED:
                raise OperationNotAllowed("there is no instruction to acknowledge")
            ack = _element(content, "rspf:enrolAck")
            expected = session.pending[0]["instructionType"]
            if ack.get("instructionType") != expected or not isinstance(ack.get("success"), bool):
                raise BadRequest(f"rspf:enrolAck must name instructionType {expected!r} and give success true/false")
            session.pending.pop(0)
            if not ack["success"]:
                log.warning("enrolee %s reports that instruction %s failed", rec.enrolee_id, expected)
            return self._next_instruction(session)
        raise BadRequest("the body must be one element: rspf:enrolReq or rspf:enrolAck")

    def _next_instruction(self, session: Session) -> Reply:
        if session.pending:
            session.phase = Phase.INSTRUCTED
            return Reply(RSC.OK, {"rspf:enrolRsp": session.pending[0]})
        self._commit(session)
        session.phase = Phase.ENDED
        return Reply(RSC.OK, {"rspf:enrolRsp": {"instructionType": INSTRUCTION_END, "keyID": session.ke_id}},
                     close=True)

    # -- target side ----------------------------------------------------------------------------
    def fetch_credentials(self, session: Session, path: str, originator: str) -> Reply:
        parts = path.split("/")
        if len(parts) != 4 or not parts[2] or not parts[3]:
            raise BadRequest("the target must be /fetchCredentials/<KeID>/<SUID>")
        ke_id_text, suid_text = unquote(parts[2]), unquote(parts[3])
        if not re.fullmatch(r"[0-9]{1,3}", suid_text):
            raise BadRequest("the SUID must be an m2m:suid number, e.g. 22")
        suid = int(suid_text)
        keys.encode_suid(suid)  # raises BadRequest for values outside m2m:suid
        ke_id = keys.normalise_ke_id(ke_id_text)  # raises BadRequest
        if not _ID_RE.fullmatch(originator):
            raise BadRequest("the originator is not a CSE-ID or AE-ID")
        target = self.absolute_id(originator)
        if target != session.principal_id:
            raise AccessDenied("the originator is not the identity this connection authenticated as")
        if ke_id.rsplit("@", 1)[1] != self.config.fqdn:
            raise NotFound("this KeID was not issued by this MEF")
        record = self.store.get_enrolment_key(ke_id)
        if record is None:
            raise NotFound("no live Enrolment Key has this KeID (unknown, expired or revoked)")
        enrolee = self.store.get_enrolee(record.kpm_id)
        assert enrolee is not None
        if not self._authorized(enrolee, target, suid):
            log.warning("Target %s refused keys of KeID %s for SUID %d: not authorized", target, ke_id, suid)
            raise AccessDenied(f"{target} is not an authorized Enrolment Target of this Enrolee for SUID {suid}")
        kuc = keys.derive_usage_constrained_key(record.enrolment_key, suid, keys.target_fqdn(target))
        log.info("Target %s fetched the SUID %d key of KeID %s (enrolee %s)", target, suid, ke_id,
                 enrolee.enrolee_id)
        return Reply(RSC.OK, {"rspf:fcRsp": {
            "status": True,
            "credential": base64.b64encode(kuc.reveal()).decode(),
            "enroleeID": enrolee.enrolee_id,
            "lifetime": profile.format_timestamp(record.expires),
        }})

    def _authorized(self, enrolee: EnroleeRecord, target: str, suid: int) -> bool:
        grants: list[tuple[str, tuple[int, ...]]] = [(self.absolute_id(enrolee.registrar_cse_id),
                                                       (keys.SUID_RSPF_SAEF,))]
        grants += [(self.absolute_id(t.target_id), t.suids) for t in enrolee.targets]
        return any(t == target and suid in s for t, s in grants)


def _element(content: Any, name: str) -> dict[str, Any]:
    if not isinstance(content, dict) or set(content) != {name} or not isinstance(content[name], dict):
        raise BadRequest(f"the body must be a JSON object with the single element {name}")
    return content[name]
