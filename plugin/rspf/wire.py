"""oneM2M HTTP binding essentials (TS-0009 style), sans-I/O.

Parses HTTP/1.1 requests and responses from a buffered reader and renders them to bytes. Bounded:
header block and body sizes are limited, so a peer cannot make us buffer without end.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from .errors import RSC, BadRequest, RspfError, UnsupportedMediaType, VersionNotSupported

MAX_HEADER_BYTES = 16 * 1024
DEFAULT_MAX_BODY = 64 * 1024
SUPPORTED_RVI = ("2a", "3", "4", "5")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_RI = re.compile(r"^[\x21-\x7e]{1,256}$")
_DIGITS = re.compile(r"[0-9]{1,12}")
_HEX = re.compile(r"[0-9A-Fa-f]{1,8}")

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

    @property
    def keep_alive(self) -> bool:
        return (self.header("connection") or "").lower() != "close"


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


def _read_head(reader: BinaryIO) -> list[bytes] | None:
    lines: list[bytes] = []
    total = 0
    while True:
        line = reader.readline(MAX_HEADER_BYTES + 1)
        if not line:
            if not lines:
                return None  # clean EOF between messages
            raise BadRequest("the connection closed in the middle of an HTTP header")
        total += len(line)
        if total > MAX_HEADER_BYTES:
            raise BadRequest(f"the HTTP header block is longer than {MAX_HEADER_BYTES} bytes")
        if not line.endswith(b"\n"):
            raise BadRequest("the connection closed in the middle of an HTTP header line")
        line = line.rstrip(b"\r\n")
        if not line:
            if not lines:
                continue  # tolerate stray CRLF before a request line (RFC 9112 §2.2)
            return lines
        lines.append(line)


def _parse_headers(lines: list[bytes]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for raw in lines:
        try:
            text = raw.decode("latin-1")
        except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes everything
            raise BadRequest("an HTTP header is not text") from None
        name, sep, value = text.partition(":")
        if not sep or not _TOKEN.fullmatch(name):
            raise BadRequest("a malformed HTTP header line")
        key = name.lower()
        value = value.strip()
        if key in headers:
            if key in ("content-length", "host", "x-m2m-origin", "x-m2m-ri", "x-m2m-rvi"):
                raise BadRequest(f"the header {name} appears twice")
            headers[key] += ", " + value
        else:
            headers[key] = value
    return headers


def _read_body(reader: BinaryIO, headers: dict[str, str], max_body: int) -> bytes:
    if "transfer-encoding" in headers:
        if headers["transfer-encoding"].lower() != "chunked":
            raise BadRequest("only the chunked transfer coding is understood")
        return _read_chunked(reader, max_body)
    cl = headers.get("content-length")
    if cl is None:
        return b""
    if not _DIGITS.fullmatch(cl):
        raise BadRequest("Content-Length is not a number")
    n = int(cl)
    if n > max_body:
        raise PayloadTooLarge(f"the request body is {n} bytes; this server accepts at most {max_body}")
    body = reader.read(n) if n else b""
    if len(body) != n:
        raise BadRequest("the connection closed before the whole body arrived")
    return body


def _read_chunked(reader: BinaryIO, max_body: int) -> bytes:
    out = bytearray()
    while True:
        line = reader.readline(1024)
        size_txt = line.split(b";", 1)[0].strip().decode("latin-1")
        if not _HEX.fullmatch(size_txt):
            raise BadRequest("a malformed chunk size")
        size = int(size_txt, 16)
        if size == 0:
            while reader.readline(MAX_HEADER_BYTES).strip():
                pass
            return bytes(out)
        if len(out) + size > max_body:
            raise PayloadTooLarge(f"the body is longer than {max_body} bytes")
        chunk = reader.read(size)
        if len(chunk) != size:
            raise BadRequest("the connection closed inside a chunk")
        out += chunk
        reader.readline(16)


def read_request(reader: BinaryIO, max_body: int = DEFAULT_MAX_BODY) -> HttpRequest | None:
    """Read one request; None on a clean EOF. Raises BadRequest / PayloadTooLarge on bad input."""
    lines = _read_head(reader)
    if lines is None:
        return None
    parts = lines[0].decode("latin-1").split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not _TOKEN.fullmatch(parts[0]):
        raise BadRequest("a malformed HTTP request line")
    headers = _parse_headers(lines[1:])
    body = _read_body(reader, headers, max_body)
    return HttpRequest(parts[0].upper(), parts[1], headers, body)


def read_response(reader: BinaryIO, max_body: int = 4 * 1024 * 1024) -> HttpResponse:
    lines = _read_head(reader)
    if lines is None:
        raise ConnectionError("the server closed the connection without an answer")
    parts = lines[0].decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not re.fullmatch(r"[0-9]{3}", parts[1]):
        raise ConnectionError("the server sent a malformed HTTP status line")
    headers = _parse_headers(lines[1:])
    if "content-length" not in headers and "transfer-encoding" not in headers:
        body = reader.read(max_body + 1)  # body delimited by close
        if len(body) > max_body:
            raise ConnectionError("the response body is too large")
    else:
        body = _read_body(reader, headers, max_body)
    return HttpResponse(int(parts[1]), headers, body)


_REASONS = {200: "OK", 201: "Created", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large",
            415: "Unsupported Media Type", 500: "Internal Server Error", 501: "Not Implemented"}


def _safe_header(value: str) -> bool:
    return not any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)


def render_response(resp: HttpResponse) -> bytes:
    head = [f"HTTP/1.1 {resp.status} {_REASONS.get(resp.status, 'Status')}"]
    hdrs = dict(resp.headers)
    hdrs["content-length"] = str(len(resp.body))
    for k, v in hdrs.items():
        if _safe_header(str(v)):  # a control character would split the header block: drop the header
            head.append(f"{_canon(k)}: {v}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + resp.body


def render_request(req: HttpRequest) -> bytes:
    head = [f"{req.method} {req.target} HTTP/1.1"]
    hdrs = dict(req.headers)
    if req.body or req.method in ("POST", "PUT"):
        hdrs["content-length"] = str(len(req.body))
    for k, v in hdrs.items():
        head.append(f"{_canon(k)}: {v}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + req.body


def _canon(name: str) -> str:
    if name.lower().startswith("x-m2m-"):
        return "X-M2M-" + name[6:].upper()
    return "-".join(p.capitalize() for p in name.split("-"))


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
        raise BadRequest(f"the HTTP method {req.method} has no oneM2M operation")
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
    content: Any = None
    if req.body:
        ctype = (req.header("content-type") or "").split(";", 1)[0].strip().lower()
        if ctype not in ("application/json", "application/vnd.onem2m-res+json"):
            raise UnsupportedMediaType("the body must be JSON (Content-Type: application/json)")
        try:
            content = json.loads(req.body)
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("the body is not valid JSON") from None
        except RecursionError:
            raise BadRequest("the JSON body is nested too deeply") from None
    return Primitive(op, req.path, origin, ri, rvi, content)


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


def error_response(exc: RspfError, *, request_id: str | None = None, rvi: str | None = None,
                   close: bool = False) -> HttpResponse:
    status = 413 if isinstance(exc, PayloadTooLarge) else None
    return onem2m_response(exc.rsc, {"m2m:dbg": str(exc)}, request_id=request_id, rvi=rvi, close=close,
                           http_status=status)
