"""``rspf acme init`` and the strict ``[rspf]`` section, with real ``acmecse`` processes on 127.0.0.1.

A base directory written by ``rspf acme init`` and then spoilt the way an operator might (a misspelt section
name, a misspelt key, the section deleted) must not start: ``acmecse`` exits with status 1 and its output names
the file and the section or key. No MEF is needed: configuration is checked before anything else. Every process
is started here and stopped by its PID (it should exit by itself).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from .acme_harness import ACMECSE
from .support import Cli, free_port, stop_process, write_private

EXIT_TIMEOUT = 60.0


def init_base(tmp_path: Path, *extra: str) -> Path:
    base = tmp_path / "acme"
    base.mkdir()
    write_private(base / "mef-target.psk", "ab" * 32 + "\n")
    Cli(tmp_path).ok("acme", "init", "--base-dir", base, "--http-port", free_port(), "--mef", "127.0.0.1:1",
                     "--mef-fqdn", "mef.example.com", "--no-enrol", "--mef-psk-identity", "id-in@sp.example.com",
                     "--mef-psk-file", "mef-target.psk", "--secure-port", free_port(), "--database", "memory",
                     *extra)
    return base


def run_acme(base: Path) -> tuple[int, str]:
    """Start ``acmecse`` on ``base`` and wait for it to exit by itself; (status, its output)."""
    out_path = base / "acme.out"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen([str(ACMECSE), "--headless", "-dir", str(base)], cwd=base, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        tail = out_path.read_text(errors="replace")[-3000:]
        raise AssertionError(f"acmecse did not stop by itself:\n{tail}") from None
    return rc, out_path.read_text(errors="replace")


def edit(ini: Path, pattern: str, replacement: str) -> None:
    text = ini.read_text()
    new, n = re.subn(pattern, replacement, text, count=1, flags=re.M)
    assert n == 1, pattern
    ini.write_text(new)


@pytest.mark.parametrize("pattern,replacement,needle", [
    (r"^\[rspf\]$", "[rpsf]", "acme.ini: the section [rpsf] is not [rspf]"),
    (r"^\[rspf\]$", "[RSPF ]", "acme.ini: the section [RSPF ] is not [rspf]"),
    (r"^mefAddress=", "mefAdress=", "acme.ini [rspf] mefAdress: unknown key; did you mean mefAddress?"),
    (r"^keyCacheSeconds=", "keycacheseconds=", "[rspf] keycacheseconds: unknown key; did you mean keyCacheSeconds?"),
    (r"^securePort=\d+$", "securePort=eighty", "acme.ini [rspf] securePort: must be a number"),
])
def test_a_spoilt_section_stops_start_up_naming_the_file_and_the_key(tmp_path: Path, pattern: str,
                                                                     replacement: str, needle: str) -> None:
    base = init_base(tmp_path)
    edit(base / "acme.ini", pattern, replacement)
    rc, output = run_acme(base)
    assert rc == 1, output[-3000:]
    assert f"{base}/{needle}" in output or needle in output, output[-3000:]
    assert str(base / "acme.ini") in output, output[-3000:]


def test_the_plugin_without_a_section_refuses_to_start(tmp_path: Path) -> None:
    base = init_base(tmp_path)
    ini = base / "acme.ini"
    ini.write_text(ini.read_text().split("\n[rspf]\n")[0] + "\n")
    rc, output = run_acme(base)
    assert rc == 1, output[-3000:]
    assert f"{ini} has no [rspf] section, but the rspf plugin is installed" in output, output[-3000:]
    assert "without its protection" in output


def test_enable_false_starts_unprotected_and_says_so(tmp_path: Path) -> None:
    base = init_base(tmp_path)
    edit(base / "acme.ini", r"^enable=true$", "enable=false")
    out_path = base / "acme.out"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen([str(ACMECSE), "--headless", "-dir", str(base)], cwd=base, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        from .acme_harness import wait_until

        logs = base / "logs"

        def warned() -> bool:
            assert proc.poll() is None, out_path.read_text(errors="replace")[-3000:]
            text = "".join(p.read_text(errors="replace") for p in logs.glob("*.log")) if logs.is_dir() else ""
            return "the plugin is inactive and the CSE runs WITHOUT its protection" in text and "CSE started" in text

        wait_until(warned, timeout=EXIT_TIMEOUT, what="the warning and ACME's start")
    finally:
        assert stop_process(proc, 20.0) == 0
