"""The [rspf] section of acme.ini (rspf.acme.config.load) and `rspf acme install` (rspf.acme.install).

Pure configuration handling: no ACME process is started here (integration/test_acme_*.py do that).
"""

from __future__ import annotations

import configparser
import dataclasses
from pathlib import Path

import pytest

from rspf.acme.config import load
from rspf.acme.install import SHIM_NAME, install
from rspf.errors import ConfigError
from rspf.httpserver import ServerLimits


@pytest.fixture()
def base(tmp_path: Path) -> Path:
    (tmp_path / "kpm.hex").write_text("00" * 32)
    (tmp_path / "kpm.hex").chmod(0o600)
    return tmp_path


GOOD = {"mefAddress": "127.0.0.1:8443", "mefFQDN": "mef.example.com", "kpmID": "mn1@mef.example.com",
        "kpmFile": "kpm.hex", "nodeID": "urn:dev:ops:1", "securePort": "8444"}


def parse(base: Path, **values: str | None):
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # ACME keeps keys case-sensitive
    section = {k: v for k, v in {**GOOD, **values}.items() if v is not None}
    parser.read_dict({"rspf": section})
    return load(parser, base)


def test_no_section_or_disabled_means_inactive(base: Path) -> None:
    assert load(configparser.ConfigParser(), base) is None
    assert parse(base, enable="false") is None


def test_good_section_with_defaults(base: Path) -> None:
    c = parse(base)
    assert c is not None
    assert (c.mef_host, c.mef_port, c.mef_fqdn) == ("127.0.0.1", 8443, "mef.example.com")
    assert c.enrol and c.kpm_file == base / "kpm.hex" and c.secure_port == 8444
    assert c.profile_store == base / "data" / "rspf-profile.store"
    assert (c.enforcement, c.ssar, c.ssar_shard_size, c.allowed_app_ids) == (True, "rspf-enrolled", 256, ("*",))
    assert (c.plain_port_originators, c.secure_web_ui) == ((), False)
    assert c.fetch_identity == ("mn1@mef.example.com", base / "kpm.hex")


@pytest.mark.parametrize("key,value,needle", [
    ("mefAddress", None, "mefAddress: is required"),
    ("mefAddress", "localhost", "mefAddress: must be HOST:PORT"),
    ("mefAddress", "h:70000", "mefAddress: must be HOST:PORT"),
    ("mefFQDN", "not a fqdn", "mefFQDN"),
    ("kpmFile", "missing.hex", "kpmFile: the file"),
    ("kpmID", None, "kpmID: is required"),
    ("nodeID", None, "nodeID: is required"),
    ("securePort", None, "securePort: is required"),
    ("securePort", "0", "securePort: must be between"),
    ("securePort", "x", "securePort: must be a number"),
    ("enforcement", "maybe", "enforcement: must be off or on"),
    ("plainPortOriginators", "CAdmin, C*", "plainPortOriginators: 'C*' is not an originator"),
    ("plainPortOriginators", "a b", "plainPortOriginators: 'a b' is not an originator"),
    ("secureWebUI", "sometimes", "secureWebUI: must be true or false"),
    ("enrol", "perhaps", "enrol: must be true or false"),
    ("allowedAppIDs", "Xbad", "allowedAppIDs"),
    ("ssar", "bad name!", "ssar: must be a resource name"),
    ("ssarShardSize", "0", "ssarShardSize: must be between"),
    ("startupRetrySeconds", "-1", "startupRetrySeconds"),
    ("mefPskIdentity", "in@sp", "mefPskFile"),
])
def test_bad_value_names_the_key(base: Path, key: str, value: str | None, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(base, **{key: value})
    assert needle in str(err.value) and "[rspf]" in str(err.value)


def test_a_cse_that_does_not_enrol_needs_a_target_credential(base: Path) -> None:
    with pytest.raises(ConfigError, match="mefPskIdentity: is required"):
        parse(base, enrol="false", kpmID=None, kpmFile=None, nodeID=None)
    c = parse(base, enrol="false", kpmID=None, kpmFile=None, nodeID=None, mefPskIdentity="in@sp",
              mefPskFile="kpm.hex")
    assert c is not None and c.fetch_identity == ("in@sp", base / "kpm.hex")


def test_certificate_files_go_together(base: Path) -> None:
    (base / "c.pem").write_text("x")
    with pytest.raises(ConfigError, match="certFile"):
        parse(base, certFile="c.pem")


INSTALL = dict(mef="127.0.0.1:8443", mef_fqdn="mef.example.com", enrol=True, kpm_id="mn1@mef.example.com",
               kpm_file="kpm.hex", node_id="urn:dev:ops:1", mef_psk_identity=None, mef_psk_file=None,
               secure_listen="127.0.0.1", secure_port=8444, enforcement=True, ssar="rspf-enrolled",
               create_subscription=True, allowed_app_ids="Nsensor*", secure_registrar=True)


def test_install_writes_loader_and_a_section_that_loads(base: Path) -> None:
    (base / "acme.ini").write_text("[basic.config]\ncseType=MN\n")
    done = install(base, **INSTALL)
    assert (base / "plugins" / SHIM_NAME).read_text().count("from rspf.acme.plugin import RspfSecurityPlugin") == 1
    assert (base / "acme.ini.before-rspf").read_text() == "[basic.config]\ncseType=MN\n"
    assert any("acme.ini" in d for d in done)
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(base / "acme.ini")
    assert parser["basic.config"]["cseType"] == "MN"  # the operator's settings are kept
    c = load(parser, base)
    assert c is not None and c.enforcement and c.allowed_app_ids == ("Nsensor*",) and c.secure_port == 8444


def test_install_refuses_an_existing_section_unless_forced(base: Path) -> None:
    install(base, **INSTALL)
    before = (base / "acme.ini").read_text()
    with pytest.raises(ConfigError, match="already has an \\[rspf\\] section"):
        install(base, **{**INSTALL, "secure_port": 9999})
    assert (base / "acme.ini").read_text() == before  # nothing changed
    install(base, **{**INSTALL, "secure_port": 9999}, force=True)
    text = (base / "acme.ini").read_text()
    assert text.count("[rspf]") == 1 and "securePort=9999" in text
    assert (base / "acme.ini.before-rspf").read_text() == before


def test_install_checks_its_inputs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        install(tmp_path / "missing", **INSTALL)
    with pytest.raises(ConfigError, match="--kpm-id"):
        install(tmp_path, **{**INSTALL, "kpm_id": None})
    with pytest.raises(ConfigError, match="--mef-psk-identity"):
        install(tmp_path, **{**INSTALL, "enrol": False})
    assert not (tmp_path / "acme.ini").exists() and not (tmp_path / "plugins").exists()


def test_plain_port_originators_and_web_ui_keys(base: Path) -> None:
    c = parse(base, plainPortOriginators="CAdmin, /id-ops", secureWebUI="true", enforcement="off")
    assert c is not None and c.plain_port_originators == ("CAdmin", "/id-ops") and c.secure_web_ui
    assert not c.enforcement


def test_install_defaults_to_enforcement_on(base: Path) -> None:
    options = {k: v for k, v in INSTALL.items() if k != "enforcement"}
    install(base, **options)
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(base / "acme.ini")
    assert parser["rspf"]["enforcement"] == "on" and parser["rspf"]["plainPortOriginators"] == ""
    c = load(parser, base)
    assert c is not None and c.enforcement and c.plain_port_originators == ()


def test_cli_install_defaults_to_enforcement_on(base: Path) -> None:
    from click.testing import CliRunner

    from rspf.cli import main

    r = CliRunner().invoke(main, ["acme", "install", "--base-dir", str(base), "--mef", "127.0.0.1:8443",
                                  "--mef-fqdn", "mef.example.com", "--kpm-id", "mn1@mef.example.com",
                                  "--kpm-file", "kpm.hex", "--node-id", "urn:dev:ops:1", "--secure-port", "8444"])
    assert r.exit_code == 0, r.output
    assert "\nenforcement=on\n" in (base / "acme.ini").read_text()


# --------------------------------------------------------------------- the secure listener's transport limits
LIMIT_KEYS = {"handshakeTimeout": "handshake_timeout", "requestTimeout": "request_timeout",
              "idleTimeout": "idle_timeout", "maxConnections": "max_connections",
              "maxConnectionsPerSource": "max_per_source", "maxBodyBytes": "max_body", "workers": "workers"}


def test_absent_limit_keys_are_the_transport_defaults(base: Path) -> None:
    c = parse(base)
    assert c is not None and c.limits == ServerLimits()


def test_limit_keys_set_the_listener_limits(base: Path) -> None:
    c = parse(base, handshakeTimeout="2.5", requestTimeout="12", idleTimeout="7", maxConnections="500",
              maxConnectionsPerSource="20", maxBodyBytes="65536", workers="4")
    assert c is not None
    assert c.limits == dataclasses.replace(ServerLimits(), handshake_timeout=2.5, request_timeout=12.0,
                                           idle_timeout=7.0, max_connections=500, max_per_source=20,
                                           max_body=65536, workers=4)
    assert isinstance(c.limits.max_body, int) and isinstance(c.limits.request_timeout, float)


def test_one_limit_key_changes_only_its_limit(base: Path) -> None:
    for key, field in LIMIT_KEYS.items():
        value = {"maxBodyBytes": "3000", "maxConnections": "1000"}.get(key, "3")
        c = parse(base, **{key: value})
        assert c is not None
        changed = {f for f in LIMIT_KEYS.values() if getattr(c.limits, f) != getattr(ServerLimits(), f)}
        assert changed == {field}, key


@pytest.mark.parametrize("key,value,needle", [
    ("handshakeTimeout", "0", "must be between 0.1 and 3600"),
    ("handshakeTimeout", "-5", "must be between"),
    ("handshakeTimeout", "ten", "must be a number, not 'ten'"),
    ("handshakeTimeout", "nan", "must be between"),
    ("requestTimeout", "inf", "must be between"),
    ("requestTimeout", "3601", "must be between"),
    ("idleTimeout", "0", "must be between"),
    ("maxConnections", "0", "must be between 1 and 100000"),
    ("maxConnections", "100001", "must be between"),
    ("maxConnections", "1.5", "must be a number"),
    ("maxConnectionsPerSource", "0", "must be between"),
    ("maxBodyBytes", "100", "must be between 1024 and"),
    ("maxBodyBytes", "4M", "must be a number"),
    ("workers", "0", "must be between 1 and 256"),
    ("workers", "257", "must be between"),
])
def test_a_bad_limit_stops_start_up_naming_the_key_and_the_file(base: Path, key: str, value: str,
                                                                needle: str) -> None:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_dict({"rspf": {**GOOD, key: value}})
    with pytest.raises(ConfigError) as err:
        load(parser, base, "/etc/acme/acme.ini")
    assert str(err.value).startswith(f"/etc/acme/acme.ini [rspf] {key}: ") and needle in str(err.value)


def test_per_source_connections_cannot_exceed_all_connections(base: Path) -> None:
    with pytest.raises(ConfigError, match=r"acme\.ini \[rspf\] maxConnectionsPerSource: must not be above "
                                          r"maxConnections \(100\)"):
        parse(base, maxConnections="100", maxConnectionsPerSource="101")
    c = parse(base, maxConnections="100", maxConnectionsPerSource="100")
    assert c is not None and c.limits.max_per_source == c.limits.max_connections == 100
    c = parse(base, maxConnections="100")  # the per-source default (256) shrinks to the total
    assert c is not None and c.limits.max_per_source == 100 < ServerLimits().max_per_source
