"""Fixtures: a MEF home built with the ``rspf`` CLI in a temporary folder and a running ``rspf mef serve``.

* ``cli``       -- runs the CLI (``cli(*args)`` -> CliResult with rc/stdout/stderr) and remembers every result.
* ``mef_home``  -- init + enrolee dev1 (/id-mn1, urn:dev:ops:001, registrar /id-in) + Target /id-in; not running.
* ``mef``       -- ``mef_home`` with ``rspf mef serve`` running (stderr in ``mef.log``); stopped by PID afterwards.
* ``module_mef`` -- the same, shared by the tests of one module.
* ``mef_target`` -- a running MEF with the IN-CSE registered as Enrolment Target (for the ACME tests), shared by the
  tests of one module.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from .acme_harness import new_mef
from .support import Cli, CliResult, MefHome, TargetInfo, run_cli  # noqa: F401  (re-exported for tests)


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


@pytest.fixture
def mef_home(tmp_path: Path, cli: Cli) -> Iterator[MefHome]:
    home = MefHome(tmp_path, cli).build_default()
    try:
        yield home
    finally:
        home.stop()


@pytest.fixture
def mef(mef_home: MefHome) -> Iterator[MefHome]:
    mef_home.start()
    try:
        yield mef_home
    finally:
        mef_home.stop()


@pytest.fixture(scope="module")
def module_mef(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MefHome]:
    root = tmp_path_factory.mktemp("mef")
    home = MefHome(root, Cli(root)).build_default()
    home.start()
    try:
        yield home
    finally:
        home.stop()


@pytest.fixture(scope="module")
def mef_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MefHome, TargetInfo]]:
    home, target = new_mef(tmp_path_factory.mktemp("mef"))
    home.start()
    try:
        yield home, target
    finally:
        home.stop()


@pytest.fixture(scope="session")
def openssl_bin() -> str:
    path = shutil.which("openssl")
    if path is None:
        pytest.skip("the openssl command line tool is not installed")
    return path
