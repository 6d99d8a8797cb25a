"""Enrolment Target side: fetch a usage-constrained key from the MEF (TS-0003 §8.3.2.1 steps f-g)."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass
from urllib.parse import quote

from . import keys
from .client import OneM2MClient
from .errors import BadRequest, RemoteError
from .secret import Secret
from .tls import PskClient

log = logging.getLogger(__name__)
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
        return request_credentials(client, ke_id, suid)
    finally:
        client.close()


def request_credentials(client: OneM2MClient, ke_id: str, suid: int) -> FetchedCredential:
    """The fetchCredentials request on an open, authenticated connection to the MEF."""
    data = client.call("GET", f"/fetchCredentials/{quote(ke_id, safe='@')}/{suid}")
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


class KeyCache:
    """Keys an Enrolment Target fetched from the MEF, by KeID, kept for their lifetime.

    ``lookup`` is safe to call from many threads (and from inside a TLS-PSK callback): one fetch per KeID
    at a time; refusals are remembered for ``negative_ttl`` seconds so an unknown KeID cannot make every
    handshake hit the MEF. A key is kept until its lifetime ends or ``max_age`` seconds pass, whichever is
    first: after ``max_age`` the MEF is asked again, so a revoked Enrolee loses access within that time.
    """

    def __init__(self, *, mef_host: str, mef_port: int, mef_fqdn: str, psk_identity: str, psk: Secret,
                 origin: str, suid: int = keys.SUID_RSPF_SAEF, negative_ttl: float = 10.0, max_age: float = 300.0,
                 timeout: float = 10.0, tls_client: PskClient | None = None) -> None:
        self.mef_host, self.mef_port, self.mef_fqdn = mef_host, mef_port, mef_fqdn.lower()
        self._psk_identity, self._psk = psk_identity, psk
        self.origin, self.suid = origin, suid
        self.negative_ttl, self.timeout, self.max_age = negative_ttl, timeout, max_age
        self._tls = tls_client or PskClient()
        self._lock = threading.Lock()
        self._fetch_locks: dict[str, threading.Lock] = {}
        self._entries: dict[str, tuple[FetchedCredential, float]] = {}
        self._refused: dict[str, float] = {}
        self._idle: list[OneM2MClient] = []  # kept-alive authenticated connections to the MEF
        self.fetches = 0

    def __repr__(self) -> str:
        return f"<KeyCache mef={self.mef_fqdn} entries={len(self._entries)}>"

    def _fetch(self, ke_id: str) -> FetchedCredential:
        """fetchCredentials on a kept-alive connection (one handshake saved per first contact); a reused
        connection the MEF has meanwhile closed is replaced once."""
        for attempt in (1, 2):
            with self._lock:
                client = self._idle.pop() if self._idle else None
            reused = client is not None
            if client is None:
                tls = self._tls.connect(self.mef_host, self.mef_port, self._psk_identity, self._psk,
                                        server_name=self.mef_fqdn, timeout=self.timeout)
                client = OneM2MClient(tls, self.origin, host=self.mef_fqdn)
            client.originator = self.origin
            try:
                cred = request_credentials(client, ke_id, self.suid)
            except (ConnectionError, TimeoutError, OSError):
                client.close()
                if reused and attempt == 1:
                    continue
                raise
            except Exception:
                client.close()
                raise
            with self._lock:
                if len(self._idle) < 4:
                    self._idle.append(client)
                    client = None
            if client is not None:
                client.close()
            return cred
        raise ConnectionError("the MEF closed the connection")  # pragma: no cover - loop always returns

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for client in idle:
            client.close()

    def is_mef_key_id(self, identity: str) -> bool:
        try:
            _rel, fqdn = keys.parse_ke_id(identity)
        except BadRequest:
            return False
        return fqdn.lower() == self.mef_fqdn

    def cached(self, ke_id: str) -> FetchedCredential | None:
        entry = self._entries.get(ke_id)
        if entry and entry[1] > time.time():
            return entry[0]
        return None

    def lookup(self, ke_id: str) -> tuple[FetchedCredential | None, bool]:
        """(credential, fetched_now). None when the MEF refuses or is unreachable."""
        if not self.is_mef_key_id(ke_id):
            return None, False
        ke_id = keys.normalise_ke_id(ke_id)
        hit = self.cached(ke_id)
        if hit:
            return hit, False
        with self._lock:
            lock = self._fetch_locks.setdefault(ke_id, threading.Lock())
        with lock:
            hit = self.cached(ke_id)
            if hit:
                return hit, False
            if self._refused.get(ke_id, 0) > time.time():
                return None, False
            try:
                cred = self._fetch(ke_id)
            except Exception as exc:  # refused or unreachable: no key, no handshake
                log.info("MEF did not give the key of KeID %s: %s", ke_id, exc)
                self._refused[ke_id] = time.time() + self.negative_ttl
                return None, False
            self.fetches += 1
            try:
                expires = dt.datetime.strptime(cred.lifetime, "%Y%m%dT%H%M%S").replace(
                    tzinfo=dt.UTC).timestamp()
            except ValueError:
                expires = time.time()
            self._entries[ke_id] = (cred, min(expires, time.time() + self.max_age))
            with self._lock:
                self._fetch_locks.pop(ke_id, None)
            return cred, True
