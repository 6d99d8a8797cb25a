"""An AE that uses its provisioned credential: enrol with the MEF, then talk to its registrar CSE over TLS-PSK.

::

    from rspf.ae import SecureAE
    ae = SecureAE.from_enrolee(enrolee)          # enrols (or reuses a valid stored enrolment)
    with ae.session() as cse:                     # TLS-PSK: psk_identity = KeID, psk = registrar key
        cse.register("Nmy-app")                   # CREATE <AE> as the provisioned AE-ID
        cse.create_container("readings")
        cse.retrieve("readings")
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from .client import OneM2MClient
from .enrolee import Enrolee, Enrolment
from .errors import BadRequest
from .tls import PskClient

TY_AE = 2
TY_CNT = 3


class SecureAE:
    def __init__(self, enrolment: Enrolment, *, tls_client: PskClient | None = None, rvi: str = "3") -> None:
        if enrolment.profile["enroleeType"] != "AE":
            raise BadRequest("this securityProfile provisions a CSE, not an AE")
        self.enrolment = enrolment
        self._tls = tls_client or PskClient()
        self.rvi = rvi
        parts = urlsplit(enrolment.profile["registrar"]["cseBaseURI"])
        if parts.scheme != "https" or not parts.hostname:
            raise BadRequest("the registrar's CSEBase URI must be https://host:port/<CSEBase>")
        self.host, self.port = parts.hostname, parts.port or 443
        self.csebase = parts.path.rstrip("/") or "/"

    @classmethod
    def from_enrolee(cls, enrolee: Enrolee, **kw: Any) -> SecureAE:
        enrolment, _renewed = enrolee.ensure()
        return cls(enrolment, **kw)

    @property
    def ae_id(self) -> str:
        return self.enrolment.enrolee_id

    @contextmanager
    def session(self, originator: str | None = None) -> Iterator[CseSession]:
        tls = self._tls.connect(self.host, self.port, self.enrolment.ke_id, self.enrolment.registrar_key)
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

    def deregister(self, rn: str) -> Any:
        return self.client.call("DELETE", self._path(rn))

    def create_container(self, rn: str, parent: str | None = None) -> dict[str, Any]:
        return self.client.call("POST", self._path(parent or self.client.originator.lstrip("/")),
                                {"m2m:cnt": {"rn": rn}}, ty=TY_CNT)

    def retrieve(self, path: str) -> dict[str, Any]:
        return self.client.call("GET", self._path(path))
