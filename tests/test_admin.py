"""rspf.mef.admin: field validation of enrolee registrations and all-or-nothing batch import."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os

import pytest

from rspf.errors import BadRequest, ConfigError
from rspf.mef.admin import (
    FIELDS,
    _JsonList,
    enrolee_from_fields,
    import_enrolees,
    parse_app_ids,
    parse_targets,
    updated_enrolee,
)
from rspf.mef.store import TargetGrant, TargetRecord
from rspf.secret import Secret

SP_ID = "//sp.example.com"
KPM_HEX = "a1" * 32
HEADER = "kpm_id,kpm,enrolee_id,node_id,registrar_cse_id,registrar_uri,targets,rm_uri,enrolment_expiry_seconds," \
         "valid_until,allowed_app_ids,certificates"


def fields(n: int = 1, **kw):
    row = {"kpm_id": f"dev{n}@mef.example.com", "kpm": KPM_HEX, "enrolee_id": f"/id-mn{n}",
           "node_id": f"urn:dev:ops:{n:03d}", "registrar_cse_id": "/id-in",
           "registrar_uri": "https://in.example.com:8443/cse-in"}
    row.update(kw)
    return row


def csv_line(row: dict) -> str:
    """One CSV record (quoted where needed, e.g. targets '/id-x:22,23')."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow([row.get(f, "") for f in HEADER.split(",")])
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# enrolee_from_fields


def test_good_fields_minimal():
    rec, kpm = enrolee_from_fields(fields(), sp_id=SP_ID)
    assert rec.kpm_id == "dev1@mef.example.com"
    assert rec.enrolee_id == "/id-mn1" and rec.enrolee_type == "CSE"
    assert rec.node_id == "urn:dev:ops:001"
    assert rec.registrar_cse_id == "/id-in"
    assert rec.registrar_uri == "https://in.example.com:8443/cse-in"
    assert rec.targets == [] and rec.rm_uri is None
    assert rec.enrolment_expiry_seconds is None and rec.valid_until is None
    assert kpm == Secret(bytes.fromhex(KPM_HEX))
    assert KPM_HEX not in repr(kpm)


def test_good_fields_full():
    rec, kpm = enrolee_from_fields(fields(
        enrolee_id="Cmy-sensor", kpm=" " + KPM_HEX.upper() + "\n", targets="/id-x:23,22,22; //sp.example.com/id-y:24",
        rm_uri="https://dm.example.com", enrolment_expiry_seconds="3600", valid_until="2027-12-31T00:00:00Z",
    ), sp_id=SP_ID)
    assert rec.enrolee_type == "AE"
    assert kpm == Secret(bytes.fromhex(KPM_HEX))
    assert rec.targets == [TargetGrant("/id-x", (22, 23)), TargetGrant("//sp.example.com/id-y", (24,))]
    assert rec.rm_uri == "https://dm.example.com"
    assert rec.enrolment_expiry_seconds == 3600
    assert rec.valid_until == dt.datetime(2027, 12, 31, tzinfo=dt.UTC)


def test_naive_valid_until_is_utc_and_int_expiry_accepted():
    rec, _ = enrolee_from_fields(fields(valid_until="2027-06-01T12:00:00", enrolment_expiry_seconds=60), sp_id=SP_ID)
    assert rec.valid_until == dt.datetime(2027, 6, 1, 12, tzinfo=dt.UTC)
    assert rec.enrolment_expiry_seconds == 60


def test_targets_as_json_list():
    grants = parse_targets([{"id": "/id-x", "suids": [24, 23]}])
    assert grants == [TargetGrant("/id-x", (23, 24))]
    assert parse_targets("") == [] and parse_targets(None) == [] and parse_targets(" ; ") == []


BAD_FIELDS = [
    # (field, bad value, the field name the message must contain)
    ("kpm_id", "has space", "kpm_id"),
    ("kpm_id", "x" * 129, "kpm_id"),
    ("kpm_id", 12, "kpm_id"),
    ("kpm", "zz" * 32, "kpm"),
    ("kpm", "ab" * 15, "kpm"),
    ("kpm", "ab" * 65, "kpm"),
    ("kpm", 1234, "kpm"),
    ("enrolee_id", "id-mn1", "enrolee_id"),
    ("enrolee_id", "Xsensor", "enrolee_id"),
    ("enrolee_id", "/id mn", "enrolee_id"),
    ("node_id", "has space", "node_id"),
    ("node_id", "n" * 257, "node_id"),
    ("registrar_cse_id", "id-in", "registrar_cse_id"),
    ("registrar_cse_id", "/id~in", "registrar_cse_id"),
    ("registrar_uri", "ftp://in.example.com", "registrar_uri"),
    ("registrar_uri", "in.example.com", "registrar_uri"),
    ("targets", "id-x:22", "target"),
    ("targets", "/id-x:abc", "target"),
    ("targets", "/id-x", "target"),
    ("targets", 5, "targets"),
    ("targets", [{"id": "/id-x"}], "target"),
    ("rm_uri", "dm.example.com", "rm_uri"),
    ("rm_uri", 7, "rm_uri"),
    ("enrolment_expiry_seconds", "soon", "enrolment_expiry_seconds"),
    ("enrolment_expiry_seconds", "59", "enrolment_expiry_seconds"),
    ("enrolment_expiry_seconds", 3.5, "enrolment_expiry_seconds"),
    ("valid_until", "31/12/2027", "valid_until"),
    ("valid_until", {"y": 2027}, "valid_until"),
    ("surprise", "x", "surprise"),
]


@pytest.mark.parametrize("name, value, named", BAD_FIELDS)
def test_each_bad_field_is_named(name, value, named):
    with pytest.raises(BadRequest) as info:
        enrolee_from_fields(fields(**{name: value}), sp_id=SP_ID)
    assert named in str(info.value)


@pytest.mark.parametrize("name", ["kpm_id", "kpm", "enrolee_id", "node_id", "registrar_cse_id", "registrar_uri"])
@pytest.mark.parametrize("missing", ["absent", "empty", "none"])
def test_each_required_field_is_named(name, missing):
    row = fields()
    if missing == "absent":
        del row[name]
    else:
        row[name] = "" if missing == "empty" else None
    with pytest.raises(BadRequest, match=f"^{name} is required"):
        enrolee_from_fields(row, sp_id=SP_ID)


def test_bad_kpm_is_never_echoed():
    bad = "SECRET" + "ab" * 31
    with pytest.raises(BadRequest) as info:
        enrolee_from_fields(fields(kpm=bad), sp_id=SP_ID)
    assert bad not in str(info.value) and "ab" * 31 not in str(info.value)


@pytest.mark.parametrize("targets", ["/id-x:99", [{"id": "/id-x", "suids": ["22"]}]])
def test_bad_target_suid_is_named(targets):
    with pytest.raises(BadRequest) as info:
        enrolee_from_fields(fields(targets=targets), sp_id=SP_ID)
    assert "target" in str(info.value)


# ---------------------------------------------------------------------------------------------
# import_enrolees


@pytest.fixture(autouse=True)
def private_files():
    """Batch files hold keys: the tests write them 0600, as an operator must."""
    old = os.umask(0o077)
    yield
    os.umask(old)


def run_import(store, path, **kw):
    result = import_enrolees(store, path, sp_id=SP_ID, **kw)
    return result.count, result.errors


def write_csv(tmp_path, rows: list[str], name="batch.csv"):
    path = tmp_path / name
    path.write_text(HEADER + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_csv_import_good_file(store, tmp_path):
    rows = [csv_line(fields(i)) for i in range(1, 6)]
    rows[2] = csv_line(fields(3, targets="/id-x:22,23;/id-y:24", rm_uri="https://dm.example.com",
                              enrolment_expiry_seconds=600, valid_until="2030-01-01T00:00:00Z"))
    n, errors = run_import(store, write_csv(tmp_path, rows))
    assert (n, errors) == (5, [])
    assert store.count_enrolees() == 5
    e3 = store.get_enrolee("dev3@mef.example.com")
    assert e3.targets == [TargetGrant("/id-x", (22, 23)), TargetGrant("/id-y", (24,))]
    assert e3.enrolment_expiry_seconds == 600 and e3.rm_uri == "https://dm.example.com"
    assert store.enrolee_psk("dev5@mef.example.com") == Secret(bytes.fromhex(KPM_HEX))


def test_csv_import_with_bom_crlf_and_only_required_columns(store, tmp_path):
    path = tmp_path / "b.csv"
    head = "kpm_id,kpm,enrolee_id,node_id,registrar_cse_id,registrar_uri"
    lines = [head] + [",".join(fields(i)[c] for c in head.split(",")) for i in (1, 2)]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    assert run_import(store, path) == (2, [])


def test_json_import_good_file(store, tmp_path):
    rows = [fields(i) for i in range(1, 4)]
    rows[0]["targets"] = [{"id": "/id-x", "suids": [23]}]
    rows[1]["enrolment_expiry_seconds"] = 120
    path = tmp_path / "batch.json"
    path.write_text(json.dumps(rows))
    assert run_import(store, path) == (3, [])
    assert store.get_enrolee("dev1@mef.example.com").targets == [TargetGrant("/id-x", (23,))]
    assert store.get_enrolee("dev2@mef.example.com").enrolment_expiry_seconds == 120


def json_items(text: str, chunk: int = 7, max_item: int = 1 << 20) -> list:
    """The items _JsonList reads from ``text`` in chunks of ``chunk`` characters, checking that its buffer never
    holds more than about two items and two chunks (the bound that keeps a million-row import's memory flat)."""
    reader = _JsonList(io.StringIO(text), "batch.json")
    reader.CHUNK, reader.MAX_ITEM = chunk, max_item
    items, peak = [], 0
    for item in reader.items():
        items.append(item)
        peak = max(peak, len(reader._buf))
    longest = max((len(json.dumps(item, indent=2)) for item in items), default=0)
    assert peak <= 2 * (longest + 16) + 2 * chunk
    return items


@pytest.mark.parametrize("chunk", [1, 2, 7, 64, 1 << 16])
def test_json_list_read_in_chunks_of_any_size_gives_the_same_items(chunk):
    items = [fields(i, targets=[{"id": "/id-x", "suids": [23]}]) for i in range(1, 6)]
    items += [12345678, "a string", None, [1, 2], -1.5e3, True]
    for text in (json.dumps(items), json.dumps(items, indent=2), " \n[ ]\n" if chunk == 1 else "[]"):
        assert json_items(text, chunk) == json.loads(text)


@pytest.mark.parametrize("text, match", [
    ("[" + json.dumps(fields(1)), "after item 1: expected ',' or ']'"),   # cut after an item
    ("[" + json.dumps(fields(1))[:-3], "item 1"),                           # cut inside an item
    ("[" + json.dumps(fields(1)) + ",]", "item 2"),                         # a trailing comma
    ("[" + json.dumps(fields(1)) + "] x", "more data after the list"),
    ("[1 2]", "after item 1"),
    ("[" + "9" * 5000 + "]", "item 1"),                                    # longer than Python converts
    ("[1" + "2" * 3000, "after item 1"),                                   # no end: not buffered past the limit
    ("", "not valid JSON: its start"),
    ("{not json", "not valid JSON: its start"),
    ('{"kpm_id": "x"}', "must hold a JSON list"),
    ('"just a string"', "must hold a JSON list"),
])
def test_json_list_that_is_cut_short_or_not_a_list_is_refused_with_where(text, match):
    with pytest.raises(BadRequest, match=match):
        json_items(text, max_item=1000)


def test_a_json_item_longer_than_the_limit_is_refused_not_buffered_without_end():
    text = "[" + json.dumps({"kpm_id": "x" * 5000}) + "]"
    with pytest.raises(BadRequest, match="item 1"):
        json_items(text, chunk=100, max_item=1000)
    assert json_items(text, chunk=100, max_item=10_000) == json.loads(text)


def test_csv_three_bad_rows_import_nothing_and_report_exact_lines(store, tmp_path):
    rows = [csv_line(fields(i)) for i in range(1, 9)]    # file lines 2..9
    rows[1] = csv_line(fields(2, kpm="nothex"))           # line 3
    rows[4] = csv_line(fields(5, enrolee_id="bad-id"))    # line 6
    rows[7] = csv_line(fields(8, registrar_uri="x"))      # line 9
    path = write_csv(tmp_path, rows)
    n, errors = run_import(store, path)
    assert n == 0
    assert [e.line for e in errors] == [3, 6, 9]
    assert "kpm" in errors[0].message
    assert "enrolee_id" in errors[1].message
    assert "registrar_uri" in errors[2].message
    assert store.count_enrolees() == 0
    # line numbers really are the file's: those lines hold the bad rows
    file_lines = path.read_text().splitlines()
    assert "nothex" in file_lines[3 - 1] and "bad-id" in file_lines[6 - 1] and ",x," in file_lines[9 - 1]


def test_csv_line_numbers_count_blank_lines(store, tmp_path):
    rows = [csv_line(fields(1)), "", csv_line(fields(2, node_id="a b")), "", "", csv_line(fields(3, kpm="00"))]
    n, errors = run_import(store, write_csv(tmp_path, rows))
    assert n == 0 and [e.line for e in errors] == [4, 7]


def test_csv_short_and_long_rows(store, tmp_path):
    rows = [csv_line(fields(1)), "dev2,abc", csv_line(fields(3)) + ",extra,columns"]
    n, errors = run_import(store, write_csv(tmp_path, rows))
    assert n == 0
    assert [e.line for e in errors] == [3, 4]
    assert "required" in errors[0].message and "columns" in errors[1].message


def test_csv_multiline_record_reports_its_first_line(store, tmp_path):
    multi = io.StringIO()
    csv.writer(multi, lineterminator="", quoting=csv.QUOTE_ALL).writerow(
        [fields(2, node_id="two\nlines").get(f, "") for f in HEADER.split(",")])
    rows = [csv_line(fields(1)), multi.getvalue(), csv_line(fields(3))]
    assert rows[1].count("\n") == 1  # the record for line 3 spans lines 3 and 4
    n, errors = run_import(store, write_csv(tmp_path, rows))
    assert n == 0 and [e.line for e in errors] == [3]


def test_json_three_bad_rows_import_nothing_and_report_positions(store, tmp_path):
    rows: list = [fields(i) for i in range(1, 8)]
    rows[1]["kpm"] = "ab"                   # 2
    rows[3] = "not an object"              # 4
    rows[6]["unknown_column"] = 1           # 7
    path = tmp_path / "batch.json"
    path.write_text(json.dumps(rows, indent=2))
    n, errors = run_import(store, path)
    assert n == 0
    assert [e.line for e in errors] == [2, 4, 7]
    assert "unknown_column" in errors[2].message
    assert store.count_enrolees() == 0


def test_duplicates_within_the_file(store, tmp_path):
    rows = [csv_line(fields(i)) for i in range(1, 5)]
    rows.append(csv_line(fields(9, kpm_id="dev2@mef.example.com")))    # line 6: KpmID of line 3
    rows.append(csv_line(fields(10, enrolee_id="/id-mn4")))            # line 7: Enrolee-ID of line 5
    n, errors = run_import(store, write_csv(tmp_path, rows))
    assert n == 0
    assert [(e.line, "line 3" in e.message) for e in errors][0] == (6, True)
    assert errors[1].line == 7 and "line 5" in errors[1].message and "enrolee_id" in errors[1].message
    assert len(errors) == 2
    assert store.count_enrolees() == 0


def test_already_registered_kpm_id_enrolee_id_and_target_identity(store, tmp_path):
    rec, kpm = enrolee_from_fields(fields(1), sp_id=SP_ID)
    store.add_enrolee(rec, kpm)
    store.add_target(TargetRecord("in@sp.example.com", "/id-in"), Secret(b"t" * 32))
    rows = [csv_line(fields(2)),
            csv_line(fields(3, kpm_id="dev1@mef.example.com")),   # line 3: KpmID already registered
            csv_line(fields(4, enrolee_id="/id-mn1")),            # line 4: Enrolee-ID already registered
            csv_line(fields(5, kpm_id="in@sp.example.com")),      # line 5: a Target's PSK identity
            csv_line(fields(6))]
    n, errors = run_import(store, write_csv(tmp_path, rows))
    assert n == 0
    assert [e.line for e in errors] == [3, 4, 5]
    assert all("already registered" in e.message for e in errors)
    assert [e.kpm_id for e in store.list_enrolees()] == ["dev1@mef.example.com"]


def test_empty_files(store, tmp_path):
    only_header = tmp_path / "h.csv"
    only_header.write_text(HEADER + "\n")
    n, errors = run_import(store, only_header)
    assert n == 0 and len(errors) == 1 and "no enrolees" in errors[0].message
    empty_list = tmp_path / "e.json"
    empty_list.write_text("[]")
    assert run_import(store, empty_list)[0] == 0


@pytest.mark.parametrize("name, text, match", [
    ("a.csv", "", "empty"),
    ("b.csv", "kpm_id,kpm,enrolee_id\nx,y,z\n", "lacks column"),
    ("c.json", "{not json", "not valid JSON"),
    ("d.json", '{"kpm_id": "x"}', "JSON list"),
])
def test_unusable_files(store, tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(BadRequest, match=match):
        run_import(store, path)
    assert store.count_enrolees() == 0


def test_fields_constant_matches_the_csv_header():
    assert tuple(HEADER.split(",")) == FIELDS



# ---------------------------------------------------------------------------------------------
# allowed App-IDs, https registrar, update


def test_app_ids_as_text_or_list_deduplicated():
    assert parse_app_ids("Nmy-app; Nother*;Nmy-app") == ("Nmy-app", "Nother*")
    assert parse_app_ids(["Nmy-app", "*"]) == ("Nmy-app", "*")
    assert parse_app_ids(None) is None and parse_app_ids("") is None
    rec, _ = enrolee_from_fields(fields(allowed_app_ids="Nmy-app;Rx*"), sp_id=SP_ID)
    assert rec.allowed_app_ids == ("Nmy-app", "Rx*")
    rec, _ = enrolee_from_fields(fields(), sp_id=SP_ID)
    assert rec.allowed_app_ids is None


@pytest.mark.parametrize("value, match", [
    ("Nmy-app;;Nx", "empty"),
    (["Nmy-app", ""], "empty"),
    ("N" + "x" * 256, "longer than 256"),
    (["has space"], "without spaces"),
    ([f"N{i}" for i in range(65)], "at most 64"),
    ([1, 2], "must be text"),
    (42, "text like"),
])
def test_bad_app_ids_are_refused_with_a_reason(value, match):
    with pytest.raises(BadRequest, match=match):
        parse_app_ids(value)
    with pytest.raises(BadRequest, match="allowed_app_ids"):
        enrolee_from_fields(fields(allowed_app_ids=value), sp_id=SP_ID)


def test_app_ids_at_the_limits_are_accepted():
    assert len(parse_app_ids([f"N{i}" for i in range(64)])) == 64
    assert parse_app_ids(["N" + "x" * 255]) == ("N" + "x" * 255,)


@pytest.mark.parametrize("uri", ["http://in.example.com/cse-in", "coaps://in.example.com/cse-in",
                                 "HTTPS//in.example.com", "https://"])
def test_registrar_uri_must_be_https(uri):
    with pytest.raises(BadRequest, match="registrar_uri must be the https://"):
        enrolee_from_fields(fields(registrar_uri=uri), sp_id=SP_ID)


def test_update_changes_only_the_named_fields(store):
    rec, kpm = enrolee_from_fields(fields(targets="/id-x:22", rm_uri="https://dm.example.com"), sp_id=SP_ID)
    store.add_enrolee(rec, kpm)
    store.suspend_enrolee(rec.kpm_id)
    current = store.get_enrolee(rec.kpm_id)
    new = updated_enrolee(current, {"allowed_app_ids": ["Nmy-app"], "rm_uri": None,
                                    "registrar_uri": "https://in2.example.com/cse-in"}, sp_id=SP_ID)
    assert new.allowed_app_ids == ("Nmy-app",) and new.rm_uri is None
    assert new.registrar_uri == "https://in2.example.com/cse-in"
    assert new.targets == current.targets and new.node_id == current.node_id
    assert (new.state, new.created, new.kpm_generation) == ("suspended", current.created, current.kpm_generation)
    cleared = updated_enrolee(new, {"allowed_app_ids": None, "targets": None}, sp_id=SP_ID)
    assert cleared.allowed_app_ids is None and cleared.targets == []


@pytest.mark.parametrize("changes, match", [
    ({}, "nothing to change"),
    ({"kpm": KPM_HEX}, "unknown field"),
    ({"enrolee_id": "/id-other"}, "unknown field"),
    ({"registrar_uri": "http://in.example.com/cse-in"}, "https://"),
    ({"node_id": None}, "node_id is required"),
    ({"enrolment_expiry_seconds": 5}, "at least 60"),
    ({"allowed_app_ids": [""]}, "empty"),
])
def test_bad_updates_are_refused(store, changes, match):
    rec, _kpm = enrolee_from_fields(fields(), sp_id=SP_ID)
    with pytest.raises(BadRequest, match=match):
        updated_enrolee(rec, changes, sp_id=SP_ID)


# ---------------------------------------------------------------------------------------------
# import: private files, dry run, warnings


def test_a_batch_file_readable_by_others_is_refused(store, tmp_path):
    path = write_csv(tmp_path, [csv_line(fields(1))])
    for mode in (0o644, 0o640, 0o604):
        os.chmod(path, mode)
        with pytest.raises(ConfigError, match="readable by group or others"):
            import_enrolees(store, path, sp_id=SP_ID)
        with pytest.raises(ConfigError, match="chmod 600"):
            import_enrolees(store, path, sp_id=SP_ID, dry_run=True)
    assert store.count_enrolees() == 0


def test_dry_run_validates_and_changes_nothing(store, tmp_path):
    good = write_csv(tmp_path, [csv_line(fields(i)) for i in (1, 2)])
    result = import_enrolees(store, good, sp_id=SP_ID, dry_run=True)
    assert (result.count, result.errors) == (2, [])
    assert store.count_enrolees() == 0
    bad = write_csv(tmp_path, [csv_line(fields(1)), csv_line(fields(2, node_id=""))], name="bad.csv")
    result = import_enrolees(store, bad, sp_id=SP_ID, dry_run=True)
    assert result.count == 0 and [(e.line, "node_id" in e.message) for e in result.errors] == [(3, True)]
    assert store.count_enrolees() == 0


def test_app_ids_column_is_imported(store, tmp_path):
    path = write_csv(tmp_path, [csv_line(fields(1, allowed_app_ids="Nmy-app;Nx*")), csv_line(fields(2))])
    assert run_import(store, path) == (2, [])
    assert store.get_enrolee("dev1@mef.example.com").allowed_app_ids == ("Nmy-app", "Nx*")
    assert store.get_enrolee("dev2@mef.example.com").allowed_app_ids is None


def test_warnings_for_a_registrar_without_target_and_repeated_kpm_or_node_id(store, tmp_path):
    rec0, kpm0 = enrolee_from_fields(fields(0, kpm="b2" * 32, node_id="urn:dev:ops:seen"), sp_id=SP_ID)
    store.add_enrolee(rec0, kpm0)
    rows = [csv_line(fields(1)),  # KPM_HEX, no Target for /id-in
            csv_line(fields(2, kpm="b2" * 32, node_id="urn:dev:ops:001")),  # Kpm of dev0, Node-ID of line 2
            csv_line(fields(3, kpm="c3" * 32, node_id="urn:dev:ops:seen", targets="/id-x:22"))]
    result = import_enrolees(store, write_csv(tmp_path, rows), sp_id=SP_ID)
    assert result.count == 3 and result.errors == []
    by_line: dict[int, list[str]] = {}
    for w in result.warnings:
        by_line.setdefault(w.line, []).append(w.message)
    assert all(any("registrar /id-in has no Enrolment Target credential" in m for m in by_line[line])
               for line in (2, 3, 4))
    assert any("Kpm is also the Kpm of dev0@mef.example.com" in m for m in by_line[3])
    assert any("Node-ID urn:dev:ops:001 repeats the one on line 2" in m for m in by_line[3])
    assert any("Node-ID urn:dev:ops:seen is also registered for dev0@mef.example.com" in m for m in by_line[4])
    assert any("Enrolment Target /id-x has no Enrolment Target credential" in m for m in by_line[4])
    assert KPM_HEX not in repr(result) and "b2" * 32 not in repr(result)


def test_no_warning_when_the_registrar_can_fetch(store, tmp_path):
    store.add_target(TargetRecord("in@sp.example.com", "//sp.example.com/id-in"), Secret(b"p" * 32))
    rows = [csv_line(fields(1, kpm="d4" * 32, targets="/id-mn9:22")),
            csv_line(fields(9, kpm="e5" * 32, enrolee_id="/id-mn9", registrar_cse_id="/id-in"))]
    result = import_enrolees(store, write_csv(tmp_path, rows), sp_id=SP_ID)
    assert result.count == 2 and result.warnings == []  # /id-mn9 is a CSE of the same batch
    store.revoke_target("in@sp.example.com")
    rec, kpm = enrolee_from_fields(fields(5, kpm="f6" * 32), sp_id=SP_ID)
    from rspf.mef.admin import Fetchers, registration_warnings
    assert any("registrar /id-in" in w for w in registration_warnings(store, rec, kpm, Fetchers(store, SP_ID)))


def test_import_of_certificate_enrolees_by_their_cert_id(store, tmp_path):
    """A batch may register enrolees that authenticate by certificate (``cert_id``, no Kpm) beside Kpm ones,
    and certificate entitlement (``certificates``)."""
    path = tmp_path / "certs.json"
    rows = [{"cert_id": "/id-cmn1", "enrolee_id": "/id-cmn1", "node_id": "urn:dev:c1", "registrar_cse_id": "/id-in",
             "registrar_uri": "https://in.example.com/cse-in", "certificates": True},
            {**fields(2), "cert_id": "/id-cmn2", "certificates": "false"},
            {**fields(3)}]
    path.write_text(json.dumps(rows))
    assert run_import(store, path) == (3, [])
    one, two = store.enrolee_by_certificate("/id-cmn1"), store.enrolee_by_certificate("/id-cmn2")
    assert (one.has_kpm, one.may_certify, one.kpm_id) == (False, True, "/id-cmn1")
    assert (two.has_kpm, two.may_certify) == (True, False)
    again = tmp_path / "again.json"
    again.write_text(json.dumps([{**rows[0], "enrolee_id": "/id-other", "node_id": "urn:dev:c9"},
                                 {**rows[0], "cert_id": "/id-cmn7", "enrolee_id": "/id-cmn7",
                                  "certificates": "maybe"}]))
    n, errors = run_import(store, again)
    assert n == 0 and [e.line for e in errors] == [1, 2], errors
    assert "already registered" in errors[0].message and "true or false" in errors[1].message


def test_a_large_import_reports_the_first_bad_rows_and_counts_them_all(store, tmp_path):
    """3,000 rows whose KpmIDs repeat pairwise and 300 unparsable ones: the report is bounded (the first by line),
    every one is counted, and nothing is written."""
    from rspf.mef.admin import MAX_REPORTS

    rows = [csv_line(fields(i // 2 + 1, enrolee_id=f"/id-mn{i}", node_id=f"urn:dev:{i}")) for i in range(3000)]
    rows += [csv_line(fields(5000 + i, kpm="nothex")) for i in range(300)]
    result = import_enrolees(store, write_csv(tmp_path, rows), sp_id=SP_ID)
    assert result.count == 0 and result.error_count == 1500 + 300
    assert len(result.errors) == MAX_REPORTS
    assert [e.line for e in result.errors] == sorted(e.line for e in result.errors)
    assert result.errors[0].line == 3 and "repeats the one on line 2" in result.errors[0].message
    assert store.count_enrolees() == 0


def test_rows_spanning_lines_and_blank_lines_are_reported_where_they_start(store, tmp_path):
    good, bad = csv_line(fields(1)), csv_line(fields(2, node_id="NODE", kpm="nothex")).replace("NODE", '"two\nlines"')
    path = tmp_path / "batch.csv"
    path.write_text(HEADER + "\n\n" + good + "\n\n\n" + bad + "\n" + csv_line(fields(3, kpm="x")) + "\n")
    n, errors = run_import(store, path)
    assert n == 0 and [e.line for e in errors] == [6, 8], errors
