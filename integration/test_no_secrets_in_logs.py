"""No key material in any log or output.

A full scenario (several enrolments, re-use, --force, Target fetches, refusals of every kind) runs with the
MEF at log_level debug and the Enrolee with -v. Then the MEF log (stderr and log_file) and every CLI
stdout/stderr are searched for every Kpm, Target PSK, the MEF master key, every Ke and registrar key (from
Enrolee.load() after each enrolment) and every fetched key, as hex (any case), half-hex and base64.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .support import FQDN, Cli, MefHome, read_hex


@dataclass
class Scenario:
    home: MefHome
    secrets: dict[str, bytes] = field(default_factory=dict)
    ke_ids: list[str] = field(default_factory=list)

    def secret(self, label: str, value: bytes) -> None:
        assert len(value) >= 16, label
        self.secrets[label] = value

    def record_enrolment(self, name: str) -> None:
        enrolment = self.home.load_enrolment(self.home.enrolees[name])
        assert enrolment is not None
        n = len(self.ke_ids)
        self.ke_ids.append(enrolment.ke_id)
        self.secret(f"Ke #{n} of {name}", enrolment.enrolment_key.reveal())
        self.secret(f"registrar key #{n} of {name}", enrolment.registrar_key.reveal())

    def fetch(self, target: str, ke_id: str, suid: int) -> None:
        out = self.home.root / f"fetched-{secrets.token_hex(4)}.hex"
        res = self.home.fetch(self.home.targets[target], ke_id, suid, key_out=out)
        assert res.rc == 0, str(res)
        self.secret(f"key fetched by {target} for {ke_id}/{suid}", bytes.fromhex(read_hex(out)))

    def texts(self) -> dict[str, str]:
        root = self.home.root
        out = {f"cli: rspf {' '.join(r.args)}": r.output for r in self.home.cli.results}
        for name in ("mef.log", "mef-file.log", "mef.stdout"):
            out[name] = (root / name).read_text(errors="replace")
        return out


def forms(value: bytes) -> dict[str, str]:
    h = value.hex()
    return {"hex": h, "first half of the hex": h[: len(h) // 2], "last half of the hex": h[len(h) // 2:],
            "base64": base64.b64encode(value).decode(), "base64url": base64.urlsafe_b64encode(value).decode()}


def enrol_v(home: MefHome, name: str, *extra, expect: int = 0, **kw):
    res = home.enrol(home.enrolees[name], "-v", *extra, **kw)
    assert res.rc == expect, str(res)
    return res


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    root = tmp_path_factory.mktemp("secrets")
    home = MefHome(root, Cli(root)).build_default()
    home.set_config("log_level", '"debug"')
    home.set_config("log_file", '"mef-file.log"')
    home.add_target("x", "/id-x")
    home.add_enrolee("dev2", "--target", "/id-x:22,23", "--rm-uri", "https://dm.example.com")
    home.add_enrolee("dev3", "--expiry-seconds", "120")
    home.import_batch("batch", 2)
    sc = Scenario(home)
    home.start()
    try:
        # enrolments: first, reuse (text and JSON output), forced, renewal of a short profile, imported ones
        enrol_v(home, "dev1")
        sc.record_enrolment("dev1")
        enrol_v(home, "dev1", as_json=False)
        enrol_v(home, "dev1", "--force", as_json=False)
        sc.record_enrolment("dev1")
        enrol_v(home, "dev2")
        sc.record_enrolment("dev2")
        enrol_v(home, "dev3", "--renew-before", "100")
        sc.record_enrolment("dev3")
        enrol_v(home, "dev3", "--renew-before", "100", "--force")
        sc.record_enrolment("dev3")
        for i in (1, 2):
            enrol_v(home, f"batch{i}")
            sc.record_enrolment(f"batch{i}")
        for name in ("dev1", "dev2"):
            info = home.enrolees[name]
            home.cli.ok("show-enrolment", "--mef", home.address, "--mef-fqdn", FQDN, "--kpm-id", info.kpm_id,
                        "--kpm-file", info.kpm_file, "--store", info.store)

        # fetches
        for ke_id in sc.ke_ids:
            sc.fetch("in", ke_id, 22)
        dev2_ke_id = sc.ke_ids[2]
        sc.fetch("x", dev2_ke_id, 22)
        sc.fetch("x", dev2_ke_id, 23)

        # failures of every kind
        wrong = home.keygen("wrong.kpm")
        sc.secret("the wrong Kpm", bytes.fromhex(read_hex(wrong)))
        enrol_v(home, "dev1", "--force", kpm_file=wrong, expect=1)                     # TLS: wrong Kpm
        enrol_v(home, "dev1", "--force", kpm_id=f"nobody@{FQDN}", expect=1)           # TLS: unknown KpmID
        enrol_v(home, "dev1", "--force", node_id="urn:dev:ops:999", expect=1)         # 4103
        enrol_v(home, "dev1", "--force", kpm_file=home.targets["in"].psk_file, expect=1)
        assert home.fetch(home.targets["in"], dev2_ke_id, 23).rc == 1                 # 4103 SUID
        assert home.fetch(home.targets["in"], dev2_ke_id, 23, origin="/id-x").rc == 1  # 4103 spoofing
        assert home.fetch(home.targets["in"], f"{secrets.token_hex(16)}@{FQDN}").rc == 1  # 4004
        assert home.fetch(home.targets["in"], "0123@" + FQDN).rc == 2                  # malformed
        bad_target = home.keygen("wrong.psk")
        sc.secret("the wrong Target PSK", bytes.fromhex(read_hex(bad_target)))
        spoof = home.cli("fetch-credentials", "--mef", home.address, "--mef-fqdn", FQDN, "--psk-identity",
                         home.targets["in"].psk_identity, "--psk-file", bad_target, "--origin", "/id-in",
                         sc.ke_ids[0], 22)
        assert spoof.rc == 1, str(spoof)
        home.revoke(home.enrolees["dev2"].kpm_id)
        assert home.fetch(home.targets["x"], dev2_ke_id, 22).rc == 1                  # 4004 after revocation
        enrol_v(home, "dev2", "--force", expect=1)

        # administration output
        home.cli.ok("mef", "enrolee", "list", "-c", home.config)
        home.list_enrolees()
        home.cli.ok("mef", "target", "list", "-c", home.config)
        for info in home.enrolees.values():
            home.show(info.kpm_id)
    finally:
        assert home.stop() == 0

    for name, info in home.enrolees.items():
        sc.secret(f"Kpm of {name}", bytes.fromhex(info.kpm_hex))
    for name, t in home.targets.items():
        sc.secret(f"Target PSK of {name}", bytes.fromhex(t.psk_hex))
    sc.secret("MEF master key", bytes.fromhex(read_hex(root / "mef.masterkey")))
    yield sc


def test_the_scenario_is_logged_at_debug(scenario: Scenario) -> None:
    """Sanity: the logs searched below are the real, verbose ones (so an empty log cannot pass)."""
    texts = scenario.texts()
    mef_log = texts["mef.log"]
    assert " DEBUG " in mef_log and "session <Session" in mef_log
    assert texts["mef-file.log"].strip()
    for ke_id in scenario.ke_ids:
        assert ke_id in mef_log
    assert "refused with 4103" in mef_log and "refused with 4004" in mef_log
    assert "TLS handshake refused from" in mef_log
    assert len(scenario.secrets) >= 25
    assert len(scenario.home.cli.results) >= 40


def test_no_key_material_in_logs_or_cli_output(scenario: Scenario) -> None:
    leaks = []
    texts = scenario.texts()
    lowered = {name: text.lower() for name, text in texts.items()}
    for label, value in scenario.secrets.items():
        for form, needle in forms(value).items():
            for name, text in texts.items():
                hay = lowered[name] if "hex" in form else text
                if needle in hay:
                    leaks.append(f"{label} ({form}) appears in {name}")
    assert not leaks, "key material leaked:\n" + "\n".join(leaks)


def test_no_key_material_in_clear_at_rest(scenario: Scenario) -> None:
    """The Enrolee stores and the MEF database hold keys only sealed."""
    root: Path = scenario.home.root
    files = [p for p in root.iterdir() if p.suffix == ".store" or p.name.startswith("mef.sqlite")]
    assert any(p.suffix == ".store" for p in files) and any(p.name == "mef.sqlite" for p in files)
    leaks = []
    for path in files:
        data = path.read_bytes()
        for label, value in scenario.secrets.items():
            if label == "MEF master key":
                continue
            for needle in (value, value.hex().encode(), base64.b64encode(value)):
                if needle in data:
                    leaks.append(f"{label} in {path.name}")
    assert not leaks, "\n".join(leaks)
