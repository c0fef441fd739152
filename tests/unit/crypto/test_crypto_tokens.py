"""Secrets for devices and API keys."""

from __future__ import annotations

import hashlib

import pytest

from iotvault.crypto import hash_secret, new_secret, verify_secret


def test_new_secrets_are_long_random_and_url_safe() -> None:
    secrets = {new_secret() for _ in range(16)}
    assert len(secrets) == 16
    for secret in secrets:
        assert len(secret) >= 43  # 32 bytes of base64 without padding
        assert set(secret) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_new_secret_honours_nbytes() -> None:
    assert len(new_secret(48)) == 64


def test_too_short_secrets_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        new_secret(8)


def test_hash_is_the_documented_form() -> None:
    assert hash_secret("s3cret") == "sha256$" + hashlib.sha256(b"s3cret").hexdigest()


def test_verify_accepts_the_right_secret() -> None:
    secret = new_secret()
    stored = hash_secret(secret)
    assert secret not in stored
    assert verify_secret(secret, stored) is True


@pytest.mark.parametrize("candidate", ["", "wrong", "s3cre", "s3cret ", "S3CRET"])
def test_verify_rejects_other_secrets(candidate: str) -> None:
    assert verify_secret(candidate, hash_secret("s3cret")) is False


GOOD = hash_secret("s3cret")


@pytest.mark.parametrize(
    "stored",
    [
        pytest.param("", id="empty"),
        pytest.param("sha256$", id="no-digest"),
        pytest.param(GOOD.removeprefix("sha256$"), id="no-scheme"),
        pytest.param("md5$" + GOOD.removeprefix("sha256$"), id="other-scheme"),
        pytest.param(GOOD[:-1], id="short-digest"),
        pytest.param(GOOD + "0", id="long-digest"),
        pytest.param(GOOD.upper().replace("SHA256$", "sha256$"), id="upper-case-hex"),
        pytest.param(GOOD[:-1] + "g", id="not-hex"),
        pytest.param(GOOD[:-1] + "\u00e9", id="non-ascii"),
        pytest.param("sha256$sha256$" + GOOD.removeprefix("sha256$")[:57], id="doubled-scheme"),
    ],
)
def test_malformed_stored_value_matches_nothing(stored: str) -> None:
    assert verify_secret("s3cret", stored) is False


def test_secret_without_utf8_form_does_not_raise() -> None:
    assert verify_secret("\udcff", GOOD) is False
