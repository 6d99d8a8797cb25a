"""Prometheus metrics and a health check, served on a small HTTP server of their own (docs/observability.md).

``GET /metrics`` answers the Prometheus text format of a component's registry; ``GET /health`` answers JSON
``{"status": "ok" | "degraded", "problems": [...]}`` (HTTP 200 when ok, 503 when degraded). The MEF and the
CSE plugin each run one on the address the operator chooses (``[mef] metrics_listen``, ``[rspf]
metricsListen``; off by default): plain HTTP, meant for loopback or a management network, never serving
anything but these two read-only resources.

Cheap on hot paths: the transport and the key cache count in plain integers that only their own thread (or
their own lock) touches, read here when Prometheus scrapes (:class:`Sampled`); events that are rare count
in ``prometheus_client`` counters.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .errors import ConfigError, RspfError

log = logging.getLogger(__name__)

#: Every metric name starts with this
PREFIX = "rspf_"
#: Seconds one scrape or health request may wait for each read of its request
REQUEST_TIMEOUT = 5.0
#: Connections served at once; more are closed at once (a flood costs no more threads than this)
MAX_CLIENTS = 8


def parse_listen(value: str, where: str) -> tuple[str, int]:
    """``IP:PORT`` (an IPv6 address in brackets: ``[::1]:9464``) of a metrics endpoint; ``where`` names the
    key in the error ("mef.toml [mef] metrics_listen")."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"{where}: {value!r} must be IP:PORT, e.g. 127.0.0.1:9464")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{where}: {host!r} is not an IP address (e.g. 127.0.0.1; a name is not accepted, so "
                          "the endpoint never lands on an address nobody chose)") from None
    if not 0 <= int(port) <= 65535:
        raise ConfigError(f"{where}: the port must be between 0 and 65535 (0: any free port)")
    return host, int(port)


def gauge(name: str, documentation: str, value: float, labels: dict[str, str] | None = None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(PREFIX + name, documentation, labels=list(labels or {}))
    family.add_metric(list((labels or {}).values()), value)
    return family


def counter(name: str, documentation: str, values: dict[str, float] | float,
            label: str | None = None) -> CounterMetricFamily:
    """A counter read from state (``values``: one number, or label value -> number for ``label``)."""
    if isinstance(values, dict):
        assert label is not None
        family = CounterMetricFamily(PREFIX + name, documentation, labels=[label])
        for key, n in sorted(values.items()):
            family.add_metric([key], n)
        return family
    return CounterMetricFamily(PREFIX + name, documentation, value=values)


def event_counter(registry: CollectorRegistry, name: str, documentation: str,
                  labels: tuple[str, ...] = ()) -> Counter:
    """A counter of events (``prometheus_client``), in ``registry``."""
    return Counter(PREFIX + name, documentation, labels, registry=registry)


class Sampled(Collector):
    """Metrics read from live state when Prometheus scrapes: ``sample()`` yields metric families."""

    def __init__(self, sample: Callable[[], Iterable[Metric]]) -> None:
        self._sample = sample

    def collect(self) -> Iterator[Metric]:
        try:
            yield from list(self._sample())
        except Exception:  # a scrape must never take the component down; the log says what failed
            log.exception("reading the metrics failed")


def transport_metrics(server: Any, component: str) -> Iterator[Metric]:
    """What an ``rspf.httpserver.TlsHttpServer`` counts: open connections and handshakes by result."""
    yield gauge(f"{component}_connections_open", "TLS connections open (handshaking, idle or answering)",
                server.connections_open)
    yield counter(f"{component}_handshakes", "TLS handshakes by result (ok, refused, timeout)",
                  dict(server.handshakes), "result")


def health_answer(problems: list[str]) -> tuple[int, dict[str, Any]]:
    """The HTTP status and body of GET /health."""
    status = "degraded" if problems else "ok"
    return (503 if problems else 200), {"status": status, "problems": problems}


_SAFE = re.compile(r"[^\x20-\x7e]")


class ObservabilityServer:
    """GET /metrics and GET /health on ``host:port``, in daemon threads. ``health()`` returns the problems
    (sentences an operator understands); none means ok."""

    def __init__(self, registry: CollectorRegistry, health: Callable[[], list[str]], *, host: str, port: int,
                 name: str) -> None:
        self.registry, self.health, self.name = registry, health, name
        outer = self

        class Handler(BaseHTTPRequestHandler):
            timeout = REQUEST_TIMEOUT
            server_version = "rspf-observe"
            sys_version = ""

            def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._answer(200, CONTENT_TYPE_LATEST, generate_latest(outer.registry))
                elif path == "/health":
                    try:
                        problems = outer.health()
                    except Exception as exc:
                        log.exception("%s: the health check failed", outer.name)
                        problems = [f"the health check failed: {type(exc).__name__}"]
                    status, body = health_answer(problems)
                    self._answer(status, "application/json", json.dumps(body).encode())
                else:
                    self._answer(404, "text/plain; charset=utf-8", b"only /metrics and /health are served here\n")

            def do_HEAD(self) -> None:  # noqa: N802
                self._answer(405, "text/plain; charset=utf-8", b"")

            do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD  # noqa: N815

            def _answer(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                if status == 405:
                    self.send_header("Allow", "GET")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
                log.debug("%s: %s %s", outer.name, self.address_string(), _SAFE.sub("?", format % args))

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
            daemon_threads = True
            slots = threading.BoundedSemaphore(MAX_CLIENTS)

            def process_request(self, request: Any, client_address: Any) -> None:
                if not self.slots.acquire(blocking=False):
                    log.warning("%s: metrics endpoint busy (%d connections): closed one from %s", outer.name,
                                MAX_CLIENTS, client_address[0])
                    self.shutdown_request(request)
                    return
                try:
                    super().process_request(request, client_address)
                except BaseException:
                    self.slots.release()
                    raise

            def process_request_thread(self, request: Any, client_address: Any) -> None:
                try:
                    super().process_request_thread(request, client_address)
                finally:
                    self.slots.release()

        try:
            self._httpd = Server((host, port), Handler)
        except OSError as exc:
            raise RspfError(f"cannot serve metrics and health on {host}:{port}: {exc.strerror or exc}") from None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.5},
                                        name=f"{self.name}-metrics", daemon=True)
        self._thread.start()
        host, port = self.address
        log.info("%s: metrics on http://%s:%d/metrics, health on /health", self.name, host, port)

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()


_PARENTHESES = re.compile(r"\s*\([^)]*\)")


def refusal_reason(text: str) -> str:
    """A refusal's reason as a label value from a bounded set: numbers in parentheses (limits, seconds) go."""
    return _PARENTHESES.sub("", text)[:80]


class MefMetrics:
    """The MEF's metrics (names in docs/observability.md). Event counters are incremented by
    rspf.mef.service; :meth:`watch` adds what is read when scraped (the transport, the database)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.enrolments = event_counter(self.registry, "mef_enrolments", "Enrolments by result (ok: an Enrolment "
                                        "Key was stored; refused; rate_limited)", ("result",))
        self.fetches = event_counter(self.registry, "mef_fetches", "fetchCredentials requests by result (ok, "
                                     "refused, failed)", ("result",))
        self.refusals = event_counter(self.registry, "mef_refusals", "Refused identities, connections and "
                                      "requests by reason", ("reason",))
        self.profiles = event_counter(self.registry, "mef_profiles_provisioned", "securityProfiles provisioned")
        self.certificates = event_counter(self.registry, "mef_certificates", "EST requests for a certificate by "
                                          "result (issued, renewed, refused)", ("result",))

    def watch(self, server: Any, stats: Callable[[], Any]) -> None:
        """Read the transport's counters and the database's counts (``stats()``: rspf.mef.store.StoreStats)
        when scraped."""
        def sample() -> Iterator[Metric]:
            yield from transport_metrics(server, "mef")
            s = stats()
            family = GaugeMetricFamily(PREFIX + "mef_enrolees", "Registered enrolees by state", labels=["state"])
            for state, n in sorted(s.enrolees.items()):
                family.add_metric([state], n)
            yield family
            yield gauge("mef_enrolment_keys_live", "Enrolment Keys usable now", s.keys_live)
            yield gauge("mef_enrolment_keys_stored", "Enrolment Keys in the database (usable or waiting for the "
                        "purge)", s.keys_stored)
            yield gauge("mef_revocation_log_rows", "Rows in the revocation log", s.revocation_rows)
            yield gauge("mef_revocation_log_newest", "Sequence number of the newest revocation log row",
                        s.revocation_newest)

        self.registry.register(Sampled(sample))


class CseMetrics:
    """The CSE plugin's metrics (names in docs/observability.md). Event counters are incremented by
    rspf.acme.plugin; :meth:`watch` adds what is read when scraped (the secure listener, the key cache, the
    revocation feed)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.registrations = event_counter(self.registry, "cse_registrations", "AE registrations checked against "
                                           "the rules, by result (admitted, refused)", ("result",))
        self.refusals = event_counter(self.registry, "cse_refusals", "Refused connections and requests, by where "
                                      "(secure_listener, plain_port, registration, connection)", ("where",))
        self.credentials_recorded = event_counter(self.registry, "cse_credentials_recorded",
                                                  "Credentials recorded in <serviceSubscribedAppRule>")
        self.revocations_applied = event_counter(self.registry, "cse_revocations_applied", "KeIDs the MEF's "
                                                 "revocation feed reported, applied here")
        self.connections_closed = event_counter(self.registry, "cse_connections_closed", "Secure connections "
                                                "closed by the plugin, by reason (revoked, expired, lost_track)",
                                                ("reason",))

    def watch(self, listener: Callable[[], Any], keycache: Any, feed: Callable[[], Any]) -> None:
        """Read the secure listener's counters (``listener()``, None before start), the key cache's and the
        revocation feed's (``feed()``: rspf.target.RevocationFollower, None before it runs) when scraped."""
        def sample() -> Iterator[Metric]:
            server = listener()
            if server is not None:
                yield from transport_metrics(server, "cse_secure")
            yield gauge("cse_key_cache_keys", "Keys held in the key cache", keycache.sizes()["keys"])
            yield counter("cse_key_cache_hits", "TLS-PSK lookups answered from the key cache", keycache.hits)
            yield counter("cse_key_cache_misses", "TLS-PSK lookups the key cache did not hold", keycache.misses)
            yield counter("cse_mef_fetches", "fetchCredentials requests made to the MEF", keycache.fetches)
            follower = feed()
            if follower is not None:
                if follower.position is not None:
                    yield gauge("cse_revocation_feed_position", "Newest revocation log sequence number applied",
                                follower.position)
                lag = follower.seconds_since_read()
                if lag is not None:
                    yield gauge("cse_revocation_feed_lag_seconds", "Seconds since the revocation feed was last "
                                "read whole", lag)
                yield gauge("cse_revocation_feed_failures", "Failed reads of the revocation feed in a row",
                            follower.failures)

        self.registry.register(Sampled(sample))
