"""``rspf acme init`` and ``rspf acme install``: an ACME base directory with the plugin.

* :func:`init` makes a complete one: a headless ``acme.ini`` for ACME (its ``[basic.config]`` and the few
  settings a service needs) with the ``[rspf]`` section, and the plugin loader in ``plugins/``;
* :func:`install` adds the ``[rspf]`` section and the loader to an ``acme.ini`` the operator already has.

The section is rendered from :data:`rspf.acme.config.KEYS` and checked with :func:`rspf.acme.config.load`
before anything is written: what these functions write is a configuration the plugin starts with.
"""

from __future__ import annotations

import configparser
import os
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path

from .. import ids
from ..errors import ConfigError
from .config import KEYS, SECTION, load

SHIM_NAME = "RspfSecurity.py"
SHIM = '''\
# Loader for the onem2m-rspf SEC CSF plugin (written by `rspf acme init` / `rspf acme install`).
# ACME loads every *.py in this folder; the plugin itself lives in the installed `onem2m-rspf` package.
from rspf.acme.plugin import RspfSecurityPlugin  # noqa: F401
'''

#: ``acmecse`` with these arguments runs the CSE of a base directory written here (the docs print it too)
START_ARGS = ("--headless", "-dir")


def start_command(base_dir: Path) -> str:
    return f"acmecse {' '.join(START_ARGS)} {base_dir}"


@dataclass(frozen=True)
class AcmeBasics:
    """What ``rspf acme init`` writes for ACME itself (ACME's other settings keep its own defaults).

    With ``enrol = true`` the securityProfile's CSE-ID, SP-ID and registrar replace these at start-up."""

    cse_type: str = "IN"
    cse_id: str = "/id-in"
    cse_name: str = "cse-in"
    sp_id: str = "//sp.example.com"
    admin_id: str = "CAdmin"
    http_listen: str = "127.0.0.1"
    http_port: int = 8080
    database: str = "tinydb"
    log_level: str = "info"

    CSE_TYPES = ("IN", "MN", "ASN")
    DATABASES = ("tinydb", "memory")
    LOG_LEVELS = ("debug", "info", "warning", "error", "off")

    def check(self) -> None:
        def bad(option: str, why: str) -> ConfigError:
            return ConfigError(f"{option}: {why}")

        if self.cse_type not in self.CSE_TYPES:
            raise bad("--cse-type", f"must be one of {', '.join(self.CSE_TYPES)}")
        if not ids.is_cse_id(self.cse_id):
            raise bad("--cse-id", f"{self.cse_id!r} is not an SP-relative CSE-ID such as /id-in")
        if not ids.RESOURCE_NAME_RE.fullmatch(self.cse_name):
            raise bad("--cse-name", f"{self.cse_name!r} is not a resource name")
        if not ids.SP_ID_RE.fullmatch(self.sp_id):
            raise bad("--sp-id", f"{self.sp_id!r} is not an M2M-SP-ID such as //sp.example.com")
        if not ids.RESOURCE_NAME_RE.fullmatch(self.admin_id):
            raise bad("--admin-id", f"{self.admin_id!r} is not an originator such as CAdmin")
        if not 0 < self.http_port < 65536:
            raise bad("--http-port", "must be between 1 and 65535")
        if self.database not in self.DATABASES:
            raise bad("--database", f"must be one of {', '.join(self.DATABASES)}")
        if self.log_level not in self.LOG_LEVELS:
            raise bad("--log-level", f"must be one of {', '.join(self.LOG_LEVELS)}")

    def render(self, base_dir: Path) -> str:
        host = self.http_listen if self.http_listen not in ("0.0.0.0", "::") else "127.0.0.1"
        return f"""\
; ACME oneM2M CSE with the onem2m-rspf SEC CSF plugin, written by `rspf acme init`.
; Start it:  {start_command(base_dir)}
; Every ACME setting not written here keeps ACME's default (acmecse/init/acme.ini.default); [rspf]: see
; docs/acme-plugin.md. Comments go on their own lines (ACME's parser keeps inline comments in values).

[basic.config]
; With enrol=true the securityProfile's CSE-ID, SP-ID and registrar replace cseID and serviceProviderID.
cseType={self.cse_type}
cseID={self.cse_id.lstrip("/")}
cseName={self.cse_name}
serviceProviderID={self.sp_id}
adminID={self.admin_id}
; ACME's plain HTTP port (oneM2M over HTTP without a security association; with enforcement=on only AEs that
; registered without a credential and plainPortOriginators are served there).
networkInterface={self.http_listen}
cseHost={host}
httpPort={self.http_port}
logLevel={self.log_level}
databaseType={self.database}

[textui]
startWithTUI=false

[console]
headless=true

[logging]
enableFileLogging=true

[http]
enableUpperTesterEndpoint=false
"""


def render_section(values: dict[str, str]) -> str:
    """The ``[rspf]`` section: every key of KEYS with its comment; a given value, else the default (keys not
    ``written`` by default stay commented out, showing their default)."""
    out = [f"[{SECTION}]",
           "# onem2m-rspf SEC CSF plugin. Every key: docs/acme-plugin.md. No inline comments (ACME's parser keeps "
           "them)."]
    for key in KEYS:
        out += textwrap.wrap(key.doc, 110, initial_indent="# ", subsequent_indent="# ")
        value = values.get(key.name)
        if value is not None and value != "":
            out.append(f"{key.name}={value}")
        elif key.written:
            out.append(f"{key.name}={key.default}")
        else:
            out.append(f"# {key.name}={key.default}")
    return "\n".join(out) + "\n"


def _check(text: str, base_dir: Path, ini: Path) -> None:
    """Parse ``text`` as ACME would parse ``ini`` and load its [rspf] section: a ConfigError names the key."""
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # ACME keeps keys case-sensitive
    try:
        parser.read_string(text, source=str(ini))
    except configparser.Error as exc:
        raise ConfigError(f"{ini} cannot be parsed: {exc}") from None
    if load(parser, base_dir, str(ini)) is None:
        raise ConfigError(f"{ini} [{SECTION}] enable: false would leave the plugin inactive")


def _write_shim(base_dir: Path) -> str:
    plugins = base_dir / "plugins"
    plugins.mkdir(exist_ok=True)
    (plugins / SHIM_NAME).write_text(SHIM)
    return f"wrote the plugin loader {plugins / SHIM_NAME}"


def init(base_dir: Path, basics: AcmeBasics, values: dict[str, str]) -> list[str]:
    """Write a complete ``acme.ini`` (ACME's settings and [rspf]) and the loader; returns what was done.
    ``base_dir`` is created if missing; an existing ``acme.ini`` is never touched."""
    base_dir = Path(base_dir)
    ini = base_dir / "acme.ini"
    if ini.exists():
        raise ConfigError(f"{ini} already exists; 'rspf acme install' adds the plugin to an existing acme.ini")
    if base_dir.exists() and not base_dir.is_dir():
        raise ConfigError(f"{base_dir} is not a directory")
    basics.check()
    text = basics.render(base_dir) + "\n" + render_section(values)
    _check(text, base_dir, ini)
    base_dir.mkdir(parents=True, exist_ok=True)
    _write_new(ini, text)
    return [f"wrote {ini} (ACME's settings and the [{SECTION}] section)", _write_shim(base_dir),
            f"start the CSE: {start_command(base_dir)}"]


def install(base_dir: Path, values: dict[str, str], *, force: bool = False) -> list[str]:
    """Add the [rspf] section (``values`` by key name, the rest defaults) to ``base_dir/acme.ini`` and write the
    loader; returns what was done. Never loses an existing acme.ini (the previous one is kept as
    ``acme.ini.before-rspf``)."""
    base_dir = Path(base_dir)
    if not base_dir.is_dir():
        raise ConfigError(f"{base_dir} is not a directory (the ACME base directory holding acme.ini)")
    ini = base_dir / "acme.ini"
    if not ini.exists():
        raise ConfigError(f"{ini} does not exist; 'rspf acme init' writes a complete one with the plugin")
    current = ini.read_text()
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read_string(current, source=str(ini))
    except configparser.Error as exc:
        raise ConfigError(f"{ini} cannot be parsed: {exc}") from None
    if parser.has_section(SECTION):
        if not force:
            raise ConfigError(f"{ini} already has an [{SECTION}] section; edit it, or use --force to replace it")
        current = _drop_section(current, SECTION)
    text = current.rstrip("\n") + "\n\n" + render_section(values)
    _check(text, base_dir, ini)
    backup = ini.with_name("acme.ini.before-rspf")
    shutil.copy2(ini, backup)
    ini.write_text(text)
    return [f"saved the previous {ini.name} as {backup.name}", f"wrote the [{SECTION}] section to {ini}",
            _write_shim(base_dir), f"start the CSE: {start_command(base_dir)}"]


def _write_new(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _drop_section(text: str, name: str) -> str:
    out, skipping = [], False
    for raw in text.splitlines(keepends=True):
        stripped = raw.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            skipping = stripped[1:-1].strip() == name
        if not skipping:
            out.append(raw)
    return "".join(out)
