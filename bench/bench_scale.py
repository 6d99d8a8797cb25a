#!/usr/bin/env python3
"""The MEF at operator scale (issue 9): a population of a million enrolees, and two MEF instances on one
PostgreSQL database, side by side with a thousand enrolees and one instance, in one run.

Run from the project root with the project's venv (the installed ``rspf`` package is what is measured), with a
PostgreSQL server (``RSPF_TEST_POSTGRES_URL``, default ``postgresql://postgres@127.0.0.1:5432/postgres``):

    .venv/bin/python bench/bench_scale.py [--big 1000000] [--small 1000] [--store postgresql|sqlite]
                                          [--clients 4] [--seconds 5] [--rounds 3] [--fetches 3000]

What runs (each its own OS process, everything on 127.0.0.1; the PostgreSQL populations are schemas of their own,
dropped at the end):

1. **Import**: one CSV of ``--big`` enrolees (random 32-byte Kpms) is written; ``rspf mef enrolee import`` loads
   its first ``--small`` rows into the small population and all of it into the big one (a third import of a
   tenth of it shows what the peak memory of the import process does as the file grows: it should not).
   Printed: wall time, rows/s and peak RSS of each import process (``wait4``'s ``ru_maxrss``).
2. **Enrolment rate, big vs small**: one ``rspf mef serve`` per population. ``--clients`` client processes
   enrol, over new TLS-PSK connections, the same ``--small`` enrolees (present in both populations: the same
   work per enrolment) for ``--seconds``; rounds alternate small/big (``--rounds`` of each). Printed: medians,
   the ratio big/small (target >= 0.9) and MEF CPU per enrolment.
3. **fetchCredentials, big vs small**: a Target on one kept-alive TLS-PSK connection per MEF fetches KeIDs
   enrolled in step 2, in alternating blocks; p50 and p99 of each (target: p99 at big within 0.9 of small's
   rate, i.e. p99 big/small <= 1/0.9).
4. **Two instances vs one** (big population): a second ``rspf mef serve`` on the same database; rounds alternate
   "every client at instance 1" and "half the clients at each instance". Printed: the rate ratio (target >= 1.6
   where the instances have cores of their own) and the MEF CPU per enrolment of each arrangement (on a 2-core
   machine that also runs the clients and PostgreSQL, the CPU per enrolment is the figure that says whether a
   second instance adds cost).

It prints TARGET MET / TARGET MISSED and exits 0 either way (a measurement, not a test). Every process it started
is stopped by its PID at the end, and the temporary folder is removed.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

from benchutil import LIFTED_HYGIENE, cpu_seconds, load_average, pct, set_mef_keys

from rspf.demo import Processes, free_port, wait_port

MEF_FQDN = "mef.example.com"
SP_ID = "//sp.example.com"
TARGET_ID, TARGET_IDENTITY = "/id-in", "id-in@sp.example.com"
PG_URL = os.environ.get("RSPF_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
RSPF = str(Path(sys.executable).parent / "rspf")


# ------------------------------------------------------------------------------------ populations
def write_batch(path: Path, count: int) -> list[tuple[str, str, str]]:
    """A CSV of ``count`` enrolees (0600: it holds keys); returns the first 10,000 as (kpm_id, kpm_hex, node_id)."""
    head: list[tuple[str, str, str]] = []
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kpm_id", "kpm", "enrolee_id", "node_id", "registrar_cse_id", "registrar_uri"])
        for n in range(count):
            row = (f"scale-{n:07d}", secrets.token_hex(32), f"Cscale{n:07d}", f"urn:dev:ops:scale-{n:07d}")
            w.writerow([row[0], row[1], row[2], row[3], TARGET_ID, "https://127.0.0.1:8443/cse-in"])
            if n < 10_000:
                head.append((row[0], row[1], row[3]))
    return head


def head_of(source: Path, dest: Path, rows: int) -> None:
    with open(source, newline="") as f, open(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as g:
        for n, line in enumerate(f):
            if n > rows:
                break
            g.write(line)


class Population:
    """A MEF home (configuration, master key, Target credential) whose store is an SQLite file or a fresh
    PostgreSQL schema."""

    def __init__(self, root: Path, name: str, store: str) -> None:
        self.root, self.name = root / name, name
        self.root.mkdir()
        self.config = self.root / "mef.toml"
        self.schema = f"rspf_bench_{name}_{secrets.token_hex(3)}"
        self.url = f"{PG_URL}{'&' if '?' in PG_URL else '?'}options=-csearch_path%3D{self.schema}"
        self.store = store
        subprocess.run([RSPF, "mef", "init", str(self.config), "--fqdn", MEF_FQDN, "--sp-id", SP_ID],
                       check=True, stdout=subprocess.DEVNULL)
        set_mef_keys(self.config, {"log_level": '"warning"', **LIFTED_HYGIENE})
        if store == "postgresql":
            import psycopg

            with psycopg.connect(PG_URL, autocommit=True) as conn:
                conn.execute(f"CREATE SCHEMA {self.schema}")
            with self.config.open("a") as f:
                f.write(f"database_url = {json.dumps(self.url)}\n")
        self.psk_file = self.root / "target.psk"
        subprocess.run([RSPF, "keygen", str(self.psk_file)], check=True, stdout=subprocess.DEVNULL)
        subprocess.run([RSPF, "mef", "target", "add", "-c", str(self.config), "--psk-identity", TARGET_IDENTITY,
                        "--psk-file", str(self.psk_file), "--target-id", TARGET_ID], check=True,
                       stdout=subprocess.DEVNULL)

    def import_csv(self, batch: Path) -> tuple[float, float]:
        """``rspf mef enrolee import``: (seconds, peak RSS of the import process in MB)."""
        t0 = time.perf_counter()
        proc = subprocess.Popen([RSPF, "mef", "enrolee", "import", "-c", str(self.config), str(batch)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdout is not None
        out = proc.stdout.read().decode()
        _pid, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0 or "imported" not in out:
            raise RuntimeError(f"the import into {self.name} failed ({proc.returncode}): {out[-500:]}")
        return time.perf_counter() - t0, usage.ru_maxrss / 1024

    def serve(self, procs: Processes, tag: str = "") -> tuple[subprocess.Popen, int]:
        port = free_port()
        proc = procs.start(f"mef-{self.name}{tag}", [RSPF, "mef", "serve", "-c", str(self.config), "--port",
                                                     str(port)], self.root / f"mef{tag}.log", cwd=self.root)
        wait_port(port, proc, f"the MEF of {self.name}{tag}")
        return proc, port

    def drop(self) -> None:
        if self.store == "postgresql":
            import psycopg

            with psycopg.connect(PG_URL, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")


# ------------------------------------------------------------------------------------ load
def worker_main(conn: Connection, index: int, clients: int, enrolees: list[tuple[str, str, str]],
                store_dir: str) -> None:
    """One client process: for each (port, start_at, seconds) command, enrol round-robin over its slice of the
    enrolees on new connections; report (enrolments, elapsed, a sample of KeIDs, errors)."""
    import logging

    from rspf.enrolee import Enrolee, EnroleeConfig
    from rspf.secret import Secret
    from rspf.tls import PskClient

    logging.basicConfig(level=logging.ERROR)
    tls = PskClient()
    mine = enrolees[index::clients]
    while True:
        cmd = conn.recv()
        if cmd is None:
            break
        port, start_at, seconds = cmd
        enrolling = [Enrolee(EnroleeConfig(mef_host="127.0.0.1", mef_port=port, mef_fqdn=MEF_FQDN, kpm_id=k,
                                         kpm=Secret(bytes.fromhex(h), "Kpm"), node_id=node,
                                         store_path=Path(store_dir) / "unused.json"), tls_client=tls)
                   for k, h, node in mine]
        while time.time() < start_at:
            time.sleep(0.005)
        done, errors, sample = 0, 0, []
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            try:
                got = enrolling[(done + errors) % len(enrolling)].enrol(store=False)
            except Exception:  # noqa: BLE001 -- counted and reported
                errors += 1
                continue
            done += 1
            if done % 10 == 0:
                sample.append(got.ke_id)
        conn.send((done, time.perf_counter() - t0, sample, errors))
    conn.close()


class Load:
    def __init__(self, clients: int, enrolees: list[tuple[str, str, str]], store_dir: str) -> None:
        ctx = mp.get_context("spawn")
        self.pipes, self.procs = [], []
        for i in range(clients):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(child, i, clients, enrolees, store_dir), daemon=True)
            p.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(p)

    def run(self, ports: list[int], seconds: float, mefs: list[subprocess.Popen]) -> tuple[float, float, list[str],
                                                                                          int]:
        """Client i enrols at ports[i % len(ports)]; returns (rate, MEF CPU ms per enrolment, KeIDs, errors)."""
        cpu0 = sum(cpu_seconds(p.pid) for p in mefs)
        start_at = time.time() + 0.3
        for i, pipe in enumerate(self.pipes):
            pipe.send((ports[i % len(ports)], start_at, seconds))
        results = [pipe.recv() for pipe in self.pipes]
        cpu = sum(cpu_seconds(p.pid) for p in mefs) - cpu0
        done = sum(r[0] for r in results)
        elapsed = max(r[1] for r in results)
        return (done / elapsed, 1000 * cpu / max(done, 1), [k for r in results for k in r[2]],
                sum(r[3] for r in results))

    def close(self) -> None:
        for pipe in self.pipes:
            pipe.send(None)
        for p in self.procs:
            p.join(10)


def fetch_latencies(port: int, psk_file: Path, ke_ids: list[str], count: int) -> list[float]:
    """``count`` fetchCredentials on one kept-alive TLS-PSK connection (random KeIDs of ``ke_ids``), in ms."""
    from rspf.client import OneM2MClient
    from rspf.fileutil import read_key_file
    from rspf.target import request_credentials
    from rspf.tls import PskClient

    tls = PskClient().connect("127.0.0.1", port, TARGET_IDENTITY, read_key_file(psk_file), server_name=MEF_FQDN,
                              timeout=15)
    client = OneM2MClient(tls, TARGET_ID, host=MEF_FQDN, deadline=15)
    out = []
    try:
        for _ in range(count):
            t0 = time.perf_counter()
            request_credentials(client, random.choice(ke_ids), 22)
            out.append(1000 * (time.perf_counter() - t0))
    finally:
        client.close()
    return out


def verdict(ok: bool) -> str:
    return "TARGET MET" if ok else "TARGET MISSED"


# ------------------------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--big", type=int, default=1_000_000)
    ap.add_argument("--small", type=int, default=1000)
    ap.add_argument("--store", choices=("postgresql", "sqlite"), default="postgresql")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fetches", type=int, default=3000)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="rspf-bench-scale-"))
    procs = Processes()
    pops: list[Population] = []
    print(f"bench_scale: store {args.store}, {os.cpu_count()} CPUs, load {load_average()}, big {args.big:,}, "
          f"small {args.small:,}, {args.clients} clients x {args.seconds:g} s x {args.rounds} rounds")
    try:
        t0 = time.perf_counter()
        head = write_batch(home / "big.csv", args.big)
        print(f"\n[1] wrote {args.big:,} enrolees to a CSV in {time.perf_counter() - t0:.1f} s")
        head_of(home / "big.csv", home / "small.csv", args.small)
        tenth = max(args.small, args.big // 10)
        head_of(home / "big.csv", home / "tenth.csv", tenth)
        small, big, mid = (Population(home, n, args.store) for n in ("small", "big", "tenth"))
        pops += [small, big, mid]
        imports = {}
        for pop, batch, rows in ((small, "small.csv", args.small), (mid, "tenth.csv", tenth),
                                 (big, "big.csv", args.big)):
            seconds, rss = pop.import_csv(home / batch)
            imports[pop.name] = (rows, seconds, rss)
            print(f"    import {rows:>9,} rows: {seconds:7.1f} s ({rows / seconds:,.0f} rows/s), "
                  f"peak RSS {rss:,.0f} MB")
        mid.drop()
        pops.remove(mid)
        rss_ratio = imports["big"][2] / imports["tenth"][2]
        print(f"    peak RSS at {args.big:,} / at {tenth:,} rows: {rss_ratio:.2f} (bounded memory: about 1)")

        small_mef, small_port = small.serve(procs)
        big_mef, big_port = big.serve(procs)
        measured = head[:args.small]
        load = Load(args.clients, measured, str(home))
        try:
            print(f"\n[2] enrolments/s, {args.small:,} enrolees enrolling at a MEF holding {args.big:,} vs "
                  f"{args.small:,}")
            load.run([small_port], 1.0, [small_mef])  # warm-up of both
            load.run([big_port], 1.0, [big_mef])
            rates: dict[str, list[float]] = {"small": [], "big": []}
            cpus: dict[str, list[float]] = {"small": [], "big": []}
            keids: dict[str, list[str]] = {"small": [], "big": []}
            for r in range(args.rounds):
                order = [("small", small_port, small_mef), ("big", big_port, big_mef)]
                for name, port, mef in (order if r % 2 == 0 else order[::-1]):
                    rate, cpu, sample, errors = load.run([port], args.seconds, [mef])
                    rates[name].append(rate)
                    cpus[name].append(cpu)
                    keids[name] += sample
                    print(f"    round {r + 1} {name:5}: {rate:7.1f}/s, MEF CPU {cpu:.2f} ms/enrolment"
                          + (f", {errors} errors" if errors else ""))
            enrol_ratio = statistics.median(rates["big"]) / statistics.median(rates["small"])

            print(f"\n[3] fetchCredentials latency on one kept-alive connection ({args.fetches:,} per MEF, in "
                  "alternating blocks)")
            lat: dict[str, list[float]] = {"small": [], "big": []}
            for _ in range(6):
                lat["small"] += fetch_latencies(small_port, small.psk_file, keids["small"], args.fetches // 6)
                lat["big"] += fetch_latencies(big_port, big.psk_file, keids["big"], args.fetches // 6)
            for name in ("small", "big"):
                print(f"    {name:5}: p50 {pct(lat[name], 0.5):.2f} ms, p99 {pct(lat[name], 0.99):.2f} ms")
            p99_ratio = pct(lat["big"], 0.99) / pct(lat["small"], 0.99)

            one_r: list[float] = []
            two_r: list[float] = []
            one_c: list[float] = []
            two_c: list[float] = []
            if args.store == "postgresql":  # (an SQLite file serves one MEF process)
                print("\n[4] two MEF instances on the big population vs one")
                second_mef, second_port = big.serve(procs, "-2")
                load.run([big_port, second_port], 1.0, [big_mef, second_mef])
                for r in range(args.rounds):
                    arrangements = [("one", [big_port]), ("two", [big_port, second_port])]
                    for name, ports in (arrangements if r % 2 == 0 else arrangements[::-1]):
                        rate, cpu, _sample, errors = load.run(ports, args.seconds, [big_mef, second_mef])
                        (one_r if name == "one" else two_r).append(rate)
                        (one_c if name == "one" else two_c).append(cpu)
                        print(f"    round {r + 1} {name}: {rate:7.1f}/s, MEF CPU {cpu:.2f} ms/enrolment"
                              + (f", {errors} errors" if errors else ""))
        finally:
            load.close()

        cores = os.cpu_count() or 1
        print("\n=== summary ===")
        print(f"import of {args.big:,} enrolees: {imports['big'][1]:.1f} s ({args.big / imports['big'][1]:,.0f} "
              f"rows/s), peak RSS {imports['big'][2]:,.0f} MB ({rss_ratio:.2f}x that of {tenth:,} rows)")
        print(f"enrolments/s with {args.big:,} / with {args.small:,}: {statistics.median(rates['big']):.1f} / "
              f"{statistics.median(rates['small']):.1f} = {enrol_ratio:.2f} (target >= 0.9) "
              f"{verdict(enrol_ratio >= 0.9)}; MEF CPU/enrolment {statistics.median(cpus['big']):.2f} vs "
              f"{statistics.median(cpus['small']):.2f} ms")
        print(f"fetchCredentials p99 at {args.big:,}: {pct(lat['big'], 0.99):.2f} ms vs {pct(lat['small'], 0.99):.2f}"
              f" ms at {args.small:,} (p50 {pct(lat['big'], 0.5):.2f} vs {pct(lat['small'], 0.5):.2f}); "
              f"ratio {p99_ratio:.2f} {verdict(p99_ratio <= 1 / 0.9)}")
        if two_r:
            two_ratio = statistics.median(two_r) / statistics.median(one_r)
            print(f"two instances / one: {statistics.median(two_r):.1f} / {statistics.median(one_r):.1f}/s = "
                  f"{two_ratio:.2f} on {cores} cores shared with the clients and the database ("
                  + (f"target >= 1.6 {verdict(two_ratio >= 1.6)}" if cores >= 8 else "no cores of their own: see CPU")
                  + f"); MEF CPU/enrolment two {statistics.median(two_c):.2f} ms vs one {statistics.median(one_c):.2f}"
                  " ms")
    finally:
        print("\nstopping the processes started here")
        procs.stop_all()
        for pop in pops:
            pop.drop()
        if args.keep:
            print(f"kept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
