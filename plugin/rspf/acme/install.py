"""``rspf acme install``: put the plugin loader into an ACME base directory and write the [rspf] section."""

from __future__ import annotations

import configparser
import shutil
from pathlib import Path

from ..errors import ConfigError
from .config import DEFAULT_ENFORCEMENT

SHIM_NAME = "RspfSecurity.py"
SHIM = '''\
# Loader for the onem2m-rspf SEC CSF plugin (written by `rspf acme install`).
# ACME loads every *.py in this folder; the plugin itself lives in the installed `onem2m-rspf` package.
from rspf.acme.plugin import RspfSecurityPlugin  # noqa: F401
'''

SECTION_TEMPLATE = """\

[rspf]
# onem2m-rspf SEC CSF plugin. Every key: docs/acme-plugin.md. No inline comments (ACME's parser keeps them).
# The MEF (HOST:PORT) and its FQDN (the suffix of every KeID).
mefAddress={mef}
mefFQDN={mef_fqdn}
# Enrol this CSE at start-up (its CSE-ID, SP-ID and registrar then come from the securityProfile).
enrol={enrol}
# Bootstrap credential: KpmID and the 0600 file holding Kpm (hex).
{kpm_id_line}
{kpm_file_line}
{node_id_line}
# Encrypted securityProfile store (relative to the base directory).
profileStore=data/rspf-profile.store
renewBeforeSeconds=86400
startupRetrySeconds=60
# Use a key fetched from the MEF this long before asking the MEF again (revocations take effect then).
keyCacheSeconds=300
# Credential this CSE uses towards the MEF as Enrolment Target (defaults to kpmID/kpmFile).
{mef_psk_identity_line}
{mef_psk_file_line}
# Secure Mca/Mcc listener (TLS-PSK 1.2 + 1.3; add certFile/keyFile/caFile for mutual TLS).
secureListen={secure_listen}
securePort={secure_port}
{cert_file_line}
{key_file_line}
{ca_file_line}
# Its transport limits: handshakeTimeout, requestTimeout, idleTimeout, maxConnections, maxConnectionsPerSource,
# maxBodyBytes, workers (absent: the transport's defaults, listed in docs/acme-plugin.md).
# on: the originator checks of TS-0004 §7.3.2.1 on every port; AEs that registered with a credential, CSEs and
# the admin are served only on the secure listener (docs/acme-plugin.md). off: compatibility mode, for ACME's
# own tests; the plain port is then as open as ACME without the plugin.
enforcement={enforcement}
# Originators (CSE-IDs, the admin) still served on the plain port with enforcement on; comma-separated.
plainPortOriginators={plain_port_originators}
# Serve ACME's web UI on the secure listener too.
secureWebUI=false
# The <serviceSubscribedAppRule> (resource name under the CSEBase) that receives enrolled credentials,
# created at start-up together with the <m2mServiceSubscriptionProfile>/<serviceSubscribedNode> if missing.
ssar={ssar}
ssarShardSize={ssar_shard_size}
createSubscription={create_subscription}
allowedAppIDs={allowed_app_ids}
# Register with the registrar over TLS-PSK with the provisioned credential.
secureRegistrar={secure_registrar}
"""


def install(base_dir: Path, *, mef: str, mef_fqdn: str, enrol: bool, kpm_id: str | None, kpm_file: str | None,
            node_id: str | None, mef_psk_identity: str | None, mef_psk_file: str | None, secure_listen: str,
            secure_port: int, enforcement: bool = DEFAULT_ENFORCEMENT, ssar: str, create_subscription: bool,
            allowed_app_ids: str,
            secure_registrar: bool, force: bool = False, ssar_shard_size: int = 256,
            cert_file: str | None = None, key_file: str | None = None, ca_file: str | None = None,
            plain_port_originators: str = "") -> list[str]:
    """Write the shim and the [rspf] section; returns what was done. Never loses an existing acme.ini."""
    base_dir = Path(base_dir)
    if not base_dir.is_dir():
        raise ConfigError(f"{base_dir} is not a directory (the ACME base directory holding acme.ini)")
    done = []
    ini = base_dir / "acme.ini"
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    if ini.exists():
        parser.read(ini)
        if parser.has_section("rspf") and not force:
            raise ConfigError(f"{ini} already has an [rspf] section; edit it, or use --force to replace it")
    if enrol and not (kpm_id and kpm_file and node_id):
        raise ConfigError("enrolling needs --kpm-id, --kpm-file and --node-id")
    if not enrol and not (mef_psk_identity and mef_psk_file):
        raise ConfigError("without enrolment the CSE needs --mef-psk-identity and --mef-psk-file")

    def line(key: str, value: str | None) -> str:
        return f"{key}={value}" if value else f"# {key}="

    section = SECTION_TEMPLATE.format(
        mef=mef, mef_fqdn=mef_fqdn, enrol=str(enrol).lower(), kpm_id_line=line("kpmID", kpm_id),
        kpm_file_line=line("kpmFile", kpm_file), node_id_line=line("nodeID", node_id),
        mef_psk_identity_line=line("mefPskIdentity", mef_psk_identity),
        mef_psk_file_line=line("mefPskFile", mef_psk_file), secure_listen=secure_listen, secure_port=secure_port,
        cert_file_line=line("certFile", cert_file), key_file_line=line("keyFile", key_file),
        ca_file_line=line("caFile", ca_file),
        enforcement="on" if enforcement else "off", plain_port_originators=plain_port_originators, ssar=ssar,
        ssar_shard_size=ssar_shard_size,
        create_subscription=str(create_subscription).lower(),
        allowed_app_ids=allowed_app_ids, secure_registrar=str(secure_registrar).lower())
    if ini.exists():
        backup = ini.with_name("acme.ini.before-rspf")
        shutil.copy2(ini, backup)
        done.append(f"saved the previous {ini.name} as {backup.name}")
        text = ini.read_text()
        if parser.has_section("rspf"):
            text = _drop_section(text, "rspf")
        ini.write_text(text.rstrip("\n") + "\n" + section)
    else:
        ini.write_text(section.lstrip("\n"))
    done.append(f"wrote the [rspf] section to {ini}")
    plugins = base_dir / "plugins"
    plugins.mkdir(exist_ok=True)
    (plugins / SHIM_NAME).write_text(SHIM)
    done.append(f"wrote the plugin loader {plugins / SHIM_NAME}")
    return done


def _drop_section(text: str, name: str) -> str:
    out, skipping = [], False
    for raw in text.splitlines(keepends=True):
        stripped = raw.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            skipping = stripped[1:-1].strip() == name
        if not skipping:
            out.append(raw)
    return "".join(out)
