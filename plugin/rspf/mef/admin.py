"""Validation of enrolee and target registrations (admin CLI: add, update, import).

Every field is checked before anything is written; a batch import validates every row and writes them all in
one transaction, or writes nothing. What is allowed but suspicious (a registrar with no
credential to fetch keys, a repeated Kpm or Node-ID) is returned as warnings.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .. import ids, keys
from ..errors import BadRequest
from ..fileutil import check_private
from ..secret import Secret
from . import protocol
from .store import EnroleeRecord, MefStore, TargetGrant

PSK_ID_RE = re.compile(r"[\x21-\x7e]{1,128}")
NODE_ID_RE = re.compile(r"[\x21-\x7e]{1,256}")
URI_RE = re.compile(r"(https|http|coaps|mqtts)://[\x21-\x7e]{1,1000}")
REGISTRAR_URI_RE = re.compile(r"https://[\x21-\x7e]{1,1000}")
APP_ID_RE = re.compile(r"[\x21-\x3a\x3c-\x7e]+")  # printable ASCII without spaces and ';' (the CSV separator)

FIELDS = ("kpm_id", "kpm", "enrolee_id", "node_id", "registrar_cse_id", "registrar_uri", "targets", "rm_uri",
          "enrolment_expiry_seconds", "valid_until", "allowed_app_ids", "certificates")
REQUIRED = ("kpm_id", "kpm", "enrolee_id", "node_id", "registrar_cse_id", "registrar_uri")
#: An optional column of `enrolee import`: the ID the enrolee's certificate names (then kpm_id/kpm may be empty)
CERT_ID_COLUMN = "cert_id"
#: Fields `enrolee update` may change (the KpmID, Kpm and Enrolee-ID stay; a new Kpm is `rotate-kpm`)
UPDATABLE = tuple(f for f in FIELDS if f not in ("kpm_id", "kpm", "enrolee_id"))


def parse_kpm(text: str) -> Secret:
    try:
        value = bytes.fromhex(text.strip())
    except ValueError:
        raise BadRequest("kpm must be hexadecimal") from None
    if not 16 <= len(value) <= 64:
        raise BadRequest(f"kpm must be 16 to 64 bytes (32 recommended), got {len(value)}")
    return Secret(value, "Kpm")


def parse_targets(value: Any) -> list[TargetGrant]:
    """Targets as ``/id-in:22;/id-x:22,23`` or a JSON list of {"id", "suids"}."""
    if value in (None, ""):
        return []
    items: list[tuple[str, list[int]]] = []
    if isinstance(value, str):
        for part in value.split(";"):
            part = part.strip()
            if not part:
                continue
            tid, sep, suids = part.rpartition(":")
            if not sep or not tid:
                raise BadRequest(f"target {part!r} must look like /id-in:22 or /id-in:22,23")
            try:
                items.append((tid, [int(s) for s in suids.split(",")]))
            except ValueError:
                raise BadRequest(f"target {part!r}: SUIDs must be numbers") from None
    elif isinstance(value, list):
        for t in value:
            if not isinstance(t, dict) or not isinstance(t.get("id"), str) or not isinstance(t.get("suids"), list):
                raise BadRequest('each target must be {"id": "/id-in", "suids": [22]}')
            items.append((t["id"], t["suids"]))
    else:
        raise BadRequest("targets must be text like /id-in:22 or a list")
    grants = []
    for tid, suid_list in items:
        if not (ids.is_cse_id(tid) or ids.is_absolute_id(tid)):
            raise BadRequest(f"target {tid!r} must be an SP-relative CSE-ID (/id-in) or an absolute ID (//sp/id-in)")
        for s in suid_list:
            try:
                keys.encode_suid(s)
            except BadRequest:
                raise BadRequest(f"targets: {tid!r} has SUID {s!r}, which is not an m2m:suid value "
                                 "(TS-0004 Table 6.3.4.2.39-1)") from None
        grants.append(TargetGrant(tid, tuple(sorted(set(suid_list)))))
    return grants


def parse_app_ids(value: Any) -> tuple[str, ...] | None:
    """Allowed App-ID patterns as ``Nmy-app;Nother*`` or a JSON list; None or "" when not set."""
    if value in (None, ""):
        return None
    if isinstance(value, str):
        items: list[Any] = [v.strip() for v in value.split(";")]
    elif isinstance(value, list):
        items = value
    else:
        raise BadRequest("allowed_app_ids must be text like Nmy-app;Nother* or a list")
    patterns: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise BadRequest("allowed_app_ids: each App-ID pattern must be text")
        if not item:
            raise BadRequest("allowed_app_ids: an App-ID pattern is empty")
        if len(item) > protocol.MAX_APP_ID_LENGTH:
            raise BadRequest(f"allowed_app_ids: the pattern {item[:40]!r}... is longer than "
                             f"{protocol.MAX_APP_ID_LENGTH} characters")
        if not APP_ID_RE.fullmatch(item):
            raise BadRequest(f"allowed_app_ids: {item!r} must be printable ASCII without spaces or ';'")
        if item not in patterns:
            patterns.append(item)
    if len(patterns) > protocol.MAX_ALLOWED_APP_IDS:
        raise BadRequest(f"allowed_app_ids: at most {protocol.MAX_ALLOWED_APP_IDS} patterns, got {len(patterns)}")
    return tuple(patterns)


def _check_row(row: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(k for k in row if k not in allowed)
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}")
    for name in allowed:
        if name in row and row[name] is not None and not isinstance(row[name], (str, int, list)):
            raise BadRequest(f"{name} has an unusable type")


def _text(row: dict[str, Any], name: str) -> str:
    v = row.get(name)
    if v in (None, ""):
        raise BadRequest(f"{name} is required")
    if not isinstance(v, str):
        raise BadRequest(f"{name} must be text")
    return v.strip()


def _record(row: dict[str, Any], *, sp_id: str) -> EnroleeRecord:
    """Validate every field of an enrolee but its Kpm; raise BadRequest naming the field."""
    kpm_id = _text(row, "kpm_id")
    if not PSK_ID_RE.fullmatch(kpm_id):
        raise BadRequest("kpm_id must be 1 to 128 printable ASCII characters without spaces")
    enrolee_id = _text(row, "enrolee_id")
    if not (ids.is_cse_id(enrolee_id) or ids.is_ae_id(enrolee_id)):
        raise BadRequest("enrolee_id must be a CSE-ID (/id-mn) or an AE-ID starting with C or S (Cmy-sensor)")
    node_id = _text(row, "node_id")
    if not NODE_ID_RE.fullmatch(node_id):
        raise BadRequest("node_id must be 1 to 256 printable ASCII characters without spaces")
    registrar = _text(row, "registrar_cse_id")
    if not ids.is_cse_id(registrar):
        raise BadRequest("registrar_cse_id must be an SP-relative CSE-ID such as /id-in")
    try:
        keys.target_fqdn(sp_id + registrar)
    except BadRequest:
        raise BadRequest("registrar_cse_id cannot be written as an FQDN label (use letters, digits, '-')") from None
    uri = _text(row, "registrar_uri")
    if not REGISTRAR_URI_RE.fullmatch(uri):
        raise BadRequest("registrar_uri must be the https:// URI of the registrar's CSEBase, e.g. "
                         "https://in.example.com:8443/cse-in (an enrolee reaches its registrar over TLS only)")
    targets = parse_targets(row.get("targets"))
    rm_uri = row.get("rm_uri") or None
    if rm_uri is not None and (not isinstance(rm_uri, str) or not URI_RE.fullmatch(rm_uri)):
        raise BadRequest("rm_uri must be a URI")
    expiry = row.get("enrolment_expiry_seconds")
    if expiry in (None, ""):
        expiry = None
    else:
        try:
            expiry = int(expiry)
        except (TypeError, ValueError):
            raise BadRequest("enrolment_expiry_seconds must be a whole number") from None
        if expiry < 60:
            raise BadRequest("enrolment_expiry_seconds must be at least 60")
    until = row.get("valid_until")
    valid_until = None
    if until not in (None, ""):
        try:
            valid_until = dt.datetime.fromisoformat(str(until))
        except ValueError:
            raise BadRequest("valid_until must be an ISO 8601 date-time, e.g. 2027-12-31T00:00:00Z") from None
        if valid_until.tzinfo is None:
            valid_until = valid_until.replace(tzinfo=dt.UTC)
    return EnroleeRecord(kpm_id=kpm_id, enrolee_id=enrolee_id, node_id=node_id, registrar_cse_id=registrar,
                         registrar_uri=uri, targets=targets, rm_uri=rm_uri, enrolment_expiry_seconds=expiry,
                         valid_until=valid_until, allowed_app_ids=parse_app_ids(row.get("allowed_app_ids")),
                         may_certify=parse_flag(row.get("certificates"), "certificates"))


def parse_flag(value: Any, name: str) -> bool:
    """A yes/no field (JSON true/false, or CSV text); absent or empty: no."""
    if value in (None, ""):
        return False
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1"):
        return True
    if text in ("false", "no", "0"):
        return False
    raise BadRequest(f"{name} must be true or false")


def enrolee_from_fields(row: dict[str, Any], *, sp_id: str) -> tuple[EnroleeRecord, Secret]:
    """Validate one enrolee's fields; raise BadRequest naming the field."""
    _check_row(row, FIELDS)
    for name in REQUIRED:
        if row.get(name) in (None, ""):
            raise BadRequest(f"{name} is required")
    rec = _record(row, sp_id=sp_id)
    return rec, parse_kpm(_text(row, "kpm"))


def updated_enrolee(rec: EnroleeRecord, changes: dict[str, Any], *, sp_id: str) -> EnroleeRecord:
    """``rec`` with ``changes`` (field name -> new value; None or "" clears an optional field), validated
    like a new registration. Its state, times and Kpm generation are kept."""
    _check_row(changes, UPDATABLE)
    if not changes:
        raise BadRequest("nothing to change: name at least one field")
    current: dict[str, Any] = {
        "kpm_id": rec.kpm_id, "enrolee_id": rec.enrolee_id, "node_id": rec.node_id,
        "registrar_cse_id": rec.registrar_cse_id, "registrar_uri": rec.registrar_uri,
        "targets": [{"id": t.target_id, "suids": list(t.suids)} for t in rec.targets], "rm_uri": rec.rm_uri,
        "enrolment_expiry_seconds": rec.enrolment_expiry_seconds,
        "valid_until": rec.valid_until.isoformat() if rec.valid_until else None,
        "allowed_app_ids": list(rec.allowed_app_ids) if rec.allowed_app_ids is not None else None,
        "certificates": rec.may_certify,
    }
    new = _record({**current, **changes}, sp_id=sp_id)
    return replace(new, state=rec.state, created=rec.created, last_enrolled=rec.last_enrolled,
                   kpm_generation=rec.kpm_generation, cert_id=rec.cert_id, has_kpm=rec.has_kpm)


def with_certificate_id(row: dict[str, Any], cert_id: str, *, sp_id: str) -> tuple[EnroleeRecord, Secret | None]:
    """An enrolee that authenticates with a certificate naming ``cert_id`` (rspf.tls.certificate_onem2m_id):
    besides a Kpm when ``row`` has kpm_id and kpm, else alone (its handle, the kpm_id column, is then
    ``cert_id``). Raise BadRequest naming the field."""
    cert_id = cert_id.strip()
    if not PSK_ID_RE.fullmatch(cert_id):
        raise BadRequest("the certificate ID must be 1 to 128 printable ASCII characters without spaces (the "
                         "oneM2M ID the certificate names, e.g. /id-mn1 or Cmy-sensor)")
    if row.get("kpm") in (None, "") and row.get("kpm_id") in (None, ""):
        row = {k: v for k, v in row.items() if k not in ("kpm_id", "kpm")}  # a batch's empty columns
        _check_row(row, tuple(f for f in FIELDS if f not in ("kpm_id", "kpm")))
        for name in REQUIRED[2:]:
            if row.get(name) in (None, ""):
                raise BadRequest(f"{name} is required")
        return replace(_record({**row, "kpm_id": cert_id}, sp_id=sp_id), cert_id=cert_id, has_kpm=False), None
    rec, kpm = enrolee_from_fields(row, sp_id=sp_id)
    return replace(rec, cert_id=cert_id), kpm


class Fetchers:
    """Who can fetch keys from this MEF: the IDs (absolute form) of the registered, unrevoked Enrolment
    Target credentials, plus enrolled CSEs (which may fetch with their KpmID)."""

    def __init__(self, store: MefStore, sp_id: str) -> None:
        self._store, self._sp_id = store, sp_id
        self._targets = {ids.absolute_id(t.target_id, sp_id) for t in store.list_targets() if not t.revoked}
        self._batch_cses: set[str] = set()
        self._enrolled: dict[str, bool] = {}  # CSE-IDs looked up in the store (registrars are few)

    def add_batch_cse(self, enrolee_id: str) -> None:
        """A CSE enrolee of the batch being imported (it will be able to fetch once imported)."""
        if ids.is_cse_id(enrolee_id):
            self._batch_cses.add(ids.absolute_id(enrolee_id, self._sp_id))

    def can_fetch(self, target_id: str) -> bool:
        absolute = ids.absolute_id(target_id, self._sp_id)
        if absolute in self._targets or absolute in self._batch_cses:
            return True
        relative = ids.sp_relative_cse_id(absolute, self._sp_id)
        if not relative or not ids.is_cse_id(relative):
            return False
        if relative not in self._enrolled:
            if len(self._enrolled) >= 10_000:
                self._enrolled.clear()
            self._enrolled[relative] = self._store.has_enrolee_id(relative)
        return self._enrolled[relative]


def credential_warnings(rec: EnroleeRecord, fetchers: Fetchers) -> list[str]:
    """A registrar or Target of this enrolee with no credential to fetch its keys with (yet)."""
    warnings = []
    for target_id in [rec.registrar_cse_id, *(t.target_id for t in rec.targets)]:
        if not fetchers.can_fetch(target_id):
            role = "registrar" if target_id == rec.registrar_cse_id else "Enrolment Target"
            warnings.append(f"the {role} {target_id} has no Enrolment Target credential at this MEF (and is not an "
                            "enrolled CSE): it cannot fetch this enrolee's keys until 'rspf mef target add' "
                            "registers one")
    return warnings


def registration_warnings(store: MefStore, rec: EnroleeRecord, kpm: Secret | None, fetchers: Fetchers) -> list[str]:
    """What is suspicious but allowed about a registration: a registrar or Target with no credential to fetch
    keys with (yet), a Kpm or Node-ID another enrolee already has."""
    warnings = credential_warnings(rec, fetchers)
    if kpm is not None:
        others = [k for k in store.enrolees_with_kpm(kpm) if k != rec.kpm_id]
        if others:
            warnings.append(f"its Kpm is also the Kpm of {', '.join(others[:5])}: every Kpm should be unique")
    others = [k for k in store.enrolees_with_node_id(rec.node_id) if k != rec.kpm_id]
    if others:
        warnings.append(f"its Node-ID {rec.node_id} is also registered for {', '.join(others[:5])}")
    return warnings


@dataclass
class RowError:
    line: int
    message: str


def read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, row) from a CSV file (header row) or (position in the list, row) from a JSON file (a
    list of objects), both read as a stream: memory stays bounded however long the file."""
    with path.open(encoding="utf-8-sig", newline="") as head:
        start = head.read(4096)
    if path.suffix.lower() == ".json" or start.lstrip().startswith("["):
        with path.open(encoding="utf-8-sig") as f:
            # JSON rows are numbered by their position (1-based) in the list
            for i, item in enumerate(_JsonList(f, path).items(), 1):
                yield i, item if isinstance(item, dict) else {"__not_an_object__": item}
        return
    with path.open(encoding="utf-8-sig", newline="") as f:
        lines = _LineTracker(f)
        reader = csv.DictReader(lines)
        if reader.fieldnames is None:
            raise BadRequest(f"{path} is empty")
        missing = [name for name in REQUIRED if name not in reader.fieldnames]
        if missing:
            raise BadRequest(f"{path}: the CSV header lacks column(s) {', '.join(missing)}")
        lines.mark()
        for row in reader:
            line = lines.mark()  # a record may span lines (quoted newlines): report where it starts
            if None in row:
                yield line, {"__extra_columns__": row[None]}
                continue
            yield line, {k: v for k, v in row.items() if v not in (None, "")}


class _LineTracker:
    """The lines of a file as the csv module reads them, remembering where the record being read starts (its
    first non-blank line since the last :meth:`mark`)."""

    def __init__(self, f: Iterable[str]) -> None:
        self._lines = iter(f)
        self._number = 0
        self._first: int | None = None

    def __iter__(self) -> _LineTracker:
        return self

    def __next__(self) -> str:
        text = next(self._lines)
        self._number += 1
        if self._first is None and text.strip():
            self._first = self._number
        return text

    def mark(self) -> int:
        """The first non-blank line read since the last mark (the start of the record just read)."""
        first, self._first = self._first or self._number, None
        return first


class _JsonList:
    """The items of the JSON list a file holds, decoded one at a time as the file is read (an item may not be
    longer than MAX_ITEM characters: an enrolee object is a few hundred)."""

    CHUNK = 1 << 16
    MAX_ITEM = 1 << 20
    _SPACE = re.compile(r"[ \t\r\n]*")
    _NUMBER_TAIL = re.compile(r"[0-9.eE+-]*")

    def __init__(self, f: Any, path: Path) -> None:
        self._f, self._path = f, path
        self._buf, self._pos, self._eof = "", 0, False
        self._decoder = json.JSONDecoder()

    def items(self) -> Iterator[Any]:
        if self._next_char() != "[":
            self._value(0)  # the error a non-JSON file deserves, if it is one
            raise BadRequest(f"{self._path} must hold a JSON list of enrolee objects")
        self._pos += 1
        if self._next_char() == "]":
            self._pos += 1
        else:
            n = 0
            while True:
                n += 1
                yield self._value(n)
                sep = self._next_char()
                if sep not in (",", "]"):
                    raise self._invalid(f"after item {n}: expected ',' or ']'")
                self._pos += 1
                if sep == "]":
                    break
        if self._next_char():
            raise self._invalid("more data after the list")

    def _value(self, n: int) -> Any:
        """Decode the value at the read position (the n-th item), reading more of the file as it needs."""
        self._next_char()
        while True:
            try:
                value, end = self._decoder.raw_decode(self._buf, self._pos)
            except ValueError as exc:  # a JSONDecodeError, or a number longer than Python converts
                if len(self._buf) - self._pos > self.MAX_ITEM or not self._fill():
                    where = f"item {n}" if n else "its start"
                    raise self._invalid(f"{where}: {getattr(exc, 'msg', exc)}") from None
                continue
            # a number may go on in the next chunk ('-1' of '-1500.0'): decode again once more is read
            if (_run_end(self._NUMBER_TAIL, self._buf, end) < len(self._buf)
                    or len(self._buf) - self._pos > self.MAX_ITEM or not self._fill()):
                self._pos = end
                return value

    def _next_char(self) -> str:
        """The next non-blank character (not consumed), '' at the end of the file."""
        while True:
            self._pos = _run_end(self._SPACE, self._buf, self._pos)
            if self._pos < len(self._buf):
                return self._buf[self._pos]
            if not self._fill():
                return ""

    def _fill(self) -> bool:
        chunk = "" if self._eof else self._f.read(self.CHUNK)
        self._eof = not chunk
        if chunk:
            self._buf, self._pos = self._buf[self._pos:] + chunk, 0
        return bool(chunk)

    def _invalid(self, what: str) -> BadRequest:
        return BadRequest(f"{self._path} is not valid JSON: {what}")


def _run_end(chars: re.Pattern[str], text: str, pos: int) -> int:
    """Where the run of ``chars`` (a pattern that also matches nothing) starting at ``pos`` ends."""
    match = chars.match(text, pos)
    return match.end() if match else pos


@dataclass
class ImportResult:
    count: int  # written (or, for a dry run, that would be written)
    errors: list[RowError]  # the first MAX_REPORTS by line
    warnings: list[RowError]  # the first MAX_REPORTS by line
    error_count: int = 0  # how many in all
    warning_count: int = 0


#: Bad rows and warnings an import reports one by one (the rest are counted)
MAX_REPORTS = 1000
#: How often an import reports progress (rows read)
PROGRESS_EVERY = 10_000


def import_enrolees(store: MefStore, path: Path, *, sp_id: str, progress: Callable[[int], None] | None = None,
                    dry_run: bool = False) -> ImportResult:
    """Validate every row; if all are good (and not ``dry_run``) write them in one transaction. The file is read
    twice, as a stream (its CSE enrolees may fetch keys for the AEs before them), and the rows are checked
    against each other and the store in the store (rspf.mef.store.MefStore.import_enrolees): memory stays
    bounded for millions of rows. The file holds keys: one readable by group or others is refused like a key
    file."""
    check_private(path, "enrolee batch file")
    fetchers = Fetchers(store, sp_id)
    for _line, row in read_rows(path):
        if isinstance(row.get("enrolee_id"), str):
            fetchers.add_batch_cse(row["enrolee_id"].strip())
    errors: list[RowError] = []
    warnings: list[RowError] = []
    counts = {"errors": 0, "warnings": 0, "rows": 0}

    def report(into: list[RowError], kind: str, line: int, message: str) -> None:
        counts[kind] += 1
        if len(into) < MAX_REPORTS:
            into.append(RowError(line, message))

    def good_rows() -> Iterator[tuple[int, EnroleeRecord, Secret | None]]:
        for line, row in read_rows(path):
            counts["rows"] += 1
            if progress and counts["rows"] % PROGRESS_EVERY == 0:
                progress(counts["rows"])
            try:
                if "__not_an_object__" in row:
                    raise BadRequest("is not a JSON object")
                if "__extra_columns__" in row:
                    raise BadRequest("has more columns than the header")
                cert_id = row.pop(CERT_ID_COLUMN, None)  # optional: an enrolee that authenticates by certificate
                if cert_id not in (None, ""):
                    rec, kpm = with_certificate_id(row, str(cert_id), sp_id=sp_id)
                else:
                    rec, kpm = enrolee_from_fields(row, sp_id=sp_id)
            except BadRequest as exc:
                report(errors, "errors", line, str(exc))
                continue
            for note in credential_warnings(rec, fetchers):
                report(warnings, "warnings", line, note)
            yield line, rec, kpm

    check = store.import_enrolees(good_rows(), dry_run=dry_run, max_reports=MAX_REPORTS,
                                  rejected=lambda: counts["errors"] > 0)
    if progress and counts["rows"] % PROGRESS_EVERY:
        progress(counts["rows"])
    all_errors = sorted(errors + [RowError(line, m) for line, m in check.errors], key=lambda e: e.line)
    all_warnings = sorted(warnings + [RowError(line, m) for line, m in check.warnings], key=lambda e: e.line)
    error_count, warning_count = counts["errors"] + check.error_count, counts["warnings"] + check.warning_count
    if error_count:
        return ImportResult(0, all_errors[:MAX_REPORTS], all_warnings[:MAX_REPORTS], error_count, warning_count)
    if not counts["rows"]:
        return ImportResult(0, [RowError(0, "the file holds no enrolees")], all_warnings, 1, warning_count)
    return ImportResult(check.written, [], all_warnings[:MAX_REPORTS], 0, warning_count)
