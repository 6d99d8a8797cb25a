"""Malformed oneM2M HTTP requests, sent as raw bytes over a real TLS-PSK session, get the right RSC.

After every refused request the enrolee's lastEnrolled is unchanged and the KeID of that session was
not stored (the registrar Target's fetch of it answers 4004). A valid request on the same kind of
session is the control showing that these checks do notice a stored key.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from rspf import keys
from rspf.secret import Secret
from rspf.tls import PskClient, TlsConnection

from .support import FQDN, HOST, EnroleeInfo, MefHome, read_hex

_client = PskClient()



@dataclass
class RawResponse:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    head: bytes = b""

    @property
    def rsc(self) -> int | None:
        v = self.headers.get("x-m2m-rsc")
        return int(v) if v else None

    def json(self):
        return json.loads(self.body)


class RawSession:
    def __init__(self, tls: TlsConnection) -> None:
        self.tls = tls
        self.buf = b""

    def _recv(self) -> bytes:
        chunk = bytearray(16384)
        n = self.tls.recv_into(chunk)
        return bytes(chunk[:n])

    def send(self, data: bytes) -> None:
        self.tls.sendall(data)

    def read_response(self) -> RawResponse:
        while b"\r\n\r\n" not in self.buf:
            data = self._recv()
            assert data, f"the MEF closed the connection without an answer (got {self.buf!r})"
            self.buf += data
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        n = int(headers.get("content-length", "0"))
        while len(self.buf) < n:
            data = self._recv()
            assert data, "the MEF closed the connection inside a body"
            self.buf += data
        body, self.buf = self.buf[:n], self.buf[n:]
        return RawResponse(status, headers, body, head)

    def closed_by_peer(self) -> bool:
        """True if the server closed the connection (EOF or reset) before the read timeout."""
        try:
            return self._recv() == b""
        except ConnectionError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.tls.close()


def request(method: str, path: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def onem2m_headers(origin: str, body: bytes | None = None, **overrides: str | None) -> dict[str, str]:
    h: dict[str, str | None] = {"Host": FQDN, "X-M2M-Origin": origin, "X-M2M-RI": f"ri-{secrets.token_hex(4)}",
                                "X-M2M-RVI": "3", "Accept": "application/json"}
    if body is not None:
        h["Content-Type"] = "application/json"
        h["Content-Length"] = str(len(body))
    for k, v in overrides.items():
        h[k.replace("_", "-")] = v
    return {k: v for k, v in h.items() if v is not None}


@pytest.fixture
def home(module_mef: MefHome) -> MefHome:
    assert module_mef.proc is not None and module_mef.proc.poll() is None, "the shared MEF died"
    return module_mef


@pytest.fixture(scope="module")
def pool(module_mef: MefHome) -> Iterator[EnroleeInfo]:
    """Fresh enrolees, registered with one CLI import: one per session, so lastEnrolled starts empty."""
    return iter(module_mef.import_batch("raw", 60))


class EnroleeSession:
    """A raw TLS-PSK session of a fresh enrolee, with the KeID this session derives."""

    def __init__(self, home: MefHome, info: EnroleeInfo) -> None:
        self.home = home
        self.info = info
        tls = _client.connect(HOST, home.port, self.info.kpm_id, Secret(bytes.fromhex(self.info.kpm_hex)),
                              server_name=FQDN, timeout=10)
        material = keys.split_exporter_output(
            tls.export_keying_material(keys.EXPORTER_LABEL_BOOTSTRAP, keys.EXPORTER_LENGTH))
        self.ke_id = keys.make_ke_id(material.relative_ke_id, FQDN)
        self.raw = RawSession(tls)

    def sp_body(self) -> bytes:
        return json.dumps({"rspf:spReq": {"nodeID": self.info.node_id}}).encode()

    def assert_nothing_stored(self) -> None:
        assert self.home.show(self.info.kpm_id)["lastEnrolled"] is None
        out = self.home.root / f"{self.info.kpm_id}.hex"
        res = self.home.fetch(self.home.targets["in"], self.ke_id, key_out=out)
        assert res.rc == 1 and "error: the peer answered 4004:" in res.stderr, str(res)
        assert not out.exists()


@pytest.fixture
def session(home: MefHome, pool: Iterator[EnroleeInfo]):
    s = EnroleeSession(home, next(pool))
    try:
        yield s
    finally:
        s.raw.close()


def check(resp: RawResponse, status: int, rsc: int) -> None:
    assert (resp.status, resp.rsc) == (status, rsc), (resp.status, resp.headers, resp.body)
    assert resp.headers.get("content-type") == "application/json"
    assert isinstance(resp.json().get("m2m:dbg"), str)


# ---------------------------------------------------------------------------------------------- control
def test_control_valid_request_stores_the_session_key(home: MefHome, session: EnroleeSession) -> None:
    body = session.sp_body()
    headers = onem2m_headers(session.info.kpm_id, body)
    session.raw.send(request("POST", "/securityProfile", headers, body))
    resp = session.raw.read_response()
    assert (resp.status, resp.rsc) == (201, 2001), resp
    assert resp.headers["x-m2m-ri"] == headers["X-M2M-RI"]
    assert resp.headers["x-m2m-rvi"] == "3"
    assert resp.json()["rspf:secp"]["credential"]["keyID"] == session.ke_id
    assert home.show(session.info.kpm_id)["lastEnrolled"] is not None
    out = home.root / "control.hex"
    res = home.fetch(home.targets["in"], session.ke_id, key_out=out)
    assert res.rc == 0, str(res)
    assert base64.b64decode(resp.json()["rspf:secp"]["credential"]["key"]) == bytes.fromhex(read_hex(out))


# ----------------------------------------------------------------------------------------- bad headers
def test_missing_request_identifier_is_4000(session: EnroleeSession) -> None:
    body = session.sp_body()
    session.raw.send(request("POST", "/securityProfile", onem2m_headers(session.info.kpm_id, body, X_M2M_RI=None),
                             body))
    resp = session.raw.read_response()
    check(resp, 400, 4000)
    assert "X-M2M-RI" in resp.json()["m2m:dbg"]
    session.assert_nothing_stored()


@pytest.mark.parametrize("rvi", [None, "1"])
def test_missing_or_unsupported_release_version_is_4001(session: EnroleeSession, rvi: str | None) -> None:
    body = session.sp_body()
    headers = onem2m_headers(session.info.kpm_id, body, X_M2M_RVI=rvi)
    session.raw.send(request("POST", "/securityProfile", headers, body))
    resp = session.raw.read_response()
    check(resp, 400, 4001)
    assert resp.headers.get("x-m2m-ri") == headers["X-M2M-RI"]
    session.assert_nothing_stored()


# a bare CR inside a header value is malformed HTTP: h11 refuses the request before any oneM2M check (4000)
@pytest.mark.parametrize("name,value,rsc", [("X-M2M-RI", "abc\rX-Injected: yes", 4000),
                                            ("X-M2M-RVI", "9\rX-Injected: yes", 4000)])
def test_error_responses_do_not_echo_raw_header_values(session: EnroleeSession, name: str, value: str,
                                                        rsc: int) -> None:
    body = session.sp_body()
    headers = onem2m_headers(session.info.kpm_id, body)
    headers[name] = value
    session.raw.send(request("POST", "/securityProfile", headers, body))
    resp = session.raw.read_response()
    assert resp.rsc == rsc
    session.assert_nothing_stored()
    assert b"\r" not in resp.head.replace(b"\r\n", b""), f"a bare CR in the response head: {resp.head!r}"
    assert b"X-Injected" not in resp.head


def test_missing_originator_is_4000(session: EnroleeSession) -> None:
    body = session.sp_body()
    session.raw.send(request("POST", "/securityProfile",
                             onem2m_headers(session.info.kpm_id, body, X_M2M_Origin=None), body))
    check(session.raw.read_response(), 400, 4000)
    session.assert_nothing_stored()


def test_oversized_header_block_is_4000_and_closes(session: EnroleeSession) -> None:
    body = session.sp_body()
    session.raw.send(request("POST", "/securityProfile",
                             onem2m_headers(session.info.kpm_id, body, X_Padding="a" * 20000), body))
    resp = session.raw.read_response()
    check(resp, 431, 4000)
    assert resp.headers.get("connection") == "close"
    assert session.raw.closed_by_peer()
    session.assert_nothing_stored()


# ----------------------------------------------------------------------------------------------- bodies
def test_body_over_max_body_bytes_is_413_and_closes(session: EnroleeSession) -> None:
    # only the head is sent: the MEF must answer from Content-Length alone, before reading the body
    headers = onem2m_headers(session.info.kpm_id, b"", Content_Length=str(65536 + 1))
    session.raw.send(request("POST", "/securityProfile", headers))
    resp = session.raw.read_response()
    check(resp, 413, 4000)
    assert resp.headers.get("connection") == "close"
    assert session.raw.closed_by_peer(), "the MEF kept the connection open after 413"
    session.assert_nothing_stored()


def test_chunked_body_over_max_body_bytes_is_413_and_closes(session: EnroleeSession) -> None:
    headers = onem2m_headers(session.info.kpm_id, None, Content_Type="application/json",
                             Transfer_Encoding="chunked")
    session.raw.send(request("POST", "/securityProfile", headers) + b"%x\r\n" % (65536 + 1) + b"x" * (65536 + 1))
    resp = session.raw.read_response()
    check(resp, 413, 4000)
    assert session.raw.closed_by_peer()
    session.assert_nothing_stored()


def test_body_at_max_body_bytes_is_read(session: EnroleeSession) -> None:
    """The limit is inclusive: a 65536-byte JSON body is parsed (and refused for its content, 4000)."""
    head, tail = b'{"rspf:spReq":{"nodeID":"', b'"}}'
    body = head + b"x" * (65536 - len(head) - len(tail)) + tail
    assert len(body) == 65536
    session.raw.send(request("POST", "/securityProfile", onem2m_headers(session.info.kpm_id, body), body))
    resp = session.raw.read_response()
    check(resp, 400, 4000)
    assert "nodeID" in resp.json()["m2m:dbg"]
    session.assert_nothing_stored()


@pytest.mark.parametrize("body", [b"this is not json", b'{"rspf:spReq": {"nodeID": '])
def test_non_json_body_is_4000(session: EnroleeSession, body: bytes) -> None:
    session.raw.send(request("POST", "/securityProfile", onem2m_headers(session.info.kpm_id, body), body))
    resp = session.raw.read_response()
    check(resp, 400, 4000)
    assert "JSON" in resp.json()["m2m:dbg"]
    session.assert_nothing_stored()


def test_non_json_media_type_is_4015(session: EnroleeSession) -> None:
    body = session.sp_body()
    session.raw.send(request("POST", "/securityProfile",
                             onem2m_headers(session.info.kpm_id, body, Content_Type="text/plain"), body))
    check(session.raw.read_response(), 415, 4015)
    session.assert_nothing_stored()


@pytest.mark.parametrize("content", [[], {"rspf:spReq": {}}, {"rspf:spReq": {"nodeID": "urn:x", "extra": 1}}])
def test_wrong_json_shape_is_4000(session: EnroleeSession, content) -> None:
    body = json.dumps(content).encode()
    session.raw.send(request("POST", "/securityProfile", onem2m_headers(session.info.kpm_id, body), body))
    check(session.raw.read_response(), 400, 4000)
    session.assert_nothing_stored()


# ------------------------------------------------------------------------------------ paths and methods
@pytest.mark.parametrize("path", ["/nothing", "/securityProfile/extra"])
def test_unknown_path_is_4004(session: EnroleeSession, path: str) -> None:
    body = session.sp_body()
    session.raw.send(request("POST", path, onem2m_headers(session.info.kpm_id, body), body))
    check(session.raw.read_response(), 404, 4004)
    session.assert_nothing_stored()


@pytest.mark.parametrize("method,path", [("PUT", "/securityProfile"), ("DELETE", "/securityProfile"),
                                         ("GET", "/enrolmentExchange")])
def test_wrong_method_is_4005(session: EnroleeSession, method: str, path: str) -> None:
    body = session.sp_body()
    session.raw.send(request(method, path, onem2m_headers(session.info.kpm_id, body), body))
    check(session.raw.read_response(), 405, 4005)
    session.assert_nothing_stored()


def test_session_survives_an_error(session: EnroleeSession) -> None:
    """A refused request does not end a keep-alive session: a valid request on it still works."""
    body = session.sp_body()
    session.raw.send(request("PUT", "/securityProfile", onem2m_headers(session.info.kpm_id, body), body))
    check(session.raw.read_response(), 405, 4005)
    session.raw.send(request("POST", "/securityProfile", onem2m_headers(session.info.kpm_id, body), body))
    resp = session.raw.read_response()
    assert (resp.status, resp.rsc) == (201, 2001)
    assert resp.json()["rspf:secp"]["credential"]["keyID"] == session.ke_id


# ------------------------------------------------------------------------------- fetchCredentials (raw)
@pytest.mark.parametrize("path,rsc", [
    ("/fetchCredentials/0123@mef.example.com/22", 4000),
    ("/fetchCredentials/" + "0" * 32 + "@bad_fqdn/22", 4000),
    ("/fetchCredentials/" + "0" * 32 + "@mef.example.com/abc", 4000),
    ("/fetchCredentials/" + "0" * 32 + "@mef.example.com/99", 4000),
    ("/fetchCredentials/" + "0" * 32 + "@mef.example.com", 4000),
    ("/fetchCredentials/" + "0" * 32 + "@mef.example.com/22", 4004),
])
def test_fetch_credentials_malformed_ke_id_or_suid(home: MefHome, path: str, rsc: int) -> None:
    target = home.targets["in"]
    tls = _client.connect(HOST, home.port, target.psk_identity, Secret(bytes.fromhex(target.psk_hex)),
                          server_name=FQDN, timeout=10)
    raw = RawSession(tls)
    try:
        raw.send(request("GET", path, onem2m_headers(target.target_id)))
        resp = raw.read_response()
    finally:
        raw.close()
    assert resp.rsc == rsc, (resp.status, resp.headers, resp.body)
    assert resp.status == {4000: 400, 4004: 404}[rsc]
    fc = resp.json()["rspf:fcRsp"]
    assert fc["status"] is False and "credential" not in fc


# ------------------------------------------------------------------------------------------ strict HTTP
def test_lowercase_method_is_405_4005_and_closes(session: EnroleeSession) -> None:
    body = session.sp_body()
    headers = onem2m_headers(session.info.kpm_id, body)
    session.raw.send(request("post", "/securityProfile", headers, body))
    resp = session.raw.read_response()
    check(resp, 405, 4005)
    assert resp.headers.get("x-m2m-ri") == headers["X-M2M-RI"]
    assert session.raw.closed_by_peer()
    session.assert_nothing_stored()


@pytest.mark.parametrize("version", ["HTTP/1.9", "HTTP/2.0"])
def test_other_http_versions_are_refused(session: EnroleeSession, version: str) -> None:
    body = session.sp_body()
    data = request("POST", "/securityProfile", onem2m_headers(session.info.kpm_id, body), body)
    session.raw.send(data.replace(b"HTTP/1.1", version.encode(), 1))
    check(session.raw.read_response(), 505, 4000)
    assert session.raw.closed_by_peer()
    session.assert_nothing_stored()


def test_two_thousand_trailer_lines_are_refused(session: EnroleeSession) -> None:
    body = session.sp_body()
    headers = onem2m_headers(session.info.kpm_id, None, Content_Type="application/json",
                             Transfer_Encoding="chunked")
    chunked = b"%x\r\n" % len(body) + body + b"\r\n0\r\n" + b"".join(b"T%d: x\r\n" % i for i in range(2000))
    session.raw.send(request("POST", "/securityProfile", headers) + chunked + b"\r\n")
    resp = session.raw.read_response()
    assert resp.rsc == 4000 and resp.status in (400, 431), (resp.status, resp.headers)
    assert session.raw.closed_by_peer()
    session.assert_nothing_stored()


@pytest.mark.parametrize("encode,content_type,status,rsc", [
    (lambda t: t.encode("utf-16"), "application/json", 400, 4000),
    (lambda t: t.encode("utf-16-le"), "application/json", 400, 4000),
    (lambda t: b"\xef\xbb\xbf" + t.encode(), "application/json", 400, 4000),
    (lambda t: t.encode(), "application/json; charset=iso-8859-1", 415, 4015),
])
def test_json_bodies_must_be_utf8(session: EnroleeSession, encode, content_type: str, status: int,
                                  rsc: int) -> None:
    body = encode(session.sp_body().decode())
    headers = onem2m_headers(session.info.kpm_id, body, Content_Type=content_type)
    session.raw.send(request("POST", "/securityProfile", headers, body))
    check(session.raw.read_response(), status, rsc)
    session.assert_nothing_stored()


def test_json_charset_utf8_is_accepted(session: EnroleeSession) -> None:
    body = session.sp_body()
    headers = onem2m_headers(session.info.kpm_id, body, Content_Type="application/json; charset=UTF-8")
    session.raw.send(request("POST", "/securityProfile", headers, body))
    resp = session.raw.read_response()
    assert (resp.status, resp.rsc) == (201, 2001)
    assert resp.headers["x-m2m-ri"] == headers["X-M2M-RI"]


@pytest.mark.parametrize("ri", ["r" * 257, "with space", "caf\u00e9"])
def test_malformed_request_identifier_is_4000_and_not_echoed(session: EnroleeSession, ri: str) -> None:
    body = session.sp_body()
    session.raw.send(request("POST", "/securityProfile", onem2m_headers(session.info.kpm_id, body, X_M2M_RI=ri),
                             body))
    resp = session.raw.read_response()
    check(resp, 400, 4000)
    assert "x-m2m-ri" not in resp.headers
    session.assert_nothing_stored()


def test_requests_pipelined_after_a_protocol_error_are_not_processed(session: EnroleeSession) -> None:
    body = session.sp_body()
    good = request("POST", "/securityProfile", onem2m_headers(session.info.kpm_id, body), body)
    session.raw.send(b"POST /securityProfile HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n" + good)
    resp = session.raw.read_response()
    check(resp, 400, 4000)
    assert resp.headers.get("connection") == "close"
    assert session.raw.buf == b"" and session.raw.closed_by_peer(), "a second answer came after the error"
    session.assert_nothing_stored()


def test_pipelined_valid_requests_are_answered_in_order(session: EnroleeSession) -> None:
    body = session.sp_body()
    first = onem2m_headers(session.info.kpm_id, body)
    second = onem2m_headers(session.info.kpm_id, body)
    session.raw.send(request("PUT", "/securityProfile", first, body) +
                     request("POST", "/securityProfile", second, body))
    one, two = session.raw.read_response(), session.raw.read_response()
    assert (one.rsc, one.headers["x-m2m-ri"]) == (4005, first["X-M2M-RI"])
    assert (two.rsc, two.headers["x-m2m-ri"]) == (2001, second["X-M2M-RI"])
