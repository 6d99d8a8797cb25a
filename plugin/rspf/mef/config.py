"""MEF configuration: one typed object, read from a TOML file, validated at start.

Every key is documented in docs/mef-config.md. A wrong or missing value raises ConfigError naming the
key and the file.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .. import ids
from ..errors import ConfigError
from ..fileutil import check_private
from ..httpserver import ServerLimits
from ..keys import check_fqdn
from ..metrics import parse_listen


@dataclass(frozen=True)
class MefConfig:
    fqdn: str
    sp_id: str
    listen: str = "127.0.0.1"
    port: int = 8443
    database: Path = Path("mef.sqlite")
    #: PostgreSQL instead of the SQLite file (docs/scale.md): a libpq URL (no password in it unless the
    #: configuration file is private: PGPASSWORD or ~/.pgpass are better); None: SQLite
    database_url: str | None = field(default=None, repr=False)
    database_pool_size: int = 8
    master_key_file: Path = Path("mef.masterkey")
    enrolment_expiry_seconds: int = 30 * 24 * 3600
    key_retirement_grace_seconds: int = 300
    max_live_keys_per_enrolee: int = 3
    enrolment_rate_burst: int = 5
    enrolment_rate_interval_seconds: float = 60.0
    purge_interval_seconds: float = 10.0
    revocation_log_days: int = 30
    revocation_log_max_rows: int = 1_000_000
    max_body_bytes: int = 64 * 1024
    tls_min_version: str = "1.2"
    tls_max_version: str = "1.3"
    handshake_timeout: float = ServerLimits.handshake_timeout
    request_timeout: float = ServerLimits.request_timeout
    idle_timeout: float = ServerLimits.idle_timeout
    max_connections: int = ServerLimits.max_connections
    max_connections_per_source: int = ServerLimits.max_per_source
    workers: int = ServerLimits.workers
    log_level: str = "INFO"
    log_file: Path | None = None
    source: str = "<defaults>"
    audit_log: Path | None = Path("audit.jsonl")  # relative: next to the configuration file; false: no audit log
    metrics_listen: str | None = None  # IP:PORT of GET /metrics and /health (rspf.metrics); None: off
    #: Certificate-based handshake (docs/mef-config.md): the MEF's certificate chain and private key (PEM; the key
    #: file 0600) and the trust anchor(s) enrolee certificates must chain to. All three or none (PSK only).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    #: Certificate provisioning (EST, docs/certificates.md): the MEF's CA (generated on first start when both
    #: files are absent; the key 0600) and the validity of the certificates it issues. False: no EST, no CA.
    certificate_provisioning: bool = False
    est_ca_cert_file: Path = Path("est-ca.pem")
    est_ca_key_file: Path = Path("est-ca.key")
    certificate_validity_days: int = 365

    @property
    def own_certificate_files(self) -> tuple[Path, Path, Path]:
        """Where the MEF writes, at each start, the FQDN certificate its CA issues it, that certificate's key,
        and the trust anchors of client certificates (its CA, and tls_client_ca_file's)."""
        folder = self.est_ca_cert_file.parent
        return folder / "mef-fqdn-cert.pem", folder / "mef-fqdn-key.pem", folder / "mef-client-cas.pem"

    @classmethod
    def load(cls, path: Path | str, overrides: dict[str, Any] | None = None) -> MefConfig:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"the MEF configuration file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        section = data.get("mef")
        if not isinstance(section, dict):
            raise ConfigError(f"{path} has no [mef] section")
        values = dict(section)
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_dict(values, source=str(path), base_dir=path.resolve().parent)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "<dict>", base_dir: Path | None = None) -> MefConfig:
        base = base_dir or Path.cwd()
        known = {f for f in cls.__dataclass_fields__ if f != "source"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) in [mef]: {', '.join(unknown)}")

        def err(key: str, why: str) -> ConfigError:
            return ConfigError(f"{source}: [mef] {key}: {why}")

        def get(key: str, typ: type | tuple[type, ...], required: bool = False) -> Any:
            if key not in values:
                if required:
                    raise err(key, "is required")
                return cls.__dataclass_fields__[key].default
            v = values[key]
            if isinstance(v, bool) and typ is not bool or not isinstance(v, typ):
                raise err(key, f"must be {getattr(typ, '__name__', typ)}, not {type(v).__name__}")
            return v

        fqdn = get("fqdn", str, required=True)
        try:
            check_fqdn(fqdn)
        except Exception:
            raise err("fqdn", f"{fqdn!r} is not a valid FQDN") from None
        sp_id = get("sp_id", str, required=True)
        if not ids.SP_ID_RE.fullmatch(sp_id):
            raise err("sp_id", f"{sp_id!r} must look like //sp.example")
        port = get("port", int)
        if not 0 <= port <= 65535:
            raise err("port", "must be between 0 and 65535")
        exp = get("enrolment_expiry_seconds", int)
        if exp < 60:
            raise err("enrolment_expiry_seconds", "must be at least 60")
        hygiene: dict[str, int] = {}
        for key, low, top in (("key_retirement_grace_seconds", 0, 30 * 24 * 3600),
                              ("max_live_keys_per_enrolee", 1, 1000), ("enrolment_rate_burst", 1, 100_000),
                              ("revocation_log_days", 1, 3650), ("revocation_log_max_rows", 100, 100_000_000)):
            hygiene[key] = get(key, int)
            if not low <= hygiene[key] <= top:
                raise err(key, f"must be between {low} and {top}")
        periods: dict[str, float] = {}
        for key in ("enrolment_rate_interval_seconds", "purge_interval_seconds"):
            periods[key] = float(get(key, (int, float)))
            if not 0 < periods[key] <= 86400:
                raise err(key, "must be more than 0 and at most 86400 seconds")
        provisioning = get("certificate_provisioning", bool)
        validity = get("certificate_validity_days", int)
        if not 1 <= validity <= 3650:
            raise err("certificate_validity_days", "must be between 1 and 3650")
        max_body = get("max_body_bytes", int)
        if not 1024 <= max_body <= 16 * 1024 * 1024:
            raise err("max_body_bytes", "must be between 1024 and 16777216")
        vmin, vmax = get("tls_min_version", str), get("tls_max_version", str)
        for key, v in (("tls_min_version", vmin), ("tls_max_version", vmax)):
            if v not in ("1.2", "1.3"):
                raise err(key, "must be \"1.2\" or \"1.3\"")
        if vmin > vmax:
            raise err("tls_min_version", "is above tls_max_version")
        timeouts: dict[str, float] = {}
        for key in ("handshake_timeout", "request_timeout", "idle_timeout"):
            timeouts[key] = float(get(key, (int, float)))
            if not 0 < timeouts[key] <= 3600:
                raise err(key, "must be more than 0 and at most 3600 seconds")
        counts: dict[str, int] = {}
        for key, top in (("max_connections", 100_000), ("max_connections_per_source", 100_000), ("workers", 256)):
            counts[key] = get(key, int)
            if not 1 <= counts[key] <= top:
                raise err(key, f"must be between 1 and {top}")
        database_url = values.get("database_url")
        if database_url is not None:
            if not isinstance(database_url, str) or not database_url.startswith(("postgresql://", "postgres://")):
                raise err("database_url", "must be a PostgreSQL URL like \"postgresql://mef@db.example.com/mef\"")
            if _has_password(database_url) and not _private(Path(source)):
                raise err("database_url", "holds a password but the configuration file is readable by others: "
                          "chmod 600 it, or give the password by PGPASSWORD or ~/.pgpass instead")
        pool_size = get("database_pool_size", int)
        if not 2 <= pool_size <= 256:
            raise err("database_pool_size", "must be between 2 and 256")
        level = get("log_level", str).upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise err("log_level", "must be debug, info, warning or error")
        listen = get("listen", str)
        if not listen:
            raise err("listen", "must be an address")

        def path_of(key: str) -> Path | None:
            v = values.get(key, cls.__dataclass_fields__[key].default)
            if v is None:
                return None
            if not isinstance(v, (str, Path)) or not str(v):
                raise err(key, "must be a file path")
            p = Path(v)
            return p if p.is_absolute() else base / p

        cert_files = {key: path_of(key) for key in ("tls_cert_file", "tls_key_file", "tls_client_ca_file")}
        if any(cert_files.values()) and not all(cert_files.values()):
            missing = ", ".join(k for k, v in cert_files.items() if v is None)
            raise err(missing.split(",")[0], "tls_cert_file, tls_key_file and tls_client_ca_file go together "
                      f"(certificate handshake); missing: {missing}")
        for key, file in cert_files.items():
            if file is not None and not file.is_file():
                raise err(key, f"{file} does not exist")
        if cert_files["tls_key_file"] is not None:
            try:
                check_private(cert_files["tls_key_file"], "the MEF's TLS private key file")
            except ConfigError as exc:
                raise err("tls_key_file", str(exc)) from None

        audit_log: Path | None = None
        if values.get("audit_log", True) is not False:
            audit_log = path_of("audit_log")
        metrics_listen = values.get("metrics_listen")
        if metrics_listen is not None:
            if not isinstance(metrics_listen, str):
                raise err("metrics_listen", "must be text like \"127.0.0.1:9464\"")
            metrics_listen = metrics_listen.strip() or None
            if metrics_listen is not None:
                parse_listen(metrics_listen, f"{source}: [mef] metrics_listen")

        return cls(
            audit_log=audit_log, metrics_listen=metrics_listen,
            fqdn=fqdn.lower(), sp_id=sp_id, listen=listen, port=port,
            database=path_of("database"), master_key_file=path_of("master_key_file"),  # type: ignore[arg-type]
            database_url=database_url, database_pool_size=pool_size,
            enrolment_expiry_seconds=exp, max_body_bytes=max_body, tls_min_version=vmin, tls_max_version=vmax,
            handshake_timeout=timeouts["handshake_timeout"],
            request_timeout=timeouts["request_timeout"], idle_timeout=timeouts["idle_timeout"],
            max_connections=counts["max_connections"], max_connections_per_source=counts["max_connections_per_source"],
            workers=counts["workers"], log_level=level, log_file=path_of("log_file"), source=source,
            key_retirement_grace_seconds=hygiene["key_retirement_grace_seconds"],
            max_live_keys_per_enrolee=hygiene["max_live_keys_per_enrolee"],
            enrolment_rate_burst=hygiene["enrolment_rate_burst"], revocation_log_days=hygiene["revocation_log_days"],
            revocation_log_max_rows=hygiene["revocation_log_max_rows"],
            enrolment_rate_interval_seconds=periods["enrolment_rate_interval_seconds"],
            purge_interval_seconds=periods["purge_interval_seconds"],
            tls_cert_file=cert_files["tls_cert_file"], tls_key_file=cert_files["tls_key_file"],
            tls_client_ca_file=cert_files["tls_client_ca_file"],
            certificate_provisioning=provisioning, certificate_validity_days=validity,
            est_ca_cert_file=path_of("est_ca_cert_file"), est_ca_key_file=path_of("est_ca_key_file"),  # type: ignore[arg-type]
        )

    def server_limits(self) -> ServerLimits:
        """The transport's limits from this configuration (the rest are the transport's defaults)."""
        return ServerLimits(handshake_timeout=self.handshake_timeout, request_timeout=self.request_timeout,
                            idle_timeout=self.idle_timeout, max_connections=self.max_connections,
                            max_per_source=self.max_connections_per_source, max_body=self.max_body_bytes,
                            workers=self.workers)


def _has_password(url: str) -> bool:
    return bool(re.match(r"postgres(?:ql)?://[^/@?#]*:[^/@?#]*@", url)) or "password=" in url.lower()


def _private(path: Path) -> bool:
    """Whether the configuration file exists and no one but its owner may read it."""
    try:
        check_private(path, "MEF configuration file")
    except (ConfigError, OSError):
        return False
    return path.is_file()


_D: dict[str, Any] = {f.name: f.default for f in fields(MefConfig)}  # the template below shows the defaults

EXAMPLE = f"""\
# onem2m-rspf MEF configuration (every key: docs/mef-config.md)
[mef]
fqdn = "mef.example.com"            # the MEF-FQDN: it ends every KeID
sp_id = "//sp.example.com"          # M2M-SP-ID, used to make CSE/AE IDs absolute
listen = "{_D['listen']}"
port = {_D['port']}
database = "{_D['database']}"             # relative paths are relative to this file
# database_url = "postgresql://mef@db.example.com/mef"  # PostgreSQL instead (several MEFs; docs/scale.md)
# database_pool_size = {_D['database_pool_size']}            # connections each MEF keeps to PostgreSQL at most
master_key_file = "{_D['master_key_file']}"   # created 0600 on first start; encrypts keys at rest
enrolment_expiry_seconds = {_D['enrolment_expiry_seconds']}  # default lifetime of an Enrolment Key (Ke)
key_retirement_grace_seconds = {_D['key_retirement_grace_seconds']}  # earlier KeIDs retire this long after re-enrolment
max_live_keys_per_enrolee = {_D['max_live_keys_per_enrolee']}  # usable KeIDs per enrolee; beyond it the oldest retire
enrolment_rate_burst = {_D['enrolment_rate_burst']}            # enrolments one enrolee may make back to back ...
enrolment_rate_interval_seconds = {_D['enrolment_rate_interval_seconds']:g}  # ... and one more each this many seconds
purge_interval_seconds = {_D['purge_interval_seconds']:g}  # how often expired and retired keys go (Targets learn it)
revocation_log_days = {_D['revocation_log_days']}            # how long revocation log rows are kept
revocation_log_max_rows = {_D['revocation_log_max_rows']}   # ... and at most this many (the oldest go first)
max_body_bytes = {_D['max_body_bytes']}
tls_min_version = "{_D['tls_min_version']}"
tls_max_version = "{_D['tls_max_version']}"
handshake_timeout = {_D['handshake_timeout']:g}              # seconds for a whole TLS handshake
request_timeout = {_D['request_timeout']:g}                # seconds for a whole request (head and body)
idle_timeout = {_D['idle_timeout']:g}                   # seconds a kept-alive connection may wait for its next request
max_connections = {_D['max_connections']}              # open connections in total
max_connections_per_source = {_D['max_connections_per_source']}    # open connections from one IP address
workers = {_D['workers']}                        # threads answering requests
log_level = "{_D['log_level'].lower()}"
# log_file = "mef.log"
audit_log = "{_D['audit_log']}"  # append-only audit log (JSON lines, 0600); false: none (docs/observability.md)
# metrics_listen = "127.0.0.1:9464"  # Prometheus GET /metrics and GET /health (plain HTTP); absent: off
# Certificate-based enrolment (mutual TLS, ECDSA P-256): all three, or none for TLS-PSK only
# tls_cert_file = "mef-cert.pem"        # the MEF's certificate (chain), naming the fqdn above as a DNS SAN
# tls_key_file = "mef-key.pem"          # its private key (0600)
# tls_client_ca_file = "enrolee-ca.pem" # trust anchor(s) of enrolee certificates
# Certificate provisioning over EST (docs/certificates.md)
certificate_provisioning = {str(_D['certificate_provisioning']).lower()}  # the CA issues certificates (EST)
est_ca_cert_file = "{_D['est_ca_cert_file']}"   # the CA certificate (generated with its key on first start)
est_ca_key_file = "{_D['est_ca_key_file']}"     # the CA's private key (0600; never logged)
certificate_validity_days = {_D['certificate_validity_days']}  # at most (never past validUntil)
"""
