"""The MEF wire format, in one place: resource paths, element names, instructions, and the functions that
build and check each message. Shared by the MEF (rspf.mef.service), the Enrolee (rspf.enrolee) and the
Enrolment Target (rspf.target). Pure: no I/O.

TS-0032 (the MEF interface specification) is not available to this project; the message names and shapes
here are the project's decisions, documented in docs/mef-interface.md. The information they carry is that
of TS-0003 Tables 8.3.2.1-1 to 8.3.2.1-6.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from .. import keys
from ..errors import BadRequest

# Resources of the MEF (one oneM2M operation each)
PATH_SECURITY_PROFILE = "/securityProfile"          # CREATE: securityProfile provisioning
PATH_ENROLMENT_EXCHANGE = "/enrolmentExchange"      # CREATE: Enrolment Exchange request / acknowledgement
PATH_FETCH_CREDENTIALS = "/fetchCredentials"        # RETRIEVE /fetchCredentials/<KeID>/<SUID>

# Elements (JSON member names)
SP_REQ = "rspf:spReq"
ENROL_REQ = "rspf:enrolReq"
ENROL_ACK = "rspf:enrolAck"
ENROL_RSP = "rspf:enrolRsp"
FC_RSP = "rspf:fcRsp"

# Instruction types of the Enrolment Exchange (TS-0003 Table 8.3.2.1-2)
INSTRUCTION_END = "endOfExchange"
INSTRUCTION_CERT = "certificateEnrolment"
INSTRUCTION_MAF = "mafEnrolment"
INSTRUCTION_RM = "remoteManagementServer"

#: The Enrolee's indications in the initial Enrolment Exchange request (TS-0003 Table 8.3.2.1-1)
ENROL_FLAGS = ("certificateEnrolment", "mafEnrolment", "remoteManagement")

#: certProvProtocolID of a certificateEnrolment instruction (TS-0003 §12): 1 EST (the only one this project runs)
CERT_PROV_EST = 1

MAX_EXCHANGE_INSTRUCTIONS = 16  # an Enrolee ends an exchange that goes on longer than this
_SUID_TEXT = re.compile(r"[0-9]{1,3}")


def element(content: Any, name: str) -> dict[str, Any]:
    """The object inside a body that must be exactly ``{name: {...}}``."""
    if not isinstance(content, dict) or set(content) != {name} or not isinstance(content[name], dict):
        raise BadRequest(f"the body must be a JSON object with the single element {name}")
    return content[name]


# ------------------------------------------------------------------------------ securityProfile
@dataclass(frozen=True)
class ProfileRequest:
    node_id: str
    location: str | None = None

    def to_body(self) -> dict[str, Any]:
        req: dict[str, Any] = {"nodeID": self.node_id}
        if self.location:
            req["location"] = self.location
        return {SP_REQ: req}

    @classmethod
    def from_body(cls, content: Any) -> ProfileRequest:
        req = element(content, SP_REQ)
        node_id = req.get("nodeID")
        if not isinstance(node_id, str) or not node_id or len(node_id) > 256:
            raise BadRequest(f"{SP_REQ}/nodeID (the M2M-Node-ID) is required and must be a string")
        location = req.get("location")
        if location is not None and (not isinstance(location, str) or len(location) > 256):
            raise BadRequest(f"{SP_REQ}/location must be a string of at most 256 characters")
        unknown = set(req) - {"nodeID", "location"}
        if unknown:
            raise BadRequest(f"{SP_REQ} has unknown element(s): {', '.join(sorted(unknown))}")
        return cls(node_id, location)


# ------------------------------------------------------------------------------ Enrolment Exchange
def enrol_request(flags: dict[str, bool]) -> dict[str, Any]:
    return {ENROL_REQ: {name: bool(flags.get(name, False)) for name in ENROL_FLAGS}}


def enrol_ack(instruction_type: str, success: bool) -> dict[str, Any]:
    return {ENROL_ACK: {"instructionType": instruction_type, "success": success}}


def exchange_message(content: Any) -> tuple[str, dict[str, Any]]:
    """(element name, value) of an Enrolment Exchange message from an Enrolee: a request or an ack."""
    if isinstance(content, dict) and len(content) == 1:
        name = next(iter(content))
        if name in (ENROL_REQ, ENROL_ACK):
            return name, element(content, name)
    raise BadRequest(f"the body must be one element: {ENROL_REQ} or {ENROL_ACK}")


def parse_enrol_request(req: dict[str, Any]) -> dict[str, bool]:
    flags = {}
    for name in ENROL_FLAGS:
        v = req.get(name)
        if not isinstance(v, bool):
            raise BadRequest(f"{ENROL_REQ}/{name} must be true or false")
        flags[name] = v
    unknown = set(req) - set(flags)
    if unknown:
        raise BadRequest(f"{ENROL_REQ} has unknown element(s): {', '.join(sorted(unknown))}")
    return flags


def parse_enrol_ack(ack: dict[str, Any], expected: str) -> bool:
    """The ``success`` of an acknowledgement of instruction ``expected``."""
    if ack.get("instructionType") != expected or not isinstance(ack.get("success"), bool):
        raise BadRequest(f"{ENROL_ACK} must name instructionType {expected!r} and give success true/false")
    return bool(ack["success"])


def enrol_response(instruction: dict[str, Any]) -> dict[str, Any]:
    return {ENROL_RSP: instruction}


def end_of_exchange(ke_id: str) -> dict[str, Any]:
    return enrol_response({"instructionType": INSTRUCTION_END, "keyID": ke_id})


@dataclass(frozen=True)
class CertificateInstruction:
    """A ``certificateEnrolment`` instruction (TS-0003 Table 8.3.2.1-2, with the certProvCmdArgs of §12): obtain
    a certificate for ``subject_id`` (an absolute CSE-ID or AE-ID, rspf.est.subject_uri) over EST at ``uri``;
    ``app_id``: the App-ID the certificate will bind (our extension), or None."""

    uri: str
    subject_type: int
    subject_id: str
    app_id: str | None = None

    def to_instruction(self) -> dict[str, Any]:
        out: dict[str, Any] = {"instructionType": INSTRUCTION_CERT, "uri": self.uri,
                               "certProvProtocolID": CERT_PROV_EST, "certSubjectType": self.subject_type,
                               "certSubjectID": self.subject_id}
        if self.app_id is not None:
            out["appID"] = self.app_id
        return out

    @classmethod
    def from_instruction(cls, rsp: dict[str, Any]) -> CertificateInstruction:
        uri, kind, subject, app = (rsp.get("uri"), rsp.get("certSubjectType"), rsp.get("certSubjectID"),
                                   rsp.get("appID"))
        if (rsp.get("instructionType") != INSTRUCTION_CERT or rsp.get("certProvProtocolID") != CERT_PROV_EST
                or not isinstance(uri, str) or not uri.startswith("https://") or len(uri) > 1024
                or kind not in (1, 2, 3) or isinstance(kind, bool) or not isinstance(subject, str)
                or not 0 < len(subject) <= 512 or (app is not None and not isinstance(app, str))):
            raise BadRequest("the MEF sent a malformed certificateEnrolment instruction (an EST URI, "
                             "certSubjectType 1-3 and certSubjectID are required)")
        return cls(uri, kind, subject, app)


def parse_enrol_response(data: Any) -> dict[str, Any]:
    """The instruction a MEF sent (its ``instructionType`` is a string)."""
    rsp = data.get(ENROL_RSP) if isinstance(data, dict) else None
    if not isinstance(rsp, dict) or not isinstance(rsp.get("instructionType"), str):
        raise BadRequest("the MEF sent a malformed Enrolment Exchange response")
    return rsp


# ------------------------------------------------------------------------------ fetchCredentials
def fetch_path(ke_id: str, suid: int) -> str:
    keys.parse_ke_id(ke_id)
    keys.encode_suid(suid)
    return f"{PATH_FETCH_CREDENTIALS}/{quote(ke_id, safe='@')}/{suid}"


def is_fetch_path(path: str) -> bool:
    return path == PATH_FETCH_CREDENTIALS or path.startswith(PATH_FETCH_CREDENTIALS + "/")


def parse_fetch_path(path: str) -> tuple[str, int]:
    """(normalised KeID, SUID) of ``/fetchCredentials/<KeID>/<SUID>``; BadRequest otherwise."""
    parts = path.split("/")
    if len(parts) != 4 or "/" + parts[1] != PATH_FETCH_CREDENTIALS or not parts[2] or not parts[3]:
        raise BadRequest(f"the target must be {PATH_FETCH_CREDENTIALS}/<KeID>/<SUID>")
    ke_id_text, suid_text = unquote(parts[2]), unquote(parts[3])
    if not _SUID_TEXT.fullmatch(suid_text):
        raise BadRequest("the SUID must be an m2m:suid number, e.g. 22")
    suid = int(suid_text)
    keys.encode_suid(suid)  # raises BadRequest for values outside m2m:suid
    return keys.normalise_ke_id(ke_id_text), suid


@dataclass(frozen=True)
class FetchedKey:
    """What a fetchCredentials answer carries (TS-0003 Table 8.3.2.1-6). ``key`` is raw bytes: wrap it."""

    key: bytes
    enrolee_id: str
    lifetime: str  # m2m:timestamp of expiry
    #: App-ID patterns the enrolee may register with (our extension ``allowedAppIDs``, docs/mef-interface.md);
    #: None when the MEF sets none for this enrolee: the Target then applies its own configured default.
    allowed_app_ids: tuple[str, ...] | None = None

    def __repr__(self) -> str:
        return (f"FetchedKey(key=<redacted>, enrolee_id={self.enrolee_id!r}, lifetime={self.lifetime!r}, "
                f"allowed_app_ids={self.allowed_app_ids!r})")


#: Most App-ID patterns one fetchCredentials answer may carry, and the longest pattern.
MAX_ALLOWED_APP_IDS = 64
MAX_APP_ID_LENGTH = 256


def fetch_response(key: bytes, enrolee_id: str, lifetime: str,
                   allowed_app_ids: tuple[str, ...] | None = None) -> dict[str, Any]:
    rsp: dict[str, Any] = {"status": True, "credential": base64.b64encode(key).decode(), "enroleeID": enrolee_id,
                           "lifetime": lifetime}
    if allowed_app_ids is not None:
        rsp["allowedAppIDs"] = list(allowed_app_ids)
    return {FC_RSP: rsp}


def fetch_error(message: str) -> dict[str, Any]:
    return {FC_RSP: {"status": False, "errorString": message}}


def parse_fetch_response(data: Any) -> FetchedKey:
    rsp = data.get(FC_RSP) if isinstance(data, dict) else None
    if not isinstance(rsp, dict) or rsp.get("status") is not True:
        raise BadRequest("the MEF sent a malformed fetchCredentials response")
    try:
        key = base64.b64decode(rsp["credential"], validate=True)
        enrolee_id, lifetime = rsp["enroleeID"], rsp["lifetime"]
    except (KeyError, TypeError, binascii.Error):
        raise BadRequest("the MEF's fetchCredentials response lacks credential, enroleeID or lifetime") from None
    if len(key) != 32 or not isinstance(enrolee_id, str) or not isinstance(lifetime, str):
        raise BadRequest("the MEF's fetchCredentials response is malformed")
    apps = rsp.get("allowedAppIDs")
    if apps is None:
        return FetchedKey(key, enrolee_id, lifetime)
    if (not isinstance(apps, list) or len(apps) > MAX_ALLOWED_APP_IDS
            or not all(isinstance(a, str) and 0 < len(a) <= MAX_APP_ID_LENGTH for a in apps)):
        raise BadRequest("the MEF's fetchCredentials response has a malformed allowedAppIDs list")
    return FetchedKey(key, enrolee_id, lifetime, tuple(apps))


def error_text(data: Any) -> str | None:
    """The human-readable text of an error answer (``m2m:dbg``, or a fetchCredentials ``errorString``)."""
    if isinstance(data, dict):
        if isinstance(data.get("m2m:dbg"), str):
            return data["m2m:dbg"]
        inner = data.get(FC_RSP)
        if isinstance(inner, dict) and isinstance(inner.get("errorString"), str):
            return inner["errorString"]
    return None


# ------------------------------------------------------------------------------ revocation feed (our extension)
#: RETRIEVE /revocations          -> the feed's current position only (no items)
#: RETRIEVE /revocations/<after>  -> what was revoked after sequence number <after>, oldest first
PATH_REVOCATIONS = "/revocations"
REVS = "rspf:revs"
#: Most items one answer carries; ``complete`` is false when more follow.
MAX_REVOCATIONS_PER_ANSWER = 256
_SEQ_TEXT = re.compile(r"[0-9]{1,18}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Revocation:
    """KeID ``ke_id`` -- or the certificate whose DER has SHA-256 ``cert_sha256`` (rspf.est.fingerprint), exactly
    one of the two -- stopped being usable; ``cause`` is the MEF's word for why (its revocation log's causes,
    docs/mef-interface.md), shown to operators, never acted on: every cause means the same to a Target."""

    seq: int
    ke_id: str | None
    cause: str
    cert_sha256: str | None = None

    def to_item(self) -> dict[str, Any]:
        named = {"keID": self.ke_id} if self.ke_id is not None else {"certSHA256": self.cert_sha256}
        return {"seq": self.seq, **named, "cause": self.cause}


@dataclass(frozen=True)
class RevocationPage:
    """One answer of the feed. ``last``: the newest sequence number the MEF has written. ``gap``: items after
    the asked position were already pruned, so the follower cannot know every KeID it missed."""

    last: int
    items: tuple[Revocation, ...]
    complete: bool
    gap: bool


def revocations_path(after: int | None = None) -> str:
    if after is None:
        return PATH_REVOCATIONS
    if after < 0:
        raise BadRequest("a revocation sequence number is not negative")
    return f"{PATH_REVOCATIONS}/{after}"


def is_revocations_path(path: str) -> bool:
    return path == PATH_REVOCATIONS or path.startswith(PATH_REVOCATIONS + "/")


def parse_revocations_path(path: str) -> int | None:
    """The position asked for (None: only the current position); BadRequest when malformed."""
    if path == PATH_REVOCATIONS:
        return None
    tail = path[len(PATH_REVOCATIONS) + 1:]
    if not _SEQ_TEXT.fullmatch(tail):
        raise BadRequest(f"the target must be {PATH_REVOCATIONS} or {PATH_REVOCATIONS}/<sequence number>")
    return int(tail)


def revocations_response(page: RevocationPage) -> dict[str, Any]:
    return {REVS: {"last": page.last, "complete": page.complete, "gap": page.gap,
                   "items": [r.to_item() for r in page.items]}}


def parse_revocations_response(data: Any) -> RevocationPage:
    rsp = data.get(REVS) if isinstance(data, dict) else None
    if not isinstance(rsp, dict):
        raise BadRequest("the MEF sent a malformed revocation feed answer")
    last, items, complete, gap = rsp.get("last"), rsp.get("items"), rsp.get("complete"), rsp.get("gap")
    if (not isinstance(last, int) or isinstance(last, bool) or last < 0 or not isinstance(items, list)
            or len(items) > MAX_REVOCATIONS_PER_ANSWER or not isinstance(complete, bool) or not isinstance(gap, bool)):
        raise BadRequest("the MEF sent a malformed revocation feed answer")
    out = []
    previous = -1
    for item in items:
        seq = item.get("seq") if isinstance(item, dict) else None
        ke_id = item.get("keID") if isinstance(item, dict) else None
        cert = item.get("certSHA256") if isinstance(item, dict) else None
        cause = item.get("cause") if isinstance(item, dict) else None
        if (not isinstance(seq, int) or isinstance(seq, bool) or not previous < seq <= last
                or (ke_id is None) == (cert is None) or (ke_id is not None and not isinstance(ke_id, str))
                or (cert is not None and not (isinstance(cert, str) and _SHA256_HEX.fullmatch(cert)))
                or not isinstance(cause, str) or len(cause) > 32):
            raise BadRequest("the MEF's revocation feed answer has a malformed or out-of-order item")
        out.append(Revocation(seq, keys.normalise_ke_id(ke_id), cause) if ke_id is not None
                   else Revocation(seq, None, cause, cert))
        previous = seq
    return RevocationPage(last, tuple(out), complete, gap)
