"""The device file of ``rspf ae register`` (rspf.device): keys, paths, refusals, and its tie to the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from rspf.device import KEYS, load
from rspf.errors import ConfigError

GOOD = """\
[ae]
mef = "127.0.0.1:8443"
mef_fqdn = "mef.example.com"
kpm_id = "dev1@mef.example.com"
kpm_file = "keys/dev1.kpm"
node_id = "urn:dev:ops:001"
store = "/var/lib/dev1/dev1.store"
app_id = "Nsensor-app"
renew_before = 3600
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conf" / "dev1.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def test_a_good_file_gives_the_command_parameters(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    assert load(path) == {
        "mef_addr": "127.0.0.1:8443", "mef_fqdn": "mef.example.com", "kpm_id": "dev1@mef.example.com",
        "kpm_file": path.parent / "keys" / "dev1.kpm",  # relative to the file, not to the working directory
        "node_id": "urn:dev:ops:001", "store_path": Path("/var/lib/dev1/dev1.store"), "app_id": "Nsensor-app",
        "renew_before": 3600}


@pytest.mark.parametrize("text,needle", [
    ("[ae]\nkpm_fle = 'x'\n", "[ae] kpm_fle: unknown key; did you mean kpm_file?"),
    ("[ae]\nKPM_ID = 'x'\n", "[ae] KPM_ID: unknown key; did you mean kpm_id?"),
    ("[ae]\ncolour = 'x'\n", "[ae] colour: unknown key (the keys: mef, mef_fqdn"),
    ("[ae]\nkpm = '00aa'\n", "[ae] kpm: key material never goes into this file; kpm_file names the 0600 file"),
    ("[ae]\nrenew_before = '1h'\n", "[ae] renew_before: must be an integer, not '1h'"),
    ("[ae]\nrenew_before = true\n", "[ae] renew_before: must be an integer, not True"),
    ("[ae]\nmef = 8443\n", "[ae] mef: must be a string, not 8443"),
    ("mef = 'x'\n", "unknown table or key 'mef'; the settings go in a [ae] table"),
    ("ae = 1\n", "ae must be a table"),
    ("[ae\n", "not valid TOML"),
])
def test_a_bad_file_names_the_file_and_the_key(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load(path)
    assert str(err.value).startswith(str(path)) and needle in str(err.value)
    assert "00aa" not in str(err.value)


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the device configuration"):
        load(tmp_path / "absent.toml")


def test_every_key_is_an_option_and_a_variable_of_ae_register() -> None:
    from rspf.cli import ae_register

    options = {p.name: p for p in ae_register.params}
    for key in KEYS:
        option = options[key.param]
        assert key.option in option.opts, key.name  # type: ignore[attr-defined]
        assert option.envvar == key.envvar == "RSPF_" + key.name.upper(), key.name
    config = next(p for p in ae_register.params if "--config" in p.opts)  # type: ignore[attr-defined]
    assert config.envvar == "RSPF_AE_CONFIG" and config.is_eager


def test_the_docs_list_every_key() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "enrolee.md").read_text()
    assert all(f"`{k.name}`" in doc for k in KEYS)
