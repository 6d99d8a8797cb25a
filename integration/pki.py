"""A throw-away PKI for mutual-TLS tests: a CA, a server certificate and client certificates naming oneM2M IDs."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, issuer_key, issuer_name, key, *, ca: bool = False, san: list | None = None):
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert, key=None) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def make_pki(d: Path, clients: dict[str, str], *, rogue: dict[str, str] | None = None) -> Path:
    """Write ca.pem, server.pem/.key (DNS localhost) and, per ``name -> SAN URI``, name.pem/.key signed by the
    CA; ``rogue`` clients are signed by another CA. Returns ``d``."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test CA", ca_key, _name("test CA"), ca_key, ca=True)
    _write(d / "ca.pem", ca)
    srv_key = ec.generate_private_key(ec.SECP256R1())
    _write(d / "server.pem", _cert("localhost", ca_key, ca.subject, srv_key, san=[x509.DNSName("localhost")]),
           srv_key)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = _cert("other CA", other_key, _name("other CA"), other_key, ca=True)
    for group, (issuer_key, issuer) in ((clients, (ca_key, ca)), (rogue or {}, (other_key, other))):
        for name, uri in group.items():
            key = ec.generate_private_key(ec.SECP256R1())
            _write(d / f"{name}.pem", _cert(name, issuer_key, issuer.subject, key,
                                            san=[x509.UniformResourceIdentifier(uri)]), key)
    return d
