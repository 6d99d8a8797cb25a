"""oneM2M identifier forms, in one place (TS-0001 §7.2; HTTP paths per TS-0009 §6.2). Pure: no I/O.

* SP-ID ``//sp.example.com``;
* CSE-ID, SP-relative ``/id-in``; absolute ``//sp.example.com/id-in``;
* AE-ID ``Cxyz`` / ``Sxyz`` (CSE-relative), ``/id-in/Cxyz`` (SP-relative), ``//sp/id-in/Cxyz`` (absolute);
* the HTTP path of an ID: absolute ``//sp/x`` -> ``/_/sp/x``, SP-relative ``/x`` -> ``/~/x``, CSE-relative
  ``x`` -> ``/x``.

The character sets are the project's (a subset of what TS-0001 allows, safe in URLs, file names and FQDN
labels); they are checked wherever an identifier enters the system.
"""

from __future__ import annotations

import re

from .errors import BadRequest

SP_ID_RE = re.compile(r"//[A-Za-z0-9.-]+")
CSE_ID_RE = re.compile(r"/[A-Za-z0-9.~-]+")
AE_ID_RE = re.compile(r"[CS][A-Za-z0-9.~-]*")
ABSOLUTE_ID_RE = re.compile(r"//[A-Za-z0-9.-]+(/[A-Za-z0-9.~-]+){1,2}")
#: Any originator form a request may carry (CSE-relative, SP-relative or absolute; at most 256 characters)
ORIGINATOR_RE = re.compile(r"[A-Za-z0-9._~/-]{1,256}")
RESOURCE_NAME_RE = re.compile(r"[A-Za-z0-9._~-]{1,64}")


def is_cse_id(value: str) -> bool:
    """An SP-relative CSE-ID (``/id-in``)."""
    return bool(CSE_ID_RE.fullmatch(value or ""))


def is_ae_id(value: str) -> bool:
    """A CSE-relative AE-ID (``Cxyz`` / ``Sxyz``)."""
    return bool(AE_ID_RE.fullmatch(value or ""))


def is_absolute_id(value: str) -> bool:
    """An absolute CSE-ID or AE-ID (``//sp/id-in`` or ``//sp/id-in/Cxyz``)."""
    return bool(ABSOLUTE_ID_RE.fullmatch(value or ""))


def absolute_id(any_id: str, sp_id: str, registrar_cse_id: str | None = None) -> str:
    """Absolute form ``//sp/...`` of a CSE-ID (``/id``) or of an AE-ID (``C...``/``S...`` under its registrar)."""
    if any_id.startswith("//"):
        return any_id
    if any_id.startswith("/"):
        return sp_id + any_id
    if registrar_cse_id:
        return sp_id + registrar_cse_id + "/" + any_id
    raise BadRequest(f"{any_id!r} is neither an SP-relative nor an absolute ID")


def sp_relative_cse_id(value: str | None, own_sp_id: str | None) -> str | None:
    """A CSE-ID in SP-relative form ``/id``: ``id`` -> ``/id``; ``//<own SP>/id`` -> ``/id``. Another SP's
    CSE-ID keeps its absolute form; an empty value gives None."""
    if not value or not isinstance(value, str):
        return None
    v = value.strip().rstrip("/")
    if v.startswith("//"):
        if own_sp_id and v.startswith(own_sp_id + "/"):
            v = v[len(own_sp_id):]
        else:
            return v
    return v if v.startswith("/") else "/" + v


def http_path(oid: str) -> str:
    """The HTTP request path of a oneM2M ID or resource address (TS-0009 §6.2.2)."""
    if oid.startswith("//"):
        return "/_/" + oid[2:]
    if oid.startswith("/"):
        return "/~" + oid
    return "/" + oid
