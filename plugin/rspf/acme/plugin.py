"""The SEC CSF plugin for the ACME CSE.

Loaded by ACME from ``<baseDir>/plugins/`` through a one-line shim written by ``rspf acme install``::

    from rspf.acme.plugin import RspfSecurityPlugin

Configured in the ``[rspf]`` section of ``acme.ini`` (docs/acme-plugin.md). What it does:

* at start-up, enrols the CSE with the MEF (or reuses a valid stored securityProfile) and applies the
  profile (CSE-ID, SP-ID, registrar); renews it in the background before it expires;
* serves ACME's oneM2M HTTP API on a second, secure listener (TLS-PSK 1.2/1.3, optionally certificates);
  an Enrolee presents its KeID as psk_identity and the CSE, as Enrolment Target, fetches the matching
  key from the MEF (SUID 22) and caches it for its lifetime;
* binds every request on that listener to the authenticated credential (no acting as another AE);
* checks AE registration against <serviceSubscribedNode>/<serviceSubscribedAppRule> (TS-0001 §10.2.2.2)
  and records enrolled credentials in the configured rule (TS-0003 §8.3.1.2 NOTE 3/4);
* with ``enforcement = on`` refuses AE registration that did not come over the secure listener (4107);
* registers this CSE with its registrar over TLS-PSK with the provisioned credential (Mcc).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from acmecse.runtime.PluginSupport import configure, init, plugin, requires, start, stop, validate

from .. import keys, wire
from ..client import OneM2MClient
from ..enrolee import Enrolee, EnroleeConfig, Enrolment
from ..errors import ConfigError, RspfError
from ..fileutil import read_key_file
from ..secret import Secret
from ..target import KeyCache
from ..tls import PskClient, PskServer, TlsConnection, TlsPeer
from ..wsgi import ENVIRON_KEY, PeerCredential, SecureWsgiServer
from . import internals, resources
from .config import AcmePluginConfig, load

log = logging.getLogger("rspf.acme")


def _acme_log(level: str, message: str) -> None:
    """Log through ACME's logger as well (its log files are what operators read)."""
    try:
        from acmecse.runtime.Logging import Logging as L

        {"info": L.log, "warn": L.logWarn, "error": L.logErr}[level](f"[rspf] {message}")
    except Exception:  # pragma: no cover - logging must never break the CSE
        pass
    getattr(log, {"warn": "warning"}.get(level, level))(message)


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
        self._recorded: set[str] = set()
        self._record_lock = threading.Lock()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._registrar_client = PskClient()
        self._psk: PskServer | None = None

    # ------------------------------------------------------------------------------- lifecycle
    @init
    def init(self) -> None:
        internals.check_version()
        # Headless ACME ignores SIGINT and skips its graceful shutdown on SIGTERM: make SIGTERM graceful.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_a: sys.exit(0))
        resources.install_resource_types()

    @configure
    def configure(self, config: Any) -> None:
        try:
            self.config = load(config.configParser, Path(config.baseDirectory), "acme.ini")
            if self.config is None:
                _acme_log("info", "no [rspf] section (or enable = false): the plugin is inactive")
                return
            if self.config.enforcement and (others := internals.other_bindings_enabled(config)):
                raise ConfigError(f"acme.ini [rspf] enforcement: 'on' needs the {', '.join(others)} binding(s) "
                                  "disabled (they bypass the secure listener)")
            self._setup_keys()
            self._psk = PskServer(self._psk_lookup)
            c = self.config
            if c.cert_file and c.key_file:
                self._psk.use_certificates(c.cert_file, c.key_file, c.ca_file)  # bad files stop start-up here
            if self.config.enrol:
                self.enrolment = self._enrol_at_startup()
                internals.apply_identity(config, self.enrolment.profile)
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
            internals.apply_registrar(config, self.enrolment.profile)
            reg = self.enrolment.profile["registrar"]
            _acme_log("info", f"registrar {reg['cseID']} at {reg['cseBaseURI']} (Mcc over TLS-PSK)")

    @start
    def start(self) -> None:
        if self.config is None:
            return
        internals.wrap_ae_registration(self._check_ae_registration)
        internals.wrap_access(self._proven_cse_access)
        app = internals.wrap_wsgi(self.httpServer, self._middleware)
        if self.config.create_subscription and internals.is_in_cse():
            resources.ensure_subscription(internals.cse_id(), self.config.ssar, list(self.config.allowed_app_ids))
        elif self.config.create_subscription:
            _acme_log("info", "not an IN-CSE: service subscriptions live on the IN-CSE; none created here")
        if self.enrolment is not None and self.config.secure_registrar:
            parts = urlsplit(self.enrolment.profile["registrar"]["cseBaseURI"])
            internals.route_registrar_over_psk(f"{parts.scheme}://{parts.netloc}", self._send_to_registrar)
        assert self.keycache is not None and self._psk is not None
        self.keycache.origin = internals.cse_id()  # the Enrolment Target's ID at the MEF: known only now
        self.listener = SecureWsgiServer(app, self._psk, self._resolve, host=self.config.secure_listen,
                                         port=self.config.secure_port)
        self.listener.start()
        _acme_log("info", f"secure listener (TLS-PSK{' and certificates' if self.config.cert_file else ''}) on "
                          f"{self.config.secure_listen}:{self.listener.port}; enforcement "
                          f"{'on' if self.config.enforcement else 'off'}")
        if self.enrolee is not None:
            self._renewer = threading.Thread(target=self._renew_loop, name="rspf-renew", daemon=True)
            self._renewer.start()

    @stop
    def stop(self) -> None:
        self._stop.set()
        if self.listener:
            self.listener.stop()

    # ------------------------------------------------------------------------------- enrolment
    def _setup_keys(self) -> None:
        c = self.config
        assert c is not None
        ident, path = c.fetch_identity
        fetch_key = read_key_file(path, "MEF credential file")
        self.keycache = KeyCache(mef_host=c.mef_host, mef_port=c.mef_port, mef_fqdn=c.mef_fqdn,
                                 psk_identity=ident, psk=fetch_key, origin="/unset", max_age=c.key_cache_seconds)
        if c.enrol:
            assert c.kpm_id and c.kpm_file and c.node_id
            self.enrolee = Enrolee(EnroleeConfig(
                mef_host=c.mef_host, mef_port=c.mef_port, mef_fqdn=c.mef_fqdn, kpm_id=c.kpm_id,
                kpm=read_key_file(c.kpm_file, "Kpm file"), node_id=c.node_id, store_path=c.profile_store,
                location=c.location, renew_before_seconds=c.renew_before_seconds))

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
        delay = 0.5
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
                if time.monotonic() + delay > deadline:
                    raise RspfError(f"could not enrol with the MEF at {self.config.mef_host}:{self.config.mef_port}"
                                    f" within {self.config.startup_retry_seconds:g} s and no valid securityProfile "
                                    f"is stored: {exc}") from None
                _acme_log("warn", f"MEF unreachable or refused ({exc}); retrying in {delay:.1f} s")
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _renew_loop(self) -> None:
        assert self.enrolee is not None and self.config is not None
        delay = 1.0
        while not self._stop.is_set():
            current = self.enrolment
            if current is None or current.needs_renewal(self.config.renew_before_seconds):
                try:
                    fresh = self.enrolee.enrol()
                    if current is not None and fresh.enrolee_id != current.enrolee_id:
                        _acme_log("warn", "the renewed securityProfile names another CSE-ID; it applies at restart")
                    self.enrolment = fresh
                    _acme_log("info", f"securityProfile renewed: KeID {fresh.ke_id}, expires {fresh.profile['expiry']}")
                    delay = 1.0
                except RspfError as exc:
                    _acme_log("warn", f"securityProfile renewal failed ({exc}); retrying in {delay:.0f} s")
                    self._stop.wait(delay)
                    delay = min(delay * 2, 300.0)
                    continue
            assert self.enrolment is not None
            wait = self.enrolment.renewal_due(self.config.renew_before_seconds).timestamp() - time.time()
            self._stop.wait(max(1.0, min(wait, 3600.0)))

    # ------------------------------------------------------------------- secure listener: keys
    def _psk_lookup(self, identity: str, peer_ip: str | None) -> Secret | None:
        assert self.keycache is not None
        cred, _fetched = self.keycache.lookup(identity)
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
        peer = PeerCredential("psk", ident, keys.credential_id(keys.CRED_TYPE_KPSAID, ke_id), cred.enrolee_id)
        self._record_enrolled(peer)
        return peer

    def _record_enrolled(self, peer: PeerCredential) -> None:
        """TS-0003 §8.3.1.2 NOTE 3/4: Credential-ID -> applicableCredIDs, Enrolee-ID -> allowedAEs."""
        assert self.config is not None
        if peer.enrolee_id is None or peer.enrolee_id.startswith("/"):
            return  # CSEs register as <remoteCSE>; SSARs govern AEs
        if not internals.is_in_cse():
            return  # only the IN-CSE hosts <serviceSubscribedAppRule> (TS-0004 Table 6.3.4.2.1-1)
        with self._record_lock:
            if peer.credential_id in self._recorded:
                return
            try:
                rule = resources.record_enrolled(internals.cse_id(), self.config.ssar, peer.credential_id,
                                                 peer.enrolee_id, self.config.ssar_shard_size)
                self._recorded.add(peer.credential_id)
                _acme_log("info", f"recorded {peer.credential_id} / {peer.enrolee_id} in <serviceSubscribedAppRule> "
                                  f"{rule}")
            except Exception as exc:
                _acme_log("warn", f"could not record {peer.credential_id} in rule {self.config.ssar}: {exc}")

    def _certificate_credential(self, tls: TlsPeer) -> PeerCredential | None:
        subject_id = tls.peer_certificate_id()
        if not subject_id:
            return None
        type_id = 32 if subject_id.startswith("/") else 33
        value = subject_id.lstrip("/")
        try:
            cred_id = keys.credential_id(type_id, value)
        except RspfError:
            return None
        return PeerCredential("certificate", subject_id, cred_id, subject_id)

    # -------------------------------------------------------------- request checks (TS-0001)
    def _middleware(self, app: Any) -> Any:
        plugin = self

        def middleware(environ: dict[str, Any], start_response: Any) -> Any:
            cred: PeerCredential | None = environ.get(ENVIRON_KEY)
            if cred is not None:
                origin = environ.get("HTTP_X_M2M_ORIGIN", "")
                if not plugin._origin_allowed(cred, origin):
                    return _onem2m_error(start_response, 4103, environ,
                                         f"the originator {origin or '(none)'} is not the identity bound to this "
                                         "secure connection")
            return app(environ, start_response)

        return middleware

    @staticmethod
    def _origin_allowed(cred: PeerCredential, origin: str) -> bool:
        bound = cred.enrolee_id
        if not bound:
            return False
        if bound.startswith("/"):  # a CSE: its own ID, or IDs it forwards for (its AEs)
            return origin == bound or origin.startswith(bound + "/")
        return origin in (bound, f"{internals.cse_id()}/{bound}")

    def _proven_cse_access(self, originator: str, resource: Any, operation: str, ty: Any) -> bool:
        """What a CSE whose MEF-provisioned key authenticated this connection may do as that CSE:

        * register (CREATE <remoteCSE>);
        * read and discover its own service subscription: the <serviceSubscribedNode> whose CSE-ID is its
          own and the rules it links (TS-0001 §10.2.2.2: a registrar that is not the IN-CSE retrieves them).
        """
        environ = internals.current_environ()
        cred: PeerCredential | None = environ.get(ENVIRON_KEY) if environ else None
        if not (cred and cred.kind == "psk" and cred.enrolee_id and cred.enrolee_id.startswith("/")
                and originator == cred.enrolee_id):
            return False
        if operation == "create":
            return ty == internals.CSR_TYPE
        if resource is None or operation not in ("retrieve", "discover"):
            return False
        if resource.ty == resources.SVSN:
            return resources.same_cse(resource.csi, originator)
        if resource.ty == resources.ASAR:
            node = resources.find_service_subscribed_node(originator)
            return node is not None and resource.ri in {r.ri for r in resources.rules_of(node)}
        return False

    def _check_ae_registration(self, ae: Any, originator: str) -> None:
        """TS-0001 §10.2.2.2 / TS-0004 §7.3.2.7 for registrations on the secure listener."""
        assert self.config is not None
        environ = internals.current_environ()
        cred: PeerCredential | None = environ.get(ENVIRON_KEY) if environ else None
        if cred is None:
            if self.config.enforcement and environ is not None:
                raise internals.acme_error(4107, "AE registration needs a security association: register over the "
                                                 "CSE's secure (TLS-PSK / mutual TLS) listener")
            return
        stem = originator or ""
        if internals.is_in_cse() or self.enrolment is None:
            svsn = resources.find_service_subscribed_node(internals.cse_id())
            rules = resources.rules_of(svsn) if svsn is not None else None
        else:  # a registrar that is not the IN-CSE reads its node and rules from the IN-CSE (TS-0001 §10.2.2.2)
            rules = self._remote_rules()
        if rules is None:
            raise internals.acme_error(4128, f"no <serviceSubscribedNode> for {internals.cse_id()}: no service "
                                             "subscription is established for this CSE")
        app_id = ae.api  # ACME resources answer None for an absent attribute
        for rule in rules:
            if resources.rule_allows(rule, cred.credential_id, app_id or "", stem):
                return
        raise internals.acme_error(4126, f"no <serviceSubscribedAppRule> allows credential {cred.credential_id} with "
                                         f"App-ID {app_id} and AE-ID-Stem {stem}")

    def _connect_registrar(self, parts: Any, timeout: float) -> TlsConnection:
        """TLS-PSK to the registrar at ``parts`` (a urlsplit result) with the provisioned KeID and key."""
        enrolment = self.enrolment
        assert enrolment is not None
        return self._registrar_client.connect(parts.hostname or "", parts.port or 443, enrolment.ke_id,
                                              enrolment.registrar_key, timeout=timeout)

    def _remote_rules(self) -> list[dict[str, Any]] | None:
        """This CSE's <serviceSubscribedNode> and linked rules, read from its registrar over TLS-PSK; None when
        there is no node for it (or the registrar cannot be read, which is logged)."""
        assert self.enrolment is not None
        me = internals.cse_id()
        parts = urlsplit(self.enrolment.profile["registrar"]["cseBaseURI"])
        try:
            tls = self._connect_registrar(parts, 10.0)
        except RspfError as exc:
            _acme_log("warn", f"cannot reach the registrar for the service subscription of {me}: {exc}")
            return None
        client = OneM2MClient(tls, me, host=parts.netloc)
        try:
            found = client.call("GET", f"{parts.path.rstrip('/')}?fu=1&ty={resources.SVSN}") or {}
            nodes = [client.call("GET", _http_path(u)).get("m2m:svsn", {}) for u in found.get("m2m:uril", [])]
            nodes = sorted((n for n in nodes if resources.same_cse(n.get("csi"), me)),
                           key=lambda n: (n.get("ct", ""), n.get("ri", "")))
            if not nodes:
                return None
            rules = []
            for link in nodes[0].get("rlk") or []:
                try:
                    rules.append(client.call("GET", _http_path(link)).get("m2m:asar", {}))
                except RspfError:
                    continue  # a link to a missing or unreadable rule is skipped, as for local rules
            # The registrar sends its list attributes (m2m:listOfM2MID) SP-relative ("/id-in/C*"); the rule
            # was written, and is matched, in the registrar's own CSE-relative form ("C*").
            prefix = self.enrolment.profile["registrar"]["cseID"] + "/"
            for rule in rules:
                for attr in ("apci", "aai", "aae", "ari"):
                    if isinstance(rule.get(attr), list):
                        rule[attr] = [v[len(prefix):] if isinstance(v, str) and v.startswith(prefix) else v
                                      for v in rule[attr]]
            return [r for r in rules if r]
        except (RspfError, ConnectionError, TimeoutError) as exc:
            _acme_log("warn", f"cannot read the service subscription of {me} from the registrar: {exc}")
            return None
        finally:
            client.close()

    # ------------------------------------------------------------------------------- Mcc
    def _send_to_registrar(self, method: str, url: str, body: bytes | None, headers: dict,
                           timeout: float | None) -> tuple[int, dict[str, str], bytes]:

        parts = urlsplit(url)
        tls = self._connect_registrar(parts, timeout or 15.0)
        try:
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            hdrs = {k.lower(): str(v) for k, v in headers.items()}
            hdrs["host"] = parts.netloc
            hdrs["connection"] = "close"
            tls.sendall(wire.render_request(wire.HttpRequest(method, target, hdrs, body or b"")))
            resp = wire.read_response(tls.makefile())
        finally:
            tls.close()
        return resp.status, resp.headers, resp.body


def _http_path(oid: str) -> str:
    """HTTP path of a oneM2M ID (TS-0009): absolute ``//sp/x`` -> ``/_/sp/x``; SP-relative ``/cse/x`` ->
    ``/~/cse/x``; CSE-relative ``x`` -> ``/x``."""
    if oid.startswith("//"):
        return "/_/" + oid[2:]
    if oid.startswith("/"):
        return "/~" + oid
    return "/" + oid


def _onem2m_error(start_response: Any, rsc: int, environ: dict[str, Any], message: str) -> list[bytes]:
    status = {4103: "403 Forbidden", 4107: "403 Forbidden"}.get(rsc, "400 Bad Request")
    body = json.dumps({"m2m:dbg": message}).encode()
    headers = [("Content-Type", "application/json"), ("X-M2M-RSC", str(rsc)), ("Content-Length", str(len(body)))]
    if ri := environ.get("HTTP_X_M2M_RI"):
        headers.append(("X-M2M-RI", ri))
    start_response(status, headers)
    return [body]
