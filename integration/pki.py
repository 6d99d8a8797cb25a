"""A throw-away PKI for mutual-TLS tests: a CA, server certificates (the real one and impostors') and client
certificates naming oneM2M IDs."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


#: what the real server certificate names: the DNS name, the loopback address and the CSE-ID of the test IN-CSE
SERVER_SAN = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
              x509.UniformResourceIdentifier("//sp.example.com/id-in")]
OTHER_SAN = [x509.DNSName("other.example.com"), x509.UniformResourceIdentifier("//sp.example.com/id-other")]


def _cert(subject: str, issuer_key, issuer_name, key, *, ca: bool = False, san: list | None = None,
          expired: bool = False):
    now = dt.datetime.now(dt.UTC)
    start, end = (now - dt.timedelta(days=2), now - dt.timedelta(days=1)) if expired else \
        (now - dt.timedelta(minutes=5), now + dt.timedelta(days=1))
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(start).not_valid_after(end)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert, key=None) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        key_path = path.with_suffix(".key")
        key_path.touch(0o600)
        key_path.chmod(0o600)
        key_path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def make_pki(d: Path, clients: dict[str, str], *, rogue: dict[str, str] | None = None,
             expired: dict[str, str] | None = None, server_dns: str | None = None) -> Path:
    """Write ca.pem, server.pem/.key (:data:`SERVER_SAN`) and, per ``name -> SAN URI``, name.pem/.key signed by
    the CA; ``rogue`` clients are signed by another CA, ``expired`` ones by the CA but expired yesterday.
    Impostor servers' certificates too: ``server-other-ca`` (the same names from another CA),
    ``server-other-name`` (this CA, :data:`OTHER_SAN`), ``server-expired`` (this CA, the same names, expired
    yesterday) and ``self-signed``. ``server_dns`` (a MEF-FQDN, say) is added to the DNS names of the server
    certificates that carry :data:`SERVER_SAN`. Private keys are written 0600. Returns ``d``."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test CA", ca_key, _name("test CA"), ca_key, ca=True)
    _write(d / "ca.pem", ca)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = _cert("other CA", other_key, _name("other CA"), other_key, ca=True)
    san = SERVER_SAN + ([x509.DNSName(server_dns)] if server_dns else [])
    servers = {"server": (ca_key, ca, san, False), "server-other-ca": (other_key, other, san, False),
               "server-other-name": (ca_key, ca, OTHER_SAN, False), "server-expired": (ca_key, ca, san, True)}
    for name, (issuer_key, issuer, names, stale) in servers.items():
        key = ec.generate_private_key(ec.SECP256R1())
        _write(d / f"{name}.pem", _cert("localhost", issuer_key, issuer.subject, key, san=names, expired=stale), key)
    key = ec.generate_private_key(ec.SECP256R1())
    _write(d / "self-signed.pem", _cert("impostor", key, _name("impostor"), key, san=SERVER_SAN), key)
    for group, (issuer_key, issuer), stale in ((clients, (ca_key, ca), False), (rogue or {}, (other_key, other), False),
                                               (expired or {}, (ca_key, ca), True)):
        for name, uri in group.items():
            key = ec.generate_private_key(ec.SECP256R1())
            _write(d / f"{name}.pem", _cert(name, issuer_key, issuer.subject, key,
                                            san=[x509.UniformResourceIdentifier(uri)], expired=stale), key)
    return d
