"""The observability keys: [mef] audit_log / metrics_listen and acme.ini [rspf] auditLog / metricsListen."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

from rspf.acme.config import BY_NAME, load
from rspf.errors import ConfigError
from rspf.mef.config import EXAMPLE, MefConfig

MEF = {"fqdn": "mef.example.com", "sp_id": "//sp.example.com"}
ACME = {"mefAddress": "127.0.0.1:8443", "mefFQDN": "mef.example.com", "enrol": "false",
        "mefPskIdentity": "in@sp.example.com", "mefPskFile": "in.psk", "securePort": "8444"}


def test_mef_defaults_audit_next_to_the_config_and_no_metrics(tmp_path: Path) -> None:
    cfg = MefConfig.from_dict(dict(MEF), base_dir=tmp_path)
    assert cfg.audit_log == tmp_path / "audit.jsonl" and cfg.metrics_listen is None


def test_mef_audit_log_false_or_elsewhere(tmp_path: Path) -> None:
    assert MefConfig.from_dict({**MEF, "audit_log": False}, base_dir=tmp_path).audit_log is None
    assert MefConfig.from_dict({**MEF, "audit_log": "/var/log/x.jsonl"}, base_dir=tmp_path).audit_log == \
        Path("/var/log/x.jsonl")
    for bad in (True, "", 5):
        with pytest.raises(ConfigError, match="audit_log"):
            MefConfig.from_dict({**MEF, "audit_log": bad}, source="mef.toml", base_dir=tmp_path)


def test_mef_metrics_listen(tmp_path: Path) -> None:
    assert MefConfig.from_dict({**MEF, "metrics_listen": "127.0.0.1:9464"}).metrics_listen == "127.0.0.1:9464"
    assert MefConfig.from_dict({**MEF, "metrics_listen": ""}).metrics_listen is None
    for bad in ("localhost:9464", "127.0.0.1", 9464, "127.0.0.1:65536"):
        with pytest.raises(ConfigError, match=r"mef.toml.*metrics_listen"):
            MefConfig.from_dict({**MEF, "metrics_listen": bad}, source="mef.toml")


def test_the_example_configuration_has_the_audit_log_on(tmp_path: Path) -> None:
    path = tmp_path / "mef.toml"
    path.write_text(EXAMPLE)
    assert MefConfig.load(path).audit_log == tmp_path / "audit.jsonl"


def parse(base: Path, **values: str):
    (base / "in.psk").write_text("00" * 32)
    (base / "in.psk").chmod(0o600)
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_dict({"rspf": {**ACME, **values}})
    return load(parser, base)


def test_acme_defaults_audit_in_the_base_dir_and_no_metrics(tmp_path: Path) -> None:
    c = parse(tmp_path)
    assert c is not None and c.audit_log == tmp_path / BY_NAME["auditLog"].default and c.metrics_listen is None


def test_acme_audit_log_off_and_metrics_listen(tmp_path: Path) -> None:
    c = parse(tmp_path, auditLog="off", metricsListen="127.0.0.1:9465")
    assert c is not None and c.audit_log is None and c.metrics_listen == ("127.0.0.1", 9465)
    c = parse(tmp_path, auditLog="logs/a.jsonl", metricsListen="[::1]:0")
    assert c is not None and c.audit_log == tmp_path / "logs/a.jsonl" and c.metrics_listen == ("::1", 0)


@pytest.mark.parametrize("value", ["9465", "cse.example.com:9465", "127.0.0.1:x", "127.0.0.1:99999"])
def test_acme_bad_metrics_listen_names_the_key(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"acme.ini \[rspf\] metricsListen"):
        parse(tmp_path, metricsListen=value)


def test_mef_certificate_keys_go_together_and_the_key_is_private(tmp_path: Path) -> None:
    base = {"fqdn": "mef.example.com", "sp_id": "//sp.example.com"}
    plain = MefConfig.from_dict(base, base_dir=tmp_path)
    assert plain.tls_cert_file is None and not plain.certificate_provisioning  # PSK only by default
    for name in ("mef.pem", "ca.pem"):
        (tmp_path / name).write_text("x")
    key = tmp_path / "mef.key"
    key.write_text("x")
    key.chmod(0o600)
    files = {"tls_cert_file": "mef.pem", "tls_key_file": "mef.key", "tls_client_ca_file": "ca.pem"}
    cfg = MefConfig.from_dict({**base, **files}, base_dir=tmp_path)
    assert cfg.tls_cert_file == tmp_path / "mef.pem" and cfg.tls_key_file == key
    assert cfg.tls_client_ca_file == tmp_path / "ca.pem"
    with pytest.raises(ConfigError, match="go together.*missing: tls_client_ca_file"):
        MefConfig.from_dict({**base, "tls_cert_file": "mef.pem", "tls_key_file": "mef.key"}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"tls_cert_file: .*nothing.pem does not exist"):
        MefConfig.from_dict({**base, **files, "tls_cert_file": "nothing.pem"}, base_dir=tmp_path)
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="tls_key_file: .*readable by group or others"):
        MefConfig.from_dict({**base, **files}, base_dir=tmp_path)


def test_the_example_configuration_leaves_certificates_commented_out(tmp_path: Path) -> None:
    assert "# tls_cert_file = " in EXAMPLE and "# tls_key_file = " in EXAMPLE and "# tls_client_ca_file = " in EXAMPLE
    path = tmp_path / "mef.toml"
    path.write_text(EXAMPLE)
    loaded = MefConfig.load(path)
    assert loaded.tls_cert_file is None and not loaded.certificate_provisioning


def test_mef_certificate_provisioning_keys(tmp_path: Path) -> None:
    base = {"fqdn": "mef.example.com", "sp_id": "//sp.example.com"}
    cfg = MefConfig.from_dict({**base, "certificate_provisioning": True, "certificate_validity_days": 30},
                              base_dir=tmp_path)
    assert cfg.certificate_provisioning and cfg.certificate_validity_days == 30
    assert cfg.est_ca_cert_file == tmp_path / "est-ca.pem" and cfg.est_ca_key_file == tmp_path / "est-ca.key"
    assert {p.name for p in cfg.own_certificate_files} == {"mef-fqdn-cert.pem", "mef-fqdn-key.pem",
                                                           "mef-client-cas.pem"}
    for value in (0, 3651):
        with pytest.raises(ConfigError, match="certificate_validity_days: must be between 1 and 3650"):
            MefConfig.from_dict({**base, "certificate_validity_days": value}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match="certificate_provisioning: must be bool"):
        MefConfig.from_dict({**base, "certificate_provisioning": "yes"}, base_dir=tmp_path)
