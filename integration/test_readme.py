"""README's "Using it" section, run as written: every ```bash block of the section, command by command.

* The first block (install: ``bash scripts/bootstrap.sh``, ``source .venv/bin/activate``) is what this test run
  already stands on; it is checked to be exactly that and replaced by this venv's ``bin`` first on PATH.
* Every other command runs with ``bash -c`` exactly as printed, in the folder the block's ``cd`` lines lead to,
  with HOME set to a temporary folder (so ``~/rspf-example`` is new and empty) and the README's example ports
  (8443, 8080, 8444) replaced by free ones. A here-document is one command.
* ``rspf mef serve`` and ``acmecse`` run in the foreground in the README (each in its own terminal): here they
  are started in the background, polled until they listen, and stopped by PID at the end.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .support import HOST, free_port, stop_process

README = Path(__file__).resolve().parent.parent / "README.md"
BIN = Path(sys.executable).parent
INSTALL = ["bash scripts/bootstrap.sh", "source .venv/bin/activate"]
#: the README's example ports -> what a foreground server must listen on before the next command runs
PORTS = {"8443": "the MEF", "8080": "ACME's plain HTTP port", "8444": "the CSE's secure listener"}
SERVERS = {"rspf mef serve": "8443", "acmecse": "8444"}
START_TIMEOUT = 60.0


def section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def bash_blocks(text: str) -> list[list[str]]:
    return [b.strip("\n").splitlines() for b in re.findall(r"\n```bash\n(.*?)\n```", text, re.S)]


def commands(lines: list[str]) -> list[str]:
    """Shell commands of a block: continuation lines joined, a here-document kept whole, comments dropped."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\"):
            line = line[:-1] + lines[i].lstrip()
            i += 1
        heredoc = re.search(r"<<-?'?(\w+)'?", line)
        if heredoc:
            end = lines.index(heredoc.group(1), i)
            line = "\n".join([line, *lines[i:end + 1]])
            i = end + 1
        out.append(line)
    return out


def test_the_section_parses_as_expected() -> None:
    blocks = bash_blocks(section(README.read_text(), "Using it"))
    assert blocks[0] == INSTALL
    cmds = [c for b in blocks[1:] for c in commands(b)]
    assert sum(c.startswith(tuple(SERVERS)) for c in cmds) == 2
    assert any(c.startswith("cat > dev1.toml <<'EOF'\n[ae]\n") and c.endswith("\nEOF") for c in cmds)
    assert all("\\" not in c for c in cmds)
    assert [c for c in cmds if c.startswith("rspf ae register")] == ["rspf ae register -c dev1.toml"] * 2


@dataclass
class Ran:
    command: str
    rc: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"$ {self.command}\n-> rc {self.rc}\n--- stdout ---\n{self.stdout}--- stderr ---\n{self.stderr}"


def wait_listening(port: int, proc: subprocess.Popen, what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not listen on {port} within {START_TIMEOUT:g} s:\n"
                                 f"{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.1)


def test_using_it_runs_as_written(tmp_path: Path) -> None:
    blocks = bash_blocks(section(README.read_text(), "Using it"))
    assert blocks[0] == INSTALL
    ports = {p: str(free_port()) for p in PORTS}
    while len(set(ports.values())) < len(ports):  # pragma: no cover - three free ports that differ
        ports = {p: str(free_port()) for p in PORTS}
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RSPF_") and k != "VIRTUAL_ENV"}
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(BIN.parent))
    cwd = home
    ran: list[Ran] = []
    servers: list[tuple[str, subprocess.Popen]] = []
    try:
        for block in blocks[1:]:
            for command in commands(block):
                command = re.sub(r"(?<!\d)(8443|8080|8444)(?!\d)", lambda m: ports[m.group(1)], command)
                cd = re.fullmatch(r"cd (\S+)", command)
                if cd:
                    cwd = cwd / Path(re.sub(r"^~(?=/|$)", str(home), cd.group(1)))
                    assert cwd.is_dir(), f"cd {cd.group(1)}: no such folder"
                    continue
                server = next((s for s in SERVERS if command.startswith(s)), None)
                if server is not None:
                    log = tmp_path / f"{server.split()[0]}-{len(servers)}.log"
                    with open(log, "wb") as out:
                        proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=cwd, env=env,
                                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                                start_new_session=True)
                    servers.append((command, proc))
                    wait_listening(int(ports[SERVERS[server]]), proc, command, log)
                    continue
                p = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                                   timeout=120, stdin=subprocess.DEVNULL)
                ran.append(Ran(command, p.returncode, p.stdout, p.stderr))
                assert p.returncode == 0, str(ran[-1])

        # what the README promises happened
        folder = home / "rspf-example"
        assert cwd == folder and (folder / "acme" / "acme.ini").is_file()
        first, second = [r for r in ran if r.command == "rspf ae register -c dev1.toml"]
        assert "enrolled: AE-ID Csensor01" in first.stdout, str(first)
        assert "registered <AE> Csensor01 (aei Csensor01)" in first.stdout, str(first)
        assert f"127.0.0.1:{ports['8444']}/cse-in over TLS-PSK" in first.stdout, str(first)
        assert "created and retrieved <container> Csensor01/readings" in first.stdout, str(first)
        assert "already registered: <AE> Csensor01" in second.stdout, str(second)
        assert "retrieved the existing <container> Csensor01/readings" in second.stdout, str(second)
        acme_log = "\n".join(p.read_text(errors="replace") for p in (folder / "acme" / "logs").glob("*.log"))
        assert f"[rspf] secure listener (TLS-PSK) on 127.0.0.1:{ports['8444']}" in acme_log
        for key_file in ("dev1.kpm", "acme/mef-target.psk"):
            key = (folder / key_file).read_text().strip()
            assert (folder / key_file).stat().st_mode & 0o077 == 0
            assert all(key not in r.stdout + r.stderr for r in ran), f"{key_file} was printed"
    finally:
        for command, proc in reversed(servers):
            rc = stop_process(proc, 20.0)
            if sys.exc_info()[0] is None:
                assert rc == 0, f"{command} exited with {rc} on SIGTERM"


def test_the_start_command_is_the_one_the_docs_print() -> None:
    """README, docs/acme-plugin.md, docs/deploy.md and `rspf acme init` agree on how ACME is started."""
    from rspf.acme.install import start_command

    assert start_command(Path("acme")) in README.read_text()
    assert start_command(Path("/srv/acme")) in (README.parent / "docs" / "acme-plugin.md").read_text()
    assert "acmecse --headless -dir /srv/acme" in (README.parent / "docs" / "deploy.md").read_text()
