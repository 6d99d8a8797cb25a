"""The MEF's EST policy and CA (rspf.mef.service.est, rspf.mef.ca, rspf.est), in-process: who may ask for what,
what a CSR must be, what is issued and recorded, and every refusal, which issues nothing."""

from __future__ import annotations

import base64
import datetime as dt
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from rspf import est
from rspf.errors import ConfigError
from rspf.mef import protocol
from rspf.mef.ca import MefCa
from rspf.mef.service import MefService, Principal
from rspf.secret import Secret

SP = "//sp.example.com"
BINDING = Secret(b"\x07" * 32, "binding")


@pytest.fixture
def ca(tmp_path: Path) -> MefCa:
    return MefCa.load_or_create(tmp_path / "ca.pem", tmp_path / "ca.key", "mef.example.com")


@pytest.fixture
def est_service(mef_config: Any, store: Any, ca: MefCa) -> MefService:
    return MefService(mef_config, store, ca=ca)


def session_of(service: MefService, store: Any, make_enrolee: Any, n: int = 1, **fields: Any) -> Any:
    rec, kpm = make_enrolee(n, enrolee_id=f"Cae{n}", may_certify=True, **fields)
    store.add_enrolee(rec, kpm)
    session = service.open_session(rec.kpm_id, Secret(bytes(range(48)), "exporter"))
    session.est_binding = lambda: BINDING
    return session


def csr(subject: str | list[str], *, app_id: str | None = None, binding: Secret | None = BINDING,
        key: Any = None) -> bytes:
    key = key or est.new_private_key()
    subjects = [subject] if isinstance(subject, str) else subject
    uris = [x509.UniformResourceIdentifier(s) for s in subjects]
    if app_id is not None:
        uris.append(x509.UniformResourceIdentifier(est.app_id_uri(app_id)))
    builder = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
               .add_extension(x509.SubjectAlternativeName(uris), critical=False))
    if binding is not None:
        builder = builder.add_attribute(x509.oid.AttributeOID.CHALLENGE_PASSWORD,
                                        est.challenge_password(binding).encode())
    return est.csr_body(builder.sign(key, hashes.SHA256()))


def enroll(service: MefService, session: Any, body: bytes, op: str = est.OP_SIMPLEENROLL) -> Any:
    return service.est(session, "POST", est.est_path(op), body)


def test_the_ca_key_is_private_and_a_wider_key_file_is_refused(tmp_path: Path, ca: MefCa) -> None:
    assert stat.S_IMODE(os.stat(tmp_path / "ca.key").st_mode) == 0o600
    assert "redacted" in repr(ca) and "BEGIN" not in repr(ca)
    again = MefCa.load_or_create(tmp_path / "ca.pem", tmp_path / "ca.key", "mef.example.com")
    assert again.certificate == ca.certificate  # loaded, not regenerated
    os.chmod(tmp_path / "ca.key", 0o644)
    with pytest.raises(ConfigError, match="readable by group or others"):
        MefCa.load_or_create(tmp_path / "ca.pem", tmp_path / "ca.key", "mef.example.com")
    (tmp_path / "ca.key").unlink()
    with pytest.raises(ConfigError, match="is missing"):
        MefCa.load_or_create(tmp_path / "ca.pem", tmp_path / "ca.key", "mef.example.com")


def test_an_entitled_enrolee_gets_its_certificate_recorded(est_service: MefService, store: Any, make_enrolee: Any,
                                                          ca: MefCa) -> None:
    session = session_of(est_service, store, make_enrolee, allowed_app_ids=("Nlight",))
    answer = enroll(est_service, session, csr(f"{SP}/id-in/Cae1", app_id="Nlight"))
    assert answer.status == 200 and answer.content_type == est.CT_CERTS_ONLY
    cert = est.parse_certs_body(answer.body)[0]
    cert.verify_directly_issued_by(ca.certificate)
    assert est.names_of(cert) == ([f"{SP}/id-in/Cae1"], "Nlight")
    record = store.get_certificate(est.fingerprint(cert))
    assert record.state == "active" and record.subject == f"{SP}/id-in/Cae1" and record.app_id == "Nlight"
    # the instruction names the same subject and App-ID
    rec = store.get_enrolee(session.psk_identity)
    instruction = est_service.certificate_instruction(rec)
    assert instruction is not None and (instruction.subject_id, instruction.app_id) == (f"{SP}/id-in/Cae1", "Nlight")
    assert protocol.CertificateInstruction.from_instruction(instruction.to_instruction()) == instruction


def _refused(service: MefService, store: Any, session: Any, body: bytes, status: int, words: str,
             op: str = est.OP_SIMPLEENROLL) -> None:
    before = len(store.list_certificates())
    answer = enroll(service, session, body, op)
    assert answer.status == status and words in answer.body.decode(), answer
    assert len(store.list_certificates()) == before  # nothing issued


@pytest.mark.parametrize("case", ["another subject", "two subjects", "another App-ID", "no subject"])
def test_a_csr_that_names_the_wrong_thing_is_refused(est_service: MefService, store: Any, make_enrolee: Any,
                                                     case: str) -> None:
    session = session_of(est_service, store, make_enrolee, allowed_app_ids=("Nlight",))
    body = {"another subject": csr(f"{SP}/id-in/Cae2"),
            "two subjects": csr([f"{SP}/id-in/Cae1", f"{SP}/id-in/Cae2"]),
            "another App-ID": csr(f"{SP}/id-in/Cae1", app_id="Nother"),
            "no subject": csr([])}[case]
    _refused(est_service, store, session, body, 403, "App-ID" if case == "another App-ID" else "must name exactly")


def test_a_csr_from_another_session_is_refused(est_service: MefService, store: Any, make_enrolee: Any) -> None:
    session = session_of(est_service, store, make_enrolee)
    _refused(est_service, store, session, csr(f"{SP}/id-in/Cae1", binding=Secret(b"\x08" * 32, "other")), 403,
             "channel binding")
    assert enroll(est_service, session, csr(f"{SP}/id-in/Cae1", binding=None)).status == 200  # none: accepted


def test_a_csr_whose_signature_does_not_verify_or_with_an_rsa_key_is_refused(est_service: MefService, store: Any,
                                                                          make_enrolee: Any) -> None:
    session = session_of(est_service, store, make_enrolee)
    good = est.parse_csr_body(csr(f"{SP}/id-in/Cae1"))
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x55  # inside the signature
    _refused(est_service, store, session, base64.encodebytes(bytes(der)), 400, "")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _refused(est_service, store, session, csr(f"{SP}/id-in/Cae1", key=rsa_key), 400, "P-256")
    _refused(est_service, store, session, csr(f"{SP}/id-in/Cae1", key=ec.generate_private_key(ec.SECP384R1())),
             400, "P-256")
    _refused(est_service, store, session, b"not base64 !!", 400, "base64")


def test_who_may_ask(est_service: MefService, store: Any, make_enrolee: Any) -> None:
    rec, kpm = make_enrolee(5, enrolee_id="Cae5")  # not entitled
    store.add_enrolee(rec, kpm)
    plain = est_service.open_session(rec.kpm_id, Secret(bytes(range(48)), "exporter"))
    plain.est_binding = lambda: BINDING
    _refused(est_service, store, plain, csr(f"{SP}/id-in/Cae5"), 403, "not entitled")
    assert est_service.certificate_instruction(rec) is None
    entitled = session_of(est_service, store, make_enrolee, 6)
    _refused(est_service, store, entitled, csr(f"{SP}/id-in/Cae6"), 403, "simplereenroll needs",
             op=est.OP_SIMPLEREENROLL)  # renewal needs the certificate being renewed
    assert est_service.est(entitled, "GET", est.est_path(est.OP_SIMPLEENROLL), b"").status == 405
    assert est_service.est(entitled, "GET", est.EST_PATH + "/fullcmc", b"").status == 404
    assert est_service.est(entitled, "GET", est.est_path(est.OP_CACERTS), b"").status == 200
    assert est_service.est(entitled, "GET", est.est_path(est.OP_CSRATTRS), b"").status == 200


def test_renewal_by_a_holder_supersedes_and_a_revoked_one_cannot_renew(est_service: MefService, store: Any,
                                                                       make_enrolee: Any) -> None:
    session = session_of(est_service, store, make_enrolee)
    first = est.parse_certs_body(enroll(est_service, session, csr(f"{SP}/id-in/Cae1")).body)[0]
    holder = est_service.open_certificate_session("Cae1", lambda: Secret(bytes(48), "x"), "peer", first)
    assert holder.kind is Principal.HOLDER
    holder.est_binding = lambda: BINDING
    _refused(est_service, store, holder, csr(f"{SP}/id-in/Cae1"), 403, "simpleenroll needs")  # not enrol again
    second = est.parse_certs_body(enroll(est_service, holder, csr(f"{SP}/id-in/Cae1"),
                                         est.OP_SIMPLEREENROLL).body)[0]
    assert store.get_certificate(est.fingerprint(first)).cause == "superseded"
    rows, _ = store.revocations_since(0)
    assert [r.cert_sha256 for r in rows] == [est.fingerprint(first)]
    # the same session again: the certificate it renews is revoked meanwhile -> nothing issued
    _refused(est_service, store, holder, csr(f"{SP}/id-in/Cae1"), 403, "revoked meanwhile", op=est.OP_SIMPLEREENROLL)
    with pytest.raises(Exception, match="revoked"):  # and a new session with it is refused
        est_service.open_certificate_session("Cae1", lambda: Secret(bytes(48), "x"), "peer", first)
    assert est_service.open_certificate_session("Cae1", lambda: Secret(bytes(48), "x"), "peer", second).kind \
        is Principal.HOLDER


def test_revoking_the_enrolee_revokes_its_certificates(est_service: MefService, store: Any, make_enrolee: Any) -> None:
    session = session_of(est_service, store, make_enrolee)
    cert = est.parse_certs_body(enroll(est_service, session, csr(f"{SP}/id-in/Cae1")).body)[0]
    store.revoke_enrolee(session.psk_identity)
    assert store.get_certificate(format(cert.serial_number, "x")).cause == "enrolee-revoked"
    rows, _ = store.revocations_since(0)
    assert est.fingerprint(cert) in [r.cert_sha256 for r in rows]
    items = protocol.parse_revocations_response(protocol.revocations_response(protocol.RevocationPage(
        rows[-1].seq, tuple(protocol.Revocation(r.seq, r.ke_id, r.cause, r.cert_sha256) for r in rows), True,
        False))).items
    assert [i.cert_sha256 for i in items if i.cert_sha256] == [est.fingerprint(cert)]  # on the wire and back


def test_a_certificate_never_outlives_its_enrolee(est_service: MefService, store: Any, make_enrolee: Any) -> None:
    until = dt.datetime.now(dt.UTC) + dt.timedelta(days=3)
    session = session_of(est_service, store, make_enrolee, valid_until=until)
    cert = est.parse_certs_body(enroll(est_service, session, csr(f"{SP}/id-in/Cae1")).body)[0]
    assert abs((cert.not_valid_after_utc - until).total_seconds()) < 2


def test_certificate_requests_share_the_enrolment_rate_limit(est_service: MefService, store: Any,
                                                              make_enrolee: Any) -> None:
    session = session_of(est_service, store, make_enrolee)
    for _ in range(est_service.config.enrolment_rate_burst):
        assert enroll(est_service, session, csr(f"{SP}/id-in/Cae1")).status == 200
    before = len(store.list_certificates())
    answer = enroll(est_service, session, csr(f"{SP}/id-in/Cae1"))
    assert answer.status == 429 and answer.retry_after is not None and answer.retry_after >= 1
    assert b"enrolled too often" in answer.body and len(store.list_certificates()) == before
