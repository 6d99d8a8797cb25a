"""The README's main job (`rspf demo`) runs end to end: MEF + IN-CSE + AE + MN-CSE, and stops the three
servers it started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    rspf = Path(sys.executable).parent / "rspf"
    r = subprocess.run([str(rspf), "demo", "--workdir", str(tmp_path / "demo")], capture_output=True, text=True,
                       timeout=240, stdin=subprocess.DEVNULL)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert "registered <AE> Csensor01 (aei Csensor01)" in out and "over TLS-PSK" in out
    assert "applicableCredIDs = ['12-" in out and "allowedAEs        = ['Csensor01']" in out
    assert "without a credential: refused, HTTP 403, X-M2M-RSC 4126" in out  # no rule admits it
    # the plain port cannot act for an AE that registered with a credential
    assert "in the name of Csensor01: refused, HTTP 403, X-M2M-RSC 4107" in out
    assert "deleted in its name: refused, HTTP 403, X-M2M-RSC 4107" in out
    assert "<remoteCSE> cse-in/id-mn1" in out
    assert "The deployment worked end to end" in out
    # every process it started was stopped by PID, cleanly
    stopped = [line for line in out.splitlines() if line.strip().startswith("stopped ")]
    assert len(stopped) == 3 and all("exit 0" in line for line in stopped), stopped
    for line in stopped:
        pid = int(line.split("pid ")[1].split(",")[0])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"process {pid} is still running")
