"""Three oneM2M resource types ACME 2026.5 lacks, installed into the running CSE at start-up.

* ``<m2mServiceSubscriptionProfile>`` -- ty 11, ``m2m:mssp``, child of the CSEBase; children svsn, sub
  (TS-0001 §9.6.19, TS-0004 §7.4.19);
* ``<serviceSubscribedNode>`` -- ty 20, ``m2m:svsn``, child of an mssp; ``ni`` nodeID (M), ``csi`` CSE-ID,
  ``di`` deviceIdentifier, ``rlk`` ruleLinks, ``nrq`` niddRequired; ruleLinks without CSE-ID is a
  BAD_REQUEST (TS-0001 §9.6.20, TS-0004 §7.4.20);
* ``<serviceSubscribedAppRule>`` -- ty 19, ``m2m:asar``, child of the CSEBase; ``apci`` applicableCredIDs,
  ``aai`` allowedApp-IDs (each entry starts with ``*``, ``R`` or ``N``, else BAD_REQUEST), ``aae``
  allowedAEs, ``ari`` allowedRole-IDs (TS-0001 §9.6.29, TS-0004 §7.4.29).

They are ordinary ACME resources afterwards: CREATE/RETRIEVE/UPDATE/DELETE/discovery through the normal
request path, attribute validation from attribute policies, ACP / creator based access control, expiration,
<subscription> children and notifications, and they are listed in the CSEBase's ``srt``. All three are
IN-CSE types: on an MN/ASN-CSE a CREATE is refused with OPERATION_NOT_ALLOWED (TS-0004 §7.3.3.3).

This module defines them (type numbers and names, attributes, child types, attribute policies in ACME's
``*.ap`` format, and the Resource classes with their checks); :func:`rspf.acme.patches.install_resource_types`
installs them into ACME, the one place that touches ACME internals for that. The functions below read and
write the resources through ACME's Dispatcher like any internal CSE component does.

Helpers for the AE registration check (TS-0001 §10.2.2.2) and the RSPF rule update (TS-0003 §8.3.1.2):
:func:`find_service_subscribed_node`, :func:`rules_of`, :func:`registration_rules`, :func:`record_binding`,
:func:`forget_binding`, :func:`ensure_subscription`. The rule logic itself (matching, the bound-rule layout,
recording plans) is :mod:`rspf.ssar`, without ACME; this module applies it to ACME's resources.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from .. import ids, ssar
from ..errors import RspfError
from ..ssar import matches, rule_allows

__all__ = [
    "ASAR",
    "ATTRIBUTES",
    "CHILDREN",
    "CSEBASE_CHILDREN",
    "ENUM_NAMES",
    "MSSP",
    "OWN_TYPES",
    "POLICIES",
    "SVSN",
    "TYPES",
    "bound_rule",
    "ensure_subscription",
    "find_service_subscribed_node",
    "forget_binding",
    "matches",
    "record_binding",
    "registration_rules",
    "resolve_local",
    "resource_classes",
    "rule_allows",
    "rules_of",
]

MSSP = 11  #: resource type of <m2mServiceSubscriptionProfile>
ASAR = 19  #: resource type of <serviceSubscribedAppRule>
SVSN = 20  #: resource type of <serviceSubscribedNode>

# ACME ResourceTypes member name, numeric type, type short name, full name
TYPES: tuple[tuple[str, int, str, str], ...] = (
    ("MSSP", MSSP, "m2m:mssp", "M2MServiceSubscriptionProfile"),
    ("ASAR", ASAR, "m2m:asar", "ServiceSubscribedAppRule"),
    ("SVSN", SVSN, "m2m:svsn", "ServiceSubscribedNode"),
)
OWN_TYPES = frozenset((MSSP, ASAR, SVSN))  #: the three types defined here

# Universal and common attributes of all three types (TS-0004 Tables 7.4.19.1-2, 7.4.20.1-2, 7.4.29.1-2).
_COMMON = ["rn", "ty", "ri", "pi", "ct", "lt", "et", "lbl", "acpi", "daci"]
ATTRIBUTES = {
    "MSSP": _COMMON,
    "SVSN": _COMMON + ["ni", "csi", "di", "rlk", "nrq"],
    "ASAR": _COMMON + ["apci", "aai", "aae", "ari"],
}
# Allowed child types; <transaction> is not implemented by ACME 2026.5, so it is left out.
CHILDREN = {
    "MSSP": ["SVSN", "SUB"],
    "SVSN": ["SUB"],
    "ASAR": ["SUB"],
}
CSEBASE_CHILDREN = ["MSSP", "ASAR"]

# Resource specific attributes in ACME's attribute-policy format (the format of its ``*.ap`` files).
# Short names from TS-0004 Table 8.2.3-1 (CSE-ID is ``csi``, nodeID ``ni``, deviceIdentifier ``di``).
# ``rlk`` and the SSAR lists use cardinality "01" (not ACME's "01L") because an *empty* list is meaningful
# there: an empty ruleLinks means "no AE may register" (TS-0001 §9.6.20), an empty apci/aai/aae matches
# nothing, which is not the same as the attribute being absent (absent apci = no security association).
POLICIES: dict[str, dict[str, Any]] = {
    # <serviceSubscribedNode>
    "ni": {"rtypes": ["SVSN"], "lname": "nodeID", "type": "string", "car": "1", "oc": "M", "ou": "NP"},
    "csi": {"rtypes": ["SVSN"], "lname": "CSE-ID", "type": "ID", "car": "01", "oc": "O", "ou": "NP"},
    "di": {"rtypes": ["SVSN"], "lname": "deviceIdentifier", "type": "list", "ltype": "string", "car": "01L",
           "oc": "O", "ou": "NP"},
    "rlk": {"rtypes": ["SVSN"], "lname": "ruleLinks", "type": "list", "ltype": "anyURI", "car": "01",
            "oc": "O", "ou": "O"},
    "nrq": {"rtypes": ["SVSN"], "lname": "niddRequired", "type": "boolean", "car": "01", "oc": "O", "ou": "O"},
    # <serviceSubscribedAppRule>
    "apci": {"rtypes": ["ASAR"], "lname": "applicableCredIDs", "type": "list", "ltype": "ID", "car": "01",
             "oc": "O", "ou": "O"},
    "aai": {"rtypes": ["ASAR"], "lname": "allowedApp-IDs", "type": "list", "ltype": "ID", "car": "01",
            "oc": "O", "ou": "O"},
    "aae": {"rtypes": ["ASAR"], "lname": "allowedAEs", "type": "list", "ltype": "ID", "car": "01",
            "oc": "O", "ou": "O"},
    "ari": {"rtypes": ["ASAR"], "lname": "allowedRole-IDs", "type": "list", "ltype": "string", "car": "01",
            "oc": "O", "ou": "O"},
}
for _p in POLICIES.values():
    _p.setdefault("ns", "m2m")
    _p.setdefault("od", "O")
    _p.setdefault("annc", "NA")  # none of the three types is announceable
del _p

# TS-0004 Table 6.3.4.2.1-1 long names, added to ACME's m2m:resourceType enumeration (filterCriteria ty, chty).
ENUM_NAMES = {MSSP: "m2mServiceSubscriptionProfile", ASAR: "serviceSubscribedAppRule", SVSN: "serviceSubscribedNode"}

_rule_lock = threading.RLock()  # re-entered: a bound rule links itself from inside a recording
_classes: dict[str, type] = {}


# ============================================================================== resource classes
def resource_classes() -> dict[str, type]:
    """The ACME Resource classes of the three types, by ResourceTypes member name (built lazily: importing
    ACME's Resource needs a configured ACME)."""
    if _classes:
        return _classes
    from acmecse.etc.Constants import RuntimeConstants as RC
    from acmecse.etc.ResponseStatusCodes import (
        BAD_REQUEST,
        OPERATION_NOT_ALLOWED,
        SERVICE_SUBSCRIPTION_NOT_ESTABLISHED,
    )
    from acmecse.etc.Types import CSEType
    from acmecse.resources.Resource import Resource

    class _InCseOnly(Resource):
        def activate(self, parentResource: Any, originator: str) -> None:
            if RC.cseType != CSEType.IN:
                raise OPERATION_NOT_ALLOWED(
                    f"<{self.typeShortname}> is only applicable to an IN-CSE (TS-0004 Table 6.3.4.2.1-1)")
            super().activate(parentResource, originator)

    class M2MServiceSubscriptionProfile(_InCseOnly):
        """<m2mServiceSubscriptionProfile> (ty 11): common attributes only; children svsn and sub."""

    class ServiceSubscribedNode(_InCseOnly):
        """<serviceSubscribedNode> (ty 20)."""

        def validate(self, originator: str | None = None, dct: Any = None, parentResource: Any = None) -> None:
            super().validate(originator, dct, parentResource)
            # TS-0004 §7.4.20.2.1/.3: ruleLinks present but CSE-ID absent -> BAD_REQUEST (create and update)
            if self.rlk is not None and not self.csi:
                raise BAD_REQUEST("ruleLinks (rlk) requires the CSE-ID (csi) attribute")

    class ServiceSubscribedAppRule(_InCseOnly):
        """<serviceSubscribedAppRule> (ty 19). A rule named in the reserved bound-rule form
        (:func:`rspf.ssar.bound_rule_name`) has that name as its resource ID too, must bind exactly one
        credential to one AE-ID, and belongs to the node of the CSE its label names (which must exist); a
        registrar CSE that creates one (an MN-CSE recording its AE) gets its own node in the label."""

        def __init__(self, dct: Any = None, create: bool = False) -> None:
            super().__init__(dct, create=create)
            if create and ssar.is_bound_rule_name(self.rn):
                self.setAttribute("ri", self.rn)  # found by resource ID: one lookup per registration

        def validate(self, originator: str | None = None, dct: Any = None, parentResource: Any = None) -> None:
            super().validate(originator, dct, parentResource)
            # TS-0004 §7.4.29.2.1/.3: every allowedApp-IDs pattern starts with '*', 'R' or 'N'
            for pattern in self.aai or []:
                if not isinstance(pattern, str) or pattern[:1] not in ("*", "R", "N"):
                    raise BAD_REQUEST(f"allowedApp-IDs (aai) entry {pattern!r} must start with '*', 'R' or 'N'")
            registrar = _registrar_originator(originator)
            if registrar is not None and not ssar.is_bound_rule_name(self.rn):
                raise BAD_REQUEST(f"a registrar CSE ({registrar}) may write only the rule of one credential, named "
                                  f"{ssar.BOUND_PREFIX}<32 hex digits>")
            if ssar.is_bound_rule_name(self.rn):
                try:
                    ssar.check_bound_rule({a: self[a] for a in ("rn", "apci", "aae", "aai")})
                except RspfError as exc:
                    raise BAD_REQUEST(str(exc)) from None
                if registrar is not None and ssar.node_of(self.lbl) not in (None, registrar):
                    raise BAD_REQUEST(f"a rule recorded by {registrar} is linked from its own node only")

        def activate(self, parentResource: Any, originator: str) -> None:
            super().activate(parentResource, originator)
            if ssar.is_bound_rule_name(self.rn):
                owner = _registrar_originator(originator) or ssar.node_of(self.lbl) or RC.cseCsi
                self.setAttribute("lbl", [ssar.node_label(owner)])
                if find_service_subscribed_node(owner) is None:
                    raise SERVICE_SUBSCRIPTION_NOT_ESTABLISHED(f"no <serviceSubscribedNode> for {owner}")

    _classes.update(MSSP=M2MServiceSubscriptionProfile, SVSN=ServiceSubscribedNode, ASAR=ServiceSubscribedAppRule)
    return _classes


# ==================================================================================== lookups
def _dispatcher() -> Any:
    from acmecse.runtime import CSE

    if CSE.dispatcher is None:  # pragma: no cover
        raise RuntimeError("ACME is not running")
    return CSE.dispatcher


def _norm_cse_id(value: str | None) -> str | None:
    """CSE-ID in SP-relative form ``/id`` (``id``, ``/id`` and ``//<this CSE's SP>/id`` are the same CSE)."""
    from acmecse.etc.Constants import RuntimeConstants as RC

    return ids.sp_relative_cse_id(value, RC.cseSPid or None)


def same_cse(a: str | None, b: str | None) -> bool:
    """Whether two CSE-IDs (``id``, ``/id`` or ``//<this SP>/id``) name the same CSE."""
    na = _norm_cse_id(a)
    return na is not None and na == _norm_cse_id(b)


def find_service_subscribed_node(cse_id: str) -> Any | None:
    """The <serviceSubscribedNode> whose CSE-ID (``csi``) is ``cse_id``, or None.

    CSE-IDs are compared in SP-relative form: ``id-in``, ``/id-in`` and ``//<this SP>/id-in`` are the same
    CSE (the attribute is stored exactly as it was written, with or without the leading slash). With more
    than one match the oldest (by creationTime, then resource ID) wins.
    """
    from acmecse.etc.Types import ResourceTypes

    want = _norm_cse_id(cse_id)
    if want is None:
        return None
    # ACME finds resources by type with a scan of all resources, by resource ID directly: remember the
    # node's ID and re-check it (it may have been deleted or changed) before trusting it.
    cached = _by_ri(_svsn_cache.get(want))
    if cached is not None and cached.ty == SVSN and _norm_cse_id(cached.csi) == want:
        return cached
    found = [r for r in _dispatcher().retrieveResourcesByType(ResourceTypes.SVSN) if _norm_cse_id(r.csi) == want]
    if not found:
        _svsn_cache.pop(want, None)
        return None
    found.sort(key=lambda r: (r.ct or "", r.ri or ""))
    _svsn_cache[want] = found[0].ri
    return found[0]


_svsn_cache: dict[str, str] = {}   # SP-relative CSE-ID -> resource ID of its <serviceSubscribedNode>


def _by_ri(ri: str | None) -> Any | None:
    """A local resource by its resource ID (a direct lookup in ACME's storage), or None."""
    from acmecse.etc.ResponseStatusCodes import ResponseException

    if not ri:
        return None
    try:
        return _dispatcher().retrieveLocalResource(ri)
    except ResponseException:
        return None


def resolve_local(link: str) -> Any | None:
    """The local resource a oneM2M ID names, or None.

    Accepts an unstructured resource ID (``asar123``), a CSE-relative structured path (``cse-in/rule``),
    SP-relative and absolute forms of either (``/id-in/asar123``, ``//sp/id-in/cse-in/rule``, ``-/rule``),
    and as a convenience a bare resource name of a direct child of the CSEBase (``rule``).
    IDs of other CSEs and URLs give None.
    """
    from acmecse.etc.Constants import RuntimeConstants as RC
    from acmecse.etc.IDUtils import localResourceID
    from acmecse.etc.ResponseStatusCodes import ResponseException

    if not link or not isinstance(link, str) or "://" in link:
        return None
    local = localResourceID(link.strip())
    if not local:
        return None
    disp = _dispatcher()
    candidates = [local]
    if "/" not in local and local != RC.cseRn:
        candidates.append(f"{RC.cseRn}/{local}")
    for candidate in candidates:
        try:
            return disp.retrieveResource(candidate)
        except ResponseException:
            continue
    return None


def rules_of(svsn: Any) -> list[Any]:
    """The <serviceSubscribedAppRule> resources the node's ruleLinks point at, in link order.

    Links may be resource IDs or structured paths (see :func:`resolve_local`); links to missing, remote or
    non-asar resources are skipped, duplicates returned once. No ruleLinks (or an empty list) gives [].
    """
    if svsn is None:
        return []
    links = svsn.rlk if hasattr(svsn, "rlk") else (svsn.get("rlk") if isinstance(svsn, dict) else None)
    rules: list[Any] = []
    seen: set[str] = set()
    for link in links or []:
        res = resolve_local(link)
        if res is None or res.ty != ASAR or res.ri in seen:
            continue
        seen.add(res.ri)
        rules.append(res)
    return rules


def registration_rules(svsn: Any, credential_id: str | None) -> list[Any]:
    """The rules a registration with ``credential_id`` at the node ``svsn``'s CSE is checked against, without a
    scan over every recorded credential: the credential's own bound rule (one lookup by resource ID; used only
    if its label names this node's CSE), then the rules the node links (the operator's)."""
    if svsn is None:
        return []
    rules: list[Any] = []
    if credential_id:
        own = _by_ri(ssar.bound_rule_name(credential_id))
        if own is not None and own.ty == ASAR and same_cse(ssar.node_of(own.lbl), svsn.csi):
            rules.append(own)
    return rules + rules_of({"rlk": _operator_links(svsn)})


_operator_links_cache: dict[str, tuple[str, list[str]]] = {}  # node ri -> (its lastModifiedTime, other links)


def _operator_links(svsn: Any) -> list[str]:
    """The node's links that are not bound rules, remembered per node until its lastModifiedTime changes (every
    UPDATE sets it)."""
    if svsn is None:
        return []
    cached = _operator_links_cache.get(svsn.ri)
    if cached is not None and svsn.lt and cached[0] == svsn.lt:
        return cached[1]
    links = ssar.other_links(svsn.rlk)
    _operator_links_cache[svsn.ri] = (svsn.lt, links)
    return links


def bound_rule(credential_id: str) -> Any | None:
    """The bound rule of ``credential_id`` (see :mod:`rspf.ssar`), or None."""
    rule = _by_ri(ssar.bound_rule_name(credential_id))
    return rule if rule is not None and rule.ty == ASAR else None


# ==================================================================================== updates
def _cse_originator() -> str:
    from acmecse.etc.Constants import RuntimeConstants as RC

    return RC.cseOriginator


def _registrar_originator(originator: str | None) -> str | None:
    """The originator as a registrar CSE recording at this IN-CSE (an SP-relative CSE-ID other than this CSE's),
    or None (this CSE itself, its admin, an AE)."""
    from acmecse.etc.Constants import RuntimeConstants as RC

    if not originator or not originator.startswith("/") or originator.startswith("//"):
        return None
    return None if same_cse(originator, RC.cseCsi) else originator


def record_binding(binding: ssar.Binding, cse_id: str) -> str:
    """Make a rule that admits ``binding`` -- and nothing else -- belong to the node of ``cse_id`` at this IN-CSE.

    Creates the credential's bound rule, updates one whose lists differ from the binding, and relabels one that
    belonged to another node. Idempotent; serialised with every other rule write of this process. Returns the
    rule's resource ID. Raises LookupError if there is no node for ``cse_id`` (and ACME's ResponseException if
    ACME refuses a write).
    """
    from acmecse.etc.Constants import RuntimeConstants as RC
    from acmecse.etc.Types import ResourceTypes

    with _rule_lock:
        node = find_service_subscribed_node(cse_id)
        if node is None:
            raise LookupError(f"no <serviceSubscribedNode> for {cse_id}")
        existing = bound_rule(binding.credential_id)
        plan = ssar.plan_recording(binding, cse_id, existing)
        disp = _dispatcher()
        if plan.create is not None:
            disp.createResourceFromDict({"m2m:asar": plan.create}, RC.cseRi, ResourceTypes.ASAR, _cse_originator())
        elif plan.update is not None:
            disp.updateLocalResource(existing, {"m2m:asar": plan.update}, originator=_cse_originator())
        return binding.name


def forget_binding(credential_id: str) -> bool:
    """Delete the bound rule of ``credential_id``. Whether there was one."""
    with _rule_lock:
        rule = bound_rule(credential_id)
        if rule is None:
            return False
        _dispatcher().deleteLocalResource(rule, originator=_cse_originator())
        return True


def ensure_subscription(cse_id: str, base_rule: str, allowed_app_ids: Iterable[str] = ("*",),
                        node_id: str | None = None) -> Any:
    """Make sure AE registrations on ``cse_id`` can be checked: a node for it, linking the operator's rule.

    Idempotent; creates, as the CSE's admin originator, whatever is missing of:

    * ``<CSEBase>/<base_rule>``: a <serviceSubscribedAppRule> with ``aai = allowed_app_ids`` and no ``apci`` /
      ``aae`` (it allows nothing: it is where the operator lists certificate credentials or wildcard entries;
      enrolled credentials get bound rules of their own, :func:`record_binding`);
    * a <serviceSubscribedNode> for ``cse_id`` (``ni = node_id`` or the CSE-ID without its slash), in a new
      <m2mServiceSubscriptionProfile> ``rspf-mssp`` -- unless a node for that CSE-ID already exists;
    * a ruleLink from that node to the rule (appended to an existing node's ruleLinks).

    An existing rule is left as it is (its aai is not changed). Returns the rule resource.
    """
    from acmecse.etc.Constants import RuntimeConstants as RC
    from acmecse.etc.Types import ResourceTypes

    disp = _dispatcher()
    origin = _cse_originator()
    with _rule_lock:
        rule = resolve_local(f"{RC.cseRn}/{base_rule}")
        if rule is None:
            rule, *_ = disp.createResourceFromDict({"m2m:asar": {"rn": base_rule, "aai": list(allowed_app_ids)}},
                                                  RC.cseRi, ResourceTypes.ASAR, origin)
        elif rule.ty != ASAR:
            raise ValueError(f"{RC.cseRn}/{base_rule} exists and is not a <serviceSubscribedAppRule>")
        svsn = find_service_subscribed_node(cse_id)
        if svsn is None:
            mssp = resolve_local(f"{RC.cseRn}/rspf-mssp")
            if mssp is None:
                mssp, *_ = disp.createResourceFromDict({"m2m:mssp": {"rn": "rspf-mssp"}}, RC.cseRi,
                                                       ResourceTypes.MSSP, origin)
            elif mssp.ty != MSSP:
                raise ValueError(f"{RC.cseRn}/rspf-mssp exists and is not an <m2mServiceSubscriptionProfile>")
            ni = node_id or (cse_id.lstrip("/") or cse_id)
            disp.createResourceFromDict({"m2m:svsn": {"ni": ni, "csi": cse_id, "rlk": [rule.ri]}}, mssp.ri,
                                        ResourceTypes.SVSN, origin)
        elif rule.ri not in {r.ri for r in rules_of({"rlk": _operator_links(svsn)})}:
            disp.updateLocalResource(svsn, {"m2m:svsn": {"rlk": list(svsn.rlk or []) + [rule.ri]}},
                                     originator=origin)
        return rule
