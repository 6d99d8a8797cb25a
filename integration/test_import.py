"""Manufacturing batches: ``rspf mef enrolee import`` of CSV and JSON files, all rows or none."""

from __future__ import annotations

import csv
import json
import os
import secrets
from pathlib import Path

from .support import FQDN, REGISTRAR, REGISTRAR_URI, EnroleeInfo, MefHome, write_private

COLUMNS = ["kpm_id", "kpm", "enrolee_id", "node_id", "registrar_cse_id", "registrar_uri", "targets", "rm_uri",
           "enrolment_expiry_seconds", "valid_until", "allowed_app_ids"]


def row(prefix: str, i: int, **over) -> dict[str, str]:
    r = {"kpm_id": f"{prefix}{i:04d}@{FQDN}", "kpm": secrets.token_hex(32), "enrolee_id": f"/id-{prefix}{i:04d}",
         "node_id": f"urn:dev:ops:{prefix}{i:04d}", "registrar_cse_id": REGISTRAR, "registrar_uri": REGISTRAR_URI,
         "targets": "", "rm_uri": "", "enrolment_expiry_seconds": "", "valid_until": "", "allowed_app_ids": ""}
    r.update(over)
    return r


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    os.chmod(path, 0o600)
    return path


def kpm_ids(home: MefHome) -> set[str]:
    return {e["kpmID"] for e in home.list_enrolees()}


def test_csv_batch_of_300_imports(mef_home: MefHome) -> None:
    home = mef_home
    rows = [row("b", i) for i in range(1, 301)]
    rows[0].update(targets="/id-x:22,23;/id-y:22", rm_uri="https://dm.example.com",
                   enrolment_expiry_seconds="3600", valid_until="2030-01-01T00:00:00Z")
    path = write_csv(home.root / "batch.csv", rows)
    res = home.cli("mef", "enrolee", "import", "-c", home.config, path)
    assert res.rc == 0, str(res)
    assert "imported 300 enrolee(s)" in res.stdout
    for r in rows:  # the Kpm values are never echoed
        assert r["kpm"] not in res.output.lower()
    listed = home.list_enrolees()
    assert len(listed) == 301  # + dev1 of the fixture
    assert {r["kpm_id"] for r in rows} <= {e["kpmID"] for e in listed}
    first = home.show(rows[0]["kpm_id"])
    assert first["targets"] == [{"id": "/id-x", "suids": [22, 23]}, {"id": "/id-y", "suids": [22]}]
    assert first["remoteManagementURI"] == "https://dm.example.com"
    assert first["enrolmentExpirySeconds"] == 3600
    assert first["validUntil"] == "2030-01-01T00:00:00+00:00"
    assert first["state"] == "active" and first["lastEnrolled"] is None

    # an imported enrolee really enrols with the Kpm from the batch
    last = rows[-1]
    info = EnroleeInfo(last["kpm_id"], write_private(home.root / "last.kpm", last["kpm"] + "\n"), last["enrolee_id"],
                       last["node_id"], home.root / "last.store")
    home.start()
    res = home.enrol(info)
    assert res.rc == 0, str(res)
    assert res.json()["profile"]["enroleeID"] == last["enrolee_id"]
    assert home.show(last["kpm_id"])["lastEnrolled"] is not None

    # importing the same batch again conflicts on every row and changes nothing
    again = home.cli("mef", "enrolee", "import", "-c", home.config, path)
    assert again.rc == 2, str(again)
    assert "nothing was imported" in again.stderr
    assert f"{path}:2:" in again.stderr and "already registered" in again.stderr
    assert len(home.list_enrolees()) == 301


def test_csv_batch_with_bad_rows_imports_nothing(mef_home: MefHome) -> None:
    home = mef_home
    before = kpm_ids(home)
    rows = [row("c", i) for i in range(1, 21)]
    # data row k is on line k + 1 (line 1 is the header)
    rows[2]["kpm"] = "zz-not-hex"                                    # line 4
    rows[5]["enrolee_id"] = "id without slash"                        # line 7
    rows[8]["kpm_id"] = rows[1]["kpm_id"]                             # line 10 repeats line 3
    rows[10]["kpm_id"] = "id-in@sp.example.com"                       # line 12: a Target's psk_identity
    rows[11]["targets"] = "/id-x:99"                                  # line 13: not an m2m:suid
    rows[12]["enrolee_id"] = "/id-mn1"                                # line 14: dev1's Enrolee-ID
    rows[14]["enrolment_expiry_seconds"] = "10"                       # line 16: below 60
    rows[16]["kpm_id"] = "dev1@" + FQDN                               # line 18: already registered
    rows[18]["registrar_uri"] = "ftp://nope"                          # line 20
    path = write_csv(home.root / "bad.csv", rows)
    with open(path, "a") as f:                                        # line 22: more columns than the header
        f.write(",".join(row("c", 99).values()) + ",extra\n")

    res = home.cli("mef", "enrolee", "import", "-c", home.config, path)
    assert res.rc == 2, str(res)
    assert "error: 10 bad row(s); nothing was imported" in res.stderr, str(res)
    bad_lines = [4, 7, 10, 12, 13, 14, 16, 18, 20, 22]
    reported = sorted(int(line.split(":")[1]) for line in res.stderr.splitlines()
                      if line.startswith(f"{path}:"))
    assert reported == bad_lines, str(res)
    assert f"{path}:4: kpm must be hexadecimal" in res.stderr
    assert f"{path}:10: kpm_id {rows[1]['kpm_id']} repeats the one on line 3" in res.stderr
    assert f"{path}:18: kpm_id dev1@{FQDN} is already registered" in res.stderr
    for r in rows:
        assert r["kpm"] not in res.output.lower()
    assert kpm_ids(home) == before  # none of the 10 good rows landed


def test_json_batch_imports_and_reports_positions(mef_home: MefHome) -> None:
    home = mef_home
    good = [
        {"kpm_id": f"j1@{FQDN}", "kpm": secrets.token_hex(32), "enrolee_id": "Cj1-sensor", "node_id": "urn:j1",
         "registrar_cse_id": REGISTRAR, "registrar_uri": REGISTRAR_URI,
         "targets": [{"id": "/id-x", "suids": [22, 23]}], "enrolment_expiry_seconds": 7200},
        {"kpm_id": f"j2@{FQDN}", "kpm": secrets.token_hex(16), "enrolee_id": "/id-j2", "node_id": "urn:j2",
         "registrar_cse_id": REGISTRAR, "registrar_uri": REGISTRAR_URI, "rm_uri": "https://dm.example.com"},
    ]
    bad = good + [{"kpm_id": f"j3@{FQDN}", "kpm": "00", "enrolee_id": "/id-j3", "node_id": "urn:j3",
                   "registrar_cse_id": REGISTRAR, "registrar_uri": REGISTRAR_URI},
                  "not an object",
                  {"kpm_id": f"j5@{FQDN}", "kpm": secrets.token_hex(32), "enrolee_id": "/id-j5", "node_id": "urn:j5",
                   "registrar_cse_id": REGISTRAR, "registrar_uri": REGISTRAR_URI, "colour": "blue"}]
    bad_path = home.root / "bad.json"
    write_private(bad_path, json.dumps(bad))
    res = home.cli("mef", "enrolee", "import", "-c", home.config, bad_path)
    assert res.rc == 2, str(res)
    assert f"{bad_path}:3:" in res.stderr and f"{bad_path}:4:" in res.stderr and f"{bad_path}:5:" in res.stderr
    assert f"{bad_path}:1:" not in res.stderr and f"{bad_path}:2:" not in res.stderr
    assert "colour" in res.stderr
    assert kpm_ids(home) == {f"dev1@{FQDN}"}

    path = home.root / "batch.json"
    write_private(path, json.dumps(good))
    res = home.cli("mef", "enrolee", "import", "-c", home.config, path)
    assert res.rc == 0, str(res)
    assert "imported 2 enrolee(s)" in res.stdout
    assert kpm_ids(home) == {f"dev1@{FQDN}", f"j1@{FQDN}", f"j2@{FQDN}"}
    j1 = home.show(f"j1@{FQDN}")
    assert j1["enroleeType"] == "AE" and j1["targets"] == [{"id": "/id-x", "suids": [22, 23]}]
    assert j1["enrolmentExpirySeconds"] == 7200
    assert home.show(f"j2@{FQDN}")["remoteManagementURI"] == "https://dm.example.com"


def test_unusable_batch_files_are_usage_errors(mef_home: MefHome) -> None:
    home = mef_home
    cases = {
        "empty.csv": ("", "is empty"),
        "noheader.csv": ("a,b,c\n1,2,3\n", "lacks column(s) kpm_id"),
        "broken.json": ("[{", "not valid JSON"),
        "object.json": ('{"kpm_id": "x"}', "JSON list"),
        "nothing.csv": (",".join(COLUMNS) + "\n", "no enrolees"),
    }
    for name, (text, message) in cases.items():
        path = write_private(home.root / name, text)
        res = home.cli("mef", "enrolee", "import", "-c", home.config, path)
        assert res.rc == 2, str(res)
        assert message in res.stderr, str(res)
    assert kpm_ids(home) == {f"dev1@{FQDN}"}


def test_a_batch_readable_by_others_is_refused(mef_home: MefHome) -> None:
    home = mef_home
    path = write_csv(home.root / "open.csv", [row("o", i) for i in range(1, 4)])
    for mode in (0o644, 0o640):
        os.chmod(path, mode)
        for extra in ([], ["--dry-run"]):
            res = home.cli("mef", "enrolee", "import", "-c", home.config, path, *extra)
            assert res.rc == 2, str(res)
            assert "readable by group or others" in res.stderr and "chmod 600" in res.stderr, str(res)
    assert kpm_ids(home) == {f"dev1@{FQDN}"}


def test_dry_run_says_what_it_would_do_and_changes_nothing(mef_home: MefHome) -> None:
    home = mef_home
    rows = [row("d", i) for i in range(1, 6)]
    rows[0]["allowed_app_ids"] = "Nmy-app;Nx*"
    rows[1]["registrar_cse_id"] = "/id-nope"        # line 3: no Target credential for that registrar
    rows[2]["node_id"] = "urn:dev:ops:001"           # line 4: dev1's Node-ID
    rows[4]["kpm"] = rows[3]["kpm"]                  # line 6: the Kpm of line 5
    path = write_csv(home.root / "dry.csv", rows)
    before = home.database.read_bytes()
    res = home.cli("mef", "enrolee", "import", "-c", home.config, path, "--dry-run")
    assert res.rc == 0, str(res)
    assert "dry run:" in res.stdout and "would import 5 enrolee(s)" in res.stdout
    assert "nothing was changed" in res.stdout
    assert f"{path}:3: warning: the registrar /id-nope has no Enrolment Target credential" in res.stderr
    assert f"{path}:4: warning: its Node-ID urn:dev:ops:001 is also registered for dev1@{FQDN}" in res.stderr
    assert f"{path}:6: warning: its Kpm is also the Kpm of the enrolee on line 5" in res.stderr
    assert f"{path}:2: warning" not in res.stderr  # /id-in has a Target credential
    assert rows[3]["kpm"] not in res.output.lower()
    assert kpm_ids(home) == {f"dev1@{FQDN}"} and home.database.read_bytes() == before

    rows[1]["registrar_uri"] = "http://127.0.0.1:8080/cse-in"
    bad = write_csv(home.root / "dry-bad.csv", rows)
    res = home.cli("mef", "enrolee", "import", "-c", home.config, bad, "--dry-run")
    assert res.rc == 2 and f"{bad}:3: registrar_uri must be the https://" in res.stderr, str(res)

    res = home.cli("mef", "enrolee", "import", "-c", home.config, path)
    assert res.rc == 0 and "imported 5 enrolee(s)" in res.stdout, str(res)
    assert home.show(rows[0]["kpm_id"])["allowedAppIDs"] == ["Nmy-app", "Nx*"]
    assert home.show(rows[1]["kpm_id"])["allowedAppIDs"] is None
