"""Harness for the SEC CSF plugin tests: ACME CSEs with the plugin, talking to a real MEF, on 127.0.0.1.

* :class:`AcmeCse` -- an ACME base directory (headless acme.ini, memory database, file logging at debug)
  made ready with ``rspf acme install``; started as ``acmecse --headless`` in its own session and stopped
  by its PID (SIGTERM, wait, SIGKILL only if it does not exit).
* Readiness: first the plugin's secure listener must accept a TCP connection (it opens in the plugin's
  ``@start``, after ACME's bindings), only then is ACME's plain HTTP port polled -- an HTTP request while
  ACME is still starting can break its web UI plugin and with it the CSE.
* :meth:`AcmeCse.request` -- a oneM2M request on the plain port (default originator CAdmin), never raises on
  an error status; :func:`secure_request` -- one request over TLS-PSK with any psk_identity/key/originator.
* :func:`new_mef` -- a :class:`support.MefHome` with the Enrolment Target ``/id-in`` registered.

Every process is started here with free loopback ports and stopped by its PID.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rspf import wire
from rspf.client import OneM2MClient
from rspf.secret import Secret
from rspf.tls import PskClient

from .support import FQDN, HOST, Cli, EnroleeInfo, MefHome, TargetInfo, free_port, stop_process

ACMECSE = Path(sys.executable).parent / "acmecse"
ADMIN = "CAdmin"
IN_CSE_ID = "/id-in"
TARGET_PSK_IDENTITY = "id-in@sp.example.com"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0

# oneM2M resource types used by the tests
TY_AE, TY_CNT, TY_CSR, TY_MSSP, TY_ASAR, TY_SVSN = 2, 3, 16, 11, 19, 20


# ----------------------------------------------------------------------------------------------- MEF
def new_mef(root: Path) -> tuple[MefHome, TargetInfo]:
    """A MEF home (not started) with the Enrolment Target /id-in (the IN-CSEs' credential at the MEF)."""
    root.mkdir(parents=True, exist_ok=True)
    home = MefHome(root, Cli(root))
    home.init()
    target = home.add_target("in", IN_CSE_ID, TARGET_PSK_IDENTITY)
    return home, target


def import_ae_batch(home: MefHome, prefix: str, count: int, registrar_uri: str) -> list[EnroleeInfo]:
    """``count`` AE enrolees ``C<prefix><i>`` registered with one ``rspf mef enrolee import`` (CSV)."""
    return home.import_batch(prefix, count, name="{prefix}{i:03d}", enrolee_id="C{name}", registrar=IN_CSE_ID,
                             registrar_uri=registrar_uri)


# ------------------------------------------------------------------------------------------ responses
@dataclass
class Resp:
    status: int
    rsc: int | None
    raw: bytes

    @property
    def body(self) -> Any:
        try:
            return json.loads(self.raw) if self.raw else None
        except ValueError:
            return None

    def pc(self, sn: str) -> dict[str, Any]:
        assert isinstance(self.body, dict) and sn in self.body, f"no {sn} in {self}"
        return self.body[sn]

    def __str__(self) -> str:
        return f"HTTP {self.status} RSC {self.rsc}: {self.raw[:800]!r}"


def _rsc(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


def secure_request(port: int, identity: str, key: Secret, method: str, path: str, content: Any = None, *,
                   origin: str, ty: int | None = None, timeout: float = 20.0) -> Resp:
    """One oneM2M request over a new TLS-PSK connection to a CSE's secure listener (TlsError if refused)."""
    tls = PskClient().connect(HOST, port, identity, key, timeout=timeout)
    client = OneM2MClient(tls, origin, host=f"{HOST}:{port}")
    try:
        r: wire.HttpResponse = client.request(method, path, content, ty=ty)
    finally:
        client.close()
    return Resp(r.status, r.rsc, r.body)


def ae_body(rn: str, api: str) -> dict[str, Any]:
    return {"m2m:ae": {"rn": rn, "api": api, "rr": False, "srv": ["3"]}}


def wait_until(predicate: Any, timeout: float = 30.0, what: str = "condition", interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# ----------------------------------------------------------------------------------------------- ACME
class AcmeCse:
    """One ACME CSE with the rspf plugin in ``root/name``."""

    def __init__(self, root: Path, name: str, *, cse_type: str = "IN", cse_id: str = "id-in",
                 cse_name: str = "cse-in") -> None:
        self.name = name
        self.base = root / name
        self.base.mkdir(parents=True)
        self.cse_type, self.cse_id, self.cse_name = cse_type, cse_id, cse_name
        self.http_port = free_port()
        self.secure_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.enrolee: EnroleeInfo | None = None  # the CSE's own enrolee at the MEF, when it enrols
        self.starts = 0
        self._ri = 0

    # -- configuration ---------------------------------------------------------------------------
    @property
    def secure_uri(self) -> str:
        """The CSEBase URI on the secure listener (what an enrolee's registrar URI names)."""
        return f"https://{HOST}:{self.secure_port}/{self.cse_name}"

    @property
    def ini(self) -> Path:
        return self.base / "acme.ini"

    def write_ini(self, extra_ini: str = "") -> None:
        """Write a headless acme.ini (``cseID`` without its slash), without the plugin."""
        self.ini.write_text(
            "[basic.config]\n"
            f"cseType={self.cse_type}\ncseID={self.cse_id}\ncseName={self.cse_name}\nadminID={ADMIN}\n"
            f"networkInterface={HOST}\ncseHost={HOST}\nhttpPort={self.http_port}\n"
            "logLevel=debug\ndatabaseType=memory\n\n"
            "[textui]\nstartWithTUI=false\n\n"
            "[logging]\nenableFileLogging=true\nlevel=debug\n" + (f"\n{extra_ini.strip()}\n" if extra_ini else ""))

    def install(self, mef: MefHome, *options: Any, cli: Cli | None = None, extra_ini: str = "") -> None:
        """Write the acme.ini and run ``rspf acme install`` (the plugin loader and the [rspf] section).

        Without ``--enforcement`` / ``--no-enforcement`` in ``options`` the CSE is installed in compatibility
        mode (``--no-enforcement``): most tests inspect the CSE as ``CAdmin`` on the plain port."""
        self.write_ini(extra_ini)
        if not {"--enforcement", "--no-enforcement"} & {str(o) for o in options}:
            options = (*options, "--no-enforcement")
        (cli or mef.cli).ok("acme", "install", "--base-dir", self.base, "--mef", mef.address, "--mef-fqdn", FQDN,
                            "--secure-port", self.secure_port, *options)

    def set_rspf(self, key: str, value: str, *, add: bool = False) -> None:
        """Replace one ``key=value`` line of the [rspf] section written by ``rspf acme install``; with ``add``,
        a key the section does not have is added to it."""
        lines, in_section, done, start = self.ini.read_text().splitlines(), False, False, None
        for i, line in enumerate(lines):
            s = line.strip()
            if s.startswith("[") and s.endswith("]"):
                in_section = s == "[rspf]"
                start = i if in_section else start
            elif in_section and s.split("=", 1)[0].strip() == key:
                lines[i] = f"{key}={value}"
                done = True
        if not done and add and start is not None:
            lines.insert(start + 1, f"{key}={value}")
            done = True
        assert done, f"no {key} in the [rspf] section of {self.ini}"
        self.ini.write_text("\n".join(lines) + "\n")

    def rspf_value(self, key: str) -> str | None:
        in_section = False
        for line in self.ini.read_text().splitlines():
            s = line.strip()
            if s.startswith("[") and s.endswith("]"):
                in_section = s == "[rspf]"
            elif in_section and s.split("=", 1)[0].strip() == key:
                return s.split("=", 1)[1].strip()
        return None

    # -- process ---------------------------------------------------------------------------------
    def start(self, wait: bool = True) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is already running"
        with open(self.base / "acme.out", "ab") as out:
            self.proc = subprocess.Popen([str(ACMECSE), "--headless", "-dir", str(self.base)], cwd=self.base,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.starts += 1
        if wait:
            try:
                self.wait_ready()
            except AssertionError:
                self.stop()  # never leave a half-started CSE behind
                if not self._port_taken():
                    raise
                # a free port from free_port() can be taken meanwhile (e.g. as the local port of a connection
                # in TIME_WAIT): once, with new ports
                self._new_ports()
                self.start(wait=True)
            except BaseException:
                self.stop()
                raise

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while not self.has_plugin:  # 1'. without the plugin: ACME's own "CSE started" in its log file
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode} before it was ready")
            if "CSE started" in self.log_text():
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: not started within {timeout:g} s:\n{self.log_tail()}")
            time.sleep(0.1)
        while self.has_plugin:  # 1. the secure listener (opened in the plugin's @start, after ACME's bindings)
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode} before it was ready:\n"
                                     f"{self.log_tail()}")
            try:
                with socket.create_connection((HOST, self.secure_port), timeout=0.5):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no secure listener on {self.secure_port} within {timeout:g} s:\n"
                                     f"{self.log_tail()}")
            time.sleep(0.1)
        while True:  # 2. only now ACME's plain HTTP port (a oneM2M answer; with enforcement on CAdmin gets 4107)
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.request("GET", f"/{self.cse_name}", timeout=2).rsc in (2000, 4107):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: plain HTTP did not answer within {timeout:g} s:\n"
                                     f"{self.log_tail()}")
            time.sleep(0.2)

    def _port_taken(self) -> bool:
        return self.starts == 1 and "already in use" in self.log_tail(20000)

    def _new_ports(self) -> None:
        self.http_port = free_port()
        text = self.ini.read_text()
        text = re.sub(r"(?m)^httpPort=\d+$", f"httpPort={self.http_port}", text)
        self.ini.write_text(text)
        if self.has_plugin:
            self.secure_port = free_port()
            self.set_rspf("securePort", str(self.secure_port))
        for f in self.log_files():
            f.unlink()

    @property
    def has_plugin(self) -> bool:
        return (self.base / "plugins").is_dir()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        return stop_process(self.proc, STOP_TIMEOUT)

    # -- logs ------------------------------------------------------------------------------------
    def log_files(self) -> list[Path]:
        """ACME's log files, the ones it rotated away (``.log.1``, ``.log.2``, ...) too, oldest first."""
        logs = self.base / "logs"
        dated = []
        for f in logs.glob("*.log*") if logs.is_dir() else []:
            try:
                dated.append((f.stat().st_mtime, f))
            except FileNotFoundError:  # rotated away meanwhile
                continue
        files = [f for _mtime, f in sorted(dated)]
        out = self.base / "acme.out"
        return files + ([out] if out.exists() else [])

    def log_text(self) -> str:
        texts = []
        for p in self.log_files():
            try:
                texts.append(p.read_text(errors="replace"))
            except FileNotFoundError:  # rotated away meanwhile
                continue
        return "\n".join(texts)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    # -- oneM2M on the plain port -----------------------------------------------------------------
    def request(self, method: str, path: str, content: Any = None, *, origin: str = ADMIN, ty: int | None = None,
                timeout: float = 15.0) -> Resp:
        self._ri += 1
        headers = {"X-M2M-Origin": origin, "X-M2M-RI": f"t-{self.name}-{self._ri}", "X-M2M-RVI": "3",
                   "Accept": "application/json"}
        data = None
        if content is not None:
            data = json.dumps(content).encode()
            headers["Content-Type"] = "application/json" + (f";ty={ty}" if ty is not None else "")
        conn = http.client.HTTPConnection(HOST, self.http_port, timeout=timeout)
        try:
            conn.request(method, path, body=data, headers=headers)
            r = conn.getresponse()
            return Resp(r.status, _rsc(r.getheader("X-M2M-RSC")), r.read())
        finally:
            conn.close()

    def get(self, path: str, **kw: Any) -> Resp:
        return self.request("GET", path if path.startswith("/") else f"/{self.cse_name}/{path}", **kw)

    def discover(self, query: str) -> list[str]:
        r = self.request("GET", f"/{self.cse_name}?{query}")
        assert r.rsc == 2000, str(r)
        return list(r.pc("m2m:uril"))

    def ssar(self, name: str = "rspf-enrolled") -> dict[str, Any]:
        r = self.get(name)
        assert r.rsc == 2000, str(r)
        return r.pc("m2m:asar")


def key_forms(value: bytes) -> dict[str, str]:
    """Printable forms a key could leak in."""
    h = value.hex()
    return {"hex": h, "HEX": h.upper(), "base64": base64.b64encode(value).decode(),
            "base64url": base64.urlsafe_b64encode(value).decode().rstrip("=")}
