"""The plugin's background renewal of the CSE's securityProfile (RspfSecurityPlugin._renew_loop), driven
with a stand-in Enrolee: no MEF, no ACME process."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path

import pytest

from rspf.acme.config import AcmePluginConfig
from rspf.acme.plugin import RspfSecurityPlugin
from rspf.enrolee import Enrolment
from rspf.errors import TlsError
from rspf.secret import Secret

UTC = dt.UTC


def enrolment(make_profile, ke_id: str, issued: dt.datetime, lifetime: dt.timedelta) -> Enrolment:
    ke = Secret(bytes(32), "Ke")
    return Enrolment(ke_id, ke, make_profile(ke=ke, ke_id=ke_id, issued=issued, lifetime=lifetime))


class FakeEnrolee:
    """enrol() fails ``failures`` times (MEF unreachable), then returns fresh enrolments."""

    def __init__(self, make_profile, failures: int = 0) -> None:
        self.make_profile, self.failures, self.calls = make_profile, failures, 0

    def enrol(self) -> Enrolment:
        self.calls += 1
        if self.calls <= self.failures:
            raise TlsError("127.0.0.1:1 refused the TLS-PSK handshake")
        now = dt.datetime.now(UTC).replace(microsecond=0)
        return enrolment(self.make_profile, f"{self.calls:032x}@mef.example.com", now, dt.timedelta(hours=1))


def plugin_with(fake: FakeEnrolee, current: Enrolment, renew_before: int) -> RspfSecurityPlugin:
    p = RspfSecurityPlugin()
    p.config = AcmePluginConfig(
        mef_host="127.0.0.1", mef_port=1, mef_fqdn="mef.example.com", enrol=True, kpm_id="k", kpm_file=Path("k"),
        node_id="n", profile_store=Path("s"), renew_before_seconds=renew_before, key_cache_seconds=300,
        startup_retry_seconds=0,
        mef_psk_identity=None, mef_psk_file=None, secure_listen="127.0.0.1", secure_port=1, cert_file=None,
        key_file=None, ca_file=None, enforcement=False, plain_port_originators=(), secure_web_ui=False,
        ssar="rspf-enrolled", ssar_shard_size=256,
        create_subscription=False, allowed_app_ids=("*",), secure_registrar=False, location=None)
    p.enrolee = fake  # type: ignore[assignment]
    p.enrolment = current
    return p


def run_until(p: RspfSecurityPlugin, done, timeout: float = 10.0) -> None:
    t = threading.Thread(target=p._renew_loop, daemon=True)
    t.start()
    deadline = time.monotonic() + timeout
    try:
        while not done():
            assert time.monotonic() < deadline, "the renewal did not happen in time"
            time.sleep(0.02)
    finally:
        p._stop.set()
        t.join(5)
    assert not t.is_alive()


def test_a_profile_near_expiry_is_renewed_in_the_background(make_profile) -> None:
    now = dt.datetime.now(UTC).replace(microsecond=0)
    old = enrolment(make_profile, "a" * 32 + "@mef.example.com", now - dt.timedelta(minutes=50),
                    dt.timedelta(hours=1))  # 10 minutes left, renewal window 30 minutes
    fake = FakeEnrolee(make_profile)
    p = plugin_with(fake, old, renew_before=1800)
    run_until(p, lambda: p.enrolment is not old)
    assert fake.calls == 1 and p.enrolment.ke_id == f"{1:032x}@mef.example.com"


def test_a_fresh_profile_is_left_alone(make_profile) -> None:
    now = dt.datetime.now(UTC).replace(microsecond=0)
    current = enrolment(make_profile, "b" * 32 + "@mef.example.com", now, dt.timedelta(hours=1))
    fake = FakeEnrolee(make_profile)
    p = plugin_with(fake, current, renew_before=600)
    waits: list[float] = []

    class OnePass(threading.Event):
        """Ends the loop at its first wait and records how long it meant to sleep."""

        def wait(self, timeout: float | None = None) -> bool:
            waits.append(timeout or 0.0)
            self.set()
            return True

    p._stop = OnePass()
    p._renew_loop()
    assert fake.calls == 0 and p.enrolment is current
    # it sleeps until the renewal window opens: 50 minutes from now (within a few seconds)
    assert len(waits) == 1 and 2990 <= waits[0] <= 3000


def test_renewal_retries_while_the_mef_is_down(make_profile) -> None:
    now = dt.datetime.now(UTC).replace(microsecond=0)
    old = enrolment(make_profile, "c" * 32 + "@mef.example.com", now - dt.timedelta(minutes=59),
                    dt.timedelta(hours=1))
    fake = FakeEnrolee(make_profile, failures=1)
    p = plugin_with(fake, old, renew_before=1800)
    run_until(p, lambda: p.enrolment is not old)
    assert fake.calls == 2  # one refusal, then success after the backoff (1 s)


@pytest.mark.parametrize("renew_before,lifetime_h,expected_min", [(1800, 1, 30), (86400, 1, 30), (60, 1, 59)])
def test_renewal_due_is_capped_at_half_the_lifetime(make_profile, renew_before, lifetime_h, expected_min) -> None:
    issued = dt.datetime(2026, 1, 1, tzinfo=UTC)
    e = enrolment(make_profile, "d" * 32 + "@mef.example.com", issued, dt.timedelta(hours=lifetime_h))
    assert e.renewal_due(renew_before) == issued + dt.timedelta(minutes=expected_min)
