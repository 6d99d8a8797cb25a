"""Who may send what on which port: the originator checks of TS-0004 §7.3.2.1 for the ACME plugin.

Sans-I/O: functions of the request's method, Content-Type, From (``X-M2M-Origin``) and the credential of the
security association, with lookups passed in; they return nothing when the request may go on to ACME and
raise an :class:`~rspf.errors.RspfError` (one RSC each) when it is refused. The plugin (``plugin.py``) calls
them from its WSGI middlewares; docs/acme-plugin.md lists every check with its RSC per port and mode.

* :func:`check_associated` -- a request *within* a security association (the secure listener): the From must
  be the association's AE-ID (or, for a CSE, its CSE-ID or an AE-ID under it), else 4106.
* :func:`check_unassociated` -- a request *outside* one (ACME's plain port) with ``enforcement = on``:
  a CSE-ID or the CSE's admin (unless the operator lists it) -> 4107; a non-create request from an AE-ID that
  is not registered here -> 4106; from an AE that registered with a credential -> 4107.

Refusals are logged by the plugin through :class:`rspf.ratelimit.RefusalLog`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from ..errors import BadRequest, NotAuthenticated, SecurityAssociationRequired
from ..wire import MAX_REQUEST_ID
from ..wsgi import PeerCredential

AE_TYPE = 2  #: resource type <AE>


# ------------------------------------------------------------------------------------ identifiers
@dataclass(frozen=True)
class Originator:
    """A From parameter, by form (TS-0001 §7.2: CSE-relative / SP-relative / absolute)."""

    raw: str
    kind: str               # "absent", "cse" (a CSE-ID) or "ae" (an AE-ID)
    cse_id: str | None      # the SP-relative CSE-ID it names, or that an AE-ID is registered with (None: here)
    stem: str | None        # the AE-ID-Stem of an AE-ID

    def local_stem(self, own_cse_id: str) -> str | None:
        """The AE-ID-Stem if this is the AE-ID of an AE registered with the CSE ``own_cse_id``."""
        if self.kind == "ae" and self.cse_id in (None, own_cse_id):
            return self.stem
        return None

    def canonical(self, own_cse_id: str) -> str:
        """One spelling per identity: a local AE-ID as its stem, a CSE-ID SP-relative, anything else as given."""
        if (stem := self.local_stem(own_cse_id)) is not None:
            return stem
        if self.kind == "cse" and self.cse_id:
            return self.cse_id
        return self.raw


def parse_originator(value: str | None, sp_id: str | None = None) -> Originator:
    """Classify a From value. An absolute ID in this CSE's SP (``sp_id``, e.g. ``//sp.example.com``) is read as
    its SP-relative form; one in another SP keeps its absolute form (it is never local)."""
    raw = value or ""
    if not raw:
        return Originator(raw, "absent", None, None)
    if raw.startswith("//"):
        sp, _, rest = raw[2:].partition("/")
        prefix = "" if sp_id and sp_id.lstrip("/") == sp else f"//{sp}"
        csi, _, stem = rest.partition("/")
        if stem:
            return Originator(raw, "ae", f"{prefix}/{csi}", stem)
        return Originator(raw, "cse", f"{prefix}/{csi}", None)
    if raw.startswith("/"):
        csi, _, stem = raw[1:].partition("/")
        if stem:
            return Originator(raw, "ae", f"/{csi}", stem)
        return Originator(raw, "cse", f"/{csi}", None)
    return Originator(raw, "ae", None, raw)


def shown(value: str | None, limit: int = 80) -> str:
    """An untrusted value as it may appear in a log line: escaped, bounded."""
    if not value:
        return "(none)"
    text = value.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "..."


def valid_request_id(value: str | None) -> bool:
    """X-M2M-RI on the secure listener: present, printable ASCII (spaces too: ACME takes any string), at most
    :data:`rspf.wire.MAX_REQUEST_ID` characters. The MEF's own rule (rspf.wire) also refuses spaces."""
    return bool(value) and len(value or "") <= MAX_REQUEST_ID and all(" " <= c <= "~" for c in value or "")


def resource_type(content_type: str | None) -> int | None:
    """The ``ty`` parameter of a oneM2M Content-Type (``application/json;ty=2``), if any."""
    for param in (content_type or "").split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "ty":
            try:
                return int(value.strip())
            except ValueError:
                return None
    return None


# ------------------------------------------------------------------------------------------ checks
def check_associated(cred: PeerCredential, origin: str, own_cse_id: str, sp_id: str | None = None) -> None:
    """TS-0004 §7.3.2.1, within a security association: the From must match the Registree's ID(s)."""
    bound = cred.enrolee_id
    if not bound:
        raise NotAuthenticated(f"the credential {cred.credential_id} names no AE-ID or CSE-ID, so no originator is "
                               "authenticated by it")
    o = parse_originator(origin, sp_id)
    if bound.startswith("/"):  # a CSE: its own CSE-ID, or the AE-IDs it forwards for (SP-relative, under it)
        if (o.kind == "cse" and o.cse_id == bound) or (o.kind == "ae" and o.cse_id == bound):
            return
    elif o.local_stem(own_cse_id) == bound:
        return
    raise NotAuthenticated(f"the originator {shown(origin)} is not the identity {bound} bound to this security "
                           f"association (credential {cred.credential_id})")


#: What the plugin knows of an AE-ID on this CSE: (registered, Credential-ID it registered with, or None).
AeRecord = tuple[bool, str | None]


def check_unassociated(method: str, ty: int | None, origin: str, *, own_cse_id: str, sp_id: str | None,
                       admins: Collection[str], listed: Collection[str], lookup: Callable[[str], AeRecord]) -> None:
    """TS-0004 §7.3.2.1 outside a security association, plus the plugin's own rules for ``enforcement = on``.

    ``admins``: the spellings of the CSE's admin originator; ``listed``: the operator's
    ``plainPortOriginators``; ``lookup(stem)``: whether an AE with that AE-ID-Stem is registered here, and
    the Credential-ID it registered with.
    """
    o = parse_originator(origin, sp_id)
    create_ae = method == "POST" and ty == AE_TYPE
    if o.kind == "absent":
        if create_ae:
            return  # an AE registration may leave From out (the CSE assigns the AE-ID)
        raise BadRequest("the request has no originator (X-M2M-Origin); only an AE registration may omit it")
    me = o.canonical(own_cse_id)
    if me in {parse_originator(x, sp_id).canonical(own_cse_id) for x in listed}:
        return
    if o.kind == "cse":
        raise SecurityAssociationRequired(f"the originator {shown(origin)} is a CSE-ID: a CSE is served only within "
                                          "a security association (the CSE's secure listener)")
    if me in {parse_originator(x, sp_id).canonical(own_cse_id) for x in admins}:
        raise SecurityAssociationRequired(f"the originator {shown(origin)} is this CSE's admin, which the operator "
                                          "has not listed in [rspf] plainPortOriginators")
    if create_ae:
        return  # the AE registration check (TS-0001 §10.2.2.2) follows, with no Credential-ID
    stem = o.local_stem(own_cse_id)
    registered, credential_id = lookup(stem) if stem else (False, None)
    if not registered:
        raise NotAuthenticated(f"the originator {shown(origin)} is not an AE registered with this CSE")
    if credential_id:
        raise SecurityAssociationRequired(f"the AE {stem} registered with the credential {credential_id} and is "
                                          "served only within a security association of it")
