"""Revocation end to end: a real MEF and a real ACME IN-CSE with the plugin, the operator revoking with the CLI.

The CSE follows the MEF's revocation feed (docs/mef-interface.md): within seconds of ``rspf mef enrolee
revoke-key`` / ``revoke`` / ``suspend``, a new TLS-PSK connection with the KeID is refused, the credential's
open connection is closed, and its rule entry is gone; another AE's credential is untouched throughout.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rspf.ae import SecureAE
from rspf.enrolee import Enrolment
from rspf.errors import RspfError, TlsError
from rspf.keys import CRED_TYPE_KPSAID, credential_id
from rspf.ssar import bound_rule_name
from rspf.tls import PskClient

from .acme_harness import AcmeCse, wait_until
from .support import EnroleeInfo, MefHome, TargetInfo, enrolee_client

APP_ID = "Nrevocation"
#: The feed is read every 2 s; this leaves room for a loaded machine (the bench measures the latency).
SOON = 15.0


@pytest.fixture(scope="module")
def in_cse(tmp_path_factory: pytest.TempPathFactory, mef_target: tuple[MefHome, TargetInfo]) -> Iterator[AcmeCse]:
    mef, target = mef_target
    cse = AcmeCse(tmp_path_factory.mktemp("acme"), "in")
    cse.install(mef, "--no-enrol", "--mef-psk-identity", target.psk_identity, "--mef-psk-file", target.psk_file,
                "--allowed-app-ids", APP_ID)
    cse.start()
    try:
        yield cse
    finally:
        cse.stop()


def enrolled_ae(mef: MefHome, cse: AcmeCse, name: str) -> tuple[EnroleeInfo, Enrolment]:
    info = mef.add_enrolee(name, enrolee_id=f"C{name}", registrar="/id-in", registrar_uri=cse.secure_uri)
    return info, enrolee_client(mef, info).enrol()


def rule_exists(cse: AcmeCse, enrolment: Enrolment) -> bool:
    got = cse.get(f"/~/id-in/{bound_rule_name(credential_id(CRED_TYPE_KPSAID, enrolment.ke_id))}")
    assert got.rsc in (2000, 4004), str(got)
    return got.rsc == 2000


def new_connection_refused(ae: SecureAE, path: str) -> bool:
    try:
        with ae.session() as cse:
            cse.retrieve(path)
    except TlsError:
        return True
    except RspfError:  # accepted just before the revocation was applied, then closed by it: ask again
        return False
    return False


def open_session_closed(session: Any, path: str) -> bool:
    try:
        session.retrieve(path)
    except RspfError:
        return True
    return False


@pytest.mark.parametrize("how", ["revoke-key", "revoke", "suspend"])
def test_a_revoked_credential_stops_working_everywhere_within_seconds(
        mef_target: tuple[MefHome, TargetInfo], in_cse: AcmeCse, how: str) -> None:
    mef, _target = mef_target
    info, enrolment = enrolled_ae(mef, in_cse, f"rv{how.replace('-', '')}")
    _, bystander = enrolled_ae(mef, in_cse, f"by{how.replace('-', '')}")
    tls = PskClient()
    ae, other = SecureAE.from_enrolment(enrolment, tls_client=tls), SecureAE.from_enrolment(bystander, tls_client=tls)
    path, other_path = f"{enrolment.enrolee_id}/data", f"{bystander.enrolee_id}/data"
    with ae.session() as session, other.session() as other_session:
        session.register(APP_ID)
        session.create_container("data")
        other_session.register(APP_ID)
        other_session.create_container("data")
        assert rule_exists(in_cse, enrolment) and rule_exists(in_cse, bystander)
        assert not new_connection_refused(ae, path)  # before: the credential works on a new connection too

        if how == "revoke-key":
            mef.cli.ok("mef", "enrolee", "revoke-key", "-c", mef.config, enrolment.ke_id)
        else:
            mef.cli.ok("mef", "enrolee", how, "-c", mef.config, info.kpm_id)

        wait_until(lambda: open_session_closed(session, path), SOON, "the CSE to close the open connection")
        wait_until(lambda: new_connection_refused(ae, path), SOON, "a new connection to be refused")
        wait_until(lambda: not rule_exists(in_cse, enrolment), SOON, "the credential's rule entry to go")
        # the other credential: its open session, a new session and its rule are untouched
        assert other_session.retrieve(other_path)["m2m:cnt"]["rn"] == "data"
        with other.session() as again:
            assert again.retrieve(other_path)["m2m:cnt"]["rn"] == "data"
        assert rule_exists(in_cse, bystander)
    said = f"KeID {enrolment.ke_id} is no longer valid at the MEF"
    wait_until(lambda: said in in_cse.log_text(), SOON, "the WARNING in ACME's log")
    log = in_cse.log_text()
    assert enrolment.registrar_key.reveal().hex() not in log


def test_a_restarted_mef_log_makes_the_cse_check_every_key_again(
        mef_target: tuple[MefHome, TargetInfo], in_cse: AcmeCse, tmp_path: Path) -> None:
    """A Target cannot trust its position in a feed that went backwards (a MEF database restored from a backup):
    it forgets every cached key and closes its TLS-PSK connections; a still valid credential reconnects."""
    mef, _target = mef_target
    _info, enrolment = enrolled_ae(mef, in_cse, "restarted")
    ae = SecureAE.from_enrolment(enrolment, tls_client=PskClient())
    path = f"{enrolment.enrolee_id}/data"
    with ae.session() as session:
        session.register(APP_ID)
        session.create_container("data")
    backup = tmp_path / "mef-backup.sqlite"
    mef.stop()
    backup.write_bytes(mef.database.read_bytes())
    mef.start()
    with ae.session() as session:
        session.retrieve(path)
        # revocations after the backup move the feed on; restoring the backup moves it back
        _i2, e2 = enrolled_ae(mef, in_cse, "restarted2")
        mef.cli.ok("mef", "enrolee", "revoke-key", "-c", mef.config, e2.ke_id)
        wait_until(lambda: f"KeID {e2.ke_id} is no longer valid at the MEF" in in_cse.log_text(), SOON,
                   "the CSE to apply it")
        mef.stop()
        mef.database.write_bytes(backup.read_bytes())
        for suffix in ("-wal", "-shm"):
            Path(str(mef.database) + suffix).unlink(missing_ok=True)
        mef.start()
        wait_until(lambda: open_session_closed(session, path), SOON, "the CSE to close its TLS-PSK connections")
    with ae.session() as again:  # the key is fetched again, and it is still valid
        assert again.retrieve(path)["m2m:cnt"]["rn"] == "data"
    wait_until(lambda: "revocation feed: lost track" in in_cse.log_text(), SOON, "the WARNING in ACME's log")


def test_a_credential_revoked_while_the_cse_was_down_loses_its_rule_when_it_is_back(
        mef_target: tuple[MefHome, TargetInfo], tmp_path: Path) -> None:
    """The CSE keeps its feed position beside its profile store: started again (its resources on file), it goes
    on from there, so a revocation it missed while down still removes the rule."""
    mef, target = mef_target
    cse = AcmeCse(tmp_path, "in-file")
    cse.install(mef, "--no-enrol", "--mef-psk-identity", target.psk_identity, "--mef-psk-file", target.psk_file,
                "--allowed-app-ids", APP_ID)
    cse.ini.write_text(cse.ini.read_text().replace("databaseType=memory", "databaseType=tinydb"))
    cse.start()
    try:
        _info, enrolment = enrolled_ae(mef, cse, "downtime")
        with SecureAE.from_enrolment(enrolment, tls_client=PskClient()).session() as session:
            session.register(APP_ID)
        assert rule_exists(cse, enrolment)
        kept = cse.base / "data" / "rspf-revocation-position"
        wait_until(kept.exists, SOON, "the CSE to keep its feed position")
        assert oct(kept.stat().st_mode & 0o777) == "0o600"
        cse.stop()
        mef.cli.ok("mef", "enrolee", "revoke-key", "-c", mef.config, enrolment.ke_id)  # while the CSE is down
        cse.start()
        assert cse.get("Cdowntime").rsc == 2000  # its resources are back from the file
        wait_until(lambda: not rule_exists(cse, enrolment), SOON, "the missed revocation to remove the rule")
        assert new_connection_refused(SecureAE.from_enrolment(enrolment, tls_client=PskClient()),
                                      f"{enrolment.enrolee_id}")
    finally:
        cse.stop()
