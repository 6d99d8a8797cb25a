"""The MEF's certificate authority (TS-0003 §8.3.6: the MEF is the EST server and issues the certificates):
its key and certificate, the certificates it issues, and the MEF's own FQDN certificate (§10.1.1.6).

The CA key is read from a 0600 file or generated on first start (ECDSA P-256), and never logged. No I/O but
those two files (and the MEF's server certificate files, rewritten at each start).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .. import est
from ..errors import ConfigError
from ..fileutil import check_private, write_private

log = logging.getLogger(__name__)

#: Validity of a generated CA certificate, and of the MEF's own server certificate (reissued at each start)
CA_YEARS = 20
SERVER_CERT_DAYS = 90
#: Issued certificates start this long before now (clocks of devices and CSEs differ a little)
BACKDATE = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class Issued:
    """A certificate the CA issued, as recorded."""

    certificate: x509.Certificate
    serial: str       # hex
    sha256: str       # rspf.est.fingerprint
    subject: str      # the oneM2M-ID URI
    app_id: str | None

    @property
    def not_after(self) -> dt.datetime:
        return self.certificate.not_valid_after_utc


class MefCa:
    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, cert_file: Path) -> None:
        self.certificate = cert
        self._key = key
        self.cert_file = cert_file

    def __repr__(self) -> str:
        return f"<MefCa {self.certificate.subject.rfc4514_string()} key=<redacted>>"

    @classmethod
    def load_or_create(cls, cert_file: Path, key_file: Path, fqdn: str) -> MefCa:
        """The CA of ``cert_file``/``key_file``; both absent: a new one is made and written (key 0600)."""
        have_cert, have_key = cert_file.exists(), key_file.exists()
        if have_cert != have_key:
            missing = key_file if have_cert else cert_file
            raise ConfigError(f"the EST CA needs both its certificate and its key; {missing} is missing (move "
                              "the other away to have a new CA generated)")
        if not have_cert:
            return cls._create(cert_file, key_file, fqdn)
        check_private(key_file, "the EST CA's private key file")
        try:
            key = serialization.load_pem_private_key(key_file.read_bytes(), None)
        except (ValueError, TypeError):
            raise ConfigError(f"{key_file} is not an unencrypted PEM private key") from None
        try:
            cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        except ValueError:
            raise ConfigError(f"{cert_file} is not a PEM certificate") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or cert.public_key() != key.public_key():
            raise ConfigError(f"{key_file} is not an ECDSA key, or not the key of the CA certificate {cert_file}")
        return cls(cert, key, cert_file)

    @classmethod
    def _create(cls, cert_file: Path, key_file: Path, fqdn: str) -> MefCa:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "onem2m-rspf MEF"),
                          x509.NameAttribute(NameOID.COMMON_NAME, f"EST CA of {fqdn}")])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - BACKDATE)
                .not_valid_after(now + dt.timedelta(days=365 * CA_YEARS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                             crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(ski, critical=False)
                .sign(key, hashes.SHA256()))
        write_private(key_file, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
        cert_file.parent.mkdir(parents=True, exist_ok=True)
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        os.chmod(cert_file, 0o644)
        log.info("generated the EST CA %s (certificate %s, key %s)", name.rfc4514_string(), cert_file, key_file)
        return cls(cert, key, cert_file)

    def issued_here(self, cert: x509.Certificate) -> bool:
        """Whether ``cert`` was signed by this CA (its signature checked, not only its issuer name)."""
        return est.issued_by(cert, self.certificate)

    def _builder(self, public_key: ec.EllipticCurvePublicKey, subject_cn: str, not_after: dt.datetime,
                 now: dt.datetime) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
                .issuer_name(self.certificate.subject).public_key(public_key)
                .serial_number(x509.random_serial_number()).not_valid_before(now - BACKDATE)
                .not_valid_after(min(not_after, self.certificate.not_valid_after_utc))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                               critical=False))

    def issue(self, public_key: ec.EllipticCurvePublicKey, subject: str, app_id: str | None, *, is_cse: bool,
              not_after: dt.datetime, now: dt.datetime | None = None) -> Issued:
        """A certificate in the profile of rspf.est: ``subject`` (a oneM2M-ID URI) and the App-ID as
        subjectAltName URIs; digitalSignature; clientAuth, and serverAuth for a CSE."""
        now = now or dt.datetime.now(dt.UTC)
        uris = [x509.UniformResourceIdentifier(subject)]
        if app_id is not None:
            uris.append(x509.UniformResourceIdentifier(est.app_id_uri(app_id)))
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if is_cse else [])
        cert = (self._builder(public_key, subject.rsplit("/", 1)[-1], not_after, now)
                .add_extension(x509.SubjectAlternativeName(uris), critical=False)
                .add_extension(_SIGNING_ONLY, critical=True)
                .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                .sign(self._key, hashes.SHA256()))
        return Issued(cert, format(cert.serial_number, "x"), est.fingerprint(cert), subject, app_id)

    def write_server_certificate(self, fqdn: str, cert_file: Path, key_file: Path) -> None:
        """The MEF's own FQDN certificate (DNS SAN = ``fqdn``; TS-0003 §10.1.1.6), with a new key, written for the
        certificate handshake (key 0600). Reissued at each start."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (self._builder(key.public_key(), fqdn, now + dt.timedelta(days=SERVER_CERT_DAYS), now)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(fqdn)]), critical=False)
                .add_extension(_SIGNING_ONLY, critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .sign(self._key, hashes.SHA256()))
        write_private(key_file, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
        write_private(cert_file, cert.public_bytes(serialization.Encoding.PEM)
                      + self.certificate.public_bytes(serialization.Encoding.PEM))


_SIGNING_ONLY = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                              encipher_only=False, decipher_only=False)
