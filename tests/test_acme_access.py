"""The originator checks of TS-0004 §7.3.2.1 (rspf.acme.access), sans-I/O: every check with a lying side."""

from __future__ import annotations

import logging

import pytest

from rspf.acme.access import (
    check_associated,
    check_unassociated,
    parse_originator,
    resource_type,
    shown,
    valid_request_id,
)
from rspf.errors import RSC, RspfError
from rspf.ratelimit import RefusalLog
from rspf.wsgi import PeerCredential

ME, SP = "/id-in", "//sp.example.com"
ADMINS = ["CAdmin", "/id-in/CAdmin", "//sp.example.com/id-in/CAdmin"]
REGISTERED = {"Cplain": None, "Cbound": "12-k1@mef.example.com"}


def lookup(stem: str) -> tuple[bool, str | None]:
    return (stem in REGISTERED, REGISTERED.get(stem))


def ae_cred(ae_id: str | None = "Cae1") -> PeerCredential:
    return PeerCredential("psk", "k1@mef.example.com", "12-k1@mef.example.com", ae_id)


def rsc_of(fn, *args, **kw) -> int | None:
    try:
        fn(*args, **kw)
    except RspfError as exc:
        return int(exc.rsc)
    return None


@pytest.mark.parametrize(("value", "kind", "cse_id", "stem"), [
    ("", "absent", None, None),
    ("Cae1", "ae", None, "Cae1"),
    ("/id-in/Cae1", "ae", "/id-in", "Cae1"),
    ("//sp.example.com/id-in/Cae1", "ae", "/id-in", "Cae1"),
    ("//other.example.com/id-in/Cae1", "ae", "//other.example.com/id-in", "Cae1"),
    ("/id-mn", "cse", "/id-mn", None),
    ("//sp.example.com/id-mn", "cse", "/id-mn", None),
])
def test_originator_forms(value: str, kind: str, cse_id: str | None, stem: str | None) -> None:
    o = parse_originator(value, SP)
    assert (o.kind, o.cse_id, o.stem) == (kind, cse_id, stem)


@pytest.mark.parametrize(("origin", "expected"), [
    ("Cae1", None), ("/id-in/Cae1", None), ("//sp.example.com/id-in/Cae1", None),
    ("Cae2", 4106), ("/id-mn/Cae1", 4106), ("/id-in", 4106), ("CAdmin", 4106), ("", 4106),
    ("//other.example.com/id-in/Cae1", 4106),
])
def test_within_an_association_the_from_is_the_associations_ae_id(origin: str, expected: int | None) -> None:
    assert rsc_of(check_associated, ae_cred(), origin, ME, SP) == expected


@pytest.mark.parametrize(("origin", "expected"), [
    ("/id-mn", None), ("/id-mn/Cae9", None), ("//sp.example.com/id-mn", None),
    ("/id-other", 4106), ("/id-other/Cae9", 4106), ("Cae9", 4106), ("/id-in", 4106),
])
def test_within_a_cse_association(origin: str, expected: int | None) -> None:
    assert rsc_of(check_associated, ae_cred("/id-mn"), origin, ME, SP) == expected


def test_a_credential_without_an_identity_authenticates_no_one() -> None:
    assert rsc_of(check_associated, ae_cred(None), "Cae1", ME, SP) == 4106


def plain(method: str, origin: str, ty: int | None = None, listed: tuple[str, ...] = ()) -> int | None:
    return rsc_of(check_unassociated, method, ty, origin, own_cse_id=ME, sp_id=SP, admins=ADMINS, listed=listed,
                  lookup=lookup)


@pytest.mark.parametrize(("method", "origin", "ty", "expected"), [
    ("POST", "", 2, None),                 # AE registration without From: the CSE assigns the AE-ID
    ("GET", "", None, 4000),               # From missing outside an AE registration
    ("POST", "Cnew", 2, None),             # AE registration: the rule check follows (no Credential-ID)
    ("GET", "Cnobody", None, 4106),        # not a registered AE
    ("POST", "Cnobody", 4, 4106),          # a create that is not an AE registration
    ("GET", "/id-mn/Cplain", None, 4106),  # an AE-ID of another CSE is not registered here
    ("GET", "Cplain", None, None),         # registered without a credential: ACME decides
    ("GET", "/id-in/Cplain", None, None),
    ("GET", "Cbound", None, 4107),         # registered with a credential: only within an association
    ("DELETE", "/id-in/Cbound", None, 4107),
    ("GET", "/id-mn", None, 4107),         # a CSE-ID outside a security association
    ("POST", "/id-in", 2, 4107),
    ("GET", "CAdmin", None, 4107),         # the admin, in every spelling, unless listed
    ("PUT", "/id-in/CAdmin", None, 4107),
    ("GET", "//sp.example.com/id-in/CAdmin", None, 4107),
])
def test_outside_an_association(method: str, origin: str, ty: int | None, expected: int | None) -> None:
    assert plain(method, origin, ty) == expected


def test_listed_originators_are_left_to_acme_in_any_spelling() -> None:
    assert plain("PUT", "/id-in/CAdmin", listed=("CAdmin",)) is None
    assert plain("GET", "//sp.example.com/id-ops", listed=("/id-ops",)) is None
    assert plain("GET", "/id-ops", listed=("/id-other",)) == 4107


def test_request_identifier_and_content_type() -> None:
    assert valid_request_id("r" * 256) and valid_request_id("a b~!")
    for bad in (None, "", "r" * 257, "tab\there", "caf\u00e9", "nl\n"):
        assert not valid_request_id(bad)
    assert resource_type("application/json;ty=2") == 2
    assert resource_type("application/json; charset=utf-8; ty=4") == 4
    assert resource_type("application/json") is None and resource_type("application/json;ty=x") is None


def test_untrusted_values_are_escaped_and_bounded_in_logs() -> None:
    assert shown("evil\nWARNING forged") == "evil\\nWARNING forged"
    assert len(shown("x" * 1000)) == 83 and shown(None) == "(none)"


def test_refusal_log_through_an_emitter_keeps_a_flood_out_of_warning() -> None:
    """The plugin's refusal log (rspf.ratelimit.RefusalLog writing through ACME's log): a flood gives ``burst``
    WARNING lines, the rest at INFO, and one WARNING that counts them when the next interval starts."""
    now = [0.0]
    lines: list[tuple[int, str]] = []
    log = RefusalLog(lambda level, text: lines.append((level, text)), burst=3, interval=10.0, clock=lambda: now[0])
    for i in range(1000):  # a flood
        log.refused(f"n{i}")
    assert [t for lvl, t in lines if lvl == logging.WARNING] == ["n0", "n1", "n2"]
    assert sum(1 for lvl, _ in lines if lvl == logging.INFO) == 997
    now[0] = 10.0
    log.refused("later")
    assert lines[-2:] == [(logging.WARNING, "997 more refusals in the previous 10 s were logged at INFO only"),
                          (logging.WARNING, "later")]


def test_every_refusal_has_its_own_rsc_and_http_status() -> None:
    assert RSC.ORIGINATOR_NOT_AUTHENTICATED.http_status == RSC.SECURITY_ASSOCIATION_REQUIRED.http_status == 403
