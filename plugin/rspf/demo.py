"""``rspf demo``: a complete local deployment on loopback, step by step.

MEF + ACME IN-CSE with the SEC CSF plugin + an AE that enrols with the MEF and registers over TLS-PSK.
Every process is started here, on free 127.0.0.1 ports, and stopped by its PID at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .ssar import is_bound_rule_name

SP_ID = "//sp.example.com"
MEF_FQDN = "mef.example.com"


def free_port() -> int:
    """A free TCP port on 127.0.0.1 that ACME will also take: ACME refuses a port it cannot bind on every
    address (with SO_REUSEADDR), which fails while a connection on that local port is in TIME_WAIT."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free TCP port on 127.0.0.1 that can be bound on every address")


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f} s")


def wait_http(url: str, proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready")
        try:
            req = urllib.request.Request(url, headers={"X-M2M-Origin": "CAdmin", "X-M2M-RI": "ready",
                                                       "X-M2M-RVI": "3", "Accept": "application/json"})
            with urllib.request.urlopen(req, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not answer {url} within {timeout:.0f} s")


def acme_ini(cse_type: str, cse_id: str, cse_name: str, http_port: int) -> str:
    """A minimal headless acme.ini; ``cse_id`` without the leading slash (ACME adds it)."""
    return f"""[basic.config]
cseType={cse_type}
cseID={cse_id}
cseName={cse_name}
adminID=CAdmin
networkInterface=127.0.0.1
cseHost=127.0.0.1
httpPort={http_port}
logLevel=info
databaseType=memory

[textui]
startWithTUI=false
"""


@dataclass
class Processes:
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def start(self, name: str, argv: list[str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
        f = open(log, "wb")
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        self.procs.append((name, p))
        return p

    def stop_all(self) -> None:
        for name, p in reversed(self.procs):
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    os.kill(p.pid, signal.SIGKILL)
                    p.wait()
            print(f"  stopped {name} (pid {p.pid}, exit {p.returncode})")


def step(n: int, text: str) -> None:
    print(f"\n[{n}] {text}", flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    return r


def main(workdir: Path) -> int:
    bindir = Path(sys.executable).parent
    rspf, acmecse = str(bindir / "rspf"), str(bindir / "acmecse")
    if workdir.exists():
        shutil.rmtree(workdir)
    (workdir / "mef").mkdir(parents=True)
    (workdir / "in-cse").mkdir()
    (workdir / "ae").mkdir()
    mef_port, http_port, secure_port = free_port(), free_port(), free_port()
    procs = Processes()
    try:
        step(1, "MEF: configuration, bootstrap credentials, enrolee registry")
        mef_cfg = workdir / "mef" / "mef.toml"
        run([rspf, "mef", "init", str(mef_cfg), "--fqdn", MEF_FQDN, "--sp-id", SP_ID, "--port", str(mef_port)])
        run([rspf, "keygen", str(workdir / "in-cse" / "mef-target.psk")])
        run([rspf, "keygen", str(workdir / "ae" / "sensor01.kpm")])
        (workdir / "mn-cse").mkdir()
        run([rspf, "keygen", str(workdir / "mn-cse" / "mn1.kpm")])
        run([rspf, "mef", "target", "add", "-c", str(mef_cfg), "--psk-identity", "id-in@sp.example.com",
             "--psk-file", str(workdir / "in-cse" / "mef-target.psk"), "--target-id", "/id-in"])
        print("  Enrolment Target /id-in registered (its PSK authenticates the IN-CSE to the MEF)")
        run([rspf, "mef", "enrolee", "add", "-c", str(mef_cfg), "--kpm-id", "sensor01@mef.example.com",
             "--kpm-file", str(workdir / "ae" / "sensor01.kpm"), "--enrolee-id", "Csensor01",
             "--node-id", "urn:dev:ops:sensor01", "--registrar-cse-id", "/id-in",
             "--registrar-uri", f"https://127.0.0.1:{secure_port}/cse-in"])
        print("  Enrolee sensor01@mef.example.com -> AE-ID Csensor01, registrar /id-in")
        run([rspf, "mef", "enrolee", "add", "-c", str(mef_cfg), "--kpm-id", "mn1@mef.example.com",
             "--kpm-file", str(workdir / "mn-cse" / "mn1.kpm"), "--enrolee-id", "/id-mn1",
             "--node-id", "urn:dev:ops:gateway01", "--registrar-cse-id", "/id-in",
             "--registrar-uri", f"https://127.0.0.1:{secure_port}/cse-in"])
        print("  Enrolee mn1@mef.example.com -> CSE-ID /id-mn1 (an MN-CSE gateway), registrar /id-in")

        step(2, f"MEF: starting on 127.0.0.1:{mef_port} (TLS-PSK)")
        mef = procs.start("MEF", [rspf, "mef", "serve", "-c", str(mef_cfg)], workdir / "mef" / "mef.log")
        wait_port(mef_port, mef, "the MEF")
        print(f"  MEF is up (pid {mef.pid})")

        step(3, "IN-CSE: ACME with the SEC CSF plugin")
        base = workdir / "in-cse"
        (base / "acme.ini").write_text(acme_ini("IN", "id-in", "cse-in", http_port))
        out = run([rspf, "acme", "install", "--base-dir", str(base), "--mef", f"127.0.0.1:{mef_port}",
                   "--mef-fqdn", MEF_FQDN, "--no-enrol", "--mef-psk-identity", "id-in@sp.example.com",
                   "--mef-psk-file", "mef-target.psk", "--secure-port", str(secure_port), "--enforcement",
                   "--plain-port-originators", "CAdmin", "--allowed-app-ids", "Nsensor*"])
        for line in out.stdout.splitlines():
            print("  " + line)
        cse = procs.start("ACME IN-CSE", [acmecse, "--headless", "-dir", str(base)], base / "acme.out")
        # The secure listener opens in the plugin's @start, after ACME's own bindings and UIs: only then is
        # it safe to send HTTP requests (a request during ACME's start-up can break its web UI plugin).
        wait_port(secure_port, cse, "the IN-CSE secure listener")
        wait_http(f"http://127.0.0.1:{http_port}/cse-in", cse, "the IN-CSE")
        print(f"  IN-CSE is up (pid {cse.pid}): plain HTTP 127.0.0.1:{http_port}, TLS-PSK 127.0.0.1:{secure_port}")

        step(4, "AE: enrol with the MEF, register with the IN-CSE over TLS-PSK, create and read a container")
        r = run([rspf, "ae", "register", "--mef", f"127.0.0.1:{mef_port}", "--mef-fqdn", MEF_FQDN,
                 "--kpm-id", "sensor01@mef.example.com", "--kpm-file", str(workdir / "ae" / "sensor01.kpm"),
                 "--store", str(workdir / "ae" / "sensor01.store"), "--node-id", "urn:dev:ops:sensor01",
                 "--app-id", "Nsensor-app", "--container", "readings"])
        for line in r.stdout.splitlines():
            print("  " + line)

        step(5, "IN-CSE: the enrolled credential now has a <serviceSubscribedAppRule> of its own")

        def admin_get(path: str) -> dict:
            req = urllib.request.Request(f"http://127.0.0.1:{http_port}/{path}",
                                         headers={"X-M2M-Origin": "CAdmin", "X-M2M-RI": "demo", "X-M2M-RVI": "3",
                                                  "Accept": "application/json"})
            with urllib.request.urlopen(req, timeout=5) as resp:
                data: dict = json.loads(resp.read())
                return data

        bound = [uri for uri in admin_get("cse-in?fu=1&ty=19").get("m2m:uril", [])
                 if is_bound_rule_name(uri.rsplit("/", 1)[-1])]
        for uri in bound:
            rule = admin_get(uri).get("m2m:asar", {})
            print(f"  rule {uri.rsplit('/', 1)[-1]}, of the <serviceSubscribedNode> its label names "
                  f"({', '.join(rule.get('lbl') or [])}):")
            print(f"  applicableCredIDs = {rule.get('apci')}")
            print(f"  allowedAEs        = {rule.get('aae')}")
            print(f"  allowedApp-IDs    = {rule.get('aai')}")

        step(6, "Enforcement: the plain port is no side door")
        attempts = [
            ("an AE registration without a credential", "POST", "/cse-in", "Crogue",
             {"m2m:ae": {"rn": "rogue", "api": "Nrogue", "rr": False, "srv": ["3"]}}, 2),
            ("a content instance created in the name of Csensor01", "POST", "/cse-in/Csensor01/readings",
             "Csensor01", {"m2m:cin": {"con": "forged"}}, 4),
            ("Csensor01's <AE> deleted in its name", "DELETE", "/cse-in/Csensor01", "Csensor01", None, None),
        ]
        for what, method, path, origin, content, ty in attempts:
            headers = {"X-M2M-Origin": origin, "X-M2M-RI": f"demo-{ty}", "X-M2M-RVI": "3"}
            if ty is not None:
                headers["Content-Type"] = f"application/json;ty={ty}"
            req = urllib.request.Request(f"http://127.0.0.1:{http_port}{path}", method=method, headers=headers,
                                         data=json.dumps(content).encode() if content is not None else None)
            try:
                urllib.request.urlopen(req, timeout=5)
                print(f"  UNEXPECTED: {what} was accepted on the plain port")
                return 1
            except urllib.error.HTTPError as exc:
                print(f"  {what}: refused, HTTP {exc.code}, X-M2M-RSC {exc.headers.get('X-M2M-RSC')}")
        step(7, "MN-CSE: enrols at start-up, takes its CSE-ID from the securityProfile, registers with the "
                "IN-CSE over TLS-PSK (Mcc)")
        mn = workdir / "mn-cse"
        # chosen only now: a port picked at the start can meanwhile become the local port of a connection
        mn_http_port, mn_secure_port = free_port(), free_port()
        (mn / "acme.ini").write_text(acme_ini("MN", "id-unprovisioned", "cse-mn", mn_http_port))
        run([rspf, "acme", "install", "--base-dir", str(mn), "--mef", f"127.0.0.1:{mef_port}",
             "--mef-fqdn", MEF_FQDN, "--kpm-id", "mn1@mef.example.com", "--kpm-file", "mn1.kpm",
             "--node-id", "urn:dev:ops:gateway01", "--secure-port", str(mn_secure_port)])
        mn_cse = procs.start("ACME MN-CSE", [acmecse, "--headless", "-dir", str(mn)], mn / "acme.out")
        wait_port(mn_secure_port, mn_cse, "the MN-CSE secure listener")
        print(f"  MN-CSE is up (pid {mn_cse.pid}); acme.ini said cseID=id-unprovisioned")
        deadline = time.monotonic() + 30
        remote: list[str] = []
        while time.monotonic() < deadline and not remote:
            req = urllib.request.Request(f"http://127.0.0.1:{http_port}/cse-in?fu=1&ty=16",
                                         headers={"X-M2M-Origin": "CAdmin", "X-M2M-RI": "demo3", "X-M2M-RVI": "3",
                                                  "Accept": "application/json"})
            with urllib.request.urlopen(req, timeout=5) as resp:
                remote = json.loads(resp.read()).get("m2m:uril", [])
            if not remote:
                time.sleep(0.25)
        if not remote:
            print("  UNEXPECTED: the MN-CSE did not register with the IN-CSE")
            return 1
        print(f"  the IN-CSE now has <remoteCSE> {remote[0]}: the MN registered as /id-mn1 over TLS-PSK")

        print("\nThe deployment worked end to end. Logs are in", workdir)
        return 0
    finally:
        step(8, "stopping everything started here")
        procs.stop_all()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("run/demo")))
