"""Background renewal of a securityProfile (rspf.enrolee.Renewer, and the plugin that drives it), with a
stand-in Enrolee and injected time: no MEF, no ACME process, no real waits. The same renewal against a real
MEF behind a proxy that drops, hangs and refuses is in integration/test_client_resilience.py."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest

from rspf.acme.config import AcmePluginConfig
from rspf.acme.plugin import RspfSecurityPlugin
from rspf.enrolee import Backoff, Enrolment, Renewer
from rspf.errors import TlsError, TransportError
from rspf.httpserver import ServerLimits
from rspf.secret import Secret

UTC = dt.UTC


def enrolment(make_profile, ke_id: str, issued: dt.datetime, lifetime: dt.timedelta) -> Enrolment:
    ke = Secret(bytes(32), "Ke")
    return Enrolment(ke_id, ke, make_profile(ke=ke, ke_id=ke_id, issued=issued, lifetime=lifetime))


class FakeEnrolee:
    """enrol() raises the given errors in turn (the MEF misbehaving), then returns fresh enrolments."""

    def __init__(self, make_profile, errors: list[Exception] | None = None) -> None:
        self.make_profile, self.errors, self.calls = make_profile, list(errors or []), 0

    def enrol(self) -> Enrolment:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        now = dt.datetime.now(UTC).replace(microsecond=0)
        return enrolment(self.make_profile, f"{self.calls:032x}@mef.example.com", now, dt.timedelta(hours=1))


class Waits:
    """The injected ``wait``: records each requested sleep without sleeping; stops after ``stop_after`` waits."""

    def __init__(self, stop_after: int) -> None:
        self.stop_after, self.seen = stop_after, []

    def __call__(self, seconds: float) -> bool:
        self.seen.append(seconds)
        return len(self.seen) >= self.stop_after


def near_expiry(make_profile, letter: str) -> Enrolment:
    now = dt.datetime.now(UTC).replace(microsecond=0)
    return enrolment(make_profile, letter * 32 + "@mef.example.com", now - dt.timedelta(minutes=50),
                     dt.timedelta(hours=1))  # 10 minutes left, renewal window 30 minutes


def test_a_profile_near_expiry_is_renewed(make_profile) -> None:
    old = near_expiry(make_profile, "a")
    fake, renewed = FakeEnrolee(make_profile), []
    r = Renewer(fake, 1800, old, on_renewed=lambda f, p: renewed.append((f, p)), wait=Waits(1))  # type: ignore[arg-type]
    r.run()
    assert fake.calls == 1 and r.current is not old and renewed == [(r.current, old)]
    assert r.current is not None and r.current.ke_id == f"{1:032x}@mef.example.com"


def test_a_fresh_profile_is_left_alone_until_its_window_opens(make_profile) -> None:
    now = dt.datetime.now(UTC).replace(microsecond=0)
    current = enrolment(make_profile, "b" * 32 + "@mef.example.com", now, dt.timedelta(hours=1))
    fake, waits = FakeEnrolee(make_profile), Waits(1)
    r = Renewer(fake, 600, current, on_renewed=lambda f, p: None, wait=waits, now=lambda: now)  # type: ignore[arg-type]
    r.run()
    assert fake.calls == 0 and r.current is current
    assert waits.seen == [3000.0]  # the renewal window opens 50 minutes from now


def test_failures_back_off_with_jitter_up_to_the_ceiling_then_succeed(make_profile, caplog) -> None:
    old = near_expiry(make_profile, "c")
    errors: list[Exception] = [TransportError(f"127.0.0.1:1 failure {i}") for i in range(8)]
    fake, waits = FakeEnrolee(make_profile, errors), Waits(9)
    draws = iter([0.0, 1.0] * 10)
    r = Renewer(fake, 1800, old, on_renewed=lambda f, p: None, wait=waits,  # type: ignore[arg-type]
                backoff=Backoff(first=1.0, ceiling=20.0), draw=lambda: next(draws))
    with caplog.at_level(logging.INFO, logger="rspf.enrolee.renewal"):
        r.run()
    assert fake.calls == 9 and r.current is not old and r.failures == 0
    # delays 1, 2, 4, 8, 16, 20, 20, 20 (ceiling), each drawn in [d/2, d]: here alternately d/2 and d
    assert waits.seen[:8] == [0.5, 2.0, 2.0, 8.0, 8.0, 20.0, 10.0, 20.0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 8 and "failure 0" in warnings[0] and "retrying in 0.5 s" in warnings[0]
    assert any("succeeded after 8 failed attempt(s)" in r.getMessage() for r in caplog.records)


def test_an_unexpected_exception_does_not_end_the_renewal(make_profile, caplog) -> None:
    old = near_expiry(make_profile, "d")
    fake, waits = FakeEnrolee(make_profile, [ValueError("odd"), TlsError("handshake failed")]), Waits(3)
    r = Renewer(fake, 1800, old, on_renewed=lambda f, p: None, wait=waits, draw=lambda: 1.0)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="rspf.enrolee.renewal"):
        r.run()
    assert fake.calls == 3 and r.current is not old
    assert "ValueError: odd" in caplog.records[0].getMessage()
    assert "handshake failed" in caplog.records[1].getMessage()


def plugin_with(fake: FakeEnrolee, current: Enrolment, renew_before: int) -> RspfSecurityPlugin:
    p = RspfSecurityPlugin()
    p.config = AcmePluginConfig(
        mef_host="127.0.0.1", mef_port=1, mef_fqdn="mef.example.com", enrol=True, kpm_id="k", kpm_file=Path("k"),
        node_id="n", profile_store=Path("s"), renew_before_seconds=renew_before, key_cache_seconds=300,
        startup_retry_seconds=0,
        mef_psk_identity=None, mef_psk_file=None, secure_listen="127.0.0.1", secure_port=1, cert_file=None,
        key_file=None, ca_file=None, mef_ca_file=None, accept_psk=True, accept_certificates=False,
        enforcement=False, plain_port_originators=(), secure_web_ui=False,
        ssar="rspf-enrolled",
        create_subscription=False, allowed_app_ids=("*",), secure_registrar=False, location=None,
        limits=ServerLimits())
    p.enrolee = fake  # type: ignore[assignment]
    p.enrolment = current
    return p


def test_the_plugin_takes_the_renewed_profile_and_stops_with_its_stop_event(make_profile) -> None:
    old = near_expiry(make_profile, "e")
    fake = FakeEnrolee(make_profile, [TransportError("the MEF closed the connection")])
    p = plugin_with(fake, old, renew_before=1800)
    renewal = p._renewal()
    assert renewal.step() > 0 and p.enrolment is old  # the MEF failed: backoff, the old profile stays
    renewal.step()
    assert fake.calls == 2 and p.enrolment is renewal.current and p.enrolment is not old
    p._stop.set()
    renewal.run()  # returns at once: the plugin's stop event ends the loop
    assert fake.calls == 2


@pytest.mark.parametrize("renew_before,lifetime_h,expected_min", [(1800, 1, 30), (86400, 1, 30), (60, 1, 59)])
def test_renewal_due_is_capped_at_half_the_lifetime(make_profile, renew_before, lifetime_h, expected_min) -> None:
    issued = dt.datetime(2026, 1, 1, tzinfo=UTC)
    e = enrolment(make_profile, "f" * 32 + "@mef.example.com", issued, dt.timedelta(hours=lifetime_h))
    assert e.renewal_due(renew_before) == issued + dt.timedelta(minutes=expected_min)
