"""`iotvault serve` tunes the garbage collector and the interpreter lock's switch interval of its
own process, and only of that one."""

from __future__ import annotations

import subprocess
import sys

import pytest

from iotvault.config import load_settings
from iotvault.errors import ConfigError
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


def test_serving_process_gets_the_switch_interval_of_its_settings_and_importing_changes_nothing() -> None:
    code = (
        "import sys; before = sys.getswitchinterval(); import iotvault.node as n; "
        "same = sys.getswitchinterval() == before; n.set_switch_interval(1.0); "
        "print(same, sys.getswitchinterval())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    same, interval = out.split()
    assert same == "True"
    assert abs(float(interval) - 0.001) < 1e-9


@pytest.mark.parametrize("value", ["0", "0.05", "101", "-1", "fast"])
def test_a_switch_interval_out_of_range_is_refused_by_name(value: str) -> None:
    with pytest.raises(ConfigError, match="IOTVAULT_SWITCH_INTERVAL_MS"):
        load_settings(environ={"IOTVAULT_SWITCH_INTERVAL_MS": value})


def test_the_default_switch_interval_is_one_millisecond() -> None:
    assert load_settings(environ={}).switch_interval_ms == 1.0


@pytest.mark.parametrize("value", ["-1", "60001", "nan", "inf", "soon"])
def test_a_page_trust_out_of_range_is_refused_by_name(value: str) -> None:
    with pytest.raises(ConfigError, match="IOTVAULT_PAGE_TRUST_MS"):
        load_settings(environ={"IOTVAULT_PAGE_TRUST_MS": value})


def test_a_page_trust_of_zero_asks_on_every_read_and_the_default_is_one_second() -> None:
    assert load_settings(environ={"IOTVAULT_PAGE_TRUST_MS": "0"}).page_trust_ms == 0.0
    assert load_settings(environ={}).page_trust_ms == 1000.0
