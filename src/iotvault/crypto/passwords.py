"""Passwords that people choose: argon2id, and the same cost whether or not the user exists.

Parameters: argon2id, memory 64 MiB (``m=65536`` KiB), 2 passes (``t=2``), 1 lane (``p=1``),
16-byte salt, 32-byte tag. OWASP's Password Storage Cheat Sheet asks for at least
``m=19 MiB, t=2, p=1``; this is more than three times its memory at the same number of passes,
and memory is what makes each guess expensive on GPUs and ASICs. One lane because a server
checks many logins at once: more lanes only shorten one check's wall time by occupying more
cores, and do not make a guess any dearer. A check costs a noticeable fraction of a second of
one core (BENCHMARKS.md has the figure), which a login can afford and a guessing attacker
cannot; argon2-cffi releases the GIL while hashing, so callers on an event loop should run it
in a worker thread.

Hashes are stored in the PHC string form (``$argon2id$v=19$m=...,t=...,p=...$salt$tag``), which
records its own parameters: raising them later only needs :func:`needs_rehash` at the next
successful login.

An unknown user is checked against :data:`_DUMMY_HASH`, a hash made with the same parameters
of a random password that was thrown away, so "no such user" and "wrong password" cost the same
time and cannot be told apart by a stopwatch.
"""

from __future__ import annotations

import secrets
from typing import Final

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

TIME_COST: Final = 2
MEMORY_COST_KIB: Final = 64 * 1024
PARALLELISM: Final = 1
HASH_LEN: Final = 32
SALT_LEN: Final = 16

_HASHER: Final = PasswordHasher(
    time_cost=TIME_COST,
    memory_cost=MEMORY_COST_KIB,
    parallelism=PARALLELISM,
    hash_len=HASH_LEN,
    salt_len=SALT_LEN,
)

# The hash of a random password nobody knows, with exactly the parameters above (a unit test
# keeps them in step). A literal rather than computed at import: importing costs nothing.
_DUMMY_HASH: Final = (
    "$argon2id$v=19$m=65536,t=2,p=1$kODhSCJuXKw3fqvCWwiKUg$fxTT4mHxIJpt7QJ4qBmBSnZULqAs6pX3tL4gmh7hl6Q"
)


def hash_password(password: str) -> str:
    """The stored form of ``password``: a PHC string with a fresh random salt."""
    return _HASHER.hash(password)


def _verify(stored: str, password: str) -> bool:
    try:
        return _HASHER.verify(stored, password)
    except (VerificationError, InvalidHashError, UnicodeError, ValueError):
        return False


def verify_password(stored: str | None, password: str) -> bool:
    """Whether ``password`` matches ``stored``; ``stored=None`` means the user does not exist.

    Never raises: a malformed stored value matches nothing (and costs a dummy check, like an
    unknown user), so a corrupt row cannot turn a login into a server error.
    """
    if stored is None or not stored.startswith("$argon2"):
        _verify(_DUMMY_HASH, password)
        return False
    try:
        return _HASHER.verify(stored, password)
    except VerifyMismatchError:
        return False
    except (VerificationError, InvalidHashError, UnicodeError, ValueError):
        # argon2 gave up before hashing ("Decoding failed"): spend the time a check costs
        _verify(_DUMMY_HASH, password)
        return False


def needs_rehash(stored: str) -> bool:
    """Whether ``stored`` was made with other parameters than today's (or is not ours at all)."""
    try:
        return _HASHER.check_needs_rehash(stored)
    except (InvalidHashError, ValueError):
        return True


def generate_password() -> str:
    """A password for a person to change or keep: 144 random bits, 24 URL-safe characters."""
    return secrets.token_urlsafe(18)
