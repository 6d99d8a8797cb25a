"""What the plugin reads of the running ACME: its identity, status and settings, the request being handled,
and which of its HTTP endpoints a request reaches. Nothing here changes ACME (that is :mod:`rspf.acme.patches`).
"""

from __future__ import annotations

import functools
from typing import Any

CSR_TYPE = 16  # <remoteCSE>
CSEBASE_TYPE = 5  # <CSEBase>


def current_environ() -> dict[str, Any] | None:
    """The WSGI environ of the HTTP request being handled in this thread, if any."""
    import flask

    if not flask.has_request_context():
        return None
    return flask.request.environ


def cse_id() -> str:
    from acmecse.etc.Constants import RuntimeConstants as RC

    return RC.cseCsi


def cse_resetting() -> bool:
    """ACME is resetting: it purged its storage and re-runs its start-up script. Its bindings are paused
    meanwhile (every request from outside is answered 5000 before it is dispatched), so whatever reaches
    the registration or access checks now is ACME's own work."""
    from acmecse.etc.Constants import RuntimeConstants as RC
    from acmecse.etc.Types import CSEStatus

    return bool(RC.cseStatus == CSEStatus.RESETTING)


def sp_id() -> str:
    from acmecse.etc.Constants import RuntimeConstants as RC

    return RC.cseSPid


def admin_originators() -> list[str]:
    """Every spelling of the CSE's admin originator (``adminID``; CSE-relative, SP-relative, absolute)."""
    from acmecse.etc.Constants import RuntimeConstants as RC

    return list(RC.cseOriginators)


def upper_tester_enabled() -> bool:
    from acmecse.runtime.Configuration import Configuration

    return bool(getattr(Configuration, "http_enableUpperTesterEndpoint", False))


def is_in_cse() -> bool:
    from acmecse.etc.Constants import RuntimeConstants as RC
    from acmecse.etc.Types import CSEType

    return RC.cseType == CSEType.IN


def acme_error(rsc: int, message: str) -> Exception:
    from acmecse.etc import ResponseStatusCodes as R

    cls = {
        4103: R.ORIGINATOR_HAS_NO_PRIVILEGE,
        4107: R.SECURITY_ASSOCIATION_REQUIRED,
        4126: R.APP_RULE_VALIDATION_FAILED,
        4128: R.SERVICE_SUBSCRIPTION_NOT_ESTABLISHED,
        4000: R.BAD_REQUEST,
    }[rsc]
    return cls(message)


def other_bindings_enabled(config: Any) -> list[str]:
    names = []
    for attr, name in (("mqtt_enable", "MQTT"), ("coap_enable", "CoAP"), ("websocket_enable", "WebSocket")):
        if getattr(config, attr, False):
            names.append(name)
    return names


def flask_app(http_server: Any) -> Any:
    app = getattr(http_server, "flaskApp", None)
    if app is None:
        raise RuntimeError("ACME's HTTP server has no Flask app yet; the plugin must start after the bindings")
    return app


_ONEM2M_HANDLERS = frozenset({"handleGET", "handlePOST", "handlePUT", "handleDELETE", "handlePATCH"})


#: The environ keys URL matching reads (werkzeug's bind_to_environ and match): the cache key of endpoint_kind.
_ROUTING_KEYS = ("REQUEST_METHOD", "PATH_INFO", "SCRIPT_NAME", "wsgi.url_scheme", "HTTP_HOST", "SERVER_NAME",
                 "SERVER_PORT")


def endpoint_kind(http_server: Any, environ: dict[str, Any]) -> str:
    """Which of the Flask app's endpoints an HTTP request reaches: "onem2m" (ACME's resource tree handlers),
    "webui" (ACME's web UI and its ``/`` redirect), "other" (upper tester, management, structure),
    "not-found" or "method-not-allowed". Matching uses the app's own URL map, so it follows ``[http] root`` and
    ``[webui] root``. The map is fixed once ACME serves (Flask refuses new routes after the first request), so
    answers are cached per method, path and host (bounded: a flood of distinct paths only evicts)."""
    return _endpoint_kind(http_server, tuple(environ.get(k) for k in _ROUTING_KEYS))


@functools.lru_cache(maxsize=4096)
def _endpoint_kind(http_server: Any, routing: tuple[Any, ...]) -> str:
    from werkzeug.exceptions import MethodNotAllowed, NotFound
    from werkzeug.routing import RequestRedirect

    app = flask_app(http_server)
    environ = {k: v for k, v in zip(_ROUTING_KEYS, routing, strict=True) if v is not None}
    try:
        endpoint, _args = app.url_map.bind_to_environ(environ).match()
    except MethodNotAllowed:
        return "method-not-allowed"
    except (NotFound, RequestRedirect):
        return "not-found"
    view = app.view_functions.get(endpoint)
    owner = getattr(view, "__self__", None)
    if owner is http_server and getattr(view, "__name__", "") in _ONEM2M_HANDLERS:
        return "onem2m"
    if type(owner).__module__.startswith("acmecse.webui."):
        return "webui"
    return "other"
