"""Reading a device list to import: the shapes a Watson IoT export comes in, and bad files."""

from __future__ import annotations

import json

import pytest

from iotvault.domain.device_import import (
    MAX_IMPORT_BYTES,
    MAX_IMPORT_ROWS,
    ImportFileError,
    ImportRow,
    parse_device_list,
    spreadsheet_safe,
)


def _ids(rows: list[ImportRow]) -> list[tuple[int, str, str]]:
    return [(r.line, r.type_id, r.device_id) for r in rows]


def test_csv_with_a_header_in_any_order_and_extra_columns() -> None:
    data = b"\xef\xbb\xbfdeviceId,authToken,TypeId\r\npi-1,t0k3n,rpi\r\n\r\npi-2,,rpi\r\n"
    assert _ids(parse_device_list(data)) == [(2, "rpi", "pi-1"), (4, "rpi", "pi-2")]


def test_csv_without_a_header_is_type_then_id_as_in_watsons_bulk_add() -> None:
    assert _ids(parse_device_list(b"rpi,pi-1,token\ncam,cam-1\n")) == [
        (1, "rpi", "pi-1"),
        (2, "cam", "cam-1"),
    ]


def test_json_list_and_watsons_bulk_listing() -> None:
    watson = {
        "results": [
            {
                "typeId": "rpi",
                "deviceId": "pi-1",
                "clientId": "d:abc123:rpi:pi-1",
                "deviceInfo": {"model": "3"},
            },
            {"typeId": "rpi", "deviceId": "pi-2", "metadata": {"room": "hall", "floor": 2}},
        ],
        "meta": {"total_rows": 2},
    }
    rows = parse_device_list(json.dumps(watson).encode())
    assert _ids(rows) == [(1, "rpi", "pi-1"), (2, "rpi", "pi-2")]
    assert rows[1].metadata == {"room": "hall", "floor": 2}
    assert _ids(parse_device_list(b'[{"typeId": "a", "deviceId": "b"}]')) == [(1, "a", "b")]


def test_every_bad_row_is_reported_with_its_line_and_nothing_is_returned() -> None:
    data = "\n".join(
        [
            "typeId,deviceId",
            "rpi,pi-1",
            "rpi,bad id",  # 3: a space
            "rpi,",  # 4: missing
            "rpi,pi-1",  # 5: twice
            "r/x,pi-9",  # 6: a slash would be a topic level
            "rpi," + "x" * 65,  # 7: too long
            "rpi,=cmd|' /C calc'!A0",  # 8: a formula
            "rpi",  # 9: one column
        ]
    ).encode()
    with pytest.raises(ImportFileError) as caught:
        parse_device_list(data)
    assert [n for n, _ in caught.value.problems] == [3, 4, 5, 6, 7, 8, 9]
    assert "line 3" in str(caught.value)
    assert "first at 2" in dict(caught.value.problems)[5]


def test_bad_json_entries_are_reported_by_number() -> None:
    data = json.dumps(
        [
            {"typeId": "rpi", "deviceId": "ok"},
            "x",
            {"typeId": "rpi"},
            {"typeId": "r", "deviceId": "d", "metadata": {"a": {"b": 1}}},
        ]
    )
    with pytest.raises(ImportFileError) as caught:
        parse_device_list(data.encode())
    assert [n for n, _ in caught.value.problems] == [2, 3, 4]
    assert caught.value.unit == "entry"


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xfe not utf-8",
        b"{not json",
        b'{"devices": []}',
        b"[" * 100_000,  # deeply nested: refused, not a crash
        b'typeId,deviceId\nrpi,"unterminated\n',
        b"typeId,deviceId\nrpi," + b"x" * 200_000 + b"\n",  # a field past the CSV limit
        b"typeId,other\nrpi,x\n",  # a header that names only one of the two
    ],
)
def test_malformed_files_are_refused_with_a_reason(data: bytes) -> None:
    with pytest.raises(ImportFileError) as caught:
        parse_device_list(data)
    assert caught.value.problems
    assert str(caught.value)


def test_huge_files_and_too_many_rows_are_refused() -> None:
    with pytest.raises(ImportFileError, match="MiB"):
        parse_device_list(b"x" * (MAX_IMPORT_BYTES + 1))
    many = b"".join(b"rpi,d-%d\n" % i for i in range(MAX_IMPORT_ROWS + 1))
    with pytest.raises(ImportFileError, match="more than"):
        parse_device_list(many)
    with pytest.raises(ImportFileError, match="more than"):
        parse_device_list(
            json.dumps([{"typeId": "t", "deviceId": f"d{i}"} for i in range(MAX_IMPORT_ROWS + 1)]).encode()
        )


def test_a_csv_cell_that_a_spreadsheet_would_run_is_made_harmless() -> None:
    for value in ("=1+1", "+1", "-cam", "@SUM(A1)", "\tx", "\rx"):
        assert spreadsheet_safe(value) == "'" + value
    assert spreadsheet_safe("pi-1") == "pi-1"
