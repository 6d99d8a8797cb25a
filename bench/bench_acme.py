#!/usr/bin/env python3
"""The SEC CSF plugin in ACME: secure (TLS-PSK) vs. ACME's plain HTTP port, side by side in one run.

Run from the project root with the project's venv (the installed ``rspf`` package is what is measured):

    .venv/bin/python bench/bench_acme.py [--aes N] [--rounds R] [--retrieves M] [--steady-rounds S]
                                         [--plain-server waitress|werkzeug] [--keep]

What runs (each its own OS process, everything on 127.0.0.1):

* ``rspf mef serve``: a real MEF (log_level = "warning"), the IN-CSE registered as Enrolment Target, and
  N x R (+1) AE enrolees imported from a CSV batch;
* ``acmecse --headless``: ACME with ``databaseType=memory``, ``logLevel=warning``, and the plugin installed
  by ``rspf acme install --no-enrol --no-enforcement`` (enforcement OFF, so the plain port still accepts
  AE registrations for the comparison). ACME's plain HTTP port is served by waitress (``[http.wsgi]
  enable=true``) by default, because ACME's built-in Werkzeug server answers every response with
  ``Connection: close`` and so has no keep-alive for B; ``--plain-server werkzeug`` measures that one;
* this process: ONE sequential client (no concurrency).

Before any timing, every AE enrols with the MEF through the library (``Enrolee.enrol``); that is not timed.

A. First-contact AE registration, per registration (R rounds of N each kind, alternating plain/secure):
   * secure: ``SecureAE.session()`` = new TCP + TLS-PSK handshake with a KeID the CSE has never seen (so the
     CSE fetches its key from the MEF inside the handshake), ``register()`` = CREATE <AE> (the plugin's
     SSAR check and SSAR update run), close;
   * plain: new TCP connection (``http.client.HTTPConnection``), CREATE <AE> with a fresh originator
     ``C...``, close.
B. Steady state: M RETRIEVEs of the AE's own <container>, per kind, S rounds alternating:
   * secure: on ONE established TLS-PSK connection (``CseSession.retrieve``);
   * plain: on ONE established keep-alive HTTP/1.1 connection (one ``http.client.HTTPConnection`` reused),
     the originator being an AE registered on the plain port retrieving its own container.
   Both kinds end with the answer's JSON content decoded (``CseSession.retrieve`` returns it decoded; the plain
   client decodes it with ``json.loads``), as an AE needs it.

Targets: A secure/plain per-registration latency (medians) <= 3.0; B secure/plain (medians) <= 1.2. It prints
TARGET MET / TARGET MISSED for each and exits 0 either way (a measurement, not a test). Every process it
started is stopped by its PID (SIGTERM) at the end, and the temporary folder is removed.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict

from benchutil import cpu_seconds, finish, load_average, pct, set_mef_keys

from rspf.demo import Processes, acme_ini, free_port, run, wait_http, wait_port
from rspf.ssar import is_bound_rule_name

if TYPE_CHECKING:
    from rspf.ae import CseSession
    from rspf.enrolee import Enrolment

TARGET_A = 3.0   # first-contact secure registration <= 3x the plain one
TARGET_B = 1.2   # steady-state secure RETRIEVE <= 1.2x the plain one
MEF_FQDN = "mef.bench.example.com"
SP_ID = "//sp.bench.example.com"
CSE_ID, CSE_NAME = "id-in", "cse-in"
TARGET_IDENTITY = "id-in@sp.bench.example.com"
APP_ID = "Nbench-app"

# (kpm_id, kpm hex, enrolee_id, node_id) of one AE enrolee imported into the MEF
Row = tuple[str, str, str, str]


class Timing(TypedDict):
    """One registration, in seconds: total = connect + request + close."""
    total: float
    connect: float
    request: float
    close: float


class BatchResult(TypedDict):
    """A batch of registrations of one kind; CPU figures are seconds per registration."""
    kind: str
    n: int
    wall: float
    lat: list[Timing]
    cse_cpu: float
    mef_cpu: float
    cli_cpu: float


class SteadyResult(TypedDict):
    """A batch of RETRIEVEs of one kind; lat in seconds, CPU figures seconds per RETRIEVE."""
    kind: str
    n: int
    lat: list[float]
    cse_cpu: float
    cli_cpu: float
    closes: int


class SteadyCtx(TypedDict, total=False):
    """What the B RETRIEVEs run on: the secure session and the plain keep-alive connection."""
    secure_session: CseSession
    secure_path: str
    plain_conn: http.client.HTTPConnection
    plain_origin: str
    plain_path: str


class RegistrationSummary(TypedDict):
    """A: one kind over all rounds (seconds; rate in registrations per second)."""
    median: float
    mean: float
    p95: float
    round_medians: list[float]
    connect: float
    request: float
    cse_cpu: float
    mef_cpu: float
    cli_cpu: float
    rate: float


class RetrieveSummary(TypedDict):
    """B: one kind over all rounds (seconds)."""
    median: float
    mean: float
    p95: float
    round_medians: list[float]
    cse_cpu: float
    cli_cpu: float


# ------------------------------------------------------------------------------------------ helpers
def ms(x: float) -> str:
    return f"{x * 1000:.2f}"


class Plain:
    """oneM2M requests on ACME's plain HTTP port with http.client (what a plain AE would do)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.n = 0

    def headers(self, origin: str, ty: int | None = None) -> dict[str, str]:
        self.n += 1
        h = {"X-M2M-Origin": origin, "X-M2M-RI": f"plain-{self.n}", "X-M2M-RVI": "3", "Accept": "application/json"}
        if ty is not None:
            h["Content-Type"] = f"application/json;ty={ty}"
        return h

    def request(self, conn: http.client.HTTPConnection, method: str, path: str, origin: str,
                content: dict[str, Any] | None = None, ty: int | None = None) -> tuple[int, str, bytes]:
        body = json.dumps(content, separators=(",", ":")).encode() if content is not None else None
        conn.request(method, path, body=body, headers=self.headers(origin, ty))
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, resp.getheader("X-M2M-RSC", ""), data


# ------------------------------------------------------------------------------------------ setup
def setup(home: Path, n_secure: int, mef_port: int, http_port: int, secure_port: int, procs: Processes,
          plain_server: str, mef_log_level: str = "warning",
          mef_keys: dict[str, str] | None = None) -> tuple[list[Row], float]:
    """MEF + ACME with the plugin; returns (enrolee rows, seconds). ``mef_keys``: [mef] keys to set."""
    t0 = time.monotonic()
    bindir = Path(sys.executable).parent
    rspf, acmecse = str(bindir / "rspf"), str(bindir / "acmecse")
    (home / "mef").mkdir()
    base = home / "in-cse"
    base.mkdir()
    cfg = home / "mef" / "mef.toml"
    run([rspf, "mef", "init", str(cfg), "--fqdn", MEF_FQDN, "--sp-id", SP_ID, "--port", str(mef_port)])
    set_mef_keys(cfg, {"log_level": f'"{mef_log_level}"', **(mef_keys or {})})
    run([rspf, "keygen", str(base / "mef-target.psk")])
    run([rspf, "mef", "target", "add", "-c", str(cfg), "--psk-identity", TARGET_IDENTITY,
         "--psk-file", str(base / "mef-target.psk"), "--target-id", f"/{CSE_ID}"])
    rows: list[Row] = []
    with open(home / "mef" / "batch.csv", "w", newline="") as f:
        os.fchmod(f.fileno(), 0o600)  # it holds keys: the MEF refuses a batch others can read
        w = csv.writer(f)
        w.writerow(["kpm_id", "kpm", "enrolee_id", "node_id", "registrar_cse_id", "registrar_uri"])
        for n in range(n_secure):
            row = (f"bench-ae-{n:05d}@{MEF_FQDN}", secrets.token_hex(32), f"Cbench{n:05d}",
                   f"urn:dev:ops:bench-ae-{n:05d}")
            w.writerow([*row, f"/{CSE_ID}", f"https://127.0.0.1:{secure_port}/{CSE_NAME}"])
            rows.append(row)
    run([rspf, "mef", "enrolee", "import", "-c", str(cfg), str(home / "mef" / "batch.csv")])
    mef = procs.start("MEF", [rspf, "mef", "serve", "-c", str(cfg)], home / "mef" / "mef.log")
    wait_port(mef_port, mef, "the MEF")

    ini = acme_ini("IN", CSE_ID, CSE_NAME, http_port)
    if "logLevel=info" not in ini:
        raise RuntimeError("rspf.demo.acme_ini() has no logLevel=info line to change")
    ini = ini.replace("logLevel=info", "logLevel=warning")
    # ACME's plain HTTP binding: waitress ([http.wsgi] enable=true, what ACME's onboarding proposes for a
    # regular/headless CSE; HTTP/1.1 keep-alive works) or Flask/Werkzeug's development server (ACME's
    # built-in default, which answers every request with "Connection: close").
    ini += f"\n[http.wsgi]\nenable={'true' if plain_server == 'waitress' else 'false'}\n"
    (base / "acme.ini").write_text(ini)
    run([rspf, "acme", "install", "--base-dir", str(base), "--mef", f"127.0.0.1:{mef_port}", "--mef-fqdn", MEF_FQDN,
         "--no-enrol", "--mef-psk-identity", TARGET_IDENTITY, "--mef-psk-file", "mef-target.psk",
         "--secure-port", str(secure_port), "--no-enforcement", "--allowed-app-ids", "Nbench*"])
    cse = procs.start("ACME IN-CSE", [acmecse, "--headless", "-dir", str(base)], base / "acme.out")
    # The plugin's secure listener opens last (its @start): only then is plain HTTP safe to poll.
    wait_port(secure_port, cse, "the IN-CSE secure listener", timeout=90)
    wait_http(f"http://127.0.0.1:{http_port}/{CSE_NAME}", cse, "the IN-CSE")
    return rows, time.monotonic() - t0


def enrol_all(rows: list[Row], mef_port: int, home: Path) -> list[Enrolment]:
    """Every AE enrols with the MEF through the library (not timed as part of A or B)."""
    from rspf.enrolee import Enrolee, EnroleeConfig
    from rspf.secret import Secret
    from rspf.tls import PskClient

    tls = PskClient()
    out: list[Enrolment] = []
    for kpm_id, kpm_hex, _eid, node_id in rows:
        e = Enrolee(EnroleeConfig(mef_host="127.0.0.1", mef_port=mef_port, mef_fqdn=MEF_FQDN, kpm_id=kpm_id,
                                  kpm=Secret(bytes.fromhex(kpm_hex), "Kpm"), node_id=node_id,
                                  store_path=home / "unused.store"), tls_client=tls)
        out.append(e.enrol(store=False))
    return out


# ------------------------------------------------------------------------------------------ measurements
class Bench:
    def __init__(self, http_port: int, secure_port: int, cse_pid: int, mef_pid: int) -> None:
        from rspf.tls import PskClient

        self.http_port, self.secure_port = http_port, secure_port
        self.cse_pid, self.mef_pid = cse_pid, mef_pid
        self.tls = PskClient()      # one client context, as an AE process would have
        self.plain = Plain(http_port)
        self.plain_seq = 0
        self.last_tls = ("?", "?")

    def _cpu(self) -> tuple[float, float, float]:
        return cpu_seconds(self.cse_pid), cpu_seconds(self.mef_pid), time.process_time()

    # A --------------------------------------------------------------------------------------
    def register_secure(self, enrolment: Enrolment) -> Timing:
        from rspf.ae import SecureAE

        ae = SecureAE.from_enrolment(enrolment, tls_client=self.tls)
        t0 = time.perf_counter()
        with ae.session() as cse:
            t1 = time.perf_counter()
            data = cse.register(APP_ID)
            t2 = time.perf_counter()
            self.last_tls = (cse.client.tls.version, cse.client.tls.cipher)
        t3 = time.perf_counter()
        if not isinstance(data, dict) or data.get("m2m:ae", {}).get("aei") != enrolment.enrolee_id:
            raise RuntimeError(f"secure registration of {enrolment.enrolee_id} answered {data!r:.200}")
        return {"total": t3 - t0, "connect": t1 - t0, "request": t2 - t1, "close": t3 - t2}

    def register_plain(self) -> Timing:
        self.plain_seq += 1
        origin = f"Cplain{self.plain_seq:05d}"
        body = {"m2m:ae": {"rn": origin, "api": APP_ID, "rr": False, "srv": ["3"]}}
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=15)
        conn.connect()
        t1 = time.perf_counter()
        status, rsc, data = self.plain.request(conn, "POST", f"/{CSE_NAME}", origin, body, ty=2)
        t2 = time.perf_counter()
        conn.close()
        t3 = time.perf_counter()
        if rsc != "2001":
            raise RuntimeError(f"plain registration of {origin}: HTTP {status}, RSC {rsc}: {data[:200]!r}")
        return {"total": t3 - t0, "connect": t1 - t0, "request": t2 - t1, "close": t3 - t2}

    def _register(self, kind: str, enrolment: Enrolment | None) -> Timing:
        if kind == "secure":
            assert enrolment is not None, "a secure registration needs an enrolment"
            return self.register_secure(enrolment)
        return self.register_plain()

    def batch(self, kind: str, items: Sequence[Enrolment | None]) -> BatchResult:
        c0 = self._cpu()
        t0 = time.perf_counter()
        lat = [self._register(kind, e) for e in items]
        wall = time.perf_counter() - t0
        c1 = self._cpu()
        n = len(items)
        return {"kind": kind, "n": n, "wall": wall, "lat": lat,
                "cse_cpu": (c1[0] - c0[0]) / n, "mef_cpu": (c1[1] - c0[1]) / n, "cli_cpu": (c1[2] - c0[2]) / n}

    # B --------------------------------------------------------------------------------------
    def steady(self, kind: str, m: int, ctx: SteadyCtx) -> SteadyResult:
        c0 = self._cpu()
        lat: list[float] = []
        closes = 0
        if kind == "secure":
            cse = ctx["secure_session"]
            path = ctx["secure_path"]
            for _ in range(m):
                t0 = time.perf_counter()
                data = cse.retrieve(path)
                lat.append(time.perf_counter() - t0)
            if "m2m:cnt" not in data:
                raise RuntimeError(f"secure RETRIEVE answered {data!r:.200}")
        else:
            conn, origin, path = ctx["plain_conn"], ctx["plain_origin"], ctx["plain_path"]
            for _ in range(m):
                t0 = time.perf_counter()
                status, rsc, body = self.plain.request(conn, "GET", path, origin)
                content = json.loads(body)  # what the AE asked for, as the secure client returns it
                lat.append(time.perf_counter() - t0)
                if conn.sock is None:  # the server said "Connection: close"; http.client reconnects next time
                    closes += 1
            if rsc != "2000" or "m2m:cnt" not in content:
                raise RuntimeError(f"plain RETRIEVE: HTTP {status}, RSC {rsc}: {body[:200]!r}")
        c1 = self._cpu()
        return {"kind": kind, "n": m, "lat": lat, "cse_cpu": (c1[0] - c0[0]) / m, "cli_cpu": (c1[2] - c0[2]) / m,
                "closes": closes}


def _admin_get(http_port: int, path: str) -> dict[str, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{http_port}/{path}",
                                 headers={"X-M2M-Origin": "CAdmin", "X-M2M-RI": "bench-rule", "X-M2M-RVI": "3",
                                          "Accept": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        data: dict[str, Any] = json.loads(resp.read())
        return data


def recorded_rules(http_port: int) -> int:
    """How many credentials' own rules (rspf.ssar's bound rules) the IN-CSE holds."""
    uris = _admin_get(http_port, f"{CSE_NAME}?fu=1&ty=19").get("m2m:uril", [])
    return sum(1 for uri in uris if is_bound_rule_name(uri.rsplit("/", 1)[-1]))


# ------------------------------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--aes", type=int, default=40, help="AE registrations of each kind per round (default 40)")
    ap.add_argument("--rounds", type=int, default=4, help="rounds of A, plain and secure alternating (default 4)")
    ap.add_argument("--retrieves", type=int, default=300, help="RETRIEVEs of each kind per B round (default 300)")
    ap.add_argument("--steady-rounds", type=int, default=5, help="rounds of B, alternating (default 5)")
    ap.add_argument("--plain-server", choices=("waitress", "werkzeug"), default="waitress",
                    help="ACME's plain HTTP server: waitress ([http.wsgi] enable=true, keep-alive; default) or "
                         "werkzeug (ACME's built-in default; closes the connection after every response)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs) at the end")
    args = ap.parse_args()
    if min(args.aes, args.rounds, args.retrieves, args.steady_rounds) < 1:
        ap.error("all counts must be >= 1")

    import cryptography
    import OpenSSL
    from OpenSSL import SSL

    from rspf.ae import SecureAE

    t_start = time.monotonic()
    home = Path(tempfile.mkdtemp(prefix="rspf-bench-acme-"))
    procs = Processes()
    try:
        mef_port, http_port, secure_port = free_port(), free_port(), free_port()
        while len({mef_port, http_port, secure_port}) < 3:
            secure_port, http_port = free_port(), free_port()
        n_secure = args.aes * args.rounds + 2  # + one warm-up AE + one AE for B
        rows, t_setup = setup(home, n_secure, mef_port, http_port, secure_port, procs, args.plain_server)
        mef_pid, cse_pid = procs.procs[0][1].pid, procs.procs[1][1].pid
        print(f"setup: MEF pid {mef_pid} :{mef_port}, ACME IN-CSE pid {cse_pid} plain :{http_port} "
              f"TLS-PSK :{secure_port}, {n_secure} AE enrolees imported ({t_setup:.1f} s)")
        print(f"config: ACME databaseType=memory, logLevel=warning, plain HTTP server {args.plain_server}"
              f"{' ([http.wsgi] enable=true)' if args.plain_server == 'waitress' else ' (Werkzeug dev server)'}; "
              "plugin "
              "enforcement=off, allowedAppIDs=Nbench*; MEF log_level=\"warning\"")
        t0 = time.monotonic()
        enrolments = enrol_all(rows, mef_port, home)
        print(f"enrolled {len(enrolments)} AEs with the MEF via rspf.enrolee.Enrolee ({time.monotonic() - t0:.1f} s,"
              " not part of any timing)")
        print(f"client: ONE sequential client in this process (no concurrency); Python {platform.python_version()}, "
              f"OpenSSL {SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode().split()[1]}, pyOpenSSL "
              f"{OpenSSL.__version__}, cryptography {cryptography.__version__}")
        print(f"load average before the run: {load_average()} ({os.cpu_count()} CPUs)")

        b = Bench(http_port, secure_port, cse_pid, mef_pid)
        warm_ae, steady_ae, measured = enrolments[0], enrolments[1], enrolments[2:]

        # ---- A: first-contact registration ---------------------------------------------------------
        print(f"\nA. first-contact AE registration: {args.rounds} rounds x {args.aes} registrations of each kind, "
              "each on a NEW connection")
        b.register_plain()
        b.register_secure(warm_ae)   # warm-up (first use of code paths in ACME and the plugin): not counted
        results: dict[str, list[BatchResult]] = {"plain": [], "secure": []}
        hdr = (f"  {'round':>5} {'kind':6} {'n':>3} {'p50 ms':>7} {'p95 ms':>7} {'mean ms':>7} | "
               f"{'conn p50':>8} {'req p50':>7} {'close':>5} | {'CSE cpu':>7} {'MEF cpu':>7} {'cli cpu':>7} ms/op")
        print(hdr)
        for r in range(args.rounds):
            chunk = measured[r * args.aes:(r + 1) * args.aes]
            order = ("plain", "secure") if r % 2 == 0 else ("secure", "plain")
            for kind in order:
                res = b.batch(kind, chunk if kind == "secure" else [None] * args.aes)
                results[kind].append(res)
                tot = [x["total"] for x in res["lat"]]
                print(f"  {r + 1:>5} {kind:6} {res['n']:>3} {ms(statistics.median(tot)):>7} {ms(pct(tot, .95)):>7} "
                      f"{ms(statistics.fmean(tot)):>7} | {ms(statistics.median(x['connect'] for x in res['lat'])):>8} "
                      f"{ms(statistics.median(x['request'] for x in res['lat'])):>7} "
                      f"{ms(statistics.median(x['close'] for x in res['lat'])):>5} | {ms(res['cse_cpu']):>7} "
                      f"{ms(res['mef_cpu']):>7} {ms(res['cli_cpu']):>7}", flush=True)

        def all_of(kind: str, key: Literal["total", "connect", "request"] = "total") -> list[float]:
            return [x[key] for res in results[kind] for x in res["lat"]]

        a: dict[str, RegistrationSummary] = {}
        for kind in ("plain", "secure"):
            tot = all_of(kind)
            a[kind] = {
                "median": statistics.median(tot), "mean": statistics.fmean(tot), "p95": pct(tot, .95),
                "round_medians": [statistics.median(x["total"] for x in res["lat"]) for res in results[kind]],
                "connect": statistics.median(all_of(kind, "connect")),
                "request": statistics.median(all_of(kind, "request")),
                "cse_cpu": statistics.fmean(res["cse_cpu"] for res in results[kind]),
                "mef_cpu": statistics.fmean(res["mef_cpu"] for res in results[kind]),
                "cli_cpu": statistics.fmean(res["cli_cpu"] for res in results[kind]),
                "rate": len(tot) / sum(tot),
            }
        ratio_a = a["secure"]["median"] / a["plain"]["median"]
        pair_a = statistics.median(
            s / p for s, p in zip(a["secure"]["round_medians"], a["plain"]["round_medians"], strict=True))
        print(f"  TLS as negotiated: {b.last_tls[0]} {b.last_tls[1]}")
        for kind in ("plain", "secure"):
            x = a[kind]
            print(f"  {kind:6}: median {ms(x['median'])} ms, mean {ms(x['mean'])} ms, p95 {ms(x['p95'])} ms per "
                  f"registration ({x['rate']:.1f} registrations/s sequential); connect {ms(x['connect'])} ms + "
                  f"request {ms(x['request'])} ms (medians); CPU/registration: ACME {ms(x['cse_cpu'])} ms, MEF "
                  f"{ms(x['mef_cpu'])} ms, client {ms(x['cli_cpu'])} ms")
        sec, pl = a["secure"], a["plain"]
        print(f"  ratio secure/plain (median latency) = {ratio_a:.2f}  [mean {sec['mean'] / pl['mean']:.2f}"
              f", per-round pairs median {pair_a:.2f}, rate plain/secure {a['plain']['rate'] / a['secure']['rate']:.2f}"
              f", ACME CPU {a['secure']['cse_cpu'] / a['plain']['cse_cpu']:.2f}, ACME+MEF CPU "
              f"{(sec['cse_cpu'] + sec['mef_cpu']) / max(pl['cse_cpu'] + pl['mef_cpu'], 1e-9):.2f}]")
        print(f"  A target secure <= {TARGET_A:g} x plain: {'TARGET MET' if ratio_a <= TARGET_A else 'TARGET MISSED'}")

        # sanity: every secure registration went through the SSAR update
        n_sec = 1 + args.aes * args.rounds
        print(f"  check: the IN-CSE holds {recorded_rules(http_port)} credentials' own <serviceSubscribedAppRule> "
              f"(expected {n_sec}: warm-up + measured)")
        # breakdown (not a target): the same handshake again, now that the CSE holds these keys
        again: list[float] = []
        for e in measured[:args.aes]:
            t0 = time.perf_counter()
            conn_tls = b.tls.connect("127.0.0.1", secure_port, e.ke_id, e.registrar_key)
            again.append(time.perf_counter() - t0)
            conn_tls.close()
        again_median = statistics.median(again)
        print(f"  breakdown: TLS-PSK connect with a KeID the CSE already holds: median {ms(again_median)} ms"
              f" ({len(again)} connections) vs {ms(a['secure']['connect'])} ms at first contact, so fetching the key"
              f" from the MEF inside the handshake adds about {ms(a['secure']['connect'] - again_median)} ms."
              f" The SSAR check + update and CREATE <AE> fall in the 'request' part "
              f"({ms(a['secure']['request'])} ms vs {ms(a['plain']['request'])} ms plain)")

        # ---- B: steady state ------------------------------------------------------------------------
        print(f"\nB. steady state: RETRIEVE of the AE's own <container>, {args.steady_rounds} rounds x "
              f"{args.retrieves} "
              "of each kind, each kind on ONE established connection")
        sae = SecureAE.from_enrolment(steady_ae, tls_client=b.tls)
        ctx: SteadyCtx = {}
        with sae.session() as cse:
            cse.register(APP_ID)
            cse.create_container("data")
            ctx["secure_session"] = cse
            ctx["secure_path"] = f"{steady_ae.enrolee_id}/data"
            plain_origin = "Cplainsteady"
            conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=15)
            ae_body = {"m2m:ae": {"rn": plain_origin, "api": APP_ID, "rr": False, "srv": ["3"]}}
            st, rsc, data = b.plain.request(conn, "POST", f"/{CSE_NAME}", plain_origin, ae_body, 2)
            if rsc != "2001":
                raise RuntimeError(f"plain registration for B: HTTP {st} RSC {rsc} {data[:200]!r}")
            st, rsc, data = b.plain.request(conn, "POST", f"/{CSE_NAME}/{plain_origin}", plain_origin,
                                            {"m2m:cnt": {"rn": "data"}}, 3)
            if rsc != "2001":
                raise RuntimeError(f"plain container for B: HTTP {st} RSC {rsc} {data[:200]!r}")
            ctx.update({"plain_conn": conn, "plain_origin": plain_origin,
                        "plain_path": f"/{CSE_NAME}/{plain_origin}/data"})
            plain_sock = conn.sock
            b.steady("plain", 50, ctx)       # warm-up, not counted
            b.steady("secure", 50, ctx)
            steady: dict[str, list[SteadyResult]] = {"plain": [], "secure": []}
            print(f"  {'round':>5} {'kind':6} {'n':>4} {'p50 ms':>7} {'mean ms':>7} {'p95 ms':>7} | "
                  f"{'CSE cpu':>7} {'cli cpu':>7} ms/op")
            for r in range(args.steady_rounds):
                order = ("plain", "secure") if r % 2 == 0 else ("secure", "plain")
                for kind in order:
                    sres = b.steady(kind, args.retrieves, ctx)
                    steady[kind].append(sres)
                    lat = sres["lat"]
                    print(f"  {r + 1:>5} {kind:6} {sres['n']:>4} {ms(statistics.median(lat)):>7} "
                          f"{ms(statistics.fmean(lat)):>7} {ms(pct(lat, .95)):>7} | {ms(sres['cse_cpu']):>7} "
                          f"{ms(sres['cli_cpu']):>7}", flush=True)
            same_plain = conn.sock is plain_sock
            plain_closes = sum(res["closes"] for res in steady["plain"])
            conn.close()
        bs: dict[str, RetrieveSummary] = {}
        for kind in ("plain", "secure"):
            lat = [x for res in steady[kind] for x in res["lat"]]
            bs[kind] = {"median": statistics.median(lat), "mean": statistics.fmean(lat), "p95": pct(lat, .95),
                        "round_medians": [statistics.median(res["lat"]) for res in steady[kind]],
                        "cse_cpu": statistics.fmean(res["cse_cpu"] for res in steady[kind]),
                        "cli_cpu": statistics.fmean(res["cli_cpu"] for res in steady[kind])}
        ratio_b = bs["secure"]["median"] / bs["plain"]["median"]
        ratio_b_mean = bs["secure"]["mean"] / bs["plain"]["mean"]
        pair_b = statistics.median(
            s / p for s, p in zip(bs["secure"]["round_medians"], bs["plain"]["round_medians"], strict=True))
        if same_plain and plain_closes == 0:
            print("  plain: the one keep-alive HTTP/1.1 connection was reused for every RETRIEVE")
        else:
            print(f"  plain: NOT keep-alive: the server closed the connection after {plain_closes} of "
                  f"{args.retrieves * args.steady_rounds} responses (\"Connection: close\"); http.client reconnected "
                  "each time, so every plain RETRIEVE included a new TCP connection")
        for kind in ("plain", "secure"):
            y = bs[kind]
            print(f"  {kind:6}: median {ms(y['median'])} ms, mean {ms(y['mean'])} ms, p95 {ms(y['p95'])} ms per "
                  f"RETRIEVE; CPU/RETRIEVE: ACME {ms(y['cse_cpu'])} ms, client {ms(y['cli_cpu'])} ms")
        print(f"  ratio secure/plain: median {ratio_b:.2f}, mean {ratio_b_mean:.2f}  [per-round pairs median "
              f"{pair_b:.2f}, ACME CPU {bs['secure']['cse_cpu'] / bs['plain']['cse_cpu']:.2f}]")
        print(f"  B target secure <= {TARGET_B:g} x plain (median): "
              f"{'TARGET MET' if ratio_b <= TARGET_B else 'TARGET MISSED'}")

        print("\nSUMMARY")
        print(f"  A first-contact registration: plain {ms(a['plain']['median'])} ms, secure "
              f"{ms(a['secure']['median'])} ms"
              f" (medians) -> {ratio_a:.2f}x (target <= {TARGET_A:g}x): "
              f"{'TARGET MET' if ratio_a <= TARGET_A else 'TARGET MISSED'}")
        print(f"  B steady-state RETRIEVE:      plain {ms(bs['plain']['median'])} ms, secure "
              f"{ms(bs['secure']['median'])} ms (medians) -> {ratio_b:.2f}x (mean {ratio_b_mean:.2f}x; target <= "
              f"{TARGET_B:g}x): {'TARGET MET' if ratio_b <= TARGET_B else 'TARGET MISSED'}")
        print(f"  total time {time.monotonic() - t_start:.0f} s; load average now {load_average()}")
        return 0
    finally:
        finish(procs, home, args.keep)


if __name__ == "__main__":
    sys.exit(main())
