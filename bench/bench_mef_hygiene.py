#!/usr/bin/env python3
"""Key hygiene at the MEF: the database of a running MEF while ONE enrolee re-enrols 1,000 times.

Run from the project root with the project's venv (the installed ``rspf`` package is what is measured):

    .venv/bin/python bench/bench_mef_hygiene.py [--enrolments N] [--keep]

A real ``rspf mef serve`` (one enrolee; the per-enrolee enrolment rate limit lifted to 100,000 so the re-
enrolments are not refused; ``key_retirement_grace_seconds = 0``, ``max_live_keys_per_enrolee = 3``,
``purge_interval_seconds = 1``, ``revocation_log_max_rows = 100``) and this process as the one Enrolee,
enrolling through the library (``rspf.enrolee.Enrolee.enrol``) again and again. At checkpoints the bench waits
until the MEF's purge has run (polling the database read-only) and prints the database's size in use (pages x
page size) and its rows: ``enrolment_keys`` (what a re-enrolment adds and retirement removes) and
``revocations`` (the revocation log, one row per retired key, kept ``revocation_log_days`` and at most
``revocation_log_max_rows``).

Target (issue 7): the database stays bounded. Printed as: live keys after N re-enrolments <= the cap (without
retirement and purge there would be N), and the database size after N re-enrolments <= 1.2x its size after
N/4 (every row that grows with re-enrolments is purged: retired keys at once, log rows beyond the cap).
It exits 0 either way (a measurement, not a test); it stops the MEF by its PID and removes its folder.
"""

from __future__ import annotations

import argparse
import secrets
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchutil import load_average, set_mef_keys

from rspf.demo import free_port, wait_port

MEF_FQDN = "mef.bench.example.com"
SP_ID = "//sp.bench.example.com"
CAP = 3
LOG_ROWS = 100
TARGET_GROWTH = 1.2


def wal_size(db: Path) -> int:
    wal = Path(f"{db}-wal")
    return wal.stat().st_size if wal.exists() else 0


def read(db: Path) -> tuple[int, int, int]:
    """(enrolment_keys rows, revocation log rows, the database's logical size in bytes: pages in use x page
    size as a reader sees it, WAL included; the WAL file itself is SQLite's journal, reused after checkpoints)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        keys = con.execute("SELECT count(*) FROM enrolment_keys").fetchone()[0]
        log = con.execute("SELECT count(*) FROM revocations").fetchone()[0]
        pages = con.execute("PRAGMA page_count").fetchone()[0] - con.execute("PRAGMA freelist_count").fetchone()[0]
        size = pages * con.execute("PRAGMA page_size").fetchone()[0]
    finally:
        con.close()
    return int(keys), int(log), int(size)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--enrolments", type=int, default=1000, help="re-enrolments of the one enrolee (default 1000)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder at the end")
    args = ap.parse_args()
    if args.enrolments < 10:
        ap.error("--enrolments must be >= 10")

    from rspf.enrolee import Enrolee, EnroleeConfig
    from rspf.secret import Secret
    from rspf.tls import PskClient

    rspf = str(Path(sys.executable).parent / "rspf")
    home = Path(tempfile.mkdtemp(prefix="rspf-bench-hygiene-"))
    mef: subprocess.Popen | None = None
    try:
        port = free_port()
        cfg = home / "mef.toml"
        subprocess.run([rspf, "mef", "init", str(cfg), "--fqdn", MEF_FQDN, "--sp-id", SP_ID, "--port", str(port)],
                       check=True, stdout=subprocess.DEVNULL)
        set_mef_keys(cfg, {"enrolment_rate_burst": "100000", "key_retirement_grace_seconds": "0",
                           "max_live_keys_per_enrolee": str(CAP), "purge_interval_seconds": "1",
                           "revocation_log_max_rows": str(LOG_ROWS), "log_level": '"warning"'})
        kpm = secrets.token_bytes(32)
        kpm_file = home / "dev.kpm"
        kpm_file.write_text(kpm.hex() + "\n")
        kpm_file.chmod(0o600)
        subprocess.run([rspf, "mef", "enrolee", "add", "-c", str(cfg), "--kpm-id", f"dev@{MEF_FQDN}",
                        "--kpm-file", str(kpm_file), "--enrolee-id", "Cdev", "--node-id", "urn:dev:ops:dev",
                        "--registrar-cse-id", "/id-in", "--registrar-uri", "https://127.0.0.1:1/cse-in"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        db = home / "mef.sqlite"
        if not db.exists():
            found = sorted(home.glob("*.sqlite"))
            if len(found) != 1:
                raise RuntimeError(f"cannot find the MEF's database in {home}")
            db = found[0]
        with open(home / "mef.stderr", "wb") as err:
            mef = subprocess.Popen([rspf, "mef", "serve", "-c", str(cfg)], stdout=subprocess.DEVNULL, stderr=err)
        wait_port(port, mef, "the MEF")
        enrolee = Enrolee(EnroleeConfig(mef_host="127.0.0.1", mef_port=port, mef_fqdn=MEF_FQDN,
                                        kpm_id=f"dev@{MEF_FQDN}", kpm=Secret(kpm, "Kpm"), node_id="urn:dev:ops:dev",
                                        store_path=home / "unused.store"), tls_client=PskClient())
        checkpoints = sorted({args.enrolments // 10, args.enrolments // 4, args.enrolments // 2, args.enrolments})
        print(f"MEF pid {mef.pid} :{port}; cap {CAP} live keys, grace 0 s, log rows <= {LOG_ROWS}, purge every 1 s;"
              f" load average {load_average()}")
        print(f"  {'re-enrolments':>13} {'keys rows':>9} {'log rows':>8} {'DB bytes in use':>15} {'WAL file':>10} "
              f"{'s':>6}")
        sizes: dict[int, int] = {}
        last_keys = 0
        t0 = time.monotonic()
        done = 0
        for point in checkpoints:
            while done < point:
                enrolee.enrol(store=False)
                done += 1
            deadline = time.monotonic() + 30
            while ((got := read(db))[0] > CAP or got[1] > LOG_ROWS) and time.monotonic() < deadline:
                time.sleep(0.2)  # the running MEF purges every second
            keys, log, sizes[point] = read(db)
            last_keys = keys
            print(f"  {point:>13} {keys:>9} {log:>8} {sizes[point]:>15,} {wal_size(db):>10,} "
                  f"{time.monotonic() - t0:>6.1f}", flush=True)
        first, final = args.enrolments // 4, checkpoints[-1]
        ratio = sizes[final] / sizes[first]
        print("\nSUMMARY")
        print(f"  live keys after {final} re-enrolments: {last_keys} (cap {CAP}; {final} without retirement and "
              f"purge) -> {'TARGET MET' if last_keys <= CAP else 'TARGET MISSED'}")
        print(f"  database size after {final} / after {first} re-enrolments: {sizes[final]:,} / {sizes[first]:,} "
              f"bytes = {ratio:.2f} (target <= {TARGET_GROWTH}) -> "
              f"{'TARGET MET' if ratio <= TARGET_GROWTH else 'TARGET MISSED'}")
        return 0
    finally:
        if mef is not None:
            mef.terminate()
            try:
                mef.wait(10)
            except subprocess.TimeoutExpired:
                mef.kill()
        if args.keep:
            print(f"kept {home}")
        else:
            import shutil
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
