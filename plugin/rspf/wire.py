"""oneM2M HTTP binding essentials (TS-0009 style), sans-I/O.

h11 frames requests and answers (rspf.httpserver, rspf.client); this module turns a framed request into an
:class:`HttpRequest` (:func:`request_from_h11`) and a oneM2M primitive (:func:`to_primitive`), and builds the
oneM2M answers (:func:`onem2m_response`, :func:`error_response`) that the server sends through h11.
Bounded: header block, header count and body sizes are limited, so a peer cannot make us buffer without end.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import RSC, BadRequest, OperationNotAllowed, RspfError, UnsupportedMediaType, VersionNotSupported

MAX_HEADER_BYTES = 16 * 1024
#: At most this many header fields in a request head, and as many trailer fields after a chunked body.
MAX_HEADER_FIELDS = 100
SUPPORTED_RVI = ("2a", "3", "4", "5")
#: Headers a request may carry once (a second copy makes it ambiguous: refused).
_SINGLE = ("content-length", "host", "x-m2m-origin", "x-m2m-ri", "x-m2m-rvi", "content-type")
_JSON_TYPES = ("application/json", "application/vnd.onem2m-res+json")
_BOMS = (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")
MAX_REQUEST_ID = 256  #: longest X-M2M-RI accepted (the MEF and the CSE's secure listener)
_RI = re.compile(rf"^[\x21-\x7e]{{1,{MAX_REQUEST_ID}}}$")
_DIGITS = re.compile(r"[0-9]{1,12}")

OPERATIONS = {"POST": "CREATE", "GET": "RETRIEVE", "PUT": "UPDATE", "DELETE": "DELETE"}


class PayloadTooLarge(BadRequest):
    """A request body over the configured limit (answered 413 / RSC 4000)."""


@dataclass
class HttpRequest:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes = b""

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass
class HttpResponse:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def json(self) -> Any:
        try:
            return json.loads(self.body) if self.body else None
        except RecursionError:
            raise ValueError("the JSON body is nested too deeply") from None

    @property
    def rsc(self) -> int | None:
        v = self.header("x-m2m-rsc")
        return int(v) if v and _DIGITS.fullmatch(v) else None


def _add_header(headers: dict[str, str], key: str, value: str) -> None:
    if key in headers:
        if key in _SINGLE:
            raise BadRequest(f"the header {key} appears twice")
        headers[key] += ", " + value
    else:
        headers[key] = value


def request_from_h11(method: bytes, target: bytes, fields: list[tuple[bytes, bytes]], body: bytes) -> HttpRequest:
    """An :class:`HttpRequest` from what h11 framed (names lower-case, values without surrounding blanks)."""
    headers: dict[str, str] = {}
    for name, value in fields:
        _add_header(headers, name.decode("ascii"), value.decode("latin-1"))
    return HttpRequest(method.decode("ascii"), target.decode("ascii"), headers, body)


# ---------------------------------------------------------------------------------------------
# oneM2M primitive view of an HTTP request


@dataclass
class Primitive:
    """The oneM2M request parameters the MEF needs."""

    operation: str
    to: str
    originator: str
    request_id: str
    rvi: str
    content: Any


def to_primitive(req: HttpRequest) -> Primitive:
    """Validate the oneM2M HTTP binding headers and decode a JSON body."""
    op = OPERATIONS.get(req.method)
    if op is None:
        raise OperationNotAllowed(f"the HTTP method {req.method[:16]!r} has no oneM2M operation; use GET, POST, "
                                  "PUT or DELETE")
    ri = req.header("x-m2m-ri")
    if not ri or not _RI.fullmatch(ri):
        raise BadRequest("the X-M2M-RI header (request identifier) is missing or malformed")
    rvi = req.header("x-m2m-rvi")
    if not rvi:
        raise VersionNotSupported("the X-M2M-RVI header (release version) is missing")
    if rvi not in SUPPORTED_RVI:
        raise VersionNotSupported(f"release version {rvi!r} is not supported; use one of {', '.join(SUPPORTED_RVI)}")
    origin = req.header("x-m2m-origin")
    if not origin or len(origin) > 256 or any(c.isspace() for c in origin):
        raise BadRequest("the X-M2M-Origin header (originator) is missing or malformed")
    content = json_body(req) if req.body else None
    return Primitive(op, req.path, origin, ri, rvi, content)


def json_body(req: HttpRequest) -> Any:
    """The request's JSON body: the media type must be JSON and the text UTF-8 (RFC 8259 §8.1), no BOM."""
    ctype, _, params = (req.header("content-type") or "").partition(";")
    if ctype.strip().lower() not in _JSON_TYPES:
        raise UnsupportedMediaType("the body must be JSON (Content-Type: application/json)")
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise UnsupportedMediaType("a JSON body is UTF-8; no other charset is accepted")
    if req.body.startswith(_BOMS):
        raise BadRequest("the JSON body starts with a byte order mark; send UTF-8 without one")
    try:
        return json.loads(req.body.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequest("the JSON body is not UTF-8 text") from None
    except ValueError:
        raise BadRequest("the body is not valid JSON") from None
    except RecursionError:
        raise BadRequest("the JSON body is nested too deeply") from None


def onem2m_response(rsc: RSC, content: Any = None, *, request_id: str | None = None, rvi: str | None = None,
                    close: bool = False, http_status: int | None = None) -> HttpResponse:
    headers = {"x-m2m-rsc": str(int(rsc))}
    if request_id and _RI.fullmatch(request_id):  # never echo a raw, unvalidated value (header injection)
        headers["x-m2m-ri"] = request_id
    if rvi and rvi in SUPPORTED_RVI:
        headers["x-m2m-rvi"] = rvi
    body = b""
    if content is not None:
        body = json.dumps(content, separators=(",", ":")).encode()
        headers["content-type"] = "application/json"
    if close:
        headers["connection"] = "close"
    return HttpResponse(http_status or rsc.http_status, headers, body)


class HttpVersionNotSupported(BadRequest):
    """A request line naming an HTTP version other than 1.0 or 1.1 (answered 505 / RSC 4000)."""


class HeaderTooLarge(BadRequest):
    """A request head (or trailer) over the size or field-count limit (answered 431 / RSC 4000)."""


_ERROR_STATUS: dict[type[RspfError], int] = {PayloadTooLarge: 413, HttpVersionNotSupported: 505,
                                             HeaderTooLarge: 431}


def error_response(exc: RspfError, *, request_id: str | None = None, rvi: str | None = None,
                   close: bool = False) -> HttpResponse:
    status = _ERROR_STATUS.get(type(exc))
    return onem2m_response(exc.rsc, {"m2m:dbg": str(exc)}, request_id=request_id, rvi=rvi, close=close,
                           http_status=status)
