"""The import rules of ``make check`` (``lint-imports``, contracts in ``pyproject.toml``) hold,
and break on an upward import: a copy of the package with one deliberate upward import fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(src: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` with the project's contracts over the package found in ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(ROOT / "pyproject.toml")],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_package_keeps_every_import_contract() -> None:
    result = lint_imports(ROOT / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "upward", "contract"),
    [
        ("domain/ids.py", "import iotvault.api.app", "every import arrow points down"),
        ("crypto/keyring.py", "import iotvault.storage.repository", "know no storage"),
        ("storage/db.py", "import iotvault.api.problems", "storage imports no API"),
        ("ingest/dedupe.py", "import iotvault.node", "nothing imports the command line or the node"),
    ],
)
def test_a_deliberate_upward_import_breaks_a_contract(
    tmp_path: Path, module: str, upward: str, contract: str
) -> None:
    shutil.copytree(
        ROOT / "src" / "iotvault", tmp_path / "iotvault", ignore=shutil.ignore_patterns("__pycache__")
    )
    target = tmp_path / "iotvault" / module
    target.write_text(target.read_text() + f"\n{upward}  # deliberate upward import\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    broken = [line for line in result.stdout.splitlines() if line.endswith("BROKEN")]
    assert any(contract in line for line in broken), result.stdout
