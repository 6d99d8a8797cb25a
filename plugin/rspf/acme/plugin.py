"""The SEC CSF plugin for the ACME CSE.

Loaded by ACME from ``<baseDir>/plugins/`` through a one-line shim written by ``rspf acme install``::

    from rspf.acme.plugin import RspfSecurityPlugin

Configured in the ``[rspf]`` section of ``acme.ini`` (docs/acme-plugin.md). What it does:

* at start-up, enrols the CSE with the MEF (or reuses a valid stored securityProfile) and applies the
  profile (CSE-ID, SP-ID, registrar); renews it in the background before it expires;
* serves ACME's oneM2M HTTP API on a second, secure listener (TLS-PSK 1.2/1.3, optionally certificates);
  an Enrolee presents its KeID as psk_identity and the CSE, as Enrolment Target, fetches the matching
  key from the MEF (SUID 22) and caches it for its lifetime;
* binds every request on that listener to the authenticated credential (TS-0004 §7.3.2.1: 4106), and
  answers every request there as oneM2M (an X-M2M-RSC on every answer, X-M2M-RI checked and echoed);
* checks AE registration against <serviceSubscribedNode>/<serviceSubscribedAppRule> (TS-0001 §10.2.2.2)
  and records each enrolled credential in a rule of its own that binds it to its AE-ID and App-IDs
  (TS-0003 §8.3.1.2 NOTE 3/4; rspf.ssar) -- an MN-CSE at its IN-CSE, under its own node; the rule goes when
  the <AE> is deleted or :meth:`RspfSecurityPlugin.forget_credential` is called;
* clears a registration ACME lost in a crash (the AE-ID still counted, the <AE> gone), so the AE can register
  again;
* with ``enforcement = on`` (the default) checks every request on ACME's plain port too (``access.py``):
  CSEs, the admin and AEs that registered with a credential are served only on the secure listener;
* never refuses the CSE's own work (start-up script, reset) and re-creates its resources after a reset;
* registers this CSE with its registrar over TLS-PSK with the provisioned credential (Mcc).
"""

from __future__ import annotations

import json
import logging
import random
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

from acmecse.runtime.PluginSupport import configure, init, plugin, requires, start, stop, validate
from cryptography import x509

from .. import est, ids, keys, ssar
from ..audit import Action, AuditLog, Result
from ..client import OneM2MClient
from ..enrolee import Enrolee, EnroleeConfig, Enrolment, Renewer
from ..errors import (
    RSC,
    BadRequest,
    ConfigError,
    NotAuthenticated,
    NotFound,
    OperationNotAllowed,
    RemoteError,
    RspfError,
)
from ..fileutil import read_key_file, write_private
from ..mef.protocol import Revocation
from ..metrics import CseMetrics, ObservabilityServer, refusal_reason
from ..ratelimit import Backoff, RefusalLog
from ..secret import Secret
from ..target import KeyCache, KeyCacheLimits, RevocationFollower, RevokedCertificates
from ..tls import PskClient, PskServer, TlsConnection, TlsPeer, certificate_onem2m_id
from ..wire import MAX_REQUEST_ID
from ..wsgi import ENVIRON_KEY, PeerCredential, SecureWsgiServer
from . import access, host, patches, resources
from .config import AcmePluginConfig, load

log = logging.getLogger("rspf.acme")

#: environ key set by the plugin's middlewares on a request that passed its checks (not settable by a client:
#: HTTP headers only ever become HTTP_* keys)
CHECKED_KEY = "rspf.checked"
#: HTTP methods of the oneM2M HTTP binding (PATCH only where ACME maps it to DELETE)
_ONEM2M_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH"})
#: MEF-issued certificates whose Credential-ID is remembered (to remove its rule when the feed revokes it); the
#: least recently seen are forgotten first (their rule then stays until the AE is deleted or registers again)
CERT_CREDENTIALS_KEPT = 100_000


REFUSAL_LOG_INTERVAL = 10.0  # seconds; the first 20 refusals of each go to WARNING, the rest to INFO


def _acme_refusal(level: int, text: str) -> None:
    """A refusal: at WARNING into ACME's log too; past the burst only into the ``rspf.acme`` logger at INFO, so a
    flood cannot fill ACME's log."""
    if level >= logging.WARNING:
        _acme_log("warn", f"refused: {text}")
    else:
        log.info("refused: %s", text)


def _acme_log(level: str, message: str) -> None:
    """Log through ACME's logger as well (its log files are what operators read)."""
    try:
        from acmecse.runtime.Logging import Logging as L

        {"info": L.log, "warn": L.logWarn, "error": L.logErr}[level](f"[rspf] {message}")
    except Exception:  # pragma: no cover - logging must never break the CSE
        pass
    getattr(log, {"warn": "warning"}.get(level, level))(message)


#: Where the revocation feed position is kept across restarts, beside the securityProfile store (docs/acme-plugin.md)
REVOCATION_POSITION_FILE = "rspf-revocation-position"
#: Retries of the enrolment at start-up while the MEF is unreachable (within [rspf] startupRetrySeconds)
_STARTUP_BACKOFF = Backoff(first=0.5, ceiling=10.0)


@plugin(property="rspfSecurity", priority=10, tags=["security"])
@requires(httpServer="acmecse.plugins.bindings.HttpServer")
class RspfSecurityPlugin:
    httpServer: Any = None

    def __init__(self) -> None:
        self.config: AcmePluginConfig | None = None
        self.enrolee: Enrolee | None = None
        self.enrolment: Enrolment | None = None
        self.keycache: KeyCache | None = None
        self.listener: SecureWsgiServer | None = None
        self._recorded: dict[str, ssar.Binding] = {}  # Credential-ID -> what its bound rule holds
        self._record_lock = threading.Lock()
        self._remote_node_ri: str | None = None  # an MN-CSE's node at its registrar, by resource ID
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._follower: threading.Thread | None = None
        self._registrar_client = PskClient()
        self._psk: PskServer | None = None
        self._refusals = RefusalLog(_acme_refusal, interval=REFUSAL_LOG_INTERVAL)
        self.audit = AuditLog(None)  # opened at configure ([rspf] auditLog)
        self.metrics = CseMetrics()
        self._observer: ObservabilityServer | None = None
        self._feed: RevocationFollower | None = None
        #: MEF-issued certificates: the MEF's CA, those the feed revoked, and the Credential-ID of each seen
        self._mef_ca: x509.Certificate | None = None
        self._revoked_certs: RevokedCertificates | None = None
        self._cert_credentials: OrderedDict[str, str] = OrderedDict()  # at most CERT_CREDENTIALS_KEPT

    # ------------------------------------------------------------------------------- lifecycle
    @init
    def init(self) -> None:
        patches.check_acme_version()
        # Headless ACME ignores SIGINT and skips its graceful shutdown on SIGTERM: make SIGTERM graceful.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_a: sys.exit(0))
        patches.install_resource_types()
        patches.scale_storage()

    @configure
    def configure(self, config: Any) -> None:
        try:
            self.config = load(config.configParser, Path(config.baseDirectory),
                               str(getattr(config, "configfile", None) or "acme.ini"))
            if self.config is None:
                _acme_log("warn", "[rspf] enable=false: the plugin is inactive and the CSE runs WITHOUT its "
                                  "protection")
                return
            if self.config.enforcement and (others := host.other_bindings_enabled(config)):
                raise ConfigError(f"acme.ini [rspf] enforcement: 'on' needs the {', '.join(others)} binding(s) "
                                  "disabled (they bypass the secure listener)")
            # Hooks before ACME serves its first request (its bindings start after @configure).
            patches.wrap_ae_registration(self._check_ae_registration, self._stale_registration_cleared)
            patches.wrap_access(self._gate, self._proven_cse_access)
            patches.on_reset(self._reset_begin, self._reset_end)
            patches.on_ae_deleted(self._ae_deleted)
            self._setup_keys()
            self._setup_observability()
            self._psk = PskServer(self._psk_lookup)
            c = self.config
            if c.accept_certificates:
                assert c.cert_file and c.key_file
                self._psk.use_certificates(c.cert_file, c.key_file, self._client_anchors())  # bad files stop here
            if self.config.enrol:
                self.enrolment = self._enrol_at_startup()
                patches.apply_identity(config, self.enrolment.profile)
                _acme_log("info", f"CSE-ID {self.enrolment.enrolee_id} from the securityProfile "
                                  f"(KeID {self.enrolment.ke_id}, expires {self.enrolment.profile['expiry']})")
        except RspfError as exc:
            # ACME ends a failed start-up with exit status 0 (its main() returns None); stop with status 1 so
            # that supervisors and scripts see the failure. SystemExit passes ACME's `except Exception`.
            _acme_log("error", f"start-up stopped: {exc}")
            raise SystemExit(f"[rspf] {exc}") from None

    @validate
    def validate(self, config: Any) -> None:
        if self.config is not None and self.enrolment is not None and self.config.secure_registrar:
            patches.apply_registrar(config, self.enrolment.profile)
            reg = self.enrolment.profile["registrar"]
            _acme_log("info", f"registrar {reg['cseID']} at {reg['cseBaseURI']} (Mcc over TLS-PSK)")

    @start
    def start(self) -> None:
        if self.config is None:
            return
        app = patches.wrap_wsgi(self.httpServer, self._plain_middleware)
        self._ensure_subscription()
        if self.config.enforcement and host.upper_tester_enabled():
            _acme_log("warn", "[http] enableUpperTesterEndpoint is on: anyone who reaches the plain port can reset "
                              "this CSE through /__ut__ (a test tool; keep it off in production)")
        if self.enrolment is not None and self.config.secure_registrar:
            parts = urlsplit(self.enrolment.profile["registrar"]["cseBaseURI"])
            patches.route_registrar_over_psk(f"{parts.scheme}://{parts.netloc}", self._send_to_registrar)
        assert self.keycache is not None and self._psk is not None
        self.keycache.origin = host.cse_id()  # the Enrolment Target's ID at the MEF: known only now
        self.listener = SecureWsgiServer(self._secure_app(app), self._psk, self._resolve,
                                         host=self.config.secure_listen,
                                         port=self.config.secure_port, limits=self.config.limits)
        self._start_observability()  # before the listener opens: whoever sees the secure port finds /health too
        self.listener.start()
        kinds = " and ".join((["TLS-PSK"] if self.config.accept_psk else []) +
                             (["certificates"] if self.config.accept_certificates else []))
        _acme_log("info", f"secure listener ({kinds}) on "
                          f"{self.config.secure_listen}:{self.listener.port}; enforcement "
                          f"{'on' if self.config.enforcement else 'off'}")
        if self.enrolee is not None:
            self._renewer = threading.Thread(target=self._renewal().run, name="rspf-renew", daemon=True)
            self._renewer.start()
        self._follower = threading.Thread(target=self._follow_revocations, name="rspf-revocations", daemon=True)
        self._follower.start()

    def _ensure_subscription(self) -> None:
        assert self.config is not None
        if self.config.create_subscription and host.is_in_cse():
            resources.ensure_subscription(host.cse_id(), self.config.ssar, list(self.config.allowed_app_ids))
        elif self.config.create_subscription:
            _acme_log("info", "not an IN-CSE: service subscriptions live on the IN-CSE; none created here")

    # ------------------------------------------------------------------------- ACME's reset
    def _reset_begin(self) -> None:
        """``cseReset``: ACME purged its storage; what the plugin recorded there is gone."""
        with self._record_lock:
            self._recorded.clear()
        _acme_log("info", "CSE reset: the plugin forgot the credentials it had recorded")

    def _reset_end(self) -> None:
        """``cseRestarted``: the CSEBase and the admin AE exist again; re-create the service subscription.
        (A registration that comes first does it itself: see _rules_for_registration.)"""
        try:
            self._ensure_subscription()
            _acme_log("info", "CSE reset finished: the plugin's service subscription resources are back")
        except Exception as exc:
            _acme_log("error", f"could not re-create the service subscription after the reset: {exc}")

    @staticmethod
    def _internal() -> bool:
        """ACME's own work: its reset re-runs the start-up script, which creates the admin AE inside the HTTP
        request that asked for the reset. ACME answers every other request 5000 meanwhile."""
        return host.cse_resetting()

    @stop
    def stop(self) -> None:
        self._stop.set()
        if self.listener:
            self.listener.stop()
        if self.keycache:
            self.keycache.close()  # the kept-alive connections to the MEF
        self._stop_observability()

    # ------------------------------------------------------------------------------- enrolment
    def _setup_keys(self) -> None:
        c = self.config
        assert c is not None
        ident, path = c.fetch_identity
        fetch_key = read_key_file(path, "MEF credential file")
        self.keycache = KeyCache(mef_host=c.mef_host, mef_port=c.mef_port, mef_fqdn=c.mef_fqdn,
                                 psk_identity=ident, psk=fetch_key, origin="/unset",
                                 limits=KeyCacheLimits(max_age=c.key_cache_seconds))
        if c.enrol:
            assert c.kpm_id and c.kpm_file and c.node_id
            self.enrolee = Enrolee(EnroleeConfig(
                mef_host=c.mef_host, mef_port=c.mef_port, mef_fqdn=c.mef_fqdn, kpm_id=c.kpm_id,
                kpm=read_key_file(c.kpm_file, "Kpm file"), node_id=c.node_id, store_path=c.profile_store,
                location=c.location, renew_before_seconds=c.renew_before_seconds))

    def _client_anchors(self) -> Path | None:
        """The trust anchors of client certificates: caFile (the operator's), mefCaFile (the MEF's CA), or both
        in one bundle file beside the profile store. Loads the MEF's CA and the revoked certificates."""
        c = self.config
        assert c is not None
        if c.mef_ca_file is None:
            return c.ca_file
        try:
            self._mef_ca = x509.load_pem_x509_certificate(c.mef_ca_file.read_bytes())
        except (OSError, ValueError):
            raise ConfigError(f"acme.ini [rspf] mefCaFile: {c.mef_ca_file} is not a PEM certificate") from None
        self._revoked_certs = RevokedCertificates(c.profile_store.parent / "rspf-revoked-certificates")
        if c.ca_file is None:
            return c.mef_ca_file
        bundle = c.profile_store.parent / "rspf-client-cas.pem"
        bundle.parent.mkdir(parents=True, exist_ok=True)
        bundle.write_bytes(c.ca_file.read_bytes() + b"\n" + c.mef_ca_file.read_bytes())
        return bundle

    def _enrol_at_startup(self) -> Enrolment:
        """A valid stored profile is reused; otherwise enrol, retrying with backoff while the MEF is down."""
        assert self.enrolee is not None and self.config is not None
        try:
            stored = self.enrolee.load()
        except RspfError as exc:
            _acme_log("warn", f"stored securityProfile unusable ({exc}); enrolling again")
            stored = None
        if stored is not None and not stored.needs_renewal(self.config.renew_before_seconds):
            _acme_log("info", f"using the stored securityProfile (KeID {stored.ke_id})")
            return stored
        deadline = time.monotonic() + self.config.startup_retry_seconds
        failures = 0
        while True:
            try:
                enrolment = self.enrolee.enrol()
                _acme_log("info", f"enrolled with MEF {self.config.mef_fqdn}: KeID {enrolment.ke_id}")
                return enrolment
            except RspfError as exc:
                if stored is not None and stored.expiry.timestamp() > time.time():
                    _acme_log("warn", f"MEF unreachable or refused ({exc}); keeping the stored securityProfile "
                                      f"until {stored.profile['expiry']} and renewing in the background")
                    return stored
                failures += 1
                delay = _STARTUP_BACKOFF.delay(failures, random.random())
                if time.monotonic() + delay > deadline:
                    raise RspfError(f"could not enrol with the MEF at {self.config.mef_host}:{self.config.mef_port}"
                                    f" within {self.config.startup_retry_seconds:g} s and no valid securityProfile "
                                    f"is stored: {exc}") from None
                _acme_log("warn", f"MEF unreachable or refused ({exc}); retrying in {delay:.1f} s")
                time.sleep(delay)

    def _renewed(self, fresh: Enrolment, previous: Enrolment | None) -> None:
        if previous is not None and fresh.enrolee_id != previous.enrolee_id:
            _acme_log("warn", "the renewed securityProfile names another CSE-ID; it applies at restart")
        self.enrolment = fresh
        _acme_log("info", f"securityProfile renewed: KeID {fresh.ke_id}, expires {fresh.profile['expiry']}")

    def _renewal(self) -> Renewer:
        """The background renewal of this CSE's securityProfile (rspf.enrolee.Renewer), driven by _stop."""
        assert self.enrolee is not None and self.config is not None
        return Renewer(self.enrolee, self.config.renew_before_seconds, self.enrolment, on_renewed=self._renewed,
                       wait=self._stop.wait, warn=lambda m: _acme_log("warn", m), info=lambda m: _acme_log("info", m))

    # ------------------------------------------------------------------- revocation and expiry
    def _follow_revocations(self) -> None:
        """Until stop: read the MEF's revocation feed every few seconds (rspf.target.RevocationFollower) and
        close the connections of credentials that expired."""
        assert self.keycache is not None and self.config is not None
        saved = self.config.profile_store.parent / REVOCATION_POSITION_FILE
        follower = RevocationFollower(self.keycache.revocation_page, self._revoked, self._lost_track,
                                      interval=self.keycache.limits.revocation_poll,
                                      warn=lambda m: _acme_log("warn", m), info=lambda m: _acme_log("info", m),
                                      position=_read_position(saved))
        self._feed = follower
        delay, kept = 0.0, follower.position
        while not self._stop.wait(delay):
            delay = follower.step()
            if follower.position is not None and follower.position != kept:
                kept = follower.position
                try:
                    write_private(saved, f"{kept}\n".encode())
                except OSError as exc:
                    _acme_log("warn", f"cannot keep the revocation feed position in {saved}: {exc.strerror}")
            self._close_expired()
            self.audit.roll()

    def _revoked(self, items: list[Revocation]) -> None:
        """KeIDs and certificates the MEF revoked: keys go, certificates are refused, their connections close,
        their rule entries go."""
        assert self.keycache is not None
        ke_ids = {item.ke_id for item in items if item.ke_id is not None}
        certs = {item.cert_sha256 for item in items if item.cert_sha256 is not None}
        held = self.keycache.revoke(ke_ids)
        if certs and self._revoked_certs is not None:
            self._revoked_certs.add(certs)

        def revoked(ident: str | None, cred: PeerCredential | None) -> bool:
            if ident is not None:
                return _ke_id_or_none(ident) in ke_ids
            return cred is not None and cred.fingerprint in certs

        closed = self._close_connections(revoked)
        for item in items:
            if item.ke_id is not None:
                self._forget_invalid(keys.credential_id(keys.CRED_TYPE_KPSAID, item.ke_id))
                _acme_log("warn", f"KeID {item.ke_id} is no longer valid at the MEF ({item.cause}): refused from now "
                                  "on")
            elif item.cert_sha256 is not None and self._revoked_certs is not None:
                credential_id = self._cert_credentials.pop(item.cert_sha256, None)
                if credential_id is not None:
                    self._forget_invalid(credential_id)
                _acme_log("warn", f"certificate {item.cert_sha256} ({credential_id or 'not seen here'}) was revoked "
                                  f"by the MEF ({item.cause}): refused from now on")
        if held or closed:
            _acme_log("warn", f"revocation: {held} key(s) dropped from the cache, {closed} connection(s) closed")
        self._observe_revoked(items, held, closed)

    def _lost_track(self) -> None:
        """The revocation feed cannot say everything that was revoked (first contact, or its log was pruned
        or restarted): every key is fetched, and so checked, again; PSK connections reconnect to be checked."""
        assert self.keycache is not None
        self.keycache.flush()
        closed = self._close_connections(lambda ident, _cred: ident is not None)
        self.metrics.connections_closed.labels("lost_track").inc(closed)
        if closed:
            _acme_log("warn", f"revocation feed: lost track; {closed} TLS-PSK connection(s) closed to be checked "
                              "again")

    def _close_expired(self) -> None:
        """Connections whose credential's lifetime ended are closed, and the credential's rule goes (the MEF's
        feed says so too, at its next purge; this is at once for the credentials connected here)."""
        now = time.time()
        expired: set[str] = set()

        def ended(_ident: str | None, cred: PeerCredential | None) -> bool:
            if cred is not None and cred.not_after is not None and cred.not_after <= now:
                expired.add(cred.credential_id)
                return True
            return False

        closed = self._close_connections(ended)
        for credential_id in expired:
            self._forget_invalid(credential_id)
        if closed:
            self.metrics.connections_closed.labels("expired").inc(closed)
            _acme_log("warn", f"{closed} connection(s) closed: their credential expired "
                              f"({', '.join(sorted(expired))})")

    def _forget_invalid(self, credential_id: str) -> None:
        """A credential the MEF no longer honours: its rule goes. The rules live at the IN-CSE, which follows the
        same feed and removes the rule itself (also one an MN-CSE recorded there), so an MN-CSE only forgets
        that it recorded it (no request to the IN-CSE per revocation, most of them for credentials it never
        saw)."""
        if host.is_in_cse():
            self.forget_credential(credential_id)
        else:
            with self._record_lock:
                self._recorded.pop(credential_id, None)

    def _close_connections(self, predicate: Any) -> int:
        listener = self.listener
        return listener.close_credentials(predicate) if listener is not None else 0

    # ------------------------------------------------------------------- secure listener: keys
    def _psk_lookup(self, identity: str, peer_ip: str | None) -> Secret | None:
        assert self.keycache is not None
        if self.config is not None and not self.config.accept_psk:
            return None  # secureCredentials = certificate: every PSK handshake is refused
        cred, _fetched = self.keycache.lookup(identity, peer_ip)
        return cred.key if cred else None

    def _resolve(self, tls: TlsPeer) -> PeerCredential | None:
        assert self.keycache is not None
        ident = tls.psk_identity
        if ident is None:
            return self._certificate_credential(tls)
        ke_id = keys.normalise_ke_id(ident)  # the PSK lookup accepted it, so it is a KeID of our MEF
        cred = self.keycache.cached(ke_id)
        if cred is None:
            return None
        peer = PeerCredential("psk", ident, keys.credential_id(keys.CRED_TYPE_KPSAID, ke_id), cred.enrolee_id,
                              cred.expires_at, provisioned=True)
        self._record_enrolled(peer, cred.allowed_app_ids)
        return peer

    def _record_enrolled(self, peer: PeerCredential, allowed_app_ids: tuple[str, ...] | None) -> bool:
        """TS-0003 §8.3.1.2 NOTE 3/4, as rules that bind: the credential's own rule holds its Credential-ID, its
        Enrolee-ID and the App-IDs the MEF sent with the key (none sent: ``allowedAppIDs``), belonging to the node
        of this CSE -- at the IN-CSE itself, or, on an MN-CSE, at its registrar (the IN-CSE). Recorded once per
        binding (again when the MEF's App-IDs change). Whether the binding is recorded."""
        assert self.config is not None
        if peer.enrolee_id is None or peer.enrolee_id.startswith("/"):
            return False  # CSEs register as <remoteCSE>; SSARs govern AEs
        try:
            binding = ssar.Binding.of(peer.credential_id, peer.enrolee_id, allowed_app_ids,
                                      self.config.allowed_app_ids)
        except RspfError as exc:
            _acme_log("warn", f"cannot record {peer.credential_id}: {exc}")
            return False
        with self._record_lock:
            if self._recorded.get(binding.credential_id) == binding:
                return True
            try:
                if host.is_in_cse():
                    resources.record_binding(binding, host.cse_id())
                elif self.enrolment is not None and self.config.secure_registrar:
                    self._record_at_registrar(binding)
                else:
                    return False  # no IN-CSE to record at: the operator writes the rules
                self._recorded[binding.credential_id] = binding
                _acme_log("info", f"recorded {binding.credential_id} / {binding.ae_id} / App-IDs "
                                  f"{','.join(binding.app_ids)} in <serviceSubscribedAppRule> {binding.name}")
                self._observe_recorded(peer, binding.name)
                return True
            except Exception as exc:
                _acme_log("warn", f"could not record {binding.credential_id} in a rule: {exc}")
                return False

    def forget_credential(self, credential_id: str) -> bool:
        """Remove the rule entries of ``credential_id`` (its bound rule, and the node's link to it): here on the
        IN-CSE, or at the registrar for an MN-CSE. For revocation and expiry, and when the credential's <AE> is
        deleted. Whether there was something to remove. A credential still valid at the MEF is recorded again
        at its next registration."""
        with self._record_lock:
            self._recorded.pop(credential_id, None)
            try:
                if host.is_in_cse():
                    removed = resources.forget_binding(credential_id)
                elif self.enrolment is not None and self.config is not None and self.config.secure_registrar:
                    removed = self._forget_at_registrar(credential_id)
                else:
                    return False
            except Exception as exc:
                _acme_log("warn", f"could not remove the rule of {credential_id}: {exc}")
                return False
        if removed:
            _acme_log("info", f"removed the rule of {credential_id} ({ssar.bound_rule_name(credential_id)})")
        return removed

    @staticmethod
    def _stale_registration_cleared(originator: str) -> None:
        _acme_log("warn", f"{access.shown(originator)} was counted as registered without an <AE> (left by an "
                          "earlier run that stopped abruptly): cleared, so it can register again")

    def _ae_deleted(self, ae: Any) -> None:
        """ACME's ``aeHasDeregistered``: an <AE> that registered with a MEF key takes its rule entries along."""
        credential_id = patches.credential_of(ae)
        if not (credential_id and credential_id.startswith(ssar.BOUND_CREDENTIAL_TYPES)):
            return  # a MEF key or certificate (only their rules are the plugin's: a bound rule, if any)
        if patches.registered_ae(ae.aei) == (True, credential_id):
            return  # registered again with the same credential meanwhile (this event runs in the background)
        self.forget_credential(credential_id)

    def _certificate_credential(self, tls: TlsPeer) -> PeerCredential | None:
        """The credential of a verified client certificate: Credential-ID 32-<CSE-ID> or 33-<AE-ID> (TS-0003
        §10.4). One the MEF's CA issued is provisioned: refused once the MEF revoked it, recorded in a rule with
        the App-ID it carries (docs/acme-plugin.md); the operator writes the rules of the others."""
        cert = tls.peer_certificate()
        subject_id = certificate_onem2m_id(cert) if cert is not None else None
        if cert is None or not subject_id:
            return None
        type_id = 32 if subject_id.startswith("/") else 33
        try:
            cred_id = keys.credential_id(type_id, subject_id.lstrip("/"))
        except RspfError:
            return None
        sha256 = est.fingerprint(cert)
        provisioned = self._mef_ca is not None and est.issued_by(cert, self._mef_ca)
        if provisioned and self._revoked_certs is not None and sha256 in self._revoked_certs:
            self._refusals.refused(f"certificate {sha256} of {access.shown(subject_id)} from {tls.peer} refused: the "
                                   "MEF revoked it")
            self.metrics.refusals.labels("certificate revoked").inc()
            self.audit.refused(Action.AUTHENTICATE, actor=f"peer:{tls.peer}", subject=f"certificate {sha256}",
                               cause="the MEF revoked this certificate", details={"credentialID": cred_id})
            return None
        app_id = est.certificate_app_id(cert) if provisioned else None
        peer = PeerCredential("certificate", subject_id, cred_id, subject_id, cert.not_valid_after_utc.timestamp(),
                              provisioned=provisioned, fingerprint=sha256,
                              app_ids=(app_id,) if app_id is not None else None)
        if provisioned:
            self._cert_credentials[sha256] = cred_id
            self._cert_credentials.move_to_end(sha256)
            while len(self._cert_credentials) > CERT_CREDENTIALS_KEPT:
                self._cert_credentials.popitem(last=False)
            self._record_enrolled(peer, peer.app_ids)
        return peer

    # -------------------------------------------------------------- request checks (TS-0004)
    def _secure_app(self, app: Any) -> Any:
        """The WSGI app of the secure listener: oneM2M answers only, each request bound to its credential."""
        plugin = self

        def secure(environ: dict[str, Any], start_response: Any) -> Any:
            ri = environ.get("HTTP_X_M2M_RI")
            try:
                if not access.valid_request_id(ri):
                    ri = None
                    raise BadRequest("X-M2M-RI must be present, printable ASCII and at most "
                                     f"{MAX_REQUEST_ID} characters")
                kind = host.endpoint_kind(plugin.httpServer, environ)
                method = environ.get("REQUEST_METHOD", "")
                if kind == "method-not-allowed" or method not in _ONEM2M_METHODS:
                    raise OperationNotAllowed(f"the method {access.shown(method)} is not allowed on "
                                              f"{access.shown(environ.get('PATH_INFO'))}")
                if kind == "not-found" or kind == "other" or (kind == "webui" and not plugin._web_ui_on_secure()):
                    raise NotFound(f"nothing at {access.shown(environ.get('PATH_INFO'))} on the secure listener")
                cred: PeerCredential | None = environ.get(ENVIRON_KEY)
                if cred is None:  # the listener authenticates every connection; never serve one it did not
                    raise NotAuthenticated("no credential is bound to this connection")
                if kind == "onem2m":
                    access.check_associated(cred, environ.get("HTTP_X_M2M_ORIGIN", ""), host.cse_id(),
                                            host.sp_id())
            except RspfError as exc:
                plugin._refused(exc, environ)
                return _onem2m_error(start_response, exc, ri)
            environ[CHECKED_KEY] = True
            return _answer_with_rsc(app, environ, start_response, ri)

        return secure

    def _web_ui_on_secure(self) -> bool:
        return self.config is not None and self.config.secure_web_ui

    def _plain_middleware(self, app: Any) -> Any:
        """In front of ACME's Flask app (both ports): with ``enforcement = on``, TS-0004 §7.3.2.1 outside a
        security association, and the plugin's own rules, for every oneM2M request on the plain port."""
        plugin = self

        def middleware(environ: dict[str, Any], start_response: Any) -> Any:
            config = plugin.config
            if ENVIRON_KEY in environ or config is None or not config.enforcement:
                environ[CHECKED_KEY] = True  # the secure listener's request (checked there), or compatibility mode
                return app(environ, start_response)
            if host.endpoint_kind(plugin.httpServer, environ) != "onem2m":
                return app(environ, start_response)  # web UI, tools: ACME's; the gate keeps them off the resources
            try:
                access.check_unassociated(
                    environ.get("REQUEST_METHOD", ""), access.resource_type(environ.get("CONTENT_TYPE")),
                    environ.get("HTTP_X_M2M_ORIGIN", ""), own_cse_id=host.cse_id(), sp_id=host.sp_id(),
                    admins=host.admin_originators(), listed=config.plain_port_originators,
                    lookup=patches.registered_ae)
            except RspfError as exc:
                plugin._refused(exc, environ)
                ri = environ.get("HTTP_X_M2M_RI")
                return _onem2m_error(start_response, exc, ri if access.valid_request_id(ri) else None)
            environ[CHECKED_KEY] = True
            return app(environ, start_response)

        return middleware

    def _gate(self, originator: str) -> bool:
        """Before ACME's access control: with enforcement on, an HTTP request that did not pass the plugin's
        checks (the upper tester's oneM2M requests, a request while the plugin was not yet started) is
        denied -- unless it is the CSE's own work."""
        if self.config is None or not self.config.enforcement:
            return True
        environ = host.current_environ()
        if environ is None or environ.get(CHECKED_KEY) or self._internal():
            return True
        self._refusals.refused(f"{access.shown(environ.get('PATH_INFO'))} from {environ.get('REMOTE_ADDR')}: the "
                               f"originator {access.shown(originator)} reached ACME's access control without "
                               "passing the plugin's checks")
        self._observe_refused(_Refusal(RSC.ORIGINATOR_HAS_NO_PRIVILEGE, "the request reached ACME's access control "
                                       "without passing the plugin's checks"), environ, None, Action.REQUEST)
        return False

    def _refused(self, exc: RspfError, environ: dict[str, Any] | None, cred: PeerCredential | None = None,
                 action: Action = Action.REQUEST) -> None:
        """Log why a request was refused, and who sent it (never a key), rate-limited; count it and write it to
        the audit log."""
        environ = environ or {}
        cred = cred or environ.get(ENVIRON_KEY)
        where = "secure listener" if cred is not None else "plain port"
        who = [f"peer {environ.get('REMOTE_ADDR', '?')}",
               f"originator {access.shown(environ.get('HTTP_X_M2M_ORIGIN'))}"]
        if cred is not None:
            who += [f"{'KeID' if cred.kind == 'psk' else 'certificate'} {access.shown(cred.identity)}",
                    f"Credential-ID {cred.credential_id}"]
        self._refusals.refused(f"{int(exc.rsc)} on the {where} ({', '.join(who)}): {exc}")
        self._observe_refused(exc, environ, cred, action)

    def _proven_cse_access(self, originator: str, resource: Any, operation: str, ty: Any) -> bool:
        """What a CSE whose MEF-provisioned key authenticated this connection may do as that CSE:

        * register (CREATE <remoteCSE>);
        * read and discover its own service subscription: the <serviceSubscribedNode> whose CSE-ID is its
          own and the rules it links (TS-0001 §10.2.2.2: a registrar that is not the IN-CSE retrieves them);
        * record the AEs that register with it, when it has a node here: CREATE a bound rule under the CSEBase
          (the rule class admits only the bound form and links it from this CSE's node), and read, UPDATE and
          DELETE the bound rules labelled with its own CSE-ID.
        """
        environ = host.current_environ()
        cred: PeerCredential | None = environ.get(ENVIRON_KEY) if environ else None
        if not (cred and cred.provisioned and cred.enrolee_id and cred.enrolee_id.startswith("/")
                and originator == cred.enrolee_id):
            return False
        if operation == "create":
            if ty == host.CSR_TYPE:
                return True
            return (ty == resources.ASAR and resource is not None and resource.ty == host.CSEBASE_TYPE
                    and resources.find_service_subscribed_node(originator) is not None)
        if resource is None:
            return False
        if resource.ty == resources.ASAR and ssar.is_bound_rule_name(resource.ri):
            return operation in ("retrieve", "update", "delete") and resources.same_cse(
                ssar.node_of(resource.lbl), originator)
        if operation not in ("retrieve", "discover"):
            return False
        if resource.ty == resources.SVSN:
            return resources.same_cse(resource.csi, originator)
        if resource.ty == resources.ASAR:
            node = resources.find_service_subscribed_node(originator)
            return node is not None and resource.ri in {r.ri for r in resources.registration_rules(node, None)}
        return False

    def _check_ae_registration(self, ae: Any, originator: str) -> str | None:
        """TS-0001 §10.2.2.2 / TS-0004 §7.3.2.7; returns the Credential-ID the new AE is bound to.

        Not checked: the CSE's own work (no HTTP request: the start-up script; ACME's reset), and, in
        compatibility mode, registrations outside a security association. Within one the Credential-ID is
        the association's; outside one (enforcement on) there is none, and only a rule without
        applicableCredIDs admits the registration."""
        assert self.config is not None
        environ = host.current_environ()
        if environ is None or self._internal():
            return None
        cred: PeerCredential | None = environ.get(ENVIRON_KEY)
        if cred is None and not self.config.enforcement:
            return None
        credential_id = cred.credential_id if cred is not None else None
        stem = originator or ""
        app_id = ae.api  # ACME resources answer None for an absent attribute
        rules = self._rules_for_registration(credential_id)
        if rules is None:
            self._refuse_registration(4128, f"no <serviceSubscribedNode> for {host.cse_id()}: no service "
                                            "subscription is established for this CSE", environ, cred)
        if ssar.admits(rules, credential_id, app_id or "", stem):
            self._observe_registration(stem, app_id, cred, environ)
            return credential_id
        if cred is not None and cred.provisioned and self._record_again(cred, environ):
            # A key or certificate from the MEF (only those are recorded) whose rule is gone: its <AE>
            # was deleted, ACME purged its storage (a reset), or the rule could not be written when the connection
            # opened. Recorded again (idempotent, from what the MEF says now), and looked up again.
            if ssar.admits(self._rules_for_registration(credential_id) or [], credential_id, app_id or "", stem):
                self._observe_registration(stem, app_id, cred, environ)
                return credential_id
        what = f"credential {credential_id}" if credential_id else "a registration without a credential"
        self._refuse_registration(4126, f"no <serviceSubscribedAppRule> allows {what}"
                                        f" with App-ID {access.shown(app_id)} and AE-ID-Stem {access.shown(stem)}",
                                  environ, cred)

    def _record_again(self, peer: PeerCredential, environ: dict[str, Any]) -> bool:
        assert self.keycache is not None
        with self._record_lock:
            self._recorded.pop(peer.credential_id, None)
        if peer.kind == "certificate":
            revoked = self._revoked_certs is not None and peer.fingerprint in self._revoked_certs
            return not revoked and self._record_enrolled(peer, peer.app_ids)
        fetched, _now = self.keycache.lookup(keys.normalise_ke_id(peer.identity), environ.get("REMOTE_ADDR"))
        return fetched is not None and self._record_enrolled(peer, fetched.allowed_app_ids)

    def _rules_for_registration(self, credential_id: str | None) -> list[Any] | None:
        """The rules a registration with ``credential_id`` is checked against (its own bound rule and the
        operator's rules of this CSE's <serviceSubscribedNode>); None when there is no node. A plugin that
        creates the service subscription re-creates it first if it is gone (after ACME's reset purged it)."""
        if host.is_in_cse() or self.enrolment is None:
            svsn = resources.find_service_subscribed_node(host.cse_id())
            if svsn is None and self.config is not None and self.config.create_subscription and host.is_in_cse():
                self._ensure_subscription()
                svsn = resources.find_service_subscribed_node(host.cse_id())
            return resources.registration_rules(svsn, credential_id) if svsn is not None else None
        # a registrar that is not the IN-CSE reads its node and rules from the IN-CSE (TS-0001 §10.2.2.2)
        return self._remote_rules(credential_id)

    def _refuse_registration(self, rsc: int, message: str, environ: dict[str, Any],
                             cred: PeerCredential | None) -> NoReturn:
        error = host.acme_error(rsc, message)
        self.metrics.registrations.labels("refused").inc()
        self._refused(_Refusal(RSC(rsc), message), environ, cred, Action.REGISTRATION)
        raise error

    def _connect_registrar(self, parts: Any, timeout: float) -> TlsConnection:
        """TLS-PSK to the registrar at ``parts`` (a urlsplit result) with the provisioned KeID and key."""
        enrolment = self.enrolment
        assert enrolment is not None
        return self._registrar_client.connect(parts.hostname or "", parts.port or 443, enrolment.ke_id,
                                              enrolment.registrar_key, timeout=timeout)

    @contextmanager
    def _registrar(self, timeout: float = 10.0) -> Iterator[tuple[OneM2MClient, str, str]]:
        """A oneM2M client to the registrar (the IN-CSE) over TLS-PSK as this CSE, with the registrar's CSEBase
        path and CSE-ID. A transport failure raises TransportError."""
        assert self.enrolment is not None
        registrar = self.enrolment.profile["registrar"]
        parts = urlsplit(registrar["cseBaseURI"])
        client = OneM2MClient(self._connect_registrar(parts, timeout), host.cse_id(), host=parts.netloc)
        try:
            yield client, parts.path.rstrip("/"), registrar["cseID"]
        finally:
            client.close()

    def _record_at_registrar(self, binding: ssar.Binding) -> None:
        """An MN-CSE records an AE that registers with it at the IN-CSE (project decision, docs/acme-plugin.md):
        it CREATEs the bound rule under the IN-CSE's CSEBase over its TLS-PSK Mcc link; the IN-CSE admits only
        rules of the bound form, and labels them with this CSE (whose node must exist there). A rule that
        exists already is updated to the binding (the IN-CSE lets a CSE change only the rules it recorded)."""
        me = host.cse_id()
        with self._registrar() as (client, base, registrar_id):
            try:
                client.call("POST", base, {"m2m:asar": binding.attributes(me)}, ty=resources.ASAR)
            except RemoteError as exc:
                if exc.remote_rsc != RSC.CONFLICT:
                    raise
                current = client.call("GET", ids.http_path(f"{registrar_id}/{binding.name}")).get("m2m:asar", {})
                plan = ssar.plan_recording(binding, me, _local_form(current, registrar_id))
                if plan.update is not None:
                    client.call("PUT", ids.http_path(f"{registrar_id}/{binding.name}"), {"m2m:asar": plan.update})

    def _forget_at_registrar(self, credential_id: str) -> bool:
        """An MN-CSE deletes the bound rule it recorded at the IN-CSE."""
        with self._registrar() as (client, _base, registrar_id):
            try:
                client.call("DELETE", ids.http_path(f"{registrar_id}/{ssar.bound_rule_name(credential_id)}"))
            except RemoteError as exc:
                if exc.remote_rsc == RSC.NOT_FOUND:
                    return False
                raise
            return True

    def _remote_node(self, client: OneM2MClient, base: str, registrar_id: str) -> dict[str, Any] | None:
        """This CSE's <serviceSubscribedNode> at the registrar: by the resource ID found last time, else by
        discovery (``ty=20``, matched on the CSE-ID; the oldest wins); None when there is none."""
        me = host.cse_id()
        if self._remote_node_ri:
            try:
                node = client.call("GET", ids.http_path(f"{registrar_id}/{self._remote_node_ri}")).get("m2m:svsn", {})
                if resources.same_cse(node.get("csi"), me):
                    return dict(node)
            except RemoteError:
                pass  # deleted or replaced: discover it again
        found = client.call("GET", f"{base}?fu=1&ty={resources.SVSN}") or {}
        nodes = [client.call("GET", ids.http_path(u)).get("m2m:svsn", {}) for u in found.get("m2m:uril", [])]
        nodes = sorted((n for n in nodes if resources.same_cse(n.get("csi"), me)),
                       key=lambda n: (n.get("ct", ""), n.get("ri", "")))
        self._remote_node_ri = nodes[0].get("ri") if nodes else None
        return nodes[0] if nodes else None

    def _remote_rules(self, credential_id: str | None) -> list[dict[str, Any]] | None:
        """The rules a registration with ``credential_id`` at this MN-CSE is checked against, read from its
        registrar (the IN-CSE) over TLS-PSK: this CSE's <serviceSubscribedNode> (discovery by type, matched on
        the CSE-ID), the credential's bound rule by its resource ID (if its label names this CSE), and the rules
        the node links. None when there is no node (or the registrar cannot be read, which
        is logged)."""
        me = host.cse_id()
        try:
            with self._registrar() as (client, base, registrar_id):
                node = self._remote_node(client, base, registrar_id)
                if node is None:
                    return None
                wanted = ssar.other_links(node.get("rlk") or [])
                if credential_id:
                    wanted.insert(0, f"{registrar_id}/{ssar.bound_rule_name(credential_id)}")
                rules = []
                for link in wanted:
                    try:
                        rule = _local_form(client.call("GET", ids.http_path(link)).get("m2m:asar", {}),
                                           registrar_id)
                    except RspfError:
                        continue  # a link to a missing or unreadable rule is skipped, as for local rules
                    if rule and (not ssar.is_bound_rule_name(rule.get("ri"))
                                 or resources.same_cse(ssar.node_of(rule.get("lbl")), me)):
                        rules.append(rule)
                return rules
        except RspfError as exc:
            _acme_log("warn", f"cannot read the service subscription of {me} from the registrar: {exc}")
            return None

    # ------------------------------------------------------------------------------- Mcc
    def _send_to_registrar(self, method: str, url: str, body: bytes | None, headers: dict,
                           timeout: float | None) -> tuple[int, dict[str, str], bytes]:

        parts = urlsplit(url)
        client = OneM2MClient(self._connect_registrar(parts, timeout or 15.0), "", host=parts.netloc,
                              deadline=timeout or 15.0)
        try:
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            hdrs = {k.lower(): str(v) for k, v in headers.items()}
            hdrs["host"] = parts.netloc
            hdrs["connection"] = "close"
            resp = client.exchange(method, target, hdrs, body or b"")
        finally:
            client.close()
        return resp.status, resp.headers, resp.body


    # ------------------------------------------------------------------------------- observability
    # The audit log, the metrics and the health endpoint (docs/observability.md); never a key.
    def _setup_observability(self) -> None:
        """Open the audit log ([rspf] auditLog; an unusable path stops start-up) and read the key cache's
        counters when scraped."""
        assert self.config is not None and self.keycache is not None
        if self.config.audit_log is not None:
            try:
                self.audit = AuditLog(self.config.audit_log)
            except RspfError as exc:
                raise ConfigError(f"acme.ini [rspf] auditLog: {exc}") from None
        self.metrics.watch(lambda: self.listener, self.keycache, lambda: self._feed)

    def _start_observability(self) -> None:
        """Count and audit the secure listener's refusals; serve /metrics and /health ([rspf] metricsListen)."""
        assert self.config is not None and self.listener is not None
        self.listener.on_refusal = self._observe_connection_refused
        if self.config.metrics_listen is not None:
            host_ip, port = self.config.metrics_listen
            try:
                self._observer = ObservabilityServer(self.metrics.registry, self.health, host=host_ip, port=port,
                                                     name="rspf")
            except RspfError as exc:
                _acme_log("error", f"start-up stopped: acme.ini [rspf] metricsListen: {exc}")
                raise SystemExit(f"[rspf] acme.ini [rspf] metricsListen: {exc}") from None
            self._observer.start()
            bound = self._observer.address
            _acme_log("info", f"metrics on http://{bound[0]}:{bound[1]}/metrics, health on /health")

    def _stop_observability(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer = None
        self.audit.close()

    #: The revocation feed counts as behind when not read whole for this many seconds (and 10 polls)
    FEED_BEHIND_SECONDS = 30.0

    def health(self) -> list[str]:
        """What is wrong, for GET /health: the secure listener down, the MEF unreachable (the revocation feed
        fails), the revocation feed behind, audit log lines lost."""
        problems = []
        listener = self.listener
        if listener is None or not listener.running:
            problems.append("the secure listener is not running")
        feed = self._feed
        if feed is None:
            problems.append("the revocation feed is not followed yet")
        else:
            if feed.failures:
                problems.append(f"the MEF is unreachable: {feed.failures} read(s) of its revocation feed failed in a "
                                f"row ({feed.last_error})")
            since = feed.seconds_since_read()
            limit = max(self.FEED_BEHIND_SECONDS, 10 * feed.interval)
            if since is None:
                problems.append("the revocation feed has not been read yet")
            elif since > limit:
                problems.append(f"the revocation feed is behind: last read whole {since:.0f} s ago (more than "
                                f"{limit:g} s)")
        if self.audit.write_errors:
            problems.append(f"{self.audit.write_errors} audit log line(s) could not be written to {self.audit.path}")
        return problems

    def _observe_connection_refused(self, reason: str, peer: str, identity: str | None, detail: str) -> None:
        self.metrics.refusals.labels("connection").inc()
        self.audit.refused(Action.CONNECTION, actor=f"peer:{peer}", subject=identity or "-",
                           cause=f"{refusal_reason(reason)}: {detail}" if detail else reason,
                           source=peer.rpartition(":")[0] or peer)

    def _observe_refused(self, exc: RspfError, environ: dict[str, Any], cred: PeerCredential | None,
                         action: Action) -> None:
        where = "registration" if action is Action.REGISTRATION else \
            "secure_listener" if cred is not None else "plain_port"
        self.metrics.refusals.labels(where).inc()
        peer = str(environ.get("REMOTE_ADDR", "?"))
        details: dict[str, str | int | bool] = {"rsc": int(exc.rsc), "where": where.replace("_", " "),
                                                "path": access.shown(environ.get("PATH_INFO"))}
        if cred is not None:
            details["credentialID"] = cred.credential_id
        self.audit.refused(action, actor=f"credential:{cred.identity}" if cred is not None else f"peer:{peer}",
                           subject=access.shown(environ.get("HTTP_X_M2M_ORIGIN")), cause=str(exc),
                           source=peer, details=details)

    def _observe_registration(self, stem: str, app_id: Any, cred: PeerCredential | None,
                              environ: dict[str, Any]) -> None:
        self.metrics.registrations.labels("admitted").inc()
        self.audit.record(Action.REGISTRATION, actor=f"credential:{cred.identity}" if cred else
                          f"peer:{environ.get('REMOTE_ADDR', '?')}",
                          subject=stem, details={"appID": access.shown(app_id), "credentialID":
                                                 cred.credential_id if cred else "-"})

    def _observe_recorded(self, peer: PeerCredential, rule: str) -> None:
        self.metrics.credentials_recorded.inc()
        self.audit.record(Action.CREDENTIAL_RECORDED, actor=f"cse:{host.cse_id()}", subject=peer.credential_id,
                          details={"enroleeID": peer.enrolee_id or "-", "rule": rule})

    def _observe_revoked(self, items: list[Revocation], held: int, closed: int) -> None:
        self.metrics.revocations_applied.inc(len(items))
        self.metrics.connections_closed.labels("revoked").inc(closed)
        for item in items:
            subject = item.ke_id or f"certificate {item.cert_sha256}"
            self.audit.record(Action.REVOCATION_APPLIED, actor=f"cse:{host.cse_id()}", subject=subject,
                              result=Result.OK, cause=item.cause,
                              details={"seq": item.seq, "batch": len(items), "keysDroppedInBatch": held,
                                       "connectionsClosedInBatch": closed})


class _Refusal(RspfError):
    """A refusal that ACME reports with its own exception class (logged as ours)."""

    def __init__(self, rsc: RSC, message: str) -> None:
        super().__init__(message)
        self.rsc = rsc


def _read_position(path: Path) -> int | None:
    """The revocation feed position kept before a restart (None: none kept, or unreadable)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and len(text) <= 18 else None


def _ke_id_or_none(identity: str) -> str | None:
    try:
        return keys.normalise_ke_id(identity)
    except RspfError:
        return None


def _local_form(rule: dict[str, Any], registrar_id: str) -> dict[str, Any]:
    """A rule read from the registrar: its list attributes (m2m:listOfM2MID) come SP-relative (``/id-in/C*``);
    the rule was written, and is matched, in the registrar's own CSE-relative form (``C*``)."""
    prefix = registrar_id + "/"
    for attr in ("apci", "aai", "aae", "ari"):
        if isinstance(rule.get(attr), list):
            rule[attr] = [v[len(prefix):] if isinstance(v, str) and v.startswith(prefix) else v for v in rule[attr]]
    return rule


def _onem2m_error(start_response: Any, exc: RspfError, ri: str | None) -> list[bytes]:
    """A oneM2M error answer (TS-0009): the RSC's HTTP status, X-M2M-RSC, the reason as m2m:dbg."""
    body = json.dumps({"m2m:dbg": str(exc)}).encode()
    headers = [("Content-Type", "application/json"), ("X-M2M-RSC", str(int(exc.rsc))),
               ("Content-Length", str(len(body)))]
    if ri:
        headers.append(("X-M2M-RI", ri))
    status = exc.rsc.http_status
    start_response(f"{status} {HTTPStatus(status).phrase}", headers)
    return [body]


def _rsc_of_http_status(status: int) -> RSC:
    """The RSC of an answer ACME (or Flask) gave without one."""
    if status < 400:
        return RSC.OK
    return {400: RSC.BAD_REQUEST, 401: RSC.ORIGINATOR_HAS_NO_PRIVILEGE, 403: RSC.ORIGINATOR_HAS_NO_PRIVILEGE,
            404: RSC.NOT_FOUND, 405: RSC.OPERATION_NOT_ALLOWED, 415: RSC.UNSUPPORTED_MEDIA_TYPE,
            501: RSC.NOT_IMPLEMENTED}.get(status, RSC.BAD_REQUEST if status < 500 else RSC.INTERNAL_SERVER_ERROR)


def _answer_with_rsc(app: Any, environ: dict[str, Any], start_response: Any, ri: str | None) -> list[bytes]:
    """Run ``app``; an answer without X-M2M-RSC gets one (an error answer also a oneM2M body instead of
    Flask's HTML), an exception becomes 5000, and the request's X-M2M-RI is echoed."""
    captured: list[Any] = []
    chunks: list[bytes] = []

    def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        captured[:] = [status, list(headers)]
        return chunks.append

    try:
        result = app(environ, capture)
        try:
            chunks.extend(result)
        finally:
            if hasattr(result, "close"):
                result.close()
    except Exception as exc:
        log.exception("secure listener: the CSE failed on %s", access.shown(environ.get("PATH_INFO")))
        return _onem2m_error(start_response, RspfError(f"the CSE failed to answer ({type(exc).__name__})"), ri)
    if not captured:
        return _onem2m_error(start_response, RspfError("the CSE gave no answer"), ri)
    status, headers = captured
    names = {name.lower() for name, _ in headers}
    code = int(status.split()[0])
    if "x-m2m-rsc" not in names:
        rsc = _rsc_of_http_status(code)
        if code >= 400:
            return _onem2m_error(start_response, _Refusal(rsc, f"{status} from the CSE"), ri)
        headers.append(("X-M2M-RSC", str(int(rsc))))
    # the request's (validated) identifier, also where ACME wrote another value ("None" on some errors); and no
    # Server header: the secure listener does not tell who does not need to know which ACME version answers
    dropped = ("x-m2m-ri", "server") if ri else ("server",)
    headers = [(name, value) for name, value in headers if name.lower() not in dropped]
    if ri:
        headers.append(("X-M2M-RI", ri))
    start_response(status, headers)
    return chunks
