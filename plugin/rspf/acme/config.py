"""The ``[rspf]`` section of ``acme.ini``: one typed object, validated at start-up.

Every key, its default and its meaning are in :data:`KEYS` (``rspf acme init/install`` write the section and
take their options from it) and documented in docs/acme-plugin.md. A wrong or missing value, an unknown key or
a misspelt section name stops the CSE with a message naming the file and the key.
"""

from __future__ import annotations

import configparser
import dataclasses
import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .. import ids
from ..errors import ConfigError
from ..httpserver import ServerLimits
from ..keys import check_fqdn
from ..metrics import parse_listen

SECTION = "rspf"
_ORIGINATOR = re.compile(r"[A-Za-z0-9._~/@:-]{1,256}")


@dataclass(frozen=True)
class Key:
    """One key of ``[rspf]``: its name, its default as written in acme.ini ("" = none), what it means (the comment
    ``rspf acme init/install`` writes above it, and its CLI help), and how the CLI sets it."""

    name: str
    default: str
    doc: str
    kind: Literal["text", "bool", "onoff"] = "text"  #: bool (true/false) and onoff (on/off) are --x/--no-x flags
    option: str = ""  #: the CLI option (default: the key in kebab case), "--yes/--no" for a flag
    written: bool = True  #: written out with its default; False: written commented out unless given

    @property
    def cli(self) -> str:
        if self.option:
            return self.option
        flag = "--" + re.sub(r"(?<=[a-z])(?=[A-Z])", "-", self.name).lower()
        return f"{flag}/--no-{flag[2:]}" if self.kind != "text" else flag

    def ini_value(self, value: bool | str) -> str:
        """A CLI value as acme.ini spells it."""
        if isinstance(value, bool):
            return ("on" if value else "off") if self.kind == "onoff" else str(value).lower()
        return str(value)


_L = ServerLimits()  # the transport's defaults: a limit key absent from acme.ini keeps its ServerLimits value

#: Every key of ``[rspf]``, in the order ``rspf acme init/install`` writes them. The one home of their defaults:
#: :func:`load`, the written section and the CLI options all derive from it.
KEYS: tuple[Key, ...] = (
    Key("enable", "true", "false: the plugin stays loaded but does nothing (the CSE then runs UNPROTECTED).",
        kind="bool"),
    Key("mefAddress", "", "The MEF, HOST:PORT (required).", option="--mef", written=False),
    Key("mefFQDN", "", "The MEF-FQDN: TLS SNI and the suffix of every KeID (required).", written=False),
    Key("enrol", "true", "Enrol this CSE at start-up; its CSE-ID, SP-ID and registrar then come from the "
        "securityProfile.", kind="bool"),
    Key("kpmID", "", "Bootstrap credential (required when enrolling): the KpmID.", written=False),
    Key("kpmFile", "", "The 0600 file holding Kpm as hex (relative to the base directory, or absolute).",
        written=False),
    Key("nodeID", "", "This node's M2M-Node-ID (required when enrolling).", written=False),
    Key("location", "", "Geographical location sent in the profile request.", written=False),
    Key("profileStore", "data/rspf-profile.store", "The encrypted securityProfile store (0600)."),
    Key("renewBeforeSeconds", "86400", "Renew the securityProfile this long before it expires (at most half its "
        "lifetime)."),
    Key("startupRetrySeconds", "60", "Without a valid stored profile, retry enrolment this long, then stop "
        "start-up."),
    Key("keyCacheSeconds", "300", "Use a key fetched from the MEF this long before asking the MEF again."),
    Key("mefPskIdentity", "", "The credential this CSE presents to the MEF as Enrolment Target (default: kpmID; "
        "required without enrolment).", written=False),
    Key("mefPskFile", "", "Its 0600 PSK file (hex; default: kpmFile).", written=False),
    Key("secureListen", "127.0.0.1", "Address of the secure listener (TLS-PSK 1.2 and 1.3, and mutual TLS with "
        "certFile/keyFile/caFile)."),
    Key("securePort", "", "Port of the secure listener (required).", written=False),
    Key("certFile", "", "Server certificate chain (PEM) for mutual TLS.", written=False),
    Key("keyFile", "", "Its private key (PEM).", written=False),
    Key("caFile", "", "The CA whose client certificates are accepted (mutual TLS); the operator writes their "
        "rules.", written=False),
    Key("mefCaFile", "", "The MEF's CA certificate (rspf mef ca): certificates it issued over EST are accepted "
        "(mutual TLS) and recorded in rules like MEF keys.", written=False),
    Key("secureCredentials", "psk, certificate", "What the secure listener accepts: psk, certificate, or both "
        "(certificate needs certFile/keyFile and caFile or mefCaFile; without certFile only psk is possible)."),
    Key("handshakeTimeout", f"{_L.handshake_timeout:g}", "Seconds for a whole TLS handshake on the secure "
        "listener.", written=False),
    Key("requestTimeout", f"{_L.request_timeout:g}", "Seconds for a whole request, and for sending an answer.",
        written=False),
    Key("idleTimeout", f"{_L.idle_timeout:g}", "Seconds a kept-alive connection may wait for its next request.",
        written=False),
    Key("maxConnections", str(_L.max_connections), "Open connections on the secure listener in total.",
        written=False),
    Key("maxConnectionsPerSource", str(_L.max_per_source), "Open connections from one IP address (at most "
        "maxConnections).", written=False),
    Key("maxBodyBytes", str(_L.max_body), "Largest request body on the secure listener.", written=False),
    Key("workers", str(_L.workers), "Threads answering requests on the secure listener.", written=False),
    Key("enforcement", "on", "on: the originator checks of TS-0004 §7.3.2.1 "
        "on every port; AEs that registered with a credential, CSEs and the admin are served only on the secure "
        "listener. off: compatibility mode, for ACME's own tests (the plain port is then as open as ACME "
        "without the plugin).", kind="onoff"),
    Key("plainPortOriginators", "", "Originators (CSE-IDs, the admin) still served on the plain port with "
        "enforcement on; comma-separated."),
    Key("secureWebUI", "false", "Serve ACME's web UI on the secure listener too.", kind="bool"),
    Key("ssar", "rspf-enrolled", "The <serviceSubscribedAppRule> (resource name under the CSEBase) that receives "
        "enrolled credentials."),
    Key("createSubscription", "true", "At start-up, create that rule and a <m2mServiceSubscriptionProfile> with a "
        "<serviceSubscribedNode> for this CSE if missing.", kind="bool"),
    Key("allowedAppIDs", "*", "allowedApp-IDs of the rule the plugin creates (comma-separated; each starts with "
        "*, R or N)."),
    Key("secureRegistrar", "true", "Register with the registrar over TLS-PSK with the provisioned credential.",
        kind="bool", option="--secure-registrar/--plain-registrar"),
    Key("auditLog", "data/rspf-audit.jsonl", "The append-only audit log, JSON lines, 0600 (docs/observability.md); "
        "off: none."),
    Key("metricsListen", "", "IP:PORT of GET /metrics (Prometheus) and GET /health; absent: not served.",
        written=False),
)
BY_NAME = {k.name: k for k in KEYS}


def _near(name: str, candidates: list[str]) -> str | None:
    """The candidate ``name`` is most likely a misspelling of (case and spacing ignored), if any is close."""
    folded = {c.lower(): c for c in candidates}
    hit = difflib.get_close_matches(name.strip().lower(), list(folded), n=1, cutoff=0.7)
    return folded[hit[0]] if hit else None


def _section_like_rspf(name: str) -> bool:
    """A section header that is not ``[rspf]`` but most likely meant it ([RSPF], [rspf ], [rpsf], [rspf.x])."""
    folded = name.strip().lower()
    return name != SECTION and (folded.startswith(SECTION) or _near(name, [SECTION]) is not None)


def _own_keys(parser: configparser.ConfigParser, section: str) -> dict[str, str]:
    """The keys written in ``section`` itself, with their (interpolated) values. ACME puts every environment
    variable into its parser's DEFAULT section, which ``parser[section]`` would mix in: an environment variable
    must never set or hide an ``[rspf]`` key."""
    written = getattr(parser, "_sections", {}).get(section, {})
    return {k: parser.get(section, k) for k in written}


@dataclass(frozen=True)
class AcmePluginConfig:
    mef_host: str
    mef_port: int
    mef_fqdn: str
    enrol: bool
    kpm_id: str | None
    kpm_file: Path | None
    node_id: str | None
    profile_store: Path
    renew_before_seconds: int
    key_cache_seconds: float
    startup_retry_seconds: float
    mef_psk_identity: str | None
    mef_psk_file: Path | None
    secure_listen: str
    secure_port: int
    cert_file: Path | None
    key_file: Path | None
    ca_file: Path | None
    #: the MEF's CA (trust anchor of the certificates it issues over EST), or None
    mef_ca_file: Path | None
    #: what the secure listener accepts
    accept_psk: bool
    accept_certificates: bool
    enforcement: bool
    plain_port_originators: tuple[str, ...]
    secure_web_ui: bool
    ssar: str
    create_subscription: bool
    allowed_app_ids: tuple[str, ...]
    secure_registrar: bool
    location: str | None
    limits: ServerLimits  #: the secure listener's transport limits (keys absent from acme.ini: ServerLimits())
    #: [rspf] auditLog: the audit log (docs/observability.md); None: off (auditLog = off)
    audit_log: Path | None = None
    #: [rspf] metricsListen: (IP, port) of GET /metrics and /health; None (absent): off
    metrics_listen: tuple[str, int] | None = None

    @property
    def fetch_identity(self) -> tuple[str, Path]:
        """The credential this CSE uses towards the MEF as Enrolment Target."""
        if self.mef_psk_identity and self.mef_psk_file:
            return self.mef_psk_identity, self.mef_psk_file
        assert self.kpm_id and self.kpm_file
        return self.kpm_id, self.kpm_file


def load(parser: configparser.ConfigParser, base_dir: Path, source: str = "acme.ini") -> AcmePluginConfig | None:
    """Parse ``[rspf]``; None when it says ``enable = false``.

    Strict, because a mistake here would leave the CSE unprotected: a section that looks like a misspelt
    ``[rspf]``, an unknown key, and (the plugin being loaded) no ``[rspf]`` section at all each raise
    :class:`ConfigError` naming ``source`` and the section or key."""
    misspelt = [s for s in parser.sections() if _section_like_rspf(s)]
    if misspelt:
        raise ConfigError(f"{source}: the section [{misspelt[0]}] is not [{SECTION}] (section names are exact: "
                          f"lower case, no spaces); rename it to [{SECTION}]")
    if not parser.has_section(SECTION):
        raise ConfigError(f"{source} has no [{SECTION}] section, but the rspf plugin is installed in "
                          f"{base_dir / 'plugins'}: the CSE would run without its protection. Add the section "
                          f"('rspf acme install'), or write [{SECTION}] with enable=false to run without the "
                          "plugin on purpose, or remove the plugin file")
    sec = _own_keys(parser, SECTION)
    for name in sec:
        if name not in BY_NAME:
            near = _near(name, list(BY_NAME))
            hint = f"; did you mean {near}?" if near else " (the keys are listed in docs/acme-plugin.md)"
            raise ConfigError(f"{source} [{SECTION}] {name}: unknown key{hint}")

    def err(key: str, why: str) -> ConfigError:
        return ConfigError(f"{source} [{SECTION}] {key}: {why}")

    def get(key: str, required: bool = False) -> str | None:
        v = (sec.get(key) or "").strip() or BY_NAME[key].default
        if not v and required:
            raise err(key, "is required")
        return v or None

    def flag(key: str) -> bool:
        v = (get(key) or "").lower()
        if v in ("1", "true", "yes", "on"):
            return True
        if v in ("0", "false", "no", "off"):
            return False
        raise err(key, f"must be true or false, not {v!r}")

    def number(key: str, lo: float, hi: float, integer: bool = True) -> float:
        v = get(key, required=True)
        try:
            n = int(v or "") if integer else float(v or "")
        except ValueError:
            raise err(key, f"must be a number, not {v!r}") from None
        if not lo <= n <= hi:
            raise err(key, f"must be between {lo:g} and {hi:g}")
        return n

    def path(key: str, required: bool = False, must_exist: bool = True) -> Path | None:
        v = get(key, required)
        if v is None:
            return None
        p = Path(v)
        p = p if p.is_absolute() else base_dir / p
        if must_exist and not p.is_file():
            raise err(key, f"the file {p} does not exist")
        return p

    if not flag("enable"):
        return None
    mef = get("mefAddress", required=True)
    assert mef is not None
    host, sep, port = mef.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise err("mefAddress", f"must be HOST:PORT, not {mef!r}")
    fqdn = get("mefFQDN", required=True)
    try:
        check_fqdn(fqdn or "")
    except Exception:
        raise err("mefFQDN", f"{fqdn!r} is not a valid FQDN") from None
    enrol = flag("enrol")
    kpm_id = get("kpmID", required=enrol)
    kpm_file = path("kpmFile", required=enrol)
    node_id = get("nodeID", required=enrol)
    mef_psk_identity = get("mefPskIdentity")
    mef_psk_file = path("mefPskFile")
    if bool(mef_psk_identity) != bool(mef_psk_file):
        raise err("mefPskIdentity" if not mef_psk_identity else "mefPskFile",
                  "mefPskIdentity and mefPskFile go together")
    if not (mef_psk_identity or kpm_id):
        raise err("mefPskIdentity", "is required when the CSE does not enrol (it authenticates this CSE to the MEF)")
    if get("securePort") is None:
        raise err("securePort", "is required (the TLS-PSK / mutual TLS listener)")
    secure_port = int(number("securePort", 1, 65535))
    cert, key, ca, mef_ca = path("certFile"), path("keyFile"), path("caFile"), path("mefCaFile")
    if (cert is None) != (key is None) or ((ca is not None or mef_ca is not None) and cert is None):
        raise err("certFile", "certFile and keyFile go together, and caFile and mefCaFile need them")
    kinds = {k.strip().lower() for k in (get("secureCredentials") or "").split(",") if k.strip()}
    if not kinds or kinds - {"psk", "certificate"}:
        raise err("secureCredentials", "must be psk, certificate, or psk, certificate")
    accept_certificates = "certificate" in kinds and cert is not None
    if kinds == {"certificate"} and (cert is None or (ca is None and mef_ca is None)):
        raise err("secureCredentials", "certificate alone needs certFile, keyFile and caFile or mefCaFile (the "
                  "listener would accept no one)")
    ssar = get("ssar", required=True)
    assert ssar is not None
    if not ids.RESOURCE_NAME_RE.fullmatch(ssar):
        raise err("ssar", "must be a resource name (letters, digits, '.', '_', '~', '-')")
    apps = tuple(a.strip() for a in (get("allowedAppIDs", required=True) or "").split(",") if a.strip())
    for a in apps:
        if a[0] not in "*RN":
            raise err("allowedAppIDs", f"{a!r} must start with '*', 'R' or 'N' (TS-0001 §9.6.29)")
    mode = (get("enforcement", required=True) or "").lower()
    if mode not in ("off", "on"):
        raise err("enforcement", "must be off or on")
    listed = tuple(o.strip() for o in (get("plainPortOriginators") or "").split(",") if o.strip())
    for o in listed:
        if not _ORIGINATOR.fullmatch(o) or "*" in o:
            raise err("plainPortOriginators", f"{o!r} is not an originator (a CSE-ID or AE-ID, no wildcards)")

    max_connections = int(number("maxConnections", 1, 100_000))
    # absent: the default, but never above maxConnections; set above it: a mistake worth stopping for
    if (sec.get("maxConnectionsPerSource") or "").strip():
        max_per_source = int(number("maxConnectionsPerSource", 1, 100_000))
        if max_per_source > max_connections:
            raise err("maxConnectionsPerSource", f"must not be above maxConnections ({max_connections})")
    else:
        max_per_source = min(_L.max_per_source, max_connections)
    limits = dataclasses.replace(
        _L,
        handshake_timeout=number("handshakeTimeout", 0.1, 3600, integer=False),
        request_timeout=number("requestTimeout", 0.1, 3600, integer=False),
        idle_timeout=number("idleTimeout", 0.1, 3600, integer=False),
        max_connections=max_connections, max_per_source=max_per_source,
        max_body=int(number("maxBodyBytes", 1024, 64 * 1024 * 1024)),
        workers=int(number("workers", 1, 256)),
    )
    audit = get("auditLog") or ""
    audit_log = None if audit.lower() in ("off", "false", "no", "0") else path("auditLog", must_exist=False)
    listen = get("metricsListen")
    return AcmePluginConfig(
        mef_host=host.strip("[]"), mef_port=int(port), mef_fqdn=(fqdn or "").lower(), enrol=enrol, kpm_id=kpm_id,
        kpm_file=kpm_file, node_id=node_id,
        profile_store=path("profileStore", required=True, must_exist=False),  # type: ignore[arg-type]
        renew_before_seconds=int(number("renewBeforeSeconds", 0, 10 ** 8)),
        key_cache_seconds=number("keyCacheSeconds", 1, 10 ** 7, integer=False),
        startup_retry_seconds=number("startupRetrySeconds", 0, 3600, integer=False),
        mef_psk_identity=mef_psk_identity, mef_psk_file=mef_psk_file,
        secure_listen=get("secureListen", required=True) or "", secure_port=secure_port,
        cert_file=cert, key_file=key, ca_file=ca, mef_ca_file=mef_ca, accept_psk="psk" in kinds,
        accept_certificates=accept_certificates, enforcement=mode == "on",
        plain_port_originators=listed, secure_web_ui=flag("secureWebUI"), ssar=ssar,
        create_subscription=flag("createSubscription"), allowed_app_ids=apps,
        secure_registrar=flag("secureRegistrar"), location=get("location"), limits=limits,
        audit_log=audit_log,
        metrics_listen=parse_listen(listen, f"{source} [{SECTION}] metricsListen") if listen else None,
    )
