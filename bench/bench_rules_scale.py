#!/usr/bin/env python3
"""First-contact AE registration at a CSE that already recorded many enrolled AEs, side by side with one that
recorded few.

Run from the project root with the project's venv (the installed ``rspf`` package is what is measured):

    .venv/bin/python bench/bench_rules_scale.py [--big N] [--small M] [--aes A] [--rounds R] [--fill-threads T]
                                                [--keep]

What runs (each its own OS process, everything on 127.0.0.1): one MEF (``rspf mef serve``) and TWO ACME IN-CSEs
with the plugin (``databaseType=memory``, compatibility mode, ``allowedAppIDs=Nbench*``), both the Enrolment
Target ``/id-in`` at the MEF. Before any timing, AE enrolees enrol with the MEF, and M of them register at the
"small" CSE and N at the "big" one (default 1,000 and 100,000; T client threads): each registration there records
the credential's own bound rule (rspf.ssar), so the big CSE holds 100,000 rules and 100,000 <AE>s. Then R rounds,
alternating the order, each registering A fresh enrolled AEs at each CSE: a first contact (new TLS-PSK connection
with a KeID the CSE has never seen, so it fetches the key from the MEF inside the handshake; CREATE <AE>, the rule
check and the recording of the new credential's rule), one sequential client.

Target (issues 7 and 9): first-contact registration with N recorded / with M recorded (medians) <= 1.5. It also
prints each CSE's resident memory (VmRSS). The default run takes about 20 minutes on two cores, most of it
filling the big CSE (``--big 10000`` takes about 2).
It prints TARGET MET / TARGET MISSED and exits 0 either way (a measurement, not a test). Every process it
started is stopped by its PID at the end, and the temporary folder is removed.
"""

from __future__ import annotations

import argparse
import csv
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bench_acme import APP_ID, CSE_ID, CSE_NAME, MEF_FQDN, SP_ID, TARGET_IDENTITY
from benchutil import cpu_seconds, finish, load_average, rss_mb

from rspf.demo import Processes, acme_ini, free_port, run, wait_http, wait_port
from rspf.tls import PskClient

if TYPE_CHECKING:
    from rspf.enrolee import Enrolment

TARGET = 1.5


class Cse:
    def __init__(self, name: str) -> None:
        self.name = name
        self.http_port, self.secure_port = free_port(), free_port()
        while self.secure_port == self.http_port:
            self.secure_port = free_port()
        self.pid = 0

    @property
    def uri(self) -> str:
        return f"https://127.0.0.1:{self.secure_port}/{CSE_NAME}"


def setup(home: Path, count: int, mef_port: int, cses: list[Cse], procs: Processes) -> list[tuple[str, str, str]]:
    """The MEF with ``count`` AE enrolees and the two CSEs; returns the enrolees (kpm_id, kpm hex, node_id)."""
    bindir = Path(sys.executable).parent
    rspf, acmecse = str(bindir / "rspf"), str(bindir / "acmecse")
    (home / "mef").mkdir()
    cfg = home / "mef" / "mef.toml"
    run([rspf, "mef", "init", str(cfg), "--fqdn", MEF_FQDN, "--sp-id", SP_ID, "--port", str(mef_port)])
    cfg.write_text(cfg.read_text().replace('log_level = "info"', 'log_level = "warning"'))
    psk = home / "mef-target.psk"
    run([rspf, "keygen", str(psk)])
    run([rspf, "mef", "target", "add", "-c", str(cfg), "--psk-identity", TARGET_IDENTITY, "--psk-file", str(psk),
         "--target-id", f"/{CSE_ID}"])
    rows = []
    with open(home / "mef" / "batch.csv", "w", newline="") as f:
        os.fchmod(f.fileno(), 0o600)  # it holds keys: the MEF refuses a batch others can read
        w = csv.writer(f)
        w.writerow(["kpm_id", "kpm", "enrolee_id", "node_id", "registrar_cse_id", "registrar_uri"])
        for n in range(count):
            row = (f"scale-{n:06d}@{MEF_FQDN}", secrets.token_hex(32), f"urn:dev:ops:scale-{n:06d}")
            # the registrar URI in the profile is not used: the bench says which CSE each AE registers at
            w.writerow([row[0], row[1], f"Cscale{n:06d}", row[2], f"/{CSE_ID}", cses[0].uri])
            rows.append(row)
    run([rspf, "mef", "enrolee", "import", "-c", str(cfg), str(home / "mef" / "batch.csv")])
    mef = procs.start("MEF", [rspf, "mef", "serve", "-c", str(cfg)], home / "mef" / "mef.log")
    wait_port(mef_port, mef, "the MEF")
    for cse in cses:
        base = home / cse.name
        base.mkdir()
        (base / "mef-target.psk").write_bytes(psk.read_bytes())
        (base / "mef-target.psk").chmod(0o600)
        ini = acme_ini("IN", CSE_ID, CSE_NAME, cse.http_port).replace("logLevel=info", "logLevel=warning")
        (base / "acme.ini").write_text(ini + "\n[http.wsgi]\nenable=true\n")
        run([rspf, "acme", "install", "--base-dir", str(base), "--mef", f"127.0.0.1:{mef_port}", "--mef-fqdn",
             MEF_FQDN, "--no-enrol", "--mef-psk-identity", TARGET_IDENTITY, "--mef-psk-file", "mef-target.psk",
             "--secure-port", str(cse.secure_port), "--no-enforcement", "--allowed-app-ids", "Nbench*"])
        proc = procs.start(f"ACME {cse.name}", [acmecse, "--headless", "-dir", str(base)], base / "acme.out")
        cse.pid = proc.pid
        wait_port(cse.secure_port, proc, f"the {cse.name} CSE's secure listener", timeout=90)
        wait_http(f"http://127.0.0.1:{cse.http_port}/{CSE_NAME}", proc, f"the {cse.name} CSE")
    return rows


def enrol_all(rows: list[tuple[str, str, str]], mef_port: int, home: Path, threads: int = 4) -> list[Enrolment]:
    from rspf.enrolee import Enrolee, EnroleeConfig
    from rspf.secret import Secret

    tls = PskClient()
    out: list[Enrolment | None] = [None] * len(rows)

    def work(k: int) -> None:
        for i in range(k, len(rows), threads):
            kpm_id, kpm_hex, node_id = rows[i]
            e = Enrolee(EnroleeConfig(mef_host="127.0.0.1", mef_port=mef_port, mef_fqdn=MEF_FQDN, kpm_id=kpm_id,
                                      kpm=Secret(bytes.fromhex(kpm_hex), "Kpm"), node_id=node_id,
                                      store_path=home / "unused.store"), tls_client=tls)
            out[i] = e.enrol(store=False)

    pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if any(e is None for e in out):
        raise RuntimeError("an enrolment failed (see the traceback above)")
    return [e for e in out if e is not None]


def register(cse: Cse, enrolment: Enrolment, tls: PskClient) -> float:
    """One first-contact registration of ``enrolment``'s AE at ``cse``: seconds from connect to 2001."""
    from rspf.ae import SecureAE

    def connect(host: str, port: int):  # type: ignore[no-untyped-def]
        return tls.connect(host, port, enrolment.ke_id, enrolment.registrar_key)

    ae = SecureAE(cse.uri, enrolment.enrolee_id, connect, security="TLS-PSK")
    t0 = time.perf_counter()
    with ae.session() as session:
        data = session.register(APP_ID)
    took = time.perf_counter() - t0
    if not isinstance(data, dict) or data.get("m2m:ae", {}).get("aei") != enrolment.enrolee_id:
        raise RuntimeError(f"registration of {enrolment.enrolee_id} at {cse.name} answered {data!r:.200}")
    return took


def fill(cse: Cse, enrolments: list[Enrolment], threads: int) -> float:
    """Register every one of ``enrolments`` at ``cse`` (not timed as part of the measurement), printing the time
    each tenth took (a registration that slowed with the number recorded shows here first)."""
    t0 = time.monotonic()
    tls = PskClient()
    failed: list[BaseException] = []
    done = [0]
    step = max(1, len(enrolments) // 10)
    lock = threading.Lock()
    last = [t0]

    def work(k: int) -> None:
        try:
            for i in range(k, len(enrolments), threads):
                register(cse, enrolments[i], tls)
                with lock:
                    done[0] += 1
                    if done[0] % step == 0 and len(enrolments) >= 1000:
                        now = time.monotonic()
                        print(f"    {cse.name}: {done[0]:>7} recorded, last {step} in {now - last[0]:.1f} s",
                              flush=True)
                        last[0] = now
        except BaseException as exc:  # reported below
            failed.append(exc)

    pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if failed:
        raise RuntimeError(f"filling the {cse.name} CSE failed: {failed[0]}")
    return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--big", type=int, default=100_000, help="AEs recorded at the big CSE first (default 100000)")
    ap.add_argument("--small", type=int, default=1_000, help="AEs recorded at the small CSE first (default 1000)")
    ap.add_argument("--aes", type=int, default=30, help="first-contact registrations per CSE per round (default 30)")
    ap.add_argument("--rounds", type=int, default=4, help="rounds, alternating the order (default 4)")
    ap.add_argument("--fill-threads", type=int, default=6,
                    help="client threads that record the AEs before the measurement (default 6)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs) at the end")
    args = ap.parse_args()
    if min(args.big, args.small, args.aes, args.rounds, args.fill_threads) < 1:
        ap.error("all counts must be >= 1")

    home = Path(tempfile.mkdtemp(prefix="rspf-bench-rules-"))
    procs = Processes()
    try:
        small, big = Cse("small"), Cse("big")
        mef_port = free_port()
        measured = 2 * args.aes * args.rounds
        total = args.small + args.big + measured
        t0 = time.monotonic()
        rows = setup(home, total, mef_port, [small, big], procs)
        print(f"setup: MEF :{mef_port}, CSE small plain :{small.http_port} TLS-PSK :{small.secure_port}, CSE big "
              f"plain :{big.http_port} TLS-PSK :{big.secure_port}; {total} AE enrolees imported "
              f"({time.monotonic() - t0:.1f} s)")
        t0 = time.monotonic()
        enrolments = enrol_all(rows, mef_port, home)
        print(f"enrolled {len(enrolments)} AEs with the MEF ({time.monotonic() - t0:.1f} s, not timed)")
        pre_small, pre_big = enrolments[:args.small], enrolments[args.small:args.small + args.big]
        fresh = enrolments[args.small + args.big:]
        took_small = fill(small, pre_small, args.fill_threads)
        took_big = fill(big, pre_big, args.fill_threads)
        print(f"recorded {args.small} AEs at the small CSE ({took_small:.1f} s) and {args.big} at the big CSE "
              f"({took_big:.1f} s), {args.fill_threads} client threads, not timed", flush=True)
        print(f"ACME resident memory: small {rss_mb(small.pid):.0f} MB, big {rss_mb(big.pid):.0f} MB")
        print(f"load average before the measurement: {load_average()} ({os.cpu_count()} CPUs)")
        tls = PskClient()
        lat: dict[str, list[float]] = {"small": [], "big": []}
        cpu: dict[str, list[float]] = {"small": [], "big": []}
        print(f"\n  {'round':>5} {'CSE':6} {'n':>4} {'p50 ms':>7} {'mean ms':>8} | {'ACME cpu ms':>11}")
        for r in range(args.rounds):
            order = (small, big) if r % 2 == 0 else (big, small)
            for cse in order:
                batch = [fresh.pop() for _ in range(args.aes)]
                c0 = cpu_seconds(cse.pid)
                got = [register(cse, e, tls) for e in batch]
                c1 = cpu_seconds(cse.pid)
                lat[cse.name] += got
                cpu[cse.name].append((c1 - c0) / len(batch))
                print(f"  {r + 1:>5} {cse.name:6} {len(got):>4} {statistics.median(got) * 1000:>7.2f} "
                      f"{statistics.fmean(got) * 1000:>8.2f} | {(c1 - c0) / len(batch) * 1000:>11.2f}", flush=True)
        med = {k: statistics.median(v) for k, v in lat.items()}
        ratio = med["big"] / med["small"]
        print("\nSUMMARY")
        print(f"  first-contact registration: {args.big} recorded {med['big'] * 1000:.2f} ms, {args.small} recorded "
              f"{med['small'] * 1000:.2f} ms (medians; ACME CPU {statistics.fmean(cpu['big']) * 1000:.2f} vs "
              f"{statistics.fmean(cpu['small']) * 1000:.2f} ms) -> {ratio:.2f}x (target <= {TARGET:g}x): "
              f"{'TARGET MET' if ratio <= TARGET else 'TARGET MISSED'}")
        print(f"  load average now {load_average()}")
        return 0
    finally:
        finish(procs, home, args.keep)


if __name__ == "__main__":
    sys.exit(main())
