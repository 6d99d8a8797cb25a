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
:func:`find_service_subscribed_node`, :func:`rules_of`, :func:`rule_allows`, :func:`matches`,
:func:`add_to_rule`, :func:`ensure_subscription`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from .. import ids

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
    "add_to_rule",
    "ensure_subscription",
    "find_service_subscribed_node",
    "matches",
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

_rule_lock = threading.Lock()
_classes: dict[str, type] = {}


# ============================================================================ wildcard matching
def matches(pattern: str | None, value: str | None) -> bool:
    """TS-0001 §9.6.29 pattern match: ``*`` matches any run of characters (also none), anywhere.

    ``"*"`` matches everything, ``"C123*X"`` every value that starts with ``C123`` and ends with ``X``,
    ``"C*"`` also the bare ``"C"``. Every other character matches itself (case-sensitive); there are
    no other metacharacters.
    """
    if pattern is None or value is None:
        return False
    parts = pattern.split("*")
    if len(parts) == 1:
        return pattern == value
    head, *middle, tail = parts
    if len(value) < len(head) + len(tail) or not value.startswith(head) or not value.endswith(tail):
        return False
    pos, end = len(head), len(value) - len(tail)
    for part in middle:  # leftmost placement of each middle part is optimal for a '*'-only language
        if not part:
            continue
        found = value.find(part, pos, end)
        if found < 0:
            return False
        pos = found + len(part)
    return True


def _any_match(patterns: Iterable[str] | None, value: str | None) -> bool:
    if not patterns or value is None:
        return False
    if value in patterns:  # exact entries (recorded credentials, AE-IDs) are the common case: no scan
        return True
    return any(matches(p, value) for p in patterns if isinstance(p, str) and "*" in p)


# ============================================================================== resource classes
def resource_classes() -> dict[str, type]:
    """The ACME Resource classes of the three types, by ResourceTypes member name (built lazily: importing
    ACME's Resource needs a configured ACME)."""
    if _classes:
        return _classes
    from acmecse.etc.Constants import RuntimeConstants as RC
    from acmecse.etc.ResponseStatusCodes import BAD_REQUEST, OPERATION_NOT_ALLOWED
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
        """<serviceSubscribedAppRule> (ty 19)."""

        def validate(self, originator: str | None = None, dct: Any = None, parentResource: Any = None) -> None:
            super().validate(originator, dct, parentResource)
            # TS-0004 §7.4.29.2.1/.3: every allowedApp-IDs pattern starts with '*', 'R' or 'N'
            for pattern in self.aai or []:
                if not isinstance(pattern, str) or pattern[:1] not in ("*", "R", "N"):
                    raise BAD_REQUEST(f"allowedApp-IDs (aai) entry {pattern!r} must start with '*', 'R' or 'N'")

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
_series_cache: dict[str, list[str]] = {}  # rule name -> resource IDs of the rule series <name>, <name>-2, ...


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


def rule_allows(rule: Any, credential_id: str | None, app_id: str, ae_id_stem: str | None) -> bool:
    """TS-0001 §10.2.2.2 step 003 against one <serviceSubscribedAppRule>.

    * Credential-ID: matches an ``apci`` pattern; without ``apci`` the rule applies only to a registration
      *without* security association (``credential_id`` None or empty);
    * App-ID: matches an ``aai`` pattern (no ``aai``: no App-ID is allowed);
    * AE-ID-Stem: matches an ``aae`` pattern (no ``aae``: none allowed). An absent From is ``""`` and
      matches only ``*``; the bare ``C``/``S`` of a fresh registration matches ``C*``/``S*``.
    """
    apci = rule.apci if hasattr(rule, "apci") else rule.get("apci")
    aai = rule.aai if hasattr(rule, "aai") else rule.get("aai")
    aae = rule.aae if hasattr(rule, "aae") else rule.get("aae")
    if apci is None:
        if credential_id:
            return False
    elif not credential_id or not _any_match(apci, credential_id):
        return False
    return _any_match(aai, app_id or "") and _any_match(aae, ae_id_stem or "")


# ==================================================================================== updates
def _cse_originator() -> str:
    from acmecse.etc.Constants import RuntimeConstants as RC

    return RC.cseOriginator


def add_to_rule(rule_ri: str, credential_id: str | None, ae_id_stem: str | None) -> None:
    """Append ``credential_id`` to the rule's ``apci`` and ``ae_id_stem`` to its ``aae`` (TS-0003 §8.3.1.2).

    ``rule_ri`` is anything :func:`resolve_local` accepts (resource ID, structured path, or the resource
    name of an asar under the CSEBase). Values already present (exact string) are not added again; nothing
    to add means no UPDATE. The UPDATE runs through ACME's Dispatcher.updateLocalResource as the CSE's
    admin originator, i.e. with attribute validation, lastModifiedTime and <subscription> notifications.
    A module-level lock serialises the read-modify-write of concurrent callers in this process.

    Raises LookupError if there is no such local rule, ValueError if it is not a <serviceSubscribedAppRule>
    (and ACME's ResponseException if ACME refuses the update).
    """
    with _rule_lock:
        _append(_rule(rule_ri), credential_id, ae_id_stem)


def _rule(rule_ri: str) -> Any:
    rule = resolve_local(rule_ri)
    if rule is None:
        raise LookupError(f"no local <serviceSubscribedAppRule> {rule_ri!r}")
    if rule.ty != ASAR:
        raise ValueError(f"{rule_ri!r} is a resource of type {int(rule.ty)}, not a <serviceSubscribedAppRule>")
    return rule


def _append(rule: Any, credential_id: str | None, ae_id_stem: str | None) -> None:
    """Add the values missing from the rule's apci / aae in one UPDATE (caller holds _rule_lock)."""
    update: dict[str, list[str]] = {}
    for attr, value in (("apci", credential_id), ("aae", ae_id_stem)):
        if not value:
            continue
        current = list(rule[attr] or [])
        if value not in current:
            update[attr] = current + [value]
    if update:
        _dispatcher().updateLocalResource(rule, {"m2m:asar": update}, originator=_cse_originator())


#: Entries per rule before recording moves on to the next rule of the series (see record_enrolled).
SHARD_SIZE = 256


def record_enrolled(cse_id: str, ssar: str, credential_id: str, ae_id_stem: str,
                    shard_size: int = SHARD_SIZE) -> str:
    """Record an enrolled credential in the rule series ``<ssar>``, ``<ssar>-2``, ``<ssar>-3``, ...

    ACME validates every list element on every UPDATE, so one ever-growing rule makes each first contact
    slower (measured: 3 ms at 100 entries, 52 ms at 5,000). The series keeps every rule at most
    ``shard_size`` entries long: when the last rule is full, a new one with the same allowedApp-IDs and
    allowedRole-IDs is created and linked from this CSE's <serviceSubscribedNode>. A credential already
    recorded anywhere in the series is not added again. Returns the name of the rule that holds it.
    """
    from acmecse.etc.Constants import RuntimeConstants as RC
    from acmecse.etc.Types import ResourceTypes

    with _rule_lock:
        series = [r for r in (_by_ri(ri) for ri in _series_cache.get(ssar, [])) if r is not None and r.ty == ASAR]
        if not series or series[0].rn != ssar:  # first call, or the series changed: look it up by name
            series = [_rule(f"{RC.cseRn}/{ssar}")]
            while (nxt := resolve_local(f"{RC.cseRn}/{ssar}-{len(series) + 1}")) is not None and nxt.ty == ASAR:
                series.append(nxt)
        for rule in series:
            if credential_id in (rule.apci or []) and ae_id_stem in (rule.aae or []):
                return rule.rn
        target = series[-1]
        if len(target.apci or []) >= shard_size or len(target.aae or []) >= shard_size:
            base = series[0]
            attrs: dict[str, Any] = {"rn": f"{ssar}-{len(series) + 1}"}
            if base.aai is not None:  # copy exactly: an absent aai allows no App-ID, and must stay absent
                attrs["aai"] = list(base.aai)
            if base.ari is not None:
                attrs["ari"] = list(base.ari)
            disp = _dispatcher()
            try:
                target, *_ = disp.createResourceFromDict({"m2m:asar": attrs}, RC.cseRi, ResourceTypes.ASAR,
                                                         _cse_originator())
            except Exception:
                _series_cache.pop(ssar, None)  # e.g. someone else created that name: look the series up again
                raise
            svsn = find_service_subscribed_node(cse_id)
            if svsn is not None:
                disp.updateLocalResource(svsn, {"m2m:svsn": {"rlk": list(svsn.rlk or []) + [target.ri]}},
                                         originator=_cse_originator())
            series.append(target)
        _series_cache[ssar] = [r.ri for r in series]
        _append(target, credential_id, ae_id_stem)
        return target.rn


def forget_cached() -> None:
    """Drop what this module remembers of ACME's resources (after ACME purged its storage in a reset)."""
    with _rule_lock:
        _series_cache.clear()


def ensure_subscription(cse_id: str, ssar: str, allowed_app_ids: Iterable[str] = ("*",),
                        node_id: str | None = None) -> Any:
    """Make sure AE registrations on ``cse_id`` can be checked against the rule named ``ssar``.

    Idempotent; creates, as the CSE's admin originator, whatever is missing of:

    * ``<CSEBase>/<ssar>``: a <serviceSubscribedAppRule> with ``aai = allowed_app_ids`` and no ``apci`` /
      ``aae`` (so it allows nothing until :func:`add_to_rule` records enrolled credentials);
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
        rule = resolve_local(f"{RC.cseRn}/{ssar}")
        if rule is None:
            rule, *_ = disp.createResourceFromDict({"m2m:asar": {"rn": ssar, "aai": list(allowed_app_ids)}},
                                                  RC.cseRi, ResourceTypes.ASAR, origin)
        elif rule.ty != ASAR:
            raise ValueError(f"{RC.cseRn}/{ssar} exists and is not a <serviceSubscribedAppRule>")
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
        elif rule.ri not in {r.ri for r in rules_of(svsn)}:
            disp.updateLocalResource(svsn, {"m2m:svsn": {"rlk": list(svsn.rlk or []) + [rule.ri]}},
                                     originator=origin)
        return rule
