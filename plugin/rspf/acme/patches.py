"""Every touch of ACME internals made by the plugin: ONE module, guarded by a check of the ACME version.

An ACME upgrade breaks loudly here, in one place: :func:`check_acme_version` refuses any ACME but the release
this module was written against, and tests/test_acme_patches.py pins the signature of every ACME function
named here. What the plugin only *reads* of ACME's state lives in :mod:`rspf.acme.host`; the oneM2M resource
logic (rules, recording) in :mod:`rspf.acme.resources`.

* :func:`apply_identity` / :func:`apply_registrar` set the CSE-ID, SP-ID and registrar from the
  securityProfile (re-running ACME's own validation so its derived runtime constants follow);
* :func:`wrap_ae_registration` wraps ``RegistrationManager.handleAERegistration`` (the AE registration
  check of TS-0001 §10.2.2.2, and the clearing of a registration an earlier run lost in a crash) and marks the
  new ``<AE>`` with the Credential-ID it registered with (:data:`BINDING_ATTR`, an internal attribute stored
  with the resource and never shown to clients); :func:`registered_ae` and :func:`credential_of` read it back;
  :func:`on_ae_deleted` subscribes to ACME's ``aeHasDeregistered`` event;
* :func:`wrap_access` wraps ``SecurityManager.hasAccess`` (a gate before ACME's own access control, and the
  reads a proven CSE may do);
* :func:`wrap_wsgi` puts a WSGI middleware in front of ACME's Flask app (Flask's documented pattern);
* :func:`on_reset` subscribes to ACME's ``cseReset`` / ``cseRestarted`` events;
* :func:`route_registrar_over_psk` sends the CSE's own requests to its registrar over TLS-PSK;
* :func:`install_resource_types` teaches ACME the resource types mssp, asar and svsn (enum extension,
  wrapped factory, importer and storage; see its docstring).
* :func:`scale_storage` keeps two of ACME's storage paths flat for a CSE with 100,000 registered AEs (a new
  child joins its parent's list without a scan of it; an ``<AE>`` is looked up by AE-ID at its resource ID
  before ACME's scan).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from importlib import metadata
from typing import Any
from urllib.parse import urlsplit

from . import host
from .resources import (
    ATTRIBUTES,
    CHILDREN,
    CSEBASE_CHILDREN,
    ENUM_NAMES,
    OWN_TYPES,
    POLICIES,
    TYPES,
    resource_classes,
)

#: The ACME releases this module's patches were written and tested against (``acmecse`` 2026.5.x).
SUPPORTED_ACME = (2026, 5)

_PATCH_MARK = "_rspf_resources_patch"
_install_lock = threading.Lock()


# -------------------------------------------------------------------------------- version guard
def acme_version() -> str:
    """The installed ``acmecse`` distribution version (e.g. ``2026.5.3``)."""
    try:
        return metadata.version("acmecse")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source checkout
        from acmecse.etc.Constants import Constants

        return str(Constants.version)


def check_acme_version() -> None:
    """Raise RuntimeError unless the ACME in this interpreter is 2026.5.x."""
    version = acme_version()
    m = re.match(r"(\d+)\.0*(\d+)\.", version)
    if not m or (int(m.group(1)), int(m.group(2))) != SUPPORTED_ACME:
        import acmecse

        raise RuntimeError(
            f"the onem2m-rspf plugin supports ACME (acmecse) 2026.5.x only; this is acmecse {version} "
            f"({acmecse.__file__}). What rspf/acme/patches.py changes in ACME "
            "(resource types, factory, policies, storage lookups, registration and access hooks, Mcc routing) "
            "must be re-checked against the new release."
        )


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


def wrap_ae_registration(check: Callable[[Any, str], str | None], repaired: Callable[[str], None]) -> None:
    """Call ``check(ae, originator)`` before ACME's own AE registration; ``check`` raises to refuse, or returns
    the Credential-ID the new AE is bound to (None: registered without a credential).

    Crash recovery: ACME keeps the originators it counts as registered in a table of its own, written apart
    from the resources (with its file database each table is flushed by its own thread). Killed right after a
    2001, it can restart with the originator counted and the ``<AE>`` gone: every later registration would be
    4117 ORIGINATOR_HAS_ALREADY_REGISTERED. So, for a registration that passed ``check``: an AE-ID counted as
    registered, with no ``<AE>`` of that AE-ID, and not registered by this process (whose own tables are
    consistent; an entry it added may belong to a registration still under way) is a leftover of an earlier
    run -- it is cleared, ``repaired(originator)`` is called, and the registration goes on."""
    from acmecse.resources.Resource import addToInternalAttributes
    from acmecse.services.RegistrationManager import RegistrationManager

    addToInternalAttributes(BINDING_ATTR)  # stored with the resource, stripped from every representation
    original = RegistrationManager.handleAERegistration
    if getattr(original, "_rspf_wrapped", False):
        return

    def handleAERegistration(self: Any, ae: Any, originator: str, parentResource: Any) -> str:
        credential_id = check(ae, originator)
        if _stale_registration(self.storage, originator):
            self.storage.removeOriginator(originator)
            repaired(originator)
        assigned = original(self, ae, originator, parentResource)
        if assigned:
            with _registered_lock:
                _registered_here.add(assigned)
        if credential_id:
            ae.setAttribute(BINDING_ATTR, credential_id)
        return assigned

    handleAERegistration._rspf_wrapped = True  # type: ignore[attr-defined]
    handleAERegistration._rspf_original = original  # type: ignore[attr-defined]
    RegistrationManager.handleAERegistration = handleAERegistration  # type: ignore[method-assign]


_registered_here: set[str] = set()  # AE-IDs this process registered (and whose <AE> it has not seen deleted)
_registered_lock = threading.Lock()


def _stale_registration(storage: Any, originator: str) -> bool:
    """An AE-ID counted as registered in ACME's originator table without an <AE>, left by an earlier run."""
    from acmecse.etc.ResponseStatusCodes import ResponseException

    if not originator or originator in ("C", "S") or originator.startswith("/"):
        return False  # a CSE-assigned AE-ID is new; CSE-IDs are not AE registrations
    with _registered_lock:
        if originator in _registered_here:
            return False
    if storage.getOriginator(originator) is None:
        return False
    try:  # by resource ID first, then ACME's scan (scale_storage)
        storage.retrieveResource(aei=originator)
    except ResponseException:
        return True
    return False


def _ae_of(storage: Any, stem: str) -> Any | None:
    """The ``<AE>`` with AE-ID ``stem``, found by resource ID: ACME gives an AE it registers the resource ID of
    its AE-ID-Stem (TS-0001 §10.2.2.2), whereas its lookup by AE-ID scans every resource of the CSE (100,000
    AEs and as many rules: milliseconds per lookup, and one per plain-port request). None if there is none."""
    from acmecse.etc.ResponseStatusCodes import ResponseException
    from acmecse.etc.Types import ResourceTypes

    try:
        ae = storage.retrieveResource(ri=stem)
    except ResponseException:
        return None
    return ae if ae.ty == ResourceTypes.AE and ae.aei == stem else None


def credential_of(ae: Any) -> str | None:
    """The Credential-ID an ``<AE>`` resource registered with (:data:`BINDING_ATTR`), or None."""
    value = ae.attribute(BINDING_ATTR)
    return value if isinstance(value, str) and value else None


def on_ae_deleted(handler: Callable[[Any], None]) -> None:
    """``handler(ae)`` after an ``<AE>`` was deleted (ACME's ``aeHasDeregistered``, run in the background)."""
    from acmecse.runtime.EventManager import eventManager

    def deleted(*args: Any) -> None:
        for data in args:
            ae = getattr(data, "payload", None)
            if ae is not None:
                with _registered_lock:
                    _registered_here.discard(ae.aei)
                handler(ae)

    eventManager.addHandler(eventManager.aeHasDeregistered, deleted)


def registered_ae(stem: str) -> tuple[bool, str | None]:
    """Whether an ``<AE>`` with AE-ID ``stem`` is registered here, and the Credential-ID it registered with."""
    from acmecse.runtime import CSE

    ae = _ae_of(CSE.storage, stem)
    return (False, None) if ae is None else (True, credential_of(ae))


def wrap_access(gate: Callable[[str], bool], extra: Callable[[str, Any, str, Any], bool]) -> None:
    """``gate(originator)`` runs first: False denies, whatever ACME's rules say. Then grant, in addition to
    ACME's own rules (ACPs, ``allowedCSROriginators``), what ``extra(originator, resource, operation, ty)``
    allows; ``operation`` is "create", "retrieve", "update", "delete" or "discover" (notify is never widened)."""
    from acmecse.etc.Types import Permission
    from acmecse.services.SecurityManager import SecurityManager

    original = SecurityManager.hasAccess
    if getattr(original, "_rspf_wrapped", False):
        return
    names = {Permission.CREATE: "create", Permission.RETRIEVE: "retrieve", Permission.UPDATE: "update",
             Permission.DELETE: "delete", Permission.DISCOVERY: "discover"}

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


# ------------------------------------------------------------------------------------------- WSGI
def wrap_wsgi(http_server: Any, middleware: Callable[[Callable], Callable]) -> Any:
    app = host.flask_app(http_server)
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


# ------------------------------------------------------------------------------ resource types
def install_resource_types() -> None:
    """Teach the running ACME the types mssp (11), asar (19) and svsn (20). Idempotent.

    Call it from a plugin's ``@init`` (or ``@configure``/``@validate``): that is before ACME imports its
    resource type definitions (``Importer.importResourcePolicies`` -> ``Factory.initResources``) and its
    attribute policies (``Importer.importPolicies``), and before ``init.as`` creates the CSEBase, so the
    CSEBase's ``srt`` lists the new types. Later calls are no-ops once installed; a *first* call after ACME
    has already built its resource tables raises RuntimeError (the tables are not rebuilt under load).

    What it changes, all in memory, nothing on disk:

    1. ``ResourceTypes`` (IntEnum) gets members MSSP=11, ASAR=19, SVSN=20;
    2. ``Factory.initResources`` is wrapped: before it runs, ResourceDescriptions for the three types are
       put into ``Types.resourceTypeDetails`` (type names ``m2m:mssp`` etc., attributes, child types) and
       MSSP/ASAR are added to the CSEBase's child types, so ACME's own code derives the name mappings,
       the creatable/updatable lists and ``srt``; ``Factory.resourceClassMapping`` becomes a property that
       adds our resource classes to the class map ACME assigns there;
    3. ``Importer.assignAttributePolicies`` is wrapped: before it runs, the attribute policies of the new
       attributes are parsed with ACME's own ``.ap`` parser and registered with the Validator, and 11/19/20
       are added to the ``m2m:resourceType`` enumeration (filterCriteria ``ty``, ACP ``chty``);
    4. ``Storage.retrieveResource(csi=...)`` and ``Storage.searchByFragment({'csi': ...})`` skip svsn
       resources: ACME looks up <CSEBase>/<remoteCSE> by the ``csi`` field, which svsn shares;
    5. ``Importer.importScripts`` is wrapped: afterwards a CSEBase created by an older run (persistent
       database) gets the new types added to its ``srt``.

    Why in memory and not as files in ``<baseDir>/init/``: ACME reads ``*.rtp`` (resource types) only from
    its own package directory (``cse.resourcesPath``), so the types must be injected anyway; an ``*.ap`` in
    ``<baseDir>/init/`` would work for the attribute policies (parsed after ACME's own, once the enum knows
    the type names) but leaves files in the operator's directory; and an ``*.ep`` cannot extend
    ``m2m:resourceType`` -- a same-named enumeration replaces ACME's, and the policies parsed before it
    keep their own deep copies of the values.
    """
    check_acme_version()
    with _install_lock:
        from acmecse.runtime.Factory import Factory

        if getattr(Factory.initResources, _PATCH_MARK, False):
            return  # already installed (this process)
        if Factory().__dict__.get("resourceClassMapping"):
            raise RuntimeError(
                "install_resource_types() was called after ACME built its resource type tables; call it from "
                "a plugin's @init (before Importer.importResourcePolicies)"
            )
        _extend_resource_types_enum()
        _patch_factory()
        _patch_importer()
        _patch_storage()


def _mark(fn: Any, original: Any) -> Any:
    setattr(fn, _PATCH_MARK, True)
    fn._rspf_original = original
    fn.__name__ = getattr(original, "__name__", fn.__name__)
    fn.__doc__ = getattr(original, "__doc__", None)
    return fn


def _extend_resource_types_enum() -> None:
    """Add MSSP/ASAR/SVSN members to ACME's ResourceTypes IntEnum (Python 3.11+ enum internals)."""
    from acmecse.etc.Types import ResourceTypes

    for name, value, _tn, _fn in TYPES:
        existing = ResourceTypes._value2member_map_.get(value)
        if existing is not None:
            if existing.name != name:
                raise RuntimeError(f"ACME already defines resource type {value} as {existing.name}")
            continue
        member = int.__new__(ResourceTypes, value)
        member._name_ = name
        member._value_ = value
        member.__objclass__ = ResourceTypes  # type: ignore[attr-defined]
        member._sort_order_ = len(ResourceTypes._member_names_)  # type: ignore[attr-defined]
        ResourceTypes._member_map_[name] = member
        ResourceTypes._member_names_.append(name)  # type: ignore[attr-defined]
        ResourceTypes._value2member_map_[value] = member
        type.__setattr__(ResourceTypes, name, member)  # EnumType.__setattr__ refuses member names
        if not (ResourceTypes(value) is member and ResourceTypes[name] is member and member in list(ResourceTypes)
                and ResourceTypes.has(value) and ResourceTypes.to(name) is member):
            raise RuntimeError(f"could not add {name}={value} to ACME's ResourceTypes on this Python version")


def _class_map_entries() -> dict[Any, tuple[type, Any]]:
    from acmecse.etc.Types import ResourceTypes

    out: dict[Any, tuple[type, Any]] = {}
    for name, cls in resource_classes().items():
        out[ResourceTypes[name]] = (cls, lambda dct, tySN, create, _cls=cls: _cls(dct, create=create))
    return out


def _register_descriptions() -> None:
    """Put our ResourceDescriptions into Types.resourceTypeDetails (ACME re-reads its .rtp on every import)."""
    from acmecse.etc.Types import ResourceDescription, ResourceTypes, resourceTypeDetails

    for name, _value, type_name, full_name in TYPES:
        ty = ResourceTypes[name]
        resourceTypeDetails[ty] = ResourceDescription(
            type=ty, typeName=type_name, fullName=full_name,
            attributes=list(ATTRIBUTES[name]),
            childResourceTypes=[ResourceTypes[c] for c in CHILDREN[name]],
        )
    cse = resourceTypeDetails.get(ResourceTypes.CSEBase)
    if cse is None:  # pragma: no cover - ACME always defines the CSEBase
        raise RuntimeError("ACME's resource type definitions have no CSEBase")
    if cse.childResourceTypes is None:
        cse.childResourceTypes = []
    for c in CSEBASE_CHILDREN:
        if ResourceTypes[c] not in cse.childResourceTypes:
            cse.childResourceTypes.append(ResourceTypes[c])


def _patch_factory() -> None:
    from acmecse.etc import Types
    from acmecse.etc.Constants import RuntimeConstants as RC
    from acmecse.etc.Types import CSEType
    from acmecse.runtime.Factory import Factory

    # ACME assigns a fresh dict literal to self.resourceClassMapping inside initResources() and then derives
    # everything (class attributes, attribute lists, child types, factories) from it; a data descriptor
    # lets ACME's own loop do that for our classes too.
    key = "_rspf_resourceClassMapping"

    def _get(self: Any) -> dict:
        return self.__dict__.setdefault(key, {})

    def _set(self: Any, value: dict) -> None:
        mapping = dict(value)
        for ty, entry in _class_map_entries().items():
            mapping.setdefault(ty, entry)
        self.__dict__[key] = mapping

    Factory.resourceClassMapping = property(_get, _set, doc="ACME's class map plus rspf's mssp/asar/svsn")

    original = Factory.initResources

    def initResources(self: Any) -> bool:
        _register_descriptions()
        ok = original(self)
        if ok and RC.cseType != CSEType.IN:
            # IN-CSE only types: not "supported" on an MN/ASN (creation is refused there as well)
            Types._resourceTypesSupportedResourceTypes[:] = [
                t for t in Types._resourceTypesSupportedResourceTypes if int(t) not in OWN_TYPES]
        return ok

    Factory.initResources = _mark(initResources, original)  # type: ignore[method-assign]


def _inject_policies(importer: Any) -> None:
    """Register our attribute policies (parsed by ACME's own .ap parser) and extend m2m:resourceType."""
    from acmecse.etc.Types import ResourceTypes

    validator = importer.validator
    # Importer deep-copies each parsed policy, so every policy of etype m2m:resourceType (filterCriteria ty,
    # request ty, ACP chty, childResourceRef typ, ...) has its own copy of the enumeration values.
    enums = [importer._enumValues.get("m2m:resourceType")]
    enums += [p.evalues for p in validator.getAllAttributePolicies().values() if p.etype == "m2m:resourceType"]
    for enum in enums:
        if isinstance(enum, dict):
            for value, long_name in ENUM_NAMES.items():
                enum.setdefault(value, long_name)
    for sname, definition in POLICIES.items():
        policy = importer._parseAttribute(dict(definition), "rspf.acme.resources", sname=sname)
        if policy is None:
            raise RuntimeError(f"ACME refused the attribute policy for {sname}; see the ACME log")
        for rtype in policy.rtypes:
            if validator.getAttributePolicy(rtype, sname, specific=True) is None:
                validator.addAttributePolicy(rtype, sname, policy)
    # sanity: every attribute of our types must have a policy now (common ones come from ACME's ALL policies)
    for name, attrs in ATTRIBUTES.items():
        for sname in attrs:
            if validator.getAttributePolicy(ResourceTypes[name], sname) is None:
                raise RuntimeError(f"no ACME attribute policy for {name}.{sname}")


def _ensure_srt() -> None:
    """A CSEBase created before the types were installed (persistent DB) lists them in srt afterwards."""
    from acmecse.etc.Types import ResourceTypes
    from acmecse.resources.CSEBase import getCSE

    cse = getCSE()
    if cse is None:
        return
    wanted = [int(t) for t in ResourceTypes.supportedResourceTypes()]
    srt = list(cse.srt or [])
    missing = [t for t in wanted if int(t) in OWN_TYPES and int(t) not in srt]
    extra = [t for t in srt if int(t) in OWN_TYPES and int(t) not in wanted]
    if missing or extra:
        cse.setAttribute("srt", sorted([t for t in srt if t not in extra] + missing))
        cse.dbUpdate()


def _patch_importer() -> None:
    from acmecse.runtime.Importer import Importer

    original_assign = Importer.assignAttributePolicies

    def assignAttributePolicies(self: Any) -> bool:
        _inject_policies(self)
        return original_assign(self)

    Importer.assignAttributePolicies = _mark(assignAttributePolicies, original_assign)  # type: ignore[method-assign]

    original_scripts = Importer.importScripts

    def importScripts(self: Any) -> bool:
        ok = original_scripts(self)
        if ok:
            _ensure_srt()
        return ok

    Importer.importScripts = _mark(importScripts, original_scripts)  # type: ignore[method-assign]


def _patch_storage() -> None:
    from acmecse.etc.ResponseStatusCodes import INTERNAL_SERVER_ERROR, NOT_FOUND
    from acmecse.runtime.Storage import Storage

    original_retrieve = Storage.retrieveResource

    def retrieveResource(self: Any, ri: str | None = None, csi: str | None = None, srn: str | None = None,
                         aei: str | None = None) -> Any:
        if csi and not ri and not srn:
            # ACME: "get the CSE by its csi" -- CSEBase/remoteCSE only, never a serviceSubscribedNode
            docs = [d for d in self.db.searchResources(csi=csi) if d.get("ty") not in OWN_TYPES]
            if len(docs) == 1:
                return self.factory.resourceFromDict(docs[0])
            if not docs:
                raise NOT_FOUND("resource not found")
            raise INTERNAL_SERVER_ERROR("database inconsistency")
        return original_retrieve(self, ri=ri, csi=csi, srn=srn, aei=aei)

    Storage.retrieveResource = _mark(retrieveResource, original_retrieve)  # type: ignore[method-assign]

    original_search = Storage.searchByFragment

    def searchByFragment(self: Any, dct: dict, filter: Any = None) -> list:  # ACME's parameter name
        if isinstance(dct, dict) and "csi" in dct and "ty" not in dct:
            # ACME: "try whether there is a CSE or CSR" with this csi -- not a serviceSubscribedNode
            inner = filter

            def not_a_node(doc: Any) -> bool:
                return doc.get("ty") not in OWN_TYPES and (inner is None or inner(doc))

            return original_search(self, dct, not_a_node)
        return original_search(self, dct, filter)

    Storage.searchByFragment = _mark(searchByFragment, original_search)  # type: ignore[method-assign]


# ------------------------------------------------------------------------------------------ scale
def scale_storage() -> None:
    """Keep two of ACME's storage paths that grow with the number of registered AEs flat. Idempotent.

    1. ``TinyDBBinding.upsertChildResource`` (ACME's memory and file databases) writes a new resource's record of
       children, then scans its parent's child list for the resource ID before appending it. Every registered
       AE and every recorded rule is a child of the CSEBase: at 100,000 AEs each registration scanned two lists
       of 100,000-200,000 entries under the table's lock. A resource that has no record yet cannot be in its
       parent's list (ACME writes the record and the entry under one lock, and removes both under one lock), so
       then the entry is appended directly; a resource that has a record (written again) and a parent without
       a record take ACME's own path. ACME's PostgreSQL binding is not touched.
    2. ``Storage.retrieveResource(aei=...)`` -- ACME's check that lets a registered AE RETRIEVE the CSEBase --
       scans every resource for the AE-ID. The ``<AE>`` is looked up first by resource ID, where ACME puts an AE
       it registers (:func:`_ae_of`); only when it is not there does ACME's scan run (an AE made otherwise, or
       none: ACME's own answer, NOT_FOUND included, is kept).
    """
    check_acme_version()
    with _install_lock:
        _scale_child_lists()
        _scale_ae_lookup()


def _scale_child_lists() -> None:
    from acmecse.plugins.database.TinyDBBinding import TinyDBBinding
    from tinydb.table import Document

    original = TinyDBBinding.upsertChildResource
    if getattr(original, _PATCH_MARK, False):
        return

    def upsertChildResource(self: Any, childResource: Any, ri: str) -> None:
        with self.lockChildResources:
            table = self.tabChildResources
            pi = childResource["pi"]
            parent = table.get(doc_id=pi) if pi else None
            if not table.contains(doc_id=ri) and (parent is not None or not pi):
                table.upsert(Document(childResource, ri))  # type: ignore[arg-type]  # ACME: string IDs
                if parent is not None:
                    parent["ch"].append([ri, childResource["ty"]])
                    table.update(parent, doc_ids=[pi])
                return
        original(self, childResource, ri)

    TinyDBBinding.upsertChildResource = _mark(upsertChildResource, original)  # type: ignore[method-assign]


def _scale_ae_lookup() -> None:
    from acmecse.runtime.Storage import Storage

    original = Storage.retrieveResource
    if getattr(original, "_rspf_ae_by_ri", False):
        return

    def retrieveResource(self: Any, ri: str | None = None, csi: str | None = None, srn: str | None = None,
                         aei: str | None = None) -> Any:
        if aei and not (ri or csi or srn) and (ae := _ae_of(self, aei)) is not None:
            return ae
        return original(self, ri=ri, csi=csi, srn=srn, aei=aei)

    retrieveResource._rspf_ae_by_ri = True  # type: ignore[attr-defined]
    Storage.retrieveResource = _mark(retrieveResource, original)  # type: ignore[method-assign]
