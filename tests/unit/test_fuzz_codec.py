"""A short run of the packet decoder's fuzz target (``make fuzz`` runs it for ten minutes)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from helpers import unavailable

TARGET = Path(__file__).parents[1] / "fuzz" / "fuzz_codec.py"


def test_the_decoder_survives_a_short_fuzzing_run(tmp_path: Path) -> None:
    if importlib.util.find_spec("atheris") is None:
        unavailable("atheris is not installed (it is in the dev lock: make venv)")
    done = subprocess.run(
        [sys.executable, str(TARGET), "-runs=300000", "-seed=1", f"-artifact_prefix={tmp_path}/"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Done 300000 runs" in done.stderr
    assert list(tmp_path.iterdir()) == []  # no crash artifact
