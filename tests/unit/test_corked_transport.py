"""The corked transport under uvicorn's protocols: one send per turn of the loop, nothing lost."""

from __future__ import annotations

import asyncio
from typing import Any

from iotvault.api.slowclients import CorkedTransport


class Recorded:
    """What reaches the socket: each write, and the state a transport has."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False
        self.aborted = False
        self.extra = {"peername": ("127.0.0.1", 5000)}

    def write(self, data: bytes) -> None:
        assert not self.closing, "written after close"
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)


async def _turn() -> None:
    await asyncio.sleep(0)


async def test_writes_of_one_turn_leave_in_one_send_at_the_next() -> None:
    raw = Recorded()
    t = CorkedTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    t.write(b"{}")
    assert raw.writes == []
    assert t.get_write_buffer_size() == 40
    await _turn()
    assert raw.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    t.write(b"data: 1\n\n")  # a live stream's later frame: its own send, one turn later
    await _turn()
    assert raw.writes[1:] == [b"data: 1\n\n"]
    assert t.get_write_buffer_size() == 0
    # everything else is the transport's
    assert t.get_extra_info("peername") == ("127.0.0.1", 5000)
    assert not t.is_closing()


async def test_close_sends_what_is_held_first_and_abort_drops_it() -> None:
    raw = Recorded()
    t = CorkedTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    t.write(b"last answer")
    t.close()  # Connection: close after an answer
    assert raw.writes == [b"last answer"]
    assert t.is_closing()
    await _turn()  # the flush scheduled by the write finds nothing more to send
    assert raw.writes == [b"last answer"]

    raw2 = Recorded()
    t2 = CorkedTransport(raw2, asyncio.get_running_loop())  # type: ignore[arg-type]
    t2.write(b"never")
    t2.abort()
    await _turn()
    assert raw2.writes == []
    assert raw2.aborted


async def test_what_is_held_when_the_peer_went_away_is_dropped() -> None:
    raw = Recorded()
    t = CorkedTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    t.write(b"answer")
    raw.closing = True  # connection lost before the next turn
    await _turn()
    assert raw.writes == []
