"""Reading one raw HTTP/1.1 response in tests, with h11 (the tests send hand-made, even malformed, requests
and read exactly one answer at a time from a buffered stream, leaving what follows for the next read)."""

from __future__ import annotations

from typing import BinaryIO

import h11

from rspf.wire import HttpResponse


def read_response(reader: BinaryIO, max_body: int = 4 * 1024 * 1024) -> HttpResponse:
    """The next response on ``reader``; ConnectionError when the stream ends first or is not HTTP."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "test")]))  # h11 reads answers to requests
    conn.send(h11.EndOfMessage())
    head: h11.Response | None = None
    body = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise ConnectionError(f"not an HTTP response: {exc}") from None
        if event is h11.NEED_DATA:
            conn.receive_data(reader.read(1))  # byte by byte: nothing of the next answer is consumed
        elif isinstance(event, h11.Response):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > max_body:
                raise ConnectionError("the response body is too large")
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            headers: dict[str, str] = {}
            for name, value in head.headers:
                key, text = name.decode("latin-1"), value.decode("latin-1")
                headers[key] = f"{headers[key]}, {text}" if key in headers else text
            return HttpResponse(head.status_code, headers, bytes(body))
        elif isinstance(event, h11.ConnectionClosed):
            raise ConnectionError("the stream ended without a whole response")
