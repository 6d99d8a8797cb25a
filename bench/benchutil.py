"""Small measuring helpers shared by the benchmark scripts in bench/."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rspf.demo import Processes

CLK_TCK = os.sysconf("SC_CLK_TCK")
#: [mef] keys for benches that re-enrol the same enrolees again and again (what they measure is not key hygiene,
#: which bench_mef_hygiene.py measures): no enrolment rate limit, no retirement of the KeIDs still in use
LIFTED_HYGIENE = {"enrolment_rate_burst": "100000", "max_live_keys_per_enrolee": "1000",
                  "key_retirement_grace_seconds": "86400"}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) from /proc, in seconds; 0.0 if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def rss_mb(pid: int) -> float:
    """The resident memory of a process (VmRSS in /proc), in MB; NaN if unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def pct(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of ``values``; NaN when empty."""
    s = sorted(values)
    if not s:
        return float("nan")
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def finish(procs: Processes, home: Path, keep: bool) -> None:
    """Stop every process the bench started (by PID, through ``procs``) and remove its folder unless kept."""
    print("\nstopping the processes started here")
    procs.stop_all()
    if keep:
        print(f"kept {home}")
    else:
        shutil.rmtree(home, ignore_errors=True)


def set_mef_keys(cfg: Path, values: dict[str, str]) -> None:
    """Set ``[mef]`` keys in a mef.toml that ``rspf mef init`` wrote (each key's line, or its commented-out line,
    replaced, comment and all; values in TOML syntax). Raises when a key has no line of its own to change."""
    import re

    text = cfg.read_text()
    for key, value in values.items():
        text, n = re.subn(rf"(?m)^(# )?{re.escape(key)} = .*$", f"{key} = {value}", text)
        if n != 1:
            raise RuntimeError(f"{cfg} has no '{key} = ' line to change")
    cfg.write_text(text)
