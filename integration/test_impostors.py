"""The ``rspf`` commands refuse servers that do not prove who they are (issue 6 item 1), as a user runs them.

``rspf enrol`` (Enrolee -> MEF), ``rspf fetch-credentials`` (Enrolment Target -> MEF) and ``rspf ae register``
(AE -> registrar, TLS-PSK and mutual TLS) against impostor servers: rc 1, a message saying what was wrong,
no file written, and no application data at the impostor. The same commands against the real MEF are the
positive controls.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from rspf.secret import Secret

from .impostors import CertServer, PskImpostor, TlsServer
from .pki import make_pki
from .support import FQDN, EnroleeInfo, MefHome

WRONG = Secret(b"\x42" * 32, "wrong key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"), {"ae": "//sp.example.com/id-in/Ccert1"})


def impostors(pki: Path, identity: str | None) -> dict[str, Callable[[], TlsServer]]:
    return {
        "certificate only, TLS 1.3": lambda: CertServer(pki / "self-signed.pem", pki / "self-signed.key", "1.3"),
        "certificate suites only, TLS 1.2": lambda: CertServer(pki / "self-signed.pem", pki / "self-signed.key",
                                                               "1.2"),
        "right identity, wrong key": lambda: PskImpostor(identity, WRONG, "1.3"),
    }


MESSAGES = {
    "certificate only, TLS 1.3": r"answered with a certificate \(subject CN=impostor\) instead of proving the "
                                 r"pre-shared key for psk_identity '{ident}': it is not the expected {peer}",
    "certificate suites only, TLS 1.2": r"refused the TLS-PSK handshake for psk_identity '{ident}'.*"
                                        r"not proven to be {peer}",
    "right identity, wrong key": r"refused the TLS-PSK handshake for psk_identity '{ident}'.*"
                                 r"not proven to be {peer}",
}
KINDS = list(MESSAGES)


def check_refusal(res, server: TlsServer, kind: str, ident: str, peer: str) -> None:
    assert res.rc == 1, str(res)
    pattern = "error: the server at " + re.escape(server.address) + ".*" + \
        MESSAGES[kind].format(ident=re.escape(ident), peer=re.escape(peer))
    assert re.search(pattern, res.stderr), str(res)
    assert "nothing was sent to it" in res.stderr
    assert server.connections >= 1 and server.received == b"", "the client sent application data to an impostor"


@pytest.mark.parametrize("kind", KINDS)
def test_rspf_enrol_refuses_an_impostor_mef(module_mef: MefHome, pki: Path, kind: str, tmp_path: Path) -> None:
    dev = module_mef.enrolees["dev1"]
    store = tmp_path / "dev1.store"
    with impostors(pki, dev.kpm_id)[kind]() as server:
        res = module_mef.cli("enrol", "--mef", server.address, "--mef-fqdn", FQDN, "--kpm-id", dev.kpm_id,
                             "--kpm-file", dev.kpm_file, "--node-id", dev.node_id, "--store", store)
    check_refusal(res, server, kind, dev.kpm_id, FQDN)
    assert not store.exists() and list(tmp_path.iterdir()) == []


def test_rspf_enrol_control_the_real_mef(module_mef: MefHome, tmp_path: Path) -> None:
    dev = module_mef.enrolees["dev1"]
    store = tmp_path / "dev1.store"
    res = module_mef.enrol(dev, "--force", store=store)
    assert res.rc == 0, str(res)
    assert store.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_rspf_fetch_credentials_sends_nothing_to_an_impostor_mef(module_mef: MefHome, pki: Path, kind: str,
                                                                 tmp_path: Path) -> None:
    target = module_mef.targets["in"]
    key_out = tmp_path / "key.hex"
    with impostors(pki, target.psk_identity)[kind]() as server:
        res = module_mef.cli("fetch-credentials", "--mef", server.address, "--mef-fqdn", FQDN,
                             "--psk-identity", target.psk_identity, "--psk-file", target.psk_file,
                             "--origin", target.target_id, "--key-out", key_out, f"{'ab' * 16}@{FQDN}", 22)
    check_refusal(res, server, kind, target.psk_identity, FQDN)
    assert not key_out.exists()


def test_rspf_fetch_credentials_control_the_real_mef(module_mef: MefHome, tmp_path: Path) -> None:
    dev = module_mef.enrolees["dev1"]
    res = module_mef.enrol(dev, "--force", store=tmp_path / "dev1.store")
    assert res.rc == 0, str(res)
    key_out = tmp_path / "key.hex"
    fetched = module_mef.fetch(module_mef.targets["in"], res.json()["keID"], key_out=key_out)
    assert fetched.rc == 0, str(fetched)
    assert key_out.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_rspf_ae_register_refuses_an_impostor_registrar(module_mef: MefHome, pki: Path, kind: str,
                                                        tmp_path: Path) -> None:
    """The MEF is real (the enrolment succeeds); the registrar its profile names is an impostor."""
    name = f"ae{KINDS.index(kind)}"
    # the psk_identity is the KeID, only known after the enrolment: the wrong-key impostor knows every identity
    with impostors(pki, None)[kind]() as server:
        info: EnroleeInfo = module_mef.add_enrolee(name, enrolee_id=f"C{name}",
                                                   registrar_uri=f"https://127.0.0.1:{server.port}/cse-in")
        res = module_mef.cli("ae", "register", "--mef", module_mef.address, "--mef-fqdn", FQDN, "--kpm-id",
                             info.kpm_id, "--kpm-file", info.kpm_file, "--node-id", info.node_id,
                             "--store", info.store, "--app-id", "Nimpostor")
    assert res.stdout.startswith(f"enrolled: AE-ID C{name}, KeID "), str(res)
    ke_id = res.stdout.split("KeID ")[1].split()[0]
    check_refusal(res, server, kind, ke_id, "127.0.0.1")
    assert "registered" not in res.stdout


CERT_IMPOSTORS = {
    "server-other-ca": "does not verify to the trust anchor .*: unable to get local issuer certificate",
    "server-other-name": "has a certificate from the trust anchor, but it names other.example.com, "
                         "//sp.example.com/id-other, not the expected /id-in",
    "server-expired": "does not verify to the trust anchor .*: certificate has expired",
}


@pytest.mark.parametrize("name", list(CERT_IMPOSTORS))
def test_rspf_ae_register_with_a_certificate_refuses_an_impostor_registrar(module_mef: MefHome, pki: Path,
                                                                           name: str) -> None:
    with CertServer(pki / f"{name}.pem", pki / f"{name}.key", "1.3", client_ca=pki / "ca.pem") as server:
        res = module_mef.cli("ae", "register", "--cert", pki / "ae.pem", "--key", pki / "ae.key", "--ca",
                             pki / "ca.pem", "--registrar", f"https://127.0.0.1:{server.port}/cse-in",
                             "--registrar-name", "/id-in", "--app-id", "Nimpostor")
    assert res.rc == 1, str(res)
    assert re.search("error: the server at " + re.escape(server.address) + ".*" + CERT_IMPOSTORS[name],
                     res.stderr), str(res)
    assert res.stderr.rstrip().endswith("nothing was sent to it"), str(res)
    assert server.received == b""


@pytest.mark.parametrize(("args", "message"), [
    (["--cert", "x.pem"], "mutual TLS needs --key, --ca, --registrar"),
    (["--cert", "x.pem", "--key", "x.key", "--ca", "ca.pem", "--registrar", "https://h:1/c", "--mef", "h:1"],
     "--mef enrol with the MEF for TLS-PSK; leave them out with --cert"),
    (["--mef", "h:1"], "TLS-PSK needs (or give --cert, --key, --ca and --registrar for mutual TLS) --mef-fqdn"),
])
def test_rspf_ae_register_usage(module_mef: MefHome, args: list[str], message: str) -> None:
    res = module_mef.cli("ae", "register", "--app-id", "Nx", *args)
    assert res.rc == 2, str(res)
    assert message in res.stderr, str(res)
