"""Rules that bind, their removal, MN-CSE recording and crash recovery, with real ACME processes (issue 7, 3-4).

* Per-enrolee App-IDs: the MEF's answer may carry ``allowedAppIDs`` (docs/mef-interface.md). To choose any
  answer (also ones the real MEF would never send), these tests run a **stand-in MEF** in the test process: a
  TLS-PSK server on the project's transport that answers ``fetchCredentials`` for keys the test made, with the
  App-IDs the test chose (the real MEF's ``--app-id`` is tested in test_acme_plugin.py). The CSE is a real
  ``acmecse`` with the plugin; the AEs connect with those keys.
* Deletion: an ``<AE>`` deleted takes its rule along (ACME's ``aeHasDeregistered``); ``forget_credential`` is
  called directly in the CSE through a test-only plugin that serves a one-call RPC on loopback.
* Crash recovery: ACME with its file database, killed (SIGKILL, by PID) right after a 2001.
* MN-CSE: a real MEF, an IN-CSE and an MN-CSE; the MN records its AEs at the IN under its node.

Every server is started here on a free loopback port and stopped by PID (or, in-process, by the test).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from rspf import wire
from rspf.enrolee import Enrolee, EnroleeConfig
from rspf.errors import RSC
from rspf.fileutil import read_key_file
from rspf.httpserver import ServerLimits, TlsHttpServer
from rspf.mef import protocol
from rspf.secret import Secret
from rspf.ssar import bound_rule_name, node_label
from rspf.tls import PskServer, ServerTls

from .acme_harness import (
    FQDN,
    HOST,
    IN_CSE_ID,
    TY_AE,
    TY_ASAR,
    TY_SVSN,
    AcmeCse,
    Resp,
    ae_body,
    secure_request,
    wait_until,
)
from .support import Cli, MefHome, TargetInfo, enrolee_client, free_port, write_private

TARGET_IDENTITY = "id-in@sp.example.com"
DEFAULT_APPS = "Ndefault"


# ----------------------------------------------------------------------------------------- stand-in MEF
class StandInMef(TlsHttpServer):
    """Answers ``GET /fetchCredentials/<KeID>/22`` for the keys in :attr:`keys` to the Target it knows."""

    name = "stand-in-mef"
    lookup_may_block = False
    work_may_block = False

    def __init__(self, target_key: Secret) -> None:
        self.target_key = target_key
        self.keys: dict[str, tuple[Secret, str, tuple[str, ...] | None]] = {}
        super().__init__(PskServer(self._lookup), host=HOST, port=0, limits=ServerLimits())

    def _lookup(self, identity: str, _peer: str | None = None) -> Secret | None:
        return self.target_key if identity == TARGET_IDENTITY else None

    def open_session(self, tls: ServerTls) -> Any | None:
        return tls.psk_identity

    def respond(self, session: Any, req: wire.HttpRequest) -> tuple[wire.HttpResponse, bool]:
        ke_id = req.path.split("/")[2] if req.path.startswith(protocol.PATH_FETCH_CREDENTIALS + "/") else ""
        if ke_id not in self.keys:
            body = protocol.fetch_error("unknown KeID")
            return wire.onem2m_response(RSC.NOT_FOUND, body, request_id=req.header("x-m2m-ri")), False
        key, enrolee_id, apps = self.keys[ke_id]
        body = protocol.fetch_response(key.reveal(), enrolee_id, "20991231T000000", apps)
        return wire.onem2m_response(RSC.OK, body, request_id=req.header("x-m2m-ri")), False

    def add(self, enrolee_id: str, apps: tuple[str, ...] | None) -> tuple[str, Secret]:
        ke_id = f"{secrets.token_hex(16)}@{FQDN}"
        key = Secret(secrets.token_bytes(32))
        self.keys[ke_id] = (key, enrolee_id, apps)
        return ke_id, key


RPC_PLUGIN = '''\
"""Test only: calls the rspf plugin's forget_credential on request (loopback RPC on port {port})."""
import json, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from acmecse.runtime.PluginSupport import plugin, pluginManager, start, stop


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        cred = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["credential"]
        data = json.dumps({{"removed": pluginManager.rspfSecurity.forget_credential(cred)}}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@plugin(property="rspfTestRpc", priority=90)
class RspfTestRpc:
    server = None

    @start
    def start(self):
        self.server = ThreadingHTTPServer(("127.0.0.1", {port}), _Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @stop
    def stop(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
'''


def forget(port: int, credential_id: str) -> bool:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/", data=json.dumps({"credential": credential_id}).encode(),
                                 method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return bool(json.loads(r.read())["removed"])


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[StandInMef, Path]]:
    root = tmp_path_factory.mktemp("standin")
    key = Secret(secrets.token_bytes(32))
    psk_file = write_private(root / "target.psk", key.reveal().hex() + "\n")
    mef = StandInMef(key)
    mef.start_background()
    try:
        yield mef, psk_file
    finally:
        mef.request_stop()
        mef.shutdown()


@pytest.fixture(scope="module")
def cse(tmp_path_factory: pytest.TempPathFactory, stand_in: tuple[StandInMef, Path]) -> Iterator[AcmeCse]:
    mef, psk_file = stand_in
    root = tmp_path_factory.mktemp("acme-rules")
    home = SimpleNamespace(address=f"{HOST}:{mef.port}", cli=Cli(root))
    cse = AcmeCse(root, "in-rules")
    cse.install(home, "--no-enrol", "--mef-psk-identity", TARGET_IDENTITY, "--mef-psk-file", psk_file,  # type: ignore[arg-type]
                "--allowed-app-ids", DEFAULT_APPS)
    cse.rpc_port = free_port()  # type: ignore[attr-defined]
    (cse.base / "plugins" / "ZRspfTestRpc.py").write_text(RPC_PLUGIN.format(port=cse.rpc_port))  # type: ignore[attr-defined]
    cse.start()
    try:
        yield cse
    finally:
        cse.stop()


def register(cse: AcmeCse, ke_id: str, key: Secret, ae_id: str, app_id: str, *, origin: str | None = None) -> Resp:
    return secure_request(cse.secure_port, ke_id, key, "POST", f"/{cse.cse_name}", ae_body(ae_id, app_id),
                          origin=origin or ae_id, ty=TY_AE)


def bound(cse: AcmeCse, ke_id: str) -> dict[str, Any] | None:
    got = cse.get(bound_rule_name(f"12-{ke_id}"))
    return None if got.rsc == 4004 else got.pc("m2m:asar")


def node(cse: AcmeCse, cse_id: str = IN_CSE_ID) -> dict[str, Any]:
    for uri in cse.discover("fu=1&ty=20"):
        svsn = cse.get(f"/{uri}").pc("m2m:svsn")
        if svsn.get("csi") == cse_id:
            return svsn
    raise AssertionError(f"no node for {cse_id}")


# ============================================================================ 1. rules that bind
class TestBinding:
    def test_each_credential_is_admitted_only_with_its_own_app_ids(self, cse: AcmeCse,
                                                                   stand_in: tuple[StandInMef, Path]) -> None:
        mef = stand_in[0]
        ke_a, key_a = mef.add("Cmeter", ("Nmeter-app",))
        ke_b, key_b = mef.add("Clight", ("Nlight-app", "Nlight-*"))
        # B's credential with A's App-ID, A's credential with B's: refused, nothing is created
        assert register(cse, ke_b, key_b, "Clight", "Nmeter-app").rsc == 4126
        assert register(cse, ke_a, key_a, "Cmeter", "Nlight-app").rsc == 4126
        assert register(cse, ke_a, key_a, "Cmeter", DEFAULT_APPS).rsc == 4126  # the MEF's list replaces the default
        assert cse.get("Cmeter").rsc == 4004 and cse.get("Clight").rsc == 4004
        # the right ones
        assert register(cse, ke_a, key_a, "Cmeter", "Nmeter-app").rsc == 2001
        assert register(cse, ke_b, key_b, "Clight", "Nlight-2").rsc == 2001
        rule = bound(cse, ke_a)
        assert rule is not None and (rule["apci"], rule["aae"], rule["aai"]) == (
            [f"12-{ke_a}"], ["Cmeter"], ["Nmeter-app"])
        assert rule["lbl"] == [node_label(IN_CSE_ID)]
        assert rule["ri"] not in (node(cse).get("rlk") or [])  # the node's ruleLinks stay the operator's

    def test_a_credential_is_admitted_only_with_its_own_ae_id(self, cse: AcmeCse,
                                                              stand_in: tuple[StandInMef, Path]) -> None:
        mef = stand_in[0]
        ke_a, key_a = mef.add("Cowner", ("Nshared",))
        ke_b, key_b = mef.add("Cother", ("Nshared",))  # the same App-IDs: only the AE-ID tells them apart
        assert register(cse, ke_a, key_a, "Cowner", "Nshared").rsc == 2001
        assert cse.request("DELETE", "/cse-in/Cowner").rsc == 2002  # A's AE-ID is free again
        # B's credential with A's AE-ID: refused (the listener's origin binding, and B's rule names Cother only)
        res = register(cse, ke_b, key_b, "Cowner", "Nshared")
        assert res.rsc in (4106, 4126), str(res)
        assert cse.get("Cowner").rsc == 4004
        rule_b = bound(cse, ke_b)
        assert rule_b is not None and rule_b["aae"] == ["Cother"]

    def test_default_app_ids_apply_when_the_mef_sets_none(self, cse: AcmeCse,
                                                          stand_in: tuple[StandInMef, Path]) -> None:
        ke, key = stand_in[0].add("Cplain", None)
        assert register(cse, ke, key, "Cplain", "Nelse").rsc == 4126
        assert register(cse, ke, key, "Cplain", DEFAULT_APPS).rsc == 2001
        rule = bound(cse, ke)
        assert rule is not None and rule["aai"] == [DEFAULT_APPS]


    def test_app_ids_a_rule_cannot_hold_record_nothing(self, cse: AcmeCse,
                                                       stand_in: tuple[StandInMef, Path]) -> None:
        """A MEF answer whose App-IDs are no allowedApp-IDs patterns (not starting with '*', 'R' or 'N'): the
        credential is not recorded, so it registers with no App-ID (and the default does not step in)."""
        ke, key = stand_in[0].add("Cbadapps", ("meter-app",))
        assert register(cse, ke, key, "Cbadapps", "Nmeter-app").rsc == 4126
        assert register(cse, ke, key, "Cbadapps", DEFAULT_APPS).rsc == 4126
        assert bound(cse, ke) is None and cse.get("Cbadapps").rsc == 4004
        assert "App-ID pattern 'meter-app' must start with" in cse.log_text()


# ======================================================================= 2. entries go away
class TestRemoval:
    def test_deleting_the_ae_removes_its_rule_and_it_can_register_again(
            self, cse: AcmeCse, stand_in: tuple[StandInMef, Path]) -> None:
        ke, key = stand_in[0].add("Cgone", ("Ngone",))
        assert register(cse, ke, key, "Cgone", "Ngone").rsc == 2001
        name = bound_rule_name(f"12-{ke}")
        assert bound(cse, ke) is not None
        deleted = secure_request(cse.secure_port, ke, key, "DELETE", "/cse-in/Cgone", origin="Cgone")
        assert deleted.rsc == 2002, str(deleted)
        wait_until(lambda: bound(cse, ke) is None, 15, "the rule of the deleted AE to go")
        # the credential is still valid at the MEF: it registers again and is recorded again
        assert register(cse, ke, key, "Cgone", "Ngone").rsc == 2001
        assert bound(cse, ke) is not None and bound(cse, ke)["ri"] == name  # type: ignore[index]

    def test_forget_credential(self, cse: AcmeCse, stand_in: tuple[StandInMef, Path]) -> None:
        ke, key = stand_in[0].add("Cforget", ("Nforget",))
        assert register(cse, ke, key, "Cforget", "Nforget").rsc == 2001
        other_ke, other_key = stand_in[0].add("Ckeep", ("Nkeep",))
        assert register(cse, other_ke, other_key, "Ckeep", "Nkeep").rsc == 2001
        port = cse.rpc_port  # type: ignore[attr-defined]
        assert forget(port, f"12-{ke}") is True
        assert bound(cse, ke) is None
        assert bound(cse, other_ke) is not None  # only that credential's entries
        assert forget(port, f"12-{ke}") is False  # nothing left to remove
        assert forget(port, "12-unknown@mef.example.com") is False


# ========================================================================== 3. crash recovery
def _resources_file(cse: AcmeCse) -> Path:
    found = sorted((cse.base / "data").glob("resources-*.json"))
    assert len(found) == 1, found
    return found[0]


def _stored(cse: AcmeCse, table: str, doc_id: str) -> bool:
    data = cse.base / "data"
    for f in data.glob("*.json"):
        try:
            tables = json.loads(f.read_text() or "{}")
        except ValueError:
            continue  # being written
        if doc_id in (tables.get(table) or {}):
            return True
    return False


@pytest.fixture
def file_cse(tmp_path: Path, stand_in: tuple[StandInMef, Path]) -> Iterator[AcmeCse]:
    mef, psk_file = stand_in
    home = SimpleNamespace(address=f"{HOST}:{mef.port}", cli=Cli(tmp_path))
    cse = AcmeCse(tmp_path, "in-file")
    cse.install(home, "--no-enrol", "--mef-psk-identity", TARGET_IDENTITY, "--mef-psk-file", psk_file,  # type: ignore[arg-type]
                "--allowed-app-ids", DEFAULT_APPS)
    cse.ini.write_text(cse.ini.read_text().replace("databaseType=memory", "databaseType=tinydb"))
    cse.start()
    try:
        yield cse
    finally:
        cse.stop()


def _kill(cse: AcmeCse) -> None:
    assert cse.proc is not None
    os.kill(cse.proc.pid, signal.SIGKILL)
    cse.proc.wait(20)


class TestCrashRecovery:
    def test_an_ae_lost_in_a_crash_can_register_again(self, file_cse: AcmeCse,
                                                      stand_in: tuple[StandInMef, Path]) -> None:
        """The state a SIGKILL leaves when the originator table was flushed and the resources were not
        (made exact here: the <AE> is taken out of the resources file while the CSE is down)."""
        ke, key = stand_in[0].add("Ccrash", ("Ncrash",))
        assert register(file_cse, ke, key, "Ccrash", "Ncrash").rsc == 2001
        wait_until(lambda: _stored(file_cse, "originators", "Ccrash") and _stored(file_cse, "resources", "Ccrash"),
                   15, "ACME to write the registration to its files")
        _kill(file_cse)
        path = _resources_file(file_cse)
        tables = json.loads(path.read_text())
        del tables["resources"]["Ccrash"]
        path.write_text(json.dumps(tables))
        file_cse.start()
        assert file_cse.get("Ccrash").rsc == 4004  # the <AE> is gone, the originator is still counted
        res = register(file_cse, ke, key, "Ccrash", "Ncrash")
        assert res.rsc == 2001, str(res)  # without the recovery: 4117 for good
        assert file_cse.get("Ccrash").pc("m2m:ae")["aei"] == "Ccrash"
        assert "counted as registered without an <AE>" in file_cse.log_text()
        # a registered AE stays protected: registering it again is still 4117
        assert register(file_cse, ke, key, "Ccrash", "Ncrash").rsc == 4117

    def test_kill_right_after_2001_then_restart(self, file_cse: AcmeCse, stand_in: tuple[StandInMef, Path]) -> None:
        """The real race: SIGKILL at once after the 2001. Whatever ACME had written, the device is registered
        after the restart, or can register again."""
        ke, key = stand_in[0].add("Crace", ("Nrace",))
        assert register(file_cse, ke, key, "Crace", "Nrace").rsc == 2001
        _kill(file_cse)
        file_cse.start()
        if file_cse.get("Crace").rsc == 2000:
            assert register(file_cse, ke, key, "Crace", "Nrace").rsc == 4117
        else:
            res = register(file_cse, ke, key, "Crace", "Nrace")
            assert res.rsc == 2001, str(res)


# ======================================================================= 4. MN-CSE recording
@pytest.fixture(scope="module")
def mn_world(tmp_path_factory: pytest.TempPathFactory,
             mef_target: tuple[MefHome, TargetInfo]) -> Iterator[tuple[MefHome, AcmeCse, AcmeCse]]:
    mef, target = mef_target
    root = tmp_path_factory.mktemp("acme-mn-rules")
    in_cse = AcmeCse(root, "in")
    in_cse.install(mef, "--no-enrol", "--mef-psk-identity", target.psk_identity, "--mef-psk-file", target.psk_file)
    in_cse.start()
    info = mef.add_enrolee("mnr", enrolee_id="/id-mnr", node_id="urn:dev:ops:mnr", registrar=IN_CSE_ID,
                           registrar_uri=in_cse.secure_uri)
    mn = AcmeCse(root, "mn", cse_type="MN", cse_id="id-mnr-placeholder", cse_name="cse-mn")
    mn.install(mef, "--kpm-id", info.kpm_id, "--kpm-file", info.kpm_file, "--node-id", info.node_id,
               "--allowed-app-ids", "Nmn-app")
    mn.enrolee = info
    try:
        mn.start()
        wait_until(lambda: "cse-in/id-mnr" in in_cse.discover("fu=1&ty=16"), 45, "the MN's registration")
        yield mef, in_cse, mn
    finally:
        mn.stop()
        in_cse.stop()


class TestMnRecording:
    def test_the_mn_records_its_aes_at_the_in_under_its_node(self, mn_world: tuple[MefHome, AcmeCse, AcmeCse]) -> None:
        mef, in_cse, mn = mn_world
        ae = enrolee_client(mef, mef.add_enrolee("mnrae", enrolee_id="Cmnrae", registrar="/id-mnr",
                                                 registrar_uri=mn.secure_uri)).enrol()
        port = mn.secure_port

        def reg(app: str) -> Resp:
            return secure_request(port, ae.ke_id, ae.registrar_key, "POST", "/cse-mn", ae_body("Cmnrae", app),
                                  origin="Cmnrae", ty=TY_AE)

        assert reg("Nmn-app").rsc == 4128  # no node for the MN at the IN yet: nothing can be recorded
        created = in_cse.request("POST", "/cse-in/rspf-mssp", {"m2m:svsn": {
            "ni": "urn:dev:ops:mnr", "csi": "/id-mnr", "rlk": []}}, ty=TY_SVSN)
        assert created.rsc == 2001, str(created)
        assert reg("Nother").rsc == 4126     # its bound rule allows the MN's App-IDs only
        assert reg("Nmn-app").rsc == 2001
        rule = bound(in_cse, ae.ke_id)
        assert rule is not None, "the MN recorded nothing at the IN"
        assert (rule["apci"], rule["aae"], rule["aai"], rule["lbl"]) == (
            [f"12-{ae.ke_id}"], ["Cmnrae"], ["Nmn-app"], [node_label("/id-mnr")])
        # it belongs to the MN's node by its label (not the IN-CSE's); no node's ruleLinks list it
        assert rule["ri"] not in (node(in_cse, "/id-mnr").get("rlk") or [])
        assert rule["ri"] not in (node(in_cse).get("rlk") or [])
        # the AE is deleted at the MN: the MN removes its rule at the IN
        assert secure_request(port, ae.ke_id, ae.registrar_key, "DELETE", "/cse-mn/Cmnrae",
                              origin="Cmnrae").rsc == 2002
        wait_until(lambda: bound(in_cse, ae.ke_id) is None, 20, "the MN to remove the rule at the IN")

    def test_a_registrar_cse_can_record_only_rules_that_bind(self, mn_world: tuple[MefHome, AcmeCse, AcmeCse]) -> None:
        """The MN's own credential, used the way a compromised MN could: a wildcard or misnamed rule, and a rule
        of the IN-CSE's own node, are refused."""
        mef, in_cse, mn = mn_world
        assert mn.enrolee is not None
        info = mn.enrolee
        enrolment = Enrolee(EnroleeConfig(
            mef_host=HOST, mef_port=mef.port, mef_fqdn=FQDN, kpm_id=info.kpm_id, kpm=read_key_file(info.kpm_file),
            node_id=info.node_id, store_path=mn.base / "data" / "rspf-profile.store")).load()
        assert enrolment is not None
        if not any(n.get("csi") == "/id-mnr" for n in [in_cse.get(f"/{u}").pc("m2m:svsn")
                                                       for u in in_cse.discover("fu=1&ty=20")]):
            assert in_cse.request("POST", "/cse-in/rspf-mssp", {"m2m:svsn": {
                "ni": "urn:dev:ops:mnr", "csi": "/id-mnr", "rlk": []}}, ty=TY_SVSN).rsc == 2001

        def as_mn(method: str, path: str, content: Any = None, ty: int | None = None) -> Resp:
            return secure_request(in_cse.secure_port, enrolment.ke_id, enrolment.registrar_key, method, path,
                                  content, origin="/id-mnr", ty=ty)

        cred = f"12-{secrets.token_hex(16)}@{FQDN}"
        lies = [
            {"rn": bound_rule_name(cred), "apci": ["12-*"], "aae": ["Cx"], "aai": ["*"]},
            {"rn": bound_rule_name(cred), "apci": [cred], "aae": ["C*"], "aai": ["*"]},
            {"rn": bound_rule_name("12-other"), "apci": [cred], "aae": ["Cx"], "aai": ["*"]},
            {"rn": "mn-wildcard", "apci": ["*"], "aae": ["*"], "aai": ["*"]},
        ]
        for attrs in lies:
            res = as_mn("POST", "/cse-in", {"m2m:asar": attrs}, TY_ASAR)
            assert res.rsc in (4000, 4103), f"{attrs}: {res}"
        assert in_cse.get(bound_rule_name(cred)).rsc == 4004 and in_cse.get("mn-wildcard").rsc == 4004
        # a rule the IN-CSE recorded for its own AE cannot be changed or deleted by the MN
        own = enrolee_client(mef, mef.add_enrolee("inown", enrolee_id="Cinown", registrar=IN_CSE_ID,
                                                  registrar_uri=in_cse.secure_uri)).enrol()
        assert secure_request(in_cse.secure_port, own.ke_id, own.registrar_key, "POST", "/cse-in",
                              ae_body("Cinown", "Nany"), origin="Cinown", ty=TY_AE).rsc == 2001
        name = bound_rule_name(f"12-{own.ke_id}")
        assert as_mn("PUT", f"/cse-in/{name}", {"m2m:asar": {"aae": ["Cmine"]}}).rsc == 4103
        assert as_mn("DELETE", f"/cse-in/{name}").rsc == 4103
        assert bound(in_cse, own.ke_id) is not None
