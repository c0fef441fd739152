"""Multi-row INSERTs on SQLite (iotvault.storage.db.insert_rows): every row once, in order,
in a few statements (one step each) instead of one step a row."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest

from iotvault.storage.db import SQLITE_ROWS_PER_INSERT, insert_rows


class Counting:
    def __init__(self, cur: sqlite3.Cursor) -> None:
        self.cur = cur
        self.statements = 0

    def execute(self, sql: str, params: Any) -> Any:
        self.statements += 1
        return self.cur.execute(sql, params)


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 63, 64, 65, 465, 1000])
def test_every_row_once_in_order_in_few_statements(n: int) -> None:
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (i INTEGER, s TEXT, b BLOB, n INTEGER)")
    rows = [(i, f"s{i}", bytes([i % 256]) * 3, None) for i in range(n)]
    cur = Counting(db.cursor())
    insert_rows(cur, "INSERT INTO t (i, s, b, n)", rows)
    assert db.execute("SELECT i, s, b, n FROM t ORDER BY rowid").fetchall() == rows
    biggest = SQLITE_ROWS_PER_INSERT[0]
    assert cur.statements <= n // biggest + 3 * (len(SQLITE_ROWS_PER_INSERT) - 1)
    if n >= biggest:
        assert cur.statements < n / 10


def test_a_row_the_database_refuses_fails_its_statement() -> None:
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (i INTEGER PRIMARY KEY)")
    with pytest.raises(sqlite3.IntegrityError):
        insert_rows(db.cursor(), "INSERT INTO t (i)", [(1,), (2,), (1,)])
