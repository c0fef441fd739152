"""Log lines cannot be forged by what a client sends, in text or JSON lines."""

from __future__ import annotations

import json
import logging
import sys

from iotvault.logformat import JsonFormatter, TextFormatter, formatter

FORGED = "mallory\r\n2026-12-05 10:00:00,000 INFO iotvault.identity: login succeeded user=root\x1b[2K"


def record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    info = None
    if exc:
        try:
            int("bad\nvalue")
        except ValueError:
            info = sys.exc_info()
    return logging.LogRecord("iotvault.test", logging.WARNING, __file__, 1, msg, args, info)


def test_text_lines_escape_control_characters_of_arguments() -> None:
    line = TextFormatter().format(record("refused login for %s", FORGED))
    assert "\n" not in line
    assert "\r" not in line
    assert "\x1b" not in line
    assert "mallory\\x0d\\x0a2026-12-05" in line
    level, rest = line.split(" ", 3)[2:4]
    assert level == "WARNING"
    assert rest.startswith("iotvault.test: refused login for mallory\\x0d\\x0a2026")
    assert rest.endswith("user=root\\x1b[2K")


def test_json_lines_are_one_object_each_with_the_exact_message() -> None:
    text = JsonFormatter().format(record("refused login for %s", FORGED, exc=True))
    assert "\n" not in text
    doc = json.loads(text)
    assert doc["message"] == "refused login for " + FORGED  # kept exact, escaped by JSON
    assert doc["level"] == "WARNING"
    assert doc["logger"] == "iotvault.test"
    assert doc["time"].endswith("+00:00")
    assert "ValueError: invalid literal for int() with base 10: 'bad\\nvalue'" in doc["exception"]


def test_the_setting_picks_the_formatter() -> None:
    assert isinstance(formatter("json"), JsonFormatter)
    assert isinstance(formatter("text"), TextFormatter)
