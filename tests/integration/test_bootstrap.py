"""The README's set-up works from the pip a fresh Python is born with, and the demo and ``make``
share one environment in either order.

A stock Python 3.11 bundles pip 23.2.1, which cannot install our hash locks by itself (it
resolves ``pwdlib[argon2]``, an extra of a pinned package, to the newest release on the index).
This test builds an environment exactly as a new user's machine would — the base interpreter's
``venv`` with its bundled pip, forced down to 23.2.1 where the bundled one is newer, so the old
path is always the one exercised — and runs ``scripts/bootstrap.py`` the way the README and the
Makefile do. It needs the package index (the only network CI has); pip's cache keeps it short.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
BOOTSTRAP = ROOT / "scripts" / "bootstrap.py"
OLD_PIP = "23.2.1"  # the pip bundled with Python 3.11.7: too old for extras of hash-pinned packages


def base_python() -> Path:
    """The interpreter the virtual environment running this test was made from."""
    for candidate in (Path(sys.base_prefix) / "bin" / "python3", Path(sys.base_prefix) / "bin" / "python"):
        if candidate.exists():
            return candidate
    pytest.fail(f"no base interpreter under {sys.base_prefix}")


def run(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    command = [str(a) for a in args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, check=False, env=env, cwd=ROOT
    )


def pip_version(env_dir: Path) -> str:
    done = run(env_dir / "bin" / "python", "-m", "pip", "--version")
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[1]


def pinned(name: str) -> str:
    match = re.search(rf"^{name}==(\S+)", (ROOT / "requirements" / "bootstrap.txt").read_text(), re.MULTILINE)
    assert match, f"{name} is not pinned in requirements/bootstrap.txt"
    return match.group(1)


def readme_demo_command() -> list[str]:
    """The README's first command, which must be the bootstrap script running the demo."""
    block = re.search(r"```sh\n(.+?)\n```", (ROOT / "README.md").read_text(), re.DOTALL)
    assert block, "README.md has no sh block"
    words = block.group(1).split()
    assert words[:2] == ["python3", "scripts/bootstrap.py"], block.group(1)
    assert words[-1] == "demo", block.group(1)
    return words[1:-1]


def imports_from(env_dir: Path, module: str) -> Path:
    done = run(env_dir / "bin" / "python", "-c", f"import {module}; print({module}.__file__)")
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip())


def test_old_bundled_pip_then_demo_then_make_then_demo(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    created = run(base_python(), "-m", "venv", env_dir)
    assert created.returncode == 0, created.stderr
    born = pip_version(env_dir)
    if born != OLD_PIP:
        downgraded = run(env_dir / "bin" / "python", "-m", "pip", "install", "-q", f"pip=={OLD_PIP}")
        assert downgraded.returncode == 0, downgraded.stderr
    assert pip_version(env_dir) == OLD_PIP

    # 1. The README's demo command (`demo --help` instead of the long-running demo).
    script_args = readme_demo_command()
    demo = run(base_python(), *script_args, "--venv", env_dir, "demo", "--help")
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "Usage: iotvault demo" in demo.stdout  # iotvault's own help, from the new environment
    assert pip_version(env_dir) == pinned("pip")
    assert imports_from(env_dir, "iotvault").is_relative_to(ROOT / "src")  # editable: tests see the checkout
    assert not (env_dir / "bin" / "ruff").exists()  # the runtime lock only

    # 2. `make venv` after the demo: the development lock joins the same environment.
    dev = run(base_python(), BOOTSTRAP, "--dev", "--venv", env_dir)
    assert dev.returncode == 0, dev.stderr[-3000:]
    assert (env_dir / "bin" / "ruff").exists()
    assert imports_from(env_dir, "hatchling").is_relative_to(env_dir)  # `make wheel` can build offline
    assert imports_from(env_dir, "iotvault").is_relative_to(ROOT / "src")

    # 3. The demo again after `make`: nothing is downgraded or lost, the package stays editable.
    again = run(base_python(), BOOTSTRAP, "--venv", env_dir, "version")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (env_dir / "bin" / "ruff").exists()
    assert imports_from(env_dir, "iotvault").is_relative_to(ROOT / "src")

    # 4. Nothing changed: the next run does no pip work (the stamp holds the inputs' hash).
    started = time.monotonic()
    idle = run(base_python(), BOOTSTRAP, "--dev", "--venv", env_dir)
    assert idle.returncode == 0, idle.stderr
    assert "installing" not in idle.stderr, idle.stderr
    assert time.monotonic() - started < 30


def test_refuses_to_clear_a_directory_that_is_not_an_environment(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    done = run(base_python(), BOOTSTRAP, "--venv", precious)
    assert done.returncode == 1
    assert "is not a virtual environment" in done.stderr
    assert (precious / "notes.txt").read_text() == "keep me"


def system_python() -> Path:
    """The machine's own ``python3`` where it is another Python 3.11+ than the one running the
    tests (a Debian user's is Debian's: 3.11.2 on Debian 12); else the tests' own base one."""
    ours = run(base_python(), "-c", "import sys; print(sys.version_info[:3])").stdout
    for candidate in (Path("/usr/bin/python3"), Path("/usr/local/bin/python3")):
        if candidate.exists():
            version = run(candidate, "-c", "import sys; print(sys.version_info[:3])").stdout
            if version and version != ours and version >= "(3, 11, 0)":
                return candidate
    return base_python()


def test_the_readme_demo_command_sets_up_with_the_systems_own_python(tmp_path: Path) -> None:
    """The locks hold what every Python 3.11 needs: the README's command, run by the system's
    ``python3`` with the pip it was born with, installs the runtime lock (hash-checked) and
    starts iotvault from it. Where the system has no other Python, the tests' own does it
    again in a fresh environment (the old-pip test above forces pip 23.2.1 first; this one not)."""
    python = system_python()
    env_dir = tmp_path / "venv"
    demo = run(python, *readme_demo_command(), "--venv", env_dir, "demo", "--help")
    assert demo.returncode == 0, f"{python}: {demo.stderr[-3000:]}"
    assert "Usage: iotvault demo" in demo.stdout
    assert imports_from(env_dir, "iotvault").is_relative_to(ROOT / "src")
    made_by = run(env_dir / "bin" / "python", "-c", "import sys; print(sys._base_executable)").stdout
    assert Path(made_by.strip()).resolve() == python.resolve()
