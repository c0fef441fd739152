"""The wheel built from this checkout holds the whole package and nothing else, and runs alone.

Installing it into a fresh virtual environment and running ``iotvault`` from there is what a
user of ``pip install iotvault-*.whl`` gets: the source tree is out of that process's reach, so
a module, migration or data file missing from the wheel fails here.

The test needs no network. The wheel is built with the build backend pinned in
``requirements/dev.txt`` (``--no-build-isolation``), and iotvault's dependencies are not
downloaded again: a ``.pth`` file in the fresh environment appends this test's own
site-packages, which ``make venv`` installed from the locks, *after* the fresh environment's
own, so ``iotvault`` itself can only come from the wheel (a ``.pth`` file in an appended folder,
such as the editable install's, is not read).
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import sysconfig
import time
import tomllib
import zipfile
from pathlib import Path

import pytest
from helpers import server_env, wait_port

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "iotvault"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DIST_INFO = f"iotvault-{PROJECT['version']}.dist-info"


def run(
    *args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=120, check=False, env=env, cwd=cwd
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("hatchling") is None:
        pytest.fail("the build backend (hatchling) is missing: `make venv` installs it from the dev lock")
    out = tmp_path_factory.mktemp("dist")
    built = run(
        sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
        "--wheel-dir", out, ROOT,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (whl,) = out.glob("iotvault-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the wheel installed and the locked dependencies beside it."""
    root = tmp_path_factory.mktemp("wheel-venv")
    created = run(sys.executable, "-m", "venv", "--without-pip", root)
    assert created.returncode == 0, created.stderr
    python = root / "bin" / "python"
    pip = (sys.executable, "-m", "pip", "--python", python)
    installed = run(*pip, "install", "--quiet", "--no-deps", "--no-index", wheel)
    assert installed.returncode == 0, installed.stderr
    fresh_site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (Path(fresh_site) / "_locked_dependencies.pth").write_text("".join(f"{p}\n" for p in ours))
    return root


def test_wheel_holds_the_package_its_data_and_nothing_else(wheel: Path) -> None:
    assert wheel.name == f"iotvault-{PROJECT['version']}-py3-none-any.whl"
    names = set(zipfile.ZipFile(wheel).namelist())
    source_files = {
        f"iotvault/{p.relative_to(PACKAGE).as_posix()}"
        for p in PACKAGE.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    # Every module and data file: migrations and their template, py.typed, and the web UI's
    # templates and static files once there are any.
    assert source_files - names == set()
    assert {
        "iotvault/py.typed",
        "iotvault/__main__.py",
        "iotvault/storage/migrations/env.py",
        "iotvault/storage/migrations/script.py.mako",
        "iotvault/storage/migrations/versions/0001_initial.py",
        "iotvault/web/templates/base.html",
        "iotvault/web/static/app.js",
        # the pinned third-party assets: gitignored, fetched by `make assets`, shipped in the wheel
        "iotvault/web/static/vendor/uplot/uPlot.iife.min.js",
        "iotvault/web/static/vendor/swagger-ui/swagger-ui-bundle.js",
    } <= names
    outside = {n for n in names if not n.startswith(("iotvault/", f"{DIST_INFO}/"))}
    assert outside == set()
    junk = {n for n in names if "__pycache__" in n or n.endswith(".pyc") or ".venv" in n or "/tests/" in n}
    assert junk == set()


def test_wheel_metadata_declares_the_script_and_extras(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        entry_points = zf.read(f"{DIST_INFO}/entry_points.txt").decode()
        metadata = zf.read(f"{DIST_INFO}/METADATA").decode()
    assert "iotvault = iotvault.cli.main:run" in entry_points
    for extra in ("postgres", "redis"):
        assert f"Provides-Extra: {extra}\n" in metadata
    assert "Requires-Python: >=3.11" in metadata


def test_installed_wheel_runs_without_the_source_tree(venv: Path, tmp_path: Path) -> None:
    python, iotvault = venv / "bin" / "python", venv / "bin" / "iotvault"
    env = server_env(tmp_path)
    env.pop("PYTHONPATH", None)
    code = "import iotvault, sys; print(iotvault.__file__); print(sys.path)"
    where = run(python, "-c", code, env=env, cwd=tmp_path)
    module_file, path = where.stdout.splitlines()
    assert Path(module_file).is_relative_to(venv), module_file
    assert str(ROOT / "src") not in path
    # The wheel's requirements are met by the locked versions.
    check = run(sys.executable, "-m", "pip", "--python", python, "check", env=env)
    assert check.returncode == 0, check.stdout + check.stderr

    helped = run(iotvault, "--help", env=env, cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "Usage" in helped.stdout
    upgraded = run(iotvault, "db", "upgrade", env=env, cwd=tmp_path)
    assert upgraded.returncode == 0, upgraded.stderr
    assert (tmp_path / "data" / "iotvault.db").is_file()


def test_installed_wheel_runs_the_demo(venv: Path, tmp_path: Path) -> None:
    iotvault = venv / "bin" / "iotvault"
    env = server_env(tmp_path)
    env.pop("PYTHONPATH", None)
    with (tmp_path / "demo.log").open("wb") as log:
        proc = subprocess.Popen(
            [iotvault, "demo", "--rate", "20"], env=env, cwd=tmp_path, stdout=log, stderr=log
        )
    try:
        wait_port(int(env["IOTVAULT_HTTP_PORT"]), timeout=30)
        deadline = time.monotonic() + 30
        events: list[dict[str, object]] = []
        while time.monotonic() < deadline and len(events) < 3:
            tail = run(iotvault, "events", "tail", "demo-thermo-1", "--count", "3", "--json", env=env)
            if tail.returncode == 0:
                events = [json.loads(line) for line in tail.stdout.splitlines() if line.strip()]
            time.sleep(0.5)
        assert len(events) == 3, (tmp_path / "demo.log").read_text()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "Traceback" not in (tmp_path / "demo.log").read_text()
