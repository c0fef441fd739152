"""The unmodified Watson IoT Platform SDK (``wiotp-sdk`` 1.0.1) in a virtual environment of its own.

It needs ``paho-mqtt<2``, which the development lock cannot hold, so it is installed from its
own hash lock (``requirements/wiotp.txt``, made by ``make lock``) into
``.cache/wiotp-<hash of the lock>/`` — made once, reused while the lock is unchanged — with the
pip that ``requirements/bootstrap.txt`` pins. Without PyPI that is :func:`helpers.unavailable`
(a failure under ``CI=true``).

:func:`run_sdk` runs ``wiotp_script.py`` in that environment as a subprocess, with the name
``<org>.messaging.<domain>`` resolving to the broker's address for that process only: as root,
``unshare -m`` and a bind mount of a copy of ``/etc/hosts`` with one more line (the SDK accepts
no host, only an organization and a domain, and only ports 1883 and 8883).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from helpers import unavailable

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "wiotp.txt"
BOOTSTRAP = ROOT / "requirements" / "bootstrap.txt"
SCRIPT = Path(__file__).resolve().parent / "wiotp_script.py"
_INSTALL_TIMEOUT_S = 600


def sdk_python() -> Path:
    """The Python of the SDK's environment, made first if needed."""
    digest = hashlib.sha256(LOCK.read_bytes()).hexdigest()[:16]
    venv = ROOT / ".cache" / f"wiotp-{digest}"
    python = venv / "bin" / "python"
    done = venv / ".complete"
    venv.parent.mkdir(exist_ok=True)
    with (venv.parent / f"wiotp-{digest}.lock").open("w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # one maker at a time; the others wait and reuse it
        if done.exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        pip = re.search(r"^pip==(\S+)", BOOTSTRAP.read_text(), re.MULTILINE)
        assert pip is not None, "requirements/bootstrap.txt pins no pip"
        steps = [
            [str(python), "-m", "pip", "install", "-q", f"pip=={pip[1]}"],
            [str(python), "-m", "pip", "install", "-q", "--require-hashes", "--no-deps", "-r", str(LOCK)],
        ]
        for step in steps:
            result = subprocess.run(
                step, check=False, capture_output=True, text=True, timeout=_INSTALL_TIMEOUT_S
            )
            if result.returncode != 0:
                shutil.rmtree(venv, ignore_errors=True)
                unavailable(
                    f"could not install wiotp-sdk from requirements/wiotp.txt: {result.stderr[-600:]}"
                )
        done.touch()
    return python


def sdk_command(role: str, config: dict[str, Any], *, address: str, name: str) -> list[str]:
    """The command that runs ``wiotp_script.py <role>`` with ``name`` resolving to ``address``.

    The script prints JSON lines on stdout and ends by itself (``config["timeout_s"]``).
    """
    python = sdk_python()
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        unavailable("resolving the SDK's broker name needs root and unshare (util-linux)")
    probe = subprocess.run(["unshare", "-m", "true"], check=False, capture_output=True, text=True, timeout=10)
    if probe.returncode != 0:
        unavailable(f"unshare -m is not permitted here: {probe.stderr.strip()[:200]}")
    hosts = Path(config["workdir"]) / "hosts"
    hosts.write_text(Path("/etc/hosts").read_text() + f"\n{address} {name}\n")
    inner = 'mount --bind "$1" /etc/hosts && exec "$2" "$3" "$4" "$5"'
    return [
        "unshare",
        "-m",
        "sh",
        "-c",
        inner,
        "sh",
        str(hosts),
        str(python),
        str(SCRIPT),
        role,
        json.dumps(config),
    ]
