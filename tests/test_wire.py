"""rspf.wire: requests from h11's fields, the oneM2M primitive view, oneM2M answers."""

from __future__ import annotations

import json

import h11
import pytest

from rspf import wire
from rspf.errors import RSC, BadRequest, NotFound, OperationNotAllowed, UnsupportedMediaType, VersionNotSupported


def parse_with_h11(data: bytes) -> wire.HttpRequest:
    """Frame bytes the way the server does (h11, sans-I/O) and build the HttpRequest."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    head = conn.next_event()
    assert isinstance(head, h11.Request)
    body = b""
    while not isinstance(event := conn.next_event(), h11.EndOfMessage):
        assert isinstance(event, h11.Data)
        body += event.data
    return wire.request_from_h11(head.method, head.target, list(head.headers), body)


# HTTP framing is h11's; the server's framing tests (limits, malformed heads, chunked bodies, pipelining) are in
# tests/test_httpserver.py. Here: building the request from h11's fields.


@pytest.mark.parametrize("name", ["X-M2M-RI", "x-m2m-ri", "X-M2M-Origin", "X-M2M-RVI", "Content-Type"])
def test_duplicate_critical_header_is_refused(name):
    with pytest.raises(BadRequest, match="twice"):
        wire.request_from_h11(b"POST", b"/", [(name.lower().encode(), b"a"), (name.lower().encode(), b"b")], b"")


def test_repeated_ordinary_header_is_joined():
    req = wire.request_from_h11(b"GET", b"/x?y", [(b"accept", b"application/json"), (b"accept", b"text/plain")],
                                b"")
    assert (req.method, req.target, req.path) == ("GET", "/x?y", "/x")
    assert req.header("Accept") == "application/json, text/plain"


# ---------------------------------------------------------------------------------------------
# to_primitive


def request(headers: dict[str, str] | None = None, body: bytes = b"", method: str = "POST",
            target: str = "/securityProfile") -> wire.HttpRequest:
    h = {"x-m2m-origin": "/id-in", "x-m2m-ri": "ri-1", "x-m2m-rvi": "3", "content-type": "application/json"}
    for k, v in (headers or {}).items():
        if v is None:
            h.pop(k, None)
        else:
            h[k] = v
    return wire.HttpRequest(method, target, h, body)


@pytest.mark.parametrize("method, op", [("POST", "CREATE"), ("GET", "RETRIEVE"), ("PUT", "UPDATE"),
                                        ("DELETE", "DELETE")])
def test_primitive_operations(method, op):
    prim = wire.to_primitive(request(method=method, target="/x?y=1"))
    assert (prim.operation, prim.to, prim.originator, prim.request_id, prim.rvi, prim.content) == \
        (op, "/x", "/id-in", "ri-1", "3", None)


def test_primitive_decodes_json_body():
    prim = wire.to_primitive(request(body=b'{"rspf:spReq":{"nodeID":"n"}}'))
    assert prim.content == {"rspf:spReq": {"nodeID": "n"}}


@pytest.mark.parametrize("ctype", ["application/json; charset=utf-8", "application/vnd.onem2m-res+json;ty=2",
                                   "Application/JSON"])
def test_primitive_accepts_json_content_types(ctype):
    assert wire.to_primitive(request({"content-type": ctype}, b"[1]")).content == [1]


@pytest.mark.parametrize("method", ["PATCH", "get", "OPTIONS"])
def test_primitive_other_methods_are_4005(method):
    with pytest.raises(OperationNotAllowed) as info:
        wire.to_primitive(request(method=method))
    assert info.value.rsc == 4005 and info.value.rsc.http_status == 405


@pytest.mark.parametrize("ri", [None, "", "has space", "x" * 257, "caf\xe9"])
def test_missing_or_malformed_ri_is_bad_request_4000(ri):
    with pytest.raises(BadRequest) as info:
        wire.to_primitive(request({"x-m2m-ri": ri}))
    assert info.value.rsc == 4000
    assert "X-M2M-RI" in str(info.value)


@pytest.mark.parametrize("rvi", [None, "", "1", "2", "6", "3 "])
def test_missing_or_unsupported_rvi_is_4001(rvi):
    with pytest.raises(VersionNotSupported) as info:
        wire.to_primitive(request({"x-m2m-rvi": rvi}))
    assert info.value.rsc == 4001


@pytest.mark.parametrize("rvi", wire.SUPPORTED_RVI)
def test_supported_rvi(rvi):
    assert wire.to_primitive(request({"x-m2m-rvi": rvi})).rvi == rvi


@pytest.mark.parametrize("origin", [None, "", "has space", "x" * 257, "tab\there"])
def test_missing_or_malformed_origin(origin):
    with pytest.raises(BadRequest) as info:
        wire.to_primitive(request({"x-m2m-origin": origin}))
    assert info.value.rsc == 4000
    assert "X-M2M-Origin" in str(info.value)


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe", b"{'a': 1}"])
def test_non_json_body_is_bad_request(body):
    with pytest.raises(BadRequest) as info:
        wire.to_primitive(request(body=body))
    assert info.value.rsc == 4000


@pytest.mark.parametrize("body", ['{"a":"\u00e9"}'.encode("utf-16"), '{"a":1}'.encode("utf-16-le"),
                                  '{"a":1}'.encode("utf-32"), b"\xef\xbb\xbf{}", b'{"a":"\xe9"}'])
def test_json_body_must_be_utf8_without_bom(body):
    with pytest.raises(BadRequest) as info:
        wire.to_primitive(request(body=body))
    assert info.value.rsc == 4000


@pytest.mark.parametrize("ctype", ["application/json; charset=iso-8859-1", "application/json;charset=utf-16"])
def test_json_with_another_charset_is_4015(ctype):
    with pytest.raises(UnsupportedMediaType):
        wire.to_primitive(request({"content-type": ctype}, b"{}"))


def test_json_utf8_text_is_decoded():
    assert wire.to_primitive(request({"content-type": "application/json; charset=\"UTF-8\""},
                                     '{"a":"é"}'.encode())).content == {"a": "é"}


def test_deeply_nested_json_is_bad_request():
    with pytest.raises(BadRequest):
        wire.to_primitive(request(body=b"[" * 60_000))


@pytest.mark.parametrize("ctype", [None, "text/plain", "application/xml", "application/jsonx"])
def test_wrong_content_type_is_4015(ctype):
    with pytest.raises(UnsupportedMediaType) as info:
        wire.to_primitive(request({"content-type": ctype}, b'{"a":1}'))
    assert info.value.rsc == 4015


def test_content_type_is_irrelevant_without_body():
    assert wire.to_primitive(request({"content-type": "text/plain"})).content is None


# ---------------------------------------------------------------------------------------------
# oneM2M answers (the server sends them through h11: tests/test_httpserver.py)


def test_onem2m_response_headers_and_body():
    resp = wire.onem2m_response(RSC.CREATED, {"rspf:secp": {"version": 1}}, request_id="ri-9", rvi="4", close=True)
    assert resp.status == 201
    assert resp.headers == {"x-m2m-rsc": "2001", "x-m2m-ri": "ri-9", "x-m2m-rvi": "4",
                            "content-type": "application/json", "connection": "close"}
    assert resp.json() == {"rspf:secp": {"version": 1}}


@pytest.mark.parametrize("ri, rvi", [("a\r\nX-Injected: 1", "3\r\nX: y"), ("x" * 257, "9"), ("", "")])
def test_onem2m_response_never_echoes_a_malformed_ri_or_rvi(ri, rvi):
    resp = wire.onem2m_response(RSC.OK, request_id=ri, rvi=rvi)
    assert resp.headers == {"x-m2m-rsc": "2000"}
    assert resp.body == b"" and resp.json() is None


def test_error_response_413_for_payload_too_large():
    resp = wire.error_response(wire.PayloadTooLarge("too big"), request_id="r1", close=True)
    assert resp.status == 413
    assert resp.header("x-m2m-rsc") == "4000"
    assert resp.header("connection") == "close"
    assert resp.json() == {"m2m:dbg": "too big"}


@pytest.mark.parametrize("exc, status, rsc", [(BadRequest("b"), 400, "4000"), (NotFound("n"), 404, "4004"),
                                              (UnsupportedMediaType("u"), 415, "4015"),
                                              (VersionNotSupported("v"), 400, "4001")])
def test_error_response_status_and_rsc(exc, status, rsc):
    resp = wire.error_response(exc, request_id="r2", rvi="3")
    assert (resp.status, resp.header("x-m2m-rsc"), resp.header("x-m2m-ri"), resp.header("x-m2m-rvi")) == \
        (status, rsc, "r2", "3")
    assert resp.header("connection") is None
    assert json.loads(resp.body) == {"m2m:dbg": str(exc)}
