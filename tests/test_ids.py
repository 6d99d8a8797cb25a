"""rspf.ids: every oneM2M identifier form in one place."""

from __future__ import annotations

import pytest

from rspf import ids
from rspf.errors import BadRequest

SP = "//sp.example.com"


@pytest.mark.parametrize("value,cse,ae,absolute", [
    ("/id-in", True, False, False),
    ("Cae1", False, True, False),
    ("S", False, True, False),
    ("//sp.example.com/id-in", False, False, True),
    ("//sp.example.com/id-in/Cae1", False, False, True),
    ("//sp.example.com/id-in/Cae1/extra", False, False, False),
    ("id-in", False, False, False),
    ("/id in", False, False, False),
    ("", False, False, False),
    ("Xae", False, False, False),
])
def test_forms(value: str, cse: bool, ae: bool, absolute: bool) -> None:
    assert (ids.is_cse_id(value), ids.is_ae_id(value), ids.is_absolute_id(value)) == (cse, ae, absolute)


def test_absolute_id() -> None:
    assert ids.absolute_id("/id-in", SP) == "//sp.example.com/id-in"
    assert ids.absolute_id("Cae1", SP, "/id-mn") == "//sp.example.com/id-mn/Cae1"
    assert ids.absolute_id("//other.sp/id-x", SP) == "//other.sp/id-x"
    with pytest.raises(BadRequest, match="neither"):
        ids.absolute_id("Cae1", SP)


@pytest.mark.parametrize("value,expected", [
    ("id-in", "/id-in"),
    ("/id-in", "/id-in"),
    ("/id-in/", "/id-in"),
    ("//sp.example.com/id-in", "/id-in"),
    ("//other.sp/id-in", "//other.sp/id-in"),  # another SP's CSE keeps its absolute form
    ("", None),
    (None, None),
])
def test_sp_relative_cse_id(value: str | None, expected: str | None) -> None:
    assert ids.sp_relative_cse_id(value, SP) == expected


def test_sp_relative_without_own_sp_keeps_absolute() -> None:
    assert ids.sp_relative_cse_id("//sp.example.com/id-in", None) == "//sp.example.com/id-in"


@pytest.mark.parametrize("oid,path", [
    ("//sp.example.com/id-in/cse-in", "/_/sp.example.com/id-in/cse-in"),
    ("/id-in/cse-in", "/~/id-in/cse-in"),
    ("cse-in/ae1", "/cse-in/ae1"),
])
def test_http_path(oid: str, path: str) -> None:
    assert ids.http_path(oid) == path


def test_originator_and_resource_name_sets() -> None:
    assert ids.ORIGINATOR_RE.fullmatch("/id-in/Cae1")
    assert not ids.ORIGINATOR_RE.fullmatch("C ae")
    assert not ids.ORIGINATOR_RE.fullmatch("x" * 257)
    assert ids.RESOURCE_NAME_RE.fullmatch("rspf-ssar")
    assert not ids.RESOURCE_NAME_RE.fullmatch("a/b")
