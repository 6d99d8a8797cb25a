#!/usr/bin/env python3
"""Revocation latency: how soon a CSE stops honouring a credential the MEF revoked.

Run from the project root with the project's venv (the installed ``rspf`` package is what is measured):

    .venv/bin/python bench/bench_revocation.py [--rounds R] [--keep]

What runs (each its own OS process, everything on 127.0.0.1): a real MEF (``rspf mef serve``) and ACME with the
plugin, set up as in bench_acme.py (``bench_acme.setup``: the IN-CSE is the AEs' Enrolment Target; compatibility
mode, so the bench can read the rules as ``CAdmin`` on the plain port). Each round takes a fresh AE enrolee:

1. the AE enrols with the MEF, opens a TLS-PSK session to the CSE's secure listener and registers (2001): the
   CSE fetched its key, and recorded the credential's bound rule (rspf.ssar);
2. the operator revokes that KeID: ``rspf mef enrolee revoke-key``; the clock starts when the command returns
   (the revocation is committed in the MEF's database);
3. three watchers run at once, each every 50 ms, and note when they see the change:
   * a NEW TLS-PSK connection with the KeID is refused (the handshake fails),
   * the OPEN session is closed by the CSE (a RETRIEVE on it fails in transport),
   * the credential's rule entry is gone (RETRIEVE of the bound rule by ``CAdmin`` answers 4004).

Target (issue 7): each latency <= 5 s. The CSE learns revocations from the MEF's revocation feed, which it reads
every 2 s (docs/mef-interface.md), so about 1 s on average and 2 s at most are expected, plus the work.
It prints TARGET MET / TARGET MISSED and exits 0 either way (a measurement, not a test). Every process it
started is stopped by its PID at the end, and the temporary folder is removed.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from bench_acme import APP_ID, CSE_ID, enrol_all, setup
from benchutil import finish, load_average

from rspf.demo import Processes, free_port, run
from rspf.tls import PskClient

if TYPE_CHECKING:
    from rspf.enrolee import Enrolment

TARGET_SECONDS = 5.0
POLL = 0.05
GIVE_UP = 30.0
WATCHES = ("new connection refused", "open connection closed", "rule entry gone")


def rule_present(http_port: int, credential_id: str) -> bool:
    """Whether the credential's bound rule exists (RETRIEVE by resource ID as CAdmin on the plain port)."""
    from rspf.ssar import bound_rule_name

    req = urllib.request.Request(f"http://127.0.0.1:{http_port}/~/{CSE_ID}/{bound_rule_name(credential_id)}",
                                 headers={"X-M2M-Origin": "CAdmin", "X-M2M-RI": "bench-rev", "X-M2M-RVI": "3",
                                          "Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return "m2m:asar" in json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return False
        raise


def watch(what: str, seen: Callable[[], bool], start: threading.Event, out: dict[str, float]) -> None:
    start.wait()
    t0 = time.monotonic()
    while time.monotonic() - t0 < GIVE_UP:
        if seen():
            out[what] = time.monotonic() - t0
            return
        time.sleep(POLL)


def measure(enrolment: Enrolment, http_port: int, revoke: list[str], tls: PskClient) -> dict[str, float]:
    """One round: register over a session kept open, revoke the KeID, and time what the three watchers see."""
    from rspf.ae import SecureAE
    from rspf.errors import RspfError, TlsError
    from rspf.keys import CRED_TYPE_KPSAID, credential_id

    ae = SecureAE.from_enrolment(enrolment, tls_client=tls)
    cred = credential_id(CRED_TYPE_KPSAID, enrolment.ke_id)
    path = f"{enrolment.enrolee_id}/data"
    out: dict[str, float] = {}
    with ae.session() as cse:
        cse.register(APP_ID)
        cse.create_container("data")
        if not rule_present(http_port, cred):
            raise RuntimeError(f"the CSE recorded no rule for {cred} after the registration")

        def refused() -> bool:
            try:
                with ae.session() as fresh:
                    fresh.retrieve(path)
                return False
            except TlsError:
                return True
            except RspfError:  # accepted just before the revocation, then closed by it: not a refusal yet
                return False

        def closed() -> bool:
            try:
                cse.retrieve(path)
                return False
            except RspfError:
                return True

        start = threading.Event()
        checks = (refused, closed, lambda: not rule_present(http_port, cred))
        threads = [threading.Thread(target=watch, args=(w, f, start, out), daemon=True)
                   for w, f in zip(WATCHES, checks, strict=True)]
        for t in threads:
            t.start()
        time.sleep(random.uniform(0, 2))  # a revocation comes at any point of the CSE's 2 s feed cycle
        run([*revoke, enrolment.ke_id])
        start.set()
        for t in threads:
            t.join(GIVE_UP + 5)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="revocations measured, one AE each (default 5)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs) at the end")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")

    home = Path(tempfile.mkdtemp(prefix="rspf-bench-rev-"))
    procs = Processes()
    try:
        mef_port, http_port, secure_port = free_port(), free_port(), free_port()
        while len({mef_port, http_port, secure_port}) < 3:
            secure_port, http_port = free_port(), free_port()
        rows, t_setup = setup(home, args.rounds, mef_port, http_port, secure_port, procs, "waitress")
        print(f"setup: MEF :{mef_port}, ACME IN-CSE plain :{http_port} TLS-PSK :{secure_port}, {len(rows)} AE "
              f"enrolees ({t_setup:.1f} s); load average {load_average()}")
        enrolments = enrol_all(rows, mef_port, home)
        rspf = str(Path(sys.executable).parent / "rspf")
        cfg = home / "mef" / "mef.toml"
        tls = PskClient()
        results: list[dict[str, float]] = []
        print(f"\n  {'round':>5} {'KeID':<20} " + " ".join(f"{w:>24}" for w in WATCHES))
        for r, enrolment in enumerate(enrolments):
            out = measure(enrolment, http_port, [rspf, "mef", "enrolee", "revoke-key", "-c", str(cfg)], tls)
            results.append(out)
            print(f"  {r + 1:>5} {enrolment.ke_id[:16] + '…':<20} "
                  + " ".join(f"{out[w]:>22.2f} s" if w in out else f"{'not within ' + str(GIVE_UP) + ' s':>24}"
                             for w in WATCHES), flush=True)
        print("\nSUMMARY (seconds from the revoke command's return)")
        for w in WATCHES:
            got = [res[w] for res in results if w in res]
            missing = len(results) - len(got)
            worst = max(got) if got and not missing else float("inf")
            print(f"  {w:<24}: median {statistics.median(got) if got else float('nan'):.2f}, max {worst:.2f}"
                  f" over {len(results)} revocations -> {'TARGET MET' if worst <= TARGET_SECONDS else 'TARGET MISSED'}"
                  f" (target <= {TARGET_SECONDS:g} s each)")
        print(f"  load average now {load_average()}")
        return 0
    finally:
        finish(procs, home, args.keep)


if __name__ == "__main__":
    sys.exit(main())
