"""Enrolee side of the PPSK RSPF (TS-0003 §8.3.2.1), of the Certificate-Based RSPF's handshake (§8.3.2.2),
plus securityProfile provisioning (seed CR 0055).

One TLS-PSK session with the MEF (psk_identity = KpmID, psk = Kpm) - or one mutual-TLS session in which the
Enrolee presents its certificate and the MEF's certificate must chain to the configured trust anchor and name
the MEF-FQDN - then, the same in both cases:

1. both sides export ``EXPORTER-oneM2M-Bootstrap`` (48 bytes) -> RelativeKeID || Ke, KeID;
2. ``POST /securityProfile`` with the M2M-Node-ID -> the profile, which is checked against the schema, the
   KeID and the locally derived registrar key before anything is kept;
3. ``POST /enrolmentExchange`` with the three indications; instructions are acknowledged until the MEF
   ends the exchange;
4. Ke, KeID and the profile are stored encrypted (key derived from Kpm, or from the certificate's private key)
   in a 0600 file.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from .. import keys, profile
from ..client import OneM2MClient
from ..errors import BadRequest, ConfigError, ProfileInvalid, RemoteError, RspfError, StoreError
from ..fileutil import check_private, write_private
from ..mef import protocol
from ..sealing import Sealer
from ..secret import Secret, constant_time_equal
from ..tls import CertClient, PskClient, TlsConnection
from .certificates import CertificateStore, HeldCertificate, check_instruction, enrol_certificate, renew_certificate

log = logging.getLogger(__name__)

STORE_FORMAT = 1


@dataclass(kw_only=True)
class EnroleeConfig:
    """Where the MEF is and how this Enrolee authenticates: a Kpm (``kpm_id``, ``kpm``) or a certificate
    (``cert_file``, ``key_file`` and ``trust_anchor_file``, the anchor the MEF's certificate must chain to)."""

    mef_host: str
    mef_port: int
    mef_fqdn: str
    node_id: str
    store_path: Path
    kpm_id: str | None = None
    kpm: Secret | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    trust_anchor_file: Path | None = None
    location: str | None = None
    remote_management: bool = True
    renew_before_seconds: int = 24 * 3600
    tls_min_version: str = "1.2"
    tls_max_version: str = "1.3"
    timeout: float = 15.0
    #: ask the MEF for a certificate (certificateEnrolment) and keep it in ``certificate_dir`` (default: a
    #: folder named after the store, ``<store>.certificate``)
    certificate_enrolment: bool = False
    certificate_dir: Path | None = None

    def __post_init__(self) -> None:
        psk = (self.kpm_id, self.kpm)
        cert = (self.cert_file, self.key_file, self.trust_anchor_file)
        if any(v is not None for v in psk) and any(v is not None for v in cert):
            raise ConfigError("an Enrolee authenticates with a Kpm or with a certificate, not both")
        if not (all(v is not None for v in psk) or all(v is not None for v in cert)):
            raise ConfigError("an Enrolee needs a KpmID and Kpm, or a certificate, its private key and the trust "
                              "anchor of the MEF's certificate")

    @property
    def uses_certificate(self) -> bool:
        return self.cert_file is not None

    @property
    def certificate_folder(self) -> Path:
        return self.certificate_dir or Path(self.store_path).with_name(Path(self.store_path).name + ".certificate")

    def __repr__(self) -> str:
        auth = (f"cert={self.cert_file}, key=<file {self.key_file}>, trust_anchor={self.trust_anchor_file}"
                if self.uses_certificate else f"kpm_id={self.kpm_id}, kpm=<redacted>")
        return (f"EnroleeConfig(mef={self.mef_host}:{self.mef_port}, mef_fqdn={self.mef_fqdn}, node_id={self.node_id}, "
                f"store={self.store_path}, {auth})")


@dataclass
class Enrolment:
    """What an enrolment yields and the Enrolee keeps."""

    ke_id: str
    enrolment_key: Secret
    profile: dict[str, Any]
    instructions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def expiry(self) -> dt.datetime:
        return profile.parse_timestamp(self.profile["expiry"])

    @property
    def issued_at(self) -> dt.datetime:
        return profile.parse_timestamp(self.profile["issuedAt"])

    @property
    def registrar_key(self) -> Secret:
        """The PSK for the registrar (usage-constrained key, SUID 22); its psk_identity is :attr:`ke_id`."""
        return Secret(base64.b64decode(self.profile["credential"]["key"]), "registrar key")

    @property
    def enrolee_id(self) -> str:
        return self.profile["enroleeID"]

    def renewal_due(self, renew_before_seconds: int) -> dt.datetime:
        """When to renew: ``renew_before_seconds`` before expiry, but never in the first half of the lifetime
        (so a short-lived profile is not renewed continuously)."""
        lifetime = (self.expiry - self.issued_at).total_seconds()
        return self.expiry - dt.timedelta(seconds=min(renew_before_seconds, lifetime / 2))

    def needs_renewal(self, renew_before_seconds: int, now: dt.datetime | None = None) -> bool:
        return (now or dt.datetime.now(dt.UTC)) >= self.renewal_due(renew_before_seconds)

    def summary(self) -> dict[str, Any]:
        """A printable view without any key."""
        return {"keID": self.ke_id, "profile": profile.redacted(self.profile), "instructions": self.instructions}

    def __repr__(self) -> str:
        p = self.profile
        return f"<Enrolment ke_id={self.ke_id} enrolee={p.get('enroleeID')} expiry={p.get('expiry')}>"


class Enrolee:
    def __init__(self, config: EnroleeConfig, *, tls_client: PskClient | CertClient | None = None) -> None:
        self.config = config
        self._tls: PskClient | CertClient
        if config.cert_file is not None:
            assert config.key_file is not None and config.trust_anchor_file is not None
            self._tls = tls_client or CertClient(config.trust_anchor_file, config.cert_file, config.key_file,
                                                 min_version=config.tls_min_version,
                                                 max_version=config.tls_max_version)
            if not isinstance(self._tls, CertClient) or not self._tls.own_id:
                raise ConfigError(f"the certificate {config.cert_file} names no oneM2M ID")
            #: the Enrolee's identity towards the MEF (the originator of its requests) and the store's tag
            self.identity, self._store_tag = self._tls.own_id, "certID"
            self._sealer_key = _private_key_secret(config.key_file)
        else:
            assert config.kpm_id is not None and config.kpm is not None
            self._tls = tls_client or PskClient(min_version=config.tls_min_version,
                                                max_version=config.tls_max_version)
            self.identity, self._store_tag = config.kpm_id, "kpmID"
            self._sealer_key = config.kpm

    # -- the procedure --------------------------------------------------------------------------
    def _connect(self) -> TlsConnection:
        """The authenticated session with the MEF; TlsError (nothing sent) when the MEF is not proven."""
        c = self.config
        if isinstance(self._tls, CertClient):
            return self._tls.connect(c.mef_host, c.mef_port, c.mef_fqdn, server_name=c.mef_fqdn, timeout=c.timeout)
        assert c.kpm_id is not None and c.kpm is not None
        return self._tls.connect(c.mef_host, c.mef_port, c.kpm_id, c.kpm, server_name=c.mef_fqdn, timeout=c.timeout)

    def enrol(self, *, store: bool = True) -> Enrolment:
        """Run a full enrolment with the MEF; on success store and return it. On failure nothing is stored."""
        c = self.config
        tls = self._connect()
        client = OneM2MClient(tls, self.identity, host=c.mef_fqdn, deadline=c.timeout)
        try:
            material = keys.split_exporter_output(
                tls.export_keying_material(keys.EXPORTER_LABEL_BOOTSTRAP, keys.EXPORTER_LENGTH))
            ke_id = keys.make_ke_id(material.relative_ke_id, c.mef_fqdn)
            data = client.call("POST", protocol.PATH_SECURITY_PROFILE,
                               protocol.ProfileRequest(c.node_id, c.location).to_body())
            prof = self._check_profile(data, ke_id, material.enrolment_key)
            instructions = self._exchange(client, tls)
        finally:
            client.close()
        enrolment = Enrolment(ke_id, material.enrolment_key, prof, instructions)
        if store:
            self.save(enrolment)
        log.info("enrolled with MEF %s as %s: KeID %s, expires %s", c.mef_fqdn, prof["enroleeID"], ke_id,
                 prof["expiry"])
        return enrolment

    def _check_profile(self, data: Any, ke_id: str, ke: Secret) -> dict[str, Any]:
        if not isinstance(data, dict) or not isinstance(data.get(profile.WRAPPER), dict):
            raise ProfileInvalid("the MEF's answer carries no securityProfile")
        prof = profile.validate(data[profile.WRAPPER])
        if prof["credential"]["keyID"] != ke_id:
            raise ProfileInvalid("the securityProfile names a KeID other than the one this session derived")
        if prof["mefFQDN"] != self.config.mef_fqdn.lower():
            raise ProfileInvalid("the securityProfile comes from another MEF-FQDN than the one configured")
        if prof["nodeID"] != self.config.node_id:
            raise ProfileInvalid("the securityProfile is for another M2M-Node-ID")
        fqdn = keys.target_fqdn(prof["spID"] + prof["registrar"]["cseID"])
        if prof["registrar"].get("fqdn", fqdn) != fqdn:
            raise ProfileInvalid("the securityProfile's registrar FQDN does not match its CSE-ID")
        expected = keys.derive_usage_constrained_key(ke, prof["credential"]["suid"], fqdn)
        if not constant_time_equal(base64.b64decode(prof["credential"]["key"]), expected.reveal()):
            raise ProfileInvalid("the registrar key in the securityProfile does not match the one derived from Ke")
        return prof

    def _exchange(self, client: OneM2MClient, tls: TlsConnection) -> list[dict[str, Any]]:
        c = self.config
        data = client.call("POST", protocol.PATH_ENROLMENT_EXCHANGE,
                           protocol.enrol_request({"remoteManagement": c.remote_management,
                                                   "certificateEnrolment": c.certificate_enrolment}))
        seen: list[dict[str, Any]] = []
        for _ in range(protocol.MAX_EXCHANGE_INSTRUCTIONS):  # a MEF cannot keep us in the exchange forever
            rsp = protocol.parse_enrol_response(data)
            kind = rsp["instructionType"]
            if kind == protocol.INSTRUCTION_END:
                return seen
            if kind == protocol.INSTRUCTION_CERT and c.certificate_enrolment:
                ok = self._follow_certificate_instruction(client, tls, rsp)
            elif kind == protocol.INSTRUCTION_RM and c.remote_management:
                ok = True
                log.info("MEF instructs contacting remote management server %s after enrolment", rsp.get("uri"))
            else:
                ok = False
                log.warning("MEF instruction %s is not supported by this Enrolee", kind)
            seen.append({**rsp, "carriedOut": ok})  # what the MEF instructed, and whether this Enrolee did it
            data = client.call("POST", protocol.PATH_ENROLMENT_EXCHANGE, protocol.enrol_ack(kind, ok))
        raise BadRequest(f"the MEF did not end the Enrolment Exchange after {protocol.MAX_EXCHANGE_INSTRUCTIONS} "
                         "instructions")

    def _follow_certificate_instruction(self, client: OneM2MClient, tls: TlsConnection,
                                        rsp: dict[str, Any]) -> bool:
        """Obtain the instructed certificate over this session; whether it was obtained (and kept). A failure
        keeps nothing of it (the enrolment itself goes on) and is logged with its reason."""
        c = self.config
        try:
            instruction = protocol.CertificateInstruction.from_instruction(rsp)
            check_instruction(instruction, c.mef_fqdn, c.mef_port)
            enrol_certificate(client, tls, instruction, self.certificates)
        except (RspfError, ValueError) as exc:
            log.warning("the MEF's certificateEnrolment instruction was not carried out: %s", exc)
            return False
        return True

    @property
    def certificates(self) -> CertificateStore:
        return CertificateStore(self.config.certificate_folder)

    def renew_certificate(self) -> HeldCertificate:
        """Renew the stored certificate (simplereenroll) over a mutual-TLS session authenticated with it; the MEF
        must prove a certificate naming the MEF-FQDN from the stored CA (or, for an Enrolee configured with a
        certificate, from its ``trust_anchor_file``). Nothing changes on failure."""
        c = self.config
        current = self.certificates.load()
        if current is None:
            raise StoreError(f"there is no certificate in {c.certificate_folder} to renew; enrol with "
                             "certificate enrolment first")
        client_tls = CertClient(current.ca_file, current.cert_file, current.key_file, min_version=c.tls_min_version,
                                max_version=c.tls_max_version)
        if c.trust_anchor_file is not None and Path(c.trust_anchor_file) != current.ca_file:
            # a certificate enrolee also knows the anchor of the MEF's own TLS certificate (tls_cert_file)
            client_tls.context.load_verify_locations(str(c.trust_anchor_file))
        tls = client_tls.connect(c.mef_host, c.mef_port, c.mef_fqdn, server_name=c.mef_fqdn, timeout=c.timeout)
        client = OneM2MClient(tls, current.subject, host=c.mef_fqdn, deadline=c.timeout)
        try:
            return renew_certificate(client, tls, current, self.certificates)
        finally:
            client.close()

    def ensure_certificate(self, *, now: dt.datetime | None = None) -> tuple[HeldCertificate | None, bool]:
        """(the certificate, renewed): renewed when due; a failed renewal is a warning (the current one is kept
        and the next call tries again)."""
        current = self.certificates.load()
        now = now or dt.datetime.now(dt.UTC)
        if current is None or now < current.renewal_due(self.config.renew_before_seconds):
            return current, False
        try:
            return self.renew_certificate(), True
        except RspfError as exc:
            log.warning("the certificate of %s (until %s) could not be renewed: %s; trying again later",
                        current.subject, current.not_after.isoformat(), exc)
            return current, False

    def ensure(self, *, now: dt.datetime | None = None) -> tuple[Enrolment, bool]:
        """Return (enrolment, renewed): the stored one if valid and not near expiry, else a new one."""
        try:
            current = self.load()
        except StoreError as exc:
            log.warning("stored enrolment unusable (%s); enrolling again", exc)
            current = None
        if current is not None and not current.needs_renewal(self.config.renew_before_seconds, now):
            return current, False
        if current is not None:
            log.info("enrolment %s expires %s: renewing", current.ke_id, current.profile["expiry"])
        return self.enrol(), True

    # -- storage --------------------------------------------------------------------------------
    def _sealer(self, salt: bytes) -> Sealer:
        return Sealer(self._sealer_key, b"enrolee store", salt)

    def save(self, enrolment: Enrolment) -> None:
        salt = os.urandom(16)
        plain = json.dumps({
            "keID": enrolment.ke_id,
            "ke": base64.b64encode(enrolment.enrolment_key.reveal()).decode(),
            "profile": enrolment.profile,
            "instructions": enrolment.instructions,
        }).encode()
        blob = self._sealer(salt).seal(plain, self.identity.encode())
        doc = {"format": STORE_FORMAT, self._store_tag: self.identity,
               "salt": base64.b64encode(salt).decode(), "sealed": base64.b64encode(blob).decode()}
        write_private(Path(self.config.store_path), json.dumps(doc).encode())

    def load(self) -> Enrolment | None:
        path = Path(self.config.store_path)
        if not path.exists():
            return None
        try:
            doc = json.loads(path.read_text())
            if not isinstance(doc, dict):
                raise StoreError(f"{path} is not an enrolment store")
            if doc.get("format") != STORE_FORMAT or doc.get(self._store_tag) != self.identity:
                what = "KpmID" if self._store_tag == "kpmID" else "certificate ID"
                raise StoreError(f"{path} is not an enrolment store for {what} {self.identity}")
            plain = self._sealer(base64.b64decode(doc["salt"])).open(
                base64.b64decode(doc["sealed"]), self.identity.encode())
            data = json.loads(plain)
            prof = profile.validate(data["profile"])
        except StoreError:
            raise
        except (ValueError, KeyError, TypeError, ProfileInvalid):
            raise StoreError(f"{path} is damaged") from None
        return Enrolment(data["keID"], Secret(base64.b64decode(data["ke"]), "Ke"), prof, data.get("instructions", []))


def _private_key_secret(key_file: Path) -> Secret:
    """The Enrolee's private key (PKCS#8 DER, whatever the file's PEM form) as the key its store is sealed
    under; the file must be 0600."""
    check_private(Path(key_file), "the Enrolee's private key file")
    try:
        key = serialization.load_pem_private_key(Path(key_file).read_bytes(), None)
    except (OSError, ValueError, TypeError):
        raise ConfigError(f"{key_file} is not an unencrypted PEM private key") from None
    return Secret(key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()), "Enrolee private key")


__all__ = ["Enrolee", "EnroleeConfig", "Enrolment", "RemoteError"]
