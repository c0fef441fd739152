"""Passwords: argon2id at no less than OWASP's minimum, and no stopwatch oracle for user names."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import pytest
from argon2 import PasswordHasher

from iotvault.crypto import passwords
from iotvault.crypto.passwords import generate_password, hash_password, needs_rehash, verify_password


def test_hash_is_argon2id_with_at_least_owasps_minimum() -> None:
    stored = hash_password("correct horse battery staple")
    assert stored.startswith("$argon2id$v=19$")
    params = dict(p.split("=") for p in stored.split("$")[3].split(","))
    assert int(params["m"]) >= 19 * 1024
    assert int(params["t"]) >= 2
    assert int(params["p"]) == 1


def test_salts_differ_and_the_password_verifies() -> None:
    a, b = hash_password("same password"), hash_password("same password")
    assert a != b
    assert verify_password(a, "same password")
    assert verify_password(b, "same password")
    assert not verify_password(a, "same passwort")
    assert not verify_password(a, "")


def test_unknown_user_path_returns_false_for_everything() -> None:
    for guess in ("", "password", "x" * 2000, "\x00", "\ud800"):
        assert verify_password(None, guess) is False


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "not a hash",
        "$argon2id$",
        "$argon2id$v=19$m=65536,t=2,p=1$!!!$???",
        "$argon2id$v=19$m=65536,t=2,p=1$c2FsdHNhbHQ",
        "$2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW",  # bcrypt
        "sha256$" + "0" * 64,
        "$argon2id$v=19$m=-1,t=2,p=1$c2FsdHNhbHQ$aGFzaA",
    ],
)
def test_malformed_stored_values_never_raise(stored: str) -> None:
    assert verify_password(stored, "password") is False
    assert needs_rehash(stored) is True


def test_surrogates_in_the_password_do_not_raise() -> None:
    stored = hash_password("fine password")
    assert verify_password(stored, "\ud800") is False


def test_dummy_hash_has_todays_parameters_and_is_a_real_hash() -> None:
    # if the parameters change, the dummy must change with them, or unknown users get cheaper
    assert not needs_rehash(passwords._DUMMY_HASH)
    PasswordHasher().check_needs_rehash(passwords._DUMMY_HASH)  # parses: not InvalidHashError


def test_needs_rehash_for_older_parameters() -> None:
    weak = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1).hash("old password")
    assert verify_password(weak, "old password")
    assert needs_rehash(weak)
    assert not needs_rehash(hash_password("new password"))


def test_generated_passwords_are_random_and_url_safe() -> None:
    generated = {generate_password() for _ in range(50)}
    assert len(generated) == 50
    for p in generated:
        assert len(p) == 24
        assert set(p) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _fastest_seconds(fn: Callable[[], object], runs: int = 5) -> float:
    """The fastest of a few runs: other load on the machine only ever adds time, so the
    minimum is the figure least disturbed by a busy CI machine."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def test_unknown_user_costs_about_as_much_as_a_wrong_password() -> None:
    stored = hash_password("the right password")
    verify_password(None, "warm up")
    verify_password(stored, "warm up")
    unknown = _fastest_seconds(lambda: verify_password(None, "a guess"))
    wrong = _fastest_seconds(lambda: verify_password(stored, "a guess"))
    assert 0.5 <= unknown / wrong <= 2.0, (unknown, wrong)
    for malformed in ("garbage", "$argon2id$garbage", "$argon2id$v=19$m=65536,t=2,p=1$!!!$???"):
        took = _fastest_seconds(partial(verify_password, malformed, "a guess"), runs=5)
        assert 0.5 <= took / wrong <= 2.0, (malformed, took, wrong)
