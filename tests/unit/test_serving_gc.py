"""`iotvault serve` tunes the garbage collector of its own process, and only of that one."""

from __future__ import annotations

import subprocess
import sys

from iotvault.node import GC_THRESHOLD


def test_serving_process_gets_the_thresholds_and_a_frozen_start_up_heap() -> None:
    code = (
        "import gc; from iotvault.node import tune_gc_for_serving; tune_gc_for_serving(); "
        "print(gc.get_threshold(), gc.get_freeze_count() > 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == [*f"{GC_THRESHOLD}".split(), "True"]
    assert GC_THRESHOLD[0] > 700  # larger than Python's default first generation


def test_importing_the_node_changes_nothing() -> None:
    # the tuning is a call that `serve` makes once it is up, never an import side effect
    code = "import gc; before = gc.get_threshold(); import iotvault.node; print(gc.get_threshold() == before)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"
