"""A small oneM2M HTTP-binding client over one TLS connection (keep-alive)."""

from __future__ import annotations

import itertools
import json
import secrets
from typing import Any

from . import wire
from .errors import RemoteError
from .tls import TlsConnection

_counter = itertools.count(1)


class OneM2MClient:
    def __init__(self, tls: TlsConnection, originator: str, *, host: str = "localhost", rvi: str = "3") -> None:
        self.tls = tls
        self.originator = originator
        self.host = host
        self.rvi = rvi
        self._reader = tls.makefile()
        self._prefix = secrets.token_hex(4)

    def request(self, method: str, path: str, content: Any = None, *, ty: int | None = None,
                headers: dict[str, str] | None = None) -> wire.HttpResponse:
        hdrs = {
            "host": self.host,
            "x-m2m-origin": self.originator,
            "x-m2m-ri": f"{self._prefix}-{next(_counter)}",
            "x-m2m-rvi": self.rvi,
            "accept": "application/json",
        }
        body = b""
        if content is not None:
            body = json.dumps(content, separators=(",", ":")).encode()
            hdrs["content-type"] = "application/json" + (f";ty={ty}" if ty is not None else "")
        hdrs.update(headers or {})
        self.tls.sendall(wire.render_request(wire.HttpRequest(method, path, hdrs, body)))
        return wire.read_response(self._reader)

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
            raise RemoteError(rsc or 5000, _error_text(data) or f"HTTP {resp.status} without a oneM2M status")
        return data

    def close(self) -> None:
        self.tls.close()


def _error_text(data: Any) -> str | None:
    if isinstance(data, dict):
        if isinstance(data.get("m2m:dbg"), str):
            return data["m2m:dbg"]
        inner = data.get("rspf:fcRsp")
        if isinstance(inner, dict) and isinstance(inner.get("errorString"), str):
            return inner["errorString"]
    return None
