"""rspf.metrics: the /metrics and /health endpoint over real HTTP on 127.0.0.1, metric families, addresses."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rspf.errors import ConfigError, RspfError
from rspf.metrics import CseMetrics, MefMetrics, ObservabilityServer, parse_listen, refusal_reason
from rspf.target import RevocationFollower


def get(server: ObservabilityServer, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class FakeTransport:
    def __init__(self) -> None:
        self.connections_open = 3
        self.handshakes = {"ok": 5, "refused": 2, "timeout": 1}


class FakeStats:
    enrolees = {"active": 4, "suspended": 1, "revoked": 0}
    keys_live = 7
    keys_stored = 9
    revocation_rows = 11
    revocation_newest = 12


@pytest.fixture
def problems() -> list[str]:
    return []


@pytest.fixture
def mef_endpoint(problems: list[str]) -> Iterator[tuple[ObservabilityServer, MefMetrics, FakeTransport]]:
    metrics = MefMetrics()
    transport = FakeTransport()
    metrics.watch(transport, lambda: FakeStats())
    server = ObservabilityServer(metrics.registry, lambda: list(problems), host="127.0.0.1", port=0, name="test")
    server.start()
    try:
        yield server, metrics, transport
    finally:
        server.stop()


def test_metrics_answer_the_prometheus_text_format_and_counters_move(mef_endpoint):
    server, metrics, transport = mef_endpoint
    status, headers, body = get(server, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=")
    before = samples(body)
    assert before[("rspf_mef_connections_open", ())] == 3
    assert before[("rspf_mef_handshakes_total", (("result", "refused"),))] == 2
    assert before[("rspf_mef_enrolees", (("state", "active"),))] == 4
    assert before[("rspf_mef_enrolment_keys_live", ())] == 7
    assert before[("rspf_mef_revocation_log_rows", ())] == 11
    metrics.enrolments.labels("ok").inc()
    metrics.enrolments.labels("ok").inc()
    metrics.fetches.labels("refused").inc()
    metrics.refusals.labels("unknown identity").inc()
    transport.handshakes["ok"] += 10
    transport.connections_open = 0
    after = samples(get(server, "/metrics")[2])
    assert after[("rspf_mef_enrolments_total", (("result", "ok"),))] == 2
    assert after[("rspf_mef_fetches_total", (("result", "refused"),))] == 1
    assert after[("rspf_mef_refusals_total", (("reason", "unknown identity"),))] == 1
    assert after[("rspf_mef_handshakes_total", (("result", "ok"),))] == 15
    assert after[("rspf_mef_connections_open", ())] == 0


def test_health_is_ok_then_degraded_with_what_is_wrong(mef_endpoint, problems):
    server = mef_endpoint[0]
    status, headers, body = get(server, "/health")
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body) == {"status": "ok", "problems": []}
    problems.append("the MEF database /x is not writable")
    status, _, body = get(server, "/health")
    assert status == 503
    assert json.loads(body) == {"status": "degraded", "problems": ["the MEF database /x is not writable"]}


def test_a_failing_health_check_is_degraded_not_a_crash():
    def broken() -> list[str]:
        raise RuntimeError("boom")

    server = ObservabilityServer(MefMetrics().registry, broken, host="127.0.0.1", port=0, name="test")
    server.start()
    try:
        status, _, body = get(server, "/health")
        assert status == 503 and json.loads(body)["status"] == "degraded"
        assert get(server, "/metrics")[0] == 200  # still serving
    finally:
        server.stop()


def test_a_failing_sample_does_not_break_the_scrape():
    metrics = MefMetrics()

    def stats() -> FakeStats:
        raise RuntimeError("database gone")

    metrics.watch(FakeTransport(), stats)
    metrics.enrolments.labels("ok").inc()
    server = ObservabilityServer(metrics.registry, list, host="127.0.0.1", port=0, name="test")
    server.start()
    try:
        status, _, body = get(server, "/metrics")
        assert status == 200
        assert samples(body)[("rspf_mef_enrolments_total", (("result", "ok"),))] == 1
    finally:
        server.stop()


@pytest.mark.parametrize("path, method, status", [("/", "GET", 404), ("/metrics/x", "GET", 404),
                                                  ("/metrics", "POST", 405), ("/health", "DELETE", 405),
                                                  ("/metrics", "PUT", 405)])
def test_only_get_metrics_and_health_are_served(mef_endpoint, path, method, status):
    assert get(mef_endpoint[0], path, method)[0] == status


def test_a_query_string_is_ignored(mef_endpoint):
    assert get(mef_endpoint[0], "/health?x=1")[0] == 200


def test_a_taken_port_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(RspfError, match=f"cannot serve metrics and health on 127.0.0.1:{port}"):
            ObservabilityServer(MefMetrics().registry, list, host="127.0.0.1", port=port, name="test")


@pytest.mark.parametrize("value, expected", [("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::1]:80", ("::1", 80)),
                                             (" 10.0.0.1:0 ", ("10.0.0.1", 0))])
def test_parse_listen(value, expected):
    assert parse_listen(value, "k") == expected


@pytest.mark.parametrize("value", ["9464", "localhost:9464", "127.0.0.1", "127.0.0.1:x", "127.0.0.1:70000",
                                   ":9464", "127.0.0.1:-1", "", "1.2.3:9464"])
def test_parse_listen_refuses_with_the_key(value):
    with pytest.raises(ConfigError, match="mef.toml \\[mef\\] metrics_listen"):
        parse_listen(value, "mef.toml [mef] metrics_listen")


def test_refusal_reasons_are_a_bounded_set():
    assert refusal_reason("handshake deadline (10 s) hit") == "handshake deadline hit"
    assert refusal_reason("x" * 500) == "x" * 80


class FakeCache:
    hits, misses, fetches = 4, 2, 3

    def sizes(self) -> dict[str, int]:
        return {"keys": 5}


def test_cse_metrics_read_the_cache_listener_and_feed():
    metrics = CseMetrics()
    listener: list[FakeTransport | None] = [None]
    feed: list[RevocationFollower | None] = [None]
    metrics.watch(lambda: listener[0], FakeCache(), lambda: feed[0])
    reg = metrics.registry
    assert reg.get_sample_value("rspf_cse_key_cache_keys") == 5
    assert reg.get_sample_value("rspf_cse_secure_connections_open") is None  # before the listener starts
    assert reg.get_sample_value("rspf_cse_revocation_feed_position") is None
    listener[0] = FakeTransport()
    follower = RevocationFollower(lambda after: None, lambda items: None, lambda: None)  # type: ignore[arg-type,return-value]
    feed[0] = follower
    assert reg.get_sample_value("rspf_cse_secure_connections_open") == 3
    assert reg.get_sample_value("rspf_cse_secure_handshakes_total", {"result": "timeout"}) == 1
    assert reg.get_sample_value("rspf_cse_key_cache_hits_total") == 4
    assert reg.get_sample_value("rspf_cse_mef_fetches_total") == 3
    assert reg.get_sample_value("rspf_cse_revocation_feed_lag_seconds") is None  # never read yet
    metrics.registrations.labels("admitted").inc()
    metrics.connections_closed.labels("revoked").inc(2)
    assert reg.get_sample_value("rspf_cse_registrations_total", {"result": "admitted"}) == 1
    assert reg.get_sample_value("rspf_cse_connections_closed_total", {"reason": "revoked"}) == 2


def test_a_connection_flood_is_bounded_and_the_endpoint_recovers(mef_endpoint):
    from rspf.metrics import MAX_CLIENTS
    server = mef_endpoint[0]
    idle = [socket.create_connection(server.address, timeout=5) for _ in range(MAX_CLIENTS)]
    try:
        def refused() -> bool:
            try:
                return get(server, "/health")[0] != 200
            except (ConnectionError, http.client.HTTPException, OSError):
                return True

        assert all(refused() for _ in range(3))  # every slot held by a silent client: closed at once
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 10  # the slots come back as the silent connections end: poll
    while True:
        try:
            if get(server, "/health")[0] == 200:
                break
        except (ConnectionError, http.client.HTTPException, OSError):
            pass
        assert time.monotonic() < deadline, "the endpoint did not recover after the flood"
        time.sleep(0.02)


def test_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    server = ObservabilityServer(MefMetrics().registry, list, host="::1", port=0, name="test")
    server.start()
    try:
        assert get(server, "/health")[0] == 200
    finally:
        server.stop()
