"""The [rspf] section of acme.ini (rspf.acme.config.load) and `rspf acme install` (rspf.acme.install).

Pure configuration handling: no ACME process is started here (integration/test_acme_*.py do that).
"""

from __future__ import annotations

import configparser
import dataclasses
import re
from pathlib import Path

import pytest

from rspf.acme.config import BY_NAME, KEYS, load
from rspf.acme.install import SHIM_NAME, AcmeBasics, init, install
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


def test_disabled_means_inactive(base: Path) -> None:
    assert parse(base, enable="false") is None


def test_no_section_refuses_to_start_naming_the_file(base: Path) -> None:
    parser = configparser.ConfigParser()
    parser.read_dict({"basic.config": {"cseType": "IN"}})
    with pytest.raises(ConfigError) as err:
        load(parser, base, "/srv/acme/acme.ini")
    text = str(err.value)
    assert text.startswith("/srv/acme/acme.ini has no [rspf] section") and "without its protection" in text
    assert "enable=false" in text


@pytest.mark.parametrize("name", ["rpsf", "RSPF", "RSPF ", " rspf", "Rspf", "rspf.limits", "rsp", "rspff", "spf"])
def test_a_section_like_rspf_stops_start_up(base: Path, name: str) -> None:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(f"[{name}]\nmefAddress=127.0.0.1:1\n", source="acme.ini")
    assert parser.sections() == [name]  # configparser keeps the header as written (spaces and case)
    with pytest.raises(ConfigError, match=rf"^/x/acme.ini: the section \[{re.escape(name)}\] is not \[rspf\]"):
        load(parser, base, "/x/acme.ini")
    parser.read_dict({"rspf": GOOD})  # also next to a correct one: which one did the operator mean?
    with pytest.raises(ConfigError, match="is not \\[rspf\\]"):
        load(parser, base, "/x/acme.ini")


def test_acme_own_sections_are_not_taken_for_misspellings(base: Path) -> None:
    import acmecse

    default = Path(acmecse.__file__).parent / "init" / "acme.ini.default"
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(default)
    assert len(parser.sections()) > 30
    parser.read_dict({"rspf": GOOD})
    assert load(parser, base) is not None


@pytest.mark.parametrize("key,hint", [
    ("mefAdress", "; did you mean mefAddress?"),
    ("mefaddress", "; did you mean mefAddress?"),
    ("keycacheseconds", "; did you mean keyCacheSeconds?"),
    ("enforcment", "; did you mean enforcement?"),
    ("allowedAppIds", "; did you mean allowedAppIDs?"),
    ("colour", " (the keys are listed in docs/acme-plugin.md)"),
])
def test_an_unknown_key_stops_start_up_naming_it(base: Path, key: str, hint: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(base, **{key: "x"})
    assert str(err.value) == f"acme.ini [rspf] {key}: unknown key{hint}"


def test_an_unknown_key_stops_start_up_even_when_disabled(base: Path) -> None:
    with pytest.raises(ConfigError, match="enabel: unknown key; did you mean enable"):
        parse(base, enable="false", enabel="true")


def test_environment_variables_in_acme_defaults_neither_set_nor_hide_keys(base: Path) -> None:
    """ACME puts every environment variable into its parser's DEFAULT section."""
    parser = configparser.ConfigParser(interpolation=None, defaults={"enable": "false", "workers": "nonsense",
                                                                     "HOME": "/root"})
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_dict({"rspf": GOOD})
    c = load(parser, base)
    assert c is not None and c.limits.workers == ServerLimits().workers


def test_the_defaults_of_load_are_those_of_keys(base: Path) -> None:
    """KEYS is the one home of the defaults: a section with only the required keys loads to exactly them."""
    c = parse(base)
    assert c is not None
    d = BY_NAME
    assert c.profile_store == base / d["profileStore"].default
    assert (c.renew_before_seconds, c.startup_retry_seconds, c.key_cache_seconds) == (
        int(d["renewBeforeSeconds"].default), float(d["startupRetrySeconds"].default),
        float(d["keyCacheSeconds"].default))
    assert (c.secure_listen, c.ssar) == (d["secureListen"].default, d["ssar"].default)
    assert c.enforcement == (d["enforcement"].default == "on") and c.allowed_app_ids == (d["allowedAppIDs"].default,)
    assert c.limits.workers == int(d["workers"].default) and c.limits.max_body == int(d["maxBodyBytes"].default)


def test_every_key_is_documented() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "acme-plugin.md").read_text()
    missing = [k.name for k in KEYS if f"`{k.name}`" not in doc]
    assert not missing, f"keys without a row in docs/acme-plugin.md: {missing}"


def test_good_section_with_defaults(base: Path) -> None:
    c = parse(base)
    assert c is not None
    assert (c.mef_host, c.mef_port, c.mef_fqdn) == ("127.0.0.1", 8443, "mef.example.com")
    assert c.enrol and c.kpm_file == base / "kpm.hex" and c.secure_port == 8444
    assert c.profile_store == base / "data" / "rspf-profile.store"
    assert (c.enforcement, c.ssar, c.allowed_app_ids) == (True, "rspf-enrolled", ("*",))
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
    ("ssarShardSize", "256", "ssarShardSize: unknown key"),
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


INSTALL = {"mefAddress": "127.0.0.1:8443", "mefFQDN": "mef.example.com", "kpmID": "mn1@mef.example.com",
           "kpmFile": "kpm.hex", "nodeID": "urn:dev:ops:1", "securePort": "8444", "allowedAppIDs": "Nsensor*"}


def read_ini(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


def test_install_writes_loader_and_a_section_that_loads(base: Path) -> None:
    (base / "acme.ini").write_text("[basic.config]\ncseType=MN\n")
    done = install(base, INSTALL)
    assert (base / "plugins" / SHIM_NAME).read_text().count("from rspf.acme.plugin import RspfSecurityPlugin") == 1
    assert (base / "acme.ini.before-rspf").read_text() == "[basic.config]\ncseType=MN\n"
    assert any("acme.ini" in d for d in done) and done[-1] == f"start the CSE: acmecse --headless -dir {base}"
    parser = read_ini(base / "acme.ini")
    assert parser["basic.config"]["cseType"] == "MN"  # the operator's settings are kept
    c = load(parser, base)
    assert c is not None and c.enforcement and c.allowed_app_ids == ("Nsensor*",) and c.secure_port == 8444


def test_install_writes_every_key_with_its_comment(base: Path) -> None:
    (base / "acme.ini").write_text("[basic.config]\ncseType=IN\n")
    install(base, INSTALL)
    text = (base / "acme.ini").read_text()
    for key in KEYS:
        given = INSTALL.get(key.name)
        if given:
            line = f"\n{key.name}={given}\n"
        else:
            line = f"\n{key.name}={key.default}\n" if key.written else f"\n# {key.name}={key.default}\n"
        assert line in text, key.name
    assert "\n# Threads answering requests on the secure listener.\n# workers=16\n" in text


def test_install_refuses_an_existing_section_unless_forced(base: Path) -> None:
    (base / "acme.ini").write_text("[basic.config]\ncseType=IN\n")
    install(base, INSTALL)
    before = (base / "acme.ini").read_text()
    with pytest.raises(ConfigError, match="already has an \\[rspf\\] section"):
        install(base, {**INSTALL, "securePort": "9999"})
    assert (base / "acme.ini").read_text() == before  # nothing changed
    install(base, {**INSTALL, "securePort": "9999"}, force=True)
    text = (base / "acme.ini").read_text()
    assert text.count("[rspf]") == 1 and "securePort=9999" in text
    assert (base / "acme.ini.before-rspf").read_text() == before


@pytest.mark.parametrize("change,needle", [
    ({"kpmID": None}, "[rspf] kpmID: is required"),
    ({"enrol": "false", "kpmID": None}, "[rspf] mefPskIdentity: is required"),
    ({"securePort": None}, "[rspf] securePort: is required"),
    ({"securePort": "x"}, "[rspf] securePort: must be a number"),
    ({"kpmFile": "absent.hex"}, "[rspf] kpmFile: the file"),
    ({"enforcement": "sometimes"}, "[rspf] enforcement: must be off or on"),
])
def test_install_and_init_write_nothing_that_would_not_start(base: Path, change: dict[str, str | None],
                                                              needle: str) -> None:
    values = {k: v for k, v in {**INSTALL, **change}.items() if v is not None}
    (base / "acme.ini").write_text("[basic.config]\ncseType=IN\n")
    with pytest.raises(ConfigError) as err:
        install(base, values)
    assert needle in str(err.value) and str(base / "acme.ini") in str(err.value)
    assert (base / "acme.ini").read_text() == "[basic.config]\ncseType=IN\n"
    assert not (base / "plugins").exists() and not (base / "acme.ini.before-rspf").exists()
    if values.get("kpmFile") == "kpm.hex":  # relative to the new base directory: there it would be absent
        values["kpmFile"] = str(base / "kpm.hex")
    with pytest.raises(ConfigError, match=re.escape(needle)):
        init(base / "new", AcmeBasics(), values)
    assert not (base / "new").exists()


def test_install_needs_an_acme_ini_and_refuses_a_misspelt_section(base: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        install(tmp_path / "missing", INSTALL)
    with pytest.raises(ConfigError, match="acme.ini does not exist; 'rspf acme init' writes"):
        install(base, INSTALL)
    (base / "acme.ini").write_text("[basic.config]\ncseType=IN\n[RSPF]\nmefAddress=x\n")
    with pytest.raises(ConfigError, match="the section \\[RSPF\\] is not \\[rspf\\]"):
        install(base, INSTALL)
    assert not (base / "plugins").exists()


def test_install_defaults_to_enforcement_on(base: Path) -> None:
    (base / "acme.ini").write_text("[basic.config]\ncseType=IN\n")
    install(base, INSTALL)
    parser = read_ini(base / "acme.ini")
    assert parser["rspf"]["enforcement"] == "on" and parser["rspf"]["plainPortOriginators"] == ""
    c = load(parser, base)
    assert c is not None and c.enforcement and c.plain_port_originators == ()


def test_cli_install_defaults_to_enforcement_on(base: Path) -> None:
    from click.testing import CliRunner

    from rspf.cli import main

    (base / "acme.ini").write_text("[basic.config]\ncseType=IN\n")
    r = CliRunner().invoke(main, ["acme", "install", "--base-dir", str(base), "--mef", "127.0.0.1:8443",
                                  "--mef-fqdn", "mef.example.com", "--kpm-id", "mn1@mef.example.com",
                                  "--kpm-file", "kpm.hex", "--node-id", "urn:dev:ops:1", "--secure-port", "8444"])
    assert r.exit_code == 0, r.output
    assert "\nenforcement=on\n" in (base / "acme.ini").read_text()


def test_cli_flags_and_values_reach_the_section(base: Path) -> None:
    from click.testing import CliRunner

    from rspf.cli import main

    (base / "acme.ini").write_text("[basic.config]\ncseType=IN\n")
    r = CliRunner().invoke(main, ["acme", "install", "--base-dir", str(base), "--mef", "127.0.0.1:8443",
                                  "--mef-fqdn", "mef.example.com", "--no-enrol", "--mef-psk-identity", "in@sp",
                                  "--mef-psk-file", "kpm.hex", "--secure-port", "8444", "--no-enforcement",
                                  "--plain-registrar", "--no-create-subscription", "--workers", "4",
                                  "--plain-port-originators", "CAdmin"])
    assert r.exit_code == 0, r.output
    c = load(read_ini(base / "acme.ini"), base)
    assert c is not None and not (c.enrol or c.enforcement or c.secure_registrar or c.create_subscription)
    assert c.limits.workers == 4 and c.plain_port_originators == ("CAdmin",) and c.mef_psk_identity == "in@sp"
    r = CliRunner().invoke(main, ["acme", "install", "--base-dir", str(base), "--force", "--mef", "127.0.0.1:8443",
                                  "--mef-fqdn", "mef.example.com", "--no-enrol", "--mef-psk-identity", "in@sp",
                                  "--mef-psk-file", "kpm.hex", "--secure-port", "8444", "--workers", "0"])
    assert r.exit_code == 2 and "[rspf] workers: must be between 1 and 256" in r.output


# ------------------------------------------------------------------------------------------ rspf acme init
def test_init_writes_a_complete_acme_ini(base: Path) -> None:
    done = init(base / "acme", AcmeBasics(http_port=18080), {**INSTALL, "kpmFile": str(base / "kpm.hex")})
    ini = base / "acme" / "acme.ini"
    assert done[-1] == f"start the CSE: acmecse --headless -dir {base / 'acme'}"
    parser = read_ini(ini)
    basic = parser["basic.config"]
    assert (basic["cseType"], basic["cseID"], basic["cseName"], basic["httpPort"]) == ("IN", "id-in", "cse-in",
                                                                                       "18080")
    assert (basic["databaseType"], basic["networkInterface"]) == ("tinydb", "127.0.0.1")
    assert parser["textui"]["startWithTUI"] == "false" and parser["http"]["enableUpperTesterEndpoint"] == "false"
    assert (base / "acme" / "plugins" / SHIM_NAME).is_file()
    c = load(parser, base / "acme")
    assert c is not None and c.secure_port == 8444 and c.kpm_file == base / "kpm.hex"
    with pytest.raises(ConfigError, match="already exists; 'rspf acme install' adds the plugin"):
        init(base / "acme", AcmeBasics(), INSTALL)


@pytest.mark.parametrize("basics,needle", [
    (AcmeBasics(cse_id="id-in"), "--cse-id"),
    (AcmeBasics(cse_name="a b"), "--cse-name"),
    (AcmeBasics(sp_id="sp.example.com"), "--sp-id"),
    (AcmeBasics(sp_id="//sp/x"), "--sp-id"),
    (AcmeBasics(http_port=0), "--http-port"),
    (AcmeBasics(cse_type="XX"), "--cse-type"),
])
def test_init_checks_acme_settings(base: Path, basics: AcmeBasics, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        init(base / "acme", basics, {**INSTALL, "kpmFile": str(base / "kpm.hex")})
    assert not (base / "acme").exists()


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


def test_secure_credentials_choose_psk_certificates_or_both(base: Path) -> None:
    for name in ("srv.pem", "srv.key", "mef-ca.pem", "ca.pem"):
        (base / name).write_text("x")
    files = {"certFile": "srv.pem", "keyFile": "srv.key"}
    c = parse(base)
    assert (c.accept_psk, c.accept_certificates) == (True, False)  # default: both, but no certFile -> PSK only
    c = parse(base, **files, mefCaFile="mef-ca.pem")
    assert (c.accept_psk, c.accept_certificates, c.mef_ca_file) == (True, True, base / "mef-ca.pem")
    c = parse(base, **files, caFile="ca.pem", secureCredentials="certificate")
    assert (c.accept_psk, c.accept_certificates) == (False, True)
    c = parse(base, **files, mefCaFile="mef-ca.pem", secureCredentials=" PSK ")
    assert (c.accept_psk, c.accept_certificates) == (True, False)


@pytest.mark.parametrize("values,needle", [
    ({"secureCredentials": "psk, magic"}, "secureCredentials: must be psk, certificate"),
    ({"secureCredentials": "certificate"}, "certificate alone needs certFile"),
    ({"secureCredentials": "certificate", "certFile": "srv.pem", "keyFile": "srv.key"}, "caFile or mefCaFile"),
    ({"mefCaFile": "mef-ca.pem"}, "caFile and mefCaFile need them"),
])
def test_impossible_credential_choices_stop_start_up(base: Path, values: dict[str, str], needle: str) -> None:
    for name in ("srv.pem", "srv.key", "mef-ca.pem"):
        (base / name).write_text("x")
    with pytest.raises(ConfigError, match=needle):
        parse(base, **values)
