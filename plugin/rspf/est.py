"""Certificate provisioning (TS-0003 §8.3.6, §10.1) over EST (RFC 7030), in one place: the EST resources and
media types, the body encodings, the profile of the certificates a MEF issues (TS-0003 §10.1.1.5/§10.1.1.7,
CSR profile §10.1.4) and the channel binding of a CSR to its TLS session. Shared by the MEF (the EST server
and CA), the Enrolee (the EST client) and the CSE plugin (which reads the names of a certificate). Pure: no I/O.

Project decisions (TS-0032 is not available; docs/certificates.md):

* the EST server is the MEF's own listener, under ``/.well-known/est`` (RFC 7030 §3.2.2), no CA label;
* the subject's oneM2M ID is a subjectAltName URI in absolute form: ``//sp/cse-id`` for a CSE,
  ``//sp/cse-id/Cxyz`` for an AE (rspf.tls.certificate_onem2m_id reads it back); an AE's App-ID, when the
  MEF binds one, is a second URI ``urn:onem2m-rspf:app-id:<App-ID>`` (TS-0003 names no form for it);
* proof of possession: the CSR's signature; channel binding: the CSR's challengePassword is the base64 of 32
  bytes of the TLS exporter with label :data:`EXPORTER_LABEL_EST` (RFC 7030 §3.5 binds tls-unique, which TLS
  1.3 does not have). A CSR without a challengePassword is accepted (``openssl req`` cannot know the exporter
  value); one whose challengePassword differs from the session's is refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import AttributeOID, NameOID

from .errors import BadRequest
from .secret import Secret, constant_time_equal

#: The EST resources (RFC 7030 §3.2.2) under the MEF's authority
EST_PATH = "/.well-known/est"
OP_CACERTS = "cacerts"              # GET: the CA certificates (the trust anchor of what the MEF issues)
OP_SIMPLEENROLL = "simpleenroll"    # POST a CSR: the first certificate
OP_SIMPLEREENROLL = "simplereenroll"  # POST a CSR: a renewal, authenticated by the certificate it renews
OP_CSRATTRS = "csrattrs"            # GET: what the CSR must carry
OPERATIONS = (OP_CACERTS, OP_SIMPLEENROLL, OP_SIMPLEREENROLL, OP_CSRATTRS)

#: Media types (RFC 7030 §4.1.3, §4.2, §4.5); bodies are base64 (Content-Transfer-Encoding: base64)
CT_PKCS10 = "application/pkcs10"
CT_CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"
CT_CACERTS = "application/pkcs7-mime"
CT_CSRATTRS = "application/csrattrs"

#: certSubjectType of the certificateEnrolment instruction (TS-0003 §12, certProvCmdArgs)
SUBJECT_NODE, SUBJECT_CSE, SUBJECT_AE = 1, 2, 3
#: certProvProtocolID: EST
PROTOCOL_EST = 1

EXPORTER_LABEL_EST = "EXPORTER-oneM2M-RSPF-EST-CSR-binding"
EXPORTER_LENGTH_EST = 32
APP_ID_URI_PREFIX = "urn:onem2m-rspf:app-id:"

#: The largest EST request body accepted (a P-256 CSR with a few names is under 1 KiB)
MAX_BODY_BYTES = 16 * 1024
_APP_ID_RE = re.compile(r"[A-Za-z0-9._~-]{1,256}")


def est_path(op: str) -> str:
    if op not in OPERATIONS:
        raise ValueError(f"{op!r} is not an EST operation")
    return f"{EST_PATH}/{op}"


def is_est_path(path: str) -> bool:
    return path == EST_PATH or path.startswith(EST_PATH + "/")


def parse_est_path(path: str) -> str:
    """The operation of ``/.well-known/est/<op>``; BadRequest for anything else under the EST path."""
    op = path[len(EST_PATH) + 1:] if path.startswith(EST_PATH + "/") else ""
    if op not in OPERATIONS:
        raise BadRequest(f"the EST resources are {', '.join(est_path(o) for o in OPERATIONS)}")
    return op


# ------------------------------------------------------------------------------ bodies
def _b64(der: bytes) -> bytes:
    return base64.encodebytes(der)  # lines of 76 characters, as MIME base64


def _unb64(body: bytes, what: str) -> bytes:
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest(f"the {what} is larger than {MAX_BODY_BYTES} bytes")
    try:
        return base64.b64decode(b"".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"the {what} is not base64 (RFC 7030 bodies are base64-encoded DER)") from None


def csr_body(csr: x509.CertificateSigningRequest) -> bytes:
    return _b64(csr.public_bytes(serialization.Encoding.DER))


def parse_csr_body(body: bytes) -> x509.CertificateSigningRequest:
    """The CSR of a simpleenroll/simplereenroll body, its signature checked (proof of possession)."""
    der = _unb64(body, "certificate signing request")
    try:
        csr = x509.load_der_x509_csr(der)
        valid = csr.is_signature_valid
    except (ValueError, TypeError):
        raise BadRequest("the body is not a DER PKCS#10 certificate signing request") from None
    if not valid:
        raise BadRequest("the certificate signing request's signature does not verify (no proof of possession)")
    return csr


def certs_body(certs: list[x509.Certificate]) -> bytes:
    """A certs-only PKCS#7 (CMS SignedData without signers), base64."""
    return _b64(pkcs7.serialize_certificates(certs, serialization.Encoding.DER))


def parse_certs_body(body: bytes) -> list[x509.Certificate]:
    der = _unb64(body, "certs-only answer")
    try:
        certs = pkcs7.load_der_pkcs7_certificates(der)
    except (ValueError, TypeError):
        raise BadRequest("the answer is not a certs-only PKCS#7 structure") from None
    if not certs:
        raise BadRequest("the certs-only answer holds no certificate")
    return certs


#: What csrattrs asks for (RFC 7030 §4.5.2: a SEQUENCE of OIDs): the challengePassword (the channel binding),
#: an extensionRequest (the subjectAltName), ECDSA with SHA-256 on P-256
CSR_ATTRIBUTE_OIDS = ("1.2.840.113549.1.9.7", "1.2.840.113549.1.9.14", "1.2.840.10045.4.3.2", "1.2.840.10045.3.1.7")


def _der_oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return bytes([0x06, len(out)]) + bytes(out)


def csr_attributes_body() -> bytes:
    body = b"".join(_der_oid(o) for o in CSR_ATTRIBUTE_OIDS)
    return _b64(bytes([0x30, len(body)]) + body)


# ------------------------------------------------------------------------------ the certificate profile
def subject_uri(sp_id: str, enrolee_id: str, registrar_cse_id: str) -> str:
    """The subjectAltName URI naming an enrolee: ``//sp/cse-id`` (a CSE) or ``//sp/registrar/Cxyz`` (an AE)."""
    if enrolee_id.startswith("/"):
        return sp_id + enrolee_id
    return f"{sp_id}{registrar_cse_id}/{enrolee_id}"


def subject_type(enrolee_id: str) -> int:
    return SUBJECT_CSE if enrolee_id.startswith("/") else SUBJECT_AE


def app_id_uri(app_id: str) -> str:
    if not _APP_ID_RE.fullmatch(app_id):
        raise BadRequest(f"{app_id[:64]!r} is not an App-ID this project puts in a certificate")
    return APP_ID_URI_PREFIX + app_id


def _uris(names: x509.SubjectAlternativeName | None) -> list[str]:
    return [] if names is None else [str(u) for u in names.get_values_for_type(x509.UniformResourceIdentifier)]


def _san(ext_holder: x509.Certificate | x509.CertificateSigningRequest) -> x509.SubjectAlternativeName | None:
    try:
        return ext_holder.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None


def names_of(item: x509.Certificate | x509.CertificateSigningRequest) -> tuple[list[str], str | None]:
    """(the oneM2M-ID URIs ``//...``, the App-ID or None) that a certificate or CSR carries in subjectAltName."""
    uris = _uris(_san(item))
    ids = [u for u in uris if u.startswith("//")]
    apps = [u[len(APP_ID_URI_PREFIX):] for u in uris if u.startswith(APP_ID_URI_PREFIX)]
    return ids, apps[0] if len(apps) == 1 else None


def certificate_app_id(cert: x509.Certificate) -> str | None:
    """The App-ID a certificate binds its AE to (``urn:onem2m-rspf:app-id:``), or None."""
    return names_of(cert)[1]


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ``ca`` signed ``cert`` (its signature checked, not only the issuer's name)."""
    if cert.issuer != ca.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, lowercase hex: how the revocation feed names a certificate."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


# ------------------------------------------------------------------------------ the Enrolee's side
def new_private_key() -> ec.EllipticCurvePrivateKey:
    """A P-256 signing key (TS-0003 §10.2.3: ECDHE_ECDSA), made on the device."""
    return ec.generate_private_key(ec.SECP256R1())


def challenge_password(binding: Secret) -> str:
    return base64.b64encode(binding.reveal()).decode("ascii")


def make_csr(key: ec.EllipticCurvePrivateKey, subject: str, *, app_id: str | None = None,
             binding: Secret | None = None) -> x509.CertificateSigningRequest:
    """A CSR as TS-0003 §10.1.4 wants it: the public key, the subject's oneM2M ID (and App-ID) in
    subjectAltName; the channel binding as challengePassword when given."""
    uris = [x509.UniformResourceIdentifier(subject)]
    if app_id is not None:
        uris.append(x509.UniformResourceIdentifier(app_id_uri(app_id)))
    builder = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject.rsplit("/", 1)[-1])]))
               .add_extension(x509.SubjectAlternativeName(uris), critical=False))
    if binding is not None:
        builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, challenge_password(binding).encode())
    return builder.sign(key, hashes.SHA256())


def csr_binding_matches(csr: x509.CertificateSigningRequest, binding: Secret) -> bool | None:
    """None: the CSR carries no challengePassword; else whether it is this session's binding."""
    try:
        value = csr.attributes.get_attribute_for_oid(AttributeOID.CHALLENGE_PASSWORD).value
    except x509.AttributeNotFound:
        return None
    return constant_time_equal(bytes(value), challenge_password(binding).encode())
