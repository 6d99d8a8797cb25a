"""Helpers for the integration tests: run the ``rspf`` CLI, build a MEF home, run ``rspf mef serve``.

Everything talks to real processes on 127.0.0.1 only. A MEF is started with a free port (picked by binding
a socket to port 0), polled until it accepts connections, and stopped by its PID (SIGTERM, then wait,
then SIGKILL only if it does not exit).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RSPF = Path(sys.executable).parent / "rspf"
HOST = "127.0.0.1"
FQDN = "mef.example.com"
SP_ID = "//sp.example.com"
REGISTRAR = "/id-in"
REGISTRAR_URI = "https://127.0.0.1:8443/cse-in"
REGISTRAR_FQDN = "id-in.sp.example.com"
CLI_TIMEOUT = 60
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


# ------------------------------------------------------------------------------------------------ CLI
@dataclass
class CliResult:
    args: list[str]
    rc: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def json(self) -> Any:
        return json.loads(self.stdout)

    def __str__(self) -> str:  # shown in assertion messages
        return (f"$ rspf {' '.join(self.args)}\n-> rc {self.rc}\n--- stdout ---\n{self.stdout}"
                f"--- stderr ---\n{self.stderr}")


class Cli:
    """Runs ``rspf`` as a subprocess and keeps every result (the no-secrets test greps them all)."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = Path(cwd)
        self.results: list[CliResult] = []

    def __call__(self, *args: Any, timeout: float = CLI_TIMEOUT) -> CliResult:
        argv = [str(a) for a in args]
        wait_for_cli()
        proc = subprocess.run([str(RSPF), *argv], cwd=self.cwd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        res = CliResult(argv, proc.returncode, proc.stdout, proc.stderr)
        self.results.append(res)
        return res

    def ok(self, *args: Any, timeout: float = CLI_TIMEOUT) -> CliResult:
        res = self(*args, timeout=timeout)
        assert res.rc == 0, str(res)
        return res

    def all_output(self) -> str:
        return "\n".join(r.output for r in self.results)


def wait_for_cli(timeout: float = 30.0) -> None:
    """The console script, waiting a little while a concurrent ``pip install --force-reinstall`` replaces it."""
    deadline = time.monotonic() + timeout
    while not RSPF.exists():
        assert time.monotonic() < deadline, f"{RSPF} is missing: install the project into this venv (pip install .)"
        time.sleep(0.2)


def run_cli(*args: Any, cwd: Path | None = None, timeout: float = CLI_TIMEOUT) -> CliResult:
    """One-shot form of :class:`Cli` (captures rc, stdout and stderr)."""
    return Cli(cwd or Path.cwd())(*args, timeout=timeout)


def write_private(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def read_hex(path: Path) -> str:
    return Path(path).read_text().strip().lower()


# ----------------------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> int:
    """SIGTERM the process by its PID, wait; SIGKILL only if it does not exit. Returns its exit status."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
    return proc.returncode


# ------------------------------------------------------------------------------------------ MEF home
@dataclass
class EnroleeInfo:
    kpm_id: str
    kpm_file: Path
    enrolee_id: str
    node_id: str
    store: Path

    @property
    def kpm_hex(self) -> str:
        return read_hex(self.kpm_file)


@dataclass
class TargetInfo:
    psk_identity: str
    psk_file: Path
    target_id: str

    @property
    def psk_hex(self) -> str:
        return read_hex(self.psk_file)


@dataclass
class MefHome:
    """A MEF configuration, database and key files in one directory, built with the CLI."""

    root: Path
    cli: Cli
    port: int = 0
    proc: subprocess.Popen | None = None
    starts: int = 0
    enrolees: dict[str, EnroleeInfo] = field(default_factory=dict)
    targets: dict[str, TargetInfo] = field(default_factory=dict)

    @property
    def config(self) -> Path:
        return self.root / "mef.toml"

    @property
    def database(self) -> Path:
        return self.root / "mef.sqlite"

    @property
    def log_path(self) -> Path:
        return self.root / "mef.log"

    @property
    def host(self) -> str:
        return HOST

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    # -- building -------------------------------------------------------------------------------
    def init(self) -> None:
        self.port = free_port()
        self.cli.ok("mef", "init", self.config, "--fqdn", FQDN, "--sp-id", SP_ID, "--port", self.port)

    def set_config(self, key: str, toml_value: str) -> None:
        """Replace (or add) one key of the [mef] section of the generated configuration."""
        lines = self.config.read_text().splitlines()
        out, done = [], False
        for line in lines:
            if line.split("=", 1)[0].strip() == key:
                out.append(f"{key} = {toml_value}")
                done = True
            else:
                out.append(line)
        if not done:
            out.append(f"{key} = {toml_value}")
        self.config.write_text("\n".join(out) + "\n")

    def keygen(self, name: str) -> Path:
        path = self.root / name
        self.cli.ok("keygen", path)
        return path

    def add_enrolee(self, name: str, *extra: Any, enrolee_id: str | None = None, node_id: str | None = None,
                    registrar: str = REGISTRAR, registrar_uri: str = REGISTRAR_URI,
                    expect_rc: int = 0) -> EnroleeInfo:
        kpm_file = self.keygen(f"{name}.kpm")
        info = EnroleeInfo(kpm_id=f"{name}@{FQDN}", kpm_file=kpm_file,
                           enrolee_id=enrolee_id or f"/id-{name}", node_id=node_id or f"urn:dev:ops:{name}",
                           store=self.root / f"{name}.store")
        res = self.cli("mef", "enrolee", "add", "-c", self.config, "--kpm-id", info.kpm_id, "--kpm-file", kpm_file,
                       "--enrolee-id", info.enrolee_id, "--node-id", info.node_id, "--registrar-cse-id", registrar,
                       "--registrar-uri", registrar_uri, *extra)
        assert res.rc == expect_rc, str(res)
        self.enrolees[name] = info
        return info

    def add_target(self, name: str, target_id: str, psk_identity: str | None = None) -> TargetInfo:
        psk_file = self.keygen(f"{name}.psk")
        info = TargetInfo(psk_identity or f"{target_id.strip('/')}@sp.example.com", psk_file, target_id)
        self.cli.ok("mef", "target", "add", "-c", self.config, "--psk-identity", info.psk_identity,
                    "--psk-file", psk_file, "--target-id", target_id)
        self.targets[name] = info
        return info

    def target(self, name: str, target_id: str) -> TargetInfo:
        """The Target registered under ``name``, registering it first if needed."""
        if name not in self.targets:
            self.add_target(name, target_id)
        assert self.targets[name].target_id == target_id
        return self.targets[name]

    def import_batch(self, prefix: str, count: int, *, enrolee_id: str = "/id-{name}", name: str = "{prefix}{i}",
                     registrar: str = REGISTRAR, registrar_uri: str = REGISTRAR_URI) -> list[EnroleeInfo]:
        """Register ``count`` enrolees with one ``mef enrolee import`` (CSV); their Kpm files are written 0600.

        ``name`` and ``enrolee_id`` are format strings (``{prefix}``, ``{i}``; ``{name}``)."""
        import csv
        import secrets as _secrets

        rows, infos = [], []
        for i in range(1, count + 1):
            n = name.format(prefix=prefix, i=i)
            kpm = _secrets.token_hex(32)
            info = EnroleeInfo(kpm_id=f"{n}@{FQDN}", kpm_file=write_private(self.root / f"{n}.kpm", kpm + "\n"),
                               enrolee_id=enrolee_id.format(name=n), node_id=f"urn:dev:ops:{n}",
                               store=self.root / f"{n}.store")
            rows.append({"kpm_id": info.kpm_id, "kpm": kpm, "enrolee_id": info.enrolee_id, "node_id": info.node_id,
                         "registrar_cse_id": registrar, "registrar_uri": registrar_uri})
            infos.append(info)
            self.enrolees[n] = info
        path = self.root / f"{prefix}-batch.csv"
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", newline="") as f:  # holds keys
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        res = self.cli.ok("mef", "enrolee", "import", "-c", self.config, path)
        assert f"imported {count} enrolee(s)" in res.stdout, str(res)
        return infos

    def build_default(self) -> MefHome:
        """init; enrolee dev1 (/id-mn1, urn:dev:ops:001, registrar /id-in); Target /id-in."""
        self.init()
        self.add_enrolee("dev1", enrolee_id="/id-mn1", node_id="urn:dev:ops:001")
        self.add_target("in", REGISTRAR, "id-in@sp.example.com")
        return self

    # -- running --------------------------------------------------------------------------------
    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "the MEF is already running"
        last_error = ""
        for _attempt in range(3):  # another process may grab the free port between picking and binding
            wait_for_cli()
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            with open(self.log_path, "ab") as log, open(self.root / "mef.stdout", "ab") as out:
                self.proc = subprocess.Popen([str(RSPF), "mef", "serve", "-c", str(self.config),
                                              "--port", str(self.port)],
                                             cwd=self.root, stdin=subprocess.DEVNULL, stdout=out, stderr=log)
            self.starts += 1
            if self._wait_ready(START_TIMEOUT):
                return
            last_error = self.log_text()[offset:]
            stop_process(self.proc)
            if "cannot listen" not in last_error:
                break
            self.port = free_port()
        raise AssertionError(f"the MEF did not become ready on {self.address}; its log:\n{last_error}")

    def _wait_ready(self, timeout: float) -> bool:
        """Connect loop with a deadline. The probe runs a TLS-PSK handshake with an unknown identity: once the
        MEF refuses it, its accept loop and a connection thread have run (a bare TCP connect only proves the
        socket listens)."""
        from rspf.errors import TlsError
        from rspf.secret import Secret
        from rspf.tls import PskClient

        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    pass
            except OSError:
                time.sleep(0.05)
                continue
            try:
                PskClient().connect(HOST, self.port, "readiness-probe", Secret(bytes(32)), timeout=5).close()
            except TlsError as exc:
                if "cannot connect" in str(exc):
                    continue
            return True
        return False

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        rc = stop_process(self.proc)
        return rc

    def restart(self) -> None:
        rc = self.stop()
        assert rc == 0, f"the MEF exited with {rc} on SIGTERM"
        self.start()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- CLI shortcuts --------------------------------------------------------------------------
    def enrol(self, enrolee: EnroleeInfo, *extra: Any, kpm_file: Path | None = None, node_id: str | None = None,
              store: Path | None = None, kpm_id: str | None = None, as_json: bool = True) -> CliResult:
        return self.cli("enrol", "--mef", self.address, "--mef-fqdn", FQDN, "--kpm-id", kpm_id or enrolee.kpm_id,
                        "--kpm-file", kpm_file or enrolee.kpm_file, "--node-id", node_id or enrolee.node_id,
                        "--store", store or enrolee.store, *(["--json"] if as_json else []), *extra)

    def fetch(self, target: TargetInfo, ke_id: str, suid: int | str = 22, *extra: Any, origin: str | None = None,
              key_out: Path | None = None) -> CliResult:
        args: list[Any] = ["fetch-credentials", "--mef", self.address, "--mef-fqdn", FQDN,
                           "--psk-identity", target.psk_identity, "--psk-file", target.psk_file,
                           "--origin", origin or target.target_id]
        if key_out is not None:
            args += ["--key-out", key_out]
        return self.cli(*args, *extra, ke_id, suid)

    def show(self, kpm_id: str) -> dict[str, Any]:
        return self.cli.ok("mef", "enrolee", "show", "-c", self.config, kpm_id, "--json").json()

    def revoke(self, kpm_id: str) -> CliResult:
        return self.cli.ok("mef", "enrolee", "revoke", "-c", self.config, kpm_id)

    def list_enrolees(self) -> list[dict[str, Any]]:
        return self.cli.ok("mef", "enrolee", "list", "-c", self.config, "--json").json()

    def load_enrolment(self, enrolee: EnroleeInfo):
        """The stored enrolment, opened in-process with rspf.enrolee (None if there is none)."""
        return enrolee_client(self, enrolee).load()


def enrolee_client(home: MefHome, enrolee: EnroleeInfo, **kw: Any):
    from rspf.enrolee import Enrolee, EnroleeConfig
    from rspf.fileutil import read_key_file

    return Enrolee(EnroleeConfig(mef_host=HOST, mef_port=home.port, mef_fqdn=FQDN, kpm_id=enrolee.kpm_id,
                                 kpm=read_key_file(enrolee.kpm_file, "Kpm file"), node_id=enrolee.node_id,
                                 store_path=enrolee.store, **kw))


def closed_now(sock: socket.socket) -> bool:
    """Whether the peer has closed ``sock`` (EOF or reset) by now, without waiting; the socket's timeout is kept."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.settimeout(timeout)
