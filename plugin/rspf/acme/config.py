"""The ``[rspf]`` section of ``acme.ini``: one typed object, validated at start-up.

Every key is documented in docs/acme-plugin.md. A wrong or missing value stops the CSE with a message
naming the key.
"""

from __future__ import annotations

import configparser
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import ids
from ..errors import ConfigError
from ..httpserver import ServerLimits
from ..keys import check_fqdn
from ..metrics import parse_listen

SECTION = "rspf"
_ORIGINATOR = re.compile(r"[A-Za-z0-9._~/@:-]{1,256}")

#: ``enforcement`` when acme.ini does not say (``rspf acme install`` writes it out, from here too).
DEFAULT_ENFORCEMENT = True
#: ``auditLog`` when acme.ini does not say (relative to ACME's base directory; ``off``: no audit log)
DEFAULT_AUDIT_LOG = "data/rspf-audit.jsonl"


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
    enforcement: bool
    plain_port_originators: tuple[str, ...]
    secure_web_ui: bool
    ssar: str
    ssar_shard_size: int
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
    """Parse ``[rspf]``; None when the section is absent or ``enable = false``."""
    if not parser.has_section(SECTION):
        return None
    sec = parser[SECTION]

    def err(key: str, why: str) -> ConfigError:
        return ConfigError(f"{source} [{SECTION}] {key}: {why}")

    def get(key: str, default: str | None = None, required: bool = False) -> str | None:
        v = sec.get(key, fallback=None)
        if v is not None:
            v = v.strip()
        if not v:
            if required:
                raise err(key, "is required")
            return default
        return v

    def flag(key: str, default: bool) -> bool:
        v = get(key)
        if v is None:
            return default
        if v.lower() in ("1", "true", "yes", "on"):
            return True
        if v.lower() in ("0", "false", "no", "off"):
            return False
        raise err(key, f"must be true or false, not {v!r}")

    def number(key: str, default: float, lo: float, hi: float, integer: bool = True) -> float:
        v = get(key)
        if v is None:
            return default
        try:
            n = int(v) if integer else float(v)
        except ValueError:
            raise err(key, f"must be a number, not {v!r}") from None
        if not lo <= n <= hi:
            raise err(key, f"must be between {lo:g} and {hi:g}")
        return n

    def path(key: str, default: str | None = None, required: bool = False, must_exist: bool = True) -> Path | None:
        v = get(key, default, required)
        if v is None:
            return None
        p = Path(v)
        p = p if p.is_absolute() else base_dir / p
        if must_exist and not p.is_file():
            raise err(key, f"the file {p} does not exist")
        return p

    if not flag("enable", True):
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
    enrol = flag("enrol", True)
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
    secure_port = int(number("securePort", 0, 1, 65535))
    if "securePort" not in sec:
        raise err("securePort", "is required (the TLS-PSK / mutual TLS listener)")
    cert, key, ca = path("certFile"), path("keyFile"), path("caFile")
    if (cert is None) != (key is None) or (ca is not None and cert is None):
        raise err("certFile", "certFile and keyFile go together, and caFile needs them")
    ssar = get("ssar", "rspf-enrolled")
    assert ssar is not None
    if not ids.RESOURCE_NAME_RE.fullmatch(ssar):
        raise err("ssar", "must be a resource name (letters, digits, '.', '_', '~', '-')")
    apps = tuple(a.strip() for a in (get("allowedAppIDs", "*") or "*").split(",") if a.strip())
    for a in apps:
        if a[0] not in "*RN":
            raise err("allowedAppIDs", f"{a!r} must start with '*', 'R' or 'N' (TS-0001 §9.6.29)")
    default_mode = "on" if DEFAULT_ENFORCEMENT else "off"
    mode = (get("enforcement", default_mode) or default_mode).lower()
    if mode not in ("off", "on"):
        raise err("enforcement", "must be off or on")
    listed = tuple(o.strip() for o in (get("plainPortOriginators", "") or "").split(",") if o.strip())
    for o in listed:
        if not _ORIGINATOR.fullmatch(o) or "*" in o:
            raise err("plainPortOriginators", f"{o!r} is not an originator (a CSE-ID or AE-ID, no wildcards)")

    d = ServerLimits()  # the transport's defaults: a key absent from acme.ini keeps its ServerLimits value
    max_connections = int(number("maxConnections", d.max_connections, 1, 100_000))
    # absent: the default, but never above maxConnections; set above it: a mistake worth stopping for
    max_per_source = int(number("maxConnectionsPerSource", min(d.max_per_source, max_connections), 1, 100_000))
    if max_per_source > max_connections:
        raise err("maxConnectionsPerSource", f"must not be above maxConnections ({max_connections})")
    limits = dataclasses.replace(
        d,
        handshake_timeout=number("handshakeTimeout", d.handshake_timeout, 0.1, 3600, integer=False),
        request_timeout=number("requestTimeout", d.request_timeout, 0.1, 3600, integer=False),
        idle_timeout=number("idleTimeout", d.idle_timeout, 0.1, 3600, integer=False),
        max_connections=max_connections, max_per_source=max_per_source,
        max_body=int(number("maxBodyBytes", d.max_body, 1024, 64 * 1024 * 1024)),
        workers=int(number("workers", d.workers, 1, 256)),
    )
    return AcmePluginConfig(
        mef_host=host.strip("[]"), mef_port=int(port), mef_fqdn=(fqdn or "").lower(), enrol=enrol, kpm_id=kpm_id,
        kpm_file=kpm_file, node_id=node_id,
        profile_store=path("profileStore", "data/rspf-profile.store", must_exist=False),  # type: ignore[arg-type]
        renew_before_seconds=int(number("renewBeforeSeconds", 86400, 0, 10 ** 8)),
        key_cache_seconds=number("keyCacheSeconds", 300, 1, 10 ** 7, integer=False),
        startup_retry_seconds=number("startupRetrySeconds", 60, 0, 3600, integer=False),
        mef_psk_identity=mef_psk_identity, mef_psk_file=mef_psk_file,
        secure_listen=get("secureListen", "127.0.0.1") or "127.0.0.1", secure_port=secure_port,
        cert_file=cert, key_file=key, ca_file=ca, enforcement=mode == "on",
        plain_port_originators=listed, secure_web_ui=flag("secureWebUI", False), ssar=ssar,
        ssar_shard_size=int(number("ssarShardSize", 256, 1, 100000)),
        create_subscription=flag("createSubscription", True), allowed_app_ids=apps,
        secure_registrar=flag("secureRegistrar", True), location=get("location"), limits=limits,
        **_observability(get, path, source),
    )


def _observability(get: Any, path: Any, source: str) -> dict[str, Any]:
    """``auditLog`` and ``metricsListen`` (docs/observability.md)."""
    audit = get("auditLog", DEFAULT_AUDIT_LOG)
    listen = get("metricsListen")
    return {
        "audit_log": None if audit.lower() in ("off", "false", "no", "0") else path("auditLog", DEFAULT_AUDIT_LOG,
                                                                                      must_exist=False),
        "metrics_listen": parse_listen(listen, f"{source} [{SECTION}] metricsListen") if listen else None,
    }
