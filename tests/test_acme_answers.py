"""Every answer on the secure listener is a oneM2M answer (rspf.acme.plugin._answer_with_rsc), with a WSGI
app that misbehaves the ways ACME's Flask app can: HTML errors without an RSC, an exception, no answer."""

from __future__ import annotations

import json
from typing import Any

import pytest

pytest.importorskip("acmecse")

from rspf.acme.plugin import _answer_with_rsc  # noqa: E402


def run(app: Any, ri: str | None = "ri-1") -> tuple[str, dict[str, str], bytes]:
    got: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        got["status"], got["headers"] = status, {k.lower(): v for k, v in headers}

    body = b"".join(_answer_with_rsc(app, {"PATH_INFO": "/x"}, start_response, ri))
    return got["status"], got["headers"], body


def app_answering(status: str, headers: list[tuple[str, str]], body: bytes = b"<html>no</html>") -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response(status, headers)
        return [body]
    return app


@pytest.mark.parametrize(("status", "rsc", "http"), [
    ("405 METHOD NOT ALLOWED", "4005", "405"), ("404 NOT FOUND", "4004", "404"),
    ("401 UNAUTHORIZED", "4103", "403"), ("500 INTERNAL SERVER ERROR", "5000", "500"),
    ("418 I'M A TEAPOT", "4000", "400"), ("503 UNAVAILABLE", "5000", "500"),
])
def test_an_error_without_rsc_becomes_a_onem2m_error(status: str, rsc: str, http: str) -> None:
    got_status, headers, body = run(app_answering(status, [("Content-Type", "text/html")]))
    assert got_status.split()[0] == http and headers["x-m2m-rsc"] == rsc and headers["x-m2m-ri"] == "ri-1"
    assert headers["content-type"] == "application/json" and "m2m:dbg" in json.loads(body)


def test_a_success_without_rsc_gets_2000_and_keeps_its_body() -> None:
    status, headers, body = run(app_answering("200 OK", [("Content-Type", "text/html")], b"<html>ui</html>"))
    assert (status, headers["x-m2m-rsc"], body) == ("200 OK", "2000", b"<html>ui</html>")


def test_an_answer_with_rsc_is_passed_on_and_its_ri_kept() -> None:
    app = app_answering("201 CREATED", [("X-M2M-RSC", "2001"), ("X-M2M-RI", "ri-1")], b"{}")
    status, headers, body = run(app)
    assert (status, headers["x-m2m-rsc"], headers["x-m2m-ri"], body) == ("201 CREATED", "2001", "ri-1", b"{}")


def test_an_exception_is_5000_and_says_nothing_of_its_text() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        raise RuntimeError("internal detail 1234")

    status, headers, body = run(app)
    assert status.startswith("500") and headers["x-m2m-rsc"] == "5000"
    assert b"1234" not in body and b"RuntimeError" in body


def test_no_answer_is_5000_and_an_invalid_ri_is_not_echoed() -> None:
    status, headers, _body = run(lambda environ, start_response: [], ri=None)
    assert status.startswith("500") and headers["x-m2m-rsc"] == "5000" and "x-m2m-ri" not in headers
