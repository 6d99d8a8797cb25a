#!/usr/bin/env python3
"""Enrolments per second against a real MEF, side by side with the bare TLS-PSK + one HTTP round trip, and
certificate enrolments (mutual TLS, ECDSA P-256) side by side with PSK ones.

Run from the project root with the project's venv (the installed ``rspf`` package is what is measured):

    .venv/bin/python bench/bench_enrolment.py [--seconds N] [--clients C] [--rounds R] [--enrolees E]

What runs (every box is its own OS process, all on 127.0.0.1):

* ``rspf mef serve``: a real MEF (SQLite store, E enrolees imported from a CSV), log_level = "warning";
* a *bare* server (this file, ``--bare-server``): the same TLS stack (``rspf.tls.PskServer``, same default
  TLS versions / suites, one thread per connection) with a static PSK table; it runs the
  handshake, reads ONE request framed by h11, answers a small oneM2M JSON response and
  closes;
* C load-generator processes (multiprocessing, spawn): each loops for ``--seconds``, every operation on a
  NEW TLS connection:
    - bare: ``PskClient.connect`` + one POST/response (``rspf.client.OneM2MClient``) + close;
    - full: ``Enrolee(...).enrol(store=False)`` = handshake + exporter + POST /securityProfile (profile
      checked against the schema and the locally derived key) + POST /enrolmentExchange ... end,
      round-robin over the enrolees.
    - cert: the same enrolment by the Certificate-Based handshake (``--cert-enrolees`` enrolees registered by
      certificate, from a throw-away PKI of integration/pki.py; the MEF then has a certificate too, so
      every kind runs on a MEF configured for both). The ratio cert/full is printed.
    - est: the PSK enrolment of ``full`` by an Enrolee that also asks for a certificate (certificate
      provisioning is on and the enrolees are entitled): the MEF instructs ``certificateEnrolment`` and the
      Enrolee runs EST (cacerts, a new P-256 key, simpleenroll, checks, three 0600 files) on the same
      connection. The ratio est/full is printed.

Bare, full, cert and est rounds alternate (bare, full, cert, est, bare, ...) after a warm-up of each; the rate of
each kind
is the median over its rounds. Server CPU (utime+stime of the server process from /proc) and client CPU per
operation are printed too: on a shared 2-core machine they are steadier than the rates. The ratio full/bare
(of the medians) is printed with TARGET MET / TARGET MISSED (target: full >= 0.5 x bare). The exit code
is 0 either way: this is a measurement, not a test.

Every process started here is stopped by its PID and the temporary MEF home is removed at the end.
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NotRequired, TypedDict

from benchutil import LIFTED_HYGIENE, cpu_seconds, load_average, pct, set_mef_keys

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test PKI helper (integration/pki.py)
from integration.pki import make_pki  # noqa: E402

from rspf.demo import free_port, wait_port

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from rspf.tls import TlsConnection

TARGET_RATIO = 0.5
MEF_FQDN = "mef.bench.example.com"
SP_ID = "//sp.bench.example.com"
REGISTRAR_CSE_ID = "/id-in"
REGISTRAR_URI = "https://127.0.0.1:8443/cse-in"


class WorkerReport(TypedDict):
    """What one client process sends back after a command (seconds; errors counted by kind)."""
    done: int
    errors: dict[str, int]
    elapsed: float
    cpu: float
    lat: list[float]
    tls: tuple[str, str]


class RoundResult(TypedDict):
    """All client processes over one run of one kind; server_cpu (seconds) is added by the caller."""
    kind: str
    done: int
    elapsed: float
    rate: float
    errors: dict[str, int]
    client_cpu: float
    lat: list[float]
    tls: tuple[str, str]
    server_cpu: NotRequired[float]


class KindSummary(TypedDict):
    """One kind over all rounds: median rate, per-round rates, error count, CPU seconds per op."""
    rate: float
    rates: list[float]
    errors: int
    srv: float
    cli: float
    tls: tuple[str, str]


# ------------------------------------------------------------------------------------------ helpers
def stop_process(proc: subprocess.Popen | None, what: str) -> None:
    """SIGTERM the process we started (by its PID), then SIGKILL it if it does not go."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        print(f"  {what} (pid {proc.pid}) ignored SIGTERM; killing it", file=sys.stderr)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    except ProcessLookupError:
        pass


def rspf_command() -> list[str]:
    script = Path(sys.executable).parent / "rspf"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from rspf.cli import main; sys.exit(main())"]


# ------------------------------------------------------------------------------------------ bare server
def bare_server_main(port: int, keys_file: str) -> None:
    """The reference server: rspf.tls.PskServer + one request/response per connection, thread each."""
    import logging

    import h11

    from rspf import wire
    from rspf.errors import RSC, TlsError
    from rspf.secret import Secret
    from rspf.tls import PskServer

    logging.basicConfig(level=logging.WARNING)
    table: dict[str, Secret] = {}
    with open(keys_file, encoding="ascii") as f:
        for line in f:
            ident, _, hexkey = line.strip().partition(" ")
            if ident:
                table[ident] = Secret(bytes.fromhex(hexkey), "bench PSK")
    # static lookup; same default versions / suites as the MEF (1.2-1.3)
    psk = PskServer(lambda identity, _peer_ip: table.get(identity))
    stop = threading.Event()
    slots = threading.BoundedSemaphore(256)  # bounded, like any server

    def serve(sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(None)
            tls = psk.wrap(sock, 10.0)
            try:
                tls.handshake()
            except TlsError:
                return
            try:
                tls.set_timeout(30.0)
                http = h11.Connection(h11.SERVER)
                head: h11.Request | None = None
                buf = bytearray(16384)
                try:
                    while not isinstance(event := http.next_event(), h11.EndOfMessage):
                        if event is h11.NEED_DATA:
                            n = tls.recv_into(buf)
                            http.receive_data(bytes(buf[:n]))
                        elif isinstance(event, h11.Request):
                            head = event
                        elif isinstance(event, h11.ConnectionClosed):
                            return
                except (h11.RemoteProtocolError, TimeoutError, ConnectionError):
                    return
                assert head is not None
                fields = dict(head.headers)
                resp = wire.onem2m_response(RSC.OK, {"m2m:dbg": "ok"},
                                            request_id=fields.get(b"x-m2m-ri", b"").decode("latin-1"),
                                            rvi=fields.get(b"x-m2m-rvi", b"").decode("latin-1"), close=True)
                out_headers = [*resp.headers.items(), ("content-length", str(len(resp.body)))]
                data = http.send(h11.Response(status_code=resp.status, headers=out_headers))
                data += http.send(h11.Data(data=resp.body)) + http.send(h11.EndOfMessage())
                try:
                    tls.sendall(data)
                except (TimeoutError, ConnectionError):
                    return
            finally:
                tls.close()
        except Exception:
            logging.exception("bare server: unexpected error")
        finally:
            slots.release()

    def on_term(*_a: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", port))
    lsock.listen(512)
    lsock.settimeout(0.5)
    while not stop.is_set():
        try:
            conn, _ = lsock.accept()
        except TimeoutError:
            continue
        except OSError:
            if stop.is_set():
                break
            raise
        if not slots.acquire(blocking=False):
            conn.close()
            continue
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
    lsock.close()


# ------------------------------------------------------------------------------------------ load generator
def worker_main(conn: Connection, index: int, enrolees: list[tuple[str, str, str]], mef_port: int, bare_port: int,
                store_dir: str, certs: list[tuple[str, str, str]], ca: str) -> None:
    """One client process: waits for (kind, start_at, seconds) commands and reports its counts."""
    import logging

    from rspf.client import OneM2MClient
    from rspf.enrolee import Enrolee, EnroleeConfig
    from rspf.secret import Secret
    from rspf.tls import CertClient, PskClient

    logging.basicConfig(level=logging.ERROR)  # the Enrolee logs every enrolment at INFO

    class RecordingPskClient(PskClient):
        """PskClient that remembers the version and suite of the last connection it opened."""

        last: tuple[str, str] = ("?", "?")

        def connect(self, *args: Any, **kwargs: Any) -> TlsConnection:
            tls = super().connect(*args, **kwargs)
            self.last = (tls.version, tls.cipher)
            return tls

    class RecordingCertClient(CertClient):
        """CertClient that remembers the version and suite of the last connection it opened."""

        last: tuple[str, str] = ("?", "?")

        def connect(self, *args: Any, **kwargs: Any) -> TlsConnection:
            tls = super().connect(*args, **kwargs)
            RecordingCertClient.last = (tls.version, tls.cipher)
            return tls

    tls_client = RecordingPskClient()
    # Spread the clients over the enrolee list so two clients rarely use the same KpmID at once.
    offset = index * max(1, len(enrolees) // 8)
    ring = enrolees[offset:] + enrolees[:offset]
    creds = [(kpm_id, Secret(bytes.fromhex(kpm_hex), "Kpm"), node_id) for kpm_id, kpm_hex, node_id in ring]
    full_clients = [
        Enrolee(EnroleeConfig(mef_host="127.0.0.1", mef_port=mef_port, mef_fqdn=MEF_FQDN, kpm_id=kpm_id, kpm=kpm,
                              node_id=node_id, store_path=Path(store_dir) / f"unused-{index}-{n}.json"),
                tls_client=tls_client)
        for n, (kpm_id, kpm, node_id) in enumerate(creds)
    ]

    def bare_once(i: int) -> None:
        kpm_id, kpm, _ = creds[i % len(creds)]
        tls = tls_client.connect("127.0.0.1", bare_port, kpm_id, kpm, server_name=MEF_FQDN, timeout=15.0)
        client = OneM2MClient(tls, kpm_id, host=MEF_FQDN)
        try:
            client.call("POST", "/bench", {"m2m:dbg": "ping"})
        finally:
            client.close()

    def full_once(i: int) -> None:
        full_clients[i % len(full_clients)].enrol(store=False)

    turn = index % max(1, len(certs))
    cert_clients = [
        Enrolee(EnroleeConfig(mef_host="127.0.0.1", mef_port=mef_port, mef_fqdn=MEF_FQDN, cert_file=Path(cert),
                              key_file=Path(key), trust_anchor_file=Path(ca), node_id=node_id,
                              store_path=Path(store_dir) / f"unused-{index}-cert-{n}.json"),
                tls_client=RecordingCertClient(ca, cert, key))
        for n, (cert, key, node_id) in enumerate(certs[turn:] + certs[:turn])
    ]

    def cert_once(i: int) -> None:
        cert_clients[i % len(cert_clients)].enrol(store=False)

    est_clients = [
        Enrolee(EnroleeConfig(mef_host="127.0.0.1", mef_port=mef_port, mef_fqdn=MEF_FQDN, kpm_id=kpm_id, kpm=kpm,
                              node_id=node_id, store_path=Path(store_dir) / f"unused-{index}-{n}.json",
                              certificate_enrolment=True, certificate_dir=Path(store_dir) / f"est-{index}"),
                tls_client=tls_client)
        for n, (kpm_id, kpm, node_id) in enumerate(creds[:8])
    ]

    def est_once(i: int) -> None:
        enrolee = est_clients[i % len(est_clients)]
        if not [i for i in enrolee.enrol(store=False).instructions if i.get("carriedOut")]:
            raise RuntimeError("no certificate was obtained (see the Enrolee's warning)")

    ops = {"bare": bare_once, "full": full_once, "cert": cert_once, "est": est_once}
    i = 0
    while True:
        cmd = conn.recv()
        if cmd is None:
            break
        kind, start_at, seconds = cmd
        op = ops[kind]
        while time.time() < start_at:
            time.sleep(min(0.01, max(0.0, start_at - time.time())))
        done = 0
        errors: dict[str, int] = {}
        lat: list[float] = []
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        deadline = t0 + seconds
        now = t0
        while now < deadline:
            try:
                op(i)
                done += 1
                t1 = time.perf_counter()
                lat.append(t1 - now)
                now = t1
            except Exception as exc:  # count it and go on; report the kinds
                key = f"{type(exc).__name__}: {str(exc)[:100]}"
                errors[key] = errors.get(key, 0) + 1
                now = time.perf_counter()
            i += 1
        elapsed = now - t0
        report: WorkerReport = {"done": done, "errors": errors, "elapsed": elapsed, "cpu": time.process_time() - cpu0,
                                "lat": lat, "tls": RecordingCertClient.last if kind == "cert" else tls_client.last}
        conn.send(report)
    conn.close()


class LoadGenerator:
    def __init__(self, clients: int, enrolees: list[tuple[str, str, str]], mef_port: int, bare_port: int,
                 store_dir: str, certs: list[tuple[str, str, str]], ca: str) -> None:
        ctx = mp.get_context("spawn")
        self.pipes = []
        self.procs = []
        for i in range(clients):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(child, i, enrolees, mef_port, bare_port, store_dir, certs, ca),
                            name=f"bench-client-{i}", daemon=True)
            p.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(p)

    def run(self, kind: str, seconds: float) -> RoundResult:
        start_at = time.time() + 0.3  # every client starts at the same moment
        for pipe in self.pipes:
            pipe.send((kind, start_at, seconds))
        try:
            results: list[WorkerReport] = [pipe.recv() for pipe in self.pipes]
        except (EOFError, OSError):
            raise RuntimeError("a client process died; see its traceback above") from None
        done = sum(r["done"] for r in results)
        elapsed = max(r["elapsed"] for r in results)
        errors: dict[str, int] = {}
        for r in results:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        lat = sorted(x for r in results for x in r["lat"])
        return {"kind": kind, "done": done, "elapsed": elapsed, "rate": done / elapsed if elapsed > 0 else 0.0,
                "errors": errors, "client_cpu": sum(r["cpu"] for r in results), "lat": lat,
                "tls": results[0]["tls"]}

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(None)
            except (OSError, BrokenPipeError):
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGKILL)
                p.join(timeout=5)


# ------------------------------------------------------------------------------------------ setup
def setup_mef(home: Path, port: int, count: int) -> list[tuple[str, str, str]]:
    """mef init + log_level warning + a CSV batch of ``count`` enrolees; returns (kpm_id, kpm_hex, node_id)."""
    rspf = rspf_command()
    cfg = home / "mef.toml"
    subprocess.run(rspf + ["mef", "init", str(cfg), "--fqdn", MEF_FQDN, "--sp-id", SP_ID, "--port", str(port)],
                   check=True, stdout=subprocess.DEVNULL)
    # every enrolee re-enrols many times a second here: key hygiene (its rate limit, retirement) lifted
    set_mef_keys(cfg, {"log_level": '"warning"', **LIFTED_HYGIENE})
    enrolees = []
    with open(home / "batch.csv", "w", newline="") as f:
        os.fchmod(f.fileno(), 0o600)  # it holds keys: the MEF refuses a batch others can read
        w = csv.writer(f)
        w.writerow(["kpm_id", "kpm", "enrolee_id", "node_id", "registrar_cse_id", "registrar_uri", "certificates"])
        for n in range(count):
            kpm_id, kpm_hex, node_id = f"bench-kpm-{n:05d}", secrets.token_hex(32), f"urn:dev:ops:bench-{n:05d}"
            w.writerow([kpm_id, kpm_hex, f"/id-mn{n}", node_id, REGISTRAR_CSE_ID, REGISTRAR_URI, "true"])
            enrolees.append((kpm_id, kpm_hex, node_id))
    subprocess.run(rspf + ["mef", "enrolee", "import", "-c", str(cfg), str(home / "batch.csv")], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(home / "bare.keys", "w", encoding="ascii") as f:
        os.fchmod(f.fileno(), 0o600)
        for kpm_id, kpm_hex, _ in enrolees:
            f.write(f"{kpm_id} {kpm_hex}\n")
    return enrolees


def setup_certificates(home: Path, count: int) -> list[tuple[str, str, str]]:
    """A PKI (the MEF's certificate naming MEF_FQDN) and ``count`` enrolees registered by certificate; the MEF's
    certificate keys set. Returns (cert, key, node_id) per enrolee; the trust anchor is home/pki/ca.pem."""
    pki = home / "pki"
    pki.mkdir()
    make_pki(pki, {f"cert{n}": f"{SP_ID}/id-cert{n}" for n in range(count)}, server_dns=MEF_FQDN)
    cfg = home / "mef.toml"
    set_mef_keys(cfg, {"tls_cert_file": f'"{pki / "server.pem"}"', "tls_key_file": f'"{pki / "server.key"}"',
                       "tls_client_ca_file": f'"{pki / "ca.pem"}"', "certificate_provisioning": "true"})
    certs = []
    for n in range(count):
        node_id = f"urn:dev:ops:bench-cert-{n}"
        subprocess.run(rspf_command() + ["mef", "enrolee", "add", "-c", str(cfg), "--cert", str(pki / f"cert{n}.pem"),
                                         "--enrolee-id", f"/id-cert{n}", "--node-id", node_id, "--registrar-cse-id",
                                         REGISTRAR_CSE_ID, "--registrar-uri", REGISTRAR_URI],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        certs.append((str(pki / f"cert{n}.pem"), str(pki / f"cert{n}.key"), node_id))
    return certs


def start_servers(home: Path, mef_port: int, bare_port: int) -> tuple[subprocess.Popen, subprocess.Popen]:
    mef_log = open(home / "mef.stderr", "wb")
    mef = subprocess.Popen(rspf_command() + ["mef", "serve", "-c", str(home / "mef.toml")],
                           stdout=subprocess.DEVNULL, stderr=mef_log)
    bare_log = open(home / "bare.stderr", "wb")
    bare = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--bare-server", str(bare_port),
                             str(home / "bare.keys")], stdout=subprocess.DEVNULL, stderr=bare_log)
    mef_log.close()
    bare_log.close()
    return mef, bare


# ------------------------------------------------------------------------------------------ report
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each measured round (default 5)")
    ap.add_argument("--clients", type=int, default=4, help="concurrent client processes (default 4)")
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds of each kind, alternating (default 5)")
    ap.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds of each kind (default 2)")
    ap.add_argument("--enrolees", type=int, default=200, help="enrolees imported into the MEF (default 200)")
    ap.add_argument("--cert-enrolees", type=int, default=8,
                    help="enrolees registered by certificate (default 8; 0: no certificate rounds)")
    ap.add_argument("--bare-server", nargs=2, metavar=("PORT", "KEYS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_server:
        bare_server_main(int(args.bare_server[0]), args.bare_server[1])
        return 0
    if args.clients < 1 or args.rounds < 1 or args.seconds <= 0 or args.enrolees < 1:
        ap.error("--clients, --rounds, --enrolees must be >= 1 and --seconds > 0")

    import cryptography
    import OpenSSL
    from OpenSSL import SSL

    home = Path(tempfile.mkdtemp(prefix="rspf-bench-"))
    mef = bare = None
    load: LoadGenerator | None = None
    try:
        mef_port, bare_port = free_port(), free_port()
        while bare_port == mef_port:
            bare_port = free_port()
        t_setup = time.monotonic()
        enrolees = setup_mef(home, mef_port, args.enrolees)
        certs = setup_certificates(home, args.cert_enrolees) if args.cert_enrolees > 0 else []
        kinds = ("bare", "full", "cert", "est") if certs else ("bare", "full")
        mef, bare = start_servers(home, mef_port, bare_port)
        wait_port(mef_port, mef, "rspf mef serve")
        wait_port(bare_port, bare, "the bare server")
        load = LoadGenerator(args.clients, enrolees, mef_port, bare_port, str(home), certs,
                             str(home / "pki" / "ca.pem"))
        print(f"setup: MEF home {home}, {args.enrolees} enrolees imported, MEF pid {mef.pid} port {mef_port}, "
              f"bare pid {bare.pid} port {bare_port}, {args.clients} client processes "
              f"({time.monotonic() - t_setup:.1f} s)")
        print("MEF log_level = \"warning\" (set for the benchmark so that logging does not dominate)")
        print(f"load average before the run: {load_average()} "
              f"(the machine is shared: other work skews every figure)")
        print(f"{OpenSSL.SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()}, pyOpenSSL {OpenSSL.__version__}, "
              f"cryptography {cryptography.__version__}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")

        servers = {"bare": bare, "full": mef, "cert": mef, "est": mef}
        # warm-up: every client connection path, the MEF's per-thread SQLite connections, the schema validator
        for kind in kinds:
            r = load.run(kind, args.warmup)
            print(f"warm-up {kind}: {r['done']} ops, {sum(r['errors'].values())} errors")
        rounds: list[RoundResult] = []
        print()
        print(f"{'round':>5} {'kind':<5} {'ops':>6} {'secs':>6} {'ops/s':>8} {'errors':>6} {'p50 ms':>7} "
              f"{'p95 ms':>7} {'srv CPU ms/op':>13} {'cli CPU ms/op':>13}")
        for n in range(args.rounds):
            for kind in kinds:
                pid = servers[kind].pid
                c0 = cpu_seconds(pid)
                r = load.run(kind, args.seconds)
                r["server_cpu"] = cpu_seconds(pid) - c0
                rounds.append(r)
                d = max(r["done"], 1)
                print(f"{n + 1:>5} {kind:<5} {r['done']:>6} {r['elapsed']:>6.1f} {r['rate']:>8.1f} "
                      f"{sum(r['errors'].values()):>6} {pct(r['lat'], 0.5) * 1e3:>7.1f} "
                      f"{pct(r['lat'], 0.95) * 1e3:>7.1f} "
                      f"{r['server_cpu'] * 1e3 / d:>13.2f} {r['client_cpu'] * 1e3 / d:>13.2f}")
                if mef.poll() is not None or bare.poll() is not None:
                    raise RuntimeError("a server exited during the run; see its stderr below")

        def summary(kind: str) -> KindSummary:
            rs = [r for r in rounds if r["kind"] == kind]
            return {"rate": statistics.median(r["rate"] for r in rs),
                    "rates": [r["rate"] for r in rs],
                    "errors": sum(sum(r["errors"].values()) for r in rs),
                    "srv": sum(r["server_cpu"] for r in rs) / max(1, sum(r["done"] for r in rs)),
                    "cli": sum(r["client_cpu"] for r in rs) / max(1, sum(r["done"] for r in rs)),
                    "tls": rs[-1]["tls"]}

        b, f = summary("bare"), summary("full")
        ratio = f["rate"] / b["rate"] if b["rate"] else 0.0
        print()
        print(f"{'':<44} {'ops/s (median)':>14} {'errors':>6} {'srv CPU ms/op':>13} {'cli CPU ms/op':>13}  "
              f"TLS (client's view)")
        for label, s in (("bare: handshake + 1 request/response", b),
                         ("full: enrolment (handshake+profile+exch.)", f)):
            print(f"{label:<44} {s['rate']:>14.1f} {s['errors']:>6} {s['srv'] * 1e3:>13.2f} "
                  f"{s['cli'] * 1e3:>13.2f}  {s['tls'][0]} {s['tls'][1]}")
        for kind, s in (("bare", b), ("full", f)):
            print(f"  {kind} rounds ops/s: {', '.join(f'{x:.1f}' for x in s['rates'])}")
        if certs:
            c = summary("cert")
            print(f"{'cert: enrolment by certificate (mutual TLS)':<44} {c['rate']:>14.1f} {c['errors']:>6} "
                  f"{c['srv'] * 1e3:>13.2f} {c['cli'] * 1e3:>13.2f}  {c['tls'][0]} {c['tls'][1]}")
            print(f"  cert rounds ops/s: {', '.join(f'{x:.1f}' for x in c['rates'])}")
            print(f"ratio cert/full (certificate enrolments per PSK enrolment) = {c['rate']:.1f} / {f['rate']:.1f} = "
                  f"{c['rate'] / f['rate'] if f['rate'] else 0.0:.3f}")
            e = summary("est")
            print(f"{'est: PSK enrolment + a certificate over EST':<44} {e['rate']:>14.1f} {e['errors']:>6} "
                  f"{e['srv'] * 1e3:>13.2f} {e['cli'] * 1e3:>13.2f}  {e['tls'][0]} {e['tls'][1]}")
            print(f"  est rounds ops/s: {', '.join(f'{x:.1f}' for x in e['rates'])}")
            print(f"ratio est/full (enrolments that also obtain a certificate per PSK enrolment) = {e['rate']:.1f} / "
                  f"{f['rate']:.1f} = {e['rate'] / f['rate'] if f['rate'] else 0.0:.3f}")
        print()
        bare_rounds = [r for r in rounds if r["kind"] == "bare"]
        full_rounds = [r for r in rounds if r["kind"] == "full"]
        pair = statistics.median(fr["rate"] / br["rate"]
                                 for br, fr in zip(bare_rounds, full_rounds, strict=True) if br["rate"])
        cpu_ratio = (b["srv"] + b["cli"]) / (f["srv"] + f["cli"]) if f["srv"] + f["cli"] else 0.0
        srv_ratio = b["srv"] / f["srv"] if f["srv"] else 0.0
        print(f"ratio full/bare = {f['rate']:.1f} / {b['rate']:.1f} = {ratio:.3f}  (target >= {TARGET_RATIO}): "
              f"{'TARGET MET' if ratio >= TARGET_RATIO else 'TARGET MISSED'}")
        print("cross-checks (not the target figure; less sensitive to other load on the machine):")
        print(f"  {'median of the per-round-pair ratios (full n / bare n)':<58} {pair:.3f}")
        b_cpu, f_cpu = (b["srv"] + b["cli"]) * 1e3, (f["srv"] + f["cli"]) * 1e3
        both = f"CPU/op ratio, server + clients ({b_cpu:.2f} / {f_cpu:.2f} ms)"
        print(f"  {both:<58} {cpu_ratio:.3f}")
        only = f"CPU/op ratio, server only ({b['srv'] * 1e3:.2f} / {f['srv'] * 1e3:.2f} ms)"
        print(f"  {only:<58} {srv_ratio:.3f}  (the servers' own capacity if clients ran elsewhere)")
        all_errors: dict[str, int] = {}
        for r in rounds:
            for k, v in r["errors"].items():
                all_errors[f"{r['kind']}: {k}"] = all_errors.get(f"{r['kind']}: {k}", 0) + v
        for k, v in sorted(all_errors.items(), key=lambda kv: -kv[1])[:10]:
            print(f"  error x{v}: {k}")
        print(f"settings: --clients {args.clients} --seconds {args.seconds:g} --rounds {args.rounds} "
              f"--warmup {args.warmup:g} --enrolees {args.enrolees} --cert-enrolees {args.cert_enrolees}; "
              "MEF log_level = warning")
        return 0
    finally:
        if load is not None:
            load.close()
        stop_process(bare, "bare server")
        stop_process(mef, "rspf mef serve")
        for name in ("mef.stderr", "bare.stderr"):
            p = home / name
            if p.exists() and p.stat().st_size:
                text = p.read_text(errors="replace").strip()
                if text:
                    print(f"--- {name} (last lines) ---", file=sys.stderr)
                    print("\n".join(text.splitlines()[-15:]), file=sys.stderr)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
