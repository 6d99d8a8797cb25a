"""rspf.ssar: rule matching, the bound-rule layout and recording plans (no ACME, no I/O).

Every binding has a test where the other side lies: another enrolee's credential, AE-ID or App-ID, a
registrar CSE writing a rule that would bind more than one credential, a rule linked from another node.
"""

from __future__ import annotations

import pytest

from rspf import ssar
from rspf.errors import BadRequest

CRED_A, CRED_B = "12-" + "a" * 32 + "@mef.example.com", "12-" + "b" * 32 + "@mef.example.com"
DEFAULT = ("*",)


def rule_of(binding: ssar.Binding, cse_id: str = "/id-in") -> dict:
    return binding.attributes(cse_id)


@pytest.fixture
def rules() -> list[dict]:
    a = ssar.Binding.of(CRED_A, "Csensor-a", ("Nmeter",), DEFAULT)
    b = ssar.Binding.of(CRED_B, "Csensor-b", ("Nlight",), DEFAULT)
    return [rule_of(a), rule_of(b)]


# ------------------------------------------------------------------------------------------ matching
@pytest.mark.parametrize(("pattern", "value", "expected"), [
    ("*", "anything", True), ("*", "", True), ("C*", "C", True), ("C*", "Cx", True), ("C*", "S", False),
    ("C123*X", "C123abcX", True), ("C123*X", "C123X", True), ("C123*X", "C12X", False),
    ("a*b*c", "a-b-c", True), ("a*b*c", "acb", False), ("exact", "exact", True), ("exact", "exacT", False),
])
def test_matches(pattern: str, value: str, expected: bool) -> None:
    assert ssar.matches(pattern, value) is expected


def test_matches_none() -> None:
    assert ssar.matches(None, "x") is False and ssar.matches("*", None) is False


def test_right_credential_ae_id_and_app_id_are_admitted(rules: list[dict]) -> None:
    assert ssar.admits(rules, CRED_A, "Nmeter", "Csensor-a")
    assert ssar.admits(rules, CRED_B, "Nlight", "Csensor-b")


def test_a_credential_with_another_enrolees_ae_id_is_refused(rules: list[dict]) -> None:
    assert not ssar.admits(rules, CRED_B, "Nlight", "Csensor-a")   # B's credential, A's AE-ID
    assert not ssar.admits(rules, CRED_B, "Nmeter", "Csensor-a")   # ... and A's App-ID too
    assert not ssar.admits(rules, CRED_A, "Nmeter", "Csensor-b")


def test_a_credential_with_another_enrolees_app_id_is_refused(rules: list[dict]) -> None:
    assert not ssar.admits(rules, CRED_A, "Nlight", "Csensor-a")
    assert not ssar.admits(rules, CRED_B, "Nmeter", "Csensor-b")


def test_no_credential_or_an_unrecorded_one_is_refused(rules: list[dict]) -> None:
    assert not ssar.admits(rules, None, "Nmeter", "Csensor-a")
    assert not ssar.admits(rules, "12-" + "c" * 32 + "@mef.example.com", "Nmeter", "Csensor-a")


def test_rule_without_apci_admits_only_registrations_without_credential() -> None:
    rule = {"aai": ["*"], "aae": ["*"]}
    assert ssar.rule_allows(rule, None, "Nx", "Cx")
    assert not ssar.rule_allows(rule, CRED_A, "Nx", "Cx")
    assert not ssar.rule_allows({"apci": ["*"], "aae": ["*"]}, CRED_A, "Nx", "Cx")  # no aai: no App-ID


def test_rule_allows_objects_with_attributes_too() -> None:
    class Rule:
        apci, aai, aae = [CRED_A], ["N*"], ["Ca"]

    assert ssar.rule_allows(Rule(), CRED_A, "Nanything", "Ca")
    assert not ssar.rule_allows(Rule(), CRED_A, "Ranything", "Ca")


# -------------------------------------------------------------------------------------- bound rules
def test_bound_rule_name_is_a_fixed_length_resource_name_per_credential() -> None:
    a, b = ssar.bound_rule_name(CRED_A), ssar.bound_rule_name(CRED_B)
    assert a != b and a == ssar.bound_rule_name(CRED_A)
    assert a.startswith(ssar.BOUND_PREFIX) and len(a) == len(ssar.BOUND_PREFIX) + 32
    assert ssar.is_bound_rule_name(a) and not ssar.is_bound_rule_name("rspf-enrolled")
    assert not ssar.is_bound_rule_name(a + "0") and not ssar.is_bound_rule_name(None)


def test_binding_takes_the_mef_app_ids_or_the_default() -> None:
    assert ssar.Binding.of(CRED_A, "Ca", ("Nx", "R*"), DEFAULT).app_ids == ("Nx", "R*")
    assert ssar.Binding.of(CRED_A, "Ca", None, ("Ndefault",)).app_ids == ("Ndefault",)
    assert ssar.Binding.of(CRED_A, "Ca", (), DEFAULT).app_ids == ()  # the MEF allows none: nothing is admitted


@pytest.mark.parametrize(("cred", "ae", "apps"), [
    ("12-*", "Ca", ("Nx",)),          # a wildcard credential would bind many
    ("", "Ca", ("Nx",)),
    (CRED_A, "/id-mn", ("Nx",)),      # a CSE is not recorded in a rule
    (CRED_A, "C*", ("Nx",)),          # a wildcard AE-ID
    (CRED_A, "Ca", ("app",)),         # App-IDs start with *, R or N
    (CRED_A, "Ca", ("N a",)),
    (CRED_A, "Ca", tuple(f"N{i}" for i in range(ssar.MAX_APP_IDS + 1))),
])
def test_binding_refuses_values_that_would_not_bind(cred: str, ae: str, apps: tuple[str, ...]) -> None:
    with pytest.raises(BadRequest):
        ssar.Binding.of(cred, ae, apps, DEFAULT)


def test_bound_rule_attributes_hold_one_credential_one_ae_and_the_node_label() -> None:
    attrs = ssar.Binding.of(CRED_A, "Ca", ("Nx",), DEFAULT).attributes("/id-mn")
    assert attrs == {"rn": ssar.bound_rule_name(CRED_A), "apci": [CRED_A], "aae": ["Ca"], "aai": ["Nx"],
                     "lbl": ["rspf:node=/id-mn"]}
    assert ssar.node_of(attrs["lbl"]) == "/id-mn" and ssar.node_of(["other"]) is None and ssar.node_of(None) is None


def test_check_bound_rule_accepts_only_the_bound_form() -> None:
    good = ssar.Binding.of(CRED_A, "Ca", ("Nx",), DEFAULT).attributes("/id-mn")
    assert ssar.check_bound_rule(good).credential_id == CRED_A
    lies = [
        {**good, "apci": [CRED_A, CRED_B]},          # two credentials in one rule
        {**good, "apci": ["12-*"]},                  # a wildcard: the name would not be its own
        {**good, "apci": ["33-Ca"]},                 # not a MEF key
        {**good, "aae": ["Ca", "Cb"]},
        {**good, "aae": ["C*"]},
        {**good, "aai": None},
        {**good, "rn": ssar.bound_rule_name(CRED_B)},  # B's name for A's credential
    ]
    for attrs in lies:
        with pytest.raises(BadRequest):
            ssar.check_bound_rule(attrs)
        assert ssar.bound_rule_of(attrs) is None


def test_other_links_are_the_operators_rules_only() -> None:
    links = ["asar123", "cse-in/rspf-enrolled", ssar.bound_rule_name(CRED_A),
             f"/id-in/{ssar.bound_rule_name(CRED_B)}"]
    # a bound rule counts for a node through its label, never through a link someone wrote
    assert ssar.other_links(links) == ["asar123", "cse-in/rspf-enrolled"]
    assert ssar.other_links(None) == []


# ------------------------------------------------------------------------------------------ plans
def test_plan_creates_a_missing_rule_labelled_with_its_node() -> None:
    b = ssar.Binding.of(CRED_A, "Ca", ("Nx",), DEFAULT)
    plan = ssar.plan_recording(b, "/id-in", None)
    assert plan.create == b.attributes("/id-in") and plan.update is None
    assert plan.create["lbl"] == [ssar.node_label("/id-in")]


def test_plan_for_a_recorded_binding_is_nothing() -> None:
    b = ssar.Binding.of(CRED_A, "Ca", ("Nx",), DEFAULT)
    assert ssar.plan_recording(b, "/id-in", b.attributes("/id-in")).nothing


def test_plan_updates_what_changed() -> None:
    b = ssar.Binding.of(CRED_A, "Ca", ("Nnew",), DEFAULT)
    stored = {**b.attributes("/id-in"), "aai": ["Nold"]}
    plan = ssar.plan_recording(b, "/id-in", stored)
    assert plan.update == {"aai": ["Nnew"]} and plan.create is None


def test_plan_moves_a_rule_another_node_had() -> None:
    """A rule another registrar wrote for this credential (or an earlier registrar of this AE): it is made to
    hold the MEF's binding and relabelled with this node."""
    b = ssar.Binding.of(CRED_A, "Ca", ("Nx",), DEFAULT)
    stored = {**b.attributes("/id-mn"), "aae": ["Cintruder"]}
    plan = ssar.plan_recording(b, "/id-in", stored)
    assert plan.update == {"aae": ["Ca"], "lbl": ["rspf:node=/id-in"]}
