"""``rspf ae register`` as a device runs it: settings from a device file and RSPF_* variables, and idempotent.

One MEF and one IN-CSE (enforcement on, ``rspf acme init``'s defaults for everything else) on free loopback
ports, started and stopped by PID (integration/acme_harness.py). Each test registers its own enrolees.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .acme_harness import FQDN, TY_AE, AcmeCse, ae_body, new_mef, secure_request
from .support import RSPF, CliResult, EnroleeInfo, MefHome, TargetInfo, enrolee_client

APP_ID = "Nsensor-app"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MefHome, TargetInfo, AcmeCse]]:
    mef, target = new_mef(tmp_path_factory.mktemp("mef"))
    mef.start()
    cse = AcmeCse(tmp_path_factory.mktemp("acme"), "in")
    try:
        cse.install(mef, "--no-enrol", "--mef-psk-identity", target.psk_identity, "--mef-psk-file", target.psk_file,
                    "--enforcement", "--plain-port-originators", "CAdmin", "--allowed-app-ids", "Nsensor*")
        cse.start()
        yield mef, target, cse
    finally:
        cse.stop()
        mef.stop()


def add_device(world: tuple[MefHome, TargetInfo, AcmeCse], name: str) -> EnroleeInfo:
    mef, _target, cse = world
    return mef.add_enrolee(name, enrolee_id=f"C{name}", registrar="/id-in", registrar_uri=cse.secure_uri)


def device_file(mef: MefHome, info: EnroleeInfo, *, app_id: str = APP_ID, **extra: Any) -> Path:
    """A device file in its own folder, with paths relative to it (the Kpm file is copied there, 0600)."""
    folder = mef.root / f"device-{info.enrolee_id}"
    folder.mkdir()
    kpm = folder / "dev.kpm"
    kpm.write_text(info.kpm_file.read_text())
    kpm.chmod(0o600)
    lines = [f'mef = "{mef.address}"', f'mef_fqdn = "{FQDN}"', f'kpm_id = "{info.kpm_id}"', 'kpm_file = "dev.kpm"',
             f'node_id = "{info.node_id}"', 'store = "dev.store"', f'app_id = "{app_id}"',
             *(f"{k} = {v!r}".replace("'", '"') for k, v in extra.items())]
    path = folder / "device.toml"
    path.write_text("[ae]\n" + "\n".join(lines) + "\n")
    return path


def run(*args: Any, env: dict[str, str] | None = None, cwd: Path | None = None) -> CliResult:
    """``rspf`` with only the given RSPF_* variables (none inherited from the test run)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RSPF_")}
    argv = [str(a) for a in args]
    p = subprocess.run([str(RSPF), *argv], capture_output=True, text=True, timeout=60, env={**base, **(env or {})},
                       cwd=cwd, stdin=subprocess.DEVNULL)
    return CliResult(argv, p.returncode, p.stdout, p.stderr)


def test_a_device_file_spares_the_options_and_a_second_run_is_idempotent(world: Any) -> None:
    mef, _target, cse = world
    info = add_device(world, "filedev")
    conf = device_file(mef, info, container="readings")
    first = run("ae", "register", "-c", conf, "--json", cwd=mef.root)  # another working directory than the file's
    assert first.rc == 0, str(first)
    out = first.json()
    assert out["registered"] is True and out["ae"]["aei"] == "Cfiledev" and out["ae"]["api"] == APP_ID
    assert (conf.parent / "dev.store").is_file()  # the store path is relative to the device file
    assert cse.get("Cfiledev/readings").rsc == 2000

    again = run("ae", "register", "-c", conf)
    assert again.rc == 0, str(again)
    assert "stored enrolment still valid" in again.stdout
    assert "already registered: <AE> Cfiledev (aei Cfiledev)" in again.stdout
    assert "retrieved the existing <container> Cfiledev/readings" in again.stdout
    assert "4105" not in again.output and "error" not in again.output
    assert run("ae", "register", "-c", conf, "--json").json()["registered"] is False


def test_environment_variables_alone_and_their_precedence(world: Any) -> None:
    mef, _target, cse = world
    info = add_device(world, "envdev")
    env = {"RSPF_MEF": mef.address, "RSPF_MEF_FQDN": FQDN, "RSPF_KPM_ID": info.kpm_id,
           "RSPF_KPM_FILE": str(info.kpm_file), "RSPF_NODE_ID": info.node_id, "RSPF_STORE": str(info.store),
           "RSPF_APP_ID": "Nwrong"}
    # the command line wins over the environment: the rule allows Nsensor*, not Nwrong
    res = run("ae", "register", "--app-id", APP_ID, "--json", env=env)
    assert res.rc == 0, str(res)
    assert res.json()["ae"]["api"] == APP_ID
    # the environment wins over the file, which names another Node-ID (the device file's own store is new: it enrols)
    conf = device_file(mef, info)
    conf.write_text(conf.read_text().replace(info.node_id, "urn:dev:ops:not-mine"))
    res = run("ae", "register", "-c", conf, "--json", env={"RSPF_NODE_ID": info.node_id})
    assert res.rc == 0, str(res)
    assert res.json()["enrolment"]["enrolled"] is True and res.json()["registered"] is False
    # without the variable the file's value is used: the MEF refuses that Node-ID
    res = run("ae", "register", "-c", conf, "--store", conf.parent / "other.store")
    assert res.rc == 1 and "urn:dev:ops:not-mine" not in res.stdout, str(res)
    assert not (conf.parent / "other.store").exists()
    assert cse.get("Cenvdev").pc("m2m:ae")["api"] == APP_ID


def test_a_bad_device_file_names_the_file_and_the_key(world: Any) -> None:
    mef, _target, _cse = world
    info = add_device(world, "baddev")
    conf = device_file(mef, info)
    conf.write_text(conf.read_text() + 'kpm_fle = "x"\n')
    res = run("ae", "register", "-c", conf)
    assert res.rc == 2 and f"{conf} [ae] kpm_fle: unknown key; did you mean kpm_file?" in res.stderr, str(res)
    conf.write_text(conf.read_text().replace('kpm_fle = "x"', f'kpm = "{info.kpm_hex}"'))
    res = run("ae", "register", "-c", conf)
    assert res.rc == 2 and "key material never goes into this file" in res.stderr, str(res)
    assert info.kpm_hex not in res.output


def test_the_same_ae_with_another_app_id_is_not_reported_as_registered(world: Any) -> None:
    mef, _target, cse = world
    info = add_device(world, "appdev")
    conf = device_file(mef, info)
    assert run("ae", "register", "-c", conf).rc == 0
    res = run("ae", "register", "-c", conf, "--app-id", "Nsensor-other")
    assert res.rc == 1, str(res)
    assert ("already registered at /cse-in with App-ID 'Nsensor-app', not 'Nsensor-other'; deregister it first"
            in res.stderr), str(res)
    assert cse.get("Cappdev").pc("m2m:ae")["api"] == APP_ID  # nothing changed


def test_an_ae_of_that_name_that_is_not_this_one_is_not_success(world: Any) -> None:
    """The other side lies: another enrolled AE registered an <AE> under this AE's AE-ID as resource name."""
    mef, _target, cse = world
    victim, squatter = add_device(world, "victim"), add_device(world, "squatter")
    enrolment = enrolee_client(mef, squatter).enrol()
    r = secure_request(cse.secure_port, enrolment.ke_id, enrolment.registrar_key, "POST", "/cse-in",
                       ae_body("Cvictim", APP_ID), origin="Csquatter", ty=TY_AE)
    assert r.rsc == 2001, str(r)
    assert cse.get("Cvictim").pc("m2m:ae")["aei"] == "Csquatter"

    res = run("ae", "register", "-c", device_file(mef, victim), "--json")
    assert res.rc == 1, str(res)
    assert "already registered" not in res.output and "4105" in res.stderr
    assert cse.get("Cvictim").pc("m2m:ae")["aei"] == "Csquatter"  # and nothing was changed
