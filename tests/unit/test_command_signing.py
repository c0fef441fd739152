"""Command signatures: canonical JSON, the JWS, and what the verifier refuses."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given
from hypothesis import strategies as st

from iotvault.crypto.signing import (
    COMMAND_TYP,
    CommandPublicKey,
    CommandSigningKey,
    b64url,
    b64url_decode,
    canonical_json,
)
from iotvault.errors import SignatureError

KEY = CommandSigningKey.from_seed(bytes(range(32)))


def test_canonical_json_is_sorted_compact_ascii() -> None:
    assert canonical_json({"b": 1, "a": [True, None, "é"], "c": {"z": 1.5, "y": "x"}}) == (
        b'{"a":[true,null,"\\u00e9"],"b":1,"c":{"y":"x","z":1.5}}'
    )
    for bad in (math.nan, math.inf, object()):
        with pytest.raises(ValueError, match="canonical JSON"):
            canonical_json({"x": bad})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text() | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_canonical_json_round_trips_and_is_stable(value: object) -> None:
    once = canonical_json(value)
    assert canonical_json(json.loads(once)) == once
    once.decode("ascii")


@given(st.binary(max_size=64))
def test_base64url_round_trip_and_strictness(data: bytes) -> None:
    text = b64url(data)
    assert "=" not in text
    assert b64url_decode(text) == data


@pytest.mark.parametrize("bad", ["a", "ab=", "a+b/", "ab c", "AB==", "AR"])
def test_base64url_refuses_padding_junk_and_non_canonical_text(bad: str) -> None:
    with pytest.raises(ValueError, match="base64url"):
        b64url_decode(bad)


def test_sign_and_verify_round_trip_with_the_rfc7638_kid() -> None:
    token = KEY.sign({"hello": "world", "n": 1})
    assert KEY.public.verify(token) == {"hello": "world", "n": 1}
    header = json.loads(b64url_decode(token.split(".")[0]))
    assert header == {"alg": "EdDSA", "kid": KEY.public.kid, "typ": COMMAND_TYP}
    x = b64url(KEY.public.raw)
    thumb = b64url(hashlib.sha256(f'{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}'.encode()).digest())
    assert KEY.public.kid == thumb
    # any Ed25519 implementation verifies the JWS signing input
    head, body, sig = token.split(".")
    Ed25519PublicKey.from_public_bytes(KEY.public.raw).verify(b64url_decode(sig), f"{head}.{body}".encode())


def test_public_key_text_forms() -> None:
    pub = KEY.public
    assert CommandPublicKey.from_text(pub.pem()) == pub
    assert CommandPublicKey.from_text(b64url(pub.raw)) == pub
    assert pub.jwk()["x"] == b64url(pub.raw)
    assert "kid=" in repr(KEY)
    assert "seed" not in repr(KEY)
    with pytest.raises(ValueError, match="32 bytes"):
        CommandPublicKey.from_raw(b"short")


def _forge(header: dict[str, object], payload: dict[str, object], sig: bytes = b"\0" * 64) -> str:
    def enc(d: dict[str, object]) -> str:
        return b64url(json.dumps(d).encode())

    return f"{enc(header)}.{enc(payload)}.{b64url(sig)}"


def test_verifier_refuses_everything_else() -> None:
    pub = KEY.public
    good = KEY.sign({"a": 1})
    head, body, sig = good.split(".")
    other = CommandSigningKey.generate()
    hs = hmac.new(pub.raw, f"{head}.{body}".encode(), hashlib.sha256).digest()
    altered = b64url(b'{"a":2}')
    cases = {
        "": "malformed",
        "a.b": "malformed",
        "a.b.c.d": "malformed",
        f"{head}.{body}.{sig}=": "malformed",
        f"{head}.{body}": "malformed",
        f"{head}.{altered}.{sig}": "bad_signature",
        f"{head}.{body}.{b64url(b'x' * 64)}": "bad_signature",
        f"{head}.{body}.{b64url(b'x' * 10)}": "bad_signature",
        other.sign({"a": 1}): "unknown_key",
        _forge({"alg": "none", "kid": pub.kid, "typ": COMMAND_TYP}, {"a": 1}): "bad_header",
        _forge({"alg": "HS256", "kid": pub.kid, "typ": COMMAND_TYP}, {"a": 1}, hs): "bad_header",
        _forge({"alg": "EdDSA", "kid": pub.kid, "typ": "JWT"}, {"a": 1}): "bad_header",
        _forge({"alg": "EdDSA", "kid": pub.kid, "typ": COMMAND_TYP, "crit": ["x"]}, {"a": 1}): "bad_header",
        _forge({"alg": "EdDSA", "typ": COMMAND_TYP}, {"a": 1}): "bad_header",
        "x" * 200_000: "malformed",
    }
    for token, reason in cases.items():
        with pytest.raises(SignatureError) as info:
            pub.verify(token)
        assert info.value.reason == reason, token[:60]
    # a signed non-object is refused after the signature
    array = KEY.sign({"a": 1})
    h = array.split(".")[0]
    body_list = b64url(b"[1]")
    sig_list = b64url(
        KEY._key.sign(f"{h}.{body_list}".encode())  # signed correctly, but not a document
    )
    with pytest.raises(SignatureError, match="malformed"):
        pub.verify(f"{h}.{body_list}.{sig_list}")


def test_another_typ_does_not_pass_for_a_command() -> None:
    token = KEY.sign({"a": 1}, typ="something-else+jws")
    with pytest.raises(SignatureError, match="bad_header"):
        KEY.public.verify(token)
    assert KEY.public.verify(token, typ="something-else+jws") == {"a": 1}


def test_seed_round_trip() -> None:
    again = CommandSigningKey.from_seed(KEY.seed())
    assert again.public == KEY.public
    with pytest.raises(ValueError, match="32 bytes"):
        CommandSigningKey.from_seed(b"\0" * 31)
    assert base64.b64encode(KEY.seed())  # 32 bytes that the key file wraps
