"""The Enrolee's certificate (Certificate-Based RSPF, TS-0003 §8.3.6): obtained over EST when the MEF
instructs it (``certificateEnrolment``), renewed with ``simplereenroll``, kept on the device.

The private key is made on the device and never leaves it. What the MEF sends back is checked before anything
is kept: the certificate holds our public key, is signed by a CA certificate the MEF's ``cacerts`` gave, names
the instructed subject (and App-ID), and is within its validity. The key, the certificate and the CA
certificate are three 0600 files in one folder (docs/enrolee.md); a renewal writes the new ones beside the old
and then replaces them, and a crash in between is finished (or undone) at the next load.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .. import est
from ..client import OneM2MClient
from ..errors import RSC, BadRequest, RemoteError, StoreError
from ..fileutil import check_private, write_private
from ..mef.protocol import CertificateInstruction
from ..secret import Secret
from ..tls import TlsConnection

log = logging.getLogger(__name__)

KEY, CERT, CA = "key.pem", "cert.pem", "ca.pem"
_NEW = ".new"
#: The oneM2M code an EST refusal is reported with
_RSC_OF_STATUS = {400: int(RSC.BAD_REQUEST), 403: int(RSC.ORIGINATOR_HAS_NO_PRIVILEGE), 404: int(RSC.NOT_FOUND),
                  405: int(RSC.OPERATION_NOT_ALLOWED), 429: int(RSC.NOT_ACCEPTABLE)}


@dataclass(frozen=True)
class HeldCertificate:
    """The Enrolee's certificate as stored: files, and what it names."""

    key_file: Path
    cert_file: Path
    ca_file: Path
    certificate: x509.Certificate

    @property
    def not_after(self) -> dt.datetime:
        return self.certificate.not_valid_after_utc

    @property
    def not_before(self) -> dt.datetime:
        return self.certificate.not_valid_before_utc

    @property
    def subject(self) -> str:
        names, _app = est.names_of(self.certificate)
        return names[0] if names else ""

    @property
    def app_id(self) -> str | None:
        return est.names_of(self.certificate)[1]

    def renewal_due(self, renew_before_seconds: int) -> dt.datetime:
        """``renew_before_seconds`` before expiry, but never in the first half of the lifetime."""
        lifetime = (self.not_after - self.not_before).total_seconds()
        return self.not_after - dt.timedelta(seconds=min(renew_before_seconds, lifetime / 2))

    def summary(self) -> dict[str, str | None]:
        return {"subject": self.subject, "appID": self.app_id, "serial": format(self.certificate.serial_number, "x"),
                "notAfter": self.not_after.isoformat(), "certificate": str(self.cert_file),
                "key": str(self.key_file), "trustAnchor": str(self.ca_file)}


class CertificateStore:
    """The folder holding the Enrolee's key, certificate and the MEF's CA certificate (all 0600)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def __repr__(self) -> str:
        return f"<CertificateStore {self.folder}>"

    def _path(self, name: str, new: bool = False) -> Path:
        return self.folder / (name + _NEW if new else name)

    def load(self) -> HeldCertificate | None:
        """The stored certificate, or None. A renewal interrupted after all its new files were written is
        finished; one interrupted before is dropped (the old files stay). StoreError when damaged."""
        self._recover()
        files = [self._path(n) for n in (KEY, CERT, CA)]
        if not any(f.exists() for f in files):
            return None
        for f in files:
            if not f.exists():
                raise StoreError(f"{f} is missing: the certificate in {self.folder} cannot be used; enrol again")
            check_private(f, "a file of the Enrolee's certificate")
        try:
            key = serialization.load_pem_private_key(files[0].read_bytes(), None)
            cert = x509.load_pem_x509_certificate(files[1].read_bytes())
        except (ValueError, TypeError):
            raise StoreError(f"the certificate files in {self.folder} are damaged; enrol again") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or cert.public_key() != key.public_key():
            raise StoreError(f"the key and the certificate in {self.folder} do not belong together; enrol again")
        return HeldCertificate(files[0], files[1], files[2], cert)

    def _recover(self) -> None:
        new = [self._path(n, new=True) for n in (KEY, CERT, CA)]
        if all(f.exists() for f in new):
            self._install()
        else:
            for f in new:
                f.unlink(missing_ok=True)

    def _install(self) -> None:
        for name in (KEY, CERT, CA):
            self._path(name, new=True).replace(self._path(name))

    def save(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, anchors: list[x509.Certificate]) -> \
            HeldCertificate:
        """Keep a new key, certificate and CA: written beside the current ones, then put in their place."""
        pem = serialization.Encoding.PEM
        write_private(self._path(KEY, new=True), key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                                   serialization.NoEncryption()))
        write_private(self._path(CA, new=True), b"".join(a.public_bytes(pem) for a in anchors))
        write_private(self._path(CERT, new=True), cert.public_bytes(pem))
        self._install()
        held = self.load()
        assert held is not None
        return held


def check_instruction(instruction: CertificateInstruction, mef_fqdn: str, mef_port: int) -> None:
    """The instruction's EST URI must be the MEF this Enrolee is connected to (it sends EST requests over that
    authenticated connection only)."""
    parts = urlsplit(instruction.uri)
    if (parts.scheme != "https" or (parts.hostname or "").lower() != mef_fqdn.lower()
            or (parts.port or 443) != mef_port or parts.path.rstrip("/") != est.EST_PATH):
        raise BadRequest(f"the certificateEnrolment URI {instruction.uri[:200]!r} is not the EST server of the MEF "
                         f"this Enrolee is connected to (https://{mef_fqdn}:{mef_port}{est.EST_PATH})")


def _est_call(client: OneM2MClient, op: str, body: bytes = b"") -> bytes:
    headers = {"accept": est.CT_CACERTS if op == est.OP_CACERTS else est.CT_CERTS_ONLY}
    if body:
        headers.update({"content-type": est.CT_PKCS10, "content-transfer-encoding": "base64"})
    resp = client.exchange("POST" if body else "GET", est.est_path(op), headers, body)
    if resp.status != 200:
        why = resp.body[:300].decode("utf-8", "replace").strip() or f"HTTP {resp.status}"
        rsc = _RSC_OF_STATUS.get(resp.status, int(RSC.INTERNAL_SERVER_ERROR))
        raise RemoteError(rsc, f"the MEF's EST server refused {op} (HTTP {resp.status}): {why}")
    return resp.body


def verified(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, anchors: list[x509.Certificate],
             subject: str, app_id: str | None, now: dt.datetime | None = None) -> x509.Certificate:
    """``cert`` if it is the certificate asked for; BadRequest saying what is wrong otherwise."""
    now = now or dt.datetime.now(dt.UTC)
    if cert.public_key() != key.public_key():
        raise BadRequest("the MEF's certificate does not hold the public key this Enrolee sent")
    if not any(est.issued_by(cert, anchor) for anchor in anchors):
        raise BadRequest("the MEF's certificate is not signed by a CA certificate of its cacerts")
    names, app = est.names_of(cert)
    if names != [subject] or app != app_id:
        raise BadRequest(f"the MEF's certificate names {', '.join(names)[:200] or 'nothing'} (App-ID {app!r}), not "
                         f"{subject} (App-ID {app_id!r})")
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        raise BadRequest("the MEF's certificate is not valid now")
    return cert


def enrol_certificate(client: OneM2MClient, tls: TlsConnection, instruction: CertificateInstruction,
                      store: CertificateStore) -> HeldCertificate:
    """Follow a certificateEnrolment instruction over the MEF session ``client``/``tls``: cacerts, a new key,
    simpleenroll with a CSR bound to this session, checks, then keep it."""
    anchors = est.parse_certs_body(_est_call(client, est.OP_CACERTS))
    key = est.new_private_key()
    binding = tls.export_keying_material(est.EXPORTER_LABEL_EST, est.EXPORTER_LENGTH_EST)
    csr = est.make_csr(key, instruction.subject_id, app_id=instruction.app_id, binding=binding)
    cert = est.parse_certs_body(_est_call(client, est.OP_SIMPLEENROLL, est.csr_body(csr)))[0]
    held = store.save(key, verified(cert, key, anchors, instruction.subject_id, instruction.app_id), anchors)
    log.info("obtained a certificate for %s over EST (serial %x, until %s), kept in %s", held.subject,
             cert.serial_number, held.not_after.isoformat(), store.folder)
    return held


def renew_certificate(client: OneM2MClient, tls: TlsConnection, current: HeldCertificate,
                      store: CertificateStore) -> HeldCertificate:
    """simplereenroll over a session authenticated with ``current``: a new key, the same names."""
    anchors = est.parse_certs_body(_est_call(client, est.OP_CACERTS))
    key = est.new_private_key()
    binding: Secret = tls.export_keying_material(est.EXPORTER_LABEL_EST, est.EXPORTER_LENGTH_EST)
    csr = est.make_csr(key, current.subject, app_id=current.app_id, binding=binding)
    cert = est.parse_certs_body(_est_call(client, est.OP_SIMPLEREENROLL, est.csr_body(csr)))[0]
    held = store.save(key, verified(cert, key, anchors, current.subject, current.app_id), anchors)
    log.info("renewed the certificate of %s (serial %x, until %s)", held.subject, cert.serial_number,
             held.not_after.isoformat())
    return held
