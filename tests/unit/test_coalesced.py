"""Asks answered together (iotvault.storage.db.Coalesced): every ask is answered by a turn that
began after it, a caller who leaves takes no one's answer, a failure reaches its turn only."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest

from iotvault.storage.db import Coalesced


class Answers:
    """Answers ``key * 10 + turn`` after a gate opens: the turn that answered is in the answer."""

    def __init__(self) -> None:
        self.turns: list[list[int]] = []
        self.gate = asyncio.Event()
        self.fail: Exception | None = None

    async def __call__(self, keys: list[int]) -> Mapping[int, int]:
        self.turns.append(keys)
        await self.gate.wait()
        if self.fail is not None:
            exc, self.fail = self.fail, None
            raise exc
        return {k: k * 10 + len(self.turns) for k in keys}


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_asks_made_during_a_turn_wait_for_the_next_one_which_takes_them_all() -> None:
    answers = Answers()
    asks = Coalesced(answers)
    first = asyncio.create_task(asks.ask(1))
    await _settle()
    assert answers.turns == [[1]]
    later = [asyncio.create_task(asks.ask(k)) for k in (2, 3, 2, 1)]  # the first turn is under way
    await _settle()
    answers.gate.set()
    assert await first == 11
    assert await asyncio.gather(*later) == [22, 32, 22, 12]  # the second turn, never the first's answer
    assert answers.turns == [[1], [2, 3, 1]]  # one key asked twice is asked once
    assert asks.turns == 2


async def test_a_turn_takes_at_most_most_keys() -> None:
    answers = Answers()
    answers.gate.set()
    asks = Coalesced(answers, most=2)
    assert await asyncio.gather(*(asks.ask(k) for k in range(5))) == [1, 11, 22, 32, 43]
    assert answers.turns == [[0, 1], [2, 3], [4]]


async def test_a_caller_who_leaves_takes_no_one_elses_answer() -> None:
    answers = Answers()
    asks = Coalesced(answers)
    leaving = asyncio.create_task(asks.ask(1))
    staying = asyncio.create_task(asks.ask(1))
    await _settle()
    leaving.cancel()
    await _settle()
    answers.gate.set()
    assert await staying == 11
    with pytest.raises(asyncio.CancelledError):
        await leaving


async def test_a_failure_reaches_the_callers_of_its_turn_and_the_next_turn_answers() -> None:
    answers = Answers()
    asks = Coalesced(answers)
    answers.fail = RuntimeError("database gone")
    failing = [asyncio.create_task(asks.ask(k)) for k in (1, 2)]
    await _settle()
    waiting = asyncio.create_task(asks.ask(3))  # asked during the failing turn
    await _settle()
    answers.gate.set()
    for task in failing:
        with pytest.raises(RuntimeError, match="database gone"):
            await task
    assert await waiting == 32
    assert await asks.ask(4) == 43  # and later asks start a turn of their own


def test_each_event_loop_gets_turns_of_its_own() -> None:
    answers: list[list[int]] = []

    async def answer(keys: list[int]) -> Mapping[int, int]:
        answers.append(keys)
        return {k: -k for k in keys}

    asks = Coalesced(answer)
    assert asyncio.run(asks.ask(1)) == -1
    assert asyncio.run(asks.ask(2)) == -2  # a new loop: the old loop's runner is not waited for
    assert answers == [[1], [2]]
