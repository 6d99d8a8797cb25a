"""The device configuration of ``rspf ae register``: a TOML file and ``RSPF_*`` environment variables.

A device (an AE) keeps its settings in one file instead of repeating eight options on every run::

    [ae]
    mef = "mef.example.com:8443"
    mef_fqdn = "mef.example.com"
    kpm_id = "dev1@mef.example.com"
    kpm_file = "dev1.kpm"          # relative paths: relative to this file
    node_id = "urn:dev:ops:001"
    store = "dev1.store"
    app_id = "Nsensor-app"

Every key of :data:`KEYS` is also an environment variable (``RSPF_`` + the key in upper case, e.g.
``RSPF_KPM_FILE``) and an option of ``rspf ae register`` (``--kpm-file``). An option given on the command line
wins over the environment, which wins over the file. Key material never goes into the file or the environment:
``kpm_file`` names the 0600 file that holds Kpm.
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

TABLE = "ae"
ENV_PREFIX = "RSPF_"


@dataclass(frozen=True)
class DeviceKey:
    name: str  #: in the TOML file; the option is ``--`` + name with dashes, the variable RSPF_ + NAME
    param: str  #: the parameter of ``rspf ae register`` it sets
    kind: type = str  #: str, int, or Path (a relative path in the file is relative to the file)

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def envvar(self) -> str:
        return ENV_PREFIX + self.name.upper()


KEYS: tuple[DeviceKey, ...] = (
    DeviceKey("mef", "mef_addr"),
    DeviceKey("mef_fqdn", "mef_fqdn"),
    DeviceKey("kpm_id", "kpm_id"),
    DeviceKey("kpm_file", "kpm_file", Path),
    DeviceKey("store", "store_path", Path),
    DeviceKey("node_id", "node_id"),
    DeviceKey("app_id", "app_id"),
    DeviceKey("rn", "rn"),
    DeviceKey("container", "container"),
    DeviceKey("renew_before", "renew_before", int),
    DeviceKey("cert", "cert_file", Path),
    DeviceKey("key", "key_file", Path),
    DeviceKey("ca", "ca_file", Path),
    DeviceKey("registrar", "registrar_uri"),
    DeviceKey("registrar_name", "registrar_name"),
    DeviceKey("ae_id", "ae_id"),
)
BY_NAME = {k.name: k for k in KEYS}
BY_PARAM = {k.param: k for k in KEYS}
_SECRETS = ("kpm", "psk", "ke", "registrar_key")


def load(path: Path) -> dict[str, Any]:
    """The file's settings by parameter name of ``rspf ae register`` (paths resolved against the file's folder).
    A missing file, bad TOML, an unknown key or a value of the wrong type raises ConfigError naming the file and
    the key."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the device configuration ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    extra = sorted(set(data) - {TABLE})
    if extra:
        raise ConfigError(f"{path}: unknown table or key {extra[0]!r}; the settings go in a [{TABLE}] table")
    table = data.get(TABLE, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: {TABLE} must be a table ([{TABLE}])")
    out: dict[str, Any] = {}
    for name, value in table.items():
        key = BY_NAME.get(name)
        if key is None:
            if name.lower() in _SECRETS:
                raise ConfigError(f"{path} [{TABLE}] {name}: key material never goes into this file; kpm_file "
                                  "names the 0600 file that holds Kpm")
            near = difflib.get_close_matches(name.lower(), list(BY_NAME), n=1, cutoff=0.7)
            hint = f"; did you mean {near[0]}?" if near else f" (the keys: {', '.join(BY_NAME)})"
            raise ConfigError(f"{path} [{TABLE}] {name}: unknown key{hint}")
        expected = int if key.kind is int else str
        if not isinstance(value, expected) or isinstance(value, bool):
            raise ConfigError(f"{path} [{TABLE}] {name}: must be {'an integer' if expected is int else 'a string'}, "
                              f"not {value!r}")
        if key.kind is Path:
            p = Path(str(value))
            value = p if p.is_absolute() else path.parent / p
        out[key.param] = value
    return out
