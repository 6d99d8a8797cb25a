"""The one HTTP/1.1 client of the project: oneM2M requests over one TLS connection (keep-alive), framed by h11.

Every way the network can fail (connection refused or reset, end of stream, a deadline passing, a malformed
response, TLS failure) surfaces as :class:`rspf.errors.TransportError` with a message naming the peer; a oneM2M
error answer surfaces as :class:`rspf.errors.RemoteError`. Each exchange has a whole-response deadline: a
server that trickles or stops in the middle of its answer cannot hold the client longer than that.
"""

from __future__ import annotations

import itertools
import json
import secrets
import time
from collections.abc import Iterable
from typing import Any

import h11

from .errors import BadRequest, RemoteError, TransportError
from .mef import protocol
from .tls import TlsConnection
from .wire import HttpResponse

#: Seconds one request/response exchange may take, from sending the first byte to reading the last.
DEFAULT_DEADLINE = 15.0
MAX_RESPONSE_HEADER = 16 * 1024
MAX_RESPONSE_BODY = 4 * 1024 * 1024

_counter = itertools.count(1)


class OneM2MClient:
    """Requests on one established connection. After an exchange the connection is kept for the next one when
    both sides allow it (:attr:`reusable`); :attr:`last_used` (monotonic seconds) tells a pool how long it
    has been idle."""

    def __init__(self, tls: TlsConnection, originator: str, *, host: str = "localhost", rvi: str = "3",
                 deadline: float = DEFAULT_DEADLINE) -> None:
        self.tls = tls
        self.originator = originator
        self.host = host
        self.rvi = rvi
        self.deadline = deadline
        self.last_used = time.monotonic()
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEADER)
        self._prefix = secrets.token_hex(4)
        self._broken = False

    @property
    def reusable(self) -> bool:
        return not self._broken and self._h11.our_state is h11.IDLE and self._h11.their_state is h11.IDLE

    def exchange(self, method: str, target: str, headers: dict[str, str], body: bytes = b"") -> HttpResponse:
        """Send one HTTP request (``headers`` by lower-case name; Host defaults to :attr:`host`) and read the
        whole response within :attr:`deadline` seconds."""
        if not self.reusable:
            raise TransportError(f"the connection to {self.tls.peer} cannot carry another request")
        hdrs = {k.lower(): v for k, v in headers.items()}
        hdrs.setdefault("host", self.host)
        hdrs.pop("transfer-encoding", None)
        hdrs.pop("content-length", None)
        if body or method in ("POST", "PUT"):
            hdrs["content-length"] = str(len(body))
        until = time.monotonic() + self.deadline
        try:
            try:
                out = self._h11.send(h11.Request(method=method, target=target, headers=list(hdrs.items())))
                out += self._h11.send(h11.Data(data=body)) if body else b""
                out += self._h11.send(h11.EndOfMessage())
            except h11.LocalProtocolError as exc:
                raise BadRequest(f"cannot send this HTTP request: {exc}") from None
            self._send(out, until)
            resp = self._receive(until)
        except BaseException:
            self._broken = True
            raise
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
        self.last_used = time.monotonic()
        return resp

    def _remaining(self, until: float) -> float:
        left = until - time.monotonic()
        if left <= 0:
            raise TransportError(f"{self.tls.peer} did not answer within {self.deadline:g} s")
        return left

    def _send(self, data: bytes, until: float) -> None:
        self.tls.set_timeout(self._remaining(until))
        try:
            self.tls.sendall(data)
        except TimeoutError:
            raise TransportError(f"{self.tls.peer} did not accept the request within {self.deadline:g} s") from None
        except OSError as exc:
            raise TransportError(f"the connection to {self.tls.peer} failed while sending: {_why(exc)}") from None

    def _recv(self, until: float) -> bytes:
        self.tls.set_timeout(self._remaining(until))
        try:
            return self.tls.recv(65536)
        except TimeoutError:
            raise TransportError(f"{self.tls.peer} did not answer within {self.deadline:g} s") from None
        except OSError as exc:
            raise TransportError(f"the connection to {self.tls.peer} failed while reading: {_why(exc)}") from None

    def _receive(self, until: float) -> HttpResponse:
        head: h11.Response | None = None
        body = bytearray()
        received = False
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise TransportError(f"{self.tls.peer} sent a malformed HTTP response: {exc}") from None
            if event is h11.NEED_DATA:
                data = self._recv(until)
                if not data and not received:
                    raise TransportError(f"{self.tls.peer} closed the connection without an answer")
                received = received or bool(data)
                self._h11.receive_data(data)
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_RESPONSE_BODY:
                    raise TransportError(f"{self.tls.peer} sent a response body over {MAX_RESPONSE_BODY} bytes")
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return HttpResponse(head.status_code, _header_dict(head.headers), bytes(body))
            elif isinstance(event, h11.ConnectionClosed):
                raise TransportError(f"{self.tls.peer} closed the connection without an answer")
            # h11.InformationalResponse (1xx): wait for the final answer

    def request(self, method: str, path: str, content: Any = None, *, ty: int | None = None,
                headers: dict[str, str] | None = None) -> HttpResponse:
        """One oneM2M request (the binding's X-M2M-* headers, JSON content) and its HTTP response."""
        hdrs = {
            "x-m2m-origin": self.originator,
            "x-m2m-ri": f"{self._prefix}-{next(_counter)}",
            "x-m2m-rvi": self.rvi,
            "accept": "application/json",
        }
        body = b""
        if content is not None:
            body = json.dumps(content, separators=(",", ":")).encode()
            hdrs["content-type"] = "application/json" + (f";ty={ty}" if ty is not None else "")
        hdrs.update({k.lower(): v for k, v in (headers or {}).items()})
        return self.exchange(method, path, hdrs, body)

    def call(self, method: str, path: str, content: Any = None, *, ty: int | None = None,
             expect: tuple[int, ...] = (2000, 2001, 2002, 2004)) -> Any:
        """Request and return the JSON content; a oneM2M error becomes RemoteError (RSC + the peer's text)."""
        resp = self.request(method, path, content, ty=ty)
        rsc = resp.rsc
        data = None
        try:
            data = resp.json()
        except ValueError:
            pass
        if rsc not in expect:
            raise RemoteError(rsc or 5000, protocol.error_text(data) or f"HTTP {resp.status} without a oneM2M status")
        return data

    def close(self) -> None:
        self._broken = True
        self.tls.close()


def _header_dict(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in raw:
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__
