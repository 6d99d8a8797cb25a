"""Enrolment Target side: fetch a usage-constrained key from the MEF (TS-0003 §8.3.2.1 steps f-g)."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from urllib.parse import quote

from . import keys
from .client import OneM2MClient
from .errors import BadRequest, RemoteError
from .secret import Secret
from .tls import PskClient

_default_client: PskClient | None = None


@dataclass(frozen=True)
class FetchedCredential:
    key: Secret
    enrolee_id: str
    lifetime: str  # m2m:timestamp of expiry


def fetch_credentials(host: str, port: int, mef_fqdn: str, psk_identity: str, psk: Secret, origin: str,
                      ke_id: str, suid: int, *, tls_client: PskClient | None = None,
                      timeout: float = 15.0) -> FetchedCredential:
    """RETRIEVE /fetchCredentials/<KeID>/<SUID> over TLS-PSK authenticated with the Target's own credential."""
    global _default_client
    keys.parse_ke_id(ke_id)
    keys.encode_suid(suid)
    if tls_client is None:
        if _default_client is None:
            _default_client = PskClient()
        tls_client = _default_client
    tls = tls_client.connect(host, port, psk_identity, psk, server_name=mef_fqdn, timeout=timeout)
    client = OneM2MClient(tls, origin, host=mef_fqdn)
    try:
        data = client.call("GET", f"/fetchCredentials/{quote(ke_id, safe='@')}/{suid}")
    finally:
        client.close()
    rsp = data.get("rspf:fcRsp") if isinstance(data, dict) else None
    if not isinstance(rsp, dict) or rsp.get("status") is not True:
        raise RemoteError(5000, "the MEF sent a malformed fetchCredentials response")
    try:
        key = base64.b64decode(rsp["credential"], validate=True)
        enrolee_id, lifetime = rsp["enroleeID"], rsp["lifetime"]
    except (KeyError, TypeError, binascii.Error):
        raise BadRequest("the MEF's fetchCredentials response lacks credential, enroleeID or lifetime") from None
    if len(key) != 32 or not isinstance(enrolee_id, str) or not isinstance(lifetime, str):
        raise BadRequest("the MEF's fetchCredentials response is malformed")
    return FetchedCredential(Secret(key, "usage-constrained key"), enrolee_id, lifetime)
