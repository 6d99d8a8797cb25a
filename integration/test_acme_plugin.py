"""The SEC CSF plugin for the ACME CSE, end to end with real processes on 127.0.0.1.

A MEF (``rspf mef serve``), ACME CSEs (``acmecse --headless``) with the plugin installed by
``rspf acme install``, and AEs (``rspf ae register`` as a subprocess, or the ``rspf.ae.SecureAE`` API) run
on free loopback ports; every process is started here and stopped by its PID (integration/acme_harness.py).

To keep the run short the processes are shared: one MEF and one IN-CSE (``--no-enrol``, Enrolment Target
credential ``/id-in``, ``allowedAppIDs = Nonly-this``, enforcement off) serve most tests of this module;
configurations that differ (no service subscription, enforcement, the 50-AE load, an MN, the MEF-down
start-ups, a CSE started after a revocation) get their own CSE. Each test registers its own enrolees, so
the tests do not depend on each other's order.
"""

from __future__ import annotations

import base64
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from rspf.ae import SecureAE
from rspf.enrolee import Enrolee, EnroleeConfig, Enrolment
from rspf.errors import RspfError, TlsError
from rspf.fileutil import read_key_file
from rspf.secret import Secret
from rspf.ssar import bound_rule_name, is_bound_rule_name, node_label
from rspf.tls import PskClient

from .acme_harness import (
    FQDN,
    HOST,
    IN_CSE_ID,
    TY_AE,
    TY_ASAR,
    TY_CNT,
    TY_MSSP,
    TY_SVSN,
    AcmeCse,
    Resp,
    ae_body,
    import_ae_batch,
    key_forms,
    new_mef,
    secure_request,
    wait_until,
)
from .support import EnroleeInfo, MefHome, TargetInfo, enrolee_client, free_port

APP_ID = "Nonly-this"        # the only App-ID the shared IN-CSE's rule allows
SSAR = "rspf-enrolled"       # the rule the plugin creates and records enrolled credentials in


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def mef(mef_target: tuple[MefHome, TargetInfo]) -> MefHome:
    """The module's running MEF (in this module it replaces conftest's function-scoped ``mef``)."""
    return mef_target[0]


def in_cse_options(target: TargetInfo, *extra: Any) -> list[Any]:
    return ["--no-enrol", "--mef-psk-identity", target.psk_identity, "--mef-psk-file", target.psk_file, *extra]


def start_in_cse(root: Path, name: str, mef: MefHome, target: TargetInfo, *extra: Any) -> AcmeCse:
    cse = AcmeCse(root, name)
    cse.install(mef, *in_cse_options(target, *extra))
    cse.start()
    return cse


@pytest.fixture(scope="module")
def in_cse(tmp_path_factory: pytest.TempPathFactory, mef_target: tuple[MefHome, TargetInfo]) -> Iterator[AcmeCse]:
    mef, target = mef_target
    cse = start_in_cse(tmp_path_factory.mktemp("acme"), "in", mef, target, "--allowed-app-ids", APP_ID)
    try:
        yield cse
    finally:
        cse.stop()


# -------------------------------------------------------------------------------------------- helpers
def add_ae(mef: MefHome, cse: AcmeCse, name: str, *, registrar: str = IN_CSE_ID) -> EnroleeInfo:
    """Register AE enrolee ``C<name>`` at the MEF, its registrar the secure listener of ``cse``."""
    return mef.add_enrolee(name, enrolee_id=f"C{name}", registrar=registrar, registrar_uri=cse.secure_uri)


def enrol(mef: MefHome, info: EnroleeInfo) -> Enrolment:
    return enrolee_client(mef, info).enrol()


def register(enrolment: Enrolment, app_id: str = APP_ID, *, origin: str | None = None,
             rn: str | None = None) -> Resp:
    """CREATE <AE> over TLS-PSK with the enrolment's KeID and registrar key (as ``origin``, default its AE-ID)."""
    uri = urlsplit(enrolment.profile["registrar"]["cseBaseURI"])
    assert uri.hostname == HOST and uri.port
    return secure_request(uri.port, enrolment.ke_id, enrolment.registrar_key, "POST", uri.path,
                          ae_body(rn or enrolment.enrolee_id, app_id), origin=origin or enrolment.enrolee_id,
                          ty=TY_AE)


def assert_handshake_refused(port: int, identity: str, key: Secret) -> None:
    with pytest.raises(TlsError, match="refused the TLS-PSK handshake"):
        tls = PskClient().connect(HOST, port, identity, key, timeout=15)
        tls.close()  # pragma: no cover - only reached when the CSE wrongly accepts


def cred_id(ke_id: str) -> str:
    return f"12-{ke_id}"


def bound_rule(cse: AcmeCse, ke_id: str) -> dict[str, Any] | None:
    """The credential's own <serviceSubscribedAppRule> (rspf.ssar's layout), read as the admin; None if none."""
    got = cse.get(bound_rule_name(cred_id(ke_id)))
    if got.rsc == 4004:
        return None
    assert got.rsc == 2000, str(got)
    return got.pc("m2m:asar")


def node_links(cse: AcmeCse) -> list[str]:
    uris = cse.discover("fu=1&ty=20")
    assert len(uris) == 1, uris
    return list(cse.get(f"/{uris[0]}").pc("m2m:svsn").get("rlk") or [])


def bound_rules(cse: AcmeCse, node: str = IN_CSE_ID) -> list[dict[str, Any]]:
    """Every bound rule that belongs to the node of ``node`` (by its label; no node's ruleLinks list them)."""
    rules = [cse.get(f"/{u}").pc("m2m:asar") for u in cse.discover(f"fu=1&ty={TY_ASAR}")
             if is_bound_rule_name(u.rsplit("/", 1)[-1])]
    return [r for r in rules if r.get("lbl") == [node_label(node)]]


def bound_aes(cse: AcmeCse) -> list[str]:
    """The AE-IDs of every bound rule of the IN-CSE's node."""
    return [r["aae"][0] for r in bound_rules(cse)]


# ============================================================================== 1. the whole path
class TestWholePath:
    def test_cli_ae_registers_over_tls_psk_and_is_recorded_in_the_ssar(self, mef: MefHome, in_cse: AcmeCse) -> None:
        info = add_ae(mef, in_cse, "clisensor")
        assert info.enrolee_id not in bound_aes(in_cse)

        res = mef.cli("ae", "register", "--mef", mef.address, "--mef-fqdn", FQDN, "--kpm-id", info.kpm_id,
                      "--kpm-file", info.kpm_file, "--store", info.store, "--node-id", info.node_id,
                      "--app-id", APP_ID, "--container", "readings", "--json")
        assert res.rc == 0, str(res)
        out = res.json()
        ke_id = out["enrolment"]["keID"]
        assert out["enrolment"]["aeID"] == "Cclisensor"
        assert out["enrolment"]["registrar"] == in_cse.secure_uri
        assert out["ae"]["aei"] == "Cclisensor" and out["ae"]["api"] == APP_ID, out
        assert out["container"]["rn"] == "readings", out
        assert ke_id.endswith(f"@{FQDN}") and ke_id == mef.load_enrolment(info).ke_id

        # the plain port (as the admin) sees what the AE created over TLS-PSK
        got = in_cse.get("Cclisensor/readings")
        assert got.rsc == 2000, str(got)
        assert got.pc("m2m:cnt")["ri"] == out["container"]["ri"]
        assert in_cse.get("Cclisensor").pc("m2m:ae")["aei"] == "Cclisensor"

        rule = bound_rule(in_cse, ke_id)
        assert rule is not None
        # the credential's own rule: its Credential-ID, its AE-ID, the configured App-IDs (the MEF sets none)
        assert (rule["apci"], rule["aae"], rule["aai"]) == ([cred_id(ke_id)], ["Cclisensor"], [APP_ID]), rule
        assert rule["ri"] == rule["rn"] == bound_rule_name(cred_id(ke_id))
        assert rule["lbl"] == [node_label(IN_CSE_ID)] and rule["ri"] not in node_links(in_cse)
        assert "apci" not in in_cse.ssar(SSAR) and "aae" not in in_cse.ssar(SSAR)  # the operator's rule is untouched

    def test_python_api_secure_ae_gets_2001_and_its_container(self, mef: MefHome, in_cse: AcmeCse) -> None:
        info = add_ae(mef, in_cse, "apisensor")
        ae = SecureAE.from_enrolee(enrolee_client(mef, info))
        assert ae.ae_id == "Capisensor"
        assert (ae.host, ae.port, ae.csebase) == (HOST, in_cse.secure_port, "/cse-in")
        with ae.session() as cse:
            reg = cse.client.request("POST", "/cse-in", ae_body("Capisensor", APP_ID), ty=TY_AE)
            assert reg.rsc == 2001, (reg.status, reg.body)
            assert reg.json()["m2m:ae"]["aei"] == "Capisensor"
            made = cse.client.request("POST", "/cse-in/Capisensor", {"m2m:cnt": {"rn": "readings"}}, ty=TY_CNT)
            assert made.rsc == 2001, (made.status, made.body)
            got = cse.retrieve("Capisensor/readings")
            assert got["m2m:cnt"]["rn"] == "readings"
            assert got["m2m:cnt"]["ri"] == made.json()["m2m:cnt"]["ri"]

        rule = bound_rule(in_cse, ae.enrolment.ke_id)
        assert rule is not None and rule["apci"] == [cred_id(ae.enrolment.ke_id)] and rule["aae"] == ["Capisensor"]
        # recorded once, however many connections the AE opened
        assert [r["ri"] for r in bound_rules(in_cse)].count(rule["ri"]) == 1


# ============================================================================== 2. refusals
class TestRefusals:
    def test_wrong_kpm_fails_enrolment_and_registers_nothing(self, mef: MefHome, in_cse: AcmeCse) -> None:
        info = add_ae(mef, in_cse, "wrongkey")
        other_kpm = mef.keygen("wrongkey-local.kpm")
        assert other_kpm.read_text() != info.kpm_file.read_text()

        def ae_register(kpm_file: Path):
            return mef.cli("ae", "register", "--mef", mef.address, "--mef-fqdn", FQDN, "--kpm-id", info.kpm_id,
                           "--kpm-file", kpm_file, "--store", info.store, "--node-id", info.node_id,
                           "--app-id", APP_ID, "--json")

        res = ae_register(other_kpm)
        assert res.rc == 1, str(res)
        assert "refused the TLS-PSK handshake" in res.stderr, str(res)
        assert not info.store.exists(), "a failed enrolment must store nothing"
        assert in_cse.get("Cwrongkey").rsc == 4004
        assert "Cwrongkey" not in bound_aes(in_cse)
        assert "cse-in/Cwrongkey" not in in_cse.discover("fu=1&ty=2")

        # control: the same command with the Kpm the MEF knows works
        ok = ae_register(info.kpm_file)
        assert ok.rc == 0, str(ok)
        assert in_cse.get("Cwrongkey").rsc == 2000

    def test_unknown_ke_id_fails_the_handshake(self, mef: MefHome, in_cse: AcmeCse) -> None:
        key = Secret(secrets.token_bytes(32))
        made_up = f"{secrets.token_hex(16)}@{FQDN}"
        assert_handshake_refused(in_cse.secure_port, made_up, key)
        # a KeID of another MEF is not even looked up, and a KpmID is not a KeID
        assert_handshake_refused(in_cse.secure_port, f"{secrets.token_hex(16)}@mef.other.example.com", key)
        assert_handshake_refused(in_cse.secure_port, f"not-a-keid@{FQDN}", key)
        # the CSE is unharmed
        assert in_cse.running
        assert in_cse.get("/cse-in").rsc == 2000

    def test_revoked_enrolee(self, mef: MefHome, mef_target: tuple[MefHome, TargetInfo], in_cse: AcmeCse,
                             tmp_path: Path) -> None:
        """Revocation at the MEF stops every key of the enrolee: one the CSE never fetched at once, the one it
        had cached within seconds (the revocation feed; integration/test_revocation.py has the details). A CSE
        process started after the revocation refuses both KeIDs, and the enrolee cannot enrol again."""
        target = mef_target[1]
        info = add_ae(mef, in_cse, "revoked")
        client = enrolee_client(mef, info)
        first = client.enrol()
        assert register(first).rsc == 2001                   # KeID #1 is now in in_cse's cache
        second = client.enrol()                               # KeID #2: never presented to any CSE
        assert second.ke_id != first.ke_id
        # both keys are live at the MEF before the revocation (so what follows is caused by the revocation)
        assert mef.fetch(target, first.ke_id).rc == 0
        assert mef.fetch(target, second.ke_id).rc == 0

        mef.revoke(info.kpm_id)
        refused = mef.fetch(target, first.ke_id)
        assert refused.rc == 1 and "4004" in refused.output, str(refused)
        # a KeID the running CSE never fetched: refused
        assert_handshake_refused(in_cse.secure_port, second.ke_id, second.registrar_key)

        def cached_key_refused() -> bool:
            try:
                secure_request(in_cse.secure_port, first.ke_id, first.registrar_key, "GET", "/cse-in/Crevoked",
                               origin="Crevoked", timeout=5)
            except TlsError:
                return True
            except RspfError:  # accepted just before the revocation was applied, then closed by it: ask again
                return False
            return False

        wait_until(cached_key_refused, 15, "the CSE to refuse the KeID it had cached")
        # a CSE process started after the revocation: refused, for both KeIDs
        fresh = AcmeCse(tmp_path, "in-fresh")
        fresh.install(mef, *in_cse_options(target, "--allowed-app-ids", APP_ID))
        fresh.start()
        try:
            assert_handshake_refused(fresh.secure_port, first.ke_id, first.registrar_key)
            assert_handshake_refused(fresh.secure_port, second.ke_id, second.registrar_key)
            assert "Crevoked" not in bound_aes(fresh)
        finally:
            fresh.stop()
        # and the revoked enrolee cannot enrol again
        with pytest.raises(RspfError):
            client.enrol()

    def test_target_not_authorized_at_the_mef(self, mef: MefHome, mef_target: tuple[MefHome, TargetInfo],
                                              in_cse: AcmeCse) -> None:
        info = add_ae(mef, in_cse, "elsewhere", registrar="/id-other")
        enrolment = enrol(mef, info)                          # the MEF provisions it for /id-other
        assert enrolment.profile["registrar"]["cseID"] == "/id-other"
        # /id-in is not an authorized Target for this enrolee: the MEF refuses it the key ...
        res = mef.fetch(mef_target[1], enrolment.ke_id)
        assert res.rc == 1 and "4103" in res.output, str(res)
        # ... so the IN-CSE has no key for the KeID and the handshake fails; nothing is registered
        assert_handshake_refused(in_cse.secure_port, enrolment.ke_id, enrolment.registrar_key)
        assert in_cse.get("Celsewhere").rsc == 4004
        assert "Celsewhere" not in bound_aes(in_cse)

    def test_no_matching_rule_is_4126(self, mef: MefHome, in_cse: AcmeCse) -> None:
        info = add_ae(mef, in_cse, "norule")
        enrolment = enrol(mef, info)
        refused = register(enrolment, "Nother")
        assert refused.rsc == 4126, str(refused)
        assert in_cse.get("Cnorule").rsc == 4004
        # control: the App-ID the rule allows registers the same AE with the same credential
        ok = register(enrolment, APP_ID)
        assert ok.rsc == 2001, str(ok)

    def test_app_ids_set_per_enrolee_at_the_mef_bind_its_registration(self, mef: MefHome, in_cse: AcmeCse) -> None:
        """``rspf mef enrolee add --app-id`` reaches the CSE with the key: the CSE's own allowedAppIDs (APP_ID)
        no longer admit this credential, only the enrolee's own App-IDs do."""
        info = mef.add_enrolee("meter", "--app-id", "Nmeter*", enrolee_id="Cmeter", registrar=IN_CSE_ID,
                               registrar_uri=in_cse.secure_uri)
        enrolment = enrol(mef, info)
        for other in (APP_ID, "Nother"):
            refused = register(enrolment, other)
            assert refused.rsc == 4126, str(refused)
        assert in_cse.get("Cmeter").rsc == 4004
        ok = register(enrolment, "Nmeter-v2")
        assert ok.rsc == 2001, str(ok)

    def test_identity_spoofing_is_4106(self, mef: MefHome, in_cse: AcmeCse) -> None:
        spoofer = enrol(mef, add_ae(mef, in_cse, "spoofer"))
        victim = enrol(mef, add_ae(mef, in_cse, "victim"))
        port = in_cse.secure_port

        # key X (spoofer) with the victim's AE-ID as originator: refused, in both ID forms
        for origin in ("Cvictim", "/id-in/Cvictim"):
            res = register(spoofer, origin=origin, rn="Cvictim")
            assert res.rsc == 4106, f"{origin}: {res}"
        assert in_cse.get("Cvictim").rsc == 4004
        assert not [u for u in in_cse.discover("fu=1&ty=2") if u.endswith("/Cvictim")]
        assert "Cvictim" not in bound_aes(in_cse)

        # the spoofer registers as itself, the victim as itself
        assert register(spoofer).rsc == 2001
        assert register(victim).rsc == 2001
        # key X still cannot act as the victim: read, delete
        for method in ("GET", "DELETE"):
            res = secure_request(port, spoofer.ke_id, spoofer.registrar_key, method, "/cse-in/Cvictim",
                                 origin="Cvictim")
            assert res.rsc == 4106, f"{method}: {res}"
        assert in_cse.get("Cvictim").pc("m2m:ae")["aei"] == "Cvictim"
        # a key is bound to the identity the MEF returned for it, not to whatever the body says
        res = secure_request(port, victim.ke_id, victim.registrar_key, "GET", "/cse-in/Cspoofer", origin="Cspoofer")
        assert res.rsc == 4106, str(res)

    def test_plain_port_registration_still_works_without_enforcement(self, in_cse: AcmeCse) -> None:
        assert in_cse.rspf_value("enforcement") == "off"
        res = in_cse.request("POST", "/cse-in", ae_body("Cplainae", "Nplain"), origin="Cplainae", ty=TY_AE)
        assert res.rsc == 2001, str(res)
        assert in_cse.get("Cplainae").pc("m2m:ae")["api"] == "Nplain"


@pytest.fixture(scope="class")
def nosub_cse(tmp_path_factory: pytest.TempPathFactory,
              mef_target: tuple[MefHome, TargetInfo]) -> Iterator[AcmeCse]:
    mef, target = mef_target
    cse = start_in_cse(tmp_path_factory.mktemp("acme-nosub"), "in-nosub", mef, target,
                       "--no-create-subscription")
    try:
        yield cse
    finally:
        cse.stop()


class TestNoServiceSubscription:
    def test_registration_without_service_subscription_is_4128(self, mef: MefHome, nosub_cse: AcmeCse) -> None:
        assert nosub_cse.rspf_value("createSubscription") == "false"
        assert nosub_cse.get(SSAR).rsc == 4004
        assert nosub_cse.discover("fu=1&ty=20") == []
        enrolment = enrol(mef, add_ae(mef, nosub_cse, "nosub"))
        res = register(enrolment)
        assert res.rsc == 4128, str(res)
        assert nosub_cse.get("Cnosub").rsc == 4004

        # control: once the operator establishes the subscription, the same credential registers
        cse = nosub_cse
        rule = cse.request("POST", "/cse-in", {"m2m:asar": {"rn": "ops-rule", "apci": [cred_id(enrolment.ke_id)],
                                                            "aai": [APP_ID], "aae": ["Cnosub"]}}, ty=TY_ASAR)
        assert rule.rsc == 2001, str(rule)
        mssp = cse.request("POST", "/cse-in", {"m2m:mssp": {"rn": "ops-mssp"}}, ty=TY_MSSP)
        assert mssp.rsc == 2001, str(mssp)
        node = cse.request("POST", "/cse-in/ops-mssp", {"m2m:svsn": {"ni": "in-node", "csi": IN_CSE_ID,
                                                                      "rlk": [rule.pc("m2m:asar")["ri"]]}}, ty=TY_SVSN)
        assert node.rsc == 2001, str(node)
        res = register(enrolment)
        assert res.rsc == 2001, str(res)


@pytest.fixture(scope="class")
def enf_cse(tmp_path_factory: pytest.TempPathFactory,
            mef_target: tuple[MefHome, TargetInfo]) -> Iterator[AcmeCse]:
    mef, target = mef_target
    cse = start_in_cse(tmp_path_factory.mktemp("acme-enf"), "in-enf", mef, target, "--enforcement",
                       "--plain-port-originators", "CAdmin")
    try:
        yield cse
    finally:
        cse.stop()


class TestEnforcement:
    def test_plain_port_registration_has_no_credential_and_no_rule_admits_it(self, enf_cse: AcmeCse) -> None:
        assert enf_cse.rspf_value("enforcement") == "on"
        res = enf_cse.request("POST", "/cse-in", ae_body("Cplainenf", "Nplain"), origin="Cplainenf", ty=TY_AE)
        assert res.rsc == 4126, str(res)
        assert enf_cse.get("Cplainenf").rsc == 4004

    def test_secure_registration_still_works_under_enforcement(self, mef: MefHome, enf_cse: AcmeCse) -> None:
        enrolment = enrol(mef, add_ae(mef, enf_cse, "enfsecure"))
        res = register(enrolment, "Nanything")
        assert res.rsc == 2001, str(res)
        assert enf_cse.get("Cenfsecure").rsc == 2000


@pytest.fixture(scope="class")
def mef2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MefHome]:
    home, _target = new_mef(tmp_path_factory.mktemp("mef-down"))
    try:
        yield home
    finally:
        home.stop()


class TestMefDownAtStart:
    """An enrolling CSE (MN) with the MEF down: no stored profile -> start-up stops (exit status != 0);
    a valid stored profile -> the CSE starts and serves."""

    RETRY = 3

    def mn(self, root: Path, mef2: MefHome, name: str) -> AcmeCse:
        info = mef2.add_enrolee(name, enrolee_id=f"/id-{name}", registrar=IN_CSE_ID,
                                registrar_uri=f"https://{HOST}:{free_port()}/cse-in")
        cse = AcmeCse(root, name, cse_type="MN", cse_id="id-placeholder", cse_name="cse-mn")
        cse.install(mef2, "--kpm-id", info.kpm_id, "--kpm-file", info.kpm_file, "--node-id", info.node_id)
        cse.set_rspf("startupRetrySeconds", str(self.RETRY))
        return cse

    def test_no_stored_profile_and_mef_down_stops_start_up(self, mef2: MefHome, tmp_path: Path) -> None:
        mef2.stop()
        cse = self.mn(tmp_path, mef2, "mndown")
        started = time.monotonic()
        cse.start(wait=False)
        try:
            rc = cse.proc.wait(self.RETRY + 30)  # type: ignore[union-attr]
        finally:
            cse.stop()
        elapsed = time.monotonic() - started
        log = cse.log_text()
        assert rc != 0, f"the CSE exited with {rc} after a failed start-up:\n{cse.log_tail()}"
        assert elapsed < self.RETRY + 30
        assert "retrying in" in log, cse.log_tail()
        assert f"could not enrol with the MEF at {mef2.address} within {self.RETRY} s" in log, cse.log_tail()
        assert not (cse.base / "data" / "rspf-profile.store").exists()

    def test_stored_profile_lets_the_cse_start_with_the_mef_down(self, mef2: MefHome, tmp_path: Path) -> None:
        mef2.start()
        cse = self.mn(tmp_path, mef2, "mnstored")
        try:
            cse.start()
            assert cse.get("/cse-mn").pc("m2m:cb")["csi"] == "/id-mnstored"
            assert cse.stop() == 0
            assert mef2.stop() == 0
            cse.start()  # waits for the secure listener, then for plain HTTP
            assert cse.running
            assert cse.get("/cse-mn").pc("m2m:cb")["csi"] == "/id-mnstored"
            assert "using the stored securityProfile" in cse.log_text()
        finally:
            cse.stop()


# ============================================================================== 3. 50 concurrent AEs
@pytest.fixture(scope="class")
def load_cse(tmp_path_factory: pytest.TempPathFactory,
             mef_target: tuple[MefHome, TargetInfo]) -> Iterator[AcmeCse]:
    mef, target = mef_target
    cse = start_in_cse(tmp_path_factory.mktemp("acme-load"), "in-load", mef, target)
    try:
        yield cse
    finally:
        cse.stop()


class TestConcurrentRegistration:
    COUNT = 50

    def test_50_aes_register_concurrently_and_none_is_lost(self, mef: MefHome, load_cse: AcmeCse) -> None:
        infos = import_ae_batch(mef, "load", self.COUNT, load_cse.secure_uri)
        with ThreadPoolExecutor(max_workers=10) as pool:
            enrolments = list(pool.map(lambda i: enrol(mef, i), infos))
        assert len({e.ke_id for e in enrolments}) == self.COUNT
        assert bound_aes(load_cse) == []

        barrier = threading.Barrier(self.COUNT)

        def one(enrolment: Enrolment) -> tuple[str, int | None]:
            barrier.wait(30)
            res = register(enrolment, "Nload")
            return enrolment.enrolee_id, res.rsc

        with ThreadPoolExecutor(max_workers=self.COUNT) as pool:
            results = list(pool.map(one, enrolments))
        assert [rsc for _id, rsc in results] == [2001] * self.COUNT, results

        expected_aes = {e.enrolee_id for e in enrolments}
        recorded = [r["ri"] for r in bound_rules(load_cse)]
        assert sorted(recorded) == sorted(bound_rule_name(cred_id(e.ke_id)) for e in enrolments)  # none lost
        for e in enrolments:  # each credential bound to its own AE-ID
            rule = bound_rule(load_cse, e.ke_id)
            assert rule is not None and (rule["apci"], rule["aae"]) == ([cred_id(e.ke_id)], [e.enrolee_id])
        aes = [u for u in load_cse.discover("fu=1&ty=2") if u != "cse-in/CAdmin"]  # ACME's own admin AE aside
        assert sorted(aes) == sorted(f"cse-in/{a}" for a in expected_aes)


# ============================================================================== 4./5. Mcc and secrecy
@pytest.fixture(scope="class")
def mn_cse(tmp_path_factory: pytest.TempPathFactory, mef: MefHome, in_cse: AcmeCse) -> Iterator[AcmeCse]:
    info = mef.add_enrolee("mn1", enrolee_id="/id-mn", node_id="urn:dev:ops:mn1", registrar=IN_CSE_ID,
                           registrar_uri=in_cse.secure_uri)
    cse = AcmeCse(tmp_path_factory.mktemp("acme-mn"), "mn", cse_type="MN", cse_id="id-mn-placeholder",
                  cse_name="cse-mn")
    cse.install(mef, "--kpm-id", info.kpm_id, "--kpm-file", info.kpm_file, "--node-id", info.node_id,
                "--allowed-app-ids", "Nmn-app", extra_ini="[http]\nenableManagementEndpoint=true")
    cse.enrolee = info
    cse.start()
    try:
        yield cse
    finally:
        cse.stop()


class TestMccAndProfileSecrecy:
    def test_mn_registers_with_the_in_over_tls_psk_with_its_provisioned_cse_id(self, mn_cse: AcmeCse,
                                                                                in_cse: AcmeCse) -> None:
        assert "cseID=id-mn-placeholder" in mn_cse.ini.read_text()
        wait_until(lambda: "cse-in/id-mn" in in_cse.discover("fu=1&ty=16"), 45, "the MN's <remoteCSE> at the IN")
        uris = in_cse.discover("fu=1&ty=16")
        assert uris == ["cse-in/id-mn"], uris  # not the placeholder CSE-ID of the MN's acme.ini
        csr = in_cse.get("id-mn").pc("m2m:csr")
        assert csr["csi"] == "/id-mn", csr
        assert mn_cse.get("/cse-mn").pc("m2m:cb")["csi"] == "/id-mn"
        log = mn_cse.log_text()
        assert "CSE-ID /id-mn from the securityProfile" in log
        assert f"registrar {IN_CSE_ID} at {in_cse.secure_uri} (Mcc over TLS-PSK)" in log

    def test_security_profile_is_never_exposed(self, mef: MefHome, mn_cse: AcmeCse, in_cse: AcmeCse) -> None:
        wait_until(lambda: "cse-in/id-mn" in in_cse.discover("fu=1&ty=16"), 45, "the MN's <remoteCSE>")
        info = mn_cse.enrolee
        assert info is not None
        enrolment = Enrolee(EnroleeConfig(
            mef_host=HOST, mef_port=mef.port, mef_fqdn=FQDN, kpm_id=info.kpm_id, kpm=read_key_file(info.kpm_file),
            node_id=info.node_id, store_path=mn_cse.base / "data" / "rspf-profile.store")).load()
        assert enrolment is not None and enrolment.enrolee_id == "/id-mn"
        registrar_key = enrolment.registrar_key.reveal()
        assert base64.b64encode(registrar_key).decode() == enrolment.profile["credential"]["key"]
        secret_values = {"registrar key": registrar_key, "Ke": enrolment.enrolment_key.reveal(),
                         "Kpm": read_key_file(info.kpm_file).reveal()}
        needles = {f"{label} ({form})": text for label, value in secret_values.items()
                   for form, text in key_forms(value).items()}

        bodies: dict[str, bytes] = {}
        for cse in (mn_cse, in_cse):
            base = f"/{cse.cse_name}"
            everything = cse.discover("fu=1")
            assert everything, f"discovery on {cse.name} found nothing"
            bodies[f"{cse.name} discovery"] = cse.get(f"{base}?fu=1").raw
            for uri in everything:
                bodies[f"{cse.name} {uri}"] = cse.get(f"/{uri}").raw
            bodies[f"{cse.name} {base}?rcn=4"] = cse.get(f"{base}?rcn=4").raw
            for name in ("rspf", "rspf-profile", "rspf-profile.store", "securityProfile", "secp", "rspf:secp",
                         "profile", "credential", "data", "keys", SSAR, "rspf-mssp"):
                bodies[f"{cse.name} {base}/{name}"] = cse.get(f"{base}/{name}").raw
        assert any(b'"/id-mn"' in raw for raw in bodies.values()), "the bodies read carry no resources"
        mgmt = mn_cse.get("/__mgmt__/config")  # ACME's management endpoint (enabled on the MN) dumps its config
        assert mgmt.status == 200 and b"id-mn" in mgmt.raw, str(mgmt)
        bodies["mn /__mgmt__/config"] = mgmt.raw
        logs = {str(p): p.read_text(errors="replace") for cse in (mn_cse, in_cse) for p in cse.log_files()}
        assert any(enrolment.ke_id in text for text in logs.values()), "the logs read are not the CSEs' logs"

        leaks = [f"{needle} in {where}" for where, raw in bodies.items() for needle, text in needles.items()
                 if text.encode() in raw]
        leaks += [f"{needle} in {where}" for where, text in logs.items() for needle, value in needles.items()
                  if value in text]
        assert not leaks, leaks


    def test_ae_at_the_mn_is_checked_against_rules_read_from_the_in(
            self, mef: MefHome, in_cse: AcmeCse, mn_cse: AcmeCse) -> None:
        """An AE registering at an MN-CSE registrar: the MN reads its <serviceSubscribedNode> and rules from the
        IN-CSE over its TLS-PSK Mcc link (TS-0001 §10.2.2.2), allowed there because its MEF key proves it."""
        wait_until(lambda: "cse-in/id-mn" in in_cse.discover("fu=1&ty=16"), 30, "the MN's registration")
        ok = enrol(mef, mef.add_enrolee("mnae1", enrolee_id="Cmnae1", registrar="/id-mn",
                                        registrar_uri=mn_cse.secure_uri))
        res = register(ok, "Nmn-app")
        assert res.rsc == 4128, str(res)           # no node for /id-mn at the IN-CSE yet

        # the operator establishes the MN's service subscription at the IN-CSE
        rule = in_cse.request("POST", "/cse-in", {"m2m:asar": {
            "rn": "mn-rule", "apci": ["12-*@mef.example.com"], "aai": ["Nmn-app"], "aae": ["Cmnae*"]}}, ty=TY_ASAR)
        assert rule.rsc == 2001, str(rule)
        node = in_cse.request("POST", "/cse-in/rspf-mssp", {"m2m:svsn": {
            "ni": "urn:dev:ops:mn1", "csi": "/id-mn", "rlk": [rule.pc("m2m:asar")["ri"]]}}, ty=TY_SVSN)
        assert node.rsc == 2001, str(node)

        res = register(ok, "Nmn-app")
        assert res.rsc == 2001, str(res)
        assert mn_cse.get("Cmnae1").rsc == 2000
        other = enrol(mef, mef.add_enrolee("mnae2", enrolee_id="Cmnae2", registrar="/id-mn",
                                           registrar_uri=mn_cse.secure_uri))
        res = register(other, "Nsomething-else")  # neither the operator's rule nor its own bound rule allows it
        assert res.rsc == 4126, str(res)

    def test_an_ae_cannot_read_the_in_cse_subscription_resources(self, mef: MefHome, in_cse: AcmeCse) -> None:
        """What the IN-CSE opens to a proven CSE is not opened to an AE with a MEF key."""
        enrolment = enrol(mef, add_ae(mef, in_cse, "nosy"))
        assert register(enrolment).rsc == 2001
        got = secure_request(in_cse.secure_port, enrolment.ke_id, enrolment.registrar_key, "GET",
                             f"/cse-in/{SSAR}", origin="Cnosy")
        assert got.rsc == 4103, str(got)
