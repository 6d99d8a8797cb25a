"""Compatibility: with the plugin loaded (enforcement off), ACME's plain port behaves as without it.

The same oneM2M scenario runs against an ACME CSE without the plugin and one with it; every answer's
Response Status Code (and the parts of the content that do not depend on timing or IDs) must be equal.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from .acme_harness import TY_AE, TY_CNT, AcmeCse, ae_body, new_mef

TY_CIN, TY_ACP = 4, 1


def scenario(cse: AcmeCse) -> list[tuple[str, Any]]:
    """A plain-port session of an AE and the admin; returns (step, comparable result) pairs."""
    base = f"/{cse.cse_name}"
    out: list[tuple[str, Any]] = []

    def step(name: str, method: str, path: str, content: Any = None, **kw: Any) -> Any:
        r = cse.request(method, path, content, **kw)
        out.append((name, r.rsc))
        return r

    step("register AE", "POST", base, ae_body("Ccompat", "Ncompat"), origin="Ccompat", ty=TY_AE)
    step("same AE again", "POST", base, ae_body("Ccompat2", "Ncompat"), origin="Ccompat", ty=TY_AE)
    step("originator not allowed", "POST", base, ae_body("Xbad", "Nbad"), origin="Xbad", ty=TY_AE)
    step("container", "POST", f"{base}/Ccompat", {"m2m:cnt": {"rn": "box", "mni": 2}}, origin="Ccompat", ty=TY_CNT)
    for i in range(3):
        step(f"instance {i}", "POST", f"{base}/Ccompat/box", {"m2m:cin": {"con": f"v{i}"}}, origin="Ccompat",
             ty=TY_CIN)
    la = step("latest", "GET", f"{base}/Ccompat/box/la", origin="Ccompat")
    out.append(("latest content", la.pc("m2m:cin").get("con")))
    box = step("container after mni", "GET", f"{base}/Ccompat/box", origin="Ccompat")
    out.append(("current instances", box.pc("m2m:cnt").get("cni")))
    step("update container", "PUT", f"{base}/Ccompat/box", {"m2m:cnt": {"lbl": ["a:b"]}}, origin="Ccompat")
    found = step("discovery", "GET", f"{base}?fu=1&ty={TY_CIN}", origin="CAdmin")
    out.append(("instances found", len(found.pc("m2m:uril"))))
    step("stranger reads", "GET", f"{base}/Ccompat/box", origin="Cstranger")
    step("admin ACP", "POST", base, {"m2m:acp": {"rn": "acpCompat", "pv": {"acr": [{"acor": ["Cfriend"], "acop": 2}]},
                                                  "pvs": {"acr": [{"acor": ["CAdmin"], "acop": 63}]}}},
         origin="CAdmin", ty=TY_ACP)
    step("unknown resource", "GET", f"{base}/nothing-here", origin="CAdmin")
    step("delete AE", "DELETE", f"{base}/Ccompat", origin="Ccompat")
    step("AE gone", "GET", f"{base}/Ccompat", origin="CAdmin")
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AcmeCse, AcmeCse]]:
    root = tmp_path_factory.mktemp("compat")
    mef, target = new_mef(root / "mef")
    mef.start()
    plain = AcmeCse(root, "without-plugin")
    plain.write_ini()
    with_plugin = AcmeCse(root, "with-plugin")
    try:
        with_plugin.install(mef, "--no-enforcement", "--no-enrol", "--mef-psk-identity", target.psk_identity,
                            "--mef-psk-file", target.psk_file)
        plain.start()
        with_plugin.start()
        yield plain, with_plugin
    finally:
        plain.stop()
        with_plugin.stop()
        mef.stop()


def test_plain_port_answers_the_same_with_and_without_the_plugin(pair: tuple[AcmeCse, AcmeCse]) -> None:
    plain, with_plugin = pair
    assert not plain.has_plugin and with_plugin.has_plugin
    expected = scenario(plain)
    assert dict(expected)["register AE"] == 2001 and dict(expected)["latest content"] == "v2"  # sanity
    assert scenario(with_plugin) == expected


def test_the_plugin_only_adds_its_resource_types(pair: tuple[AcmeCse, AcmeCse]) -> None:
    plain, with_plugin = pair
    srt_plain = set(plain.get(f"/{plain.cse_name}").pc("m2m:cb")["srt"])
    srt_plugin = set(with_plugin.get(f"/{with_plugin.cse_name}").pc("m2m:cb")["srt"])
    assert srt_plugin - srt_plain == {11, 19, 20}
    assert srt_plain <= srt_plugin


