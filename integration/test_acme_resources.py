"""<m2mServiceSubscriptionProfile>, <serviceSubscribedNode> and <serviceSubscribedAppRule> in a real ACME CSE.

A temporary ACME base directory gets an acme.ini (memory database, free loopback port) and a plugin shim
``plugins/RspfResTest.py`` that imports a small test plugin. The plugin calls
``rspf.acme.patches.install_resource_types()`` in ``@init`` (and makes SIGTERM a graceful exit); in
``@start`` it serves a tiny JSON RPC on another loopback port so the tests can call the lookup/update helpers
inside the CSE process. ACME runs as ``acmecse --headless`` and imports the INSTALLED ``rspf`` (after
changing plugin/rspf/acme/: ``pip install --no-deps --force-reinstall .``).

Readiness is polled: user plugins start after every ACME binding/core plugin, so once the RPC answers,
ACME's HTTP server is fully set up (an HTTP request during ACME's start-up can make its web UI plugin fail
with Flask's "already handled its first request"). The CSE is stopped by PID (SIGTERM, then wait).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import count
from pathlib import Path
from typing import Any

import pytest

from .acme_harness import wait_until
from .support import free_port

ACMECSE = Path(sys.executable).parent / "acmecse"
HOST = "127.0.0.1"
START_TIMEOUT = 40.0
STOP_TIMEOUT = 15.0
POLL_TIMEOUT = 15.0
ADMIN = "CAdmin"

# The test plugin, written into <tmp>/lib and imported by the shim in <baseDir>/plugins.
PLUGIN_SOURCE = '''\
"""Test-only ACME plugin: installs rspf's resource types; JSON RPC for the lookup/update helpers."""
import json, os, signal, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from acmecse.runtime.PluginSupport import init, plugin, start, stop


def _ri(res):
    return None if res is None else res.ri


def _call(fn, args):
    from rspf.acme import resources as r

    if fn == "ping":
        return "pong"
    if fn == "install":
        from rspf.acme.patches import install_resource_types

        install_resource_types()
        return None
    if fn == "find_svsn":
        return _ri(r.find_service_subscribed_node(*args))
    if fn == "rules_of":
        return [x.ri for x in r.rules_of(r.find_service_subscribed_node(*args))]
    if fn == "resolve":
        return _ri(r.resolve_local(*args))
    if fn == "rule_allows":
        rule, *rest = args
        return r.rule_allows(r.resolve_local(rule), *rest)
    if fn == "record_binding":
        from rspf.ssar import Binding

        cred, ae, apps, cse_id = args
        return r.record_binding(Binding.of(cred, ae, apps, ()), cse_id)
    if fn == "forget_binding":
        return r.forget_binding(*args)
    if fn == "ensure_subscription":
        return _ri(r.ensure_subscription(*args))
    raise KeyError(fn)


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        try:
            out = {"ok": _call(body["fn"], body.get("args", []))}
        except Exception as exc:
            out = {"error": type(exc).__name__, "message": str(getattr(exc, "dbg", None) or exc)}
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the concurrency test opens many connections at once


@plugin(property="rspfResTest", priority=10)
class RspfResTestPlugin:
    def __init__(self):
        self.server = None

    @init
    def init(self):
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_a: sys.exit(0))
        from rspf.acme.patches import install_resource_types

        install_resource_types()

    @start
    def start(self):
        self.server = _Server(("127.0.0.1", int(os.environ["RSPF_RESTEST_RPC_PORT"])), _Handler)
        threading.Thread(target=self.server.serve_forever, name="rspf-restest-rpc", daemon=True).start()

    @stop
    def stop(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
'''
SHIM = "from rspf_restest_plugin import RspfResTestPlugin  # noqa: F401\n"


# ----------------------------------------------------------------------------------------- helpers
def onem2m_time(delta: timedelta) -> str:
    return (datetime.now(UTC) + delta).strftime("%Y%m%dT%H%M%S")


@dataclass
class Resp:
    status: int
    rsc: int | None
    body: Any

    def pc(self, sn: str) -> dict[str, Any]:
        assert isinstance(self.body, dict) and sn in self.body, f"no {sn} in {self}"
        return self.body[sn]

    def __str__(self) -> str:
        return f"HTTP {self.status} RSC {self.rsc}: {json.dumps(self.body)[:600]}"


class RpcError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class Cse:
    """A running ``acmecse --headless`` with the test plugin."""

    def __init__(self, root: Path, cse_type: str = "IN", cse_id: str = "id-in", cse_name: str = "cse-in") -> None:
        self.root = root
        self.base = root / "base"
        self.lib = root / "lib"
        self.port = free_port()
        self.rpc_port = free_port()
        self.cse_id = cse_id
        self.cse_name = cse_name
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self._ri = count()
        (self.base / "plugins").mkdir(parents=True)
        self.lib.mkdir()
        (self.lib / "rspf_restest_plugin.py").write_text(PLUGIN_SOURCE)
        (self.base / "plugins" / "RspfResTest.py").write_text(SHIM)
        (self.base / "acme.ini").write_text(
            "[basic.config]\n"
            f"cseType={cse_type}\ncseID={cse_id}\ncseName={cse_name}\nadminID={ADMIN}\n"
            f"networkInterface={HOST}\ncseHost={HOST}\nhttpPort={self.port}\n"
            "logLevel=debug\ndatabaseType=memory\n"
            "[cse]\ncheckExpirationsInterval=1\n"
            "[textui]\nstartWithTUI=false\n"
            "[logging]\nenableFileLogging=true\n"
        )

    # -------------------------------------------------------------------------- process
    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(self.lib)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env["PYTHONUNBUFFERED"] = "1"
        env["RSPF_RESTEST_RPC_PORT"] = str(self.rpc_port)
        self.out = open(self.root / "acme.out", "wb")  # noqa: SIM115 - ACME's stdout until stop()
        self.proc = subprocess.Popen([str(ACMECSE), "--headless", "-dir", str(self.base)], cwd=self.root, env=env,
                                     stdout=self.out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"acmecse exited with {self.proc.returncode} during start-up:\n{self.output()}")
            try:
                if self.rpc("ping", timeout=0.5) == "pong":
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"acmecse did not start within {START_TIMEOUT:g} s:\n{self.output()}")
            time.sleep(0.05)
        cb = self.request("GET", self.cse_name)
        assert cb.status == 200, cb
        # ACME reports "CSE started" (status RUNNING) after its fixed start-up delay; only a running CSE
        # shuts down gracefully (plugin @stop, storage close) on SIGTERM.
        wait_until(lambda: "CSE started" in (self.root / "acme.out").read_text(errors="replace"),
                   timeout=START_TIMEOUT, what="ACME's 'CSE started'")

    def stop(self) -> int | None:
        if self.proc is None:
            return self.returncode
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(STOP_TIMEOUT)
        self.returncode = self.proc.returncode
        self.proc = None
        self.out.close()
        return self.returncode

    def output(self) -> str:
        text = (self.root / "acme.out").read_text(errors="replace")[-4000:]
        logs = sorted((self.base / "logs").glob("*.log")) if (self.base / "logs").is_dir() else []
        return text + "".join(f"\n--- {p.name} (tail) ---\n" + p.read_text(errors="replace")[-6000:] for p in logs)

    def log_text(self) -> str:
        logs = sorted((self.base / "logs").glob("*.log")) if (self.base / "logs").is_dir() else []
        return "".join(p.read_text(errors="replace") for p in logs)

    # -------------------------------------------------------------------------- oneM2M over HTTP
    def request(self, method: str, path: str, origin: str = ADMIN, ty: int | None = None, body: Any = None,
                query: dict[str, Any] | None = None) -> Resp:
        url = f"http://{HOST}:{self.port}/{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query, doseq=True)
        headers = {"X-M2M-Origin": origin, "X-M2M-RI": f"rq{next(self._ri)}", "X-M2M-RVI": "4",
                   "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json" + (f";ty={ty}" if ty is not None else "")
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=15) as r:
                status, hdrs, raw = r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            status, hdrs, raw = e.code, e.headers, e.read()
        rsc = hdrs.get("X-M2M-RSC")
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode(errors="replace")
        return Resp(status, int(rsc) if rsc else None, parsed)

    def create(self, parent: str, ty: int, sn: str, attrs: dict[str, Any], origin: str = ADMIN) -> Resp:
        return self.request("POST", parent, origin, ty, {sn: attrs})

    def created(self, parent: str, ty: int, sn: str, attrs: dict[str, Any]) -> dict[str, Any]:
        r = self.create(parent, ty, sn, attrs)
        assert (r.status, r.rsc) == (201, 2001), r
        return r.pc(sn)

    def discover(self, origin: str = ADMIN, **filters: Any) -> list[str]:
        r = self.request("GET", self.cse_name, origin, query={"fu": 1, **filters})
        assert (r.status, r.rsc) == (200, 2000), r
        return r.pc("m2m:uril")

    # -------------------------------------------------------------------------- helpers inside ACME
    def rpc(self, fn: str, *args: Any, timeout: float = 15) -> Any:
        data = json.dumps({"fn": fn, "args": list(args)}).encode()
        req = urllib.request.Request(f"http://{HOST}:{self.rpc_port}/", data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            out = json.loads(r.read())
        if "error" in out:
            raise RpcError(out["error"], out["message"])
        return out["ok"]


class NotificationSink:
    """Loopback HTTP server that answers oneM2M NOTIFY requests with 2000 and records their bodies."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw) if raw else {}
                except ValueError:
                    body = {"raw": raw.decode(errors="replace")}
                with sink._lock:
                    sink.received.append(body)
                self.send_response(200)
                self.send_header("X-M2M-RSC", "2000")
                self.send_header("X-M2M-RI", self.headers.get("X-M2M-RI", ""))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{HOST}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def notifications_for(self, sub_ri_or_path: str) -> list[dict[str, Any]]:
        with self._lock:
            items = list(self.received)
        return [b["m2m:sgn"] for b in items if "m2m:sgn" in b and sub_ri_or_path in str(b["m2m:sgn"].get("sur"))]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cse]:
    instance = Cse(tmp_path_factory.mktemp("acme-in"))
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="module")
def sink() -> Iterator[NotificationSink]:
    s = NotificationSink()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def uniq(request: pytest.FixtureRequest) -> str:
    """A resource-name prefix unique to the test (the CSE is shared by the module)."""
    return request.node.name.replace("test_", "").replace("_", "")[:40]


@pytest.fixture(scope="module")
def resources_module() -> Any:
    from rspf.acme import resources  # the installed package; top-level imports are stdlib only

    return resources


# ============================================================================== the resource types
def test_cse_base_srt_lists_the_three_types(cse: Cse) -> None:
    cb = cse.request("GET", cse.cse_name).pc("m2m:cb")
    assert {11, 19, 20} <= set(cb["srt"])
    assert "No resource class found" not in cse.log_text()
    assert "No attribute policy for" not in cse.log_text()


def test_service_subscribed_app_rule_crud(cse: Cse, uniq: str) -> None:
    rule = cse.created(cse.cse_name, 19, "m2m:asar", {
        "rn": uniq, "lbl": ["t"], "apci": ["10-key@mef.example.com"], "aai": ["Nmyapp", "R123*X"], "aae": ["C*"],
        "ari": ["0123456789-role"]})
    assert rule["ty"] == 19 and rule["rn"] == uniq and rule["pi"] == cse.cse_id
    assert rule["apci"] == ["10-key@mef.example.com"] and rule["aai"] == ["Nmyapp", "R123*X"]
    assert rule["aae"] == ["C*"] and rule["ari"] == ["0123456789-role"] and rule["lbl"] == ["t"]
    assert rule["et"] and rule["ct"] and rule["lt"] and rule["ri"]

    path = f"{cse.cse_name}/{uniq}"
    got = cse.request("GET", path)
    assert (got.status, got.rsc) == (200, 2000), got
    assert got.pc("m2m:asar") == rule
    assert cse.request("GET", rule["ri"]).pc("m2m:asar")["rn"] == uniq  # unstructured ID as well

    upd = cse.request("PUT", path, body={"m2m:asar": {"aae": ["C*", "Cabc"], "apci": ["*"]}})
    assert (upd.status, upd.rsc) == (200, 2004), upd
    after = cse.request("GET", path).pc("m2m:asar")
    assert after["aae"] == ["C*", "Cabc"] and after["apci"] == ["*"] and after["aai"] == ["Nmyapp", "R123*X"]
    assert after["lt"] >= rule["lt"]

    removed = cse.request("PUT", path, body={"m2m:asar": {"ari": None}})
    assert removed.rsc == 2004, removed
    assert "ari" not in cse.request("GET", path).pc("m2m:asar")

    gone = cse.request("DELETE", path)
    assert (gone.status, gone.rsc) == (200, 2002), gone
    assert cse.request("GET", path).rsc == 4004


def test_subscription_profile_and_node_crud(cse: Cse, uniq: str) -> None:
    mssp = cse.created(cse.cse_name, 11, "m2m:mssp", {"rn": uniq, "lbl": ["x"]})
    assert mssp["ty"] == 11 and mssp["pi"] == cse.cse_id
    mpath = f"{cse.cse_name}/{uniq}"
    node = cse.created(mpath, 20, "m2m:svsn", {
        "rn": "node", "ni": "urn:dev:ops:001-test-1", "csi": "/id-mn1", "di": ["urn:dev:ops:001-test-1"],
        "rlk": [], "nrq": False})
    assert node["ty"] == 20 and node["pi"] == mssp["ri"]
    assert node["rlk"] == [] and node["csi"] == "/id-mn1" and node["di"] == ["urn:dev:ops:001-test-1"]
    npath = f"{mpath}/node"
    assert cse.request("GET", npath).pc("m2m:svsn") == node

    upd = cse.request("PUT", npath, body={"m2m:svsn": {"rlk": ["cse-in/whatever"], "nrq": True}})
    assert upd.rsc == 2004, upd
    assert cse.request("GET", npath).pc("m2m:svsn")["rlk"] == ["cse-in/whatever"]
    for write_once in ({"ni": "other"}, {"csi": "/id-other"}, {"di": ["x"]}):  # NP on UPDATE
        r = cse.request("PUT", npath, body={"m2m:svsn": write_once})
        assert r.rsc == 4000, (write_once, r)

    # parent/child relations: svsn only under an mssp; mssp and asar only under the CSEBase
    assert cse.create(cse.cse_name, 20, "m2m:svsn", {"ni": "n"}).rsc == 4108
    assert cse.create(mpath, 19, "m2m:asar", {}).rsc == 4108
    assert cse.create(mpath, 11, "m2m:mssp", {}).rsc == 4108
    assert cse.create(npath, 20, "m2m:svsn", {"ni": "n"}).rsc == 4108

    assert cse.request("DELETE", mpath).rsc == 2002
    assert cse.request("GET", npath).rsc == 4004


def test_node_id_is_mandatory(cse: Cse, uniq: str) -> None:
    cse.created(cse.cse_name, 11, "m2m:mssp", {"rn": uniq})
    r = cse.create(f"{cse.cse_name}/{uniq}", 20, "m2m:svsn", {"csi": "/id-x"})
    assert (r.status, r.rsc) == (400, 4000), r
    assert cse.request("DELETE", f"{cse.cse_name}/{uniq}").rsc == 2002


def test_rule_links_without_cse_id_are_a_bad_request(cse: Cse, uniq: str) -> None:
    cse.created(cse.cse_name, 11, "m2m:mssp", {"rn": uniq})
    mpath = f"{cse.cse_name}/{uniq}"
    r = cse.create(mpath, 20, "m2m:svsn", {"rn": "a", "ni": "n-a", "rlk": ["cse-in/r"]})
    assert (r.status, r.rsc) == (400, 4000), r
    assert "CSE-ID" in json.dumps(r.body)
    assert cse.request("GET", f"{mpath}/a").rsc == 4004
    # allowed without ruleLinks; adding ruleLinks later still needs the CSE-ID
    cse.created(mpath, 20, "m2m:svsn", {"rn": "b", "ni": "n-b"})
    r = cse.request("PUT", f"{mpath}/b", body={"m2m:svsn": {"rlk": []}})
    assert (r.status, r.rsc) == (400, 4000), r
    assert "rlk" not in cse.request("GET", f"{mpath}/b").pc("m2m:svsn")
    assert cse.request("DELETE", mpath).rsc == 2002


def test_allowed_app_ids_must_start_with_star_r_or_n(cse: Cse, uniq: str) -> None:
    for bad in (["Cabc"], ["Nok", "S1"], [""], ["xN"]):
        r = cse.create(cse.cse_name, 19, "m2m:asar", {"rn": f"{uniq}bad", "aai": bad})
        assert (r.status, r.rsc) == (400, 4000), (bad, r)
    assert cse.request("GET", f"{cse.cse_name}/{uniq}bad").rsc == 4004

    good = cse.created(cse.cse_name, 19, "m2m:asar", {"rn": uniq, "aai": ["*", "R12*X", "Napp"]})
    path = f"{cse.cse_name}/{uniq}"
    r = cse.request("PUT", path, body={"m2m:asar": {"aai": ["Napp", "Cnope"]}})
    assert (r.status, r.rsc) == (400, 4000), r
    assert cse.request("GET", path).pc("m2m:asar")["aai"] == good["aai"]  # unchanged
    assert cse.request("PUT", path, body={"m2m:asar": {"aai": ["Rnew"]}}).rsc == 2004
    assert cse.request("DELETE", path).rsc == 2002


def test_attribute_types_are_validated(cse: Cse, uniq: str) -> None:
    for attrs in ({"apci": "not-a-list"}, {"aae": [1]}, {"unknownAttr": 1}, {"ri": "x"}):
        r = cse.create(cse.cse_name, 19, "m2m:asar", {"rn": uniq, **attrs})
        assert (r.status, r.rsc) == (400, 4000), (attrs, r)
    wrong_wrapper = cse.request("POST", cse.cse_name, ty=19, body={"m2m:mssp": {"rn": uniq}})
    assert wrong_wrapper.rsc == 4000, wrong_wrapper


def test_expiration_time(cse: Cse, uniq: str) -> None:
    past = cse.create(cse.cse_name, 19, "m2m:asar", {"rn": uniq, "et": onem2m_time(timedelta(hours=-1))})
    assert (past.status, past.rsc) == (400, 4000), past
    soon = cse.created(cse.cse_name, 19, "m2m:asar", {"rn": uniq, "et": onem2m_time(timedelta(seconds=2))})
    assert soon["et"].startswith(onem2m_time(timedelta(seconds=2))[:9])
    path = f"{cse.cse_name}/{uniq}"
    wait_until(lambda: cse.request("GET", path).rsc == 4004, what="the expired <serviceSubscribedAppRule> to go")


def test_discovery_by_type_and_attribute(cse: Cse, uniq: str) -> None:
    cse.created(cse.cse_name, 19, "m2m:asar", {"rn": uniq, "aai": ["*"]})
    cse.created(cse.cse_name, 11, "m2m:mssp", {"rn": f"{uniq}p"})
    cse.created(f"{cse.cse_name}/{uniq}p", 20, "m2m:svsn", {"rn": "n", "ni": "n", "csi": "/id-disc1"})
    rule, prof, node = f"{cse.cse_name}/{uniq}", f"{cse.cse_name}/{uniq}p", f"{cse.cse_name}/{uniq}p/n"

    found = cse.discover(ty=19)
    assert rule in found and prof not in found and node not in found
    assert set(cse.discover(ty=[11, 20])) >= {prof, node} and rule not in cse.discover(ty=[11, 20])
    assert cse.discover(ty=20, csi="/id-disc1") == [node]  # TS-0001 §10.2.2.2: filter CSE-ID={Registrar-CSE-ID}
    assert cse.discover(ty=20, csi="/id-nothing") == []
    # the resources do not leak into other type filters
    assert rule not in cse.discover(ty=2) and node not in cse.discover(ty=14)
    # child resource references (rcn=6) carry the new types
    refs = {c["val"]: c["typ"] for c in cse.request("GET", cse.cse_name, query={"rcn": 6}).pc("m2m:rrl")["rrf"]}
    assert (refs[f"/{cse.cse_id}/{rule}"], refs[f"/{cse.cse_id}/{prof}"], refs[f"/{cse.cse_id}/{node}"]) == (19, 11, 20)
    for p in (rule, prof):
        assert cse.request("DELETE", p).rsc == 2002


def test_access_control_like_other_resources(cse: Cse, uniq: str) -> None:
    # the CSEBase's ACP lets everybody create only <ACP> and <notificationTargetPolicy>
    for ty, sn in ((19, "m2m:asar"), (11, "m2m:mssp")):
        r = cse.create(cse.cse_name, ty, sn, {"rn": f"{uniq}{ty}"}, origin="Cstranger")
        assert (r.status, r.rsc) == (403, 4103), r

    rule = cse.created(cse.cse_name, 19, "m2m:asar", {"rn": uniq, "aai": ["*"]})
    path = f"{cse.cse_name}/{uniq}"
    # no acpi: only the creator (and the CSE admin) have access
    assert cse.request("GET", path, origin="Cstranger").rsc == 4103
    assert cse.request("PUT", path, origin="Cstranger", body={"m2m:asar": {"aae": ["*"]}}).rsc == 4103
    assert cse.request("DELETE", path, origin="Cstranger").rsc == 4103
    assert uniq not in " ".join(cse.discover(origin="Cstranger", ty=19))

    acp = cse.created(cse.cse_name, 1, "m2m:acp", {
        "rn": f"{uniq}acp",
        "pv": {"acr": [{"acor": ["Creader"], "acop": 2 | 32}]},  # RETRIEVE + DISCOVERY
        "pvs": {"acr": [{"acor": [ADMIN], "acop": 63}]}})
    assert cse.request("PUT", path, body={"m2m:asar": {"acpi": [acp["ri"]]}}).rsc == 2004

    got = cse.request("GET", path, origin="Creader")
    assert (got.status, got.rsc) == (200, 2000), got
    assert got.pc("m2m:asar")["ri"] == rule["ri"]
    assert path in cse.discover(origin="Creader", ty=19)
    assert cse.request("PUT", path, origin="Creader", body={"m2m:asar": {"aae": ["*"]}}).rsc == 4103
    assert cse.request("DELETE", path, origin="Creader").rsc == 4103
    assert cse.request("GET", path, origin="Cstranger").rsc == 4103
    assert "aae" not in cse.request("GET", path).pc("m2m:asar")

    assert cse.request("DELETE", path).rsc == 2002
    assert cse.request("DELETE", f"{cse.cse_name}/{uniq}acp").rsc == 2002


def test_own_cse_id_in_a_node_does_not_hide_the_cse_base(cse: Cse, uniq: str) -> None:
    """ACME finds <CSEBase>/<remoteCSE> by their csi; a <serviceSubscribedNode> carries one too."""
    cse.created(cse.cse_name, 11, "m2m:mssp", {"rn": uniq})
    cse.created(f"{cse.cse_name}/{uniq}", 20, "m2m:svsn", {"rn": "self", "ni": "n-self", "csi": f"/{cse.cse_id}"})
    nonblocking = cse.request("GET", cse.cse_name, query={"rt": 1})  # ACME looks the CSEBase up by csi here
    assert (nonblocking.status, nonblocking.rsc) == (202, 1001), nonblocking
    assert cse.request("GET", cse.cse_name).rsc == 2000
    assert "database inconsistency" not in cse.log_text()
    assert cse.request("DELETE", f"{cse.cse_name}/{uniq}").rsc == 2002


def test_subscription_on_a_rule_is_notified(cse: Cse, sink: NotificationSink, uniq: str) -> None:
    cse.created(cse.cse_name, 19, "m2m:asar", {"rn": uniq, "aai": ["*"]})
    path = f"{cse.cse_name}/{uniq}"
    sub = cse.created(path, 23, "m2m:sub", {"rn": "sub", "nu": [sink.url], "enc": {"net": [1]}})
    cse.request("PUT", path, body={"m2m:asar": {"aae": ["Cviahttp"]}})
    notes = wait_until(lambda: [n for n in sink.notifications_for(sub["ri"]) + sink.notifications_for(f"{path}/sub")
                                if "nev" in n], what="an update notification")
    assert notes[0]["nev"]["rep"]["m2m:asar"]["aae"] == ["Cviahttp"]
    assert cse.request("DELETE", path).rsc == 2002


# ============================================================================== helpers inside ACME
def test_install_resource_types_is_idempotent(cse: Cse) -> None:
    assert cse.rpc("install") is None
    assert {11, 19, 20} <= set(cse.request("GET", cse.cse_name).pc("m2m:cb")["srt"])


def test_find_service_subscribed_node_and_rules_of(cse: Cse, uniq: str) -> None:
    a = cse.created(cse.cse_name, 19, "m2m:asar", {"rn": f"{uniq}a", "aai": ["*"]})
    b = cse.created(cse.cse_name, 19, "m2m:asar", {"rn": f"{uniq}b", "aai": ["*"]})
    cse.created(cse.cse_name, 11, "m2m:mssp", {"rn": f"{uniq}p"})
    mpath = f"{cse.cse_name}/{uniq}p"
    links = [a["ri"], f"{cse.cse_name}/{uniq}b", f"/{cse.cse_id}/{a['ri']}",  # dup of a, SP-relative
             f"{cse.cse_name}/{uniq}missing", "/id-elsewhere/asar1", mpath]     # missing, remote, not an asar
    node = cse.created(mpath, 20, "m2m:svsn", {"rn": "n", "ni": "n", "csi": "id-find1", "rlk": links})

    # CSE-ID stored without the leading slash, looked up in SP-relative and absolute form
    assert cse.rpc("find_svsn", "/id-find1") == node["ri"]
    assert cse.rpc("find_svsn", "id-find1") == node["ri"]
    spid = cse.request("GET", cse.cse_name).pc("m2m:cb")["spi"]
    assert cse.rpc("find_svsn", f"{spid}/id-find1") == node["ri"]
    assert cse.rpc("find_svsn", "//other.sp/id-find1") is None
    assert cse.rpc("find_svsn", "/id-find2") is None
    assert cse.rpc("rules_of", "/id-find1") == [a["ri"], b["ri"]]

    cse.request("PUT", f"{mpath}/n", body={"m2m:svsn": {"rlk": []}})
    assert cse.rpc("rules_of", "/id-find1") == []
    for p in (mpath, f"{cse.cse_name}/{uniq}a", f"{cse.cse_name}/{uniq}b"):
        assert cse.request("DELETE", p).rsc == 2002
    assert cse.rpc("find_svsn", "/id-find1") is None


def _node_links(cse: Cse, cse_id: str) -> list[str]:
    for uri in cse.request("GET", f"{cse.cse_name}?fu=1&ty=20").pc("m2m:uril"):
        node = cse.request("GET", uri).pc("m2m:svsn")
        if node.get("csi") == cse_id:
            return list(node.get("rlk") or [])
    raise AssertionError(f"no node for {cse_id}")


def test_record_binding_creates_labels_updates_and_forgets(cse: Cse, uniq: str) -> None:
    cse_id = f"/id-rec{uniq}"
    cse.rpc("ensure_subscription", cse_id, f"{uniq}base", ["*"])
    cred = f"12-{uniq}@mef.example.com"
    name = cse.rpc("record_binding", cred, "Crec", ["Nrec"], cse_id)
    path = f"{cse.cse_name}/{name}"
    rule = cse.request("GET", path).pc("m2m:asar")
    assert rule["ri"] == rule["rn"] == name and name.startswith("rspf-cred-")
    assert (rule["apci"], rule["aae"], rule["aai"]) == ([f"/id-in/{cred}"], ["/id-in/Crec"], ["/id-in/Nrec"]) or (
        rule["apci"], rule["aae"], rule["aai"]) == ([cred], ["Crec"], ["Nrec"])
    # it belongs to the node by its label; the node's ruleLinks (the operator's rules) do not grow
    assert rule["lbl"] == [f"rspf:node={cse_id}"] and name not in _node_links(cse, cse_id)
    assert cse.rpc("record_binding", cred, "Crec", ["Nrec"], cse_id) == name  # idempotent: nothing changes
    assert cse.request("GET", path).pc("m2m:asar")["lt"] == rule["lt"]
    cse.rpc("record_binding", cred, "Crec", ["Nnew"], cse_id)  # the MEF now sends other App-IDs
    assert cse.request("GET", path).pc("m2m:asar")["aai"] in (["Nnew"], ["/id-in/Nnew"])
    assert cse.rpc("forget_binding", cred) is True
    assert cse.request("GET", path).rsc == 4004
    assert cse.rpc("forget_binding", cred) is False
    with pytest.raises(RpcError) as missing:
        cse.rpc("record_binding", cred, "Crec", ["Nrec"], "/id-nonode")
    assert missing.value.kind == "LookupError"


def test_record_binding_under_concurrency(cse: Cse, uniq: str) -> None:
    cse_id = f"/id-conc{uniq}"
    cse.rpc("ensure_subscription", cse_id, f"{uniq}base", ["*"])
    n = 24
    creds = [f"12-{uniq}{i:04x}@mef.example.com" for i in range(n)]
    with ThreadPoolExecutor(max_workers=n) as pool:
        names = list(pool.map(lambda i: cse.rpc("record_binding", creds[i], f"Cdev{i}", ["*"], cse_id), range(n)))
        list(pool.map(lambda i: cse.rpc("record_binding", creds[i], f"Cdev{i}", ["*"], cse_id), range(n)))
    assert len(set(names)) == n  # one rule per credential
    for name in names:  # none lost, each labelled with its node
        assert cse.request("GET", f"{cse.cse_name}/{name}").pc("m2m:asar")["lbl"] == [f"rspf:node={cse_id}"]
    assert not [link for link in _node_links(cse, cse_id) if link.startswith("rspf-cred-")]
    for cred in creds:
        assert cse.rpc("forget_binding", cred) is True
    for name in names:
        assert cse.request("GET", f"{cse.cse_name}/{name}").rsc == 4004


def test_rule_allows(cse: Cse, uniq: str) -> None:
    cse.created(cse.cse_name, 19, "m2m:asar", {
        "rn": uniq, "apci": ["12-*@mef.example.com"], "aai": ["Nmyapp", "R123*X"], "aae": ["Cdev*", "S"]})
    cse.created(cse.cse_name, 19, "m2m:asar", {"rn": f"{uniq}nosa", "aai": ["*"], "aae": ["*"]})
    ok = [("12-ab@mef.example.com", "Nmyapp", "Cdev1"), ("12-@mef.example.com", "R123fooX", "Cdev"),
          ("12-ab@mef.example.com", "R123X", "S")]
    no = [("10-ab@mef.example.com", "Nmyapp", "Cdev1"), (None, "Nmyapp", "Cdev1"),
          ("12-ab@mef.example.com", "Nother", "Cdev1"), ("12-ab@mef.example.com", "R123fooY", "Cdev1"),
          ("12-ab@mef.example.com", "Nmyapp", "Cother"), ("12-ab@mef.example.com", "Nmyapp", ""),
          ("12-ab@mef.example.com", "Nmyapp", "Sxyz")]
    for cred, app, stem in ok:
        assert cse.rpc("rule_allows", uniq, cred, app, stem) is True, (cred, app, stem)
    for cred, app, stem in no:
        assert cse.rpc("rule_allows", uniq, cred, app, stem) is False, (cred, app, stem)
    # no applicableCredIDs: the rule is for registrations without a security association only
    assert cse.rpc("rule_allows", f"{uniq}nosa", None, "Nany", "") is True
    assert cse.rpc("rule_allows", f"{uniq}nosa", "12-ab@mef.example.com", "Nany", "Cx") is False
    for p in (uniq, f"{uniq}nosa"):
        assert cse.request("DELETE", f"{cse.cse_name}/{p}").rsc == 2002


def test_ensure_subscription(cse: Cse, uniq: str) -> None:
    cse_id = "/id-ensure1"
    rule_ri = cse.rpc("ensure_subscription", cse_id, uniq, ["Nmyapp", "R*"])
    rule = cse.request("GET", f"{cse.cse_name}/{uniq}").pc("m2m:asar")
    assert rule["ri"] == rule_ri and rule["aai"] == ["Nmyapp", "R*"] and "apci" not in rule and "aae" not in rule
    node_ri = cse.rpc("find_svsn", cse_id)
    node = cse.request("GET", node_ri).pc("m2m:svsn")
    assert node["csi"] == cse_id and node["rlk"] == [rule_ri] and node["ni"] == "id-ensure1"
    assert cse.rpc("rules_of", cse_id) == [rule_ri]

    assert cse.rpc("ensure_subscription", cse_id, uniq, ["*"]) == rule_ri  # idempotent, rule untouched
    assert cse.request("GET", f"{cse.cse_name}/{uniq}").pc("m2m:asar")["aai"] == ["Nmyapp", "R*"]
    assert cse.request("GET", node_ri).pc("m2m:svsn")["rlk"] == [rule_ri]
    assert len(cse.discover(ty=20, csi=cse_id)) == 1

    # an existing node for another CSE gets the link appended
    other = cse.rpc("ensure_subscription", "/id-ensure2", f"{uniq}2", ["*"])
    assert cse.rpc("rules_of", "/id-ensure2") == [other]
    cse.request("PUT", cse.rpc("find_svsn", "/id-ensure2"), body={"m2m:svsn": {"rlk": [rule_ri]}})
    cse.rpc("ensure_subscription", "/id-ensure2", f"{uniq}2", ["*"])
    assert cse.rpc("rules_of", "/id-ensure2") == [rule_ri, other]

    for p in ("rspf-mssp", uniq, f"{uniq}2"):
        assert cse.request("DELETE", f"{cse.cse_name}/{p}").rsc == 2002


# ============================================================================== other CSEs, pure parts
def test_mn_cse_refuses_the_in_cse_only_types(tmp_path: Path) -> None:
    mn = Cse(tmp_path, cse_type="MN", cse_id="id-mn", cse_name="cse-mn")
    mn.start()
    try:
        srt = set(mn.request("GET", "cse-mn").pc("m2m:cb")["srt"])
        assert not srt & {11, 19, 20} and {1, 2, 3} <= srt
        for ty, sn in ((11, "m2m:mssp"), (19, "m2m:asar")):
            r = mn.create("cse-mn", ty, sn, {"rn": f"x{ty}"})
            assert (r.status, r.rsc) == (405, 4005), r
            assert mn.request("GET", f"cse-mn/x{ty}").rsc == 4004
    finally:
        rc = mn.stop()
    assert rc == 0, f"acmecse did not exit cleanly on SIGTERM (rc {rc}):\n{mn.output()}"
    assert "CSE shut down complete" in (tmp_path / "acme.out").read_text(errors="replace")


@pytest.mark.parametrize(("pattern", "value", "expected"), [
    ("*", "", True), ("*", "anything", True), ("C123*X", "C123X", True), ("C123*X", "C123abcX", True),
    ("C123*X", "C123abcY", False), ("C123*X", "C12X", False), ("C*", "C", True), ("C*", "", False),
    ("Cabc", "Cabc", True), ("Cabc", "Cab", False), ("Cabc", "cabc", False), ("a*b*c", "abc", True),
    ("a*b*c", "axxbyyc", True), ("a*b*c", "acb", False), ("ab*ba", "aba", False), ("*x*", "yxy", True),
    ("?", "a", False), ("[a]", "a", False), ("12-*@mef", "12-k@mef", True), ("", "", True), ("", "x", False),
])
def test_matches(resources_module: Any, pattern: str, value: str, expected: bool) -> None:
    assert resources_module.matches(pattern, value) is expected


def test_matches_none(resources_module: Any) -> None:
    assert resources_module.matches(None, "x") is False and resources_module.matches("*", None) is False

