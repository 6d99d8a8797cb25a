"""Every touch of ACME internals made by the plugin (besides the resource types in resources.py).

Guarded by a check of the ACME version: an upgrade breaks loudly here, in one place; tests/test_acme_patches.py
pins the signature of every ACME function named here.

* :func:`apply_identity` / :func:`apply_registrar` set the CSE-ID, SP-ID and registrar from the
  securityProfile (re-running ACME's own validation so its derived runtime constants follow);
* :func:`wrap_ae_registration` wraps ``RegistrationManager.handleAERegistration`` (the AE registration
  check of TS-0001 §10.2.2.2) and marks the new ``<AE>`` with the Credential-ID it registered with
  (:data:`BINDING_ATTR`, an internal attribute stored with the resource and never shown to clients);
* :func:`wrap_access` wraps ``SecurityManager.hasAccess`` (a gate before ACME's own access control, and the
  reads a proven CSE may do);
* :func:`wrap_wsgi` puts a WSGI middleware in front of ACME's Flask app (Flask's documented pattern), and
  :func:`endpoint_kind` tells a oneM2M request from ACME's other HTTP endpoints (web UI, tools);
* :func:`on_reset` subscribes to ACME's ``cseReset`` / ``cseRestarted`` events;
* :func:`route_registrar_over_psk` sends the CSE's own requests to its registrar over TLS-PSK.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from .resources import check_acme_version as check_version  # the one ACME version guard  # noqa: F401

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------- config
def apply_identity(config: Any, profile: dict[str, Any]) -> None:
    """Make ACME use the provisioned CSE-ID and SP-ID (seed CR 0055 §9.3). Call from ``@configure``."""
    from acmecse.runtime.configurations.CSEConfiguration import CSEConfiguration

    if profile["enroleeType"] != "CSE":
        raise RuntimeError("the securityProfile provisions an AE, not a CSE")
    old_id = config.cse_cseID
    config.cse_cseID = profile["enroleeID"]
    config.cse_serviceProviderID = profile["spID"]
    if config.cse_resourceID == old_id.lstrip("/"):  # ACME's default: resourceID follows the CSE-ID
        config.cse_resourceID = profile["enroleeID"].lstrip("/")
    CSEConfiguration().validateConfiguration(config)  # recomputes ACME's derived runtime constants


def apply_registrar(config: Any, profile: dict[str, Any]) -> None:
    """Make ACME register with the provisioned registrar. Call from ``@validate``: ACME's RemoteCSEManager
    re-reads ``[cse.registrar]`` in its own ``@configure``, which runs after ours."""
    from acmecse.etc.Types import CSERegistrar

    reg = CSERegistrar()
    parts = urlsplit(profile["registrar"]["cseBaseURI"])
    reg.address = f"{parts.scheme}://{parts.netloc}"
    path = parts.path.strip("/")
    root = "/".join(path.split("/")[:-1])
    reg.root = f"/{root}" if root else ""
    reg.resourceName = path.split("/")[-1] if path else ""
    reg.cseID = profile["registrar"]["cseID"]
    reg.spID = profile["spID"]
    reg.originator = profile["enroleeID"]
    reg.serialization = "json"
    config.cse_registrars[profile["spID"]] = reg


# ----------------------------------------------------------------------------------- registration
#: Internal attribute of an ``<AE>``: the Credential-ID of the security association it registered in.
BINDING_ATTR = "__rspfCredentialID__"


def wrap_ae_registration(check: Callable[[Any, str], str | None]) -> None:
    """Call ``check(ae, originator)`` before ACME's own AE registration; ``check`` raises to refuse, or returns
    the Credential-ID the new AE is bound to (None: registered without a credential)."""
    from acmecse.resources.Resource import addToInternalAttributes
    from acmecse.services.RegistrationManager import RegistrationManager

    addToInternalAttributes(BINDING_ATTR)  # stored with the resource, stripped from every representation
    original = RegistrationManager.handleAERegistration
    if getattr(original, "_rspf_wrapped", False):
        return

    def handleAERegistration(self: Any, ae: Any, originator: str, parentResource: Any) -> str:
        credential_id = check(ae, originator)
        assigned = original(self, ae, originator, parentResource)
        if credential_id:
            ae.setAttribute(BINDING_ATTR, credential_id)
        return assigned

    handleAERegistration._rspf_wrapped = True  # type: ignore[attr-defined]
    handleAERegistration._rspf_original = original  # type: ignore[attr-defined]
    RegistrationManager.handleAERegistration = handleAERegistration  # type: ignore[method-assign]


def registered_ae(stem: str) -> tuple[bool, str | None]:
    """Whether an ``<AE>`` with AE-ID ``stem`` is registered here, and the Credential-ID it registered with."""
    from acmecse.etc.ResponseStatusCodes import ResponseException
    from acmecse.runtime import CSE

    try:
        ae = CSE.storage.retrieveResource(aei=stem)
    except ResponseException:
        return False, None
    return True, ae.attribute(BINDING_ATTR)


def wrap_access(gate: Callable[[str], bool], extra: Callable[[str, Any, str, Any], bool]) -> None:
    """``gate(originator)`` runs first: False denies, whatever ACME's rules say. Then grant, in addition to
    ACME's own rules (ACPs, ``allowedCSROriginators``), what ``extra(originator, resource, operation, ty)``
    allows; ``operation`` is "create", "retrieve" or "discover" (nothing else is ever widened)."""
    from acmecse.etc.Types import Permission
    from acmecse.services.SecurityManager import SecurityManager

    original = SecurityManager.hasAccess
    if getattr(original, "_rspf_wrapped", False):
        return
    names = {Permission.CREATE: "create", Permission.RETRIEVE: "retrieve", Permission.DISCOVERY: "discover"}

    def hasAccess(self: Any, originator: str, resource: Any, requestedPermission: Any, ty: Any = None,
                  parentResource: Any = None, request: Any = None, resultResource: Any = None) -> bool:
        if not gate(originator):
            return False
        op = names.get(requestedPermission)
        if op is not None and extra(originator, resource, op, ty):
            return True
        return original(self, originator, resource, requestedPermission, ty, parentResource, request, resultResource)

    hasAccess._rspf_wrapped = True  # type: ignore[attr-defined]
    hasAccess._rspf_original = original  # type: ignore[attr-defined]
    SecurityManager.hasAccess = hasAccess  # type: ignore[method-assign]


def on_reset(begin: Callable[[], None], end: Callable[[], None]) -> None:
    """``begin()`` on ACME's ``cseReset`` (storage purged), ``end()`` on ``cseRestarted`` (the CSEBase and the
    admin AE exist again). ACME runs both in a background thread: they may finish after the reset did."""
    from acmecse.runtime.EventManager import eventManager

    eventManager.addHandler(eventManager.cseReset, lambda *_a: begin())
    eventManager.addHandler(eventManager.cseRestarted, lambda *_a: end())


CSR_TYPE = 16  # <remoteCSE>


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


# ------------------------------------------------------------------------------------------- WSGI
def flask_app(http_server: Any) -> Any:
    app = getattr(http_server, "flaskApp", None)
    if app is None:
        raise RuntimeError("ACME's HTTP server has no Flask app yet; the plugin must start after the bindings")
    return app


_ONEM2M_HANDLERS = frozenset({"handleGET", "handlePOST", "handlePUT", "handleDELETE", "handlePATCH"})


def endpoint_kind(http_server: Any, environ: dict[str, Any]) -> str:
    """Which of the Flask app's endpoints an HTTP request reaches: "onem2m" (ACME's resource tree handlers),
    "webui" (ACME's web UI and its ``/`` redirect), "other" (upper tester, management, structure),
    "not-found" or "method-not-allowed". Matching uses the app's own URL map, so it follows ``[http] root`` and
    ``[webui] root``."""
    from werkzeug.exceptions import MethodNotAllowed, NotFound
    from werkzeug.routing import RequestRedirect

    app = flask_app(http_server)
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


def wrap_wsgi(http_server: Any, middleware: Callable[[Callable], Callable]) -> Any:
    app = flask_app(http_server)
    if not getattr(app.wsgi_app, "_rspf_wrapped", False):
        wrapped = middleware(app.wsgi_app)
        wrapped._rspf_wrapped = True  # type: ignore[attr-defined]
        app.wsgi_app = wrapped
    return app


# ------------------------------------------------------------------------------------------- Mcc
class _Response:
    """The part of ``requests.Response`` that ACME's HttpServer.sendHttpRequest reads."""

    def __init__(self, status: int, headers: dict[str, str], content: bytes) -> None:
        from requests.structures import CaseInsensitiveDict

        self.status_code = status
        self.headers = CaseInsensitiveDict(headers)
        self.content = content


Sender = Callable[[str, str, bytes | None, dict, float | None], tuple]


def route_registrar_over_psk(base_url: str, send: Sender) -> None:
    """Requests ACME sends to URLs under ``base_url`` go through ``send`` (TLS-PSK) instead of ``requests``.

    ``send(method, url, body, headers, timeout) -> (status, headers, body)``.
    """
    from acmecse.plugins.bindings.HttpServer import HttpServer

    table = HttpServer.operation2method
    for op, fn in list(table.items()):
        original = getattr(fn, "_rspf_original", fn)
        method = {"post": "POST", "get": "GET", "put": "PUT", "delete": "DELETE"}.get(original.__name__, "POST")

        def routed(url: str, data: Any = None, headers: Any = None, verify: Any = None, timeout: Any = None,
                   _original: Callable = original, _method: str = method, **kw: Any) -> Any:
            if url.startswith(base_url):
                body = data.encode() if isinstance(data, str) else data
                status, hdrs, content = send(_method, url, body, dict(headers or {}), timeout)
                return _Response(status, hdrs, content)
            return _original(url, data=data, headers=headers, verify=verify, timeout=timeout, **kw)

        routed._rspf_original = original  # type: ignore[attr-defined]
        routed.__name__ = original.__name__
        table[op] = routed
