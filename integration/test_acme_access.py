"""Who is served on which port: operations x originator kinds x ports x enforcement, against real ACME CSEs.

One ACME CSE per enforcement mode (``on``: ``plainPortOriginators = /id-in``; ``off``: compatibility mode
and ``secureWebUI = true``), both with the upper-tester endpoint on. Two AEs enrolled at the MEF and
registered over TLS-PSK: ``owner`` holds the container the operations target, ``other`` is a second
enrolled AE. On the secure listener the request goes over ``owner``'s association when the originator is
``owner``, else over ``other``'s -- so every originator but ``owner``/``other`` there is a spoof by a peer
that holds a valid credential.

The expected RSC of every cell is written out below (docs/acme-plugin.md explains them). Then: a reset
through the upper-tester endpoint, after which an enrolled AE registers over TLS-PSK at once (2001) and both
ports answer normally; and the secure listener's answers are all oneM2M answers.
"""

from __future__ import annotations

import http.client
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from rspf.enrolee import Enrolment
from rspf.ssar import bound_rule_name
from rspf.tls import PskClient

from .acme_harness import (
    TY_AE,
    TY_ASAR,
    TY_CNT,
    AcmeCse,
    Resp,
    ae_body,
    import_ae_batch,
    secure_request,
    wait_until,
)
from .support import HOST, MefHome, TargetInfo, enrolee_client

TY_CIN = 4
APP = "Nmatrix"
RULE = "rspf-enrolled"
LISTED = "/id-in"  # the operator's plainPortOriginators on the enforcing CSE (the CSE's own CSE-ID)
MAX_BODY = 65536  # [rspf] maxBodyBytes of both CSEs

KINDS = ("owner", "other", "unregistered", "cse", "admin", "listed")
OPS = ("create-ae", "create-cin", "retrieve", "update", "delete", "update-rule")
PORTS = ("plain", "secure")

# ---------------------------------------------------------------------------------------- expectations
_SECURE_SPOOF = dict.fromkeys(OPS, 4106)  # From is not the association's AE-ID (TS-0004 §7.3.2.1)
_SECURE = {
    "owner": {"create-ae": 4117, "create-cin": 2001, "retrieve": 2000, "update": 2004, "delete": 2002,
              "update-rule": 4103},
    "other": {"create-ae": 4117, "create-cin": 4103, "retrieve": 4103, "update": 4103, "delete": 4103,
              "update-rule": 4103},
    "unregistered": _SECURE_SPOOF, "cse": _SECURE_SPOOF, "admin": _SECURE_SPOOF, "listed": _SECURE_SPOOF,
}
_FULL = {"create-cin": 2001, "retrieve": 2000, "update": 2004, "delete": 2002, "update-rule": 2004}
EXPECTED: dict[tuple[str, str], dict[str, dict[str, int]]] = {
    ("on", "secure"): _SECURE,
    ("off", "secure"): _SECURE,
    # enforcement on, plain port: no credential, so an AE registration meets the rules with no Credential-ID
    # (4126: no rule admits that); AEs that registered with a credential, CSEs and the admin need a security
    # association (4107); an AE-ID nobody registered is not authenticated (4106); the listed originator is
    # left to ACME (which gives the CSE's own ID full access; as an AE registration its ID is no AE-ID: 4126)
    ("on", "plain"): {
        "owner": {"create-ae": 4126, **dict.fromkeys(OPS[1:], 4107)},
        "other": {"create-ae": 4126, **dict.fromkeys(OPS[1:], 4107)},
        "unregistered": {"create-ae": 4126, **dict.fromkeys(OPS[1:], 4106)},
        "cse": dict.fromkeys(OPS, 4107),
        "admin": dict.fromkeys(OPS, 4107),
        "listed": {"create-ae": 4126, **_FULL},
    },
    # compatibility mode, plain port: exactly what ACME alone answers -- X-M2M-Origin is believed
    ("off", "plain"): {
        "owner": {"create-ae": 4117, "create-cin": 2001, "retrieve": 2000, "update": 2004, "delete": 2002,
                  "update-rule": 4103},
        "other": {"create-ae": 4117, **dict.fromkeys(OPS[1:], 4103)},
        "unregistered": {"create-ae": 2001, **dict.fromkeys(OPS[1:], 4103)},
        "cse": {"create-ae": 4107, **dict.fromkeys(OPS[1:], 4103)},
        "admin": {"create-ae": 4117, **_FULL},
        "listed": {"create-ae": 4126, **_FULL},
    },
}
# ACME alone, asked to register an AE as its own CSE-ID: 4126 (not an AE-ID), or 4117 once ACME has put its
# CSE-ID into its originator registry (the order of the tests decides); either way nothing is created
ALSO = {("off", "plain", "listed", "create-ae"): {4117}}


# ---------------------------------------------------------------------------------------------- world
@dataclass
class World:
    mode: str
    cse: AcmeCse
    mef: MefHome
    owner: Enrolment
    other: Enrolment
    spare: Enrolment  # enrolled, never registered before the reset test

    def originator(self, kind: str, cell: str) -> str:
        return {"owner": self.owner.enrolee_id, "other": self.other.enrolee_id, "unregistered": f"Cnobody{cell}",
                "cse": "/id-mn", "admin": "CAdmin", "listed": LISTED}[kind]

    def secure(self, who: Enrolment, method: str, path: str, content: Any = None, *, origin: str | None = None,
               ty: int | None = None) -> Resp:
        return secure_request(self.cse.secure_port, who.ke_id, who.registrar_key, method, path, content,
                              origin=origin or who.enrolee_id, ty=ty)

    def register(self, who: Enrolment) -> Resp:
        return self.secure(who, "POST", "/cse-in", ae_body(who.enrolee_id, APP), ty=TY_AE)

    def ensure(self) -> None:
        """Both AEs registered and the owner's container ``box`` present (also after a reset)."""
        owner_box = f"/cse-in/{self.owner.enrolee_id}/box"
        if self.secure(self.owner, "GET", owner_box).rsc == 2000:
            return
        for who in (self.owner, self.other):
            assert self.register(who).rsc in (2001, 4117)
        r = self.secure(self.owner, "POST", f"/cse-in/{self.owner.enrolee_id}", {"m2m:cnt": {"rn": "box"}},
                        ty=TY_CNT)
        assert r.rsc == 2001, str(r)


def _start(root: Any, mef: MefHome, target: TargetInfo, mode: str) -> AcmeCse:
    cse = AcmeCse(root, f"access-{mode}")
    options = ["--no-enrol", "--mef-psk-identity", target.psk_identity, "--mef-psk-file", target.psk_file,
               "--allowed-app-ids", APP, "--enforcement" if mode == "on" else "--no-enforcement"]
    if mode == "on":
        options += ["--plain-port-originators", LISTED]
    cse.install(mef, *options, extra_ini="[http]\nenableUpperTesterEndpoint=true")
    if mode == "off":
        cse.set_rspf("secureWebUI", "true")
    cse.set_rspf("maxBodyBytes", str(MAX_BODY), add=True)  # below the transport's default: proves it is applied
    cse.start()
    return cse


@pytest.fixture(scope="module", params=["on", "off"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
          mef_target: tuple[MefHome, TargetInfo]) -> Iterator[World]:
    mode = request.param
    mef, target = mef_target
    cse = _start(tmp_path_factory.mktemp(f"access-{mode}"), mef, target, mode)
    try:
        infos = import_ae_batch(mef, f"mx{mode}", 3, cse.secure_uri)
        owner, other, spare = (enrolee_client(mef, i).enrol() for i in infos)
        w = World(mode, cse, mef, owner, other, spare)
        w.ensure()
        yield w
    finally:
        cse.stop()


# ---------------------------------------------------------------------------------------------- matrix
def _cell(op: str, kind: str, port: str) -> str:
    return f"{op}-{kind}-{port}".replace("-", "")


def _send(w: World, op: str, kind: str, port: str) -> Resp:
    cell = _cell(op, kind, port)
    origin = w.originator(kind, cell)
    owner_ae = f"/cse-in/{w.owner.enrolee_id}"
    method, path, content, ty = {
        "create-ae": ("POST", "/cse-in", ae_body(origin if kind == "unregistered" else f"Cx{cell}", APP), TY_AE),
        "create-cin": ("POST", f"{owner_ae}/box", {"m2m:cin": {"con": cell}}, TY_CIN),
        "retrieve": ("GET", f"{owner_ae}/box", None, None),
        "update": ("PUT", f"{owner_ae}/box", {"m2m:cnt": {"lbl": [f"by:{cell}"]}}, None),
        "delete": ("DELETE", f"{owner_ae}/d{cell}", None, None),
        "update-rule": ("PUT", f"/cse-in/{RULE}", {"m2m:asar": {"lbl": [f"by:{cell}"]}}, None),
    }[op]
    if op == "delete":  # a container of its own for every DELETE cell, made by its owner
        made = w.secure(w.owner, "POST", owner_ae, {"m2m:cnt": {"rn": f"d{cell}"}}, ty=TY_CNT)
        assert made.rsc == 2001, str(made)
    if port == "plain":
        return w.cse.request(method, path, content, origin=origin, ty=ty)
    who = w.owner if kind == "owner" else w.other
    return w.secure(who, method, path, content, origin=origin, ty=ty)


@pytest.mark.parametrize("port", PORTS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("op", OPS)
def test_matrix(world: World, op: str, kind: str, port: str) -> None:
    world.ensure()
    expected = EXPECTED[(world.mode, port)][kind][op]
    got = _send(world, op, kind, port)
    allowed = {expected} | ALSO.get((world.mode, port, kind, op), set())
    assert got.rsc in allowed, f"{op} by {kind} on the {port} port, enforcement {world.mode}: {got}"
    if expected >= 4000:  # a refusal changed nothing
        box = world.secure(world.owner, "GET", f"/cse-in/{world.owner.enrolee_id}/box")
        assert box.rsc == 2000, str(box)
        if op == "update":
            assert f"by:{_cell(op, kind, port)}" not in (box.pc("m2m:cnt").get("lbl") or []), str(box)


def test_refusals_are_logged_with_the_identity_and_never_a_key(world: World) -> None:
    """The reason and who (peer, originator, KeID, Credential-ID) at WARNING; the matrix's flood of refusals
    is rate-limited, so the test repeats its refused request until a line for it is written."""
    spoof = f"originator {world.owner.enrolee_id}, KeID {world.other.ke_id}"

    def refused_and_logged() -> str | None:
        if world.mode == "on":
            world.cse.request("GET", f"/cse-in/{world.owner.enrolee_id}/box", origin=world.owner.enrolee_id)
        world.secure(world.other, "GET", f"/cse-in/{world.owner.enrolee_id}", origin=world.owner.enrolee_id)
        text = world.cse.log_text()
        return text if spoof in text else None

    text = wait_until(refused_and_logged, timeout=60, interval=1.0, what="the refusal in ACME's log")
    assert f"refused: 4106 on the secure listener (peer 127.0.0.1, {spoof}, Credential-ID 12-" in text
    # A flood: 50 refusals within one or two 10 s windows, so one window holds more than the 20 WARNING lines;
    # the rest go to INFO only, and the next window's first refusal brings the count to ACME's log.
    for _ in range(50):
        world.secure(world.other, "GET", f"/cse-in/{world.owner.enrolee_id}", origin=world.owner.enrolee_id)

    def summarised() -> str | None:
        world.secure(world.other, "GET", f"/cse-in/{world.owner.enrolee_id}", origin=world.owner.enrolee_id)
        text = world.cse.log_text()
        return text if "more refusals in the previous 10 s were logged at INFO only" in text else None

    text = wait_until(summarised, timeout=60, interval=1.0, what="the flood's summary line in ACME's log")
    if world.mode == "on":
        assert f"refused: 4107 on the plain port (peer 127.0.0.1, originator {world.owner.enrolee_id})" in text
    for who in (world.owner, world.other, world.spare):
        assert who.registrar_key.reveal().hex() not in text.lower()


# ------------------------------------------------------------------------------------- secure listener
def _raw(w: World, method: str, path: str, headers: dict[str, str], body: bytes = b"", *,
         content_length: int | None = None) -> tuple[int, dict, bytes]:
    """One request with exactly these headers over the owner's TLS-PSK association (``content_length``: the
    length to declare instead of the body's)."""
    tls = PskClient().connect(HOST, w.cse.secure_port, w.owner.ke_id, w.owner.registrar_key, timeout=20)
    try:
        length = len(body) if content_length is None else content_length
        head = [f"{method} {path} HTTP/1.1", f"Host: {HOST}", "Connection: close",
                f"Content-Length: {length}", *(f"{k}: {v}" for k, v in headers.items())]
        tls.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        reader = tls.makefile()
        status = int(reader.readline().split()[1])
        hdrs: dict[str, str] = {}
        while (line := reader.readline().decode("latin-1").strip()):
            name, _, value = line.partition(":")
            hdrs[name.strip().lower()] = value.strip()
        return status, hdrs, reader.read(int(hdrs.get("content-length", "0")))
    finally:
        tls.close()


def _headers(w: World, ri: str = "ri-1") -> dict[str, str]:
    return {"X-M2M-Origin": w.owner.enrolee_id, "X-M2M-RI": ri, "X-M2M-RVI": "3", "Accept": "application/json"}


WEB_UI_PATHS = ("/", "/webui", "/webui/index.html")


@pytest.mark.parametrize(("method", "path", "status", "rsc"), [
    ("GET", "/cse-in", 200, 2000),            # control
    ("OPTIONS", "/cse-in", 405, 4005),
    ("HEAD", "/cse-in", 405, 4005),
    ("TRACE", "/cse-in", 405, 4005),
    ("DELETE", "/webui", 404, 4004),          # not the web UI: a resource path, and no such resource
    ("GET", "/", 404, 4004),                  # ACME's web UI redirect
    ("GET", "/webui", 404, 4004),
    ("GET", "/webui/index.html", 404, 4004),
    ("POST", "/__ut__", 404, 4004),           # the upper tester: never on the secure listener
])
def test_every_secure_answer_is_onem2m(world: World, method: str, path: str, status: int, rsc: int) -> None:
    got_status, headers, body = _raw(world, method, path, _headers(world, "ri-x"))
    if world.mode == "off" and method == "GET" and path in WEB_UI_PATHS:  # secureWebUI = true there
        assert got_status in (200, 302, 308) and headers.get("x-m2m-rsc") == "2000", (got_status, headers)
        assert headers.get("x-m2m-ri") == "ri-x"
        return
    assert (got_status, int(headers.get("x-m2m-rsc", 0))) == (status, rsc), (headers, body)
    assert headers.get("x-m2m-ri") == "ri-x"
    if method == "HEAD":
        assert body == b""  # an answer to HEAD has no body (RFC 9110 §9.3.2); the status and RSC say it all
    elif rsc >= 4000:
        assert "m2m:dbg" in json.loads(body)


@pytest.mark.parametrize("ri", ["", "x" * 257, "tab\there", "caf\u00e9"])
def test_invalid_request_identifier_is_4000(world: World, ri: str) -> None:
    headers = _headers(world)
    headers["X-M2M-RI"] = ri
    status, got, _body = _raw(world, "GET", "/cse-in", {k: v for k, v in headers.items() if v})
    assert (status, got.get("x-m2m-rsc")) == (400, "4000")
    assert "x-m2m-ri" not in got


@pytest.mark.parametrize(("what", "content_type", "body"), [
    ("UTF-16", "application/json;ty=4", json.dumps({"m2m:cin": {"con": "u16"}}).encode("utf-16")),
    ("a byte-order mark", "application/json;ty=4", b"\xef\xbb\xbf" + json.dumps({"m2m:cin": {"con": "b"}}).encode()),
    ("not JSON", "application/json;ty=4", b"{\"m2m:cin\": "),
])
def test_malformed_json_is_4000_with_the_request_identifier(world: World, what: str, content_type: str,
                                                             body: bytes) -> None:
    """Lenient decoding is no way in: JSON that is not UTF-8 text is refused, and the answer still echoes RI."""
    headers = dict(_headers(world, "ri-json"), **{"Content-Type": content_type})
    status, got, _body = _raw(world, "POST", f"/cse-in/{world.owner.enrolee_id}/box", headers, body)
    assert (status, got.get("x-m2m-rsc"), got.get("x-m2m-ri")) == (400, "4000", "ri-json"), what
    listed = world.secure(world.owner, "GET", f"/cse-in/{world.owner.enrolee_id}/box?rcn=4")
    assert "u16" not in json.dumps(listed.pc("m2m:cnt")), "a refused request created nothing"


@pytest.mark.parametrize("method", ["get", "Post", "PATCH"])
def test_methods_outside_the_binding_are_4005(world: World, method: str) -> None:
    status, got, _body = _raw(world, method, "/cse-in", _headers(world, "ri-m"))
    assert (status, got.get("x-m2m-rsc"), got.get("x-m2m-ri")) == (405, "4005", "ri-m")


def test_longest_request_identifier_is_echoed(world: World) -> None:
    ri = "r" * 256
    status, got, _body = _raw(world, "GET", "/cse-in", _headers(world, ri))
    assert (status, got.get("x-m2m-rsc"), got.get("x-m2m-ri")) == (200, "2000", ri)


def test_the_body_limit_is_the_one_in_acme_ini(world: World) -> None:
    """``maxBodyBytes`` (64 KiB here, 4 MiB by default) reaches the secure listener: a body one byte longer
    is refused from its head (413, RSC 4000) and creates nothing; one of exactly that size goes to ACME."""
    world.ensure()
    box = f"/cse-in/{world.owner.enrolee_id}/box"
    headers = dict(_headers(world, "ri-big"), **{"Content-Type": "application/json;ty=4"})
    status, got, _body = _raw(world, "POST", box, headers, content_length=MAX_BODY + 1)
    assert (status, got.get("x-m2m-rsc")) == (413, "4000"), got
    prefix = json.dumps({"m2m:cin": {"con": ""}})
    body = prefix[:-3] + "x" * (MAX_BODY - len(prefix)) + prefix[-3:]
    assert len(body) == MAX_BODY
    status, got, _body = _raw(world, "POST", box, headers, body.encode())
    assert status != 413 and "x-m2m-rsc" in got, got  # ACME's answer (its own size rules may still refuse)


# ---------------------------------------------------------------------------------------------- reset
def test_reset_through_the_upper_tester_then_tls_psk_registration_works_at_once(world: World) -> None:
    cse = world.cse
    conn = http.client.HTTPConnection(HOST, cse.http_port, timeout=60)
    try:
        conn.request("POST", "/__ut__", headers={"X-M2M-UTCMD": "reset", "X-M2M-RI": secrets.token_hex(4)})
        r = conn.getresponse()
        r.read()
        assert (r.status, r.getheader("X-M2M-RSC")) == (200, "2000")
    finally:
        conn.close()
    # both ports answer normally: no 5000 anywhere
    plain_admin = cse.request("GET", "/cse-in", origin=LISTED if world.mode == "on" else "CAdmin")
    assert plain_admin.rsc == 2000, str(plain_admin)
    assert cse.request("GET", "/cse-in", origin="CAdmin").rsc == (4107 if world.mode == "on" else 2000)
    # the reset purged every AE; an enrolled AE registers over TLS-PSK at once
    first = world.register(world.spare)
    assert first.rsc == 2001, str(first)
    assert world.secure(world.spare, "GET", f"/cse-in/{world.spare.enrolee_id}").rsc == 2000
    assert world.register(world.owner).rsc == 2001  # the AEs of before the reset too
    # ... and its credential has its own rule again (the reset purged the one of before)
    rule = cse.request("GET", f"/cse-in/{bound_rule_name(f'12-{world.spare.ke_id}')}",
                       origin=LISTED if world.mode == "on" else "CAdmin")
    recorded = {a.removeprefix("/id-in/") for a in rule.pc("m2m:asar").get("aae") or []}
    assert recorded == {world.spare.enrolee_id}, str(rule)


# ------------------------------------------------------------------------------------- other ways in
def test_the_credential_binding_cannot_be_set_by_a_request(world: World) -> None:
    world.ensure()
    ae = f"/cse-in/{world.owner.enrolee_id}"
    r = world.secure(world.owner, "PUT", ae, {"m2m:ae": {"__rspfCredentialID__": ""}})
    assert r.rsc == 4000, str(r)
    got = world.secure(world.owner, "GET", ae)
    assert got.rsc == 2000 and "__rspfCredentialID__" not in got.pc("m2m:ae"), str(got)
    plain = world.cse.request("GET", ae, origin=world.owner.enrolee_id)
    assert plain.rsc == (4107 if world.mode == "on" else 2000), str(plain)


def test_upper_tester_requests_do_not_bypass_the_checks(world: World) -> None:
    """``POST /__ut__`` with a oneM2M request in its body goes to ACME's dispatcher directly; with enforcement
    on, the gate before ACME's access control refuses it."""
    world.ensure()
    primitive = {"op": 2, "to": f"cse-in/{world.owner.enrolee_id}/box", "fr": world.owner.enrolee_id,
                 "rqi": "ut-1", "rvi": "3"}
    conn = http.client.HTTPConnection(HOST, world.cse.http_port, timeout=30)
    try:
        conn.request("POST", "/__ut__", body=json.dumps(primitive), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        body = json.loads(r.read() or b"{}")
    finally:
        conn.close()
    assert body.get("rsc") == (4103 if world.mode == "on" else 2000), body


def test_a_rule_without_credentials_admits_plain_port_registration(world: World) -> None:
    """Outside a security association an AE registration has no Credential-ID: only a rule without
    applicableCredIDs admits it (TS-0001 §10.2.2.2). Such an AE is served on the plain port, and a peer
    with another credential still cannot act as it on the secure listener."""
    world.ensure()
    cse = world.cse
    stem = "Cplainok"
    if world.mode == "off":  # compatibility mode: no rule is consulted on the plain port
        assert cse.request("POST", "/cse-in", ae_body(stem, "Nplain"), origin=stem, ty=TY_AE).rsc == 2001
        return
    assert cse.request("POST", "/cse-in", ae_body(stem, "Nplain"), origin=stem, ty=TY_AE).rsc == 4126
    rule = cse.request("POST", "/cse-in", {"m2m:asar": {"rn": "plain-rule", "aai": ["Nplain"], "aae": [stem]}},
                       origin=LISTED, ty=TY_ASAR)
    assert rule.rsc == 2001, str(rule)
    (node_uri,) = cse.request("GET", "/cse-in?fu=1&ty=20", origin=LISTED).pc("m2m:uril")
    node_path = f"/~{node_uri}" if node_uri.startswith("/") else f"/{node_uri}"
    links = cse.request("GET", node_path, origin=LISTED).pc("m2m:svsn")["rlk"] + [rule.pc("m2m:asar")["ri"]]
    linked = cse.request("PUT", node_path, {"m2m:svsn": {"rlk": links}}, origin=LISTED)
    assert linked.rsc == 2004, str(linked)
    ok = cse.request("POST", "/cse-in", ae_body(stem, "Nplain"), origin=stem, ty=TY_AE)
    assert ok.rsc == 2001, str(ok)
    assert cse.request("GET", f"/cse-in/{stem}", origin=stem).rsc == 2000  # registered without a credential
    spoof = world.secure(world.other, "GET", f"/cse-in/{stem}", origin=stem)
    assert spoof.rsc == 4106, str(spoof)
    # the rule admits no credential-less registration of another AE-ID, nor another App-ID
    assert cse.request("POST", "/cse-in", ae_body("Cplainnot", "Nplain"), origin="Cplainnot", ty=TY_AE).rsc == 4126
