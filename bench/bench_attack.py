#!/usr/bin/env python3
"""Legitimate service under a slow/idle-connection attack: rate under attack / rate without, side by side.

Run from the project root with the project's venv (the installed ``rspf`` package is what is measured):

    .venv/bin/python bench/bench_attack.py [--conns N] [--sources S] [--seconds T] [--rounds R]
                                           [--registrations G] [--keep]

What runs (each its own OS process, everything on loopback):

* ``rspf mef serve`` and ``acmecse --headless`` with the plugin, set up exactly as ``bench_acme.py`` does (its
  ``setup`` and ``enrol_all`` are reused; default transport limits: 4,096 connections, 256 per source address,
  10 s handshake deadline, 30 s request deadline and idle timeout);
* an attacker process (asyncio): N connections to the MEF and N to the CSE's secure listener, spread over S
  source addresses 127.0.0.2, 127.0.0.3, ... Half of them trickle a real ClientHello one byte every 2 s (the
  handshake never completes), half connect and send nothing. Whenever the server closes one (deadline or
  shedding), the attacker opens it again, so about N stay held all the time;
* this process: ONE sequential legitimate client, from 127.0.0.1, taking turns between three operations,
  each on a new connection:
  * MEF: ``Enrolee.enrol`` (handshake, securityProfile, enrolment exchange);
  * secure listener, first contact (the first G operations of each round): a TLS-PSK session with a KeID the
    CSE has never seen (so the CSE fetches its key from the MEF inside the handshake), CREATE <AE>, RETRIEVE
    of that <AE>;
  * secure listener, then: a TLS-PSK session of an AE registered before the run, RETRIEVE of its <AE>.

Rounds of T seconds (longer than the 10 s handshake deadline, so the servers' closing and the attacker's
reopening are part of it) alternate quiet / under attack, R of each. The attack starts before an attack round
once the attacker holds N connections to each server, and is stopped (all its sockets closed) after it.
Printed: per round the rate of each operation (operations per second spent on it) and what the attacker held;
per operation the ratio median(rate under attack) / median(rate quiet), TARGET MET when >= 0.8.
It exits 0 either way (a measurement), stops every process it started by PID, and removes its temporary folder.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from bench_acme import APP_ID, enrol_all, setup
from benchutil import LIFTED_HYGIENE, cpu_seconds, finish, load_average

from rspf.demo import Processes, free_port

if TYPE_CHECKING:
    from rspf.enrolee import Enrolee, Enrolment
    from rspf.tls import PskClient

TARGET = 0.8
TRICKLE_SECONDS = 2.0
LINGER_0 = struct.pack("ii", 1, 0)


class AttackStats(TypedDict):
    """The attacker's counts: connections open now per port, and totals since it started."""
    open: dict[int, int]
    opened: int
    closed_by_server: int
    connect_failed: int


# ------------------------------------------------------------------------------------------ attacker
def _client_hello() -> bytes:
    from OpenSSL import SSL

    conn = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    conn.set_connect_state()
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        pass
    return conn.bio_read(65536)


def attacker_main(ports: list[int], conns: int, sources: int, pipe: Any) -> None:
    """Holds ``conns`` connections to each port while told to; answers "stats" with counts."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(_attack(ports, conns, sources, pipe))


async def _attack(ports: list[int], conns: int, sources: int, pipe: Any) -> None:
    loop = asyncio.get_running_loop()
    hello = _client_hello()
    stats: AttackStats = {"open": {p: 0 for p in ports}, "opened": 0, "closed_by_server": 0, "connect_failed": 0}
    running: list[asyncio.Task[None]] = []
    holding = asyncio.Event()

    async def slot(port: int, source: str, slow: bool) -> None:
        while holding.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
            except OSError:
                stats["connect_failed"] += 1
                await asyncio.sleep(0.5)
                continue
            stats["opened"] += 1
            stats["open"][port] += 1
            # our closes reset: no TIME_WAIT on 127.0.0.x:port to block a later bind('', port) on this machine
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)
            try:
                if slow:
                    for b in hello:
                        writer.write(bytes([b]))
                        try:
                            data = await asyncio.wait_for(reader.read(1), TRICKLE_SECONDS)
                        except TimeoutError:
                            continue
                        if not data:
                            break
                else:
                    await reader.read(1)
                stats["closed_by_server"] += 1
            except OSError:
                stats["closed_by_server"] += 1
            finally:
                stats["open"][port] -= 1
                writer.close()
            await asyncio.sleep(0.05)

    while True:
        cmd = await loop.run_in_executor(None, pipe.recv)
        if cmd == "start":
            holding.set()
            for port in ports:
                for i in range(conns):
                    running.append(asyncio.create_task(slot(port, f"127.0.0.{2 + i % sources}", i % 2 == 0)))
            pipe.send("started")
        elif cmd == "stats":
            pipe.send({"open": dict(stats["open"]), "opened": stats["opened"],
                       "closed_by_server": stats["closed_by_server"], "connect_failed": stats["connect_failed"]})
        elif cmd == "stop":
            holding.clear()
            for t in running:
                t.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            running.clear()
            pipe.send("stopped")
        else:
            return


class Attacker:
    def __init__(self, ports: list[int], conns: int, sources: int) -> None:
        ctx = mp.get_context("spawn")
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=attacker_main, args=(ports, conns, sources, child), daemon=True)
        self.proc.start()
        self.ports, self.conns = ports, conns

    def ask(self, cmd: str, timeout: float = 60.0) -> Any:
        self.pipe.send(cmd)
        if not self.pipe.poll(timeout):
            raise RuntimeError(f"the attacker did not answer {cmd!r}")
        return self.pipe.recv()

    def start(self, timeout: float = 60.0) -> AttackStats:
        self.ask("start")
        deadline = time.monotonic() + timeout
        while True:
            st: AttackStats = self.ask("stats")
            if all(st["open"][p] >= self.conns * 0.95 for p in self.ports) or time.monotonic() > deadline:
                return st
            time.sleep(0.2)

    def stop(self) -> None:
        self.ask("stop")

    def close(self) -> None:
        try:
            self.pipe.send("quit")
        except OSError:
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()


# ------------------------------------------------------------------------------------------ legitimate load
class Legit:
    """The legitimate client's three operations; each returns its duration (or raises)."""

    def __init__(self, enrolees: list[Enrolee], registered: list[Enrolment], fresh: list[Enrolment],
                 tls_client: PskClient) -> None:
        self.enrolees, self.registered, self.fresh = enrolees, registered, iter(fresh)
        self.tls = tls_client
        self.n = 0

    def enrol(self) -> float:
        t0 = time.perf_counter()
        self.enrolees[self.n % len(self.enrolees)].enrol(store=False)
        return time.perf_counter() - t0

    def register(self) -> float:
        from rspf.ae import SecureAE

        e = next(self.fresh)
        t0 = time.perf_counter()
        with SecureAE.from_enrolment(e, tls_client=self.tls).session() as cse:
            cse.register(APP_ID)
            if "m2m:ae" not in cse.retrieve(e.enrolee_id):
                raise RuntimeError("RETRIEVE after registration failed")
        return time.perf_counter() - t0

    def retrieve(self) -> float:
        from rspf.ae import SecureAE

        e = self.registered[self.n % len(self.registered)]
        t0 = time.perf_counter()
        with SecureAE.from_enrolment(e, tls_client=self.tls).session() as cse:
            if "m2m:ae" not in cse.retrieve(e.enrolee_id):
                raise RuntimeError("RETRIEVE failed")
        return time.perf_counter() - t0

    def round(self, seconds: float, registrations: int) -> dict[str, tuple[float, int]]:
        """{operation: (rate, errors)} for ``seconds`` of taking turns."""
        spent = {"enrol": 0.0, "register": 0.0, "retrieve": 0.0}
        done = dict.fromkeys(spent, 0)
        errors = dict.fromkeys(spent, 0)
        end = time.monotonic() + seconds
        regs = 0
        while time.monotonic() < end or regs < registrations:
            ops = ["enrol", "register" if regs < registrations else "retrieve"]
            regs += ops[1] == "register"
            for op in ops:
                t0 = time.perf_counter()
                try:
                    spent[op] += getattr(self, op)()
                    done[op] += 1
                except Exception:
                    errors[op] += 1
                    spent[op] += time.perf_counter() - t0
            self.n += 1
        return {op: (done[op] / spent[op] if spent[op] else 0.0, errors[op]) for op in spent}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conns", type=int, default=1200, help="attack connections held to EACH server (default 1200)")
    ap.add_argument("--sources", type=int, default=6, help="attacker source addresses 127.0.0.2.. (default 6)")
    ap.add_argument("--seconds", type=float, default=12.0, help="length of a round (default 12)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each kind, quiet and attack (default 3)")
    ap.add_argument("--registrations", type=int, default=10,
                    help="first-contact registrations at the start of each round (default 10)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs) at the end")
    args = ap.parse_args()
    if min(args.conns, args.sources, args.seconds, args.rounds, args.registrations) < 1:
        ap.error("all counts must be >= 1")

    from rspf.ae import SecureAE
    from rspf.enrolee import Enrolee, EnroleeConfig
    from rspf.secret import Secret
    from rspf.tls import PskClient

    t_start = time.monotonic()
    home = Path(tempfile.mkdtemp(prefix="rspf-bench-attack-"))
    procs = Processes()
    attacker: Attacker | None = None
    try:
        mef_port, http_port, secure_port = free_port(), free_port(), free_port()
        while len({mef_port, http_port, secure_port}) < 3:
            secure_port, http_port = free_port(), free_port()
        n_fresh = 2 * args.rounds * args.registrations
        n_aes = n_fresh + 20
        # the legitimate enrolments re-enrol the same enrolees all along: key hygiene (bench_mef_hygiene.py) is
        # lifted here, so what is measured is the service under attack, not the enrolment rate limit
        rows, t_setup = setup(home, n_aes, mef_port, http_port, secure_port, procs, "waitress",
                              mef_keys=LIFTED_HYGIENE)
        mef_pid, cse_pid = procs.procs[0][1].pid, procs.procs[1][1].pid
        print(f"setup: MEF pid {mef_pid} :{mef_port}, ACME IN-CSE pid {cse_pid} TLS-PSK :{secure_port}, {n_aes} AE "
              f"enrolees ({t_setup:.1f} s)")
        t0 = time.monotonic()
        enrolments = enrol_all(rows, mef_port, home)
        tls = PskClient()
        legit = Legit([], enrolments[n_fresh:], enrolments[:n_fresh], tls)
        for e in legit.registered:  # the AEs of the RETRIEVE operation register before the run
            with SecureAE.from_enrolment(e, tls_client=tls).session() as cse:
                cse.register(APP_ID)
        legit.enrolees = [Enrolee(EnroleeConfig(mef_host="127.0.0.1", mef_port=mef_port,
                                                mef_fqdn=row[0].split("@")[1], kpm_id=row[0],
                                                kpm=Secret(bytes.fromhex(row[1]), "Kpm"), node_id=row[3],
                                                store_path=home / "unused.store"), tls_client=tls)
                          for row in rows[n_fresh:]]
        print(f"enrolled {len(enrolments)} AEs and registered {len(legit.registered)} (not timed, "
              f"{time.monotonic() - t0:.1f} s)")
        attacker = Attacker([mef_port, secure_port], args.conns, args.sources)
        print(f"attack: {args.conns} connections to the MEF and {args.conns} to the secure listener from "
              f"127.0.0.2..127.0.0.{1 + args.sources} (half trickle a ClientHello a byte every "
              f"{TRICKLE_SECONDS:g} s, half idle); load average {load_average()}")
        rates: dict[str, dict[str, list[float]]] = {op: {"quiet": [], "attack": []}
                                                    for op in ("enrol", "register", "retrieve")}
        attacker_pid = attacker.proc.pid
        assert attacker_pid is not None, "the attacker process was started in Attacker()"
        pids = {"MEF": mef_pid, "CSE": cse_pid, "attacker": attacker_pid}
        warm = legit.round(min(3.0, args.seconds), 0)  # warm-up (first use of code paths): not counted
        print(f"warm-up: {warm['enrol'][0]:.1f} enrolments/s, {warm['retrieve'][0]:.1f} retrieves/s (not counted)")
        print(f"\n  {'round':>5} {'kind':7} {'MEF enrol/s':>11} {'err':>3} {'CSE reg+get/s':>13} {'err':>3} "
              f"{'CSE get/s':>9} {'err':>3} | CPU % MEF CSE attacker client | attacker holds MEF / CSE")
        for r in range(args.rounds):
            for kind in (("quiet", "attack") if r % 2 == 0 else ("attack", "quiet")):
                held = ""
                if kind == "attack":
                    st = attacker.start()
                    held = f"{st['open'][mef_port]:>5} / {st['open'][secure_port]:>5}"
                cpu0 = {k: cpu_seconds(p) for k, p in pids.items()} | {"client": time.process_time()}
                w0 = time.monotonic()
                res = legit.round(args.seconds, args.registrations)
                wall = time.monotonic() - w0
                cpu1 = {k: cpu_seconds(p) for k, p in pids.items()} | {"client": time.process_time()}
                cpu = " ".join(f"{100 * (cpu1[k] - cpu0[k]) / wall:3.0f}" for k in ("MEF", "CSE", "attacker", "client"))
                if kind == "attack":
                    st = attacker.ask("stats")
                    held += (f" -> {st['open'][mef_port]} / {st['open'][secure_port]} at the end "
                             f"({st['opened']} opened, {st['closed_by_server']} closed by the servers)")
                    attacker.stop()
                for op in rates:
                    rates[op][kind].append(res[op][0])
                print(f"  {r + 1:>5} {kind:7} {res['enrol'][0]:>11.1f} {res['enrol'][1]:>3} "
                      f"{res['register'][0]:>13.1f} {res['register'][1]:>3} {res['retrieve'][0]:>9.1f} "
                      f"{res['retrieve'][1]:>3} | {cpu:>20} | {held}", flush=True)
        print("\nSUMMARY (median rate under attack / median rate quiet)")
        for name, op in (("MEF enrolment", "enrol"), ("secure listener first-contact register+retrieve", "register"),
                         ("secure listener new session + retrieve", "retrieve")):
            q, a = statistics.median(rates[op]["quiet"]), statistics.median(rates[op]["attack"])
            ratio = a / q
            print(f"  {name}: quiet {q:.1f}/s, under attack {a:.1f}/s -> {ratio:.2f} (target >= {TARGET:g}): "
                  f"{'TARGET MET' if ratio >= TARGET else 'TARGET MISSED'}")
        print(f"  total time {time.monotonic() - t_start:.0f} s; load average now {load_average()}")
        return 0
    finally:
        if attacker is not None:
            attacker.close()
        finish(procs, home, args.keep)


if __name__ == "__main__":
    sys.exit(main())
