"""The plugin's WSGI layer without an ACME process (a fake ACME HttpServer with a real Flask app):

* every answer on the secure listener is a oneM2M answer (``_answer_with_rsc``), with an app that misbehaves
  the ways ACME's Flask app can: HTML errors without an RSC, an exception, no answer;
* the secure listener's checks before ACME (spoofed or missing originator, no credential, methods, paths);
* the plain port's checks with enforcement on, and the gate before ACME's access control."""

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


@pytest.mark.parametrize("ri", ["ri-1", None])
def test_the_secure_listener_does_not_name_the_server_software(ri: str | None) -> None:
    app = app_answering("200 OK", [("Server", "ACME 2026.5.3"), ("X-M2M-RSC", "2000")], b"{}")
    _status, headers, _body = run(app, ri=ri)
    assert "server" not in headers and headers["x-m2m-rsc"] == "2000"


def test_no_answer_is_5000_and_an_invalid_ri_is_not_echoed() -> None:
    status, headers, _body = run(lambda environ, start_response: [], ri=None)
    assert status.startswith("500") and headers["x-m2m-rsc"] == "5000" and "x-m2m-ri" not in headers


# ------------------------------------------------------------------ the secure listener's app, with a fake ACME
class FakeHttpServer:
    """The part of ACME's HttpServer the plugin reads: a Flask app whose oneM2M routes are its handle* methods."""

    def __init__(self) -> None:
        import flask

        self.flaskApp = flask.Flask("fake-acme")
        self.flaskApp.add_url_rule("/<path:path>", "get", self.handleGET, methods=["GET"])
        self.flaskApp.add_url_rule("/__ut__", "ut", lambda: "ut", methods=["POST"])
        self.seen: list[str] = []

    def handleGET(self, path: str) -> Any:
        import flask

        self.seen.append(flask.request.headers.get("X-M2M-Origin", ""))
        return flask.Response("{}", status=200, headers={"X-M2M-RSC": "2000"})


@pytest.fixture
def secure_app(monkeypatch: pytest.MonkeyPatch) -> Any:
    from acmecse.etc.Constants import RuntimeConstants as RC

    from rspf.acme.plugin import RspfSecurityPlugin

    monkeypatch.setattr(RC, "cseCsi", "/id-in", raising=False)
    monkeypatch.setattr(RC, "cseSPid", "//sp.example.com", raising=False)
    plugin = RspfSecurityPlugin()
    plugin.httpServer = FakeHttpServer()
    return plugin, plugin._secure_app(plugin.httpServer.flaskApp)


def call(app: Any, method: str, path: str, origin: str | None, cred: Any = "default",
         ri: str = "ri-1") -> tuple[str, dict[str, str]]:
    from rspf.wsgi import ENVIRON_KEY, PeerCredential

    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": "x",
               "SERVER_PORT": "1", "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "https",
               "wsgi.input": __import__("io").BytesIO(b""), "HTTP_X_M2M_RI": ri, "REMOTE_ADDR": "127.0.0.9"}
    if origin is not None:
        environ["HTTP_X_M2M_ORIGIN"] = origin
    if cred == "default":
        cred = PeerCredential("psk", "k@mef.example.com", "12-k@mef.example.com", "Cae1")
    if cred is not None:
        environ[ENVIRON_KEY] = cred
    got: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        got["status"], got["headers"] = status, {k.lower(): v for k, v in headers}

    b"".join(app(environ, start_response))
    return got["status"], got["headers"]


@pytest.mark.parametrize(("method", "path", "origin", "cred", "rsc"), [
    ("GET", "/cse-in", "Cae1", "default", "2000"),
    ("GET", "/cse-in", "/id-in/Cae1", "default", "2000"),
    ("GET", "/cse-in", "Cae2", "default", "4106"),     # spoofed originator
    ("GET", "/cse-in", None, "default", "4106"),       # no originator
    ("GET", "/cse-in", "Cae1", None, "4106"),          # no credential on the connection
    ("OPTIONS", "/cse-in", "Cae1", "default", "4005"),
    ("PUT", "/cse-in", "Cae1", "default", "4005"),     # a method this (fake) CSE does not route
    ("POST", "/__ut__", "Cae1", "default", "4004"),    # a tool endpoint, never on the secure listener
    ("GET", "/", "Cae1", "default", "4004"),
])
def test_secure_app_checks_before_acme(secure_app: Any, method: str, path: str, origin: str | None, cred: Any,
                                       rsc: str) -> None:
    plugin, app = secure_app
    status, headers = call(app, method, path, origin, cred)
    assert headers["x-m2m-rsc"] == rsc and headers["x-m2m-ri"] == "ri-1", (status, headers)
    assert plugin.httpServer.seen == ([origin] if rsc == "2000" else [])  # a refusal never reaches ACME


# ------------------------------------------------------------------- the plain port's middleware and the gate
@pytest.fixture
def plain(secure_app: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Any:
    import configparser

    from acmecse.etc.Constants import RuntimeConstants as RC

    from rspf.acme import patches
    from rspf.acme.config import load

    (tmp_path / "t.psk").write_text("00" * 32)
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_dict({"rspf": {"mefAddress": "127.0.0.1:1", "mefFQDN": "mef.example.com", "enrol": "false",
                               "mefPskIdentity": "t@mef.example.com", "mefPskFile": "t.psk", "securePort": "1",
                               "plainPortOriginators": "/id-ops"}})
    plugin, _secure = secure_app
    plugin.config = load(parser, tmp_path)
    monkeypatch.setattr(RC, "cseOriginators", ["CAdmin", "/id-in/CAdmin", "//sp.example.com/id-in/CAdmin"],
                        raising=False)
    monkeypatch.setattr(patches, "registered_ae", lambda stem: {"Cbound": (True, "12-k@mef.example.com"),
                                                                   "Cfree": (True, None)}.get(stem, (False, None)))
    return plugin, plugin._plain_middleware(plugin.httpServer.flaskApp.wsgi_app)


@pytest.mark.parametrize(("path", "origin", "rsc"), [
    ("/cse-in", "Cfree", "2000"),       # registered without a credential: ACME decides
    ("/cse-in", "/id-ops", "2000"),     # listed by the operator
    ("/cse-in", "Cbound", "4107"),      # registered with a credential: only within a security association
    ("/cse-in", "Cnobody", "4106"),     # not a registered AE
    ("/cse-in", "/id-mn", "4107"),      # a CSE-ID
    ("/cse-in", "CAdmin", "4107"),      # the admin, not listed
    ("/cse-in", None, "4000"),          # no originator
])
def test_plain_port_with_enforcement(plain: Any, path: str, origin: str | None, rsc: str) -> None:
    plugin, app = plain
    assert plugin.config.enforcement  # the default
    status, headers = call(app, "GET", path, origin, cred=None)
    assert headers["x-m2m-rsc"] == rsc, (status, headers)
    assert plugin.httpServer.seen == ([origin] if rsc == "2000" else [])


def test_the_gate_denies_what_the_middleware_did_not_check(plain: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from rspf.acme import host
    from rspf.acme.plugin import CHECKED_KEY

    plugin, _app = plain
    environ: dict[str, Any] = {"PATH_INFO": "/__ut__", "REMOTE_ADDR": "127.0.0.9"}
    monkeypatch.setattr(host, "current_environ", lambda: environ)
    monkeypatch.setattr(host, "cse_resetting", lambda: False)
    assert plugin._gate("CAdmin") is False           # e.g. the upper tester's oneM2M request
    environ[CHECKED_KEY] = True
    assert plugin._gate("CAdmin") is True            # it passed the middleware
    del environ[CHECKED_KEY]
    monkeypatch.setattr(host, "cse_resetting", lambda: True)
    assert plugin._gate("CAdmin") is True            # ACME's own reset
    monkeypatch.setattr(host, "current_environ", lambda: None)
    monkeypatch.setattr(host, "cse_resetting", lambda: False)
    assert plugin._gate("CAdmin") is True            # no HTTP request: ACME's start-up script, background work
