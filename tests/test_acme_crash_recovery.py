"""The crash recovery of the AE registration hook (rspf.acme.patches): which originators count as left over by an
earlier run, against a stand-in of ACME's storage (the real thing: integration/test_acme_rules.py)."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("acmecse")


class Storage:
    """ACME's Storage calls the check uses: the originator table and the <AE> lookup by AE-ID."""

    def __init__(self, originators: set[str], aes: set[str]) -> None:
        self.originators, self.aes = originators, aes

    def getOriginator(self, originator: str) -> Any:
        return (originator, 1) if originator in self.originators else None

    def retrieveResource(self, aei: str) -> Any:
        from acmecse.etc.ResponseStatusCodes import NOT_FOUND

        if aei not in self.aes:
            raise NOT_FOUND("resource not found")
        return object()


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    from rspf.acme import patches

    monkeypatch.setattr(patches, "_registered_here", set())


def test_an_originator_counted_without_its_ae_is_stale() -> None:
    from rspf.acme.patches import _stale_registration

    assert _stale_registration(Storage({"Clost"}, set()), "Clost") is True


@pytest.mark.parametrize(("originators", "aes", "originator"), [
    ({"Cthere"}, {"Cthere"}, "Cthere"),   # registered and its <AE> exists: 4117 stays
    (set(), set(), "Cnew"),               # not counted: nothing to clear
    ({"C"}, set(), "C"),                  # a CSE-assigned AE-ID is new anyway
    ({"S"}, set(), "S"),
    ({"/id-mn"}, set(), "/id-mn"),        # a CSE-ID is not an AE registration
    (set(), set(), ""),
])
def test_everything_else_is_left_alone(originators: set[str], aes: set[str], originator: str) -> None:
    from rspf.acme.patches import _stale_registration

    assert _stale_registration(Storage(originators, aes), originator) is False


def test_a_registration_of_this_process_is_never_cleared() -> None:
    """This process's tables are consistent: a counted originator without <AE> is a registration under way."""
    from rspf.acme import patches

    patches._registered_here.add("Cbusy")
    assert patches._stale_registration(Storage({"Cbusy"}, set()), "Cbusy") is False


def test_registered_ae_is_a_lookup_by_resource_id_that_checks_type_and_ae_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plain port asks for every request whether its originator is a registered AE: one lookup by resource ID
    (ACME's by AE-ID scans), and a resource under that ID that is not that AE does not count."""
    from types import SimpleNamespace

    from acmecse.etc.ResponseStatusCodes import NOT_FOUND
    from acmecse.etc.Types import ResourceTypes
    from acmecse.runtime import CSE

    from rspf.acme import patches

    found = {"Cae": SimpleNamespace(ty=ResourceTypes.AE, aei="Cae", attribute=lambda k: "12-k@mef.example.com"),
             "Cother": SimpleNamespace(ty=ResourceTypes.AE, aei="Cnot-this-one", attribute=lambda k: None),
             "cnt1": SimpleNamespace(ty=ResourceTypes.CNT, aei=None, attribute=lambda k: None)}
    asked: list[dict[str, Any]] = []

    class Lookup:
        def retrieveResource(self, **kw: Any) -> Any:
            asked.append(kw)
            if kw.get("ri") in found:
                return found[kw["ri"]]
            raise NOT_FOUND("resource not found")

    monkeypatch.setattr(CSE, "storage", Lookup(), raising=False)
    assert patches.registered_ae("Cae") == (True, "12-k@mef.example.com")
    assert patches.registered_ae("Cother") == (False, None)
    assert patches.registered_ae("cnt1") == (False, None)
    assert patches.registered_ae("Cnobody") == (False, None)
    assert all(set(kw) == {"ri"} for kw in asked) and len(asked) == 4
