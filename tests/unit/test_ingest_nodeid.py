"""An ingest node's identity: kept across restarts, settable for a replacement, validated."""

from __future__ import annotations

from pathlib import Path

import pytest

from iotvault.config import Settings
from iotvault.errors import ConfigError
from iotvault.ingest.nodeid import FILE_NAME, ingest_client_id, node_id


def test_without_a_share_group_the_client_id_is_unchanged(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path, ingest_client_id="iotvault-ingest")
    assert ingest_client_id(s) == "iotvault-ingest"
    assert not (tmp_path / FILE_NAME).exists()  # nothing generated for a single node


def test_a_generated_id_is_kept_in_the_data_dir_and_reused(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path / "data", ingest_share_group="ingest")
    first = ingest_client_id(s)
    assert first.startswith("iotvault-ingest-")
    assert ingest_client_id(s) == first  # a restart resumes the same session
    kept = (tmp_path / "data" / FILE_NAME).read_text().strip()
    assert first == f"iotvault-ingest-{kept}"
    assert (tmp_path / "data" / FILE_NAME).stat().st_mode & 0o077 == 0
    other = Settings(data_dir=tmp_path / "other", ingest_share_group="ingest")
    assert ingest_client_id(other) != first  # two data dirs, two members


def test_a_replacement_takes_a_dead_nodes_identity(tmp_path: Path) -> None:
    dead = Settings(data_dir=tmp_path / "dead", ingest_share_group="ingest")
    identity = node_id(dead)
    replacement = Settings(data_dir=tmp_path / "new", ingest_share_group="ingest", ingest_node_id=identity)
    assert ingest_client_id(replacement) == ingest_client_id(dead)


def test_a_damaged_id_file_stops_the_start_with_its_name(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_text("not/valid id\n")
    with pytest.raises(ConfigError) as err:
        node_id(Settings(data_dir=tmp_path, ingest_share_group="ingest"))
    assert FILE_NAME in str(err.value)


@pytest.mark.parametrize("field", ["ingest_share_group", "ingest_node_id"])
@pytest.mark.parametrize("value", ["a/b", "#", "+", "x" * 65, "space d"])
def test_names_that_would_change_a_topic_filter_or_client_id_are_refused(field: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        Settings(**{field: value})  # type: ignore[arg-type]
    assert err.value.setting == field
