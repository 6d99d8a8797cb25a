"""rspf.wire: the bounded HTTP/1.1 parser, the oneM2M primitive view and response rendering."""

from __future__ import annotations

import io
import json

import pytest

from rspf import wire
from rspf.errors import RSC, BadRequest, NotFound, UnsupportedMediaType, VersionNotSupported

GOOD_HEADERS = (
    b"Host: mef.example.com\r\n"
    b"X-M2M-Origin: /id-in\r\n"
    b"X-M2M-RI: req-0001\r\n"
    b"X-M2M-RVI: 3\r\n"
    b"Content-Type: application/json\r\n"
)


def raw_request(body: bytes = b'{"rspf:spReq":{"nodeID":"n1"}}', *, method: bytes = b"POST",
                target: bytes = b"/securityProfile", extra: bytes = b"", headers: bytes = GOOD_HEADERS,
                content_length: bool = True) -> bytes:
    head = method + b" " + target + b" HTTP/1.1\r\n" + headers + extra
    if content_length:
        head += b"Content-Length: " + str(len(body)).encode() + b"\r\n"
    return head + b"\r\n" + body


def parse(data: bytes, max_body: int = wire.DEFAULT_MAX_BODY) -> wire.HttpRequest | None:
    return wire.read_request(io.BytesIO(data), max_body)


class CountingReader(io.BytesIO):
    """BytesIO that counts how many body bytes the parser pulled with read()."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.read_bytes = 0

    def read(self, n: int | None = -1) -> bytes:
        data = super().read(n)
        self.read_bytes += len(data)
        return data


# ---------------------------------------------------------------------------------------------
# read_request


def test_good_request_is_parsed():
    body = b'{"rspf:spReq":{"nodeID":"n1"}}'
    req = parse(raw_request(body, target=b"/securityProfile?x=1"))
    assert req is not None
    assert req.method == "POST"
    assert req.target == "/securityProfile?x=1"
    assert req.path == "/securityProfile"
    assert req.body == body
    # header names are case-insensitive
    assert req.header("X-M2M-RI") == "req-0001"
    assert req.header("x-m2m-origin") == "/id-in"
    assert req.header("content-length") == str(len(body))
    assert req.keep_alive is True


def test_lower_case_method_is_normalised_and_get_without_body():
    req = parse(b"get /fetchCredentials/a/22 HTTP/1.1\r\nX-M2M-RI: 1\r\n\r\n")
    assert req.method == "GET"
    assert req.body == b""


@pytest.mark.parametrize("value, keep", [(None, True), (b"keep-alive", True), (b"close", False),
                                         (b"Close", False), (b"CLOSE", False)])
def test_keep_alive_and_close(value, keep):
    extra = b"" if value is None else b"Connection: " + value + b"\r\n"
    assert parse(raw_request(extra=extra)).keep_alive is keep


def test_keep_alive_stream_carries_several_requests_then_clean_eof():
    stream = io.BytesIO(raw_request(b'{"a":1}') + b"\r\n" + raw_request(b'{"b":2}', target=b"/enrolmentExchange"))
    first = wire.read_request(stream)
    second = wire.read_request(stream)
    assert (first.path, first.body) == ("/securityProfile", b'{"a":1}')
    assert (second.path, second.body) == ("/enrolmentExchange", b'{"b":2}')
    assert wire.read_request(stream) is None  # clean EOF between messages


def test_eof_inside_the_header_block_is_bad_request():
    with pytest.raises(BadRequest):
        parse(b"POST / HTTP/1.1\r\nHost: x\r\n")


def test_eof_inside_a_header_line_is_not_reported_as_too_long():
    with pytest.raises(BadRequest) as info:
        parse(b"POST / HTTP/1.1\r\nHost: x")
    assert "longer than" not in str(info.value)


@pytest.mark.parametrize("line", [b"POST /\r\n", b"POST / HTTP/2\r\n", b"POST  / HTTP/1.1\r\n",
                                  b"PO ST / HTTP/1.1 x\r\n", b"P(ST / HTTP/1.1\r\n"])
def test_malformed_request_line(line):
    with pytest.raises(BadRequest):
        parse(line + b"\r\n")


@pytest.mark.parametrize("header", [b"No colon here\r\n", b"Bad Name: x\r\n", b": empty-name\r\n"])
def test_malformed_header_line(header):
    with pytest.raises(BadRequest):
        parse(raw_request(extra=header))


def test_header_line_too_long():
    long = b"X-Pad: " + b"a" * (wire.MAX_HEADER_BYTES + 10) + b"\r\n"
    with pytest.raises(BadRequest, match="longer than"):
        parse(raw_request(extra=long))


def test_header_block_too_long_in_total():
    many = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 100) for i in range(200))  # ~22 KiB of short lines
    assert all(len(line) < 200 for line in many.split(b"\r\n"))
    with pytest.raises(BadRequest, match="longer than"):
        parse(raw_request(extra=many))


def test_header_block_limit_boundary():
    base = raw_request(b"")  # request line + headers + blank line, no body
    pad = wire.MAX_HEADER_BYTES - len(base) - len(b"X-P: \r\n")
    req = parse(raw_request(b"", extra=b"X-P: " + b"a" * pad + b"\r\n"))  # exactly MAX_HEADER_BYTES
    assert len(req.header("x-p")) == pad
    with pytest.raises(BadRequest, match="longer than"):
        parse(raw_request(b"", extra=b"X-P: " + b"a" * (pad + 1) + b"\r\n"))


@pytest.mark.parametrize("name", [b"X-M2M-RI", b"x-m2m-ri", b"X-M2M-Origin", b"X-M2M-RVI", b"Content-Length",
                                  b"Host"])
def test_duplicate_critical_header_is_refused(name):
    with pytest.raises(BadRequest, match="twice"):
        parse(raw_request(extra=name + b": again\r\n"))


def test_repeated_ordinary_header_is_joined():
    req = parse(raw_request(extra=b"Accept: application/json\r\nAccept: text/plain\r\n"))
    assert req.header("accept") == "application/json, text/plain"


def test_body_over_max_is_payload_too_large_and_not_read():
    body = b"x" * 2000
    data = raw_request(body)
    reader = CountingReader(data)
    with pytest.raises(wire.PayloadTooLarge) as info:
        wire.read_request(reader, max_body=1024)
    assert isinstance(info.value, BadRequest)
    assert info.value.rsc is RSC.BAD_REQUEST
    assert reader.read_bytes == 0  # refused before the body is read


def test_body_limit_boundary():
    req = parse(raw_request(b"y" * 1024), max_body=1024)
    assert req.body == b"y" * 1024
    with pytest.raises(wire.PayloadTooLarge):
        parse(raw_request(b"y" * 1025), max_body=1024)
    assert parse(raw_request(b"y" * 100_000, ), max_body=100_000).body == b"y" * 100_000
    with pytest.raises(wire.PayloadTooLarge):
        parse(raw_request(b"y" * (wire.DEFAULT_MAX_BODY + 1)))


@pytest.mark.parametrize("value", [b"abc", b"-1", b"1e3", b"0x10", b"", b"12 34"])
def test_bad_content_length(value):
    data = b"POST / HTTP/1.1\r\nContent-Length: " + value + b"\r\n\r\n" + b"a" * 20
    with pytest.raises(BadRequest):
        parse(data)


def test_unicode_digit_content_length_is_bad_request():
    with pytest.raises(BadRequest):
        parse(b"POST / HTTP/1.1\r\nContent-Length: \xb2\r\n\r\nab")


def test_truncated_body():
    data = raw_request(b'{"a":1}')[:-3]
    with pytest.raises(BadRequest, match="closed before"):
        parse(data)


def test_chunked_body_and_trailer_are_consumed():
    chunked = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nX-Trailer: y\r\n\r\n"
    stream = io.BytesIO(raw_request(chunked, extra=b"Transfer-Encoding: chunked\r\n", content_length=False)
                        + raw_request(b'{"n":2}'))
    req = wire.read_request(stream)
    assert req.body == b"Wikipedia"
    nxt = wire.read_request(stream)  # the trailer did not leak into the next request
    assert nxt.body == b'{"n":2}'


def test_chunked_over_max_is_payload_too_large():
    chunks = b"".join(b"200\r\n" + b"z" * 0x200 + b"\r\n" for _ in range(4)) + b"0\r\n\r\n"
    with pytest.raises(wire.PayloadTooLarge):
        parse(raw_request(chunks, extra=b"Transfer-Encoding: chunked\r\n", content_length=False), max_body=1024)


def test_single_chunk_over_max_is_refused_before_it_is_read():
    data = raw_request(b"800\r\n" + b"z" * 0x800 + b"\r\n0\r\n\r\n", extra=b"Transfer-Encoding: chunked\r\n",
                       content_length=False)
    reader = CountingReader(data)
    with pytest.raises(wire.PayloadTooLarge):
        wire.read_request(reader, max_body=1024)
    assert reader.read_bytes == 0
    assert parse(raw_request(b"400\r\n" + b"z" * 0x400 + b"\r\n0\r\n\r\n", extra=b"Transfer-Encoding: chunked\r\n",
                             content_length=False), max_body=1024).body == b"z" * 1024


@pytest.mark.parametrize("chunks", [b"zz\r\nabc\r\n0\r\n\r\n", b"", b"10\r\nshort"])
def test_malformed_or_truncated_chunks(chunks):
    with pytest.raises(BadRequest):
        parse(raw_request(chunks, extra=b"Transfer-Encoding: chunked\r\n", content_length=False))


def test_unknown_transfer_coding_is_refused():
    with pytest.raises(BadRequest, match="chunked"):
        parse(raw_request(b"abc", extra=b"Transfer-Encoding: gzip\r\n", content_length=False))


def test_negative_chunk_size_never_reads_past_the_limit():
    data = raw_request(b"-1\r\n" + b"x" * 200_000, extra=b"Transfer-Encoding: chunked\r\n", content_length=False)
    reader = CountingReader(data)
    with pytest.raises(BadRequest):
        wire.read_request(reader, max_body=1024)
    assert reader.read_bytes <= 1024


@pytest.mark.parametrize("size", [b"0x4", b"+4"])
def test_non_hex_chunk_size_is_refused(size):
    with pytest.raises(BadRequest):
        parse(raw_request(size + b"\r\nabcd\r\n0\r\n\r\n", extra=b"Transfer-Encoding: chunked\r\n",
                          content_length=False))


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


def test_primitive_unknown_method():
    with pytest.raises(BadRequest):
        wire.to_primitive(request(method="PATCH"))


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
# rendering


def test_render_response_round_trip():
    resp = wire.onem2m_response(RSC.CREATED, {"rspf:secp": {"version": 1}}, request_id="ri-9", rvi="4", close=True)
    data = wire.render_response(resp)
    assert data.startswith(b"HTTP/1.1 201 Created\r\n")
    assert b"\r\nX-M2M-RSC: 2001\r\n" in data
    assert b"\r\nX-M2M-RI: ri-9\r\n" in data
    back = wire.read_response(io.BytesIO(data))
    assert back.status == 201
    assert back.rsc == 2001
    assert back.header("x-m2m-ri") == "ri-9"
    assert back.header("x-m2m-rvi") == "4"
    assert back.header("connection") == "close"
    assert back.header("content-type") == "application/json"
    assert back.json() == {"rspf:secp": {"version": 1}}
    assert int(back.header("content-length")) == len(back.body)


def test_render_response_without_body_and_stale_length():
    resp = wire.HttpResponse(200, {"x-m2m-rsc": "2000", "content-length": "999"})
    back = wire.read_response(io.BytesIO(wire.render_response(resp) + b"next"))
    assert back.body == b""  # content-length is recomputed, the stale 999 is not sent
    assert back.json() is None


def test_render_request_round_trip():
    req = wire.HttpRequest("POST", "/enrolmentExchange", {"x-m2m-ri": "a", "x-m2m-rvi": "3",
                                                          "x-m2m-origin": "dev1", "content-type": "application/json"},
                           b'{"x":1}')
    back = wire.read_request(io.BytesIO(wire.render_request(req)))
    assert (back.method, back.target, back.body) == ("POST", "/enrolmentExchange", b'{"x":1}')
    assert wire.to_primitive(back).content == {"x": 1}


def test_read_response_without_length_reads_to_eof_bounded():
    assert wire.read_response(io.BytesIO(b"HTTP/1.1 200 OK\r\n\r\nabc")).body == b"abc"
    with pytest.raises(ConnectionError):
        wire.read_response(io.BytesIO(b"HTTP/1.1 200 OK\r\n\r\n" + b"a" * 20), max_body=10)


@pytest.mark.parametrize("data", [b"", b"garbage\r\n\r\n", b"HTTP/1.1 abc OK\r\n\r\n"])
def test_read_response_malformed(data):
    with pytest.raises(ConnectionError):
        wire.read_response(io.BytesIO(data))


def test_error_response_413_for_payload_too_large():
    resp = wire.error_response(wire.PayloadTooLarge("too big"), request_id="r1", close=True)
    assert resp.status == 413
    assert resp.header("x-m2m-rsc") == "4000"
    assert resp.header("connection") == "close"
    data = wire.render_response(resp)
    assert data.startswith(b"HTTP/1.1 413 Payload Too Large\r\n")
    assert b"\r\nX-M2M-RSC: 4000\r\n" in data
    assert wire.read_response(io.BytesIO(data)).json() == {"m2m:dbg": "too big"}


@pytest.mark.parametrize("exc, status, rsc", [(BadRequest("b"), 400, "4000"), (NotFound("n"), 404, "4004"),
                                              (UnsupportedMediaType("u"), 415, "4015"),
                                              (VersionNotSupported("v"), 400, "4001")])
def test_error_response_status_and_rsc(exc, status, rsc):
    resp = wire.error_response(exc, request_id="r2", rvi="3")
    assert (resp.status, resp.header("x-m2m-rsc"), resp.header("x-m2m-ri"), resp.header("x-m2m-rvi")) == \
        (status, rsc, "r2", "3")
    assert resp.header("connection") is None
    assert json.loads(resp.body) == {"m2m:dbg": str(exc)}
