"""Rules that bind: matching AE registrations against <serviceSubscribedAppRule> resources, and the plans for
recording an enrolled credential in them (TS-0001 §9.6.29, §10.2.2.2; TS-0003 §8.3.1.2 NOTE 3/4).

Pure: no ACME, no I/O. A rule is read as a mapping of its short attribute names (``apci``, ``aai``, ``aae``,
``ari``, ``rlk`` of a node); :mod:`rspf.acme.resources` reads and writes the ACME resources these plans describe.

**Layout (project decision, docs/acme-plugin.md).** Every credential whose key came from the MEF gets a rule
of its own, the *bound rule*: ``applicableCredIDs = [its Credential-ID]``, ``allowedAEs = [its AE-ID]``,
``allowedApp-IDs =`` the App-IDs the MEF sent with the key (or the Target's configured default). Standard
matching (any rule whose three lists all match) then admits the credential only with its own AE-ID and its
own App-IDs, and no other credential with them. The bound rule's resource name **and** resource ID are
:func:`bound_rule_name` of the Credential-ID, so a registration finds its credential's rule with one lookup by
resource ID, however many credentials are recorded (no scan over all rules). The rule names the
``<serviceSubscribedNode>`` it belongs to (the node of the CSE the AE registers with: the IN-CSE's own, or an
MN-CSE's at the IN-CSE) in a label, :func:`node_label`; it is **not** listed in that node's ``ruleLinks``: a list
that grew with every enrolled AE would cost in proportion to all of them at every registration (read, copied
and stored whole), so ``ruleLinks`` keeps only the operator's rules and a node's bound rules are its rules
labelled with it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import ids
from .errors import BadRequest

__all__ = [
    "BOUND_PREFIX",
    "Binding",
    "Plan",
    "admits",
    "bound_rule_name",
    "bound_rule_of",
    "check_app_ids",
    "check_bound_rule",
    "is_bound_rule_name",
    "matches",
    "node_label",
    "node_of",
    "other_links",
    "plan_recording",
    "rule_allows",
]

#: Resource name (and resource ID) prefix of bound rules; ``rspf-cred-<32 hex digits>`` is reserved for them.
BOUND_PREFIX = "rspf-cred-"
_BOUND_RE = re.compile(re.escape(BOUND_PREFIX) + r"[0-9a-f]{32}")
#: Most App-ID patterns one bound rule holds (the MEF's answer is bounded the same way).
MAX_APP_IDS = 64


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
    if value in patterns:  # exact entries (bound rules) are the common case: no pattern scan
        return True
    return any(matches(p, value) for p in patterns if isinstance(p, str) and "*" in p)


def _get(rule: Any, attr: str) -> Any:
    if isinstance(rule, Mapping):
        return rule.get(attr)
    return getattr(rule, attr, None)


def rule_allows(rule: Any, credential_id: str | None, app_id: str, ae_id_stem: str | None) -> bool:
    """TS-0001 §10.2.2.2 step 003 against one <serviceSubscribedAppRule> (a mapping or an object with the
    short attribute names).

    * Credential-ID: matches an ``apci`` pattern; without ``apci`` the rule applies only to a registration
      *without* security association (``credential_id`` None or empty);
    * App-ID: matches an ``aai`` pattern (no ``aai``: no App-ID is allowed);
    * AE-ID-Stem: matches an ``aae`` pattern (no ``aae``: none allowed). An absent From is ``""`` and
      matches only ``*``; the bare ``C``/``S`` of a fresh registration matches ``C*``/``S*``.
    """
    apci = _get(rule, "apci")
    if apci is None:
        if credential_id:
            return False
    elif not credential_id or not _any_match(apci, credential_id):
        return False
    return _any_match(_get(rule, "aai"), app_id or "") and _any_match(_get(rule, "aae"), ae_id_stem or "")


def admits(rules: Iterable[Any], credential_id: str | None, app_id: str, ae_id_stem: str | None) -> bool:
    """Whether any of ``rules`` allows the registration (TS-0001 §10.2.2.2: one matching rule suffices)."""
    return any(rule_allows(r, credential_id, app_id, ae_id_stem) for r in rules)


# ================================================================================ bound rules
def bound_rule_name(credential_id: str) -> str:
    """The resource name and resource ID of a credential's bound rule: ``rspf-cred-`` and the first 32 hex
    digits of SHA-256 of the Credential-ID (a valid resource name of fixed length for any Credential-ID)."""
    return BOUND_PREFIX + hashlib.sha256(credential_id.encode()).hexdigest()[:32]


def is_bound_rule_name(value: str | None) -> bool:
    """Whether ``value`` has the reserved form of a bound rule's name (see :func:`bound_rule_name`)."""
    return bool(value) and bool(_BOUND_RE.fullmatch(value or ""))


def _link_tail(link: str) -> str:
    """The last path element of a ruleLink (``asar1``, ``cse-in/rule``, ``/id-in/rule`` -> the last part)."""
    return link.rsplit("/", 1)[-1]


def other_links(rule_links: Sequence[str] | None) -> list[str]:
    """The node's ruleLinks that are not bound rules (the operator's rules: certificate credentials, wildcard
    rules, rules for registrations without a credential). A bound rule counts for a node through its label, never
    through a link (one an operator wrote is ignored): only these are resolved one by one at registration."""
    return [link for link in rule_links or [] if isinstance(link, str) and not is_bound_rule_name(_link_tail(link))]


@dataclass(frozen=True)
class Binding:
    """What a bound rule records: the credential, the one AE-ID it may register, and its App-ID patterns."""

    credential_id: str
    ae_id: str
    app_ids: tuple[str, ...]

    @classmethod
    def of(cls, credential_id: str, enrolee_id: str, allowed_app_ids: Sequence[str] | None,
           default_app_ids: Sequence[str]) -> Binding:
        """The binding of a key fetched from the MEF: ``allowed_app_ids`` as the MEF sent them (None: the MEF
        set none, so ``default_app_ids`` apply). Raises BadRequest for values a rule cannot hold."""
        if not credential_id or "*" in credential_id:
            raise BadRequest(f"Credential-ID {credential_id!r} cannot be recorded in a rule")
        if not ids.is_ae_id(enrolee_id):
            raise BadRequest(f"Enrolee-ID {enrolee_id!r} is not an AE-ID: only AEs are recorded in rules")
        apps = tuple(default_app_ids if allowed_app_ids is None else allowed_app_ids)
        check_app_ids(apps)
        return cls(credential_id, enrolee_id, apps)

    @property
    def name(self) -> str:
        return bound_rule_name(self.credential_id)

    def attributes(self, cse_id: str) -> dict[str, Any]:
        """The bound rule's attributes; ``cse_id`` is the CSE whose node links it (kept as a label)."""
        return {"rn": self.name, "apci": [self.credential_id], "aae": [self.ae_id], "aai": list(self.app_ids),
                "lbl": [node_label(cse_id)]}


def check_app_ids(app_ids: Sequence[str]) -> None:
    """allowedApp-IDs patterns as TS-0004 §7.4.29.2.1 wants them (each starts with ``*``, ``R`` or ``N``)."""
    if len(app_ids) > MAX_APP_IDS:
        raise BadRequest(f"at most {MAX_APP_IDS} App-ID patterns may be recorded for one credential")
    for app in app_ids:
        if not isinstance(app, str) or app[:1] not in ("*", "R", "N") or not ids.ORIGINATOR_RE.fullmatch(
                app.replace("*", "x")):
            raise BadRequest(f"App-ID pattern {app!r} must start with '*', 'R' or 'N' and use ID characters only")


_NODE_LABEL = "rspf:node="


def node_label(cse_id: str) -> str:
    """The label of a bound rule naming the CSE whose <serviceSubscribedNode> links it."""
    return _NODE_LABEL + cse_id


def node_of(labels: Sequence[str] | None) -> str | None:
    """The CSE-ID a bound rule's labels name (see :func:`node_label`), or None."""
    for label in labels or []:
        if isinstance(label, str) and label.startswith(_NODE_LABEL):
            return label[len(_NODE_LABEL):] or None
    return None


#: Credential-ID types a bound rule may hold: a MEF key (12) and an AE's certificate from the MEF's CA (33)
BOUND_CREDENTIAL_TYPES = ("12-", "33-")


def check_bound_rule(attrs: Mapping[str, Any]) -> Binding:
    """The binding a bound rule written by a registrar CSE (an MN-CSE asking the IN-CSE to record) describes.

    A resource name of the reserved form must hold exactly one credential (a MEF key, type 12, or a certificate
    the MEF's CA issued to an AE, type 33, whose value is then that AE-ID), exactly one AE-ID without wildcard,
    and its name must be that credential's :func:`bound_rule_name`; otherwise it is a BadRequest and nothing is
    created. A registrar can so record only rules that bind, never a wildcard rule.
    """
    apci, aae, aai = attrs.get("apci"), attrs.get("aae"), attrs.get("aai")
    if not (isinstance(apci, list) and len(apci) == 1 and isinstance(apci[0], str)
            and apci[0].startswith(BOUND_CREDENTIAL_TYPES)):
        raise BadRequest("a bound rule holds exactly one applicableCredIDs entry, the Credential-ID of a MEF key "
                         "(12-) or of an AE's MEF-issued certificate (33-)")
    if not (isinstance(aae, list) and len(aae) == 1 and isinstance(aae[0], str)):
        raise BadRequest("a bound rule holds exactly one allowedAEs entry, the AE-ID of its enrolee")
    if apci[0].startswith("33-") and aae[0] != apci[0][3:]:
        raise BadRequest("the rule of a certificate Credential-ID (33-<AE-ID>) allows that AE-ID only")
    if not isinstance(aai, list):
        raise BadRequest("a bound rule needs its allowedApp-IDs")
    binding = Binding.of(apci[0], aae[0], aai, ())
    if attrs.get("rn") != binding.name:
        raise BadRequest(f"the rule for {binding.credential_id} must be named {binding.name}")
    return binding


def bound_rule_of(rule: Any) -> Binding | None:
    """The binding a stored bound rule holds, or None if it does not have that shape (then it binds nothing)."""
    try:
        return check_bound_rule({a: _get(rule, a) for a in ("rn", "apci", "aae", "aai")})
    except BadRequest:
        return None


# ==================================================================================== recording
@dataclass(frozen=True)
class Plan:
    """What recording a binding takes: create the rule, or update it (its lists, or the node its label names)."""

    create: dict[str, Any] | None = None
    update: dict[str, Any] | None = None

    @property
    def nothing(self) -> bool:
        return self.create is None and self.update is None


def plan_recording(binding: Binding, cse_id: str, existing: Any | None) -> Plan:
    """How to make a rule that holds ``binding`` and belongs to the node of ``cse_id``.

    ``existing`` is the stored rule with the binding's resource ID (None: there is none). A stored rule
    with other lists (the MEF now sends other App-IDs, or the credential names another AE-ID) is updated to
    the binding, and one labelled with another node (the AE moved to another registrar) is relabelled; one
    already equal is left alone. Idempotent: recording twice plans nothing the second time.
    """
    wanted = binding.attributes(cse_id)
    if existing is None:
        return Plan(create=wanted)
    update = {a: wanted[a] for a in ("apci", "aae", "aai") if list(_get(existing, a) or []) != wanted[a]}
    if node_of(_get(existing, "lbl")) != cse_id:
        update["lbl"] = wanted["lbl"]
    return Plan(update=update or None)
