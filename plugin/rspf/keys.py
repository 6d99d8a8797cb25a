"""Key export split, identifiers and key derivations of TS-0003 §10.3-10.4 (pure, no I/O).

Encoding decisions the text leaves open are documented in docs/key-derivation.md:

* the 48-byte exporter output is read big-endian: its first 16 bytes ("most significant") are the
  RelativeKeID and its last 32 bytes ("least significant") are Ke;
* ``hexBinary`` is written in lower case; KeIDs are compared case-insensitively in the relative part;
* the SUID enters the HMAC as its decimal ASCII form (``22`` -> ``b"22"``);
* the FQDN form of an Absolute CSE-ID / AE-ID ``//sp.example/cse-id/ae-id`` is ``ae-id.cse-id.sp.example``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import unicodedata
from dataclasses import dataclass

from .errors import BadRequest
from .secret import Secret

EXPORTER_LABEL_BOOTSTRAP = "EXPORTER-oneM2M-Bootstrap"
EXPORTER_LABEL_CONNECTION = "EXPORTER-oneM2M-Connection"
EXPORTER_LENGTH = 48

LABEL_KM = b"oneM2M Enrolment Key to Master Credential derivation"
LABEL_KPSA = b"oneM2M Enrolment Key to Provisioned Secure Connection Key derivation"
LABEL_KUC = b"oneM2M Enrolment Key to Usage-Constrained Symmetric Key derivation"

# TS-0004 Table 6.3.4.2.39-1 (m2m:suid)
VALID_SUIDS = frozenset({10, 11, 12, 13, 14, 15, 21, 22, 23, 24, 25, 32, 33, 34, 35, 40, 41, 42, 43, 44, 45})
SUID_RSPF_SAEF = 22

# TS-0003 §12.2 sec:credIDTypeID
CRED_TYPE_KPMID = 10
CRED_TYPE_KMID = 11
CRED_TYPE_KPSAID = 12
VALID_CRED_TYPES = frozenset({10, 11, 12, 13, 14, 15, 16, 30, 31, 32, 33, 34, 41, 42, 43, 44, 45, 51, 52, 53, 54, 55})

_CRED_VALUE_RE = re.compile(r"^[A-Za-z0-9._@-]+$")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_FQDN_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")
_KEID_RE = re.compile(r"^([0-9A-Fa-f]{32})@(.+)$")


def encode_identity(value: str) -> bytes:
    """UTF-8 octets of ``value`` after Unicode Normalization Form KC (TS-0003 §10.3.2-10.3.7)."""
    if not isinstance(value, str) or not value:
        raise BadRequest("an identity used in a key derivation must be a non-empty string")
    return unicodedata.normalize("NFKC", value).encode("utf-8")


@dataclass(frozen=True)
class EnrolmentKeyMaterial:
    """The two halves of the ``EXPORTER-oneM2M-Bootstrap`` output."""

    relative_ke_id: bytes
    enrolment_key: Secret

    def __repr__(self) -> str:
        return f"EnrolmentKeyMaterial(relative_ke_id={self.relative_ke_id.hex()}, enrolment_key=<redacted>)"


def split_exporter_output(output: bytes | Secret) -> EnrolmentKeyMaterial:
    """Split the 48-byte exporter output (TS-0003 §10.3.1).

    RelativeKeID = the 16 most significant bytes (the first 16), Ke = the 32 least significant bytes.
    """
    raw = output.reveal() if isinstance(output, Secret) else bytes(output)
    if len(raw) != EXPORTER_LENGTH:
        raise ValueError(f"the exporter output must be {EXPORTER_LENGTH} bytes, got {len(raw)}")
    return EnrolmentKeyMaterial(relative_ke_id=raw[:16], enrolment_key=Secret(raw[16:], "Ke"))


def check_fqdn(fqdn: str) -> str:
    if not isinstance(fqdn, str) or not _FQDN_RE.fullmatch(fqdn):
        raise BadRequest(f"{fqdn!r} is not a valid FQDN")
    return fqdn


def make_ke_id(relative_ke_id: bytes, mef_fqdn: str) -> str:
    """``KeID = hexBinary(RelativeKeID)@MEF-FQDN`` (TS-0003 §10.3.4); hex in lower case."""
    if len(relative_ke_id) != 16:
        raise ValueError("RelativeKeID is 16 bytes")
    return f"{relative_ke_id.hex()}@{check_fqdn(mef_fqdn)}"


def parse_ke_id(ke_id: str) -> tuple[bytes, str]:
    """Return (RelativeKeID, MEF-FQDN) of a KeID, or raise BadRequest."""
    m = _KEID_RE.fullmatch(ke_id or "")
    if not m:
        raise BadRequest("a KeID has the form <32 hex digits>@<MEF-FQDN>")
    return bytes.fromhex(m.group(1)), check_fqdn(m.group(2))


def normalise_ke_id(ke_id: str) -> str:
    rel, fqdn = parse_ke_id(ke_id)
    return f"{rel.hex()}@{fqdn.lower()}"


def _hmac(key: Secret, label: bytes, *parts: bytes) -> Secret:
    k = key.reveal()
    if len(k) != 32:
        raise ValueError("Ke is 32 bytes")
    return Secret(hmac.new(k, label + b"".join(parts), hashlib.sha256).digest(), "derived key")


def derive_km(ke: Secret, maf_id: str) -> Secret:
    """Km := HMAC-SHA-256(Ke, "oneM2M Enrolment Key to Master Credential derivation" || MAF-ID) (§10.3.2)."""
    return _hmac(ke, LABEL_KM, encode_identity(maf_id))


def derive_kpsa(ke: Secret, enrolee_b_id: str) -> Secret:
    """Kpsa := HMAC-SHA-256(Ke, "... Provisioned Secure Connection Key derivation" || Enrolee-B-ID) (§10.3.3)."""
    return _hmac(ke, LABEL_KPSA, encode_identity(enrolee_b_id))


def encode_suid(suid: int) -> bytes:
    """The SUID as decimal ASCII (project decision, docs/key-derivation.md)."""
    if isinstance(suid, bool) or not isinstance(suid, int) or suid not in VALID_SUIDS:
        raise BadRequest(f"{suid!r} is not an m2m:suid value (TS-0004 Table 6.3.4.2.39-1)")
    return str(suid).encode("ascii")


def derive_usage_constrained_key(ke: Secret, suid: int, enrolment_target_fqdn: str) -> Secret:
    """HMAC-SHA-256(Ke, "... Usage-Constrained Symmetric Key derivation" || SUID || Enrolment-Target-ID) (§10.3.7).

    ``enrolment_target_fqdn`` is the FQDN form of the Target's identifier; for a CSE or AE use
    :func:`target_fqdn` on its Absolute CSE-ID / AE-ID.
    """
    return _hmac(ke, LABEL_KUC, encode_suid(suid), encode_identity(enrolment_target_fqdn))


def target_fqdn(target_id: str, sp_id: str | None = None) -> str:
    """FQDN representation of an Absolute CSE-ID or AE-ID (TS-0003 §10.3.7; encoding: project decision).

    ``//sp.example/id-in``            -> ``id-in.sp.example``
    ``//sp.example/id-in/Cae1``       -> ``Cae1.id-in.sp.example``
    An SP-relative ID (``/id-in``, ``/id-in/Cae1``) is made absolute with ``sp_id`` first.
    A plain FQDN (no ``/``) is returned unchanged.
    """
    if not isinstance(target_id, str) or not target_id:
        raise BadRequest("an Enrolment Target ID must be a non-empty string")
    if target_id.startswith("//"):
        rest = target_id[2:]
    elif target_id.startswith("/"):
        if not sp_id:
            raise BadRequest(f"{target_id!r} is SP-relative; the SP-ID is needed to make it absolute")
        rest = sp_id.lstrip("/") + target_id
    else:
        return check_fqdn(target_id)
    labels = [p for p in rest.split("/")]
    if len(labels) < 2 or any(not p for p in labels):
        raise BadRequest(f"{target_id!r} is not an Absolute CSE-ID or AE-ID")
    domain, ids = labels[0], labels[1:]
    return check_fqdn(".".join(reversed(ids)) + "." + domain)


def credential_id(type_id: int, value: str) -> str:
    """Credential-ID = <typeID>-<value> (TS-0003 §10.4); value uses [A-Za-z0-9._@-]."""
    if isinstance(type_id, bool) or not isinstance(type_id, int) or type_id not in VALID_CRED_TYPES:
        raise BadRequest(f"{type_id!r} is not a sec:credIDTypeID")
    if not isinstance(value, str) or not _CRED_VALUE_RE.fullmatch(value):
        raise BadRequest("the value part of a Credential-ID may use only letters, digits, '.', '_', '-' and '@'")
    return f"{type_id}-{value}"


def parse_credential_id(cred_id: str) -> tuple[int, str]:
    head, sep, value = (cred_id or "").partition("-")
    if not sep or not re.fullmatch(r"[1-9][0-9]{0,2}", head):
        raise BadRequest("a Credential-ID has the form <typeID>-<value>")
    credential_id(int(head), value)
    return int(head), value
