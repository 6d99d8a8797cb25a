"""Pins every ACME function the plugin wraps or calls by keyword (rspf/acme/internals.py, resources.py).

An ACME upgrade that changes one of these signatures fails here, by name, instead of somewhere in a
running CSE. Together with the version guard (check_acme_version) this is the plugin's contract with ACME.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

pytest.importorskip("acmecse")


def params(fn: Any) -> list[str]:
    fn = getattr(fn, "_rspf_original", fn)
    return list(inspect.signature(fn).parameters)


def pinned() -> list[tuple[str, Any, list[str]]]:
    from acmecse.plugins.bindings.HttpServer import HttpServer
    from acmecse.resources import Resource as resource_module
    from acmecse.runtime.Factory import Factory
    from acmecse.runtime.Importer import Importer
    from acmecse.runtime.Storage import Storage
    from acmecse.services.RegistrationManager import RegistrationManager
    from acmecse.services.SecurityManager import SecurityManager

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
    ]


@pytest.mark.parametrize(("name", "fn", "expected"), pinned(), ids=[p[0] for p in pinned()])
def test_signature_of_every_patched_acme_function(name: str, fn: Any, expected: list[str]) -> None:
    assert params(fn) == expected, f"ACME changed {name}: re-check rspf/acme/internals.py and resources.py"


def test_the_handlers_the_secure_listener_recognises_exist() -> None:
    from acmecse.plugins.bindings.HttpServer import HttpServer

    from rspf.acme.internals import _ONEM2M_HANDLERS

    for name in _ONEM2M_HANDLERS:
        assert params(getattr(HttpServer, name)) == ["self", "path"], name


def test_the_events_status_and_constants_the_plugin_reads_exist() -> None:
    from acmecse.etc.Constants import RuntimeConstants as RC
    from acmecse.etc.Types import CSEStatus, Permission
    from acmecse.runtime.EventManager import eventManager

    assert callable(eventManager.cseReset) and callable(eventManager.cseRestarted)
    assert CSEStatus.RESETTING and Permission.CREATE and Permission.RETRIEVE and Permission.DISCOVERY
    for attr in ("cseStatus", "cseCsi", "cseSPid", "cseOriginator", "cseOriginators", "cseRi", "cseRn", "cseType"):
        assert hasattr(RC, attr), attr
    from acmecse.plugins.bindings.HttpServer import HttpServer

    assert {"post", "get", "put", "delete"} <= {f.__name__ for f in HttpServer.operation2method.values()}


def test_the_version_guard_accepts_this_acme() -> None:
    from rspf.acme.internals import check_version

    check_version()
