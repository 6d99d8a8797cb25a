"""An AE that talks to its registrar CSE over an authenticated secure connection.

TLS-PSK with a provisioned credential (enrol with the MEF, then psk_identity = KeID, psk = registrar key)::

    from rspf.ae import SecureAE
    ae = SecureAE.from_enrolee(enrolee)          # enrols (or reuses a valid stored enrolment)
    with ae.session() as cse:
        cse.register("Nmy-app")                   # CREATE <AE> as the provisioned AE-ID
        cse.create_container("readings")
        cse.retrieve("readings")

Mutual TLS with a certificate the operator issued (the AE-ID is the one the certificate names)::

    from rspf.tls import CertClient
    ae = SecureAE.with_certificate("https://cse.example.com:8443/cse-in", CertClient("ca.pem", "ae.pem", "ae.key"),
                                   expected_peer="/id-in")
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from .client import OneM2MClient
from .enrolee import Enrolee, Enrolment
from .errors import RSC, BadRequest, RemoteError
from .tls import CertClient, PskClient, TlsConnection

TY_AE = 2
TY_CNT = 3
#: what a registrar answers a CREATE <AE> of an AE that is already registered: the name is taken (4105), or
#: the originator is (4117 ORIGINATOR_ALREADY_REGISTERED, TS-0004)
_ALREADY = (RSC.CONFLICT, 4117)

#: Opens an authenticated connection to the registrar at (host, port).
Connector = Callable[[str, int], TlsConnection]


def parse_registrar_uri(uri: str) -> tuple[str, int, str]:
    """``https://host:port/<CSEBase>`` -> (host, port, CSEBase path)."""
    parts = urlsplit(uri)
    if parts.scheme != "https" or not parts.hostname:
        raise BadRequest(f"the registrar's CSEBase URI {uri!r} must be https://host:port/<CSEBase>")
    return parts.hostname, parts.port or 443, parts.path.rstrip("/") or "/"


class SecureAE:
    """An AE-ID, its registrar's CSEBase and how to open an authenticated connection there.

    Build it with :meth:`from_enrolment` / :meth:`from_enrolee` (TLS-PSK) or :meth:`with_certificate`
    (mutual TLS). Either way a connection opens only after the registrar proved who it is.
    """

    def __init__(self, registrar_uri: str, ae_id: str, connect: Connector, *, security: str, rvi: str = "3",
                 enrolment: Enrolment | None = None) -> None:
        self.host, self.port, self.csebase = parse_registrar_uri(registrar_uri)
        self.ae_id = ae_id
        self.security = security  # for messages: "TLS-PSK" or "mutual TLS"
        self.rvi = rvi
        self.enrolment = enrolment
        self._connect = connect

    @classmethod
    def from_enrolment(cls, enrolment: Enrolment, *, tls_client: PskClient | None = None,
                       rvi: str = "3") -> SecureAE:
        """TLS-PSK with the registrar key of an AE's securityProfile (psk_identity = KeID)."""
        if enrolment.profile["enroleeType"] != "AE":
            raise BadRequest("this securityProfile provisions a CSE, not an AE")
        client = tls_client or PskClient()

        def connect(host: str, port: int) -> TlsConnection:
            return client.connect(host, port, enrolment.ke_id, enrolment.registrar_key)

        return cls(enrolment.profile["registrar"]["cseBaseURI"], enrolment.enrolee_id, connect,
                   security="TLS-PSK", rvi=rvi, enrolment=enrolment)

    @classmethod
    def from_enrolee(cls, enrolee: Enrolee, **kw: Any) -> SecureAE:
        enrolment, _renewed = enrolee.ensure()
        return cls.from_enrolment(enrolment, **kw)

    @classmethod
    def with_certificate(cls, registrar_uri: str, tls_client: CertClient, *, ae_id: str | None = None,
                         expected_peer: str | None = None, rvi: str = "3") -> SecureAE:
        """Mutual TLS: the registrar's certificate must chain to the client's trust anchor and name
        ``expected_peer`` (default: the URI's host); the AE-ID defaults to the one this client's certificate names."""
        ae_id = ae_id or tls_client.own_id
        if not ae_id:
            raise BadRequest("the client certificate names no AE-ID; give the AE-ID explicitly")

        def connect(host: str, port: int) -> TlsConnection:
            return tls_client.connect(host, port, expected_peer)

        return cls(registrar_uri, ae_id, connect, security="mutual TLS", rvi=rvi)

    @contextmanager
    def session(self, originator: str | None = None) -> Iterator[CseSession]:
        tls = self._connect(self.host, self.port)
        client = OneM2MClient(tls, originator or self.ae_id, host=f"{self.host}:{self.port}", rvi=self.rvi)
        try:
            yield CseSession(client, self.csebase)
        finally:
            client.close()


class CseSession:
    """oneM2M requests of an AE on one secure connection to its registrar."""

    def __init__(self, client: OneM2MClient, csebase: str) -> None:
        self.client = client
        self.csebase = csebase

    def _path(self, rel: str) -> str:
        return rel if rel.startswith("/") else f"{self.csebase}/{rel}"

    def register(self, app_id: str, rn: str | None = None, *, request_reachability: bool = False) -> dict[str, Any]:
        body = {"m2m:ae": {"rn": rn or self.client.originator.lstrip("/"), "api": app_id,
                           "rr": request_reachability, "srv": ["3"]}}
        return self.client.call("POST", self.csebase, body, ty=TY_AE)

    def ensure_registered(self, app_id: str, rn: str | None = None) -> tuple[dict[str, Any], bool]:
        """CREATE ``<AE>``; when this AE is already registered here (a CONFLICT or ORIGINATOR_ALREADY_REGISTERED
        answer, and the ``<AE>`` of that name, read back with this originator, has this AE-ID and App-ID) the
        existing one. Returns (the resource, whether it was created now). Anything else raises: an ``<AE>`` of
        that name that is not this AE's, or this AE registered with another App-ID."""
        name = rn or self.client.originator.lstrip("/")
        try:
            return self.register(app_id, rn), True
        except RemoteError as exc:
            if exc.remote_rsc not in _ALREADY:
                raise
            refused = exc
        try:
            existing = self.retrieve(name)
        except RemoteError:
            raise refused from None  # not readable by this AE: not its registration
        ae = existing.get("m2m:ae") if isinstance(existing, dict) else None
        me, aei = self.client.originator, str(ae.get("aei", "")) if isinstance(ae, dict) else ""
        if not isinstance(ae, dict) or not (aei == me or aei.endswith(f"/{me}")):  # its AE-ID in any of its forms
            raise refused
        if ae.get("api") != app_id:
            raise RemoteError(refused.remote_rsc, f"the AE {me} is already registered at {self.csebase} with App-ID "
                              f"{ae.get('api')!r}, not {app_id!r}; deregister it first to change its App-ID")
        return existing, False

    def ensure_container(self, rn: str, parent: str | None = None) -> bool:
        """CREATE ``<container>`` under this AE (or ``parent``); False when one of that name is already there
        (CONFLICT: under this AE's own ``<AE>``, it is this AE's)."""
        try:
            self.create_container(rn, parent)
            return True
        except RemoteError as exc:
            if exc.remote_rsc != RSC.CONFLICT:
                raise
        return False

    def deregister(self, rn: str) -> Any:
        return self.client.call("DELETE", self._path(rn))

    def create_container(self, rn: str, parent: str | None = None) -> dict[str, Any]:
        return self.client.call("POST", self._path(parent or self.client.originator.lstrip("/")),
                                {"m2m:cnt": {"rn": rn}}, ty=TY_CNT)

    def retrieve(self, path: str) -> dict[str, Any]:
        return self.client.call("GET", self._path(path))
