"""The ``rspf`` command: MEF server and administration, Enrolee enrolment, Target key fetching.

Exit codes: 0 success; 1 the peer refused (its oneM2M RSC and text are printed); 2 bad usage,
configuration or input.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from . import __version__
from .errors import RSC, BadRequest, ConfigError, RemoteError, RspfError, TransportError

if TYPE_CHECKING:
    from .audit import Action
    from .mef.config import MefConfig
    from .mef.store import MefStore

log = logging.getLogger("rspf")


def _setup_logging(level: str = "INFO", log_file: Path | None = None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _fail(exc: Exception) -> NoReturn:
    if isinstance(exc, RemoteError):
        click.echo(f"error: the peer answered {exc.remote_rsc}: {exc}", err=True)
        sys.exit(1)
    if isinstance(exc, TransportError):  # the peer was unreachable or failed TLS
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(f"error: {exc}", err=True)
    sys.exit(2)


def _hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise click.BadParameter(f"{value!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


@click.group()
@click.version_option(__version__, prog_name="rspf")
def main() -> None:
    """Remote Security Provisioning for oneM2M: MEF, Enrolee and Enrolment Target tools."""


@main.command()
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--bytes", "length", default=32, show_default=True, type=click.IntRange(16, 64))
def keygen(out: Path, length: int) -> None:
    """Create a new random key in OUT (hex text, mode 0600). Never overwrites."""
    from .fileutil import new_key_file
    try:
        new_key_file(out, length)
    except RspfError as exc:
        _fail(exc)
    click.echo(f"wrote a {length}-byte key to {out} (mode 0600)")


# ------------------------------------------------------------------------------------------------ MEF
@main.group()
def mef() -> None:
    """Run and administer the M2M Enrolment Function."""


config_option = click.option("-c", "--config", "config_path", required=True,
                             type=click.Path(dir_okay=False, path_type=Path), help="MEF configuration (TOML).")


def _load(config_path: Path, **overrides: Any) -> tuple[MefConfig, MefStore]:
    from .mef.config import MefConfig
    from .mef.store import open_store
    try:
        cfg = MefConfig.load(config_path, overrides)
        store = open_store(cfg)
    except RspfError as exc:
        _fail(exc)
    return cfg, store


@mef.command("init")
@click.argument("config_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--fqdn", required=True, help="The MEF-FQDN (ends every KeID).")
@click.option("--sp-id", required=True, help="The M2M-SP-ID, e.g. //sp.example.com.")
@click.option("--listen", default="127.0.0.1", show_default=True)
@click.option("--port", default=8443, show_default=True, type=click.IntRange(0, 65535))
@click.option("--database-url", default=None, metavar="URL",
              help="Keep the data in this PostgreSQL database instead of an SQLite file (docs/scale.md).")
def mef_init(config_path: Path, fqdn: str, sp_id: str, listen: str, port: int, database_url: str | None) -> None:
    """Write a MEF configuration file and create its database and master key."""
    from .mef.config import EXAMPLE, MefConfig
    from .mef.store import open_store
    from .mef.store_pg import redact_url
    if config_path.exists():
        _fail(ConfigError(f"{config_path} already exists; refusing to overwrite it"))
    text = (EXAMPLE.replace('"mef.example.com"', json.dumps(fqdn)).replace('"//sp.example.com"', json.dumps(sp_id))
            .replace('listen = "127.0.0.1"', f"listen = {json.dumps(listen)}").replace("port = 8443", f"port = {port}"))
    if database_url is not None:
        text = re.sub(r"(?m)^# database_url = .*$", f"database_url = {json.dumps(database_url)}", text)
    try:
        MefConfig.from_dict({"fqdn": fqdn, "sp_id": sp_id, "listen": listen, "port": port,
                             "database_url": database_url}, source="options")
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(text)
        if database_url is not None:
            config_path.chmod(0o600)  # it names the database (and may hold its password)
        cfg = MefConfig.load(config_path)
        open_store(cfg).close()
    except RspfError as exc:
        _fail(exc)
    where = redact_url(cfg.database_url) if cfg.database_url else cfg.database
    click.echo(f"wrote {config_path}; database {where}; master key {cfg.master_key_file} (0600)")


@mef.command("migrate")
@config_option
@click.option("--to", "to_url", required=True, metavar="URL",
              help="The empty PostgreSQL database to copy into, e.g. postgresql://mef@db.example.com/mef.")
def mef_migrate(config_path: Path, to_url: str) -> None:
    """Copy this MEF's SQLite database (the configuration's `database`) into an empty PostgreSQL database in one
    transaction, with the same master key; then set `database_url` in the configuration. Stop `rspf mef serve`
    first (docs/scale.md)."""
    from .audit import Action
    from .mef.config import MefConfig
    from .mef.store_pg import PostgresStore, migrate, redact_url
    from .mef.store_sqlite import SqliteStore
    try:
        cfg = MefConfig.load(config_path)
    except RspfError as exc:
        _fail(exc)
    try:
        with _audited(cfg, Action.DATABASE_MIGRATE, redact_url(to_url)) as details:
            source = SqliteStore(cfg.database, cfg.master_key_file, create=False)
            try:
                target = PostgresStore(to_url, cfg.master_key_file, pool_size=2)
                try:
                    copied = migrate(source, target, progress=lambda table, n: click.echo(
                        f"  {table}: {n:,} rows...", err=True) if n % 100_000 == 0 else None)
                finally:
                    target.close()
            finally:
                source.close()
            details.update(copied)
    except RspfError as exc:
        _fail(exc)
    click.echo(f"copied {cfg.database} into {redact_url(to_url)}: "
               + ", ".join(f"{n:,} {table}" for table, n in copied.items()))
    click.echo(f"now set database_url in {config_path} (and keep {cfg.master_key_file}: every MEF instance needs it)")


@mef.command("serve")
@config_option
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="Override [mef] port.")
@click.option("--listen", default=None, help="Override [mef] listen.")
def mef_serve(config_path: Path, port: int | None, listen: str | None) -> None:
    """Run the MEF until SIGTERM or Ctrl-C. Every purge_interval_seconds it deletes expired and retired keys
    and old revocation log rows."""
    import threading
    import time

    from .audit import AuditLog
    from .mef.ca import MefCa
    from .mef.server import MefServer
    from .mef.service import MefService
    from .metrics import MefMetrics, ObservabilityServer, parse_listen
    cfg, store = _load(config_path, port=port, listen=listen)
    _setup_logging(cfg.log_level, cfg.log_file)
    try:
        audit = AuditLog(cfg.audit_log)
    except RspfError as exc:
        _fail(ConfigError(f"{cfg.source} [mef] audit_log: {exc}"))
    metrics = MefMetrics()
    try:
        ca = MefCa.load_or_create(cfg.est_ca_cert_file, cfg.est_ca_key_file, cfg.fqdn) \
            if cfg.certificate_provisioning else None
        service = MefService(cfg, store, audit=audit, metrics=metrics, ca=ca)
        server = MefServer(cfg, service)
    except RspfError as exc:
        _fail(exc)
    purge_failure: list[str] = []
    observer = None
    try:
        server.bind()
        metrics.watch(server, store.stats)
        if cfg.metrics_listen:
            host, mport = parse_listen(cfg.metrics_listen, f"{cfg.source} [mef] metrics_listen")
            observer = ObservabilityServer(metrics.registry, lambda: _mef_health(store, audit, purge_failure),
                                           host=host, port=mport, name="mef")
    except RspfError as exc:
        _fail(exc)
    if observer is not None:
        observer.start()
    stopping = threading.Event()

    def purge_loop() -> None:
        due = 0.0
        while True:
            if time.monotonic() >= due:
                due = time.monotonic() + cfg.purge_interval_seconds
                try:
                    service.purge()
                    purge_failure.clear()
                except Exception as exc:  # e.g. the database is busy: log it, try again next time
                    log.error("purge failed: %s", exc)
                    purge_failure[:] = [f"the last purge of expired and retired keys failed: {exc}"]
            audit.roll()  # the summary line of refusals past the burst, once their interval is over
            if stopping.wait(min(10.0, max(0.0, due - time.monotonic()))):
                return

    def stop(*_a: Any) -> None:
        server.request_stop()  # only a flag: the serving thread does the shutdown below

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    purger = threading.Thread(target=purge_loop, name="mef-purge", daemon=True)
    purger.start()
    server.serve_forever()
    stopping.set()
    server.shutdown()
    purger.join(timeout=30)
    if observer is not None:
        observer.stop()
    audit.close()
    log.info("MEF stopped")


def _mef_health(store: MefStore, audit: Any, purge_failure: list[str]) -> list[str]:
    """What is wrong with a running MEF, for GET /health (docs/observability.md)."""
    problems = [p for p in (store.write_problem(),) if p]
    problems += purge_failure
    if audit.write_errors:
        problems.append(f"{audit.write_errors} audit log line(s) could not be written to {audit.path}")
    return problems


@contextmanager
def _audited(cfg: MefConfig, action: Action, subject: str) -> Iterator[dict[str, str | int | bool]]:
    """An admin action, in the audit log with the operator (the OS user) as actor: ``ok`` when the block ends,
    ``refused`` with the reason when it raises RspfError. The log is opened first: an unusable audit log stops
    the command before it changes anything. The block may add details to the dict it gets."""
    from .audit import AuditLog, Result, operator
    try:
        audit = AuditLog(cfg.audit_log)
    except RspfError as exc:
        _fail(ConfigError(f"{cfg.source} [mef] audit_log: {exc}"))
    details: dict[str, str | int | bool] = {}
    try:
        yield details
    except RspfError as exc:
        audit.record(action, actor=operator(), subject=subject, result=Result.REFUSED, cause=str(exc),
                     details=details)
        raise
    else:
        audit.record(action, actor=operator(), subject=subject, details=details)
    finally:
        audit.close()


@mef.group("enrolee")
def mef_enrolee() -> None:
    """Register, change, list and retire enrolees (devices and CSEs that enrol with this MEF)."""


def _warn(warnings: list[str]) -> None:
    for w in warnings:
        click.echo(f"warning: {w}", err=True)


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))


def _echo_rows(rows: list[dict[str, Any]], as_json: bool, noun: str, header: str,
               line: Callable[[dict[str, Any]], str]) -> None:
    """A listing: JSON, or a header, a line per row and a count."""
    if as_json:
        _echo_json(rows)
        return
    click.echo(header)
    for r in rows:
        click.echo(line(r))
    click.echo(f"{len(rows)} {noun}")


def _echo_fields(values: dict[str, Any]) -> None:
    width = max(len(k) for k in values)
    for key, value in values.items():
        if isinstance(value, list):
            value = ", ".join(v if isinstance(v, str) else json.dumps(v) for v in value) or "-"
        click.echo(f"{key:{width}}  {'-' if value is None else value}")


def _enrolee_or_fail(store: Any, kpm_id: str) -> Any:
    rec = store.get_enrolee(kpm_id)
    if rec is None:
        _fail(ConfigError(f"no enrolee has the KpmID {kpm_id}"))
    return rec


app_id_option = click.option("--app-id", "app_ids", multiple=True, metavar="PATTERN",
                             help="An App-ID (pattern, '*' wildcards) this enrolee may register with; repeat for "
                                  "more. Sent to Targets with its keys. Not set: the Target's own default applies.")


@mef_enrolee.command("add")
@config_option
@click.option("--kpm-id", default=None, help="KpmID: the psk_identity of the bootstrap key.")
@click.option("--kpm-file", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="File with Kpm as hex (mode 0600); see 'rspf keygen'.")
@click.option("--cert-id", default=None, help="The oneM2M ID the enrolee's certificate names (subjectAltName URI "
                                               "//sp/id, else its CN): it may enrol with that certificate.")
@click.option("--cert", "cert_file", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The enrolee's certificate (PEM): --cert-id is read from it.")
@click.option("--enrolee-id", required=True, help="CSE-ID (/id-mn) or AE-ID (Cmy-sensor) to provision.")
@click.option("--node-id", required=True, help="The device's M2M-Node-ID.")
@click.option("--registrar-cse-id", required=True, help="SP-relative CSE-ID of the registrar, e.g. /id-in.")
@click.option("--registrar-uri", required=True, help="https:// URI of the registrar's CSEBase.")
@click.option("--target", "targets", multiple=True, help="Extra Enrolment Target and SUIDs, e.g. /id-in:22,23.")
@click.option("--rm-uri", default=None, help="Remote management server to instruct during the exchange.")
@click.option("--expiry-seconds", type=int, default=None, help="Lifetime of this enrolee's Enrolment Keys.")
@click.option("--valid-until", default=None, help="No enrolment after this ISO 8601 date-time.")
@app_id_option
@click.option("--certificates", "may_certify", is_flag=True,
              help="The MEF's CA may issue it a certificate over EST when it asks (docs/certificates.md).")
def enrolee_add(config_path: Path, kpm_id: str | None, kpm_file: Path | None, cert_id: str | None,
                cert_file: Path | None, enrolee_id: str, node_id: str, registrar_cse_id: str, registrar_uri: str,
                targets: tuple[str, ...], rm_uri: str | None, expiry_seconds: int | None, valid_until: str | None,
                app_ids: tuple[str, ...], may_certify: bool) -> None:
    """Register one enrolee: by a Kpm (--kpm-id and --kpm-file; the Kpm is never printed), by the ID its
    certificate names (--cert-id or --cert), or both.

    Warns (and still registers) when the registrar or a Target has no credential to fetch keys with yet, or
    when another enrolee has the same Kpm or Node-ID."""
    from .audit import Action
    from .fileutil import read_key_file
    from .mef.admin import Fetchers, enrolee_from_fields, registration_warnings, with_certificate_id
    if (kpm_id is None) != (kpm_file is None):
        _fail(ConfigError("--kpm-id and --kpm-file go together"))
    if cert_id is not None and cert_file is not None:
        _fail(ConfigError("give the certificate ID by --cert-id or --cert, not both"))
    if cert_file is not None:
        cert_id = _certificate_id(cert_file)
    if kpm_id is None and cert_id is None:
        _fail(ConfigError("an enrolee needs a Kpm (--kpm-id and --kpm-file) or a certificate (--cert-id or --cert)"))
    cfg, store = _load(config_path)
    try:
        with _audited(cfg, Action.ENROLEE_ADD, kpm_id or cert_id or "-") as details:
            details["enroleeID"] = enrolee_id
            row: dict[str, Any] = {
                "enrolee_id": enrolee_id, "node_id": node_id,
                "registrar_cse_id": registrar_cse_id, "registrar_uri": registrar_uri, "targets": ";".join(targets),
                "rm_uri": rm_uri, "enrolment_expiry_seconds": expiry_seconds, "valid_until": valid_until,
                "allowed_app_ids": list(app_ids) or None, "certificates": may_certify,
            }
            kpm = None
            if kpm_id is not None and kpm_file is not None:
                row.update(kpm_id=kpm_id, kpm=read_key_file(kpm_file, "Kpm file").reveal().hex())
            if cert_id is not None:
                details["certificateID"] = cert_id
                rec, kpm = with_certificate_id(row, cert_id, sp_id=cfg.sp_id)
            else:
                rec, kpm = enrolee_from_fields(row, sp_id=cfg.sp_id)
            warnings = registration_warnings(store, rec, kpm, Fetchers(store, cfg.sp_id))
            store.add_enrolee(rec, kpm)
            details["warnings"] = len(warnings)
    except RspfError as exc:
        _fail(exc)
    _warn(warnings)
    how = ", ".join(([f"KpmID {rec.kpm_id}"] if rec.has_kpm else []) +
                    ([f"certificate ID {rec.cert_id}"] if rec.cert_id else []))
    click.echo(f"added enrolee {rec.enrolee_id} ({how})")


def _certificate_id(cert_file: Path) -> str:
    """The oneM2M ID a PEM certificate names (rspf.tls.certificate_onem2m_id), or fail saying why."""
    from cryptography import x509

    from .tls import certificate_onem2m_id
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except ValueError:
        _fail(ConfigError(f"{cert_file} is not a PEM certificate"))
    found = certificate_onem2m_id(cert)
    if not found:
        _fail(ConfigError(f"the certificate in {cert_file} names no oneM2M ID (no //sp/... URI subjectAltName, no "
                          "CN)"))
    return found


@mef_enrolee.command("update")
@config_option
@click.argument("kpm_id")
@click.option("--node-id", default=None, help="New M2M-Node-ID.")
@click.option("--registrar-cse-id", default=None, help="New registrar CSE-ID, e.g. /id-in.")
@click.option("--registrar-uri", default=None, help="New https:// URI of the registrar's CSEBase.")
@click.option("--target", "targets", multiple=True, help="Extra Targets (replace the current ones), e.g. /id-x:22.")
@click.option("--clear-targets", is_flag=True, help="Remove every extra Target.")
@click.option("--rm-uri", default=None, help="New remote management server URI.")
@click.option("--clear-rm-uri", is_flag=True, help="Remove the remote management server.")
@click.option("--expiry-seconds", type=int, default=None, help="New lifetime of this enrolee's Enrolment Keys.")
@click.option("--clear-expiry-seconds", is_flag=True, help="Use the MEF's default key lifetime again.")
@click.option("--valid-until", default=None, help="New end of enrolment (ISO 8601 date-time).")
@click.option("--clear-valid-until", is_flag=True, help="No end of enrolment.")
@app_id_option
@click.option("--clear-app-ids", is_flag=True, help="Set no App-IDs (the Target's own default applies).")
@click.option("--certificates/--no-certificates", "may_certify", default=None,
              help="Whether the MEF's CA may issue it certificates (those already issued stay valid).")
def enrolee_update(config_path: Path, kpm_id: str, node_id: str | None, registrar_cse_id: str | None,
                   registrar_uri: str | None, targets: tuple[str, ...], clear_targets: bool, rm_uri: str | None,
                   clear_rm_uri: bool, expiry_seconds: int | None, clear_expiry_seconds: bool,
                   valid_until: str | None, clear_valid_until: bool, app_ids: tuple[str, ...],
                   clear_app_ids: bool, may_certify: bool | None) -> None:
    """Change an enrolee's registration (not its KpmID, Enrolee-ID or Kpm: see rotate-kpm).

    Only the fields named change; list options (--target, --app-id) replace the whole list. Keys already
    issued keep working; what changed applies to the next enrolment and the next key fetch."""
    from .mef.admin import Fetchers, registration_warnings, updated_enrolee
    changes: dict[str, Any] = {}
    for name, value, clear in (("targets", ";".join(targets), clear_targets), ("rm_uri", rm_uri, clear_rm_uri),
                               ("enrolment_expiry_seconds", expiry_seconds, clear_expiry_seconds),
                               ("valid_until", valid_until, clear_valid_until),
                               ("allowed_app_ids", list(app_ids), clear_app_ids)):
        if clear and value not in (None, "", []):
            _fail(ConfigError(f"give a new {name} or clear it, not both"))
        if clear:
            changes[name] = None
        elif value not in (None, "", []):
            changes[name] = value
    for name, value in (("node_id", node_id), ("registrar_cse_id", registrar_cse_id),
                        ("registrar_uri", registrar_uri), ("certificates", may_certify)):
        if value is not None:
            changes[name] = value
    from .audit import Action
    cfg, store = _load(config_path)
    try:
        with _audited(cfg, Action.ENROLEE_UPDATE, kpm_id) as details:
            details["fields"] = ",".join(sorted(changes))
            rec = store.get_enrolee(kpm_id)
            if rec is None:
                raise ConfigError(f"no enrolee has the KpmID {kpm_id}")
            new = updated_enrolee(rec, changes, sp_id=cfg.sp_id)
            warnings = registration_warnings(store, new, None, Fetchers(store, cfg.sp_id))
            store.update_enrolee(new)
    except RspfError as exc:
        _fail(exc)
    _warn(warnings)
    click.echo(f"updated enrolee {kpm_id}: {', '.join(sorted(changes))}")


@mef_enrolee.command("list")
@config_option
@click.option("--state", type=click.Choice(["active", "suspended", "revoked"]), default=None,
              help="Only enrolees in this state.")
@click.option("--registrar", default=None, help="Only enrolees with this registrar CSE-ID (/id-in).")
@click.option("--expiring-before", default=None,
              help="Only enrolees whose valid-until is before this ISO 8601 date-time.")
@click.option("--limit", type=click.IntRange(1), default=None, help="At most this many (default: all).")
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True, help="Skip this many first.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def enrolee_list(config_path: Path, state: str | None, registrar: str | None, expiring_before: str | None,
                 limit: int | None, offset: int, as_json: bool) -> None:
    """List enrolees (never their keys), ordered by KpmID."""
    import datetime as dt
    before = None
    if expiring_before is not None:
        try:
            before = dt.datetime.fromisoformat(expiring_before)
        except ValueError:
            _fail(ConfigError("--expiring-before must be an ISO 8601 date-time, e.g. 2027-01-01T00:00:00Z"))
        if before.tzinfo is None:
            before = before.replace(tzinfo=dt.UTC)
    _cfg, store = _load(config_path)
    filters: dict[str, Any] = {"state": state, "registrar": registrar, "expiring_before": before}
    rows = [r.public_dict() for r in store.list_enrolees(**filters, limit=limit, offset=offset)]
    if as_json:
        _echo_json(rows)
        return
    click.echo(f"{'KpmID':40} {'Enrolee-ID':24} {'Node-ID':24} {'registrar':12} {'state':9} {'valid until':25} "
               "last enrolled")
    for r in rows:
        click.echo(f"{r['kpmID']:40} {r['enroleeID']:24} {r['nodeID']:24} {r['registrarCSEID']:12} {r['state']:9} "
                   f"{r['validUntil'] or '-':25} {r['lastEnrolled'] or '-'}")
    total = store.count_enrolees(**filters)
    shown = f"{offset + 1}-{offset + len(rows)} of {total}" if rows else f"none of {total}"
    click.echo(f"{shown} enrolee(s)")


@mef_enrolee.command("show")
@config_option
@click.argument("kpm_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def enrolee_show(config_path: Path, kpm_id: str, as_json: bool) -> None:
    """Show one enrolee (everything but Kpm) and its stored KeIDs."""
    _cfg, store = _load(config_path)
    rec = _enrolee_or_fail(store, kpm_id)
    shown = {**rec.public_dict(), "keyIDs": store.enrolment_key_ids(kpm_id)}
    if as_json:
        _echo_json(shown)
    else:
        _echo_fields(shown)


def _state_change(config_path: Path, kpm_id: str, change: str) -> Any:
    from .audit import Action
    cfg, store = _load(config_path)
    try:
        with _audited(cfg, Action(f"enrolee.{change}"), kpm_id) as details:
            n = getattr(store, f"{change}_enrolee")(kpm_id)
            if isinstance(n, int):
                details["keys"] = n
            return n
    except RspfError as exc:
        _fail(exc)


@mef_enrolee.command("suspend")
@config_option
@click.argument("kpm_id")
def enrolee_suspend(config_path: Path, kpm_id: str) -> None:
    """Suspend an active enrolee: no enrolment and no key fetch (4004) until 'resume'. Its keys are kept."""
    n = _state_change(config_path, kpm_id, "suspend")
    click.echo(f"suspended {kpm_id} ({n} usable Enrolment Key(s) no longer served)")


@mef_enrolee.command("resume")
@config_option
@click.argument("kpm_id")
def enrolee_resume(config_path: Path, kpm_id: str) -> None:
    """Make a suspended enrolee active again (its unexpired, unretired keys are served again)."""
    _state_change(config_path, kpm_id, "resume")
    click.echo(f"resumed {kpm_id}")


@mef_enrolee.command("revoke")
@config_option
@click.argument("kpm_id")
def enrolee_revoke(config_path: Path, kpm_id: str) -> None:
    """Revoke an enrolee for good: no new enrolment, and its Enrolment Keys are deleted."""
    n = _state_change(config_path, kpm_id, "revoke")
    click.echo(f"revoked {kpm_id} ({n} Enrolment Key(s) deleted)")


@mef_enrolee.command("delete")
@config_option
@click.argument("kpm_id")
@click.option("--yes", is_flag=True, help="Confirm: the enrolee, its Kpm and its keys are deleted for good.")
def enrolee_delete(config_path: Path, kpm_id: str, yes: bool) -> None:
    """Delete an enrolee with its Kpm and keys (its KpmID and Enrolee-ID can be registered again)."""
    if not yes:
        _fail(ConfigError(f"deleting {kpm_id} cannot be undone; repeat with --yes"))
    n = _state_change(config_path, kpm_id, "delete")
    click.echo(f"deleted {kpm_id} ({n} Enrolment Key(s) deleted)")


@mef_enrolee.command("rotate-kpm")
@config_option
@click.argument("kpm_id")
@click.option("--kpm-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the new Kpm here (hex, mode 0600; the file must not exist).")
@click.option("--print-kpm", is_flag=True, help="Print the new Kpm (hex) on stdout instead.")
def enrolee_rotate_kpm(config_path: Path, kpm_id: str, kpm_out: Path | None, print_kpm: bool) -> None:
    """Give an enrolee a new random Kpm. The old Kpm stops working at once (also in a session already open
    with it), and the Enrolment Keys made with it are deleted: the device must get the new Kpm and enrol."""
    import secrets

    from .fileutil import write_private
    from .secret import Secret
    if (kpm_out is None) == (not print_kpm):
        _fail(ConfigError("say where the new Kpm goes: --kpm-out FILE or --print-kpm (exactly one)"))
    if kpm_out is not None and kpm_out.exists():
        _fail(ConfigError(f"{kpm_out} already exists; refusing to overwrite a key"))
    from .audit import Action
    cfg, store = _load(config_path)
    kpm = Secret(secrets.token_bytes(32), "Kpm")
    try:
        with _audited(cfg, Action.ENROLEE_ROTATE_KPM, kpm_id) as details:
            if store.get_enrolee(kpm_id) is None:
                raise ConfigError(f"no enrolee has the KpmID {kpm_id}")
            if kpm_out is not None:
                write_private(kpm_out, kpm.reveal().hex().encode() + b"\n")
            try:
                n = store.rotate_kpm(kpm_id, kpm)
            except BaseException:
                if kpm_out is not None:
                    kpm_out.unlink()  # the rotation did not happen: no new key file either
                raise
            details["keys"] = n
    except RspfError as exc:
        _fail(exc)
    if print_kpm:
        click.echo(kpm.reveal().hex())
    click.echo(f"rotated the Kpm of {kpm_id} ({n} Enrolment Key(s) deleted)"
               + (f"; new Kpm in {kpm_out} (0600)" if kpm_out else ""), err=print_kpm)


@mef_enrolee.command("revoke-key")
@config_option
@click.argument("ke_id")
def enrolee_revoke_key(config_path: Path, ke_id: str) -> None:
    """Revoke one Enrolment Key (KeID) at once; the enrolee stays active and may enrol again."""
    from .audit import Action
    from .keys import normalise_ke_id
    cfg, store = _load(config_path)
    try:
        with _audited(cfg, Action.KEY_REVOKE, ke_id) as details:
            kpm_id = store.revoke_key(normalise_ke_id(ke_id))
            details["kpmID"] = kpm_id
    except RspfError as exc:
        _fail(exc)
    click.echo(f"revoked KeID {normalise_ke_id(ke_id)} of {kpm_id}")


@mef_enrolee.command("import")
@config_option
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Validate everything and say what would be imported; change nothing.")
def enrolee_import(config_path: Path, file: Path, dry_run: bool) -> None:
    """Import a manufacturing batch (CSV with a header row, or a JSON list). All rows or none.

    The file holds keys: it must not be readable by group or others (chmod 600)."""
    from .audit import Action
    from .mef.admin import import_enrolees
    cfg, store = _load(config_path)
    try:
        with _audited(cfg, Action.ENROLEE_IMPORT, str(file)) as details:
            details["dryRun"] = dry_run
            started = time.monotonic()
            result = import_enrolees(store, file, sp_id=cfg.sp_id, dry_run=dry_run, progress=lambda n: click.echo(
                f"  read {n:,} rows ({n / max(time.monotonic() - started, 1e-3):,.0f}/s)...", err=True))
            details["imported"] = 0 if dry_run else result.count
            details["badRows"] = result.error_count
            details["warnings"] = result.warning_count
            if result.errors:
                raise _BadRows(f"{result.error_count} bad row(s); nothing was imported")
    except _BadRows:
        pass  # in the audit log as refused; the rows are reported below
    except RspfError as exc:
        _fail(exc)
    if result.errors:  # (warnings are shown once the file is valid)
        for e in result.errors[:50]:
            click.echo(f"{file}:{e.line}: {e.message}" if e.line else f"{file}: {e.message}", err=True)
        if result.error_count > 50:
            click.echo(f"... and {result.error_count - 50} more bad rows", err=True)
        click.echo(f"error: {result.error_count} bad row(s); nothing was imported", err=True)
        sys.exit(2)
    for w in result.warnings[:50]:
        click.echo(f"{file}:{w.line}: warning: {w.message}", err=True)
    if result.warning_count > 50:
        click.echo(f"... and {result.warning_count - 50} more warnings", err=True)
    if dry_run:
        click.echo(f"dry run: {file} is valid; it would import {result.count} enrolee(s) "
                   f"({result.warning_count} warning(s)); nothing was changed")
    else:
        click.echo(f"imported {result.count} enrolee(s) from {file}")


class _BadRows(BadRequest):
    """An import refused for bad rows (each is reported on its own line)."""


@mef.group("target")
def mef_target() -> None:
    """Register the credentials Enrolment Targets (e.g. an IN-CSE) use to fetch keys from the MEF."""


@mef_target.command("add")
@config_option
@click.option("--psk-identity", required=True, help="The psk_identity the Target presents to the MEF.")
@click.option("--psk-file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="File with the Target's PSK as hex (mode 0600); see 'rspf keygen'.")
@click.option("--target-id", required=True, help="The Target's CSE-ID (/id-in) or absolute ID.")
def target_add(config_path: Path, psk_identity: str, psk_file: Path, target_id: str) -> None:
    """Register a Target credential (the PSK is read from a file and never printed)."""
    from . import ids
    from .audit import Action
    from .fileutil import read_key_file
    from .mef.admin import PSK_ID_RE
    from .mef.store import TargetRecord
    cfg, store = _load(config_path)
    try:
        with _audited(cfg, Action.TARGET_ADD, psk_identity) as details:
            details["targetID"] = target_id
            if not PSK_ID_RE.fullmatch(psk_identity):
                raise ConfigError("--psk-identity must be 1 to 128 printable ASCII characters without spaces")
            if not (ids.is_cse_id(target_id) or ids.is_absolute_id(target_id)):
                raise ConfigError("--target-id must be a CSE-ID such as /id-in or an absolute ID //sp/id-in")
            store.add_target(TargetRecord(psk_identity, target_id), read_key_file(psk_file, "Target PSK file"))
    except RspfError as exc:
        _fail(exc)
    click.echo(f"added Enrolment Target {target_id} (psk_identity {psk_identity})")


@mef_target.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def target_list(config_path: Path, as_json: bool) -> None:
    """List Target credentials (never their PSKs)."""
    _cfg, store = _load(config_path)
    _echo_rows([t.public_dict() for t in store.list_targets()], as_json, "Target credential(s)",
               f"{'PSK identity':40} {'Target-ID':32} {'state':8} created",
               lambda r: f"{r['pskIdentity']:40} {r['targetID']:32} {r['state']:8} {r['created'] or '-'}")


@mef_target.command("show")
@config_option
@click.argument("psk_identity")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def target_show(config_path: Path, psk_identity: str, as_json: bool) -> None:
    """Show one Target credential (never its PSK)."""
    _cfg, store = _load(config_path)
    target = store.get_target(psk_identity)
    if target is None:
        _fail(ConfigError(f"no Enrolment Target has the PSK identity {psk_identity}"))
    if as_json:
        _echo_json(target.public_dict())
    else:
        _echo_fields(target.public_dict())


@mef_target.command("revoke")
@config_option
@click.argument("psk_identity")
def target_revoke(config_path: Path, psk_identity: str) -> None:
    """Revoke a Target credential: the MEF refuses its handshakes from now on."""
    from .audit import Action
    cfg, store = _load(config_path)
    try:
        with _audited(cfg, Action.TARGET_REVOKE, psk_identity):
            store.revoke_target(psk_identity)
    except RspfError as exc:
        _fail(exc)
    click.echo(f"revoked Target credential {psk_identity}")


@mef.group("cert")
def mef_cert() -> None:
    """Certificates the MEF's CA issued over EST (docs/certificates.md)."""


def _certificate_or_fail(store: Any, serial: str) -> Any:
    found = store.get_certificate(serial)
    if found is None:
        _fail(ConfigError(f"no issued certificate has the serial number or SHA-256 {serial}"))
    return found


@mef_cert.command("list")
@config_option
@click.option("--enrolee", "kpm_id", default=None, help="Only the certificates of this enrolee (its KpmID).")
@click.option("--state", type=click.Choice(["active", "revoked"]), default=None, help="Only those in this state.")
@click.option("--limit", type=click.IntRange(1), default=None, help="At most this many (default: all).")
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True, help="Skip this many first.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def cert_list(config_path: Path, kpm_id: str | None, state: str | None, limit: int | None, offset: int,
              as_json: bool) -> None:
    """List issued certificates, oldest first."""
    _cfg, store = _load(config_path)
    _echo_rows([c.public_dict() for c in store.list_certificates(kpm_id=kpm_id, state=state, limit=limit,
                                                                 offset=offset)],
               as_json, "certificate(s)", f"{'serial':42} {'subject':40} {'state':8} not after",
               lambda r: f"{r['serial']:42} {r['subject'][:40]:40} {r['state']:8} {r['notAfter']}")


@mef_cert.command("show")
@config_option
@click.argument("serial")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--pem", "as_pem", is_flag=True, help="Print the certificate itself (PEM).")
def cert_show(config_path: Path, serial: str, as_json: bool, as_pem: bool) -> None:
    """Show one issued certificate, by serial number (hex) or SHA-256."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    _cfg, store = _load(config_path)
    found = _certificate_or_fail(store, serial)
    if as_pem:
        click.echo(x509.load_der_x509_certificate(found.der).public_bytes(serialization.Encoding.PEM).decode(),
                   nl=False)
    elif as_json:
        _echo_json(found.public_dict())
    else:
        _echo_fields(found.public_dict())


@mef_cert.command("revoke")
@config_option
@click.argument("serial")
def cert_revoke(config_path: Path, serial: str) -> None:
    """Revoke an issued certificate: the MEF refuses it for renewal, and CSEs that follow the MEF's revocation
    feed refuse it and close its connections."""
    from .audit import Action
    cfg, store = _load(config_path)
    try:
        with _audited(cfg, Action.CERTIFICATE_REVOKE, serial) as details:
            revoked = store.revoke_certificate(serial)
            details["sha256"] = revoked.sha256
    except RspfError as exc:
        _fail(exc)
    click.echo(f"revoked certificate {revoked.serial} of {revoked.subject} (SHA-256 {revoked.sha256})")


@mef.command("ca")
@config_option
def mef_ca(config_path: Path) -> None:
    """Print the MEF's CA certificate (PEM): the trust anchor of the certificates it issues."""
    from .mef.ca import MefCa
    cfg, store = _load(config_path)
    store.close()
    if not cfg.certificate_provisioning:
        _fail(ConfigError(f"{cfg.source}: certificate_provisioning is off; this MEF has no CA"))
    try:
        ca = MefCa.load_or_create(cfg.est_ca_cert_file, cfg.est_ca_key_file, cfg.fqdn)
    except RspfError as exc:
        _fail(exc)
    click.echo(ca.cert_file.read_text(), nl=False)


# -------------------------------------------------------------------------------------------- Enrolee
def _enrolee_options(required: bool = True) -> list:
    return [
        click.option("--mef", "mef_addr", required=required, help="MEF address HOST:PORT."),
        click.option("--mef-fqdn", required=required, help="The MEF-FQDN (TLS SNI; the KeID suffix)."),
        click.option("--kpm-id", default=None, help="KpmID: the identifier of the pre-provisioned key."),
        click.option("--kpm-file", default=None, type=click.Path(dir_okay=False, path_type=Path),
                     help="File holding Kpm as hex (mode 0600)."),
        click.option("--store", "store_path", required=required, type=click.Path(dir_okay=False, path_type=Path),
                     help="Encrypted enrolment store (created 0600)."),
    ]


enrolee_options = _enrolee_options()
#: the Certificate-Based handshake instead of the Kpm (``rspf enrol``, ``rspf show-enrolment``)
certificate_options = [
    click.option("--cert", "cert_file", default=None, type=click.Path(dir_okay=False, path_type=Path),
                 help="This Enrolee's certificate (PEM), instead of --kpm-id/--kpm-file."),
    click.option("--key", "key_file", default=None, type=click.Path(dir_okay=False, path_type=Path),
                 help="Its private key (PEM, mode 0600)."),
    click.option("--ca", "ca_file", default=None, type=click.Path(dir_okay=False, path_type=Path),
                 help="The trust anchor the MEF's certificate must chain to (it must name --mef-fqdn)."),
]


def _with(options):
    def deco(f):
        for o in reversed(options):
            f = o(f)
        return f
    return deco


def _enrolee(mef_addr: str, mef_fqdn: str, kpm_id: str | None, kpm_file: Path | None, store_path: Path,
             node_id: str = "", *, cert_file: Path | None = None, key_file: Path | None = None,
             ca_file: Path | None = None, **kw: Any):
    """The Enrolee of the options: a Kpm (--kpm-id, --kpm-file) or a certificate (--cert, --key, --ca)."""
    from .enrolee import Enrolee, EnroleeConfig
    from .fileutil import read_key_file
    host, port = _hostport(mef_addr)
    psk, cert = (kpm_id, kpm_file), (cert_file, key_file, ca_file)
    if any(psk) and any(cert):
        _fail(ConfigError("authenticate with a Kpm (--kpm-id, --kpm-file) or a certificate (--cert, --key, --ca), "
                          "not both"))
    try:
        if all(cert):
            return Enrolee(EnroleeConfig(mef_host=host, mef_port=port, mef_fqdn=mef_fqdn.lower(), cert_file=cert_file,
                                         key_file=key_file, trust_anchor_file=ca_file, node_id=node_id,
                                         store_path=store_path, **kw))
        if not all(psk):
            _fail(ConfigError("give --kpm-id and --kpm-file, or --cert, --key and --ca"))
        assert kpm_file is not None
        kpm = read_key_file(kpm_file, "Kpm file")
        return Enrolee(EnroleeConfig(mef_host=host, mef_port=port, mef_fqdn=mef_fqdn.lower(), kpm_id=kpm_id, kpm=kpm,
                                     node_id=node_id, store_path=store_path, **kw))
    except RspfError as exc:
        _fail(exc)


@main.command()
@_with(enrolee_options)
@_with(certificate_options)
@click.option("--node-id", required=True, help="This device's M2M-Node-ID.")
@click.option("--location", default=None, help="Geographical location to report (optional).")
@click.option("--force", is_flag=True, help="Enrol even if the stored profile is still valid.")
@click.option("--renew-before", default=86400, show_default=True, type=click.IntRange(0),
              help="Re-enrol when the profile expires within this many seconds "
                   "(at most half the profile's lifetime).")
@click.option("--no-remote-management", is_flag=True, help="Tell the MEF this device cannot follow RM instructions.")
@click.option("--certificate-enrolment", is_flag=True,
              help="Ask the MEF for a certificate (EST) and keep it, with its key made here, in --cert-dir.")
@click.option("--cert-dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Folder of the obtained key, certificate and CA (0600 files; default: <store>.certificate).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (keys redacted).")
@click.option("-v", "--verbose", is_flag=True, help="Log the protocol steps (never key material).")
def enrol(mef_addr: str, mef_fqdn: str, kpm_id: str | None, kpm_file: Path | None, store_path: Path,
          cert_file: Path | None, key_file: Path | None, ca_file: Path | None, node_id: str,
          location: str | None, force: bool, renew_before: int, no_remote_management: bool,
          certificate_enrolment: bool, cert_dir: Path | None, as_json: bool, verbose: bool) -> None:
    """Enrol with the MEF (or reuse a stored, still-valid enrolment) and store the securityProfile.

    The handshake uses the Kpm (--kpm-id, --kpm-file) or this Enrolee's certificate (--cert, --key, --ca).
    With --certificate-enrolment the device also obtains a certificate when the MEF instructs it (and renews
    a stored one that is due)."""
    _setup_logging("DEBUG" if verbose else "INFO")
    e = _enrolee(mef_addr, mef_fqdn, kpm_id, kpm_file, store_path, node_id, location=location,
                 renew_before_seconds=renew_before, remote_management=not no_remote_management,
                 cert_file=cert_file, key_file=key_file, ca_file=ca_file,
                 certificate_enrolment=certificate_enrolment, certificate_dir=cert_dir)
    try:
        if force:
            enrolment, renewed = e.enrol(), True
        else:
            enrolment, renewed = e.ensure()
        held = e.ensure_certificate()[0] if certificate_enrolment else None
    except RspfError as exc:
        _fail(exc)
    if certificate_enrolment and held is None:
        _fail(RemoteError(int(RSC.ORIGINATOR_HAS_NO_PRIVILEGE), "enrolled, but the MEF issued no certificate "
                          "(is the enrolee entitled to one? see the warning above)"))
    if as_json:
        click.echo(json.dumps({"enrolled": renewed, **enrolment.summary(),
                               **({"certificate": held.summary()} if held else {})}, indent=2))
    else:
        p = enrolment.profile
        click.echo(f"{'enrolled' if renewed else 'stored enrolment still valid'}: {p['enroleeType']} {p['enroleeID']}")
        click.echo(f"  KeID       {enrolment.ke_id}")
        click.echo(f"  registrar  {p['registrar']['cseID']} at {p['registrar']['cseBaseURI']}")
        click.echo(f"  expires    {p['expiry']}")
        click.echo(f"  stored in  {store_path} (encrypted, 0600)")
        if held is not None:
            click.echo(f"  certificate {held.subject}, until {held.not_after.isoformat()}")
            click.echo(f"              {held.cert_file}, key {held.key_file}, CA {held.ca_file} (0600)")


@main.command("renew-certificate")
@click.option("--mef", "mef_addr", required=True, help="MEF address HOST:PORT.")
@click.option("--mef-fqdn", required=True, help="The MEF-FQDN (its certificate must name it).")
@click.option("--cert-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder of the key, certificate and CA that 'rspf enrol --certificate-enrolment' wrote.")
@click.option("--json", "as_json", is_flag=True, help="Print the new certificate's summary as JSON.")
def renew_certificate_command(mef_addr: str, mef_fqdn: str, cert_dir: Path, as_json: bool) -> None:
    """Renew this device's certificate now (EST simplereenroll, authenticated with the current certificate; a
    new key is made here). The current files stay until the new ones are complete."""
    from .enrolee import Enrolee, EnroleeConfig
    host, port = _hostport(mef_addr)
    try:
        held_files = (cert_dir / "cert.pem", cert_dir / "key.pem", cert_dir / "ca.pem")
        e = Enrolee(EnroleeConfig(mef_host=host, mef_port=port, mef_fqdn=mef_fqdn.lower(), node_id="",
                                  store_path=cert_dir / "unused", cert_file=held_files[0], key_file=held_files[1],
                                  trust_anchor_file=held_files[2], certificate_dir=cert_dir))
        held = e.renew_certificate()
    except RspfError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(held.summary(), indent=2))
    else:
        click.echo(f"renewed the certificate of {held.subject}: until {held.not_after.isoformat()} ({held.cert_file})")


@main.command("show-enrolment")
@_with(enrolee_options)
@_with(certificate_options)
def show_enrolment(mef_addr: str, mef_fqdn: str, kpm_id: str | None, kpm_file: Path | None, store_path: Path,
                   cert_file: Path | None, key_file: Path | None, ca_file: Path | None) -> None:
    """Print the stored enrolment with its keys redacted."""
    e = _enrolee(mef_addr, mef_fqdn, kpm_id, kpm_file, store_path, cert_file=cert_file, key_file=key_file,
                 ca_file=ca_file)
    try:
        enrolment = e.load()
    except RspfError as exc:
        _fail(exc)
    if enrolment is None:
        _fail(ConfigError(f"{store_path} holds no enrolment"))
    click.echo(json.dumps(enrolment.summary(), indent=2))


# ------------------------------------------------------------------------------------ Enrolment Target
@main.command("fetch-credentials")
@click.option("--mef", "mef_addr", required=True, help="MEF address HOST:PORT.")
@click.option("--mef-fqdn", required=True)
@click.option("--psk-identity", required=True, help="This Target's credential identity at the MEF.")
@click.option("--psk-file", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--origin", required=True, help="This Target's CSE-ID (X-M2M-Origin), e.g. /id-in.")
@click.option("--key-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the fetched key here (hex, 0600). It is never printed.")
@click.argument("ke_id")
@click.argument("suid", type=int)
def fetch_credentials(mef_addr: str, mef_fqdn: str, psk_identity: str, psk_file: Path, origin: str,
                      key_out: Path | None, ke_id: str, suid: int) -> None:
    """As an Enrolment Target, fetch the usage-constrained key for KE_ID and SUID from the MEF."""
    from .fileutil import read_key_file, write_private
    from .target import fetch_credentials as fetch
    host, port = _hostport(mef_addr)
    try:
        result = fetch(host, port, mef_fqdn, psk_identity, read_key_file(psk_file, "Target PSK file"), origin,
                       ke_id, suid)
    except RspfError as exc:
        _fail(exc)
    if key_out:
        write_private(key_out, result.key.reveal().hex().encode() + b"\n")
    click.echo(json.dumps({"enroleeID": result.enrolee_id, "lifetime": result.lifetime,
                           "keyWrittenTo": str(key_out) if key_out else None}, indent=2))


# ------------------------------------------------------------------------------------------------- AE
@main.group()
def ae() -> None:
    """Use a provisioned credential as an AE."""


def _device_settings(f: Any) -> Any:
    """``-c/--config`` (a device file) and the RSPF_* environment variables of ``rspf ae register``
    (rspf.device.KEYS): the command line wins over the environment, which wins over the file."""
    from .device import BY_PARAM

    def read_file(ctx: click.Context, param: click.Parameter, value: Path | None) -> None:
        if value is None:
            return
        from .device import load as load_device
        try:
            ctx.default_map = {**(ctx.default_map or {}), **load_device(value)}
        except RspfError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None

    for p in getattr(f, "__click_params__", []):
        if p.name in BY_PARAM:
            p.envvar, p.show_envvar = BY_PARAM[p.name].envvar, True
    return click.option("-c", "--config", type=click.Path(dir_okay=False, path_type=Path), envvar="RSPF_AE_CONFIG",
                        show_envvar=True, is_eager=True, expose_value=False, callback=read_file,
                        help="Device configuration file (TOML, an [ae] table; docs/enrolee.md): its keys are "
                             "this command's options; an option or RSPF_* variable given wins.")(f)


@ae.command("register")
@_device_settings
@_with(_enrolee_options(required=False))
@click.option("--node-id", default=None, help="This device's M2M-Node-ID (TLS-PSK mode).")
@click.option("--cert", "cert_file", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Mutual TLS: this AE's certificate chain (PEM) instead of enrolling with the MEF.")
@click.option("--key", "key_file", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Mutual TLS: the certificate's private key (PEM).")
@click.option("--ca", "ca_file", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Mutual TLS: the trust anchor (PEM) the registrar's certificate must chain to.")
@click.option("--registrar", "registrar_uri", default=None,
              help="Mutual TLS: the registrar's CSEBase URI, https://HOST:PORT/<CSEBase>.")
@click.option("--registrar-name", default=None,
              help="Mutual TLS: what the registrar's certificate must name: its CSE-ID (/id-in, as a subjectAltName "
                   "URI //sp/id-in), a DNS name or an IP address (default: the host of --registrar).")
@click.option("--ae-id", default=None, help="Mutual TLS: the AE-ID (default: the one the certificate names).")
@click.option("--app-id", required=True, help="App-ID (api), e.g. Nmy-app.")
@click.option("--rn", default=None, help="Resource name of the <AE> (default: the AE-ID).")
@click.option("--container", default=None, help="Also create this <container> under the AE and retrieve it.")
@click.option("--renew-before", default=86400, show_default=True, type=click.IntRange(0))
@click.option("--json", "as_json", is_flag=True)
def ae_register(mef_addr: str | None, mef_fqdn: str | None, kpm_id: str | None, kpm_file: Path | None,
                store_path: Path | None, node_id: str | None, cert_file: Path | None, key_file: Path | None,
                ca_file: Path | None, registrar_uri: str | None, registrar_name: str | None, ae_id: str | None,
                app_id: str, rn: str | None, container: str | None, renew_before: int, as_json: bool) -> None:
    """Register an AE with its registrar CSE and (optionally) create and read a <container>.

    Idempotent: when this AE is already registered there with this App-ID (and the container exists), it says
    so and exits 0. Settings may come from a device file (-c) and RSPF_* variables instead of options.

    TLS-PSK (the default): enrol with the MEF (or reuse the stored enrolment), then connect to the registrar
    the securityProfile names. Mutual TLS (--cert, --key, --ca, --registrar): present a certificate; the
    registrar must prove a certificate from --ca that names --registrar-name. Nothing is sent to a registrar
    that did not prove who it is.
    """
    from .ae import SecureAE
    psk_opts = {"--mef": mef_addr, "--mef-fqdn": mef_fqdn, "--kpm-id": kpm_id, "--kpm-file": kpm_file,
                "--store": store_path, "--node-id": node_id}
    cert_opts = {"--cert": cert_file, "--key": key_file, "--ca": ca_file, "--registrar": registrar_uri}
    cert_only = {"--registrar-name": registrar_name, "--ae-id": ae_id}
    out: dict[str, Any] = {}
    if any(v is not None for v in (*cert_opts.values(), *cert_only.values())):
        _require(cert_opts, "mutual TLS needs")
        given = [k for k, v in psk_opts.items() if v is not None]
        if given:
            raise click.UsageError(f"{', '.join(given)} enrol with the MEF for TLS-PSK; leave them out with --cert")
        from .tls import CertClient
        try:
            secure = SecureAE.with_certificate(str(registrar_uri), CertClient(str(ca_file), str(cert_file),
                                               str(key_file)), ae_id=ae_id, expected_peer=registrar_name)
        except RspfError as exc:
            _fail(exc)
    else:
        _require(psk_opts, "TLS-PSK needs (or give --cert, --key, --ca and --registrar for mutual TLS)")
        assert mef_addr and mef_fqdn and kpm_id and kpm_file and store_path and node_id
        e = _enrolee(mef_addr, mef_fqdn, kpm_id, kpm_file, store_path, node_id, renew_before_seconds=renew_before)
        try:
            enrolment, renewed = e.ensure()
            secure = SecureAE.from_enrolment(enrolment)
        except RspfError as exc:
            _fail(exc)
        out["enrolment"] = {"enrolled": renewed, "keID": enrolment.ke_id, "aeID": enrolment.enrolee_id,
                            "registrar": enrolment.profile["registrar"]["cseBaseURI"]}
        if not as_json:
            click.echo(f"{'enrolled' if renewed else 'stored enrolment still valid'}: AE-ID {enrolment.enrolee_id}, "
                       f"KeID {enrolment.ke_id}")
    try:
        with secure.session() as cse:
            resource, created = cse.ensure_registered(app_id, rn)
            out["ae"] = resource.get("m2m:ae", resource)
            out["registered"] = created
            if not as_json:
                click.echo(f"{'registered' if created else 'already registered:'} <AE> {out['ae'].get('rn')} "
                           f"(aei {out['ae'].get('aei')}) at {secure.host}:{secure.port}{secure.csebase} over "
                           f"{secure.security}")
            if container:
                ae_rn = out["ae"].get("rn")
                made = cse.ensure_container(container, ae_rn)
                got = cse.retrieve(f"{ae_rn}/{container}")
                out["container"] = got.get("m2m:cnt", got)
                if not as_json:
                    ri = out["container"].get("ri")
                    click.echo(f"{'created and retrieved' if made else 'retrieved the existing'} <container> "
                               f"{ae_rn}/{container} (ri {ri})")
    except RspfError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(out, indent=2))


def _require(options: dict[str, Any], what: str) -> None:
    missing = [k for k, v in options.items() if v is None]
    if missing:
        raise click.UsageError(f"{what} {', '.join(missing)}")


# ------------------------------------------------------------------------------------------ ACME plugin
@main.group()
def acme() -> None:
    """Set up an ACME CSE with the SEC CSF plugin: 'init' a new base directory, or 'install' into one."""


def _rspf_key_options(f: Any) -> Any:
    """One option per [rspf] key (rspf.acme.config.KEYS: the one home of their defaults): absent options keep
    the default written in the section."""
    from .acme.config import KEYS
    for key in reversed(KEYS):
        if key.name == "enable":
            continue
        shown = f" [default: {key.default}]" if key.default else ""
        f = click.option(key.cli, key.name, default=None,
                         help=f"[rspf] {key.name}: {key.doc}{shown}")(f)
    return f


def _rspf_values(options: dict[str, Any]) -> dict[str, str]:
    from .acme.config import BY_NAME
    return {name: BY_NAME[name].ini_value(v) for name, v in options.items() if name in BY_NAME and v is not None}


def _print_done(done: list[str]) -> None:
    for d in done:
        click.echo(d)


_BASICS_HELP = "[basic.config] (ACME's own setting; default: %s)."


def _acme_basics_options(f: Any) -> Any:
    from .acme.install import AcmeBasics
    d = AcmeBasics()
    options = [
        click.option("--cse-type", default=d.cse_type, type=click.Choice(AcmeBasics.CSE_TYPES),
                     help="cseType " + _BASICS_HELP % d.cse_type),
        click.option("--cse-id", default=d.cse_id, help="cseID, an SP-relative CSE-ID " + _BASICS_HELP % d.cse_id),
        click.option("--cse-name", default=d.cse_name, help="cseName, the CSEBase's name " + _BASICS_HELP % d.cse_name),
        click.option("--sp-id", default=d.sp_id, help="serviceProviderID " + _BASICS_HELP % d.sp_id),
        click.option("--admin-id", default=d.admin_id, help="adminID " + _BASICS_HELP % d.admin_id),
        click.option("--http-listen", default=d.http_listen,
                     help="networkInterface of the plain HTTP port " + _BASICS_HELP % d.http_listen),
        click.option("--http-port", default=d.http_port, type=click.IntRange(1, 65535),
                     help="httpPort, ACME's plain HTTP port " + _BASICS_HELP % d.http_port),
        click.option("--database", default=d.database, type=click.Choice(AcmeBasics.DATABASES),
                     help="databaseType (tinydb: files in BASE_DIR/data) " + _BASICS_HELP % d.database),
        click.option("--log-level", default=d.log_level, type=click.Choice(AcmeBasics.LOG_LEVELS),
                     help="logLevel (logs in BASE_DIR/logs) " + _BASICS_HELP % d.log_level),
    ]
    for o in reversed(options):
        f = o(f)
    return f


base_dir_option = click.option("--base-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
                               help="ACME base directory (holds acme.ini, plugins/, data/ and logs/).")


@acme.command("init")
@base_dir_option
@_acme_basics_options
@_rspf_key_options
def acme_init(base_dir: Path, cse_type: str, cse_id: str, cse_name: str, sp_id: str, admin_id: str,
              http_listen: str, http_port: int, database: str, log_level: str, **options: Any) -> None:
    """Make BASE_DIR a complete ACME base directory with the plugin: a headless acme.ini (ACME's settings and
    the [rspf] section) and the plugin loader in BASE_DIR/plugins/. Prints the command that starts the CSE.

    Relative key files (--kpm-file, --mef-psk-file, ...) are relative to BASE_DIR; they must exist."""
    from .acme.install import AcmeBasics, init
    basics = AcmeBasics(cse_type=cse_type, cse_id=cse_id, cse_name=cse_name, sp_id=sp_id, admin_id=admin_id,
                        http_listen=http_listen, http_port=http_port, database=database, log_level=log_level)
    try:
        _print_done(init(base_dir, basics, _rspf_values(options)))
    except RspfError as exc:
        _fail(exc)


@acme.command("install")
@base_dir_option
@click.option("--force", is_flag=True, help="Replace an existing [rspf] section (the old acme.ini is kept).")
@_rspf_key_options
def acme_install(base_dir: Path, force: bool, **options: Any) -> None:
    """Add the plugin to the existing BASE_DIR/acme.ini: its [rspf] section and the loader in BASE_DIR/plugins/.

    Relative key files (--kpm-file, --mef-psk-file, ...) are relative to BASE_DIR; they must exist."""
    from .acme.install import install
    try:
        _print_done(install(base_dir, _rspf_values(options), force=force))
    except RspfError as exc:
        _fail(exc)


@main.command()
@click.option("--workdir", default="run/demo", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where the deployment's files and logs go (replaced on each run).")
def demo(workdir: Path) -> None:
    """Run a complete local deployment on loopback: MEF + ACME CSE with the plugin + an AE."""
    from .demo import main as run_demo
    try:
        sys.exit(run_demo(workdir))
    except RuntimeError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
