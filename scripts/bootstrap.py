"""Set up (or bring up to date) the project's virtual environment, then optionally run a command in it.

    python3 scripts/bootstrap.py demo          # runtime lock, then `iotvault demo`
    python3 scripts/bootstrap.py --dev         # development lock (what `make venv` runs)
    python3 scripts/bootstrap.py --venv DIR    # another environment than .venv

Standard library only: this runs with the system Python before anything is installed.

Why a script and not three pip commands in the README: the system Python's bundled pip can be
older than 23.3, and those pips resolve an *extra* of a hash-pinned package (amqtt's
``pwdlib[argon2]``) to the newest release on the index instead of the pinned one, then refuse it
as unpinned — a lock that installed on the day it was made breaks by itself when a dependency
publishes a release. So the first thing installed into a new environment, with whatever pip it
was born with, is ``requirements/bootstrap.txt``: a hash-pinned pip (and the build backend); only
that pip installs the locks. Installing a single pinned package with no extras works on every
pip that knows ``--require-hashes`` (8.0+).

The demo and ``make`` share one ``.venv`` and never step on each other: both install iotvault
itself in editable mode (so tests always see the checkout, never a stale copy), the runtime lock
is a subset of the development lock (made with it as a constraint), and a stamp per mode records
the hash of the files it was installed from, so a second run with nothing changed does no pip
work at all.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements"
MINIMUM_PYTHON = (3, 11)


def say(message: str) -> None:
    print(f"bootstrap: {message}", file=sys.stderr, flush=True)


def fail(message: str) -> None:
    say(message)
    raise SystemExit(1)


def inputs(mode: str) -> list[Path]:
    """Every file whose change means the environment must be brought up to date."""
    locks = ["bootstrap.txt", "runtime.txt"] + (["dev.txt"] if mode == "dev" else [])
    return [REQUIREMENTS / name for name in locks] + [ROOT / "pyproject.toml", Path(__file__).resolve()]


def fingerprint(mode: str) -> str:
    digest = hashlib.sha256()
    for path in inputs(mode):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def pip(python: Path, *args: str) -> None:
    command = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args]
    if subprocess.run(command, cwd=ROOT, check=False).returncode != 0:
        fail(f"pip failed: {' '.join(command[1:])}")


def fetch_assets(python: Path) -> None:
    """The web application's pinned browser libraries, when this checkout has a fetcher for them."""
    fetcher = ROOT / "scripts" / "fetch_assets.py"
    if not fetcher.exists():
        return
    if subprocess.run([str(python), str(fetcher)], cwd=ROOT, check=False).returncode != 0:
        # Offline: iotvault still runs; its pages say what is missing and how to fetch it.
        say("the web application's assets were not fetched (offline?): run `make assets` later")


def ensure(env_dir: Path, mode: str) -> Path:
    """Create or update the environment in ``env_dir`` for ``mode`` ("runtime" or "dev")."""
    python = env_dir / "bin" / "python"
    if not python.exists():
        if env_dir.exists() and any(env_dir.iterdir()) and not (env_dir / "pyvenv.cfg").exists():
            fail(f"{env_dir} exists and is not a virtual environment; move it away or pass --venv")
        say(f"creating the virtual environment {env_dir}")
        venv.EnvBuilder(with_pip=True, clear=env_dir.exists()).create(env_dir)
    stamp = env_dir / f".iotvault-{mode}"
    wanted = fingerprint(mode)
    if stamp.exists() and stamp.read_text().strip() == wanted:
        fetch_assets(python)
        return env_dir
    say("installing the pinned pip and build backend (requirements/bootstrap.txt)")
    pip(python, "--require-hashes", "-r", str(REQUIREMENTS / "bootstrap.txt"))
    lock = REQUIREMENTS / ("dev.txt" if mode == "dev" else "runtime.txt")
    say(f"installing the locked dependencies ({lock.relative_to(ROOT)})")
    pip(python, "--require-hashes", "-r", str(lock))
    say("installing iotvault from this checkout (editable)")
    pip(python, "--no-deps", "--no-build-isolation", "--editable", str(ROOT))
    fetch_assets(python)
    stamp.write_text(wanted + "\n")
    return env_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 scripts/bootstrap.py",
        description="Set up the virtual environment from the hash-checked locks, then run COMMAND in it.",
    )
    parser.add_argument("--dev", action="store_true", help="install the development lock (tests, linters)")
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv", help="the environment (default: .venv)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="an iotvault command to run, e.g. demo")
    args = parser.parse_args(argv)
    if sys.version_info < MINIMUM_PYTHON:
        wanted = ".".join(map(str, MINIMUM_PYTHON))
        fail(f"iotvault needs Python {wanted} or newer; this is {sys.version.split()[0]}")
    env_dir = ensure(args.venv.resolve(), "dev" if args.dev else "runtime")
    if args.command:
        iotvault = env_dir / "bin" / "iotvault"
        os.execv(iotvault, [str(iotvault), *args.command])  # noqa: S606 - our own console script, by path
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
