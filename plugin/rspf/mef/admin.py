"""Validation of enrolee and target registrations (admin CLI: add, import).

Every field is checked before anything is written; a batch import validates every row first and then
writes them all in one transaction, or writes nothing.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import ids, keys
from ..errors import BadRequest
from ..secret import Secret
from .store import EnroleeRecord, MefStore, TargetGrant

PSK_ID_RE = re.compile(r"[\x21-\x7e]{1,128}")
NODE_ID_RE = re.compile(r"[\x21-\x7e]{1,256}")
URI_RE = re.compile(r"(https|http|coaps|mqtts)://[\x21-\x7e]{1,1000}")

FIELDS = ("kpm_id", "kpm", "enrolee_id", "node_id", "registrar_cse_id", "registrar_uri", "targets", "rm_uri",
          "enrolment_expiry_seconds", "valid_until")
REQUIRED = ("kpm_id", "kpm", "enrolee_id", "node_id", "registrar_cse_id", "registrar_uri")


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


def enrolee_from_fields(row: dict[str, Any], *, sp_id: str) -> tuple[EnroleeRecord, Secret]:
    """Validate one enrolee's fields; raise BadRequest naming the field."""
    unknown = sorted(k for k in row if k not in FIELDS)
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}")
    for name in REQUIRED:
        if row.get(name) in (None, ""):
            raise BadRequest(f"{name} is required")
    for name in FIELDS:
        if name in row and row[name] is not None and not isinstance(row[name], (str, int, list)):
            raise BadRequest(f"{name} has an unusable type")

    def text(name: str) -> str:
        v = row[name]
        if not isinstance(v, str):
            raise BadRequest(f"{name} must be text")
        return v.strip()

    kpm_id = text("kpm_id")
    if not PSK_ID_RE.fullmatch(kpm_id):
        raise BadRequest("kpm_id must be 1 to 128 printable ASCII characters without spaces")
    kpm = parse_kpm(text("kpm"))
    enrolee_id = text("enrolee_id")
    if not (ids.is_cse_id(enrolee_id) or ids.is_ae_id(enrolee_id)):
        raise BadRequest("enrolee_id must be a CSE-ID (/id-mn) or an AE-ID starting with C or S (Cmy-sensor)")
    node_id = text("node_id")
    if not NODE_ID_RE.fullmatch(node_id):
        raise BadRequest("node_id must be 1 to 256 printable ASCII characters without spaces")
    registrar = text("registrar_cse_id")
    if not ids.is_cse_id(registrar):
        raise BadRequest("registrar_cse_id must be an SP-relative CSE-ID such as /id-in")
    try:
        keys.target_fqdn(sp_id + registrar)
    except BadRequest:
        raise BadRequest("registrar_cse_id cannot be written as an FQDN label (use letters, digits, '-')") from None
    uri = text("registrar_uri")
    if not URI_RE.fullmatch(uri):
        raise BadRequest("registrar_uri must be the CSEBase URI, e.g. https://in.example.com:8443/cse-in")
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
    rec = EnroleeRecord(kpm_id=kpm_id, enrolee_id=enrolee_id, node_id=node_id, registrar_cse_id=registrar,
                        registrar_uri=uri, targets=targets, rm_uri=rm_uri, enrolment_expiry_seconds=expiry,
                        valid_until=valid_until)
    return rec, kpm


@dataclass
class RowError:
    line: int
    message: str


def read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, row) from a CSV file (header row) or a JSON file (a list of objects)."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json" or text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise BadRequest(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(data, list):
            raise BadRequest(f"{path} must hold a JSON list of enrolee objects")
        # JSON rows are numbered by their position (1-based) in the list
        for i, item in enumerate(data, 1):
            yield i, item if isinstance(item, dict) else {"__not_an_object__": item}
        return
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None:
        raise BadRequest(f"{path} is empty")
    missing = [f for f in REQUIRED if f not in reader.fieldnames]
    if missing:
        raise BadRequest(f"{path}: the CSV header lacks column(s) {', '.join(missing)}")
    physical = text.splitlines()
    end = reader.line_num  # last physical line consumed so far (the header)
    for row in reader:
        # a record may span lines (quoted newlines) and blank lines are skipped: report where it starts
        line = end + 1
        while line <= len(physical) and not physical[line - 1].strip():
            line += 1
        end = reader.line_num
        if None in row:
            yield line, {"__extra_columns__": row[None]}
            continue
        yield line, {k: v for k, v in row.items() if v not in (None, "")}


def import_enrolees(store: MefStore, path: Path, *, sp_id: str,
                    progress: Callable[[int], None] | None = None) -> tuple[int, list[RowError]]:
    """Validate every row; if all are good write them in one transaction. Returns (written, errors)."""
    good: list[tuple[EnroleeRecord, Secret]] = []
    errors: list[RowError] = []
    seen_kpm: dict[str, int] = {}
    seen_eid: dict[str, int] = {}
    for n, (line, row) in enumerate(read_rows(path), 1):
        if progress and n % 500 == 0:
            progress(n)
        try:
            if "__not_an_object__" in row:
                raise BadRequest("is not a JSON object")
            if "__extra_columns__" in row:
                raise BadRequest("has more columns than the header")
            rec, kpm = enrolee_from_fields(row, sp_id=sp_id)
            if rec.kpm_id in seen_kpm:
                raise BadRequest(f"kpm_id {rec.kpm_id} repeats the one on line {seen_kpm[rec.kpm_id]}")
            if rec.enrolee_id in seen_eid:
                raise BadRequest(f"enrolee_id {rec.enrolee_id} repeats the one on line {seen_eid[rec.enrolee_id]}")
            if store.get_enrolee(rec.kpm_id) is not None or store.get_target(rec.kpm_id) is not None:
                raise BadRequest(f"kpm_id {rec.kpm_id} is already registered")
            if store.has_enrolee_id(rec.enrolee_id):
                raise BadRequest(f"enrolee_id {rec.enrolee_id} is already registered")
            seen_kpm[rec.kpm_id] = line
            seen_eid[rec.enrolee_id] = line
            good.append((rec, kpm))
        except BadRequest as exc:
            errors.append(RowError(line, str(exc)))
    if errors:
        return 0, errors
    if not good:
        return 0, [RowError(0, "the file holds no enrolees")]
    return store.add_enrolees(good), []
