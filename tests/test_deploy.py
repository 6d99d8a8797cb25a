"""docs/systemd/: the example units are hardened, run the commands this project documents, and verify."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rspf.acme.config import BY_NAME
from rspf.acme.install import START_ARGS

DOCS = Path(__file__).resolve().parent.parent / "docs"
UNITS = {"rspf-mef.service": "rspf-mef", "acme-cse.service": "acme"}
VENV_BIN = "/opt/onem2m-rspf/.venv/bin"
HARDENING = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
             "PrivateDevices": "yes", "UMask": "0077", "CapabilityBoundingSet": "", "RestrictSUIDSGID": "yes"}


def service(name: str) -> dict[str, list[str]]:
    """The [Service] section; a key may repeat (systemd appends), so every value is kept."""
    values: dict[str, list[str]] = {}
    section = ""
    for raw in (DOCS / "systemd" / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


@pytest.mark.parametrize("name", UNITS)
def test_units_are_hardened(name: str) -> None:
    s = service(name)
    assert s["User"] == [UNITS[name]] and s["Group"] == [UNITS[name]]
    for key, value in HARDENING.items():
        assert s.get(key) == [value], f"{name}: {key}={value} is missing"
    assert s["ReadWritePaths"] and s["KillSignal"] == ["SIGTERM"]
    assert f"(systemd/{name})" in (DOCS / "deploy.md").read_text()  # linked from the deployment guide


def test_the_mef_unit_serves_the_config_in_its_writable_state_directory() -> None:
    from click.testing import CliRunner

    from rspf.cli import main

    s = service("rspf-mef.service")
    argv = shlex.split(s["ExecStart"][0])
    assert argv[0] == f"{VENV_BIN}/rspf" and argv[1:4] == ["mef", "serve", "-c"]
    state = Path(argv[4]).parent
    assert s["ReadWritePaths"] == [str(state)] and s["StateDirectory"] == [state.name]
    # the arguments are the CLI's (a typo in the unit would stop the service at every start)
    r = CliRunner().invoke(main, [*argv[1:], "--help"])
    assert r.exit_code == 0 and "Run the MEF" in r.output


def test_the_cse_unit_runs_what_acme_init_prints_and_writes_where_acme_and_the_plugin_write() -> None:
    s = service("acme-cse.service")
    argv = shlex.split(s["ExecStart"][0])
    assert argv[0] == f"{VENV_BIN}/acmecse" and tuple(argv[1:3]) == START_ARGS
    base = Path(argv[3])
    assert s["WorkingDirectory"] == [str(base)]
    writable = {Path(p) for p in s["ReadWritePaths"][0].split()}
    assert writable == {base / "data", base / "logs"}
    assert (base / BY_NAME["profileStore"].default).parent in writable  # the plugin's securityProfile store


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_systemd_verifies_the_units(tmp_path: Path) -> None:
    """``systemd-analyze verify`` with the commands pointed at this venv (the documented /opt path is absent)."""
    here = str(Path(sys.executable).parent)
    for name in UNITS:
        text = (DOCS / "systemd" / name).read_text().replace(VENV_BIN, here)
        (tmp_path / name).write_text(text)
    p = subprocess.run(["systemd-analyze", "verify", "--man=no", *(str(tmp_path / n) for n in UNITS)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and not p.stderr.strip(), p.stderr
    for name in UNITS:
        p = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=20",  # exposure 2.0 (tenths)
                            str(tmp_path / name)], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr


def test_the_units_parse_as_ini() -> None:
    for name in UNITS:
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read(DOCS / "systemd" / name)
        assert parser.sections() == ["Unit", "Service", "Install"]
