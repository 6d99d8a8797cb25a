#!/usr/bin/env python3
"""A flood of made-up KeIDs at ACME's secure listener: what it costs ACME in memory and the MEF in requests, and
how long a legitimate AE's first registration takes meanwhile.

Run from the project root with the project's venv (the installed ``rspf`` package is what is measured):

    .venv/bin/python bench/bench_flood.py [--handshakes N] [--sources K] [--legit M] [--max-seconds S] [--keep]

What runs (each its own OS process): a real MEF (``rspf mef serve``, log_level = "info" so that every
fetchCredentials request it answers is one line in its log, which is how the MEF-side count is taken) and a
real ACME IN-CSE with the plugin (``bench_acme.setup``: databaseType=memory, logLevel=warning, enforcement off);
K flood processes, each bound to its own loopback source address (127.0.0.2, 127.0.0.3, ...), making N/K TLS-PSK
handshakes each with a fresh made-up ``<32 hex>@<MEF-FQDN>`` psk_identity and a random key; this process, which
samples ACME's RSS (/proc/PID/status VmRSS) and registers M legitimate AEs from 127.0.0.1 before the flood and M
during it (``SecureAE.session()`` + ``register()``, retried every 0.1 s when the handshake is refused).

Targets: ACME's RSS grows by less than 25 MB and the MEF answers fewer than 1,000 fetchCredentials requests for
the N handshakes. Exits 0 either way (a measurement). Every process it started is stopped by its PID; the
temporary folder is removed (unless --keep). The flood stops at --max-seconds whatever happened.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import re
import secrets
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench_acme import APP_ID, CSE_ID, MEF_FQDN, enrol_all, setup
from benchutil import finish, load_average, rss_mb

from rspf.demo import Processes, free_port

if TYPE_CHECKING:
    from multiprocessing.context import SpawnProcess
    from multiprocessing.sharedctypes import Synchronized

    from rspf.enrolee import Enrolment

TARGET_RSS_MB = 25.0
TARGET_MEF_CALLS = 1000
_FETCH_LINE = re.compile(r"RETRIEVE '/fetchCredentials/|fetchCredentials: Target ")


def mef_fetches(log: Path) -> tuple[int, int]:
    """(refused, served) fetchCredentials requests, from the MEF's log (one line each at INFO or WARNING)."""
    refused = served = 0
    for line in log.read_text(errors="replace").splitlines():
        if _FETCH_LINE.search(line):
            if "fetchCredentials: Target " in line:
                served += 1
            else:
                refused += 1
    return refused, served


# --------------------------------------------------------------------------------------- flood processes
def flood(source: str, count: int, port: int, deadline: float, done: Synchronized[int],
          errors: Synchronized[int]) -> None:
    """``count`` handshakes from ``source`` with made-up KeIDs; counts into the shared ``done`` / ``errors``."""
    from rspf.errors import TransportError
    from rspf.secret import Secret
    from rspf.tls import PskClient

    plain_connect = socket.create_connection

    def from_source(address: tuple[str | None, Any], timeout: float | None = None, source_address: object = None,
                    **kw: Any) -> socket.socket:  # this process floods from `source` only
        return plain_connect(address, timeout, (source, 0), **kw)

    socket.create_connection = from_source
    client = PskClient()
    for _ in range(count):
        if time.time() > deadline:
            return
        ke_id = f"{secrets.token_hex(16)}@{MEF_FQDN}"
        try:
            client.connect("127.0.0.1", port, ke_id, Secret(secrets.token_bytes(32), "made-up key"), timeout=10).close()
            with errors.get_lock():
                errors.value += 1  # a made-up KeID must never complete a handshake
        except TransportError:
            pass
        with done.get_lock():
            done.value += 1


# --------------------------------------------------------------------------------------- legitimate AEs
def first_registration(enrolment: Enrolment) -> tuple[float, int]:
    """Seconds from the first attempt until the AE is registered, and how many handshakes were refused."""
    from rspf.ae import SecureAE
    from rspf.errors import TransportError
    from rspf.tls import PskClient

    t0 = time.perf_counter()
    refused = 0
    while True:
        try:
            with SecureAE.from_enrolment(enrolment, tls_client=PskClient()).session() as cse:
                data = cse.register(APP_ID)
            break
        except TransportError:
            refused += 1
            if time.perf_counter() - t0 > 60:
                raise RuntimeError(f"{enrolment.enrolee_id} could not register within 60 s") from None
            time.sleep(0.1)
    if data.get("m2m:ae", {}).get("aei") != enrolment.enrolee_id:
        raise RuntimeError(f"registration of {enrolment.enrolee_id} answered {data!r:.200}")
    return time.perf_counter() - t0, refused


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--handshakes", type=int, default=10_000, help="made-up KeID handshakes (default 10000)")
    ap.add_argument("--sources", type=int, default=3, help="flood source addresses 127.0.0.2... (default 3)")
    ap.add_argument("--legit", type=int, default=5, help="legitimate first registrations before and during (5)")
    ap.add_argument("--max-seconds", type=float, default=240, help="the flood stops after this long (default 240)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs) at the end")
    args = ap.parse_args()
    if min(args.handshakes, args.sources, args.legit) < 1 or args.sources > 200:
        ap.error("counts must be >= 1 and --sources <= 200")

    t_start = time.monotonic()
    home = Path(tempfile.mkdtemp(prefix="rspf-bench-flood-"))
    procs = Processes()
    workers: list[SpawnProcess] = []
    try:
        mef_port, http_port, secure_port = free_port(), free_port(), free_port()
        while len({mef_port, http_port, secure_port}) < 3:
            secure_port, http_port = free_port(), free_port()
        rows, t_setup = setup(home, 2 * args.legit + 1, mef_port, http_port, secure_port, procs, "waitress",
                              mef_log_level="info")
        mef_pid, cse_pid = procs.procs[0][1].pid, procs.procs[1][1].pid
        mef_log = home / "mef" / "mef.log"
        print(f"setup: MEF pid {mef_pid} :{mef_port} (log_level info), ACME IN-CSE pid {cse_pid} ({CSE_ID}) TLS-PSK "
              f":{secure_port} ({t_setup:.1f} s); load average {load_average()}")
        enrolments = enrol_all(rows, mef_port, home)
        warm, before, during = enrolments[0], enrolments[1:1 + args.legit], enrolments[1 + args.legit:]

        first_registration(warm)  # first use of every code path in ACME and the plugin: not counted
        base = [first_registration(e)[0] for e in before]
        print(f"legitimate first registration WITHOUT flood: median {statistics.median(base) * 1000:.1f} ms "
              f"({len(base)} AEs from 127.0.0.1)")

        rss0 = rss_mb(cse_pid)
        refused0, served0 = mef_fetches(mef_log)
        ctx = mp.get_context("spawn")
        done, errors = ctx.Value("i", 0), ctx.Value("i", 0)
        deadline = time.time() + args.max_seconds
        per = args.handshakes // args.sources
        counts = [per + (1 if i < args.handshakes % args.sources else 0) for i in range(args.sources)]
        sources = [f"127.0.0.{2 + i}" for i in range(args.sources)]
        print(f"flood: {args.handshakes} handshakes with made-up KeIDs from {', '.join(sources)}; ACME RSS before "
              f"{rss0:.1f} MB; MEF fetchCredentials so far: {refused0 + served0}")
        t_flood = time.monotonic()
        for src, n in zip(sources, counts, strict=True):
            w = ctx.Process(target=flood, args=(src, n, secure_port, deadline, done, errors), daemon=True)
            w.start()
            workers.append(w)

        peak = rss0
        during_times: list[float] = []
        during_refused: list[int] = []
        marks = [args.handshakes * (i + 1) // (args.legit + 1) for i in range(args.legit)]
        last_print = time.monotonic()
        while any(w.is_alive() for w in workers):
            peak = max(peak, rss_mb(cse_pid))
            if marks and done.value >= marks[0]:
                marks.pop(0)
                secs, refused = first_registration(during[len(during_times)])
                during_times.append(secs)
                during_refused.append(refused)
                print(f"  after {done.value} flood handshakes: a legitimate AE registered in {secs * 1000:.1f} ms "
                      f"({refused} refused handshakes first)", flush=True)
            if time.monotonic() - last_print > 10:
                last_print = time.monotonic()
                print(f"  {done.value} handshakes, ACME RSS {rss_mb(cse_pid):.1f} MB", flush=True)
            time.sleep(0.05)
        flood_secs = time.monotonic() - t_flood
        for w in workers:
            w.join(5)
        rss1 = rss_mb(cse_pid)
        peak = max(peak, rss1)
        time.sleep(1.0)  # the MEF writes its last log lines
        refused1, served1 = mef_fetches(mef_log)
        mef_calls = (refused1 - refused0) + (served1 - served0)

        print(f"\nflood done: {done.value} handshakes in {flood_secs:.1f} s ({done.value / flood_secs:.0f}/s), "
              f"{errors.value} made-up KeIDs completed a handshake (must be 0)")
        growth = peak - rss0
        print(f"ACME RSS: before {rss0:.1f} MB, peak {peak:.1f} MB, after {rss1:.1f} MB -> growth {growth:.1f} MB "
              f"(target < {TARGET_RSS_MB:g} MB): {'TARGET MET' if growth < TARGET_RSS_MB else 'TARGET MISSED'}")
        print(f"MEF fetchCredentials requests during the flood (counted in the MEF's log): {mef_calls} "
              f"({refused1 - refused0} refused, {served1 - served0} served to the legitimate AEs) "
              f"(target < {TARGET_MEF_CALLS}): {'TARGET MET' if mef_calls < TARGET_MEF_CALLS else 'TARGET MISSED'}")
        if during_times:
            med = statistics.median(during_times)
            print(f"legitimate first registration DURING the flood: median {med * 1000:.1f} ms, max "
                  f"{max(during_times) * 1000:.1f} ms ({len(during_times)} AEs, {sum(during_refused)} refused "
                  f"handshakes in total); without flood {statistics.median(base) * 1000:.1f} ms -> ratio "
                  f"{med / statistics.median(base):.2f}")
        else:
            print("legitimate first registration DURING the flood: not measured (the flood ended first)")
        print(f"total time {time.monotonic() - t_start:.0f} s")
        return 0
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()  # by its handle (its PID), started here
                w.join(5)
        finish(procs, home, args.keep)


if __name__ == "__main__":
    sys.exit(main())
