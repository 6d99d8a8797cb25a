"""Known-answer tests for rspf.keys (TS-0003 §10.3-10.4).

Every expected HMAC value below was computed OUTSIDE Python, with the ``openssl`` command line
(OpenSSL 3.0), never with Python's ``hmac``. The exact command is in the comment above each literal.
Shell variables used in those comments:

    KE=101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f
    KE2=ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff

KE is the last 32 bytes of the test exporter output EXPORTER_OUT = bytes 0x00..0x2f (48 bytes),
so RelativeKeID = 000102...0f.
"""

from __future__ import annotations

import pytest

from rspf import keys
from rspf.errors import BadRequest
from rspf.secret import Secret

EXPORTER_OUT = bytes(range(48))  # 000102...2f
REL_KE_ID_HEX = "000102030405060708090a0b0c0d0e0f"
KE_HEX = "101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f"
KE2_HEX = "ff" * 32
KE = Secret(bytes.fromhex(KE_HEX), "Ke")
KE2 = Secret(bytes.fromhex(KE2_HEX), "Ke")

# printf '%s' "oneM2M Enrolment Key to Master Credential derivationmaf.sp.example" \
#   | openssl dgst -sha256 -mac HMAC -macopt hexkey:$KE
KM_MAF = "fc79d95a5df24a3749c3313fc614b787f2572d1fda928ed5b370c28ffc52eec6"

# printf '%s' "oneM2M Enrolment Key to Master Credential derivationmaf.sp.example" \
#   | openssl dgst -sha256 -mac HMAC -macopt hexkey:$KE2
KM_MAF_KE2 = "e06b2bd38230e6aed67ee0a7c02295d82789a803ee2c69be1254c9c2de53270a"

# NFKC("ﬁle.sp.example") == "file.sp.example"; expected value computed on the normalised bytes:
# printf '%s' "oneM2M Enrolment Key to Master Credential derivationfile.sp.example" \
#   | openssl dgst -sha256 -mac HMAC -macopt hexkey:$KE
KM_FILE = "815da46ccaeb3f0a56884d5c558f283ec026c2d0fae0d601e178c12f184e05db"

# Same, but on the raw (un-normalised) UTF-8 bytes of "ﬁle.sp.example" -- must NOT be produced:
# printf '%s' "oneM2M Enrolment Key to Master Credential derivationﬁle.sp.example" \
#   | openssl dgst -sha256 -mac HMAC -macopt hexkey:$KE
KM_FILE_RAW_LIGATURE = "2316136a99b073b51f76c9f9020851fc0318719557e2824147ccc000447d50f2"

# printf '%s' "oneM2M Enrolment Key to Provisioned Secure Connection Key derivation//sp.example/id-in/Cae1" \
#   | openssl dgst -sha256 -mac HMAC -macopt hexkey:$KE
KPSA_CAE1 = "fb584bb2cfe1517914f7407ff0676e0672c826f5481463885ecb5b02c3283b0d"

# Raw UTF-8 of "//sp.example/ｉｄ-in/Cae1" (fullwidth i, d: ef bd 89 ef bd 84) -- must NOT be produced:
# printf '%s' "oneM2M Enrolment Key to Provisioned Secure Connection Key derivation//sp.example/ｉｄ-in/Cae1" \
#   | openssl dgst -sha256 -mac HMAC -macopt hexkey:$KE
KPSA_FULLWIDTH_RAW = "b685e2b65152a234cc588b82fe751c73163efd221e241d44c82caac118773722"

# SUID 22 as ASCII "22", target = FQDN form of //sp.example/id-in/Cae1:
# printf '%s' "oneM2M Enrolment Key to Usage-Constrained Symmetric Key derivation22Cae1.id-in.sp.example" \
#   | openssl dgst -sha256 -mac HMAC -macopt hexkey:$KE
KUC_22_CAE1 = "3a5dd7d67c2429bdd8fed01e7416494987a155c408f6ca02cddf14ce7982f907"

# printf '%s' "oneM2M Enrolment Key to Usage-Constrained Symmetric Key derivation22id-in.sp.example" \
#   | openssl dgst -sha256 -mac HMAC -macopt hexkey:$KE
KUC_22_IDIN = "4ae74e4d034591ff6e9a172b43df7c1f47525a478d63a583ab9e34ef636c2f34"

# printf '%s' "oneM2M Enrolment Key to Usage-Constrained Symmetric Key derivation21maf.sp.example" \
#   | openssl dgst -sha256 -mac HMAC -macopt hexkey:$KE
KUC_21_MAF = "5aec456ae16e01a79c60cf8bc21eafb9ff005dfc3e11ca675137375a9a85a4e1"

# SUID as the single byte 0x16 instead of ASCII "22" -- must NOT be produced:
# printf 'oneM2M Enrolment Key to Usage-Constrained Symmetric Key derivation\x16Cae1.id-in.sp.example' \
#   | openssl dgst -sha256 -mac HMAC -macopt hexkey:$KE
KUC_22_BINARY_SUID = "d771bd50ec2deaafccd0915fdc1189a65333d55c88fe53cd3d269adc20c16513"

# printf '%s' "oneM2M Enrolment Key to Usage-Constrained Symmetric Key derivation22Ｃａｅ１.id-in.sp.example" \
#   | openssl dgst -sha256 -mac HMAC -macopt hexkey:$KE      (raw fullwidth bytes -- must NOT be produced)
KUC_FULLWIDTH_RAW = "81eb07ee8771fdc61e75f5f8ec85b679b3b6d34983b81837b61e012191bc30e5"


def hexof(s: Secret) -> str:
    assert isinstance(s, Secret)
    return s.reveal().hex()


# --------------------------------------------------------------------------- constants (§10.3.1-10.3.7)


def test_labels_and_length_match_the_spec():
    assert keys.EXPORTER_LABEL_BOOTSTRAP == "EXPORTER-oneM2M-Bootstrap"
    assert keys.EXPORTER_LABEL_CONNECTION == "EXPORTER-oneM2M-Connection"
    assert keys.EXPORTER_LENGTH == 48
    assert keys.LABEL_KM == b"oneM2M Enrolment Key to Master Credential derivation"
    assert keys.LABEL_KPSA == b"oneM2M Enrolment Key to Provisioned Secure Connection Key derivation"
    assert keys.LABEL_KUC == b"oneM2M Enrolment Key to Usage-Constrained Symmetric Key derivation"


# --------------------------------------------------------------------------- split_exporter_output


@pytest.mark.parametrize("wrap", [bytes, bytearray, lambda b: Secret(b, "exporter output")])
def test_split_exporter_output_first_16_are_relative_ke_id_last_32_are_ke(wrap):
    m = keys.split_exporter_output(wrap(EXPORTER_OUT))
    assert m.relative_ke_id.hex() == REL_KE_ID_HEX
    assert isinstance(m.enrolment_key, Secret)
    assert hexof(m.enrolment_key) == KE_HEX
    assert m.enrolment_key == KE


@pytest.mark.parametrize("n", [0, 16, 32, 47, 49, 64])
def test_split_exporter_output_wrong_length(n):
    with pytest.raises(ValueError):
        keys.split_exporter_output(bytes(n))


def test_enrolment_key_material_repr_hides_ke():
    m = keys.split_exporter_output(EXPORTER_OUT)
    for text in (repr(m), str(m), f"{m}"):
        assert KE_HEX not in text
        assert KE_HEX[:16] not in text
        assert REL_KE_ID_HEX in text  # the identifier is not secret


# --------------------------------------------------------------------------- KeID (§10.3.4)


def test_make_ke_id_lower_case_hex():
    assert keys.make_ke_id(bytes.fromhex(REL_KE_ID_HEX), "mef.sp.example") == f"{REL_KE_ID_HEX}@mef.sp.example"
    rel = bytes.fromhex("ABCDEF0123456789abcdef0123456789")
    assert keys.make_ke_id(rel, "mef.sp.example") == "abcdef0123456789abcdef0123456789@mef.sp.example"


def test_make_ke_id_rejects_wrong_length_and_bad_fqdn():
    with pytest.raises(ValueError):
        keys.make_ke_id(bytes(15), "mef.sp.example")
    with pytest.raises(ValueError):
        keys.make_ke_id(bytes(17), "mef.sp.example")
    with pytest.raises(BadRequest):
        keys.make_ke_id(bytes(16), "not a fqdn")


def test_parse_ke_id_round_trip_and_upper_case_hex():
    assert keys.parse_ke_id(f"{REL_KE_ID_HEX}@mef.sp.example") == (bytes.fromhex(REL_KE_ID_HEX), "mef.sp.example")
    assert keys.parse_ke_id("ABCDEF0123456789ABCDEF0123456789@mef.sp.example") == (
        bytes.fromhex("abcdef0123456789abcdef0123456789"),
        "mef.sp.example",
    )


@pytest.mark.parametrize(
    "bad",
    [
        "",
        None,
        "000102030405060708090a0b0c0d0e0f",  # no @
        "000102030405060708090a0b0c0d0e@mef.sp.example",  # 30 hex digits
        "000102030405060708090a0b0c0d0e0f00@mef.sp.example",  # 34 hex digits
        "g00102030405060708090a0b0c0d0e0f@mef.sp.example",  # non-hex
        "000102030405060708090a0b0c0d0e0f@",  # empty FQDN
        "000102030405060708090a0b0c0d0e0f@mef sp.example",  # not an FQDN
        "000102030405060708090a0b0c0d0e0f@-mef.sp.example",
    ],
)
def test_parse_ke_id_rejects(bad):
    with pytest.raises(BadRequest):
        keys.parse_ke_id(bad)


def test_normalise_ke_id():
    assert (
        keys.normalise_ke_id("000102030405060708090A0B0C0D0E0F@MEF.SP.Example")
        == "000102030405060708090a0b0c0d0e0f@mef.sp.example"
    )
    with pytest.raises(BadRequest):
        keys.normalise_ke_id("xyz@mef.sp.example")


# --------------------------------------------------------------------------- check_fqdn / encode_identity


@pytest.mark.parametrize("good", ["sp.example", "a", "id-in.sp.example", "a" * 63 + ".example"])
def test_check_fqdn_accepts(good):
    assert keys.check_fqdn(good) == good


@pytest.mark.parametrize(
    "bad", ["", "sp.example.", "-sp.example", "sp-.example", "sp..example", "sp_x.example", "a" * 64 + ".example", None]
)
def test_check_fqdn_rejects(bad):
    with pytest.raises(BadRequest):
        keys.check_fqdn(bad)


def test_encode_identity_nfkc_utf8():
    assert keys.encode_identity("ﬁle.sp.example") == b"file.sp.example"
    assert keys.encode_identity("//sp.example/ｉｄ-in/Cae1") == b"//sp.example/id-in/Cae1"
    assert keys.encode_identity("caf\u00e9") == b"caf\xc3\xa9"  # already NFC/NFKC -> plain UTF-8
    assert keys.encode_identity("cafe\u0301") == b"caf\xc3\xa9"  # combining accent is composed
    for bad in ("", None, b"bytes"):
        with pytest.raises(BadRequest):
            keys.encode_identity(bad)


# --------------------------------------------------------------------------- Km (§10.3.2)


def test_derive_km_known_answer():
    km = keys.derive_km(KE, "maf.sp.example")
    assert isinstance(km, Secret) and len(km) == 32
    assert hexof(km) == KM_MAF


def test_derive_km_uses_ke():
    assert hexof(keys.derive_km(KE2, "maf.sp.example")) == KM_MAF_KE2


def test_derive_km_nfkc_ligature():
    assert hexof(keys.derive_km(KE, "ﬁle.sp.example")) == KM_FILE
    assert hexof(keys.derive_km(KE, "file.sp.example")) == KM_FILE
    assert hexof(keys.derive_km(KE, "ﬁle.sp.example")) != KM_FILE_RAW_LIGATURE


def test_derive_rejects_wrong_length_ke():
    for bad in (Secret(bytes(31)), Secret(bytes(33)), Secret(bytes(48))):
        with pytest.raises(ValueError):
            keys.derive_km(bad, "maf.sp.example")
        with pytest.raises(ValueError):
            keys.derive_kpsa(bad, "//sp.example/id-in/Cae1")
        with pytest.raises(ValueError):
            keys.derive_usage_constrained_key(bad, 22, "id-in.sp.example")


# --------------------------------------------------------------------------- Kpsa (§10.3.3)


def test_derive_kpsa_known_answer():
    kpsa = keys.derive_kpsa(KE, "//sp.example/id-in/Cae1")
    assert isinstance(kpsa, Secret) and len(kpsa) == 32
    assert hexof(kpsa) == KPSA_CAE1


def test_derive_kpsa_nfkc_fullwidth():
    kpsa = keys.derive_kpsa(KE, "//sp.example/ｉｄ-in/Cae1")
    assert hexof(kpsa) == KPSA_CAE1
    assert hexof(kpsa) != KPSA_FULLWIDTH_RAW


# --------------------------------------------------------------------------- usage-constrained key (§10.3.7)


def test_derive_usage_constrained_key_suid22_ae_target():
    target = keys.target_fqdn("//sp.example/id-in/Cae1")
    k = keys.derive_usage_constrained_key(KE, keys.SUID_RSPF_SAEF, target)
    assert isinstance(k, Secret) and len(k) == 32
    assert hexof(k) == KUC_22_CAE1
    assert hexof(k) != KUC_22_BINARY_SUID  # SUID is ASCII "22", not the byte 0x16


def test_derive_usage_constrained_key_suid22_cse_target():
    k = keys.derive_usage_constrained_key(KE, 22, keys.target_fqdn("/id-in", sp_id="//sp.example"))
    assert hexof(k) == KUC_22_IDIN


def test_derive_usage_constrained_key_suid21_plain_fqdn():
    assert hexof(keys.derive_usage_constrained_key(KE, 21, "maf.sp.example")) == KUC_21_MAF


def test_derive_usage_constrained_key_nfkc_fullwidth_target():
    k = keys.derive_usage_constrained_key(KE, 22, "Ｃａｅ１.id-in.sp.example")
    assert hexof(k) == KUC_22_CAE1
    assert hexof(k) != KUC_FULLWIDTH_RAW


def test_the_three_derivations_differ():
    values = {KM_MAF, KPSA_CAE1, KUC_22_CAE1, KUC_22_IDIN, KUC_21_MAF}
    assert len(values) == 5
    assert hexof(keys.derive_km(KE, "Cae1.id-in.sp.example")) != KUC_22_CAE1


@pytest.mark.parametrize("bad", [31, 99, 0, -22, True, False, "22", 22.0, None])
def test_derive_usage_constrained_key_rejects_bad_suid(bad):
    with pytest.raises(BadRequest):
        keys.derive_usage_constrained_key(KE, bad, "id-in.sp.example")


# --------------------------------------------------------------------------- encode_suid


@pytest.mark.parametrize("suid,expected", [(22, b"22"), (10, b"10"), (21, b"21"), (45, b"45"), (32, b"32")])
def test_encode_suid_decimal_ascii(suid, expected):
    assert keys.encode_suid(suid) == expected


@pytest.mark.parametrize("bad", [31, 99, True, "22", 0, 16, 20, 30, 46, 22.0, None, b"22"])
def test_encode_suid_rejects(bad):
    with pytest.raises(BadRequest):
        keys.encode_suid(bad)


# --------------------------------------------------------------------------- target_fqdn (§10.3.7)


@pytest.mark.parametrize(
    "target,sp_id,expected",
    [
        ("//sp.example/id-in", None, "id-in.sp.example"),
        ("//sp.example/id-in/Cae1", None, "Cae1.id-in.sp.example"),
        ("/id-in", "//sp.example", "id-in.sp.example"),
        ("/id-in", "sp.example", "id-in.sp.example"),
        ("/id-in/Cae1", "//sp.example", "Cae1.id-in.sp.example"),
        ("//sp.example/id-in", "//other.example", "id-in.sp.example"),  # sp_id ignored for absolute IDs
        ("maf.sp.example", None, "maf.sp.example"),  # plain FQDN unchanged
    ],
)
def test_target_fqdn(target, sp_id, expected):
    assert keys.target_fqdn(target, sp_id) == expected


@pytest.mark.parametrize(
    "target,sp_id",
    [
        ("", None),
        (None, None),
        ("/id-in", None),  # SP-relative without SP-ID
        ("/id-in", ""),
        ("//sp.example", None),  # no CSE-ID
        ("//sp.example/", None),
        ("//sp.example//Cae1", None),  # empty label
        ("//sp.example/id-in/", None),
        ("//sp.example/id_in", None),  # '_' is not allowed in an FQDN label
        ("//sp example/id-in", None),
        ("not a fqdn", None),
    ],
)
def test_target_fqdn_rejects(target, sp_id):
    with pytest.raises(BadRequest):
        keys.target_fqdn(target, sp_id)


# --------------------------------------------------------------------------- Credential-ID (§10.4)


def test_credential_id_spec_example():
    assert keys.credential_id(keys.CRED_TYPE_KPMID, "thiskey@mymef.com") == "10-thiskey@mymef.com"
    assert keys.parse_credential_id("10-thiskey@mymef.com") == (10, "thiskey@mymef.com")


def test_credential_id_value_may_contain_dash_and_other_allowed_chars():
    cid = keys.credential_id(12, "a-b_c.D9@mef.sp.example")
    assert cid == "12-a-b_c.D9@mef.sp.example"
    assert keys.parse_credential_id(cid) == (12, "a-b_c.D9@mef.sp.example")


@pytest.mark.parametrize(
    "type_id,value",
    [
        (10, ""),
        (10, "this key"),
        (10, "this/key"),
        (10, "this:key"),
        (10, "thïskey"),
        (10, "this*key"),
        (9, "thiskey"),  # not a sec:credIDTypeID
        (0, "thiskey"),
        (True, "thiskey"),
        ("10", "thiskey"),
        (10, None),
    ],
)
def test_credential_id_rejects(type_id, value):
    with pytest.raises(BadRequest):
        keys.credential_id(type_id, value)


@pytest.mark.parametrize(
    "bad",
    ["", None, "thiskey@mymef.com", "-thiskey", "x-thiskey", "10-", "10-this key", "9-thiskey", "10_thiskey"],
)
def test_parse_credential_id_rejects(bad):
    with pytest.raises(BadRequest):
        keys.parse_credential_id(bad)


# Regression tests for input-validation defects found in review (trailing newline, non-ASCII digits,
# float type-IDs).


@pytest.mark.parametrize(
    "call",
    [
        lambda: keys.check_fqdn("sp.example\n"),
        lambda: keys.credential_id(10, "thiskey\n"),
        lambda: keys.parse_credential_id("10-thiskey\n"),
        lambda: keys.parse_ke_id(REL_KE_ID_HEX + "@mef.sp.example\n"),
    ],
)
def test_trailing_newline_rejected(call):
    with pytest.raises(BadRequest):
        call()


@pytest.mark.parametrize("bad", ["\u00b2-thiskey", "\u0661\u0660-thiskey"])
def test_parse_credential_id_non_ascii_digits(bad):
    with pytest.raises(BadRequest):
        keys.parse_credential_id(bad)


def test_credential_id_rejects_float_type():
    with pytest.raises(BadRequest):
        keys.credential_id(10.0, "thiskey")


# --------------------------------------------------------------------------- Secret never shows its bytes


def _leaks(text: str, raw: bytes) -> bool:
    return raw.hex() in text.lower() or raw.hex()[:8] in text.lower() or repr(raw)[2:-1] in text


def test_derived_secrets_never_show_their_bytes():
    secrets = [
        keys.split_exporter_output(EXPORTER_OUT).enrolment_key,
        keys.derive_km(KE, "maf.sp.example"),
        keys.derive_kpsa(KE, "//sp.example/id-in/Cae1"),
        keys.derive_usage_constrained_key(KE, 22, "Cae1.id-in.sp.example"),
    ]
    for s in secrets:
        raw = s.reveal()
        forms = (repr(s), str(s), f"{s}", f"{s!r}", f"{s:>80}", repr([s]),
                 "%s" % s, "{}".format(s))  # noqa: UP031, UP032 (each formatting path on purpose)
        for text in forms:
            assert not _leaks(text, raw), text
            assert "redacted" in text


def test_secret_wrong_length_error_does_not_leak():
    bad = Secret(bytes.fromhex(KE_HEX[:-2]))  # 31 bytes
    with pytest.raises(ValueError) as ei:
        keys.derive_km(bad, "maf.sp.example")
    assert not _leaks(str(ei.value), bad.reveal())
