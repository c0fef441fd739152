"""A device list to import (``iotvault devices import``): CSV or JSON, checked whole. Pure.

Accepted shapes, so that an export from Watson IoT Platform loads as it is:

* JSON: a list of objects, or an object whose ``results`` is that list (the shape of Watson's
  ``GET /api/v0002/bulk/devices``). Each object names ``typeId`` and ``deviceId``; ``metadata``
  (an object of plain values) is kept; other fields (``clientId``, ``deviceInfo``,
  ``registration``, ``authToken``, …) are ignored.
* CSV: a header row that names ``typeId`` and ``deviceId`` columns (any case, any order, other
  columns ignored); or, without a header, rows whose first two columns are type and device
  id (the order of Watson's bulk-add CSV).

Nothing is imported unless the whole file is good: every bad row is reported with its line
(CSV) or entry number (JSON), up to :data:`MAX_REPORTED`. A token in the file is never used:
every device gets a new credential (see docs/watson-migration.md).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from typing import Any, Final

from iotvault.domain.ids import check_identifier
from iotvault.errors import ValidationError

MAX_IMPORT_BYTES: Final = 32 * 1024 * 1024
MAX_IMPORT_ROWS: Final = 100_000
MAX_FIELD_CHARS: Final = 4096
MAX_METADATA_KEYS: Final = 64
MAX_REPORTED: Final = 20
_TYPE_NAMES: Final = frozenset({"typeid", "type", "devicetype"})
_ID_NAMES: Final = frozenset({"deviceid", "id"})
_FORMULA_START: Final = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True, slots=True)
class ImportRow:
    line: int  # CSV: the line in the file; JSON: the entry's number (1-based)
    type_id: str
    device_id: str
    metadata: dict[str, Any] = field(default_factory=dict)


class ImportFileError(ValidationError):
    """The file cannot be imported: ``problems`` lists (line or entry, what is wrong)."""

    def __init__(self, problems: list[tuple[int, str]], *, unit: str = "line") -> None:
        self.problems = problems
        self.unit = unit
        shown = "; ".join(f"{unit} {n}: {what}" if n else what for n, what in problems[:MAX_REPORTED])
        more = len(problems) - MAX_REPORTED
        super().__init__("file", shown + (f"; and {more} more" if more > 0 else ""))


def parse_device_list(data: bytes, *, fmt: str | None = None) -> list[ImportRow]:
    """The rows of a device list; :class:`ImportFileError` naming every bad one."""
    if len(data) > MAX_IMPORT_BYTES:
        raise ImportFileError([(0, f"larger than {MAX_IMPORT_BYTES // (1024 * 1024)} MiB")])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ImportFileError([(0, f"not UTF-8 text (byte {exc.start})")]) from None
    kind = fmt or ("json" if text.lstrip()[:1] in ("[", "{") else "csv")
    rows, problems = _json_rows(text) if kind == "json" else _csv_rows(text)
    problems += _duplicates(rows)
    if problems:
        raise ImportFileError(sorted(problems), unit="entry" if kind == "json" else "line")
    return rows


def _row(
    line: int, type_id: Any, device_id: Any, metadata: Any, problems: list[tuple[int, str]]
) -> ImportRow | None:
    before = len(problems)
    for name, value in (("typeId", type_id), ("deviceId", device_id)):
        if not isinstance(value, str) or not value:
            problems.append((line, f"{name} missing"))
            continue
        try:
            check_identifier(name, value)
        except ValidationError as exc:
            problems.append((line, f"{name} {_shown(value)} {exc.reason}"))
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or len(metadata) > MAX_METADATA_KEYS:
        problems.append((line, f"metadata must be an object of at most {MAX_METADATA_KEYS} plain values"))
    elif not all(isinstance(v, str | int | float | bool | type(None)) for v in metadata.values()):
        problems.append((line, "metadata values must be strings, numbers, booleans or null"))
    if len(problems) > before:
        return None
    return ImportRow(line, type_id, device_id, dict(metadata))


def _shown(value: str) -> str:
    """A bad value in an error message: quoted, short, control characters escaped."""
    return json.dumps(value[:40] + ("…" if len(value) > 40 else ""))


def _json_rows(text: str) -> tuple[list[ImportRow], list[tuple[int, str]]]:
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ImportFileError([(0, f"not valid JSON ({str(exc)[:80]})")]) from None
    if isinstance(doc, dict) and isinstance(doc.get("results"), list):
        doc = doc["results"]  # Watson's bulk device listing
    if not isinstance(doc, list):
        raise ImportFileError([(0, "expected a list of devices, or an object with 'results'")])
    if len(doc) > MAX_IMPORT_ROWS:
        raise ImportFileError([(0, f"more than {MAX_IMPORT_ROWS} devices")])
    problems: list[tuple[int, str]] = []
    rows = []
    for n, entry in enumerate(doc, start=1):
        if not isinstance(entry, dict):
            problems.append((n, "not an object"))
            continue
        row = _row(n, entry.get("typeId"), entry.get("deviceId"), entry.get("metadata"), problems)
        if row is not None:
            rows.append(row)
    return rows, problems


def _csv_rows(text: str) -> tuple[list[ImportRow], list[tuple[int, str]]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    problems: list[tuple[int, str]] = []
    rows: list[ImportRow] = []
    columns: tuple[int, int] | None = None
    first = True
    try:
        for record in reader:
            line = reader.line_num
            if len(rows) + len(problems) >= MAX_IMPORT_ROWS:
                raise ImportFileError([(line, f"more than {MAX_IMPORT_ROWS} devices")])
            if not record or all(not c.strip() for c in record):
                continue
            if any(len(c) > MAX_FIELD_CHARS for c in record):
                problems.append((line, f"a field longer than {MAX_FIELD_CHARS} characters"))
                continue
            cells = [c.strip() for c in record]
            if first:
                first = False
                names = [c.lower() for c in cells]
                type_col = next((i for i, c in enumerate(names) if c in _TYPE_NAMES), None)
                id_col = next((i for i, c in enumerate(names) if c in _ID_NAMES), None)
                if type_col is not None and id_col is not None:
                    columns = (type_col, id_col)
                    continue  # a header row
                if type_col is not None or id_col is not None:
                    raise ImportFileError([(line, "the header must name both typeId and deviceId")])
                columns = (0, 1)  # no header: type, id (Watson's bulk-add order)
            assert columns is not None  # noqa: S101 - set on the first row
            if len(cells) <= max(columns):
                problems.append((line, "expected a type and a device id"))
                continue
            row = _row(line, cells[columns[0]], cells[columns[1]], None, problems)
            if row is not None:
                rows.append(row)
    except csv.Error as exc:
        problems.append((reader.line_num, f"not valid CSV ({exc})"))
    return rows, problems


def _duplicates(rows: list[ImportRow]) -> list[tuple[int, str]]:
    first: dict[str, int] = {}
    problems = []
    for row in rows:
        if row.device_id in first:
            earlier = first[row.device_id]
            problems.append((row.line, f"deviceId {row.device_id} is listed twice (first at {earlier})"))
        else:
            first[row.device_id] = row.line
    return problems


def spreadsheet_safe(value: str) -> str:
    """``value`` for a CSV cell a spreadsheet will not run as a formula (OWASP CSV injection).

    A value that starts with ``= + - @``, a tab or a carriage return gets a leading ``'``.
    """
    return "'" + value if value.startswith(_FORMULA_START) else value
