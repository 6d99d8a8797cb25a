"""Pins every ACME function the plugin wraps, overrides or calls by keyword (rspf/acme/patches.py, and the
Resource classes and Dispatcher calls of rspf/acme/resources.py).

An ACME upgrade that changes one of these signatures fails here, by name, instead of somewhere in a
running CSE. Together with the version guard (patches.check_acme_version) this is the plugin's contract
with ACME.
"""

from __future__ import annotations

import ast
import copy
import inspect
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("acmecse")


def params(fn: Any) -> list[str]:
    while hasattr(fn, "_rspf_original"):  # ACME's own function under every wrapper of ours
        fn = fn._rspf_original
    return list(inspect.signature(fn).parameters)


def pinned() -> list[tuple[str, Any, list[str]]]:
    from acmecse.plugins.bindings.HttpServer import HttpServer
    from acmecse.plugins.database.TinyDBBinding import TinyDBBinding
    from acmecse.resources import Resource as resource_module
    from acmecse.runtime.configurations.CSEConfiguration import CSEConfiguration
    from acmecse.runtime.EventManager import EventManager
    from acmecse.runtime.Factory import Factory
    from acmecse.runtime.Importer import Importer
    from acmecse.runtime.Storage import Storage
    from acmecse.services.Dispatcher import Dispatcher
    from acmecse.services.RegistrationManager import RegistrationManager
    from acmecse.services.SecurityManager import SecurityManager
    from acmecse.services.Validator import Validator

    return [
        ("RegistrationManager.handleAERegistration", RegistrationManager.handleAERegistration,
         ["self", "ae", "originator", "parentResource"]),
        ("SecurityManager.hasAccess", SecurityManager.hasAccess,
         ["self", "originator", "resource", "requestedPermission", "ty", "parentResource", "request",
          "resultResource"]),
        ("Storage.retrieveResource", Storage.retrieveResource, ["self", "ri", "csi", "srn", "aei"]),
        ("Storage.searchByFragment", Storage.searchByFragment, ["self", "dct", "filter"]),
        ("Factory.initResources", Factory.initResources, ["self"]),
        ("Importer.assignAttributePolicies", Importer.assignAttributePolicies, ["self"]),
        ("Importer.importScripts", Importer.importScripts, ["self"]),
        ("Resource.setAttribute", resource_module.Resource.setAttribute, ["self", "key", "value", "overwrite"]),
        ("Resource.attribute", resource_module.Resource.attribute, ["self", "key", "default"]),
        ("addToInternalAttributes", resource_module.addToInternalAttributes, ["name"]),
        ("HttpServer.addEndpoint", HttpServer.addEndpoint,
         ["self", "endpoint", "endpoint_name", "handler", "methods", "strictSlashes"]),
        # overridden by the Resource classes of resources.py, built by the factory patch
        ("Resource.__init__", resource_module.Resource.__init__, ["self", "dct", "create"]),
        ("Resource.activate", resource_module.Resource.activate, ["self", "parentResource", "originator"]),
        ("Resource.validate", resource_module.Resource.validate, ["self", "originator", "dct", "parentResource"]),
        ("Resource.deactivate", resource_module.Resource.deactivate, ["self", "originator", "parentResource"]),
        # the crash recovery of wrap_ae_registration (ACME's originator table)
        ("Storage.getOriginator", Storage.getOriginator, ["self", "originator"]),
        ("Storage.removeOriginator", Storage.removeOriginator, ["self", "originator"]),
        # called by the patches
        ("Importer._parseAttribute", Importer._parseAttribute,
         ["self", "attr", "fn", "typeShortname", "sname", "checkListType"]),
        ("Validator.getAttributePolicy", Validator.getAttributePolicy, ["self", "rtype", "attr", "specific"]),
        ("Validator.addAttributePolicy", Validator.addAttributePolicy, ["self", "rtype", "attr", "attrPolicy"]),
        ("CSEConfiguration.validateConfiguration", CSEConfiguration.validateConfiguration,
         ["self", "config", "initial"]),
        ("EventManager.addHandler", EventManager.addHandler, ["self", "event", "func"]),
        # called by resources.py (originator by keyword)
        ("Dispatcher.updateLocalResource", Dispatcher.updateLocalResource,
         ["self", "resource", "dct", "doUpdateCheck", "originator"]),
        ("Dispatcher.deleteLocalResource", Dispatcher.deleteLocalResource,
         ["self", "resource", "originator", "withDeregistration", "parentResource", "doDeleteCheck"]),
        ("Resource.dbUpdate", resource_module.Resource.dbUpdate, ["self", "finalize"]),
        # replaced by scale_storage (and removeChildResource, the other half of the child-list invariant)
        ("TinyDBBinding.upsertChildResource", TinyDBBinding.upsertChildResource, ["self", "childResource", "ri"]),
        ("TinyDBBinding.removeChildResource", TinyDBBinding.removeChildResource, ["self", "ri", "pi"]),
    ]


@pytest.mark.parametrize(("name", "fn", "expected"), pinned(), ids=[p[0] for p in pinned()])
def test_signature_of_every_patched_acme_function(name: str, fn: Any, expected: list[str]) -> None:
    assert params(fn) == expected, f"ACME changed {name}: re-check rspf/acme/patches.py and resources.py"


def test_the_handlers_the_secure_listener_recognises_exist() -> None:
    from acmecse.plugins.bindings.HttpServer import HttpServer

    from rspf.acme.host import _ONEM2M_HANDLERS

    for name in _ONEM2M_HANDLERS:
        assert params(getattr(HttpServer, name)) == ["self", "path"], name


def test_the_events_status_and_constants_the_plugin_reads_exist() -> None:
    from acmecse.etc.Constants import RuntimeConstants as RC
    from acmecse.etc.Types import CSEStatus, Permission
    from acmecse.runtime.EventManager import eventManager

    assert callable(eventManager.cseReset) and callable(eventManager.cseRestarted)
    assert callable(eventManager.aeHasDeregistered)
    assert CSEStatus.RESETTING and Permission.CREATE and Permission.RETRIEVE and Permission.DISCOVERY
    assert Permission.UPDATE and Permission.DELETE
    for attr in ("cseStatus", "cseCsi", "cseSPid", "cseOriginator", "cseOriginators", "cseRi", "cseRn", "cseType"):
        assert hasattr(RC, attr), attr
    from acmecse.plugins.bindings.HttpServer import HttpServer

    assert {"post", "get", "put", "delete"} <= {f.__name__ for f in HttpServer.operation2method.values()}


def test_the_resource_descriptions_take_the_fields_the_factory_patch_sets() -> None:
    import dataclasses

    from acmecse.etc.Types import ResourceDescription

    fields = {f.name for f in dataclasses.fields(ResourceDescription)}
    assert {"type", "typeName", "fullName", "attributes", "childResourceTypes"} <= fields


def test_the_version_guard_accepts_this_acme_and_refuses_another(monkeypatch: pytest.MonkeyPatch) -> None:
    from rspf.acme import patches

    patches.check_acme_version()  # the installed ACME is supported
    monkeypatch.setattr(patches, "acme_version", lambda: "2027.1.0")
    with pytest.raises(RuntimeError, match=r"2026\.5\.x.*2027\.1\.0.*rspf/acme/patches\.py"):
        patches.check_acme_version()
    with pytest.raises(RuntimeError, match="2027.1.0"):
        patches.install_resource_types()  # refuses before it changes anything


def acme_writes(source: str) -> list[str]:
    """Statements that directly change something reached through a name imported from ``acmecse``: an
    assignment to (or ``del`` of) its attribute or item, or ``setattr``/``delattr`` on it. A heuristic: a
    write through a local alias or a mutating method call is not seen, so review still matters."""
    tree = ast.parse(source)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("acmecse"):
            names |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("acmecse")}

    def root(expr: ast.expr) -> str | None:
        while isinstance(expr, (ast.Attribute, ast.Subscript)):
            expr = expr.value
        return expr.id if isinstance(expr, ast.Name) else None

    found = []
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = node.targets
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr"):
            targets = [ast.Attribute(value=node.args[0], attr="?")] if node.args else []
        for t in targets:
            if isinstance(t, (ast.Attribute, ast.Subscript)) and root(t) in names:
                found.append(f"line {node.lineno}: {ast.unparse(node)[:80]}")
    return found


def test_no_plugin_module_but_patches_changes_acme() -> None:
    """The architecture's rule: every touch of ACME internals sits in rspf/acme/patches.py."""
    import rspf.acme

    folder = Path(rspf.acme.__file__).parent
    assert acme_writes((folder / "patches.py").read_text()), "the scanner finds the patches it is meant to find"
    for path in sorted(folder.glob("*.py")):
        if path.name != "patches.py":
            assert acme_writes(path.read_text()) == [], f"{path.name} changes ACME: move that to patches.py"


class ChildTable:
    """The part of ACME's TinyDBBinding that keeps the child lists: a real TinyDB table in memory, as ACME sets it
    up (TinyDBBetterTable, string document IDs), and its lock."""

    def __init__(self) -> None:
        import threading

        from acmecse.helpers.TinyDBBetterTable import TinyDBBetterTable
        from tinydb import TinyDB
        from tinydb.storages import MemoryStorage

        self.lockChildResources = threading.Lock()
        self.tabChildResources = TinyDB(storage=MemoryStorage).table("children")
        TinyDBBetterTable.assign(self.tabChildResources)

    def records(self) -> dict[str, dict[str, Any]]:
        return {str(d.doc_id): dict(d) for d in self.tabChildResources.all()}


class CountingList(list):
    """A child list that counts the scans of it."""

    scans = 0

    def __iter__(self) -> Any:
        CountingList.scans += 1
        return super().__iter__()


def child(ri: str, pi: str | None, ty: int) -> dict[str, Any]:
    return {"ri": ri, "pi": pi, "ty": ty, "ch": []}


def test_scale_storage_keeps_the_child_lists_acme_keeps_without_scanning_them() -> None:
    """The same writes through ACME's upsertChildResource and through the patched one leave the same records;
    the patched one appends a new resource to its parent's list without a scan of that list."""
    from acmecse.plugins.database.TinyDBBinding import TinyDBBinding

    from rspf.acme import patches

    patches.scale_storage()
    patches.scale_storage()  # idempotent: wrapped once
    patched = TinyDBBinding.upsertChildResource
    acme = patched._rspf_original  # type: ignore[attr-defined]
    assert getattr(acme, "_rspf_original", None) is None
    steps: list[tuple[str, Any]] = [("up", child("cse", None, 5))]
    steps += [("up", child(f"Cae{n}", "cse", 2)) for n in range(50)]
    steps += [("up", child("cnt1", "Cae3", 3)), ("up", child("rule1", "cse", 19)),
              ("up", child("Cae7", "cse", 2)),          # written again: ACME's path, no second entry
              ("rm", ("Cae9", "cse")), ("up", child("Cae9", "cse", 2)),  # removed, then made again
              ("up", child("cnt1", "Cae3", 3)), ("rm", ("cnt1", "Cae3")), ("up", child("cnt2", "Cae3", 3))]
    results = []
    for upsert in (acme, patched):
        table = ChildTable()
        for op, args in copy.deepcopy(steps):  # the table keeps the list of the dict it was given, as in ACME
            if op == "up":
                upsert(table, args, args["ri"])
            else:
                TinyDBBinding.removeChildResource(table, *args)
        results.append(table.records())
    assert results[0] == results[1]
    cse = results[1]["cse"]["ch"]
    assert len(cse) == 51 and len({ri for ri, _ty in cse}) == 51 and ["rule1", 19] in cse
    assert results[1]["Cae3"]["ch"] == [["cnt2", 3]]

    # a parent without a record: ACME's own path, and its own error
    for upsert in (acme, patched):
        with pytest.raises(TypeError):
            upsert(ChildTable(), child("orphan", "nowhere", 3), "orphan")

    # no scan of the parent's list for a new resource (ACME's own code scans it every time)
    for upsert, scans in ((patched, 0), (acme, 20)):
        table = ChildTable()
        upsert(table, child("cse", None, 5), "cse")
        table.tabChildResources.update({"ch": CountingList()}, doc_ids=["cse"])
        CountingList.scans = 0
        for n in range(20):
            upsert(table, child(f"Cae{n}", "cse", 2), f"Cae{n}")
        assert CountingList.scans == scans
        assert [ri for ri, _ty in table.records()["cse"]["ch"]] == [f"Cae{n}" for n in range(20)]


class ResourceDb:
    """ACME's Storage over a stand-in database: resources by resource ID, and the scans by AE-ID counted."""

    def __init__(self, docs: list[dict[str, Any]]) -> None:
        from types import SimpleNamespace

        self.docs = docs
        self.scans = 0
        self.db = self
        self.factory = SimpleNamespace(resourceFromDict=lambda d: SimpleNamespace(**d))

    def retrieveResource(self, **kw: Any) -> Any:
        from acmecse.runtime.Storage import Storage

        return Storage.retrieveResource(self, **kw)

    def searchResources(self, ri: str | None = None, aei: str | None = None, **_kw: Any) -> list[dict[str, Any]]:
        if ri is not None:
            return [d for d in self.docs if d["ri"] == ri]
        self.scans += 1
        return [d for d in self.docs if d.get("aei") == aei]


def test_scale_storage_finds_an_ae_by_its_resource_id_before_acme_scans_for_its_ae_id() -> None:
    from acmecse.etc.ResponseStatusCodes import ResponseException
    from acmecse.etc.Types import ResourceTypes
    from acmecse.runtime.Storage import Storage

    from rspf.acme import patches

    patches.scale_storage()
    patches.scale_storage()
    assert getattr(Storage.retrieveResource._rspf_original, "_rspf_ae_by_ri", False) is False  # wrapped once
    ae, cnt = int(ResourceTypes.AE), int(ResourceTypes.CNT)
    storage = ResourceDb([{"ri": "Cae", "ty": ae, "aei": "Cae"},
                          {"ri": "ae-made-by-import", "ty": ae, "aei": "Cimported"},
                          {"ri": "Cnot", "ty": cnt},
                          {"ri": "Cwrong", "ty": ae, "aei": "Cother"}])
    assert Storage.retrieveResource(storage, aei="Cae").ri == "Cae"
    assert storage.scans == 0  # one lookup by resource ID
    assert Storage.retrieveResource(storage, aei="Cimported").ri == "ae-made-by-import"
    assert storage.scans == 1  # not where ACME puts an AE it registers: ACME's scan finds it
    for missing in ("Cnot", "Cwrong", "Cnobody"):  # a resource under that ID that is not the AE does not count
        with pytest.raises(ResponseException):
            Storage.retrieveResource(storage, aei=missing)
    assert storage.scans == 4
    assert Storage.retrieveResource(storage, ri="Cnot").ty == cnt  # other lookups: ACME's, unchanged
